#!/usr/bin/env bash
# On a lent GPU: correctness first (the kernel tests on CUDA, the fused model path, the
# library ops against float64), then timings, most wanted first: the library kernels and
# fused DiT ops against eager and torch.compile (alone, then inside the model), tiny-preset
# training eager vs CUDA graph,
# one 1.3B stage step (full weights, then LoRA), the sampler and the 1.3B training-step MFU,
# the 1.3B encode -> sample -> decode -> MP4 path, the sequence-parallel path's overhead on
# one GPU; then one summary line per block.
# Installs and downloads nothing: uses the torch and triton already on the machine
# (PYTHON overrides the interpreter). Full results go to $OUT (JSON, one log per block)
# when OUT is set.
#
#   bash benchmarks/device_check.sh [--quick] [--only BLOCK,...] [--budget SECONDS] [ARGS]
#
# --quick: the correctness blocks alone (kernel-tests, kernel-checks). --only: the named
# blocks alone (e.g. a rerun of the ones a first run cut short). --budget (default 540,
# under a 10-minute call): every block runs under `timeout`, capped at its own limit below
# and at what is left of the budget; a block that would get under 20 s is skipped, and
# either shows in the final table, so a slow or hung block costs its cap, not the run's
# later blocks. Other arguments pass through to device_check.py.
# The caps are guesses, not measurements: no run has timed the whole script yet; each
# block's seconds are in the final table.
set -uo pipefail
cd "$(dirname "$0")/.."
unset TRITON_INTERPRET  # the interpreter is for CPU-only machines
PYTHON=${PYTHON:-python3}
quick=0
only=""
budget=540
passthrough=()
while (($#)); do
  case $1 in
    --quick) quick=1 ;;
    --only) only=$2; shift ;;
    --budget) budget=$2; shift ;;
    *) passthrough+=("$1") ;;
  esac
  shift
done
[[ $budget =~ ^[0-9]+$ ]] || { echo "device_check.sh: --budget takes whole seconds, got '$budget'" >&2; exit 2; }
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,clocks.mem,temperature.gpu \
  --format=csv || true
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
logs=${OUT:-$(mktemp -d)}
mkdir -p "$logs"
status=0  # every block runs; the script exits non-zero if any failed
summary=()

# run_block NAME CAP COMMAND...: run under `timeout` (CAP seconds or the budget left), tee
# to $logs/NAME.log, and keep one summary row: the block's last `SUMMARY ...` line, else
# its last line (pytest's counts).
run_block() {
  local name=$1 cap=$2 start=$SECONDS rc line verdict=ok
  shift 2
  if [[ -n $only && ",$only," != *",$name,"* ]]; then return; fi
  local left=$((budget - SECONDS))
  ((cap > left)) && cap=$left
  if ((cap < 20)); then
    summary+=("| $name | skipped: ${left} s of the ${budget} s budget left | 0 | - |")
    return
  fi
  echo "==== $name (at most $cap s): $*"
  timeout --kill-after=10 "$cap" "$@" 2>&1 | tee "$logs/$name.log"
  rc=${PIPESTATUS[0]}
  line=$(grep '^SUMMARY ' "$logs/$name.log" | tail -n 1 | cut -c 9-)
  [[ -n $line ]] || line=$(grep -v '^\s*$' "$logs/$name.log" | tail -n 1 | tr -d '=|')
  if [[ $rc == 124 || $rc == 137 ]]; then verdict="TIMEOUT (${cap} s)"; status=$rc
  elif [[ $rc != 0 ]]; then verdict="FAIL ($rc)"; status=$rc; fi
  summary+=("| $name | $verdict | $((SECONDS - start)) | ${line:--} |")
}

pytest_args=(-q -rs -p no:cacheprovider)
# ---- correctness ----------------------------------------------------------------------
# The kernel tests on CUDA (DiT ops, double-step, frequency loss in both forms, the model's
# fused path against its CPU reference, the sampler's real CUDA graph against eager), then
# the registered gpd:: ops against float64 on fresh inputs.
run_block kernel-tests 180 "$PYTHON" -m pytest "${pytest_args[@]}" tests/test_adaln.py \
  tests/test_rope_norm.py tests/test_double_step.py tests/test_freq_loss.py \
  tests/test_band_amplitude_kernel.py tests/test_graph_sampler.py
