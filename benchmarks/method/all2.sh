#!/usr/bin/env bash
# Second batch (after ours_rho0.6 and paper_ls1e-3 of all.sh): docs/method.md.
set -uo pipefail
cd "$(dirname "$0")/../.."
R=benchmarks/method/run_experiments.sh
bash $R nonorm_rho0.65 --gate-bias-init 2 --lam-m 1 --gate-lr-mult 10 --lam-s 0.5 --rho 0.65
bash $R g0.3n0.5_rho0.65 --gate-logit-norm --gate-norm-gamma 0.3 --gate-noise 0.5 --gate-bias-init 2 --lam-m 1 --gate-lr-mult 10 --lam-s 0.5 --rho 0.65
bash $R paper_ls1e-3 --gate-init paper --mi-init default --gate-input-grad --lam-m 0.04 --lam-s 1e-3
