"""Peak memory and time of one GPD stage-1 training step (the device check's issue-6 part).

Default: the 1.3B preset at the 480p latent 16x21x60x104 on one GPU, batch 1, random
weights, bf16 autocast with fp32 weights/Adam/EMA/teacher, per-block activation
checkpointing, a CFG teacher (two guided teacher forwards), student forward/backward,
AdamW and EMA. The README's memory section is arithmetic; this is the measurement.

    python benchmarks/stage_step.py                                   # on a GPU
    python benchmarks/stage_step.py --preset tiny --latent 3,4,8,8    # CPU dry run
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from gpd_model import WanDiT, get_preset
from gpd_train.data import PromptEmbeddingSet
from gpd_train.loop import Ema
from gpd_train.objectives import GuidanceRange, OnlineDistillation, StageGrid, StageTeacher
from gpd_train.parallel import checkpoint_blocks

TEXT_TOKENS = 512  # Wan's padded prompt length


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _prompt_set(folder: Path, latent: str, text_dim: int, channels: int) -> PromptEmbeddingSet:
    save_file({"context": torch.randn(2, TEXT_TOKENS, text_dim).half()},
              str(folder / "shard-000.safetensors"), metadata={"latent_shape": latent})
    save_file({"context": torch.randn(1, TEXT_TOKENS, text_dim).half()},
              str(folder / "negative.safetensors"))
    return PromptEmbeddingSet(folder, text_dim=text_dim, latent_channels=channels)


def measure(preset: str, latent: str, timed_steps: int = 2) -> dict:
    """Run one warm-up step and ``timed_steps`` timed ones; return times and peak memory."""
    cfg = get_preset(preset)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory() as folder:
        data = _prompt_set(Path(folder), latent, cfg.text_dim, cfg.in_channels)
        torch.manual_seed(0)
        student = WanDiT(cfg).to(device)
        teacher = WanDiT(cfg).to(device).eval().requires_grad_(False)
        teacher.load_state_dict(student.state_dict())
        checkpoint_blocks(student)
        objective = OnlineDistillation(
            student=student, teacher=StageTeacher(teacher, data.negative_context.to(device)),
            data=data, generator=torch.Generator().manual_seed(0),
            grid=StageGrid(24, 5.0, 2, device), guidance=GuidanceRange(5.0, 5.0),
            source="student", batch_size=1, freq_weight=0.0, freq_params={}, device=device,
            precision="bf16")
        optimizer = torch.optim.AdamW(student.parameters(), lr=1e-5, weight_decay=0.0)
        ema = Ema(student, 0.99)

        def train_step(step: int) -> float:
            loss, _ = objective.loss(step)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
            optimizer.step()
            ema.update(student)
            return loss.item()

        train_step(1)  # optimizer state, allocator pools and kernels warm up here
        _synchronize(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        times = []
        for step in range(2, 2 + timed_steps):
            started = time.perf_counter()
            loss = train_step(step)
            _synchronize(device)
            times.append(time.perf_counter() - started)
    on_gpu = device.type == "cuda"
    return {
        "preset": preset, "latent": latent, "batch": 1, "activation_checkpointing": True,
        "precision": "bf16 autocast, fp32 weights/Adam/EMA/teacher", "device": str(device),
        "gpu": torch.cuda.get_device_name() if on_gpu else None,
        "step_seconds": times, "loss": loss,
        "peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30 if on_gpu else None,
        "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if on_gpu else None,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="wan2.1-t2v-1.3b")
    parser.add_argument("--latent", default="16,21,60,104", help="C,T,H,W of the latent")
    parser.add_argument("--out", type=Path, help="also write the result as JSON here")
    args = parser.parse_args(argv)
    result = measure(args.preset, args.latent)
    print("issue6 stage-1 step:", json.dumps(result))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
