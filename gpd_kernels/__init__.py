"""Fused ops for GPD training: frequency loss and teacher double-step (torch + triton only).

Ops live in the `gpd` torch.library namespace (Triton on CUDA, a PyTorch reference or
the native library on CPU); the functions below are the documented entry points.
"""

from ._native import cpu_backend
from .double_step import cfg_euler_step, double_step_target
from .freq_loss import FrequencyLoss, freq_loss

__all__ = [
    "FrequencyLoss",
    "cfg_euler_step",
    "cpu_backend",
    "double_step_target",
    "freq_loss",
]
