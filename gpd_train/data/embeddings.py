"""The real-scale data set: prompt embeddings (and optional latents) in shards.

Prompt-embedding data set layout (real scale), a folder holding:

- ``shard-*.safetensors``: each with ``context`` [N, L, text_dim] (float16, bfloat16 or
  float32 text-encoder outputs, e.g. umT5 padded to L = 512) and optionally ``latents``
  [N, C, T, H, W] (VAE latents of matching videos, only needed for stage-0 training and the
  ``data`` state source). Either every shard has ``latents`` or none does. A shard without
  latents must carry safetensors metadata ``latent_shape`` = ``"C,T,H,W"`` (e.g.
  ``"16,21,60,104"`` for Wan 480p), the shape of the noise the sampler starts from.
  Image-to-video shards (``encode_prompts --images``, gpd_train/data/image_condition.py) also
  hold each row's condition: ``image_latent`` [N, 4 + C, T, H, W] (the 4-channel frame mask,
  then the VAE latent of the image followed by zero frames, normalised; what diffusers'
  WanImageToVideoPipeline concatenates after the noisy latent) and, for Wan2.1-I2V,
  ``image_tokens`` [N, 257, D] (CLIP ViT-H's second-to-last hidden state), with metadata
  ``images`` (the image paths, JSON). For a Wan2.2-TI2V model the condition is instead
  ``first_frames`` [N, C, 1, H, W]: the image alone encoded as a one-frame video, normalised
  the same way, no mask (the pipeline's ``prepare_latents`` with ``expand_timesteps``), which
  the denoiser puts in place of the first latent frame. Every shard holds the same condition
  tensors, or none.
- ``negative.safetensors``: ``context`` [1, L, text_dim] or [L, text_dim], the encoded
  negative prompt used as the unconditional branch of classifier-free guidance.

Shards are read lazily (only the drawn rows are loaded), so the set may exceed memory.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import safe_open

from gpd_model import Conditioning, DiTConfig
from gpd_train.data.source import DataSource, check_batch_size, check_generator
from gpd_train.errors import ConfigError

# A prompt-embedding shard's image-condition tensors (image-to-video) and their ranks.
CONDITION_KEYS = {"image_latent": 5, "image_tokens": 3, "first_frames": 5}


class PromptEmbeddingSet(DataSource):
    """The real-scale prompt-embedding data set (layout in this module's docstring)."""

    def __init__(self, folder: str | Path, text_dim: int | None = None,
                 latent_channels: int | None = None) -> None:
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise ConfigError(f"prompt-embedding data set must be a folder, got {self.folder}")
        shards = sorted(self.folder.glob("shard-*.safetensors"))
        if not shards:
            raise ConfigError(f"no shard-*.safetensors in {self.folder}")
        negative_path = self.folder / "negative.safetensors"
        if not negative_path.exists():
            raise ConfigError(f"missing {negative_path} (the encoded negative prompt)")
        self._rows: list[tuple[Path, int]] = []  # (shard, rows) in order
        layout: dict[str, object] = {}
        for shard in shards:
            self._rows.append((shard, self._inspect_shard(shard, layout)))
        self.context_len, self.text_dim = layout["context"][1:]  # type: ignore[index]
        self.has_latents = bool(layout["latents"])
        # Per-row shapes of the image condition (image-to-video), None when absent.
        self.condition_shapes: dict[str, tuple[int, ...] | None] = {
            name: layout[name] for name in CONDITION_KEYS}  # type: ignore[misc]
        self.latent_shape: tuple[int, ...] = tuple(layout["latent_shape"])  # type: ignore[arg-type]
        if text_dim is not None and self.text_dim != text_dim:
            raise ConfigError(f"data set text_dim {self.text_dim} does not match the model's "
                             f"text_dim {text_dim} ({self.folder})")
        if latent_channels is not None and self.latent_shape[0] != latent_channels:
            raise ConfigError(f"data set latent channels {self.latent_shape[0]} do not match the "
                             f"model's in_channels {latent_channels} ({self.folder})")
        with safe_open(str(negative_path), framework="pt") as handle:
            if "context" not in handle.keys():
                raise ConfigError(f"{negative_path} has no 'context' tensor")
            negative = handle.get_tensor("context")
        if negative.dim() == 3 and negative.shape[0] == 1:
            negative = negative[0]
        if tuple(negative.shape) != (self.context_len, self.text_dim):
            raise ConfigError(f"{negative_path}: 'context' must be [1, {self.context_len}, "
                             f"{self.text_dim}] or [{self.context_len}, {self.text_dim}], got "
                             f"{tuple(negative.shape)}")
        self.negative_context = negative.float()
        self._check_finite(self.negative_context, negative_path)
        self._starts = [0]
        for _, count in self._rows:
            self._starts.append(self._starts[-1] + count)
        self.num_rows = self._starts.pop()

    @staticmethod
    def _check_finite(tensor: torch.Tensor, where: Path) -> None:
        if not torch.isfinite(tensor).all():
            raise ConfigError(f"{where}: non-finite values in the embeddings")

    @staticmethod
    def _inspect_shard(shard: Path, layout: dict[str, object]) -> int:
        floating = (torch.float16, torch.bfloat16, torch.float32)
        with safe_open(str(shard), framework="pt") as handle:
            keys = set(handle.keys())
            if "context" not in keys:
                raise ConfigError(f"{shard}: missing 'context' tensor (got keys {sorted(keys)})")
            context = handle.get_slice("context")
            shape = tuple(context.get_shape())
            if len(shape) != 3 or shape[0] == 0:
                raise ConfigError(f"{shard}: 'context' must be [N, L, text_dim] with N >= 1, "
                                 f"got {shape}")
            first = context[0:1]
            if first.dtype not in floating:
                raise ConfigError(f"{shard}: 'context' dtype must be one of {floating}, "
                                 f"got {first.dtype}")
            has_latents = "latents" in keys
            if has_latents:
                latent_shape = tuple(handle.get_slice("latents").get_shape())
                if len(latent_shape) != 5 or latent_shape[0] != shape[0]:
                    raise ConfigError(f"{shard}: 'latents' must be [{shape[0]}, C, T, H, W], "
                                     f"got {latent_shape}")
                per_item = latent_shape[1:]
            else:
                meta = (handle.metadata() or {}).get("latent_shape")
                try:
                    per_item = tuple(int(v) for v in meta.split(","))  # type: ignore[union-attr]
                except (AttributeError, ValueError):
                    raise ConfigError(f"{shard}: without 'latents' the metadata must give "
                                     f"latent_shape='C,T,H,W', got {meta!r}") from None
                if len(per_item) != 4:
                    raise ConfigError(f"{shard}: latent_shape must have 4 entries, got {meta!r}")
            conditions = {}
            for name, rank in CONDITION_KEYS.items():
                found = tuple(handle.get_slice(name).get_shape()) if name in keys else None
                if found is not None and (len(found) != rank or found[0] != shape[0]):
                    raise ConfigError(f"{shard}: {name!r} must have {rank} dims with "
                                     f"{shape[0]} rows (context's), got {found}")
                conditions[name] = None if found is None else found[1:]
        expected = {"context": (None,) + shape[1:], "latents": has_latents,
                    "latent_shape": per_item, **conditions}
        for key, value in expected.items():
            if key not in layout:
                layout[key] = value
            elif layout[key] != value:
                raise ConfigError(f"{shard}: {key} {value} differs from the earlier shards' "
                                 f"{layout[key]}")
        return shape[0]

    def check_condition(self, cfg: DiTConfig, task: str | None = None) -> None:
        """The rows' image condition must be what the model takes for ``task`` (None: the
        model's own; a Wan2.2-TI2V model does both, so the rows' task): none for
        text-to-video, the mask and condition latent for image-to-video (and CLIP tokens for
        Wan2.1-I2V), the first frame's latent for Wan2.2-TI2V's image-to-video."""
        ti2v = cfg.expand_timesteps and not cfg.image_to_video  # does both: the task decides
        made_for = (task or self.task) if ti2v else "i2v" if cfg.image_to_video else "t2v"
        encode = ("python -m gpd_train.encode_prompts --model WAN_FOLDER --prompts FILE "
                  "--out DIR" + (" --images FILE" if made_for == "i2v" else ""))
        if self.task != made_for:
            held = ("prompt embeddings without images" if self.task == "t2v" else
                    "image conditions (first_frames) for a Wan2.2-TI2V model"
                    if self.condition_shapes["first_frames"] else
                    "image conditions (image_latent) for an image-to-video model")
            model = "the run's task is" if ti2v else "the model is"
            raise ConfigError(f"{self.folder} holds {held}; {model} {made_for} "
                             f"(in_channels {cfg.in_channels}): encode a data set for it with "
                             f"`{encode}`")
        wanted = {"image_latent": None, "image_tokens": None, "first_frames": None}
        if made_for == "i2v" and ti2v:  # the first latent frame's condition
            wanted["first_frames"] = (cfg.out_channels, 1, *self.latent_shape[2:])
        elif made_for == "i2v":
            wanted["image_latent"] = (cfg.in_channels - cfg.out_channels, *self.latent_shape[1:])
            wanted["image_tokens"] = cfg.image_dim
        for name, want in wanted.items():
            got = self.condition_shapes[name]
            if name == "image_tokens" and got is not None and want is not None:
                got = got[-1]  # any number of tokens, each image_dim wide
            if got != want:
                raise ConfigError(f"{self.folder}: {name} per row is {got}, the model takes "
                                 f"{want} (image_dim {cfg.image_dim}, in_channels "
                                 f"{cfg.in_channels}): encode a data set for it with "
                                 f"`{encode}`")

    @property
    def task(self) -> str:
        """'i2v' when the rows carry an image condition, else 't2v'."""
        return "t2v" if all(shape is None for shape in self.condition_shapes.values()) else "i2v"

    def rows(self, indices: Sequence[int]) -> tuple[Conditioning, torch.Tensor | None]:
        """The Conditioning (float32) and latents (or None) of the given global rows."""
        names = ["context", *(name for name, shape in self.condition_shapes.items()
                              if shape is not None)]
        if self.has_latents:
            names.append("latents")
        parts: dict[str, list[torch.Tensor]] = {name: [] for name in names}
        for index in indices:
            if not 0 <= index < self.num_rows:
                raise ConfigError(f"row {index} out of range [0, {self.num_rows})")
            position = bisect.bisect_right(self._starts, index) - 1
            shard, offset = self._rows[position][0], index - self._starts[position]
            with safe_open(str(shard), framework="pt") as handle:
                for name in names:
                    parts[name].append(handle.get_slice(name)[offset:offset + 1].float())
        tensors = {name: torch.cat(rows) for name, rows in parts.items()}
        for tensor in tensors.values():
            self._check_finite(tensor, self.folder)
        latents = tensors.pop("latents", None)
        tensors["text"] = tensors.pop("context")
        return Conditioning.from_tensors(tensors), latents

    def draw(self, generator: torch.Generator, batch_size: int,
             with_latents: bool) -> tuple[Conditioning, torch.Tensor | None]:
        """A random batch of rows; latents only when asked (and present)."""
        check_generator(generator)
        check_batch_size(batch_size)
        if with_latents and not self.has_latents:
            raise ConfigError(f"{self.folder} has no 'latents' (prompt embeddings alone): "
                             "training stage 0 needs them (import it with --teacher W instead) "
                             "and so does state_source 'data' (use 'teacher' or 'student')")
        indices = torch.randint(0, self.num_rows, (batch_size,), generator=generator).tolist()
        cond, latents = self.rows(indices)
        return cond, (latents if with_latents else None)

    def eval_prompts(self, count: int) -> tuple[Conditioning, list[str]]:
        """The first ``count`` rows (cycling), named by row number."""
        indices = [i % self.num_rows for i in range(count)]
        return self.rows(indices)[0], [f"row {i}" for i in indices]
