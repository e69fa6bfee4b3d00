"""On a CUDA GPU: Triton kernels vs reference (correctness), then timings; a table last.

Called by device_check.sh. Correctness runs the registered gpd:: ops on CUDA (so the
dispatch is checked too) against the float64 reference on fresh random inputs, with
the caching allocator poisoned with NaN first so an unwritten output element shows;
the frequency loss's other launch plans (kernel_cases' variants) are checked on the 480p
latent too, since the timings report them beside the default plan.
Timings (skipped by --quick): the library ops as CUDA-graph replays over L2-overflowing
input rotations (see kernel_cases), and each fused DiT op forward+backward at the 1.3B
shape against its eager and torch.compile'd reference, side by side; a failing
implementation is reported in its cell, not dropped. The cases and round counts are kept
small so that the whole device check fits its time budget (not timed here: chosen, not
measured). The last line, `SUMMARY ...`, is what device_check.sh's final table shows.
Exit status 1 if any correctness check failed.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import triton
from kernel_cases import (
    DIT_IMPLS,
    IMPLS,
    OPS,
    SHAPES,
    capture_calls,
    dit_case,
    dit_implementation,
    fwd_bwd,
    hbm_peak,
    implementation,
    input_sets,
    median_seconds,
    median_seconds_per_call,
)

from gpd_kernels import band_amplitude_loss, freq_loss
from gpd_kernels.dit import BACKENDS, ENV_VAR, environment_value
from gpd_kernels.reference import (
    band_amplitude_loss_grad_reference,
    cfg_euler_step_reference,
    double_step_target_reference,
    freq_loss_grad_reference,
)

# Awkward sizes on top of the benchmark shapes: odd/prime, size-1 axes, a 720p-like
# latent (90x160: the freq loss's row blocks and A_W slices) and a long clip (T 130:
# A_T in slices).
CHECK_SHAPES = {
    "wan480p-b1": SHAPES["wan480p-b1"], "tiny-b16": SHAPES["tiny-b16"],
    "odd": (2, 3, 5, 7, 9), "t1": (1, 2, 1, 17, 33), "w1": (1, 1, 3, 16, 1),
    "all1": (1, 2, 1, 1, 1), "720p-like": (1, 2, 9, 90, 160), "t130": (1, 2, 130, 6, 10),
}
FREQ_RTOL = 2e-3  # tf32 dots on the alpha-weighted terms
BAND_RTOL = 1e-4  # tf32x3 dots (about fp32): a bound to check, not a measured one
STEP_TOL = {"rtol": 1e-5, "atol": 1e-5}
# x_next is rounded once to bf16 by kernel and reference alike (double_step.py,
# "Rounding"): they must agree to the bit.
BF16_STEP_TOL = {"rtol": 0.0, "atol": 0.0}
TIMING_CASES = [
    ("freq_loss", "wan480p-b1", torch.bfloat16), ("freq_loss", "wan480p-b4", torch.bfloat16),
    ("freq_loss", "wan480p-b1", torch.float32), ("freq_loss", "wan480p-b4", torch.float32),
    ("band_amplitude_loss", "wan480p-b1", torch.bfloat16),
    ("band_amplitude_loss", "wan480p-b4", torch.bfloat16),
    ("band_amplitude_loss", "wan480p-b1", torch.float32),
    ("cfg_euler_step", "wan480p-b1", torch.bfloat16),
    ("double_step_target", "wan480p-b1", torch.bfloat16),
]
DIT_OPS = ("layernorm_modulate", "gated_residual", "rms_norm_rope")
DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float32: "fp32"}


def poison_allocator(nbytes: int, device: str) -> None:
    """Leave NaN-filled blocks in the caching allocator for the next outputs to reuse."""
    if device == "cuda":
        blocks = [torch.full((nbytes // 4 + 1024,), float("nan"), device=device)
                  for _ in range(4)]
        del blocks


def _relative(got: torch.Tensor, expected: torch.Tensor) -> float:
    got, expected = got.double(), expected.double()
    if not torch.isfinite(got).all():
        return math.inf
    return ((got - expected).norm() / expected.norm().clamp_min(1e-300)).item()


def check_freq_loss(shape, dtype, device, generator) -> list[str]:
    pred, target = (torch.randn(shape, generator=generator, device=device).to(dtype)
                    for _ in range(2))
    params = (1.3, 0.7, 1.5)
    poison_allocator(pred.numel() * 4, device)
    loss, grad = torch.ops.gpd.freq_loss_fwd(pred, target, *params, True)
    loss_only, _ = torch.ops.gpd.freq_loss_fwd(pred, target, *params, False)
    loss_ref, grad_ref = freq_loss_grad_reference(pred.double(), target.double(), *params)
    leaf = pred.detach().requires_grad_()
    freq_loss(leaf, target, *params).backward()
    errors = {"loss": _relative(loss, loss_ref), "loss(no grad)": _relative(loss_only, loss_ref),
              "grad": _relative(grad, grad_ref), "autograd": _relative(leaf.grad, grad_ref)}
    # autograd casts the gradient to the input dtype: bf16 rounding on top of tf32
    limits = {"autograd": 1e-2 if dtype == torch.bfloat16 else FREQ_RTOL}
    return [f"{name} rel err {err:.2e}" for name, err in errors.items()
            if not err <= limits.get(name, FREQ_RTOL)]


def check_band_amplitude_loss(shape, dtype, device, generator) -> list[str]:
    """The op (need_grad on and off) and the public function's autograd for both inputs
    against float64 torch.fft. A launch that raises (a kernel that does not compile on this
    GPU, say) is reported as a failure of this case, not of the whole check."""
    # target 1.3 x as large: band amplitudes apart, as in training's early steps (random pairs
    # of one scale have nearly equal ones, whose difference would measure only rounding)
    pred = torch.randn(shape, generator=generator, device=device).to(dtype)
    target = (1.3 * torch.randn(shape, generator=generator, device=device)).to(dtype)
    poison_allocator(pred.numel() * 4, device)
    try:
        loss, grad = torch.ops.gpd.band_amplitude_loss_fwd(pred, target, True)
        loss_only, _ = torch.ops.gpd.band_amplitude_loss_fwd(pred, target, False)
        leaf, target_leaf = pred.detach().requires_grad_(), target.detach().requires_grad_()
        band_amplitude_loss(leaf, target_leaf).backward()
    except Exception as exc:  # one broken shape must not hide the other checks
        return [f"raised {type(exc).__name__}: {exc}"[:200]]
    loss_ref, grad_ref = band_amplitude_loss_grad_reference(pred.double(), target.double())
    _, target_grad_ref = band_amplitude_loss_grad_reference(target.double(), pred.double())
    errors = {"loss": _relative(loss, loss_ref), "loss(no grad)": _relative(loss_only, loss_ref),
              "grad": _relative(grad, grad_ref), "autograd": _relative(leaf.grad, grad_ref),
              "autograd(target)": _relative(target_leaf.grad, target_grad_ref)}
    # autograd casts the gradients to the input dtype: bf16 rounding on top of tf32
    bf16 = dtype == torch.bfloat16
    limits = {name: 1e-2 for name in ("autograd", "autograd(target)") if bf16}
    return [f"{name} rel err {err:.2e}" for name, err in errors.items()
            if not err <= limits.get(name, BAND_RTOL)]


def check_freq_loss_variants(dtype, generator) -> list[dict]:
    """The freq loss's timed launch plans (OPS variants) on the 480p latent, on CUDA."""
    pred, target, *params = OPS["freq_loss"].make_inputs(SHAPES["wan480p-b1"], dtype, "cuda",
                                                         generator)
    loss_ref, grad_ref = freq_loss_grad_reference(pred.double(), target.double(), *params)
    rows = []
    for name, variant in OPS["freq_loss"].variants.items():
        poison_allocator(pred.numel() * 4, "cuda")
        loss, grad = variant(pred, target, *params)
        errors = {"loss": _relative(loss, loss_ref), "grad": _relative(grad, grad_ref)}
        failures = [f"{key} rel err {err:.2e}" for key, err in errors.items()
                    if not err <= FREQ_RTOL]
        rows.append({"op": f"freq_loss:{name}", "shape": "wan480p-b1",
                     "dtype": DTYPE_NAMES[dtype], "ok": not failures, "failures": failures})
    return rows


