"""Compile every Triton kernel of gpd_kernels for Hopper (sm_90) on any machine, exactly as
the ops launch them, and report each kernel's resources. No GPU is needed; nothing runs.

Why: CI runs the kernels in Triton's interpreter, which enforces none of a GPU's limits
and lowers nothing through the GPU compiler, so a kernel that spills, overflows shared
memory or does not compile for sm_90 at all (float64 math, bit casts) would pass CI and
fail on the next GPU run. Here each case runs real ops on CPU tensors while Triton
believes it targets an sm_90 device: every launch is compiled through Triton's own
launcher (its argument specialisation: dtypes, 16-byte alignment, divisibility of the
integers) and returned unlaunched, so the outputs are uninitialised and nothing is
checked numerically (the interpreter tests do that). The DiT ops are compiled from inside
the model: one block of the 1.3B and 14B presets and the whole tiny preset, forward and
backward, under bf16 autocast and in fp32, so their strides, dtypes and views are the
model's. The library ops (double-step, frequency loss) are compiled at Wan's 480p and 720p
latent shapes. Integers derived from the SM count (the DiT ops' rows per program) use
an H200's 132; the frequency loss launches all slabs at once, as on the CPU (on a GPU
it groups them to fit the L2: only its `items` argument differs, not the kernel).

Per compiled kernel: warps, shared memory (Triton's metadata), registers and stack
(cuobjdump from Triton's wheel), SASS counts: HGMMA (wgmma) and HMMA (mma.sync) for dots,
128-bit global loads, local-memory spills. Exit status 1 if any kernel spills, uses a
stack, or needs more shared memory than a Hopper block may have (227 KB).
Run without TRITON_INTERPRET (the interpreter's kernels cannot be compiled).
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime import driver
from triton.runtime.jit import JITFunction

import gpd_kernels._launch as launch
import gpd_kernels.dit as dit
from gpd_kernels import force_fused_dit_ops
from gpd_kernels.band_amplitude_loss import band_amplitude_loss_triton
from gpd_kernels.double_step import cfg_euler_step_triton, double_step_target_triton
from gpd_kernels.freq_loss import freq_loss_triton
from gpd_model import WanDiT, get_preset

HOPPER = GPUTarget("cuda", 90, 32)
HOPPER_SHARED_LIMIT = 232448  # bytes a block may use on sm_90 (227 KB)
H200_MULTIPROCESSORS = 132
WAN_480P, WAN_720P = (1, 16, 21, 60, 104), (1, 16, 21, 90, 160)
SASS_KINDS = r"\b((?:HGMMA|HMMA|LDG|STG|LDL|STL)\S*)"


class _Hopper:
    """What Triton's launcher asks of its driver, answered for an sm_90 device."""

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_current_target(self) -> GPUTarget:
        return HOPPER

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")


@dataclass
class Launch:
    kernel: str
    compiled: object  # triton.compiler.CompiledKernel


@contextmanager
def compiling_for_hopper() -> Iterator[list[Launch]]:
    """Within the block, kernel launches compile for sm_90 and return without running;
    the DiT ops take their Triton path for CPU tensors. Yields the launches, in order."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("kernel_resources: unset TRITON_INTERPRET (the interpreter's "
                           "kernels cannot be compiled)")
    launches: list[Launch] = []
    run = JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        compiled = run(self, *args, grid=grid, warmup=True, **kwargs)
        launches.append(Launch(self.fn.__name__.lstrip("_"), compiled))
        return compiled

    saved = launch.interpreting, dit.interpreting, launch.multiprocessors
    active = driver._active  # None on a machine without a GPU: reset_active() would raise
    driver.set_active(_Hopper())
    JITFunction.run = compile_only
    # The DiT ops' "can Triton serve this CPU tensor" rule says yes, as under the
    # interpreter, and their rows per program are an H200's.
    launch.interpreting = dit.interpreting = lambda: True
    launch.multiprocessors = lambda device: H200_MULTIPROCESSORS
    try:
        yield launches
    finally:
        JITFunction.run = run
        launch.interpreting, dit.interpreting, launch.multiprocessors = saved
        driver._active = active


def _model_step(preset: str, layers: int | None, dtype: torch.dtype) -> None:
    """One forward and backward of the model's fused path (autocast when dtype is bf16)."""
    cfg = get_preset(preset, **({} if layers is None else {"num_layers": layers}))
    torch.manual_seed(0)
    model = WanDiT(cfg)
    # 15 tokens: like 480p's 32760 tokens, not a multiple of 16 (Triton specialises on it).
    frames, height, width = (p * n for p, n in zip(cfg.patch_size, (1, 3, 5), strict=True))
    x = torch.randn(1, cfg.in_channels, frames, height, width)
    context = torch.randn(1, 7, cfg.text_dim)
    with force_fused_dit_ops(), torch.autocast("cpu", torch.bfloat16,
                                               enabled=dtype == torch.bfloat16):
        out = model(x, torch.tensor([500.0]), context)
    out.float().sum().backward()


def _double_step(dtype: torch.dtype, cfg: bool) -> None:
    x, u_cond, u_uncond, g1 = (torch.empty(WAN_480P, dtype=dtype) for _ in range(4))
    sigmas = [torch.full((1,), value) for value in (0.9, 0.8, 0.7)]
    guidance = torch.full((1,), 5.0) if cfg else None
    cfg_euler_step_triton(x, u_cond, u_uncond if cfg else None, guidance, *sigmas[:2])
    double_step_target_triton(g1.float(), u_cond, u_uncond if cfg else None, guidance, *sigmas)


