#!/usr/bin/env bash
# How often a DDP rank aborts at exit ("terminate called without an active exception"): runs
# tests/helpers/ddp_stream.py under torchrun (2 ranks, gloo) N times against one local augsvc
# server and counts the runs that did not exit 0, keeping each failed run's log. The figures in
# trainer_client.train.settle_before_exit came from this loop (2026-11-27, machine loaded:
# 1 abort in 30 runs before the mitigation, 0 in 100 after). `ulimit -c unlimited` first keeps
# core files (named by /proc/sys/kernel/core_pattern) for gdb.
#
#   bash scripts/ddp_exit_loop.sh [N=30] [PORT=50871]
set -uo pipefail
cd "$(dirname "$0")/.."
runs=${1:-30}
port=${2:-50871}
PY=${PYTHON:-.venv/bin/python}
work=$(mktemp -d)
"$PY" -m augsvc.cli serve --host 127.0.0.1 --port "$port" --workers 2 --dataset digits=builtin:digits \
    > "$work/server.log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null; wait $server 2>/dev/null' EXIT
for _ in $(seq 100); do grep -q '"event": "ready"' "$work/server.log" && break; sleep 0.2; done
failed=0
for i in $(seq "$runs"); do
  mkdir -p "$work/out$i"
  if ! OMP_NUM_THREADS=1 timeout 120 "$PY" -m torch.distributed.run --standalone --nproc_per_node 2 \
      tests/helpers/ddp_stream.py "127.0.0.1:$port" "$work/out$i" 128 > "$work/run$i.log" 2>&1; then
    failed=$((failed + 1))
    echo "run $i failed: $work/run$i.log"
  fi
done
echo "$failed of $runs runs failed (logs in $work)"
