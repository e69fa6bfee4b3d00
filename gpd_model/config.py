"""Configuration of the Wan2.1-style video DiT and its named presets."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, replace

# Fields added for other Wan models; a record leaves them out at these values (DiTConfig.to_json).
_FAMILY_DEFAULTS = {"image_dim": None, "expand_timesteps": False}


@dataclass
class DiTConfig:
    """Hyper-parameters of :class:`gpd_model.model.WanDiT` (Wan2.1 layout).

    ``image_dim`` set: a Wan2.1-I2V model, whose image tokens (CLIP ViT-H: 257 x 1280) go
    through an image embedder and are attended to by every cross-attention beside the
    text. Image-to-video without image tokens (Wan2.2-I2V-A14B) is only the wider
    ``in_channels`` (noisy latent + mask + condition latent).

    ``expand_timesteps`` (diffusers' pipeline flag of the same name): a Wan2.2-TI2V model,
    sampled with one timestep per patch token, the conditioned first latent frame's tokens
    at 0 (image-to-video) and all at t (text-to-video). It changes no weight: the DiT takes
    [B] or [B, N] timesteps either way; the flag tells samplers and exports which to give.
    """

    in_channels: int
    out_channels: int
    dim: int
    ffn_dim: int
    num_heads: int
    num_layers: int
    text_dim: int
    freq_dim: int = 256
    patch_size: tuple[int, int, int] = (1, 2, 2)
    eps: float = 1e-6
    rope_theta: float = 10000.0
    image_dim: int | None = None
    expand_timesteps: bool = False

    def to_json(self) -> str:
        """The config as sorted JSON, leaving out the model-family fields at their defaults, so
        a text-to-video model's record reads as it did before those fields existed (its files
        stay byte-identical and older run folders keep matching)."""
        fields = dataclasses.asdict(self)
        for name in _FAMILY_DEFAULTS:
            if fields[name] == _FAMILY_DEFAULTS[name]:
                del fields[name]
        return json.dumps(fields, sort_keys=True)

    def __post_init__(self) -> None:
        positive = ("in_channels", "out_channels", "dim", "ffn_dim", "num_heads", "num_layers",
                    "text_dim", "freq_dim")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"DiTConfig.{name} must be a positive int, got {value!r}")
        image = self.image_dim
        if image is not None and (not isinstance(image, int) or isinstance(image, bool)
                                  or image <= 0):
            raise ValueError(f"DiTConfig.image_dim must be a positive int or None, got {image!r}")
        if not isinstance(self.expand_timesteps, bool):
            raise ValueError(
                f"DiTConfig.expand_timesteps must be a bool, got {self.expand_timesteps!r}"
            )
        patch = tuple(self.patch_size)
        if len(patch) != 3 or any(not isinstance(p, int) or p <= 0 for p in patch):
            raise ValueError(
                "DiTConfig.patch_size must be three positive ints (t, h, w), "
                f"got {self.patch_size!r}"
            )
        self.patch_size = patch
        if self.dim % self.num_heads:
            raise ValueError(
                f"DiTConfig.dim ({self.dim}) must be divisible by num_heads ({self.num_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"DiTConfig: dim/num_heads must be even, got {self.head_dim}")
        if self.freq_dim % 2:
            raise ValueError(f"DiTConfig.freq_dim must be even, got {self.freq_dim}")
        if not self.eps > 0:
            raise ValueError(f"DiTConfig.eps must be > 0, got {self.eps!r}")
        if not self.rope_theta > 0:
            raise ValueError(f"DiTConfig.rope_theta must be > 0, got {self.rope_theta!r}")

    @property
    def image_to_video(self) -> bool:
        """Whether the input is wider than the output: the noisy latent, then the mask and
        condition latent of image-to-video along channels."""
        return self.in_channels > self.out_channels

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def rope_split(self) -> tuple[int, int, int]:
        """Channels of each head given to the (t, h, w) rotary axes, as Wan2.1 splits them."""
        spatial = 2 * (self.head_dim // 6)
        return self.head_dim - 2 * spatial, spatial, spatial


# CPU demo size. The built-in data are RGB videos used directly as latents (no VAE);
# Wan's VAE packs 4 frames into one latent frame, so the tiny patch takes 4 frames. On
# the 4-frame demo videos this made motion learnable within the CPU budget (prompt
# accuracy of the 48-step teacher 0.12 -> 0.75 against a (1, 2, 2) patch) at 1/4 of the
# tokens.
_TINY = DiTConfig(
    in_channels=3, out_channels=3, dim=64, ffn_dim=256, num_heads=2, num_layers=3,
    text_dim=32, patch_size=(4, 2, 2),
)

PRESETS: dict[str, DiTConfig] = {
    "tiny": _TINY,
    # tiny with Wan2.1-I2V's parts on the built-in RGB videos (no VAE): the input is the
    # noisy video 3 + a 1-channel mask (one mask channel per frame: nothing packs 4 frames
    # into one as Wan's VAE does) + the first frame then zeros 3, and a small image embedder.
    "tiny-i2v": replace(_TINY, in_channels=7, image_dim=32),
    # tiny sampled as Wan2.2-TI2V: per-token timesteps, the first latent frame as condition.
    # Its (4, 2, 2) patch puts the condition frame in one token with 3 noisy frames, so on
    # the built-in videos no token is at timestep 0; the condition replaces the first frame.
    "tiny-ti2v": replace(_TINY, expand_timesteps=True),
    # Twice tiny's width (4x its linear-layer FLOPs): the capacity check of the step
    # schedules on the same built-in data.
    "tiny-wide": DiTConfig(
        in_channels=3, out_channels=3, dim=128, ffn_dim=512, num_heads=2, num_layers=3,
        text_dim=32, patch_size=(4, 2, 2),
    ),
    "wan2.1-t2v-1.3b": DiTConfig(
        in_channels=16, out_channels=16, dim=1536, ffn_dim=8960, num_heads=12, num_layers=30,
        text_dim=4096,
    ),
    "wan2.1-t2v-14b": DiTConfig(
        in_channels=16, out_channels=16, dim=5120, ffn_dim=13824, num_heads=40, num_layers=40,
        text_dim=4096,
    ),
    # diffusers' config of Wan-AI/Wan2.1-I2V-14B-480P-Diffusers (720P has the same one).
    "wan2.1-i2v-14b": DiTConfig(
        in_channels=36, out_channels=16, dim=5120, ffn_dim=13824, num_heads=40, num_layers=40,
        text_dim=4096, image_dim=1280,
    ),
    # diffusers' config of Wan-AI/Wan2.2-TI2V-5B-Diffusers (scripts/convert_wan_to_diffusers.py,
    # "Wan2.2-TI2V-5B"): 48-channel latent of the Wan2.2 VAE (4 x 16 x 16), head_dim 128.
    "wan2.2-ti2v-5b": DiTConfig(
        in_channels=48, out_channels=48, dim=3072, ffn_dim=14336, num_heads=24, num_layers=30,
        text_dim=4096, expand_timesteps=True,
    ),
}


def get_preset(name: str, **overrides: object) -> DiTConfig:
    """Return the named preset, optionally with some fields replaced."""
    if name not in PRESETS:
        raise ValueError(f"unknown DiT preset {name!r}; expected one of {sorted(PRESETS)}")
    return replace(PRESETS[name], **overrides) if overrides else PRESETS[name]
