"""Fused ops for GPD training (imports only torch and triton).

Distillation ops: the latent frequency loss and the online-target teacher double-step.
DiT ops: adaLN LayerNorm+modulation, gated residual, and q/k RMSNorm fused with 3D RoPE.
The distillation ops live in the `gpd` torch.library namespace (Triton on CUDA; the
native C++ library or a PyTorch reference on the CPU, see `cpu_backend()`) and work under
`torch.compile(fullgraph=True)`. The DiT ops are Triton autograd Functions for CUDA
tensors, each with a PyTorch reference beside it.
"""

from ._native import cpu_backend
from .adaln import GatedResidual, LayerNormModulate, gated_residual, layernorm_modulate
from .double_step import cfg_euler_step, double_step_target
from .freq_loss import FrequencyLoss, freq_loss
from .rope_norm import RMSNormRoPE, rms_norm_rope

__all__ = [
    "FrequencyLoss",
    "GatedResidual",
    "LayerNormModulate",
    "RMSNormRoPE",
    "cfg_euler_step",
    "cpu_backend",
    "double_step_target",
    "freq_loss",
    "gated_residual",
    "layernorm_modulate",
    "rms_norm_rope",
]