def check_double_step(shape, dtype, device, generator) -> list[str]:
    failures = []
    for guided in (True, False):
        x, u_cond, u_uncond, guidance, s_a, s_b = OPS["cfg_euler_step"].make_inputs(
            shape, dtype, device, generator)
        if not guided:
            u_uncond = guidance = None
        poison_allocator(x.numel() * 4, device)
        x_b, g1 = torch.ops.gpd.cfg_euler_step(x, u_cond, u_uncond, guidance, s_a, s_b)
        ref_x_b, ref_g1 = cfg_euler_step_reference(x, u_cond, u_uncond, guidance, s_a, s_b)
        s_c = s_b - 0.1
        u_star = torch.ops.gpd.double_step_target(g1, u_cond, u_uncond, guidance, s_a, s_b, s_c)
        ref_u_star = double_step_target_reference(ref_g1, u_cond, u_uncond, guidance,
                                                  s_a, s_b, s_c)
        x_tol = BF16_STEP_TOL if dtype == torch.bfloat16 else STEP_TOL
        for name, got, expected, tol in (("x_next", x_b, ref_x_b, x_tol),
                                         ("g", g1, ref_g1, STEP_TOL),
                                         ("u_star", u_star, ref_u_star, STEP_TOL)):
            if not torch.allclose(got.float(), expected.float(), **tol) or not got.isfinite().all():
                worst = (got.float() - expected.float()).abs().max().item()
                failures.append(f"{name} (guided={guided}) max abs err {worst:.2e}")
    return failures


