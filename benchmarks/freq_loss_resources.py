"""Compile the frequency-loss kernels for Hopper (sm_90) on any machine; report resources.

The CPU tests run the kernels in Triton's interpreter, which enforces none of a GPU's
limits. This compiles each kernel ahead of time for sm_90 with the installed Triton and
the ptxas/cuobjdump of its wheel (no GPU needed, nothing is run), in the launch
configuration `freq_loss_triton` picks for the shape, and reports shared memory (Triton's
metadata), registers and stack (cuobjdump) and SASS instruction counts: HGMMA (wgmma)
or HMMA (mma.sync) for the dots, 128-bit global loads, local-memory spills.
Exit status 1 if a kernel spills or needs more shared memory than Hopper's 227 KB.
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
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from gpd_kernels.freq_loss import _loss_kernel, _plane_kernel, _time_kernel, kernel_configs

HOPPER_SHARED_LIMIT = 232448  # bytes a block may use on sm_90 (227 KB)
WAN_480P, WAN_720P = (1, 16, 21, 60, 104), (1, 16, 21, 90, 160)
# name: (shape, input dtype, plane_rows). 480p as the op and its rows-split variant run,
# 720p (row blocks, A_W in slices), and a long clip (A_T in slices).
CASES = {
    "480p-bf16": (WAN_480P, torch.bfloat16, None),
    "480p-fp32": (WAN_480P, torch.float32, None),
    "480p-bf16-rows32": (WAN_480P, torch.bfloat16, 32),
    "720p-bf16": (WAN_720P, torch.bfloat16, None),
    "t130-fp32": ((1, 2, 130, 6, 10), torch.float32, None),
}
TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32",
         torch.float64: "fp64"}
SASS_KINDS = r"\b((?:HGMMA|HMMA|LDG|STG|LDL|STL)\S*)"


def _signature(fn, input_type: str) -> dict[str, str]:
    """Triton types of a kernel's runtime arguments (pointers to inputs typed as input_type)."""
    types = {}
    for name in fn.arg_names:
        if name in ("pred_ptr", "target_ptr"):
            types[name] = f"*{input_type}"
        elif name.endswith("_ptr"):
            types[name] = "*fp32"
        elif name in ("items", "count", "numel"):
            types[name] = "i32"
        else:
            types[name] = "fp32"
    return types


def compile_report(fn, input_type: str, config: dict) -> dict:
    """Compile fn for sm_90 with `config` (constexprs plus num_warps/num_stages)."""
    options = {k: config[k] for k in ("num_warps", "num_stages") if k in config}
    constexprs = {k: v for k, v in config.items() if k not in options}
    signature = _signature(fn, input_type)
    runtime = [name for name in fn.arg_names if name not in constexprs]
    signature = {name: signature[name] for name in runtime} | dict.fromkeys(constexprs,
                                                                            "constexpr")
    # Launches specialise 16-byte-aligned pointers (every torch allocation); do the same.
    attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]]
             for name, kind in signature.items() if kind.startswith("*")}
    kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs),
                            target=GPUTarget("cuda", 90, 32), options=options)
    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    with tempfile.TemporaryDirectory() as folder:
        cubin = Path(folder) / "kernel.cubin"
        cubin.write_bytes(kernel.asm["cubin"])
        usage = subprocess.run([str(tools / "cuobjdump"), "--dump-resource-usage", str(cubin)],
                               capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([str(tools / "cuobjdump"), "--dump-sass", str(cubin)],
                              capture_output=True, text=True, check=True).stdout
    registers, stack = (int(re.search(rf"{key}:(\d+)", usage).group(1))
                        for key in ("REG", "STACK"))
    kinds = collections.Counter(kind.split(".")[0] for kind in re.findall(SASS_KINDS, sass))
    return {"warps": options["num_warps"], "shared": kernel.metadata.shared,
            "registers": registers, "stack": stack, "wgmma": kinds["HGMMA"],
            "mma": kinds["HMMA"], "ldg128": len(re.findall(r"\bLDG\S*\.128\b", sass)),
            "spills": kinds["LDL"] + kinds["STL"]}


def case_reports(name: str) -> list[tuple[str, dict]]:
    shape, dtype, plane_rows = CASES[name]
    plane, time = kernel_configs(shape, plane_rows)
    input_type = TYPES[dtype]
    return [(kernel, compile_report(fn, input_type, config | {"NEED_GRAD": True}))
            for kernel, fn, config in (("plane", _plane_kernel, plane),
                                       ("time", _time_kernel, time))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--case", action="append", choices=sorted(CASES),
                        help="default: every case")
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("freq_loss_resources: unset TRITON_INTERPRET", file=sys.stderr)
        return 2
    rows = [(name, *report) for name in args.case or CASES for report in case_reports(name)]
    rows.append(("any", "loss", compile_report(_loss_kernel, "fp32",
                                               {"BLOCK": 1024, "num_warps": 4})))
    print(f"sm_90, triton {triton.__version__} (compiled, not run)")
    print("| case | kernel | warps | shared KB | registers | stack | wgmma | mma | "
          "ldg.128 | spills |\n|" + "---|" * 10)
    bad = []
    for case, kernel, r in rows:
        print(f"| {case} | {kernel} | {r['warps']} | {r['shared'] / 1024:.0f} | "
              f"{r['registers']} | {r['stack']} | {r['wgmma']} | {r['mma']} | {r['ldg128']} | "
              f"{r['spills']} |")
        if r["spills"] or r["stack"] or r["shared"] > HOPPER_SHARED_LIMIT:
            bad.append(f"{case} {kernel}")
    print("SUMMARY freq_loss kernels on sm_90: "
          + (f"over the limits: {', '.join(bad)}" if bad else "no spills, shared memory fits"))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
