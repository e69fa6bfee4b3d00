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
from .model import WanDiT
from .sampler import branch_velocities, euler_sample, euler_step, guided_velocity, make_noise
from .schedule import shift_sigma, sigma_grid, timestep_from_sigma

__all__ = [
    "branch_velocities",
    "CheckpointError",
    "PRESETS",
    "DiTConfig",
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
    "read_state_dict",
    "save_diffusers",
    "shift_sigma",
    "sigma_grid",
    "timestep_from_sigma",
]
