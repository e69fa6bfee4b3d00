"""Compact Wan2.1-compatible video DiT, the denoiser interface, flow-matching schedule,
sampler and checkpoint I/O."""

from .attention import attention, attention_backend, force_attention_backend
from .checkpoint import (
    CheckpointError,
    config_from_diffusers,
    load_checkpoint,
    read_state_dict,
    save_diffusers,
)
from .config import PRESETS, DiTConfig, get_preset
from .denoiser import (
    CFG,
    Conditioning,
    Denoiser,
    DiTDenoiser,
    ExpertPair,
    ExpertScales,
    guided_branches,
    unconditional,
)
from .guidance import GuidanceEmbedding, add_guidance_input, fold_guidance, has_guidance_input
from .model import WanDiT
from .sampler import euler_sample, euler_step, make_noise
from .schedule import add_noise, shift_sigma, sigma_grid, timestep_from_sigma

__all__ = [
    "add_noise",
    "CFG",
    "Conditioning",
    "Denoiser",
    "DiTDenoiser",
    "ExpertPair",
    "ExpertScales",
    "unconditional",
    "CheckpointError",
    "PRESETS",
    "DiTConfig",
    "GuidanceEmbedding",
    "add_guidance_input",
    "fold_guidance",
    "has_guidance_input",
    "WanDiT",
    "attention",
    "attention_backend",
    "config_from_diffusers",
    "euler_sample",
    "euler_step",
    "force_attention_backend",
    "get_preset",
    "guided_branches",
    "load_checkpoint",
    "make_noise",
    "read_state_dict",
    "save_diffusers",
    "shift_sigma",
    "sigma_grid",
    "timestep_from_sigma",
]
