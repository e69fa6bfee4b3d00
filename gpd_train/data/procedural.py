"""The built-in data set: moving coloured shapes made from code, one prompt per (shape,
motion), with fixed random "text" embeddings (the stand-in for umT5).

Image-to-video (``task = "i2v"``): each sample's Conditioning also carries its first frame
as the condition, ``image_latent`` = [mask, frame] [B, 1 + 3, T, H, W]
(the mask 1 on the first frame, the frame there and zeros after, as Wan's image-to-video
pipeline lays out its VAE latent with no temporal compression) and, for a model with an image
embedder, ``image_tokens``: the first frame's 4 x 4 patches through a fixed random projection
(the built-in set's stand-in for CLIP, as its prompt embeddings stand in for umT5). For a
Wan2.2-TI2V model (``first_frames=True``) the condition is instead ``first_frames``, the first
frame [B, 3, 1, H, W], which the denoiser puts in place of the noisy one.
"""

from __future__ import annotations

import torch
from torch import nn

from gpd_model import Conditioning
from gpd_train.config.settings import TASKS
from gpd_train.data.source import DataSource, check_batch_size, check_generator
from gpd_train.errors import ConfigError

SHAPES: tuple[str, ...] = ("square", "disc", "cross")
MOTIONS: tuple[str, ...] = ("right", "left", "down", "up")
# Direction of motion along (x, y), times the speed in pixels per frame; y grows downwards.
_MOTION_VELOCITY = {"right": (1.0, 0.0), "left": (-1.0, 0.0), "down": (0.0, 1.0),
                    "up": (0.0, -1.0)}
# One colour per shape: a prompt then decides most of a video's look, which is what lets the
# tiny CPU teacher learn to follow prompts in minutes (random colours and sizes left its
# samples off-prompt).
_SHAPE_COLOURS = {"square": (1.0, 0.3, 0.3), "disc": (0.3, 1.0, 0.3), "cross": (0.3, 0.5, 1.0)}
_BACKGROUND = -1.0
DEFAULT_SPEED = 2
_EMBEDDING_SEED = 20240601  # the fixed "text encoder": independent of the data seed
_IMAGE_SEED = 20240602  # the fixed "image encoder" of image-to-video tasks
_IMAGE_PATCH = 4  # pixels per side of one image token


def shape_mask(shape_ids: torch.Tensor, dx: torch.Tensor, dy: torch.Tensor,
               radius: torch.Tensor) -> torch.Tensor:
    """Boolean mask of each sample's shape at pixel offsets (dx, dy) from its centre.

    ``shape_ids``/``radius`` are [B]; ``dx``/``dy`` broadcast against [B, ...].
    """
    view = (-1,) + (1,) * (dx.dim() - 1)
    r = radius.view(view)
    ids = shape_ids.view(view)
    square = (dx.abs() <= r) & (dy.abs() <= r)
    disc = dx.square() + dy.square() <= (r + 0.5).square()
    arm = torch.where(r >= 3, 1.0, 0.5)
    cross = ((dx.abs() <= r) & (dy.abs() <= arm)) | ((dx.abs() <= arm) & (dy.abs() <= r))
    return torch.where(ids == 0, square, torch.where(ids == 1, disc, cross))


