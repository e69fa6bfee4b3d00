"""A guidance-scale input for WanDiT, and folding it away for a plain Wan2.1 checkpoint.

After Meng et al., "On Distillation of Guided Diffusion Models" (CVPR 2023), restated for
flow matching: a student with a guidance input learns the teacher's guided velocity
``u_w = u_uncond + w (u_cond - u_uncond)`` in one forward pass, for any w in a range.

The embedding (sinusoidal(w) -> Linear -> SiLU -> Linear) is added to the *output* of
``time_embedding``. Its last layer starts at zero, so a model given a guidance input is,
until trained, exactly the model it was made from. At a fixed w the embedding is one
constant vector, and ``time_embedding``'s last layer is affine, so adding that vector to
its bias gives the same network with no guidance input: ``fold_guidance`` does this, and
the folded student is an ordinary Wan2.1 checkpoint that diffusers loads.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from .model import WanDiT, sinusoidal_embedding

# w enters the sinusoidal features scaled like the timestep input (1000 * sigma): the
# typical range of w, 1..10, then spans the same frequencies timesteps do.
GUIDANCE_INPUT_SCALE = 100.0


class GuidanceEmbedding(nn.Module):
    """``w`` [B] -> [B, dim], zero until trained."""

    def __init__(self, freq_dim: int, dim: int) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        nn.init.zeros_(self.mlp[2].weight)
        nn.init.zeros_(self.mlp[2].bias)

    def forward(self, guidance: torch.Tensor) -> torch.Tensor:
        if not isinstance(guidance, torch.Tensor) or guidance.ndim != 1:
            got = tuple(guidance.shape) if isinstance(guidance, torch.Tensor) else guidance
            raise ValueError(f"guidance must be a [B] tensor of CFG scales, got {got!r}")
        if not guidance.is_floating_point():
            raise TypeError(f"guidance must be floating point, got {guidance.dtype}")
        dtype = self.mlp[0].weight.dtype
        features = sinusoidal_embedding(GUIDANCE_INPUT_SCALE * guidance, self.freq_dim)
        return self.mlp(features.to(dtype))


def has_guidance_input(model: nn.Module) -> bool:
    return getattr(model, "guidance_embedding", None) is not None


def add_guidance_input(model: WanDiT) -> WanDiT:
    """Give ``model`` (in place) a zero-initialised guidance input; returns it."""
    if not isinstance(model, WanDiT):
        raise TypeError(f"add_guidance_input expects a WanDiT, got {type(model).__name__}")
    if has_guidance_input(model):
        raise ValueError("add_guidance_input: the model already has a guidance input")
    weight = model.time_embedding[2].weight
    model.guidance_embedding = GuidanceEmbedding(model.cfg.freq_dim, model.cfg.dim).to(
        device=weight.device, dtype=weight.dtype)
    return model


@torch.no_grad()
def fold_guidance(model: WanDiT, guidance: float) -> WanDiT:
    """A copy of ``model`` without a guidance input that computes ``model(..., guidance=w)``.

    The embedding at ``w`` is evaluated in float64 and added to ``time_embedding``'s last
    bias; the result differs from the unfolded model only by float rounding.
    """
    if not has_guidance_input(model):
        raise ValueError("fold_guidance: the model has no guidance input to fold")
    if isinstance(guidance, bool) or not isinstance(guidance, (int, float)):
        raise TypeError(f"fold_guidance: guidance must be a number, got {type(guidance).__name__}")
    if not torch.isfinite(torch.tensor(float(guidance))):
        raise ValueError(f"fold_guidance: guidance must be finite, got {guidance!r}")
    embedding = copy.deepcopy(model.guidance_embedding).double().cpu()
    offset = embedding(torch.tensor([float(guidance)], dtype=torch.float64))[0]
    folded = copy.deepcopy(model)
    folded.guidance_embedding = None
    bias = folded.time_embedding[2].bias
    bias.copy_((bias.double() + offset.to(bias.device)).to(bias.dtype))
    return folded
