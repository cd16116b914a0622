#!/usr/bin/env bash
# Decoupling experiments of docs/method.md, one training process at a time.
#   bash benchmarks/method/run_experiments.sh NAME [extra train args...]
# Fine-tunes $DENSE (default runs/small_vgg_dense/last.pt) on the first $SUBSET training
# images of the CIFAR-10 subset for $EPOCHS epochs, then measures the checkpoint with
# gate_stats.py (gates over the same training images, accuracy/FLOPs on the first $TEST
# test images) and appends a row to $RESULTS/tradeoff.csv (default benchmarks/results/method).
# The full-budget runs of docs/method.md set DENSE, RESULTS, RUNS, SUBSET, EPOCHS, TEST.
set -euo pipefail
cd "$(dirname "$0")/../.."
NAME=$1; shift
DATA=${DATA:-../shared/data/cifar10/cifar10-subset.npz}
SUBSET=${SUBSET:-5000}
EPOCHS=${EPOCHS:-2}
TEST=${TEST:-2000}
THREADS=${THREADS:-2}
DENSE=${DENSE:-runs/small_vgg_dense/last.pt}
RESULTS=${RESULTS:-benchmarks/results/method}
RUNS=${RUNS:-runs/method}
OUT=$RUNS/$NAME
mkdir -p "$RESULTS" "$RUNS"
CMD=(python -m pydecouple train --data "$DATA" --init "$DENSE" --decouple
     --epochs "$EPOCHS" --train-subset "$SUBSET" --test-subset "$TEST" --lr 0.01 --weight-decay 1e-4
     --threads "$THREADS" --seed 0 --no-progress --out "$OUT" "$@")
echo "${CMD[*]}" >> $RESULTS/commands.txt
rm -rf "$OUT"
PYTHONPATH=. .venv/bin/"${CMD[@]}" > "$RUNS/$NAME.log" 2>&1
tail -1 "$RUNS/$NAME.log"
PYTHONPATH=. .venv/bin/python benchmarks/method/gate_stats.py --ckpt "$OUT/last.pt" --data "$DATA" \
    --train-images "$SUBSET" --test-images "$TEST" --threads "$THREADS" \
    --csv $RESULTS/tradeoff.csv --label "$NAME" > "$RESULTS/$NAME.json"
echo "  gate_stats.py --ckpt $OUT/last.pt --train-images $SUBSET --test-images $TEST --label $NAME" >> $RESULTS/commands.txt
python3 -c "import json,sys; r=json.load(open('$RESULTS/$NAME.json')); print({k: r.get(k) for k in ('test_acc','flops_ratio','constant_gates','mi','mi_chance','predictability','predictability_all_layers','kept')})"
