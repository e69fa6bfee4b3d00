"""Per-GPU memory of distilling Wan2.2-A14B (two 14B-shaped experts): ARITHMETIC, not measured.

Reads the expert's shape from a gpd_model preset (parameters counted on the meta device) and
the LoRA adapter's from gpd_train.run.lora.adapter_shapes; prints the markdown tables of
docs/a14b-memory.md (a test checks the two agree).

    python benchmarks/a14b_memory.py                       # 480p, 81 frames, LoRA rank 64
    python benchmarks/a14b_memory.py --height 720 --width 1280

Assumptions (each one a line of the printed tables; GB = 1e9 bytes):
- An expert is the preset's WanDiT (Wan2.2-T2V-A14B's experts have Wan2.1-T2V-14B's shape).
- One trainable expert at a time (the phases over start sigmas). The teacher pair and the
  other student expert stay frozen in memory: a target's teacher steps may cross the boundary,
  and the student's rollouts to a start sigma pass through the other expert's range.
- LoRA on one GPU: each expert's base stored once in bf16 (2P), shared by its teacher and
  student; fp32 adapters (4A each): two teacher adapters (a stage after the first), the
  trainable student adapter with its gradient, Adam m and v and EMA (20A), and the other
  student expert's (4A).
- Full weights under FSDP2 over G GPUs: the trainable expert's fp32 master, gradient, Adam m
  and v and EMA (20P); the frozen teacher pair and the other student expert as the trainer
  loads them today, fp32 (4P each; bf16 would halve them); all sharded over the G GPUs, plus
  the bf16 copies FSDP unshards in turn (two blocks and the non-block parameters).
- Activations of the trainable expert, one sample per data group, per-block activation
  checkpointing: the kept block inputs n L d and one block recomputed in the backward,
  L (17 d + 2 f), both bf16 (docs/real-scale.md); under sequence parallel degree S both are
  divided by S and the attention keeps its head-split q, k, v (20 d instead of 17 d). The
  teacher's forwards run without autograd and hold one block's working set at a time.
- Not counted: CUDA context, allocator fragmentation, the text encoder and VAE (not loaded
  by the trainer), the teacher's transient forward, all-to-all buffers, rollout lanes.
"""

from __future__ import annotations

import argparse
import math

import torch

from gpd_model import WanDiT, get_preset
from gpd_train.config.settings import LoraSpec
from gpd_train.run.lora import adapter_shapes

GB = 1e9
BF16, FP32 = 2, 4  # bytes per value


def _counts(preset: str, rank: int) -> dict[str, float]:
    """Parameters P of one expert, of one block, of the non-block parts, and adapter A."""
    with torch.device("meta"):
        model = WanDiT(get_preset(preset))
    total = sum(p.numel() for p in model.parameters())
    block = sum(p.numel() for p in model.blocks[0].parameters())
    adapter = sum(math.prod(shape) for shape in
                  adapter_shapes(model, LoraSpec(rank=rank, alpha=float(rank))).values())
    cfg = model.cfg
    return {"P": total, "block": block, "root": total - cfg.num_layers * block, "A": adapter,
            "n": cfg.num_layers, "d": cfg.dim, "f": cfg.ffn_dim, "patch": cfg.patch_size}


