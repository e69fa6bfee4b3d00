"""Fused frequency loss and teacher double-step: Triton vs eager reference vs compiled reference.

Groups are per op, shape and dtype (Wan 480p latents [B, 16, 21, 60, 104] at B = 1, 2, 4
and the tiny preset's [16, 3, 8, 16, 16]). GPU cases replay a CUDA graph of
kernel_cases.CALLS_PER_GRAPH calls per round; the table's times are per round, and
extra_info carries per-call microseconds, achieved GB/s (bytes the op must move, see
kernel_cases) and the fraction of the card's HBM peak. On a CPU-only machine the GPU
cases skip with the reason, and a few quick CPU reference cases still run.

Run: `python -m pytest benchmarks/bench_kernels.py -rs` (on a GPU, device_check.sh).
"""

from __future__ import annotations

import pytest
import torch
from kernel_cases import (
    CALLS_PER_GRAPH,
    IMPLS,
    OPS,
    SHAPES,
    capture_calls,
    hbm_peak,
    implementation,
    input_sets,
)

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
NO_GPU = "GPU benchmark: needs CUDA (Triton kernels and GPU timings only on a lent GPU)"
# CPU: the references only (the Triton interpreter is a correctness tool, not a speed one);
# the compiled reference only at the small shape, to keep compile time down.
CPU_CASES = [("eager", "tiny-b16"), ("compile", "tiny-b16"), ("eager", "wan480p-b1")]


def _record(benchmark, op, shape, dtype, calls_per_round: int) -> None:
    if benchmark.stats is None:  # --benchmark-disable: ran once, nothing timed
        return
    seconds_per_call = benchmark.stats.stats.median / calls_per_round
    moved = op.bytes_moved(shape, dtype)
    benchmark.extra_info["us_per_call"] = round(seconds_per_call * 1e6, 2)
    benchmark.extra_info["GB/s"] = round(moved / seconds_per_call / 1e9, 1)
    if torch.cuda.is_available():
        peak = hbm_peak(torch.cuda.get_device_name())
        if peak is not None:
            benchmark.extra_info[f"% of {peak[0]} HBM peak"] = round(
                100 * moved / seconds_per_call / peak[1], 1)


GPU_IMPLS = [(op_name, impl) for op_name, op in OPS.items() for impl in IMPLS + tuple(op.variants)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_GPU)
@pytest.mark.parametrize("dtype_name", DTYPES)
@pytest.mark.parametrize("shape_name", SHAPES)
@pytest.mark.parametrize("op_name,impl", GPU_IMPLS)
def test_gpu(benchmark, op_name, impl, shape_name, dtype_name):
    op, shape, dtype = OPS[op_name], SHAPES[shape_name], DTYPES[dtype_name]
    benchmark.group = f"{op_name} {shape_name} {dtype_name} (cuda, {CALLS_PER_GRAPH} calls)"
    replay = capture_calls(implementation(op, impl), input_sets(op, shape, dtype, "cuda"))

    def one_round():
        replay()
        torch.cuda.synchronize()

    benchmark.pedantic(one_round, rounds=20, iterations=1, warmup_rounds=2)
    _record(benchmark, op, shape, dtype, CALLS_PER_GRAPH)


@pytest.fixture
def one_cpu_thread():
    """One thread: on a shared 2-core machine, OpenMP barriers under contention stall."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("impl,shape_name", CPU_CASES)
@pytest.mark.parametrize("op_name", OPS)
def test_cpu_reference(benchmark, one_cpu_thread, op_name, impl, shape_name):
    op, shape = OPS[op_name], SHAPES[shape_name]
    benchmark.group = f"{op_name} {shape_name} fp32 (cpu reference, 1 thread)"
    fn = implementation(op, impl)
    (args,) = input_sets(op, shape, torch.float32, "cpu")
    fn(*args)  # compile outside the timing
    benchmark.pedantic(fn, args=args, rounds=10, iterations=1, warmup_rounds=2)
    _record(benchmark, op, shape, torch.float32, 1)
