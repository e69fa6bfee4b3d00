"""Fused teacher double-step: Triton kernels, launch wrappers, `gpd::` ops, public functions.

Two elementwise ops (design section 4, online target):
  cfg_euler_step:     g1 = CFG(u_cond, u_uncond, w); x_b = x_a + (s_b - s_a) g1
  double_step_target: g2 = CFG(u_cond, u_uncond, w);
                      u* = ((s_b - s_a) g1 + (s_c - s_b) g2) / (s_c - s_a)
Per-sample scalars ([B] tensors) broadcast over each sample; math in float32 (x_next:
see Rounding below). The
programs of one grid row share a sample, so each loads its scalars once. These ops
produce teacher targets and have no autograd formula.

Rounding. x_next is x + (s' - s) g computed exactly (float64: the product of two floats is
exact) and rounded once to x's dtype: to fp32 with round-to-odd, which a later
round-to-nearest to a format of at most 22 significant bits (bf16, fp16) turns into the
correctly rounded result. Rounding twice instead (to fp32, in one fma or in a multiply and
an add, then to bf16) is often wrong for bf16 inputs: their exact sum lands just past a
bf16 midpoint, the fp32 rounding moves it onto the midpoint and the bf16 rounding then
goes to even, the wrong way. On 2M bf16 elements (CPU, float64 check), against x + step *
g of its own g rounded once, the multiply-and-add form was one ulp off 1005 times and the
fma form 818 times, and they disagreed 229 times: the one-ulp mismatches a GPU showed on 3
of 7 shapes. The guided velocity g is
an fp32 output itself: fma(w, u_cond - u_uncond, u_uncond), one rounding. The kernel
rounds to bf16 on the bits, so the Triton interpreter (whose fp32 -> bf16 cast truncates)
gives the GPU's bits and CI checks them against the reference, which does the same.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._checks import check_batched
from ._registry import register_kernels
from .reference import (
    cfg_euler_step_reference,
    check_distinct_sigmas,
    check_guided_inputs,
    double_step_target_reference,
)

_BLOCK = 2048
# How the kernel rounds x_next to x's dtype (see the module docstring).
_OUT_ROUNDING = {torch.float16: 1, torch.bfloat16: 2}
_NUM_WARPS = 8


@triton.jit
def _sample_block(per_sample, BLOCK: tl.constexpr):
    """This program's sample (grid axis 1) and its block of that sample's elements."""
    sample = tl.program_id(1)
    within = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    return sample, sample.to(tl.int64) * per_sample + within, within < per_sample


@triton.jit
def _guided_velocity(cond_ptr, uncond_ptr, guidance_ptr, sample, offsets, mask,
                     HAS_UNCOND: tl.constexpr):
    cond = tl.load(cond_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    if HAS_UNCOND:
        uncond = tl.load(uncond_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        scale = tl.load(guidance_ptr + sample).to(tl.float32)
        cond = tl.fma(scale, cond - uncond, uncond)
    return cond


@triton.jit
def _round_to_odd_fp32(value):
    """float64 -> fp32, rounding an inexact result to the neighbour with an odd last bit
    (round-to-odd): a later round-to-nearest to a narrower format then rounds only once."""
    nearest = value.to(tl.float32)
    bits = nearest.to(tl.int32, bitcast=True)
    back = nearest.to(tl.float64)
    fix = (back != value) & ((bits & 1) == 0)
    # +1 on the bits moves away from zero (a signed zero included), -1 towards it.
    return tl.where(fix, bits + tl.where(tl.abs(value) > tl.abs(back), 1, -1),
                    bits).to(tl.float32, bitcast=True)


@triton.jit
def _round_to_bf16(value):
    """fp32 -> bf16 round-to-nearest-even on the bits (the GPU's cvt.rn; the interpreter's
    cast would truncate). NaN stays a quiet NaN; overflow rounds to inf, as cvt.rn."""
    bits = value.to(tl.int32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    rounded = tl.where(value != value, (bits >> 16) | 0x40, rounded)
    return rounded.to(tl.int16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _cfg_euler_kernel(x_ptr, cond_ptr, uncond_ptr, guidance_ptr, sigma_from_ptr, sigma_to_ptr,
                      x_next_ptr, g_ptr, per_sample,
                      BLOCK: tl.constexpr, HAS_UNCOND: tl.constexpr, OUT_ROUNDING: tl.constexpr):
    sample, offsets, mask = _sample_block(per_sample, BLOCK)
    g = _guided_velocity(cond_ptr, uncond_ptr, guidance_ptr, sample, offsets, mask, HAS_UNCOND)
    step = (tl.load(sigma_to_ptr + sample).to(tl.float32)
            - tl.load(sigma_from_ptr + sample).to(tl.float32))
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float64)
    x_next = x + step.to(tl.float64) * g.to(tl.float64)  # exact product, one rounding
    if OUT_ROUNDING == 2:  # bf16
        tl.store(x_next_ptr + offsets, _round_to_bf16(_round_to_odd_fp32(x_next)), mask=mask)
    elif OUT_ROUNDING == 1:  # fp16
        tl.store(x_next_ptr + offsets, _round_to_odd_fp32(x_next).to(tl.float16), mask=mask)
    else:  # fp32 rounds once here, float64 not at all
        tl.store(x_next_ptr + offsets, x_next.to(x_next_ptr.dtype.element_ty), mask=mask)
    tl.store(g_ptr + offsets, g, mask=mask)


@triton.jit
def _double_step_target_kernel(g1_ptr, cond_ptr, uncond_ptr, guidance_ptr,
                               s_a_ptr, s_b_ptr, s_c_ptr, target_ptr, per_sample,
                               BLOCK: tl.constexpr, HAS_UNCOND: tl.constexpr,
                               OUT_ROUNDING: tl.constexpr):
    sample, offsets, mask = _sample_block(per_sample, BLOCK)
    g2 = _guided_velocity(cond_ptr, uncond_ptr, guidance_ptr, sample, offsets, mask, HAS_UNCOND)
    s_a = tl.load(s_a_ptr + sample).to(tl.float32)
    s_b = tl.load(s_b_ptr + sample).to(tl.float32)
    s_c = tl.load(s_c_ptr + sample).to(tl.float32)
    g1 = tl.load(g1_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    tl.store(target_ptr + offsets, ((s_b - s_a) * g1 + (s_c - s_b) * g2) / (s_c - s_a),
             mask=mask)


def _contiguous(*tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    return [None if t is None else t.contiguous() for t in tensors]


def _launch_guided(kernel, lead: torch.Tensor, u_cond: torch.Tensor,
                   u_uncond: torch.Tensor | None, guidance: torch.Tensor | None,
                   *scalars_and_outputs: torch.Tensor, out_rounding: int = 0) -> None:
    """Run an elementwise guided kernel over lead's samples (one grid row per sample)."""
    if lead.numel() == 0:
        return
    batch = lead.shape[0]
    per_sample = lead.numel() // batch
    has_uncond = u_uncond is not None
    # Without CFG, u_cond and lead stand in for the absent inputs; the kernel never reads them.
    kernel[(triton.cdiv(per_sample, _BLOCK), batch)](
        lead, u_cond, u_uncond if has_uncond else u_cond, guidance if has_uncond else lead,
        *scalars_and_outputs, per_sample,
        BLOCK=_BLOCK, HAS_UNCOND=has_uncond, OUT_ROUNDING=out_rounding, num_warps=_NUM_WARPS,
    )