def tokens(height: int, width: int, frames: int, patch: tuple[int, int, int],
           temporal: int = 4, spatial: int = 8) -> int:
    """Patch tokens of one video through Wan2.1's VAE (4x time, 8x space) and the patch."""
    latent = ((frames - 1) // temporal + 1, height // spatial, width // spatial)
    return math.prod(size // p for size, p in zip(latent, patch, strict=True))


def activations(c: dict[str, float], length: int, sp: int) -> tuple[float, float]:
    """(kept block inputs, one recomputed block) bytes of one sample at sequence degree sp."""
    kept = c["n"] * length * c["d"] * BF16 / sp
    per_token = (17 if sp == 1 else 20) * c["d"] + 2 * c["f"]
    return kept, length * per_token * BF16 / sp


def lora_rows(c: dict[str, float], length: int, gpu_gb: float) -> list[tuple[str, float]]:
    bases = 2 * BF16 * c["P"]
    teacher_adapters = 2 * FP32 * c["A"]
    trainable = 5 * FP32 * c["A"]  # weights, gradient, Adam m and v, EMA
    other_student = FP32 * c["A"]
    kept, block = activations(c, length, 1)
    rows = [("two expert bases, bf16 (teacher pair and student bases), 2 x 2P", bases),
            ("two teacher adapters, fp32, 2 x 4A", teacher_adapters),
            ("trainable student adapter: weights, gradient, Adam m and v, EMA, 20A", trainable),
            ("other student expert's adapter, fp32, 4A", other_student),
            ("activations: kept block inputs", kept),
            ("activations: one block recomputed", block)]
    total = sum(value for _, value in rows)
    return [*rows, ("**total**", total), (f"left of {gpu_gb:g} GB", gpu_gb * GB - total)]


def full_rows(c: dict[str, float], length: int, gpus: int, gpu_gb: float,
              sp_degrees: list[int]) -> tuple[list[str], list[tuple[str, list[float]]]]:
    state = {"trainable expert: fp32 weights, gradient, Adam m and v, EMA, 20P / G":
             5 * FP32 * c["P"] / gpus,
             "frozen teacher pair, fp32, 2 x 4P / G": 2 * FP32 * c["P"] / gpus,
             "other student expert, frozen fp32, 4P / G": FP32 * c["P"] / gpus,
             "bf16 unsharded in turn: 2 blocks + non-block parts":
             BF16 * (2 * c["block"] + c["root"])}
    rows = [(name, [value] * len(sp_degrees)) for name, value in state.items()]
    acts = [activations(c, length, sp) for sp in sp_degrees]
    rows.append(("activations: kept block inputs / S", [kept for kept, _ in acts]))
    rows.append(("activations: one block recomputed / S", [block for _, block in acts]))
    totals = [sum(values[i] for _, values in rows) for i in range(len(sp_degrees))]
    rows.append(("**total**", totals))
    rows.append((f"left of {gpu_gb:g} GB", [gpu_gb * GB - t for t in totals]))
    # The three frozen experts in bf16 instead (not what the trainer loads today).
    bf16 = [t - 3 * (FP32 - BF16) * c["P"] / gpus for t in totals]
    rows.append(("total with the three frozen experts in bf16 (3 x 2P / G less)", bf16))
    rows.append((f"left of {gpu_gb:g} GB", [gpu_gb * GB - t for t in bf16]))
    heads = [f"S = {sp} ({gpus // sp} x {sp})" for sp in sp_degrees]
    return heads, rows


def report(args: argparse.Namespace) -> str:
    c = _counts(args.preset, args.lora_rank)
    length = tokens(args.height, args.width, args.frames, c["patch"])
    lines = [f"Expert: preset `{args.preset}`, P = {c['P'] / 1e9:.3f}e9 parameters "
             f"({c['n']} blocks of {c['block'] / 1e6:.1f}e6, {c['root'] / 1e6:.1f}e6 outside "
             f"them); LoRA rank {args.lora_rank} on every target: A = {c['A'] / 1e6:.1f}e6. "
             f"{args.height} x {args.width}, {args.frames} frames: L = {length:,} tokens. "
             "One sample per data group.", "",
             f"LoRA, one {args.h200_gb:g} GB GPU (bytes in GB):", "",
             "| term | GB |", "|---|---|"]
    lines += [f"| {name} | {value / GB:.1f} |"
              for name, value in lora_rows(c, length, args.h200_gb)]
    sp_degrees = [s for s in (1, 2, 4, 8) if args.gpus % s == 0]
    heads, rows = full_rows(c, length, args.gpus, args.gpu_gb, sp_degrees)
    lines += ["", f"Full weights, FSDP2 over {args.gpus} x {args.gpu_gb:g} GB, sequence parallel "
              "degree S (data groups x S), per GPU (GB):", "",
              "| term | " + " | ".join(heads) + " |", "|---" * (len(heads) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(f"{v / GB:.1f}" for v in values) + " |"
              for name, values in rows]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="wan2.1-t2v-14b",
                        help="one expert's shape (Wan2.2-T2V-A14B's: wan2.1-t2v-14b)")
    parser.add_argument("--lora-rank", type=int, default=64)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=832)
    parser.add_argument("--frames", type=int, default=81)
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--gpu-gb", type=float, default=80.0, help="full weights: each GPU's")
    parser.add_argument("--h200-gb", type=float, default=141.0, help="LoRA: the one GPU's")
    return parser


def main(argv: list[str] | None = None) -> int:
    print(report(build_parser().parse_args(argv)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
