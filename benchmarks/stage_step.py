"""Peak memory and time of one GPD stage-1 training step (the device check's issue-6 part).

Default: the 1.3B preset at the 480p latent 16x21x60x104 on one GPU, batch 1, random
weights, bf16 autocast with fp32 weights/Adam/EMA/teacher, per-block activation
checkpointing, a CFG teacher (two guided teacher forwards), student forward/backward,
AdamW and EMA. The README's memory section is arithmetic; this is the measurement.

With ``--lora-rank R`` the step is a LoRA stage after stage 1 (gpd_train.run.lora): one bf16
base, frozen, with a teacher adapter and a trained student adapter (fp32, Adam, EMA).
``state_gib`` counts the bytes of every parameter, gradient, Adam and EMA tensor (on any
device); ``peak_allocated_gib`` is CUDA's peak, activations included.

    python benchmarks/stage_step.py                                   # on a GPU
    python benchmarks/stage_step.py --lora-rank 64                    # the LoRA step
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

from gpd_model import Conditioning, Denoiser, DiTDenoiser, WanDiT, get_preset
from gpd_train.config.settings import LoraSpec
from gpd_train.data.embeddings import PromptEmbeddingSet
from gpd_train.parallel import checkpoint_blocks
from gpd_train.run.lora import adapter_shapes, lora_stage_model
from gpd_train.train.loop import Ema, ModelState
from gpd_train.train.objectives import GuidanceRange, OnlineDistillation, StageGrid, stage_teacher

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


def _models(cfg, device: torch.device, negative: Conditioning,
            lora_rank: int) -> tuple[torch.nn.Module, Denoiser]:
    """(student, stage teacher): two full models, or one bf16 base with two adapters."""
    student = WanDiT(cfg).to(device)
    if not lora_rank:
        teacher = WanDiT(cfg).to(device).eval().requires_grad_(False)
        teacher.load_state_dict(student.state_dict())
        return student, stage_teacher(teacher, negative)
    spec = LoraSpec(lora_rank, float(lora_rank))
    previous = {k: torch.randn(shape) * 0.01 for k, shape in adapter_shapes(student, spec).items()}
    stage = lora_stage_model(student, spec, previous, "bf16")
    return stage.model, stage_teacher(stage.model, negative, stage.adapter)


def _state_bytes(modules: list[torch.nn.Module], optimizer: torch.optim.Optimizer,
                 ema: Ema) -> int:
    """Bytes of the distinct parameter storages, gradients, optimizer and EMA tensors."""
    storages: dict[int, int] = {}
    for module in modules:
        for param in module.parameters():
            for tensor in (param, param.grad):
                if tensor is not None:
                    storages[tensor.untyped_storage().data_ptr()] = (
                        tensor.untyped_storage().nbytes())
    extra = [v for state in optimizer.state.values() for v in state.values()
             if isinstance(v, torch.Tensor)] + list(ema.state_dict().values())
    return sum(storages.values()) + sum(t.numel() * t.element_size() for t in extra)


def measure(preset: str, latent: str, timed_steps: int = 2, lora_rank: int = 0) -> dict:
    """Run one warm-up step and ``timed_steps`` timed ones; return times and peak memory."""
    cfg = get_preset(preset)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory() as folder:
        data = _prompt_set(Path(folder), latent, cfg.text_dim, cfg.in_channels)
        torch.manual_seed(0)
        student, teacher = _models(cfg, device, data.negative.to(device), lora_rank)
        checkpoint_blocks(student)
        objective = OnlineDistillation(
            student=DiTDenoiser(student), teacher=teacher,
            data=data, generator=torch.Generator().manual_seed(0),
            grid=StageGrid(24, 5.0, 2, device), guidance=GuidanceRange(5.0, 5.0),
            source="student", batch_size=1, freq_weight=0.0, freq_params={}, device=device,
            precision="bf16")
        trained = [p for p in student.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trained, lr=1e-5, weight_decay=0.0)
        trained_state = ModelState(student)  # what the trainer averages and checkpoints
        ema = Ema(trained_state, 0.99)

        def train_step(step: int) -> float:
            loss, _ = objective.loss(step)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trained, 1.0)
            optimizer.step()
            ema.update(trained_state)
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
        state = _state_bytes([student, *teacher.modules()], optimizer, ema)
    on_gpu = device.type == "cuda"
    precision = ("bf16 autocast, fp32 weights/Adam/EMA/teacher" if not lora_rank else
                 f"LoRA rank {lora_rank}: bf16 frozen base, fp32 adapters/Adam/EMA")
    return {
        "preset": preset, "latent": latent, "batch": 1, "activation_checkpointing": True,
        "precision": precision, "device": str(device), "lora_rank": lora_rank,
        "trained_parameters": sum(p.numel() for p in trained), "state_gib": state / 2**30,
        "gpu": torch.cuda.get_device_name() if on_gpu else None,
        "step_seconds": times, "loss": loss,
        "peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30 if on_gpu else None,
        "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if on_gpu else None,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="wan2.1-t2v-1.3b")
    parser.add_argument("--latent", default="16,21,60,104", help="C,T,H,W of the latent")
    parser.add_argument("--lora-rank", type=int, default=0,
                        help="measure a LoRA stage of this rank (0: full weights)")
    parser.add_argument("--out", type=Path, help="also write the result as JSON here")
    args = parser.parse_args(argv)
    result = measure(args.preset, args.latent, lora_rank=args.lora_rank)
    print("issue6 stage-1 step:", json.dumps(result))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
