"""Which backend each fused DiT op should default to, timed inside the model (issue 14 item 2).

The device check times each op alone; what a user gets is the model's training step. This
times forward+backward of the DiT (default: 4 blocks of the 1.3B preset, the same per-block
shapes as all 30, on the 480p latent 16x21x60x104 with 512 text tokens, batch 1, bf16
autocast over fp32 weights, as the trainer runs it) with every op on its Triton kernel,
then with one op at a time switched to `torch.compile` of its reference
(`gpd_kernels.set_dit_op_backend`), side by side in one process. An op should default to
"compile" when switching it alone makes the step faster by more than `--margin`; the last
line gives the `GPD_DIT_OP_BACKENDS` value that says so.

    python benchmarks/dit_op_backends.py                                  # on a GPU
    python benchmarks/dit_op_backends.py --device cpu --preset tiny --latent 3,4,8,8 \\
        --text-tokens 8 --rounds 1 --warmup 1      # CPU dry run (TRITON_INTERPRET=1)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

import torch
from kernel_cases import median_seconds

from gpd_kernels import dit_op_backend, force_fused_dit_ops, set_dit_op_backend
from gpd_kernels.dit import DIT_OPS, ENV_VAR, environment_value
from gpd_model import WanDiT, get_preset


def measure(preset: str, layers: int, latent: tuple[int, ...], text_tokens: int,
            device: torch.device, rounds: int, warmup: int) -> list[dict]:
    """One row per configuration: all Triton, then each op alone on compile."""
    cfg = get_preset(preset, num_layers=layers)
    torch.manual_seed(0)
    model = WanDiT(cfg).to(device)
    x = torch.randn(1, *latent, device=device)
    context = torch.randn(1, text_tokens, cfg.text_dim, device=device)
    timestep = torch.tensor([500.0], device=device)
    def step() -> None:
        model.zero_grad(set_to_none=True)
        # On the CPU the fused path runs only when forced (Triton interpreted): a dry run.
        with (force_fused_dit_ops() if device.type == "cpu" else contextlib.nullcontext(),
              torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda")):
            out = model(x, timestep, context)
        out.float().square().mean().backward()

    saved = {name: dit_op_backend(name) for name in DIT_OPS}
    configs = [("triton", {})] + [(f"{name}=compile", {name: "compile"}) for name in DIT_OPS]
    rows = []
    try:
        for label, chosen in configs:
            for name in DIT_OPS:
                set_dit_op_backend(name, chosen.get(name, "triton"))
            rows.append({"config": label,
                         "seconds": median_seconds(step, rounds, warmup, device.type)})
            print(f"timed {label}: {rows[-1]['seconds'] * 1e3:.2f} ms", flush=True)
    finally:
        for name, backend in saved.items():
            set_dit_op_backend(name, backend)
    return rows


def recommended(rows: list[dict], margin: float) -> dict[str, str]:
    """Per op: "compile" if switching it alone beat all-Triton by more than `margin`."""
    base = rows[0]["seconds"]
    chosen = {}
    for row in rows[1:]:
        name = row["config"].removesuffix("=compile")
        chosen[name] = "compile" if row["seconds"] < base * (1 - margin) else "triton"
    return chosen


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--preset", default="wan2.1-t2v-1.3b")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--latent", default="16,21,60,104", help="C,T,H,W")
    parser.add_argument("--text-tokens", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--margin", type=float, default=0.02,
                        help="relative speed-up a switch must beat (default 2%%)")
    parser.add_argument("--out", type=Path, help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("dit_op_backends: no CUDA device visible; for a dry run give --device cpu "
              "(with TRITON_INTERPRET=1)", file=sys.stderr)
        return 2
    latent = tuple(int(n) for n in args.latent.split(","))
    rows = measure(args.preset, args.layers, latent, args.text_tokens, device, args.rounds,
                   args.warmup)
    chosen = recommended(rows, args.margin)
    base = rows[0]["seconds"]
    print(f"\n{args.preset}, {args.layers} blocks, latent {latent}, fwd+bwd, median of "
          f"{args.rounds}; x > 1: the switch is faster")
    print("| configuration | ms | x all-triton |\n|---|---|---|")
    for row in rows:
        print(f"| {row['config']} | {row['seconds'] * 1e3:.2f} | {base / row['seconds']:.3f} |")
    if args.out:
        args.out.write_text(json.dumps({"rows": rows, "recommended": chosen}, indent=1))
    print(f"SUMMARY dit-op-backends in the model: {ENV_VAR}={environment_value(chosen)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