def _freq_loss(shape: tuple[int, ...], dtype: torch.dtype, plane_rows: int | None = None
               ) -> None:
    pred, target = (torch.empty(shape, dtype=dtype) for _ in range(2))
    freq_loss_triton(pred, target, 1.0, 1.0, 1.0, True, plane_rows=plane_rows)


def _band_amplitude_loss(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    pred, target = (torch.empty(shape, dtype=dtype) for _ in range(2))
    band_amplitude_loss_triton(pred, target, need_grad=True)


# name: what to run. The model cases cover the three DiT ops; the others the library ops.
CASES: dict[str, Callable[[], None]] = {
    "dit-1.3B-bf16": lambda: _model_step("wan2.1-t2v-1.3b", 1, torch.bfloat16),
    "dit-1.3B-fp32": lambda: _model_step("wan2.1-t2v-1.3b", 1, torch.float32),
    "dit-14B-bf16": lambda: _model_step("wan2.1-t2v-14b", 1, torch.bfloat16),
    "dit-tiny-fp32": lambda: _model_step("tiny", None, torch.float32),
    "double-step-bf16": lambda: _double_step(torch.bfloat16, cfg=True),
    "double-step-fp16": lambda: _double_step(torch.float16, cfg=True),
    "double-step-fp32-nocfg": lambda: _double_step(torch.float32, cfg=False),
    "freq-loss-480p-bf16": lambda: _freq_loss(WAN_480P, torch.bfloat16),
    "freq-loss-480p-fp32": lambda: _freq_loss(WAN_480P, torch.float32),
    "freq-loss-480p-bf16-rows32": lambda: _freq_loss(WAN_480P, torch.bfloat16, 32),
    "freq-loss-720p-bf16": lambda: _freq_loss(WAN_720P, torch.bfloat16),
    "freq-loss-t130-fp32": lambda: _freq_loss((1, 2, 130, 6, 10), torch.float32),
    "band-loss-480p-bf16": lambda: _band_amplitude_loss(WAN_480P, torch.bfloat16),
    "band-loss-480p-fp32": lambda: _band_amplitude_loss(WAN_480P, torch.float32),
    "band-loss-720p-bf16": lambda: _band_amplitude_loss(WAN_720P, torch.bfloat16),
}


def resources(compiled) -> dict[str, int]:
    """Shared memory, registers, stack and SASS instruction counts of one compiled kernel."""
    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    with tempfile.TemporaryDirectory() as folder:
        cubin = Path(folder) / "kernel.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        usage, sass = (subprocess.run([str(tools / "cuobjdump"), flag, str(cubin)],
                                      capture_output=True, text=True, check=True).stdout
                       for flag in ("--dump-resource-usage", "--dump-sass"))
    registers, stack = (int(re.search(rf"{key}:(\d+)", usage).group(1))
                        for key in ("REG", "STACK"))
    kinds = collections.Counter(kind.split(".")[0] for kind in re.findall(SASS_KINDS, sass))
    return {"warps": compiled.metadata.num_warps, "shared": compiled.metadata.shared,
            "registers": registers, "stack": stack, "wgmma": kinds["HGMMA"],
            "mma": kinds["HMMA"], "ldg128": len(re.findall(r"\bLDG\S*\.128\b", sass)),
            "spills": kinds["LDL"] + kinds["STL"]}


def case_rows(name: str) -> list[tuple[str, dict[str, int]]]:
    """(kernel, resources) for each distinct kernel binary the case compiles."""
    with compiling_for_hopper() as launches:
        CASES[name]()
    if not launches:
        raise RuntimeError(f"{name}: no Triton kernel was launched (the ops took another path)")
    distinct = {id(entry.compiled): entry for entry in launches}.values()
    return [(entry.kernel, resources(entry.compiled)) for entry in distinct]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", action="append", choices=sorted(CASES),
                        help="default: every case")
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("kernel_resources: unset TRITON_INTERPRET (the interpreter's kernels cannot be "
              "compiled): run `env -u TRITON_INTERPRET python benchmarks/kernel_resources.py`",
              file=sys.stderr)
        return 2
    print(f"sm_90, triton {triton.__version__} (compiled, not run)")
    print("| case | kernel | warps | shared KB | registers | stack | wgmma | mma | "
          "ldg.128 | spills |\n|" + "---|" * 10)
    bad = []
    for case in args.case or CASES:
        for kernel, r in case_rows(case):
            print(f"| {case} | {kernel} | {r['warps']} | {r['shared'] / 1024:.0f} | "
                  f"{r['registers']} | {r['stack']} | {r['wgmma']} | {r['mma']} | "
                  f"{r['ldg128']} | {r['spills']} |", flush=True)
            if r["spills"] or r["stack"] or r["shared"] > HOPPER_SHARED_LIMIT:
                bad.append(f"{case} {kernel}")
    print("SUMMARY gpd_kernels on sm_90: "
          + (f"over the limits: {', '.join(bad)}" if bad else "every kernel compiles; no "
             "spills, no stack, shared memory fits"))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
