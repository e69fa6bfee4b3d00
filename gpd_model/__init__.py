"""Compact Wan2.1-compatible video DiT, flow-matching schedule, sampler and checkpoint I/O."""

from .attention import attention, attention_backend, force_attention_backend
from .config import PRESETS, DiTConfig, get_preset
from .model import WanDiT
from .sampler import euler_sample, euler_step, guided_velocity, make_noise
from .schedule import sigma_grid, timestep_from_sigma

__all__ = [
    "PRESETS",
    "DiTConfig",
    "WanDiT",
    "attention",
    "attention_backend",
    "euler_sample",
    "euler_step",
    "force_attention_backend",
    "get_preset",
    "guided_velocity",
    "make_noise",
    "sigma_grid",
    "timestep_from_sigma",
]
