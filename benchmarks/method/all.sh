#!/usr/bin/env bash
# The runs behind docs/method.md, in order (each: run_experiments.sh NAME args).
set -uo pipefail
cd "$(dirname "$0")/../.."
R=benchmarks/method/run_experiments.sh
OURS=(--gate-logit-norm --gate-bias-init 2 --lam-m 1 --gate-lr-mult 10 --lam-s 0.5)
bash $R ours_rho0.6 "${OURS[@]}" --rho 0.6
bash $R paper_ls1e-3 --gate-init paper --mi-init default --gate-input-grad --lam-m 0.04 --lam-s 1e-3
bash $R ours_rho0.5 "${OURS[@]}" --rho 0.5
bash $R ours_rho0.75 "${OURS[@]}" --rho 0.75
bash $R nonorm_rho0.6 --gate-bias-init 2 --lam-m 1 --gate-lr-mult 10 --lam-s 0.5 --rho 0.6
bash $R paper_ls5e-3 --gate-init paper --mi-init default --gate-input-grad --lam-m 0.04 --lam-s 5e-3