def run_checks(device: str) -> list[dict]:
    generator = torch.Generator(device=device).manual_seed(int(time.time()))  # fresh inputs
    rows = []
    for shape_name, shape in CHECK_SHAPES.items():
        for dtype in (torch.float32, torch.bfloat16):
            for op_name, check in (("freq_loss", check_freq_loss),
                                   ("band_amp_loss", check_band_amplitude_loss),
                                   ("double_step", check_double_step)):
                failures = check(shape, dtype, device, generator)
                rows.append({"op": op_name, "shape": shape_name, "dtype": DTYPE_NAMES[dtype],
                             "ok": not failures, "failures": failures})
                print(f"check {op_name:12s} {shape_name:11s} {DTYPE_NAMES[dtype]}: "
                      f"{'ok' if not failures else 'FAIL ' + '; '.join(failures)}", flush=True)
    if device == "cuda":  # the dry run's ops dispatch to the CPU reference: no Triton there
        for dtype in (torch.float32, torch.bfloat16):
            for row in check_freq_loss_variants(dtype, generator):
                rows.append(row)
                print(f"check {row['op']} {row['shape']} {row['dtype']}: "
                      f"{'ok' if row['ok'] else 'FAIL ' + '; '.join(row['failures'])}",
                      flush=True)
    return rows


def run_timings(peak) -> list[dict]:
    rows = []
    for op_name, shape_name, dtype in TIMING_CASES:
        op, shape = OPS[op_name], SHAPES[shape_name]
        sets = input_sets(op, shape, dtype, "cuda")
        row = {"op": op_name, "shape": shape_name, "dtype": DTYPE_NAMES[dtype],
               "bytes": op.bytes_moved(shape, dtype)}
        for impl in IMPLS + tuple(op.variants):
            try:
                seconds = median_seconds_per_call(capture_calls(implementation(op, impl), sets))
                row[f"{impl}_us"] = seconds * 1e6
            except Exception as exc:  # one broken case must not hide the others' numbers
                row[f"{impl}_error"] = f"{type(exc).__name__}: {exc}"[:200]
                print(f"timing {op_name} {shape_name} {impl} failed: {row[f'{impl}_error']}")
        if "triton_us" in row:
            row["GB/s"] = row["bytes"] / row["triton_us"] / 1e3
            if peak is not None:
                row["pct_peak"] = 100 * row["bytes"] / (row["triton_us"] * 1e-6) / peak[1]
        rows.append(row)
        print(f"timed {op_name} {shape_name} {row['dtype']}", flush=True)
        del sets
        torch.cuda.empty_cache()
    return rows


def run_dit_timings() -> list[dict]:
    rows = []
    for name in DIT_OPS:
        leaves, constants, grad, moved = dit_case(name, "cuda")
        row = {"op": name, "bytes": moved}
        for impl in DIT_IMPLS:
            try:
                step = fwd_bwd(dit_implementation(name, impl), leaves, constants, grad)
                row[f"{impl}_us"] = median_seconds(step) * 1e6
            except Exception as exc:  # e.g. a compile failure: say so in the table
                row[f"{impl}_error"] = f"{type(exc).__name__}: {exc}"[:200]
                print(f"timing {name} {impl} failed: {row[f'{impl}_error']}")
        rows.append(row)
        print(f"timed {name} fwd+bwd", flush=True)
        del leaves, constants, grad
        torch.cuda.empty_cache()
    return rows


def _ratio(row, slower, faster):
    if f"{slower}_us" in row and f"{faster}_us" in row:
        return f"{row[f'{slower}_us'] / row[f'{faster}_us']:.2f}"
    return "err"


