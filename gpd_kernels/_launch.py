"""Launch conventions of the DiT ops (adaLN modulate, gated residual, RMSNorm+RoPE).

One place for what the three ops share: when their Triton kernels run, how rows are
split over programs, how many warps a row tile gets. Input dtype checks are
`_checks.check_float_tensor`, the same rule as the `gpd::` library ops: float32,
bfloat16, float16 and float64 are accepted everywhere. The kernels compute in fp32, so
float64 inputs (exact checks) always take the PyTorch reference in float64 instead of
silently losing precision; each op's reference sits beside its kernels.

Why the DiT ops are autograd Functions and not `torch.library` ops, unlike freq_loss
and the double-step: those two are linked by other trainers, from Python and from C++
(the native library registers CPU kernels for the same schemas), and must run under
`torch.compile(fullgraph=True)` in someone else's graph, which is what a schema, fake
kernels and opcheck buy. The DiT ops have one caller, this project's model, no native
kernel and no C++ user; a custom op would add a dispatcher hop and a schema to keep in
sync for nothing they need. Whether each is worth its kernel at all against inductor is
a measured per-op choice (`gpd_kernels.dit`).
"""

from __future__ import annotations

import os

import torch

__all__ = ["interpreting", "multiprocessors", "num_warps", "rows_per_program", "use_triton"]


def interpreting() -> bool:
    """Whether Triton runs kernels through its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def use_triton(x: torch.Tensor) -> bool:
    """Whether the Triton kernels can serve x: CUDA, or any device under the interpreter.

    float64 never: the kernels compute in fp32, and float64 callers want the exact reference.
    """
    return x.dtype != torch.float64 and (x.is_cuda or interpreting())


def multiprocessors(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; 1 for the CPU (the interpreter)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def rows_per_program(seq_len: int, groups: int, device: torch.device) -> tuple[int, int]:
    """Split seq_len rows into chunks so groups * chunks programs fill the device.

    Returns (rows per program, chunks). Backward kernels keep a reduction in registers
    per program, so fewer, longer programs mean fewer partial sums to add afterwards.
    """
    target = 4 * multiprocessors(device)
    chunks = max(1, min(seq_len, -(-target // max(groups, 1))))
    rows = -(-seq_len // chunks)
    return rows, -(-seq_len // rows)


def num_warps(block: int, cap: int) -> int:
    """One warp per 256 elements of a program's tile, at least 1 and at most `cap`.

    Each op passes its own cap (16 for adaLN's 1-D rows, 8 for RMSNorm+RoPE's
    [heads, pairs] tile), as they were first written; neither was tuned on a GPU yet.
    """
    return max(1, min(cap, block // 256))
