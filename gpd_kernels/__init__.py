"""Fused ops for GPD training: frequency loss and teacher double-step (torch + triton only).

Ops live in the `gpd` torch.library namespace (Triton on CUDA, a PyTorch reference or
the native library on CPU); the functions below are the documented entry points.
"""

from ._native import cpu_backend
from .adaln import GatedResidual, LayerNormModulate, gated_residual, layernorm_modulate  # issue 5
from .double_step import cfg_euler_step, double_step_target
from .freq_loss import FrequencyLoss, freq_loss
from .rope_norm import RMSNormRoPE, rms_norm_rope  # issue 5: fused DiT ops

__all__ = [
    "FrequencyLoss",
    "cfg_euler_step",
    "cpu_backend",
    "double_step_target",
    "freq_loss",
    # Fused DiT ops (issue 5)
    "GatedResidual",
    "LayerNormModulate",
    "RMSNormRoPE",
    "gated_residual",
    "layernorm_modulate",
    "rms_norm_rope",
]
