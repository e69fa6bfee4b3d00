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
status=0  # (was `exec`: lets the issue-5 block below run too; the exit status is kept)
"$PYTHON" benchmarks/device_check.py "${out_args[@]}" "$@" || status=$?

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
# ISSUE6_PRESET / ISSUE6_LATENT ("C,T,H,W") shrink it for a CPU dry run.
"$PYTHON" - <<'PY' || status=$?
import json, os, tempfile, time
from pathlib import Path

import torch
from safetensors.torch import save_file

from gpd_model import WanDiT, get_preset
from gpd_train.data import PromptEmbeddingSet
from gpd_train.loop import Ema
from gpd_train.objectives import OnlineDistillation
from gpd_train.parallel import checkpoint_blocks

preset = os.environ.get("ISSUE6_PRESET", "wan2.1-t2v-1.3b")
latent = os.environ.get("ISSUE6_LATENT", "16,21,60,104")
cfg = get_preset(preset)
device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
data_dir = Path(tempfile.mkdtemp())
save_file({"context": torch.randn(2, 512, cfg.text_dim).half()},
          str(data_dir / "shard-000.safetensors"), metadata={"latent_shape": latent})
save_file({"context": torch.randn(1, 512, cfg.text_dim).half()},
          str(data_dir / "negative.safetensors"))
data = PromptEmbeddingSet(data_dir, text_dim=cfg.text_dim, latent_channels=cfg.in_channels)
torch.manual_seed(0)
student = WanDiT(cfg).to(device)
teacher = WanDiT(cfg).to(device).eval().requires_grad_(False)
teacher.load_state_dict(student.state_dict())
checkpoint_blocks(student)
objective = OnlineDistillation(
    student=student, teacher=teacher, data=data, generator=torch.Generator().manual_seed(0),
    student_steps=24, shift=5.0, guidance=5.0, source="student", batch_size=1,
    freq_weight=0.0, freq_params={}, device=device, precision="bf16")
optimizer = torch.optim.AdamW(student.parameters(), lr=1e-5, weight_decay=0.0)
ema = Ema(student, 0.99)

def sync():
    if device.type == "cuda":
        torch.cuda.synchronize()

def train_step(step):
    loss, _ = objective.loss(step)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
    optimizer.step()
    ema.update(student)
    objective.after_update()
    return loss.item()

train_step(1)  # first step: optimizer state, allocator, kernels
sync()
if device.type == "cuda":
    torch.cuda.reset_peak_memory_stats()
times = []
for step in (2, 3):
    started = time.perf_counter()
    loss = train_step(step)
    sync()
    times.append(time.perf_counter() - started)
result = {"preset": preset, "latent": latent, "batch": 1, "activation_checkpointing": True,
          "precision": "bf16 autocast, fp32 weights/Adam/EMA/teacher", "device": str(device),
          "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None,
          "step_seconds": times, "loss": loss,
          "peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30
          if device.type == "cuda" else None,
          "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30
          if device.type == "cuda" else None}
print("issue6 stage-1 step:", json.dumps(result))
if os.environ.get("OUT"):
    Path(os.environ["OUT"], "issue6_stage_step.json").write_text(json.dumps(result, indent=1))
PY
exit $status
