"""Image-to-video conditioning from image files, as diffusers' WanImageToVideoPipeline builds it.

One image per video becomes, once (``encode_prompts --images``, ``sample --image``):

- ``image_latent`` [4 + C, T, H, W]: the frame mask then the condition latent. The image is
  resized to the video size (PIL Lanczos, no crop: the pipeline's VaeImageProcessor stretches
  it), scaled to [-1, 1], followed by ``frames - 1`` zero frames, encoded by the folder's
  AutoencoderKLWan (the mode of its posterior) and normalised per channel with the VAE
  config's ``latents_mean``/``latents_std``. The mask has one channel per frame the VAE folds
  into a latent frame (4): 1 on the first latent frame (the given image), 0 after.
- ``image_tokens`` [257, D] (Wan2.1-I2V only, whose transformer has ``image_dim``): the
  original image through the folder's CLIP image processor and vision model, its
  second-to-last hidden state (the pipeline's ``encode_image``).

A Wan2.2-I2V-style folder (no ``image_encoder/``, transformer without ``image_dim``) makes the
image latent alone; a Wan2.1-I2V folder without its image encoder is refused by name.

A Wan2.2-TI2V folder (transformer with ``expand_timesteps``, input as wide as its output) makes
``first_frames`` [C, 1, H/16, W/16] instead: the same resized image encoded alone as a one-frame
video and normalised the same way, no mask (the pipeline's ``prepare_latents`` with
``expand_timesteps``); the denoiser puts it in place of the first latent frame.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch

from gpd_model import DiTConfig, config_from_diffusers
from gpd_train.config.checks import resolve_device
from gpd_train.errors import GPDError
from gpd_train.run.wan_folder import WanFolderError, component, transformer_folder


class ImageError(GPDError, ValueError):
    """An image file that is missing or unreadable, or a video size the model cannot take."""


def image_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_image(path: str | Path) -> Any:
    """The RGB PIL image at ``path`` (a clear error when missing or not an image)."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise ImageError(f"image file {path} does not exist: give the path of a PNG or JPEG "
                         "image (relative paths in an --images file are read from its folder)")
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise ImageError(f"cannot read image file {path} as an image: {exc}") from None


def check_images(paths: list[Path]) -> None:
    """Every image opens (checked before any model is loaded)."""
    for path in paths:
        load_image(path)


def folder_model(model_dir: str | Path) -> DiTConfig:
    """The transformer shape of a Wan Diffusers folder."""
    folder = transformer_folder(model_dir)
    if folder is None:
        component(model_dir, "transformer")  # names the missing config.json
        raise WanFolderError(f"{model_dir}/transformer/config.json is not a "
                             "WanTransformer3DModel config")
    return config_from_diffusers(folder)


def takes_image(cfg: DiTConfig) -> bool:
    """Whether the model takes an image condition: image-to-video, or Wan2.2-TI2V (both)."""
    return cfg.image_to_video or cfg.expand_timesteps


def check_image_model(model_dir: str | Path, images: bool) -> DiTConfig:
    """The folder's transformer, checked to take images exactly when ``images`` are given,
    and (Wan2.1-I2V) to come with its image encoder."""
    cfg = folder_model(model_dir)
    root = Path(model_dir)
    if images and not takes_image(cfg):
        raise ImageError(f"{root} is a text-to-video model (its transformer takes "
                         f"{cfg.in_channels} input channels, no image condition): images are "
                         "for an image-to-video folder (e.g. Wan-AI/Wan2.1-I2V-14B-480P-"
                         "Diffusers); drop the images, or give an I2V folder")
    if not images and cfg.image_to_video:
        raise ImageError(f"{root} is an image-to-video model (its transformer takes "
                         f"{cfg.in_channels} input channels: noisy latent, mask, condition "
                         "latent): give one image per prompt, --images FILE (encode_prompts) or "
                         "--image PATH / --images FILE (sample)")
    if cfg.image_dim is not None and not (root / "image_encoder" / "config.json").is_file():
        raise WanFolderError(
            f"{root} is a Wan2.1-I2V folder (its transformer takes CLIP image tokens, image_dim "
            f"{cfg.image_dim}) but has no image encoder: missing "
            f"{root / 'image_encoder' / 'config.json'} (transformers' CLIPVisionModel) and "
            f"image_processor/; download the whole folder (e.g. "
            "Wan-AI/Wan2.1-I2V-14B-480P-Diffusers)")
    return cfg


