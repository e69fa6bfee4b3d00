#!/usr/bin/env bash
# On a lent GPU: the fused kernels' correctness against the reference on CUDA, then their
# timings against eager and torch.compile'd references; a short table is printed last.
# Installs and downloads nothing: uses the torch and triton already on the machine
# (PYTHON overrides the interpreter). Full results go to $OUT/device_check.json when
# OUT is set. Extra arguments pass through (e.g. --skip-timings).
set -euo pipefail
cd "$(dirname "$0")/.."
unset TRITON_INTERPRET  # the interpreter is for CPU-only machines
PYTHON=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,clocks.mem,temperature.gpu \
  --format=csv || true
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
out_args=()
if [[ -n "${OUT:-}" ]]; then out_args=(--out "$OUT"); fi
exec "$PYTHON" benchmarks/device_check.py "${out_args[@]}" "$@"
