"""The cost of the Ulysses path on one GPU (the device check's issue-23 block).

A world of one: the same DiT forward (and forward + backward) without sequence parallelism
(no collective at all) and with its tokens "split" over a process group of one rank, which
runs every all-to-all and the final gather (copies on one GPU). Reports both times, the
overhead, and how far the two outputs are apart (bf16: the split changes memory layouts).
What the all-to-all costs across GPUs (NCCL, NVLink) needs several GPUs; not measured here.

    python benchmarks/sequence_overhead.py                                 # on a GPU
    python benchmarks/sequence_overhead.py --preset tiny --latent 3,4,8,8 --device cpu
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

from gpd_model import WanDiT, get_preset
from gpd_model.sequence_parallel import enable_sequence_parallel


def _timed(fn: Callable[[], None], device: torch.device, repeats: int) -> float:
    """Median seconds of ``fn`` after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        began = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - began)
    return sorted(times)[len(times) // 2]


def measure(preset: str, layers: int, latent: tuple[int, ...], device: torch.device,
            dtype: torch.dtype, repeats: int) -> dict[str, object]:
    cfg = get_preset(preset, num_layers=layers)
    torch.manual_seed(0)
    plain = WanDiT(cfg).to(device=device, dtype=dtype)
    split = copy.deepcopy(plain)
    enable_sequence_parallel(split, dist.group.WORLD)
    x = torch.randn(1, *latent, device=device)
    timestep = torch.tensor([500.0], device=device)
    context = torch.randn(1, 512 if preset != "tiny" else 8, cfg.text_dim, device=device)
    result: dict[str, object] = {"preset": preset, "layers": layers, "latent": list(latent),
                                 "device": str(device), "dtype": str(dtype).split(".")[-1]}
    with torch.no_grad():
        outputs = [model(x, timestep, context).float() for model in (plain, split)]
    result["max_relative_difference"] = float(
        (outputs[1] - outputs[0]).abs().max() / outputs[0].abs().max())
    for label, model in (("plain", plain), ("split", split)):
        def forward(model=model) -> None:
            with torch.no_grad():
                model(x, timestep, context)

        def forward_backward(model=model) -> None:
            model(x, timestep, context).float().square().mean().backward()

        result[f"{label}_forward_s"] = _timed(forward, device, repeats)
        result[f"{label}_forward_backward_s"] = _timed(forward_backward, device, repeats)
    for kind in ("forward", "forward_backward"):
        result[f"{kind}_overhead"] = result[f"split_{kind}_s"] / result[f"plain_{kind}_s"] - 1
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="wan2.1-t2v-1.3b")
    parser.add_argument("--layers", type=int, default=4, help="transformer blocks timed")
    parser.add_argument("--latent", default="16,21,60,104", help="C,T,H,W (480p by default)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", help="write the result as JSON here")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    latent = tuple(int(v) for v in args.latent.split(","))
    with tempfile.TemporaryDirectory() as folder:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                store=dist.FileStore(str(Path(folder) / "store"), 1),
                                rank=0, world_size=1)
        try:
            result = measure(args.preset, args.layers, latent, device, dtype, args.repeats)
        finally:
            dist.destroy_process_group()
    print(json.dumps(result))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"SUMMARY sequence-parallel world of one: forward {result['plain_forward_s']:.4f} s "
          f"-> {result['split_forward_s']:.4f} s ({100 * result['forward_overhead']:+.1f}%), "
          f"fwd+bwd {100 * result['forward_backward_overhead']:+.1f}%, max rel diff "
          f"{result['max_relative_difference']:.1e}")


if __name__ == "__main__":
    main()