def print_dit_table(rows) -> None:
    if not rows:
        return
    print("\nfused DiT ops, fwd+bwd, 1.3B shape (1x32760x1536 bf16); x > 1: triton faster")
    header = ("op", "triton us", "eager us", "compile us", "triton GB/s", "x eager",
              "x compile")
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for r in rows:
        gbs = f"{r['bytes'] / r['triton_us'] / 1e3:.0f}" if "triton_us" in r else "err"
        print("| " + " | ".join([r["op"], *(_cell(r, f"{i}_us", ".1f") for i in DIT_IMPLS),
                                 gbs, _ratio(r, "eager", "triton"),
                                 _ratio(r, "compile", "triton")]) + " |")
    print(f"faster backend per op (gpd_kernels.dit): {ENV_VAR}={faster_backends(rows)}")


def faster_backends(rows) -> str:
    """name=backend for each DiT op, whichever of triton and compile timed faster."""
    chosen = {}
    for r in rows:
        times = {b: r[f"{b}_us"] for b in BACKENDS if f"{b}_us" in r}
        if times:
            chosen[r["op"]] = min(times, key=times.get)
    return environment_value(chosen)


def summary_line(checks, timings, dit_rows) -> str:
    """One line for device_check.sh's final table."""
    ok = sum(r["ok"] for r in checks)
    parts = [f"correctness {ok}/{len(checks)} ok"]
    for r in timings:
        if r["op"] == "freq_loss" and "pct_peak" in r:
            parts.append(f"freq_loss {r['shape']} {r['dtype']} {r['pct_peak']:.1f}% HBM")
        if r["op"] == "band_amplitude_loss":
            parts.append(f"band_amplitude_loss {r['shape']} {r['dtype']} x torch.fft "
                         f"{_ratio(r, 'eager', 'triton')}")
    parts += [f"{r['op']} x compile {_ratio(r, 'compile', 'triton')}" for r in dit_rows]
    return "SUMMARY " + "; ".join(parts)


def _cell(row, key, fmt):
    return format(row[key], fmt) if key in row else "err"


def print_table(checks, timings, device_name, peak) -> None:
    failed = [r for r in checks if not r["ok"]]
    print(f"\n## {device_name}; torch {torch.__version__}, triton {triton.__version__}; "
          f"HBM peak {'%.2f TB/s' % (peak[1] / 1e12) if peak else 'unknown'}")
    print(f"correctness: {len(checks) - len(failed)}/{len(checks)} ok"
          + "".join(f"\n  FAIL {r['op']} {r['shape']} {r['dtype']}: {r['failures']}"
                    for r in failed))
    header = ("op", "shape", "dtype", "triton us", "eager us", "compile us", "GB/s",
              "% HBM", "x eager", "x compile", "variants us")
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for r in timings:
        speedups = [f"{r[f'{ref}_us'] / r['triton_us']:.2f}"
                    if f"{ref}_us" in r and "triton_us" in r else "err"
                    for ref in ("eager", "compile")]
        variants = ", ".join(f"{name}={_cell(r, f'{name}_us', '.1f')}"
                             for name in OPS[r["op"]].variants) or "-"
        print("| " + " | ".join([r["op"], r["shape"], r["dtype"], _cell(r, "triton_us", ".1f"),
                                 _cell(r, "eager_us", ".1f"), _cell(r, "compile_us", ".1f"),
                                 _cell(r, "GB/s", ".0f"), _cell(r, "pct_peak", ".1f"),
                                 *speedups, variants]) + " |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=None, help="folder for the JSON results")
    parser.add_argument("--skip-timings", action="store_true")
    parser.add_argument("--quick", action="store_true",
                        help="correctness only (the same as --skip-timings)")
    parser.add_argument("--device", default="cuda",
                        help="cpu: dry run of this script's logic (ops dispatch to the CPU "
                             "reference there, so it checks nothing about Triton)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("device_check: no CUDA device visible; nothing to check", file=sys.stderr)
        return 2
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu (dry run)"
    peak = hbm_peak(device_name)
    checks = run_checks(args.device)
    timed = not (args.skip_timings or args.quick) and args.device == "cuda"
    timings = run_timings(peak) if timed else []
    dit_rows = run_dit_timings() if timed else []
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "device_check.json").write_text(json.dumps(
            {"device": device_name, "torch": torch.__version__, "triton": triton.__version__,
             "checks": checks, "timings": timings, "dit_timings": dit_rows}, indent=1))
    print_dit_table(dit_rows)
    print_table(checks, timings, device_name, peak)
    print(summary_line(checks, timings, dit_rows))
    return 0 if all(r["ok"] for r in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
