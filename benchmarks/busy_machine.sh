#!/usr/bin/env bash
# `make demo`'s stage 0 (tiny preset, built-in videos) in iterations per second, on the idle
# machine and beside BUSY single-threaded busy loops, under the old thread policy (torch's
# default count whatever the load, given as --threads) and the new one (--threads 0:
# gpd_train/train/threads.py lowers the count to the cores the others leave free), in one run; the
# old policy with OMP_WAIT_POLICY=PASSIVE (waiting OpenMP threads sleep instead of spinning)
# is measured beside it for comparison. Prints one table.
#
#   bash benchmarks/busy_machine.sh [ITERATIONS]     (default 60; BUSY=2, PYTHON=... to change)
#
# Run it on an otherwise quiet machine: the idle rows are idle only if nothing else runs.
# it/s is over the iterations after the first WARMUP (10), from each step's "seconds" in
# stage0/metrics.jsonl. Nothing is written outside a temporary folder, removed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
iterations=${1:-60}
busy=${BUSY:-2}
warmup=10
if [[ -z ${PYTHON:-} ]]; then
  PYTHON=python3
  [[ -x .venv/bin/python ]] && PYTHON=.venv/bin/python
fi
[[ $iterations =~ ^[0-9]+$ ]] && ((iterations > warmup)) || {
  echo "busy_machine.sh: ITERATIONS must be a whole number above $warmup, got '$iterations'" >&2
  exit 2
}
unset OMP_NUM_THREADS OMP_WAIT_POLICY  # the policies decide, not the caller's environment
work=$(mktemp -d)
busy_pids=()

stop_busy() {
  ((${#busy_pids[@]})) || return 0
  kill "${busy_pids[@]}" 2>/dev/null || true
  wait "${busy_pids[@]}" 2>/dev/null || true
  busy_pids=()
}
trap 'stop_busy; rm -rf "$work"' EXIT

start_busy() {
  for _ in $(seq "$busy"); do
    (while :; do :; done) &
    busy_pids+=($!)
  done
  sleep 1  # running before the measured process looks at the load
}

default=$("$PYTHON" -c "import torch; print(torch.get_num_threads())")
rows=()

# measure LABEL POLICY THREADS [ENV=VALUE ...]: one stage-0 run; appends a table row.
measure() {
  local label=$1 policy=$2 threads=$3 shown=$3
  shift 3
  [[ $threads == 0 ]] && shown=$default  # unless the run says it chose fewer
  local run_dir="$work/$label-$policy"
  if ! env "$@" PYTHONPATH="$PWD" "$PYTHON" -m gpd_train --stage 0 \
      --teacher-iterations "$iterations" --run-dir "$run_dir" --device cpu \
      --threads "$threads" >/dev/null 2>"$run_dir.err"; then
    echo "busy_machine.sh: the $label/$policy run failed:" >&2
    tail -5 "$run_dir.err" >&2
    exit 1
  fi
  rows+=("$("$PYTHON" - "$run_dir/stage0/metrics.jsonl" "$run_dir.err" "$shown" "$warmup" \
      "$label" "$policy" <<'EOF'
import json, re, sys
metrics, err, threads, warmup, label, policy = sys.argv[1:]
steps = [json.loads(line) for line in open(metrics)]
seconds = [r["seconds"] for r in steps if "seconds" in r and "step" in r][int(warmup):]
chosen = re.search(r"threads: (\d+) instead", open(err).read())
used = chosen.group(1) if chosen else threads
print(f"{label:<12} {policy:<22} {used:>7} {len(seconds) / sum(seconds):>8.2f}")
EOF
  )")
}

measure idle old "$default"
measure idle new 0
start_busy
measure "busy x$busy" old "$default"
measure "busy x$busy" new 0
measure "busy x$busy" "old + PASSIVE wait" "$default" OMP_WAIT_POLICY=PASSIVE
stop_busy

echo "stage 0 of make demo: $iterations iterations (it/s over the last $((iterations - warmup)));" \
     "torch's default $default threads on $(nproc) cores; $(uname -n)"
printf '%-12s %-22s %7s %8s\n' machine policy threads "it/s"
printf '%s\n' "${rows[@]}"
