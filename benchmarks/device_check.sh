#!/usr/bin/env bash
# On a lent GPU: the fused DiT ops and sampler benchmarks, one 1.3B stage step (memory, time),
# then the fused kernels' correctness against the reference on CUDA and their timings
# against eager and torch.compile'd references; the kernels' table is printed last.
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
status=0  # every block runs; the script exits non-zero if any failed

# ---- issue 5 (sampling helper) -------------------------------------------------------
# Fused DiT ops (adaLN, RMSNorm+RoPE) vs eager and torch.compile at the 1.3B shape; the
# 6-step sampler eager vs CUDA graph at tiny and 1.3B; the DiT training-step MFU at the
# 1.3B shape (bf16, 480p latent 16x21x60x104, random weights; FLOPs counted from the
# matmuls + attention, see dit_forward_flops in bench_dit_ops.py). Selected with -k so
# that benchmarks/conftest.py collects each module once.
bench_args=(-q -rs -s -p no:cacheprovider -k "bench_dit_ops or bench_sampler")
if [[ -n "${OUT:-}" ]]; then bench_args+=(--benchmark-json "$OUT/issue5_bench.json"); fi
"$PYTHON" -m pytest benchmarks/ "${bench_args[@]}" || status=$?
# ---- issue 6 (distributed helper) ----------------------------------------------------
# One GPD stage-1 training step of the 1.3B preset at 480p on one GPU: latent 16x21x60x104,
# batch 1, random weights, bf16 autocast, per-block activation checkpointing, CFG teacher
# (two guided teacher forwards) + student forward/backward + AdamW + EMA. Prints peak memory
# and step time (the README's memory section is arithmetic; this is the measurement).
# `benchmarks/stage_step.py --preset tiny --latent 3,4,8,8` is the CPU dry run (tested).
"$PYTHON" benchmarks/stage_step.py ${OUT:+--out "$OUT/issue6_stage_step.json"} || status=$?
# ---- issue 3 (fused kernels), last so that its table is the last thing printed ------------
# Correctness of the Triton kernels against the float64 reference on CUDA, then timings.
"$PYTHON" benchmarks/device_check.py "${out_args[@]}" "$@" || status=$?
exit $status
