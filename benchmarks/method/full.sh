#!/usr/bin/env bash
# The full-budget CIFAR runs of docs/method.md ("Full budget"): a 10-epoch dense small VGG,
# then decoupling fine-tunes on all 20,000 training images, measured on all 10,000 test images.
#   bash benchmarks/method/full.sh dense            # ~25 min on 2 cores
#   bash benchmarks/method/full.sh NAME [args...]   # one fine-tune (~15 min), row in tradeoff.csv
#   EPOCHS=24 bash benchmarks/method/full.sh dense_control --lr 0.03
#       # the dense model trained on with a fine-tune's schedule, no gates: the equal-budget control
set -euo pipefail
cd "$(dirname "$0")/../.."
DATA=${DATA:-../shared/data/cifar10/cifar10-subset.npz}
export DATA DENSE=runs/cifar/dense/last.pt RESULTS=benchmarks/results/method_full RUNS=runs/cifar
export SUBSET=20000 TEST=10000 EPOCHS=${EPOCHS:-4} THREADS=${THREADS:-2}
if [ "$1" = dense ]; then
    mkdir -p "$RUNS" "$RESULTS"
    CMD=(python -m pydecouple train --data "$DATA" --arch small_vgg --epochs 10 --lr 0.05 --batch-size 128
         --threads "$THREADS" --seed 0 --no-progress --out "$RUNS/dense")
    echo "${CMD[*]}" >> "$RESULTS/commands.txt"
    PYTHONPATH=. .venv/bin/"${CMD[@]}" > "$RUNS/dense.log" 2>&1
    tail -1 "$RUNS/dense.log"
    exit 0
fi
if [ "$1" = dense_control ]; then
    shift
    OUT="$RUNS/dense_control_e$EPOCHS"
    CMD=(python -m pydecouple train --data "$DATA" --init "$DENSE" --epochs "$EPOCHS" --train-subset "$SUBSET"
         --test-subset "$TEST" --lr 0.01 --weight-decay 1e-4 --threads "$THREADS" --seed 0 --no-progress
         --out "$OUT" "$@")
    echo "${CMD[*]}" >> "$RESULTS/commands.txt"
    rm -rf "$OUT"
    PYTHONPATH=. .venv/bin/"${CMD[@]}" > "$OUT.log" 2>&1
    tail -1 "$OUT.log"
    exit 0
fi
exec bash benchmarks/method/run_experiments.sh "$@"