def cfg_euler_step_triton(x: torch.Tensor, u_cond: torch.Tensor, u_uncond: torch.Tensor | None,
                          guidance: torch.Tensor | None, sigma_from: torch.Tensor,
                          sigma_to: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the guided Euler step kernel; non-contiguous inputs are copied first."""
    check_guided_inputs("x", x, u_cond, u_uncond, guidance,
                        sigma_from=sigma_from, sigma_to=sigma_to)
    x, u_cond, u_uncond, guidance, sigma_from, sigma_to = _contiguous(
        x, u_cond, u_uncond, guidance, sigma_from, sigma_to)
    x_next = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    g = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    _launch_guided(_cfg_euler_kernel, x, u_cond, u_uncond, guidance, sigma_from, sigma_to,
                   x_next, g, out_rounding=_OUT_ROUNDING.get(x.dtype, 0))
    return x_next, g


def double_step_target_triton(g1: torch.Tensor, u_cond: torch.Tensor,
                              u_uncond: torch.Tensor | None, guidance: torch.Tensor | None,
                              s_a: torch.Tensor, s_b: torch.Tensor,
                              s_c: torch.Tensor) -> torch.Tensor:
    """Launch the two-step target kernel; non-contiguous inputs are copied first."""
    check_guided_inputs("g1", g1, u_cond, u_uncond, guidance, s_a=s_a, s_b=s_b, s_c=s_c)
    g1, u_cond, u_uncond, guidance, s_a, s_b, s_c = _contiguous(
        g1, u_cond, u_uncond, guidance, s_a, s_b, s_c)
    target = torch.empty(g1.shape, dtype=torch.float32, device=g1.device)
    _launch_guided(_double_step_target_kernel, g1, u_cond, u_uncond, guidance, s_a, s_b, s_c,
                   target)
    return target


def _cfg_euler_step_cpu(x, u_cond, u_uncond, guidance, sigma_from, sigma_to):
    x_next, g = cfg_euler_step_reference(x, u_cond, u_uncond, guidance, sigma_from, sigma_to)
    return x_next.contiguous(), g.contiguous()


def _double_step_target_cpu(g1, u_cond, u_uncond, guidance, s_a, s_b, s_c):
    return double_step_target_reference(g1, u_cond, u_uncond, guidance, s_a, s_b, s_c).contiguous()


register_kernels("cfg_euler_step", _cfg_euler_step_cpu, cfg_euler_step_triton)
register_kernels("double_step_target", _double_step_target_cpu, double_step_target_triton)


@torch.library.register_fake("gpd::cfg_euler_step")
def _cfg_euler_step_fake(x, u_cond, u_uncond, guidance, sigma_from, sigma_to):
    check_guided_inputs("x", x, u_cond, u_uncond, guidance,
                        sigma_from=sigma_from, sigma_to=sigma_to)
    return x.new_empty(x.shape), x.new_empty(x.shape, dtype=torch.float32)


@torch.library.register_fake("gpd::double_step_target")
def _double_step_target_fake(g1, u_cond, u_uncond, guidance, s_a, s_b, s_c):
    check_guided_inputs("g1", g1, u_cond, u_uncond, guidance, s_a=s_a, s_b=s_b, s_c=s_c)
    return g1.new_empty(g1.shape, dtype=torch.float32)


Scalar = float | torch.Tensor


def _per_sample_tensor(name: str, value: Scalar | None, lead: torch.Tensor) -> torch.Tensor | None:
    """A python float, 0-D or [B] tensor becomes a float32 [B] tensor on lead's device."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        if value.dim() == 0:
            value = value.expand(lead.shape[0])
        return value.to(device=lead.device, dtype=torch.float32)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return torch.full((lead.shape[0],), float(value), dtype=torch.float32, device=lead.device)
    raise TypeError(f"{name}: expected a float or a [B] tensor, got {type(value).__name__}")


def cfg_euler_step(x: torch.Tensor, u_cond: torch.Tensor, u_uncond: torch.Tensor | None,
                   guidance: Scalar | None, sigma_from: Scalar,
                   sigma_to: Scalar) -> tuple[torch.Tensor, torch.Tensor]:
    """Guided velocity g (float32) and Euler step x + (sigma_to - sigma_from) g (x's dtype).

    Pass u_uncond=None and guidance=None for a single (unguided) teacher output.
    Scalars may be python floats or [B] tensors (moved to x's device, cast to float32).
    """
    check_batched("x", x)
    return torch.ops.gpd.cfg_euler_step(
        x, u_cond, u_uncond, _per_sample_tensor("guidance", guidance, x),
        _per_sample_tensor("sigma_from", sigma_from, x),
        _per_sample_tensor("sigma_to", sigma_to, x))


def double_step_target(g1: torch.Tensor, u_cond: torch.Tensor, u_uncond: torch.Tensor | None,
                       guidance: Scalar | None, s_a: Scalar, s_b: Scalar,
                       s_c: Scalar) -> torch.Tensor:
    """Velocity u* whose single step from s_a to s_c equals the teacher's two steps (float32)."""
    check_batched("g1", g1)
    s_a, s_c = _per_sample_tensor("s_a", s_a, g1), _per_sample_tensor("s_c", s_c, g1)
    check_distinct_sigmas(s_a, s_c)  # the kernels would divide by zero
    return torch.ops.gpd.double_step_target(
        g1, u_cond, u_uncond, _per_sample_tensor("guidance", guidance, g1),
        s_a, _per_sample_tensor("s_b", s_b, g1), s_c)
