"""Latents to pixels and files: the Wan VAE decode, H.264 MP4 through PyAV, and GIF / PNG previews.

PyAV (``pip install -e '.[real]'``) ships its own FFmpeg with libx264, so no system ffmpeg
is needed. Wan2.1 videos play at 16 frames per second.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from PIL import Image, ImageDraw

from gpd_train.errors import ConfigError
from gpd_train.run.wan_folder import WanFolderError, component

WAN_FPS = 16
SHEET_SCALE = 3
GIF_SCALE = 4
GIF_FRAME_MS = 150


def load_vae(path: str | Path, latent_channels: int, *, device: torch.device,
             dtype: torch.dtype = torch.float32, tiling: bool = False,
             slicing: bool = False) -> Any:
    """diffusers' AutoencoderKLWan from a VAE folder or a Diffusers folder holding ``vae/``.

    Refuses a VAE whose latent channels (``z_dim``) differ from the model's ``in_channels``.
    """
    from diffusers import AutoencoderKLWan

    path = Path(path)
    folder = path if (path / "config.json").is_file() else component(path, "vae")
    config = json.loads((folder / "config.json").read_text())
    if config.get("z_dim") != latent_channels:
        raise WanFolderError(f"the VAE at {folder} has {config.get('z_dim')} latent channels "
                             f"(z_dim), the model makes {latent_channels}: pass the VAE of the "
                             "model's own Wan2.1 folder")
    try:
        vae = AutoencoderKLWan.from_pretrained(str(folder), torch_dtype=dtype)
    except (OSError, ValueError) as exc:
        raise WanFolderError(f"cannot load the VAE from {folder}: {exc}") from None
    if tiling:
        vae.enable_tiling()  # spatial tiles: peak memory bounded by the tile, not the frame
    if slicing:
        vae.enable_slicing()  # one video of the batch at a time
    return vae.to(device).eval().requires_grad_(False)


@torch.no_grad()
def decode_latents(vae: Any, latents: torch.Tensor) -> torch.Tensor:
    """Videos [N, 3, F, H, W] in [-1, 1] (float32, CPU) from normalised latents [N, C, T, h, w].

    The DiT works on latents normalised per channel; the VAE decodes ``z * std + mean``
    with the VAE config's ``latents_mean``/``latents_std``, as WanPipeline does.
    """
    config = vae.config
    if latents.dim() != 5 or latents.shape[1] != config.z_dim:
        raise ConfigError(f"latents must be [N, {config.z_dim}, T, H, W], got "
                         f"{tuple(latents.shape)}")
    param = next(vae.parameters())
    view = (1, config.z_dim, 1, 1, 1)
    mean = torch.tensor(config.latents_mean, dtype=param.dtype, device=param.device).view(view)
    std = torch.tensor(config.latents_std, dtype=param.dtype, device=param.device).view(view)
    videos = vae.decode(latents.to(param.device, param.dtype) * std + mean, return_dict=False)[0]
    return videos.float().clamp(-1, 1).cpu()


def to_uint8_frames(video: torch.Tensor) -> np.ndarray:
    """[F, H, W, 3] uint8 from one video [3, F, H, W] in [-1, 1]."""
    if video.dim() != 4 or video.shape[0] != 3:
        raise ConfigError(f"video must be [3, F, H, W], got {tuple(video.shape)}")
    pixels = ((video.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return pixels.permute(1, 2, 3, 0).contiguous().numpy()


def write_mp4(path: str | Path, video: torch.Tensor, fps: int = WAN_FPS, crf: int = 18) -> Path:
    """One video [3, F, H, W] in [-1, 1] as H.264 MP4 (yuv420p, plays everywhere)."""
    try:
        import av
    except ImportError:
        raise RuntimeError("writing MP4 needs PyAV: pip install -e '.[real]'") from None
    frames = to_uint8_frames(video)
    height, width = frames.shape[1:3]
    if height % 2 or width % 2:
        raise ConfigError(f"H.264 (yuv420p) needs even frame sizes, got {height} x {width}")
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.mp4")
    with av.open(str(tmp), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": str(crf)}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())  # flush the encoder's delayed frames
    tmp.replace(path)
    return path


def read_mp4(path: str | Path) -> tuple[np.ndarray, float, str]:
    """(frames [F, H, W, 3] uint8, frames per second, codec name) of a video file."""
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
        return np.stack(frames), float(stream.average_rate), stream.codec_context.name


def _frames_to_image(video: torch.Tensor, scale: int) -> list[Image.Image]:
    rgb = video[:3] if video.shape[0] >= 3 else video[:1].expand(3, -1, -1, -1)
    pixels = ((rgb.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # [3, T, H, W]
    images = []
    for t in range(pixels.shape[1]):
        image = Image.fromarray(pixels[:, t].permute(1, 2, 0).numpy(), "RGB")
        images.append(image.resize((image.width * scale, image.height * scale), Image.NEAREST))
    return images


def write_contact_sheet(path: Path, rows: list[tuple[str, torch.Tensor]]) -> None:
    """One row per model: each example video's frames left to right."""
    label_width, gap = max(150, 6 * max(len(label) for label, _ in rows) + 8), 6
    first = _frames_to_image(rows[0][1][0], SHEET_SCALE)
    cell_w, cell_h = first[0].size
    frames, examples = len(first), rows[0][1].shape[0]
    width = label_width + examples * (frames * cell_w + gap)
    sheet = Image.new("RGB", (width, len(rows) * (cell_h + gap)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for r, (label, videos) in enumerate(rows):
        top = r * (cell_h + gap)
        draw.text((4, top + cell_h // 2 - 6), label, fill=(0, 0, 0))
        for e in range(examples):
            left = label_width + e * (frames * cell_w + gap)
            for t, image in enumerate(_frames_to_image(videos[e], SHEET_SCALE)):
                sheet.paste(image, (left + t * cell_w, top))
    sheet.save(path)


def write_gif(target: Path | BinaryIO, videos: torch.Tensor) -> None:
    """The example videos side by side, animated and looping, to a file or a buffer."""
    per_video = [_frames_to_image(video, GIF_SCALE) for video in videos]
    cell_w, cell_h = per_video[0][0].size
    frames = []
    for t in range(len(per_video[0])):
        canvas = Image.new("RGB", (len(per_video) * (cell_w + 2), cell_h), (255, 255, 255))
        for e, video in enumerate(per_video):
            canvas.paste(video[t], (e * (cell_w + 2), 0))
        frames.append(canvas)
    frames[0].save(target, format="GIF", save_all=True, append_images=frames[1:],
                   duration=GIF_FRAME_MS, loop=0)