class ImageConditioner:
    """The VAE and (Wan2.1-I2V) CLIP image encoder of an image-to-video Wan Diffusers folder."""

    def __init__(self, model_dir: str | Path, device: str = "auto") -> None:
        from diffusers import AutoencoderKLWan

        self.cfg = check_image_model(model_dir, images=True)
        self.device = resolve_device(device)
        vae_dir = component(model_dir, "vae")
        try:
            # fp32, as the pipeline loads it: the condition latent is an input of every step.
            self.vae = AutoencoderKLWan.from_pretrained(str(vae_dir), torch_dtype=torch.float32)
        except (OSError, ValueError) as exc:
            raise WanFolderError(f"cannot load the VAE from {vae_dir}: {exc}") from None
        self.vae.to(self.device).eval().requires_grad_(False)
        self.encoder = self.processor = None
        if self.cfg.image_dim is not None:
            from transformers import AutoImageProcessor, CLIPVisionModel

            root = Path(model_dir)
            try:
                self.processor = AutoImageProcessor.from_pretrained(str(root / "image_processor"))
                self.encoder = CLIPVisionModel.from_pretrained(str(root / "image_encoder"))
            except (OSError, ValueError) as exc:
                raise WanFolderError(f"cannot load the image encoder from {root}: {exc}") \
                    from None
            self.encoder.to(self.device).eval().requires_grad_(False)

    @property
    def takes_tokens(self) -> bool:
        return self.encoder is not None

    @property
    def first_frames(self) -> bool:
        """Wan2.2-TI2V: the condition replaces the first latent frame (no mask, one frame)."""
        return not self.cfg.image_to_video

    @property
    def latent_name(self) -> str:
        """The Conditioning field (and shard tensor) :meth:`condition_latent` fills."""
        return "first_frames" if self.first_frames else "image_latent"

    @torch.no_grad()
    def condition_latent(self, image: Any, height: int, width: int,
                         frames: int) -> torch.Tensor:
        """[4 + C, T, H/8, W/8] float32 on the CPU: the mask then the condition latent
        (Wan2.2-TI2V: [C, 1, H/16, W/16], the image's latent alone)."""
        import numpy as np
        from PIL import Image

        resized = image.resize((width, height), resample=Image.LANCZOS)
        pixels = torch.from_numpy(np.asarray(resized, dtype=np.float32) / 255.0)
        pixels = (pixels.permute(2, 0, 1) * 2.0 - 1.0).to(self.device)  # [3, H, W]
        # Wan2.2-TI2V encodes the image alone; the others follow it with zero frames.
        padding = 0 if self.first_frames else frames - 1
        video = torch.cat([pixels[:, None], pixels.new_zeros(3, padding, height, width)], 1)
        latent = self.vae.encode(video[None]).latent_dist.mode()[0]  # [C, T, h, w]
        config = self.vae.config
        view = (-1, 1, 1, 1)
        mean = torch.tensor(config.latents_mean, device=latent.device).view(view)
        inverse_std = 1.0 / torch.tensor(config.latents_std, device=latent.device).view(view)
        latent = (latent - mean) * inverse_std  # the pipeline's own order of operations
        if self.first_frames:
            return latent.float().cpu()
        mask = torch.zeros(int(config.scale_factor_temporal), *latent.shape[1:],
                           device=latent.device)
        mask[:, 0] = 1.0  # the first latent frame is the given image
        return torch.cat([mask, latent]).float().cpu()

    @torch.no_grad()
    def tokens(self, image: Any) -> torch.Tensor:
        """[N, image_dim] float32 on the CPU: CLIP's second-to-last hidden state."""
        assert self.encoder is not None and self.processor is not None
        inputs = self.processor(images=image, return_tensors="pt").to(self.device)
        hidden = self.encoder(**inputs, output_hidden_states=True).hidden_states[-2]
        return hidden[0].float().cpu()

    def encode(self, paths: list[Path], height: int, width: int, frames: int
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(image_latent [N, 4 + C, T, h, w] or, Wan2.2-TI2V, first_frames [N, C, 1, h, w];
        image_tokens [N, 257, D] or None) of the images."""
        latents, tokens = [], []
        for path in paths:  # one at a time: a 480p 81-frame VAE encode is large already
            image = load_image(path)
            latents.append(self.condition_latent(image, height, width, frames))
            if self.takes_tokens:
                tokens.append(self.tokens(image))
        return torch.stack(latents), (torch.stack(tokens) if tokens else None)
