"""Compact Wan2.1-compatible video DiT, flow-matching schedule, sampler and checkpoint I/O."""

from .attention import attention, attention_backend, force_attention_backend
from .checkpoint import (
    CheckpointError,
    config_from_diffusers,
    load_checkpoint,
    read_state_dict,
    save_diffusers,
)
from .config import PRESETS, DiTConfig, get_preset
from .guidance import GuidanceEmbedding, add_guidance_input, fold_guidance, has_guidance_input
from .model import WanDiT
from .sampler import (
    branch_velocities,
    euler_sample,
    euler_step,
    guided_velocity,
    make_noise,
    model_velocity,
)
from .schedule import add_noise, shift_sigma, sigma_grid, timestep_from_sigma

__all__ = [
    "add_noise",
    "branch_velocities",
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
    "guided_velocity",
    "load_checkpoint",
    "make_noise",
    "model_velocity",
    "read_state_dict",
    "save_diffusers",
    "shift_sigma",
    "sigma_grid",
    "timestep_from_sigma",
]
