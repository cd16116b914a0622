#!/usr/bin/env bash
# Third batch: the trade-off curve of our setting, and a longer run (docs/method.md).
set -uo pipefail
cd "$(dirname "$0")/../.."
R=benchmarks/method/run_experiments.sh
OURS=(--gate-logit-norm --gate-bias-init 2 --lam-m 1 --gate-lr-mult 10 --lam-s 0.5)
bash $R ours_rho0.75 "${OURS[@]}" --rho 0.75
bash $R ours_rho0.85 "${OURS[@]}" --rho 0.85