class ProceduralVideos(DataSource):
    """Class-conditional moving shapes, made from code, deterministic from ``seed``.

    Prompt ``c`` is (SHAPES[c // 4], MOTIONS[c % 4]); sample ``index`` has prompt
    ``index % num_prompts`` and a start position drawn from (seed, index). Each shape has
    its own colour; every shape has radius 3 (2 when the canvas leaves no room for 3).
    Videos are [3, frames, size, size] in [-1, 1] on a black background, moving ``speed``
    pixels per frame (default 2, slower when the canvas is too small). Prompt
    embeddings are fixed random token vectors: [start, shape, motion, end];
    the null (negative) prompt is [start, end, 0, 0].
    """

    context_len = 4

    def __init__(self, text_dim: int, frames: int = 4, size: int = 16, speed: int | None = None,
                 seed: int = 0, task: str = "t2v", image_dim: int | None = None,
                 first_frames: bool = False) -> None:
        if speed is None and isinstance(frames, int) and isinstance(size, int) and frames >= 2:
            # 2 px per frame (one 2x2 patch), slower when a small canvas leaves no room.
            speed = max(1, min(DEFAULT_SPEED, (size - 5) // (frames - 1)))
        for name, value, low in (("text_dim", text_dim, 1), ("frames", frames, 2),
                                 ("speed", speed, 1), ("size", size, 5 + speed * (frames - 1))):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ConfigError(f"ProceduralVideos.{name} must be an int >= {low}, got {value!r}")
        if task not in TASKS:
            raise ConfigError(f"task must be one of {TASKS}, got {task!r}")
        if image_dim is not None and (task != "i2v" or size % _IMAGE_PATCH):
            raise ConfigError(f"image tokens (image_dim {image_dim}) need task 'i2v' and a size "
                             f"divisible by {_IMAGE_PATCH}, got task {task!r}, size {size}")
        if first_frames and (task != "i2v" or image_dim is not None):
            raise ConfigError(f"first_frames (Wan2.2-TI2V's condition) needs task 'i2v' and no "
                             f"image tokens, got task {task!r}, image_dim {image_dim}")
        self.task = task
        self.first_frames = first_frames
        self.text_dim = text_dim
        self.frames = frames
        self.size = size
        self.speed = speed
        self.radius = min(3, (size - 1 - speed * (frames - 1)) // 2)  # fits beside its travel
        self.seed = int(seed)
        self.has_latents = True
        self.latent_shape = (3, frames, size, size)
        gen = torch.Generator().manual_seed(_EMBEDDING_SEED)
        token = torch.randn(2 + len(SHAPES) + len(MOTIONS), text_dim, generator=gen)
        start, end = token[0], token[1]
        shapes, motions = token[2:2 + len(SHAPES)], token[2 + len(SHAPES):]
        self._prompt_context = torch.stack([
            torch.stack([start, shapes[c // len(MOTIONS)], motions[c % len(MOTIONS)], end])
            for c in range(self.num_prompts)
        ])
        zero = torch.zeros(text_dim)
        self.negative_context = torch.stack([start, end, zero, zero])
        self._image_projection = None if image_dim is None else torch.randn(
            3 * _IMAGE_PATCH ** 2, image_dim, generator=torch.Generator().manual_seed(
                _IMAGE_SEED)) / (3 * _IMAGE_PATCH ** 2) ** 0.5

    @property
    def num_prompts(self) -> int:
        return len(SHAPES) * len(MOTIONS)

    def prompt_name(self, prompt_id: int) -> str:
        shape, motion = SHAPES[prompt_id // len(MOTIONS)], MOTIONS[prompt_id % len(MOTIONS)]
        return f"a {shape} moving {motion}"

    def prompt_labels(self, prompt_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(shape id, motion id) [B] that prompts ``prompt_ids`` [B] ask for."""
        self._check_ids(prompt_ids, "prompt_ids", self.num_prompts)
        return prompt_ids // len(MOTIONS), prompt_ids % len(MOTIONS)

    def start_positions(self, indices: torch.Tensor) -> torch.Tensor:
        """Start centres (x0, y0) [B, 2] in pixels of samples ``indices`` [B]."""
        self._check_ids(indices, "indices", None)
        return torch.stack([self._appearance(int(i))[1:3] for i in indices.cpu()])

    def context(self, prompt_ids: torch.Tensor) -> torch.Tensor:
        """Embeddings [B, L, text_dim] of prompts ``prompt_ids`` [B]."""
        self._check_ids(prompt_ids, "prompt_ids", self.num_prompts)
        return self._prompt_context[prompt_ids.cpu()]

    def videos(self, indices: torch.Tensor) -> torch.Tensor:
        """The data set's samples ``indices`` [B] (int64, >= 0) as [B, 3, T, H, W]."""
        self._check_ids(indices, "indices", None)
        params = torch.stack([self._appearance(int(i)) for i in indices.cpu()])
        return self.render(indices.cpu() % self.num_prompts, params)

    def _appearance(self, index: int) -> torch.Tensor:
        """(radius, x0, y0, r, g, b) of sample ``index``: a pure function of (seed, index)."""
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        travel = self.speed * (self.frames - 1)
        radius = float(self.radius)
        prompt = index % self.num_prompts
        vx, vy = _MOTION_VELOCITY[MOTIONS[prompt % len(MOTIONS)]]
        starts = []
        for v in (vx, vy):
            # Keep the whole shape inside the canvas for every frame.
            low = radius + (travel if v < 0 else 0)
            high = self.size - 1 - radius - (travel if v > 0 else 0)
            starts.append(float(torch.randint(int(low), int(high) + 1, (1,), generator=gen)))
        colour = _SHAPE_COLOURS[SHAPES[prompt // len(MOTIONS)]]
        return torch.tensor([radius, *starts, *colour])

    def render(self, prompt_ids: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """Videos [B, 3, T, H, W] of prompts [B] with appearance rows [B, 6]."""
        shape_ids = prompt_ids // len(MOTIONS)
        velocity = self.speed * torch.tensor([_MOTION_VELOCITY[m] for m in MOTIONS])[
            prompt_ids % len(MOTIONS)]
        time = torch.arange(self.frames, dtype=torch.float32)
        cx = params[:, 1, None] + velocity[:, 0, None] * time  # [B, T]
        cy = params[:, 2, None] + velocity[:, 1, None] * time
        pixel = torch.arange(self.size, dtype=torch.float32)
        dx = pixel.view(1, 1, 1, -1) - cx[:, :, None, None]  # [B, T, 1, W]
        dy = pixel.view(1, 1, -1, 1) - cy[:, :, None, None]  # [B, T, H, 1]
        mask = shape_mask(shape_ids, dx, dy, params[:, 0]).float()  # [B, T, H, W]
        colour = params[:, 3:6].view(-1, 3, 1, 1, 1)
        return _BACKGROUND + mask[:, None] * (colour * 2.0 - 1.0 - _BACKGROUND)

    def conditioning(self, indices: torch.Tensor) -> tuple[Conditioning, torch.Tensor | None]:
        """Samples ``indices``' Conditioning and, for image-to-video, their videos (the
        condition is made from them; None for text-to-video, which renders none)."""
        text = self.context(indices % self.num_prompts)
        if self.task == "t2v":
            return Conditioning(text), None
        videos = self.videos(indices)
        first = videos[:, :, :1]
        if self.first_frames:
            return Conditioning(text, first_frames=first), videos
        image_latent = torch.cat([torch.ones_like(first[:, :1]), first], dim=1)
        image_latent = torch.cat([image_latent, image_latent.new_zeros(
            (*image_latent.shape[:2], self.frames - 1, self.size, self.size))], dim=2)
        tokens = None
        if self._image_projection is not None:
            # [B, 3, H, W] -> [B, (H/p)(W/p), 3 p p]: each token one p x p patch.
            patches = nn.functional.unfold(first[:, :, 0], _IMAGE_PATCH, stride=_IMAGE_PATCH)
            tokens = patches.transpose(1, 2) @ self._image_projection
        return Conditioning(text, image_latent=image_latent, image_tokens=tokens), videos

    def draw(self, generator: torch.Generator, batch_size: int,
             with_latents: bool) -> tuple[Conditioning, torch.Tensor | None]:
        """A random batch: its Conditioning and, if asked, its videos [B, 3, T, H, W]."""
        check_generator(generator)
        check_batch_size(batch_size)
        indices = torch.randint(0, 2**31 - 1, (batch_size,), generator=generator)
        cond, videos = self.conditioning(indices)
        if not with_latents:
            return cond, None
        return cond, videos if videos is not None else self.videos(indices)

    def eval_prompts(self, count: int) -> tuple[Conditioning, list[str]]:
        """The first ``count`` samples (their prompts cycle): their Conditioning and names."""
        indices = torch.arange(count)
        return (self.conditioning(indices)[0],
                [self.prompt_name(int(i)) for i in indices % self.num_prompts])

    @staticmethod
    def condition_frames(cond: Conditioning) -> torch.Tensor:
        """The condition frames [B, 3, H, W] of an image-to-video Conditioning."""
        if cond.first_frames is not None:
            return cond.first_frames[:, :, 0]
        if cond.image_latent is None:
            raise ConfigError("condition_frames: the Conditioning has no image_latent "
                             "(text-to-video)")
        return cond.image_latent[:, 1:, 0]

    def classify(self, videos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Recognise (shape id, motion id) [B] of videos [B, 3, T, H, W] made like ours.

        Motion: the direction of the foreground centroid's displacement from the first to
        the last frame. Shape: the template (shape x radius) with the best IoU against the
        middle frame's foreground, centred on its centroid. Unrecognisable videos (no
        foreground) get -1.
        """
        if videos.dim() != 5 or videos.shape[1] != 3:
            raise ConfigError(f"videos must be [B, 3, T, H, W], got {tuple(videos.shape)}")
        foreground = (videos.float().amax(dim=1) > _BACKGROUND + 0.5).float()  # [B, T, H, W]
        pixel = torch.arange(videos.shape[-1], dtype=torch.float32)
        rows = torch.arange(videos.shape[-2], dtype=torch.float32)
        area = foreground.sum(dim=(2, 3)).clamp_min(1e-6)
        cx = (foreground * pixel).sum(dim=(2, 3)) / area  # [B, T]
        cy = (foreground * rows[:, None]).sum(dim=(2, 3)) / area
        shift_x, shift_y = cx[:, -1] - cx[:, 0], cy[:, -1] - cy[:, 0]
        horizontal = shift_x.abs() >= shift_y.abs()
        motion = torch.where(horizontal, torch.where(shift_x > 0, 0, 1),
                             torch.where(shift_y > 0, 2, 3))
        middle = foreground.shape[1] // 2
        frame = foreground[:, middle] > 0.5  # [B, H, W]
        best = torch.full((videos.shape[0],), -1.0)
        shape = torch.full((videos.shape[0],), -1, dtype=torch.long)
        dx = pixel.view(1, 1, -1) - cx[:, middle].round().view(-1, 1, 1)
        dy = rows.view(1, -1, 1) - cy[:, middle].round().view(-1, 1, 1)
        for shape_id in range(len(SHAPES)):
            for radius in (2.0, 3.0):
                ids = torch.full_like(shape, shape_id)
                template = shape_mask(ids, dx, dy, torch.full((len(ids),), radius))
                union = (template | frame).sum(dim=(1, 2)).clamp_min(1)
                iou = (template & frame).sum(dim=(1, 2)) / union
                better = iou > best
                best = torch.where(better, iou, best)
                shape = torch.where(better, shape_id, shape)
        empty = foreground.sum(dim=(1, 2, 3)) == 0
        return shape.masked_fill(empty, -1), motion.masked_fill(empty, -1)

    @staticmethod
    def _check_ids(ids: torch.Tensor, name: str, upper: int | None) -> None:
        if not isinstance(ids, torch.Tensor) or ids.dtype != torch.int64 or ids.dim() != 1:
            got = f"{ids.dtype} {tuple(ids.shape)}" if isinstance(ids, torch.Tensor) else ids
            raise ConfigError(f"{name} must be a 1-D int64 tensor, got {got}")
        if ids.numel() and (int(ids.min()) < 0 or (upper is not None and int(ids.max()) >= upper)):
            bound = f"[0, {upper})" if upper is not None else ">= 0"
            raise ConfigError(f"{name} must lie in {bound}, got min {int(ids.min())} "
                             f"max {int(ids.max())}")