if [[ $quick == 1 ]]; then
  run_block kernel-checks 120 "$PYTHON" benchmarks/device_check.py ${OUT:+--out "$OUT"} \
    --quick "${passthrough[@]}"
else
  # ---- timings, most wanted first --------------------------------------------------------
  # Library kernels (checks, then timings: freq_loss % of HBM; the band-amplitude loss beside
  # its torch.fft reference, x torch.fft in the summary) and the fused DiT ops against eager
  # and torch.compile, with the faster backend per op; its tables end its log.
  run_block kernels 240 "$PYTHON" benchmarks/device_check.py ${OUT:+--out "$OUT"} \
    "${passthrough[@]}"
  # Issue 14 item 2's decision, inside the model: 4 blocks of the 1.3B DiT fwd+bwd at 480p
  # with every op on Triton, then each op alone on torch.compile; the faster per op.
  run_block dit-op-backends 150 "$PYTHON" benchmarks/dit_op_backends.py \
    ${OUT:+--out "$OUT/issue14_dit_op_backends.json"}
  # Issue 14 item 3: tiny-preset training eager vs --cuda-graph (stage 0 for 200 steps,
  # stage 1 for 100, each mode): steady-state it/s, the speed-up, the pipeline time
  # projected from them, and the two modes' stage-0 losses side by side (fails if they
  # differ by more than 1e-2 relative over the first 20 steps).
  run_block tiny-train 180 "$PYTHON" benchmarks/train_graph.py \
    ${OUT:+--out "$OUT/issue14_train_graph.json"}
  # One GPD stage-1 training step of the 1.3B preset at 480p on one GPU: batch 1, random
  # weights, bf16 autocast, per-block activation checkpointing, CFG teacher + student
  # forward/backward + AdamW + EMA: peak memory and step time.
  run_block stage-step 120 "$PYTHON" benchmarks/stage_step.py \
    ${OUT:+--out "$OUT/issue6_stage_step.json"}
  # The same step as a LoRA stage (issue 15): one bf16 base, rank-64 adapters.
  run_block stage-step-lora 120 "$PYTHON" benchmarks/stage_step.py --lora-rank 64 \
    ${OUT:+--out "$OUT/issue15_stage_step_lora.json"}
  # The 6-step sampler eager vs CUDA graph (tiny and 1.3B) and the DiT training-step MFU at
  # the 1.3B shape (bf16, 480p latent 16x21x60x104, random weights; FLOPs counted from the
  # matmuls + attention, see dit_forward_flops in bench_dit_ops.py).
  bench_args=("${pytest_args[@]}" -s -k "bench_sampler or mfu")
  if [[ -n "${OUT:-}" ]]; then bench_args+=(--benchmark-json "$OUT/issue5_bench.json"); fi
  run_block sampler-mfu 180 "$PYTHON" -m pytest benchmarks/ "${bench_args[@]}"
  # Issue 13: the 1.3B encode -> sample -> decode -> MP4 path with random weights (umT5-XXL
  # bf16, the DiT bf16 for 6 Euler steps of one 480p latent, the Wan2.1 VAE with tiling,
  # PyAV's H.264): seconds and peak memory per step. Needs transformers, diffusers and PyAV
  # on this interpreter.
  run_block realscale-path 240 "$PYTHON" benchmarks/realscale_path.py \
    ${OUT:+--out "$OUT/issue13_realscale_path.json"}
  # Issue 23: 4 blocks of the 1.3B DiT at 480p, bf16, plain (no collective) against the
  # Ulysses path over a world of one (every all-to-all and the gather run, as copies):
  # forward and forward+backward times, the overhead, the outputs' relative difference.
  run_block sequence-parallel 120 "$PYTHON" benchmarks/sequence_overhead.py \
    ${OUT:+--out "$OUT/issue23_sequence_overhead.json"}
fi

echo
echo "## device_check.sh$([[ $quick == 1 ]] && echo ' --quick'): one line per block (logs: $logs)"
echo "| block | result | seconds | summary |"
echo "|---|---|---|---|"
printf '%s\n' "${summary[@]}"
echo "total: $SECONDS s"
exit $status
