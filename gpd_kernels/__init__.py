"""Fused ops for GPD training (imports only torch and triton).

Distillation ops: the latent frequency loss (the paper's form and the band-amplitude form)
and the online-target teacher double-step.
DiT ops: adaLN LayerNorm+modulation, gated residual, and q/k RMSNorm fused with 3D RoPE.
The distillation ops live in the `gpd` torch.library namespace (Triton on CUDA; the
native C++ library or a PyTorch reference on the CPU, see `cpu_backend()`) and work under
`torch.compile(fullgraph=True)`. The DiT ops are Triton autograd Functions for CUDA
tensors, each with a PyTorch reference beside it (why not library ops: `_launch`).
`gpd_kernels.dit` says which implementation a model calls per DiT op ("triton" or
"compile") and when (`fused_dit_ops`); `force_fused_dit_ops()` runs a model's fused path
on CPU tensors under TRITON_INTERPRET=1, as the tests do.
"""

from ._native import cpu_backend
from .adaln import GatedResidual, LayerNormModulate, gated_residual, layernorm_modulate
from .band_amplitude_loss import BandAmplitudeLoss, band_amplitude_loss
from .dit import (
    dit_op,
    dit_op_backend,
    force_fused_dit_ops,
    fused_dit_ops,
    set_dit_op_backend,
)
from .double_step import cfg_euler_step, double_step_target
from .freq_loss import FrequencyLoss, freq_loss
from .rope_norm import RMSNormRoPE, rms_norm_rope

__all__ = [
    "BandAmplitudeLoss",
    "FrequencyLoss",
    "GatedResidual",
    "LayerNormModulate",
    "RMSNormRoPE",
    "band_amplitude_loss",
    "cfg_euler_step",
    "cpu_backend",
    "dit_op",
    "dit_op_backend",
    "double_step_target",
    "force_fused_dit_ops",
    "freq_loss",
    "fused_dit_ops",
    "gated_residual",
    "layernorm_modulate",
    "rms_norm_rope",
    "set_dit_op_backend",
]
