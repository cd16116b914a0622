#!/usr/bin/env bash
# Runs the lines of a queue file one at a time, in order, each once: ONE training process at a
# time on a shared 2-core machine (nice 10, one thread). Lines can be appended or reordered while
# it runs (it reads the next line only when the previous job has ended); it exits when the queue
# is empty. Every job's command and its start/end time go to <queue>.done.
#   bash benchmarks/prune/queue.sh runs/prune/queue.txt &
set -uo pipefail
cd "$(dirname "$0")/../.."
Q=${1:?usage: queue.sh QUEUE_FILE}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} PYTHONPATH=.
while true; do
    line=$(head -n 1 "$Q" 2>/dev/null)
    [ -z "$line" ] && break
    sed -i 1d "$Q"
    echo "$(date -u +%FT%TZ) start $line" >> "$Q.done"
    nice -n 10 bash -c "$line"
    echo "$(date -u +%FT%TZ) end rc=$? $line" >> "$Q.done"
done
