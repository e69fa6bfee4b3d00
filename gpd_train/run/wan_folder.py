"""A Wan2.1-T2V-Diffusers folder (e.g. Wan-AI/Wan2.1-T2V-1.3B-Diffusers) as the trainer sees it.

Layout (what diffusers' ``WanPipeline.from_pretrained`` reads)::

    model_index.json
    text_encoder/   config.json + weights      transformers' UMT5EncoderModel (umT5-XXL)
    tokenizer/      tokenizer.json + config    the umT5 tokenizer
    transformer/    config.json + weights      WanTransformer3DModel (the teacher)
    vae/            config.json + weights      AutoencoderKLWan
    scheduler/      scheduler_config.json

Only the components a command uses are required; a missing one is an error naming the path.

A Wan2.2 A14B folder (e.g. Wan-AI/Wan2.2-T2V-A14B-Diffusers) holds two experts of one shape:
``transformer/`` denoises timesteps >= ``boundary_ratio * num_train_timesteps`` and
``transformer_2/`` those below (diffusers' WanPipeline), ``boundary_ratio`` being in
model_index.json. With timestep = 1000 sigma on both sides the boundary is the sigma
``boundary_ratio`` (``expert_folders``).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpd_model import PRESETS, DiTConfig, config_from_diffusers
from gpd_train.config.settings import DEFAULT_GUIDANCE, DEFAULT_SHIFT
from gpd_train.errors import ConfigError, GPDError

# component -> (a file that must be inside it, what it is)
COMPONENTS: dict[str, tuple[str, str]] = {
    "text_encoder": ("config.json", "transformers' UMT5EncoderModel"),
    "tokenizer": ("tokenizer_config.json", "the umT5 tokenizer"),
    "transformer": ("config.json", "diffusers' WanTransformer3DModel"),
    "vae": ("config.json", "diffusers' AutoencoderKLWan"),
    "scheduler": ("scheduler_config.json", "the sampling scheduler"),
    "image_encoder": ("config.json", "transformers' CLIPVisionModel (Wan2.1-I2V)"),
    "image_processor": ("preprocessor_config.json", "transformers' CLIPImageProcessor"),
}
LAYOUT_HINT = ("expected a Wan2.1-T2V-Diffusers folder (model_index.json, text_encoder/, "
               "tokenizer/, transformer/, vae/, scheduler/), e.g. a download of "
               "Wan-AI/Wan2.1-T2V-1.3B-Diffusers")


class WanFolderError(GPDError, ValueError):
    """A Diffusers folder that lacks a component or holds an unusable one."""


def component(root: str | Path, name: str) -> Path:
    """``root/name`` after checking it holds its marker file; a clear error otherwise."""
    if name not in COMPONENTS:
        raise ConfigError(f"unknown component {name!r}; expected one of {sorted(COMPONENTS)}")
    root = Path(root)
    if not root.is_dir():
        raise WanFolderError(f"{root} is not a folder: {LAYOUT_HINT}")
    marker, what = COMPONENTS[name]
    path = root / name
    if not (path / marker).is_file():
        raise WanFolderError(f"{root} has no {name} component: missing {path / marker} "
                             f"({what}); {LAYOUT_HINT}")
    return path


def transformer_folder(path: str | Path) -> Path | None:
    """The folder holding a diffusers transformer config.json: ``path`` or ``path/transformer``.

    None when ``path`` is not a diffusers folder (e.g. an original-Wan checkpoint file).
    """
    path = Path(path)
    for candidate in (path / "transformer", path):
        config = candidate / "config.json"
        if config.is_file():
            try:
                name = json.loads(config.read_text()).get("_class_name")
            except (OSError, ValueError) as exc:
                raise WanFolderError(f"cannot read {config}: {exc}") from None
            if name == "WanTransformer3DModel":
                return candidate
    return None


@dataclass(frozen=True)
class ExpertFolders:
    """A Wan2.2 A14B folder's experts: ``high`` runs sigma >= ``boundary``, ``low`` below."""

    high: Path
    low: Path
    boundary: float
    config: DiTConfig  # both experts'


# diffusers' WanPipeline component -> which expert it is
EXPERTS = {"transformer": "high-noise", "transformer_2": "low-noise"}


def _read_index(root: Path) -> dict[str, Any] | None:
    index = root / "model_index.json"
    if not index.is_file():
        return None
    try:
        data = json.loads(index.read_text())
    except (OSError, ValueError) as exc:
        raise WanFolderError(f"cannot read {index}: {exc}") from None
    if not isinstance(data, dict):
        raise WanFolderError(f"{index} must hold a JSON object, got {type(data).__name__}")
    return data


def expert_folders(path: str | Path) -> ExpertFolders | None:
    """The two experts of a Wan2.2 A14B Diffusers folder, None for a folder without
    ``transformer_2`` or ``boundary_ratio`` (one model). Everything is checked before any
    weight is read: both experts present, of one shape, the boundary inside (0, 1)."""
    root = Path(path)
    index = _read_index(root) if root.is_dir() else None
    if index is None:
        return None
    boundary = index.get("boundary_ratio")
    listed = index.get("transformer_2") not in (None, [None, None])
    if boundary is None and not (listed or (root / "transformer_2").exists()):
        return None
    where = root / "model_index.json"
    if boundary is None:  # diffusers would silently run transformer/ alone
        raise WanFolderError(f"{root} has a transformer_2 expert but {where} sets no "
                             "boundary_ratio (the sigma where it takes over): add it")
    if isinstance(boundary, bool) or not isinstance(boundary, (int, float)) \
            or not 0.0 < boundary < 1.0:
        raise WanFolderError(f"{where}: boundary_ratio must be in (0, 1) (the sigma where "
                             f"transformer_2 takes over), got {boundary!r}")
    configs = {}
    for name, noise in EXPERTS.items():
        folder = transformer_folder(root / name)
        if folder is None or folder != root / name:
            raise WanFolderError(f"{root} (boundary_ratio {boundary}) has no {name} expert: "
                                 f"missing {root / name / 'config.json'} (the {noise} "
                                 "WanTransformer3DModel)")
        configs[name] = config_from_diffusers(folder)
    high, low = configs.values()
    if high != low:
        diff = ", ".join(f"{field.name} {getattr(high, field.name)} vs {getattr(low, field.name)}"
                         for field in dataclasses.fields(high)
                         if getattr(high, field.name) != getattr(low, field.name))
        raise WanFolderError(f"{root}: the experts differ in shape (transformer vs "
                             f"transformer_2: {diff}); both must be one model's shape")
    return ExpertFolders(root / "transformer", root / "transformer_2", float(boundary), high)


def teacher_dit_config(path: str | Path | None) -> DiTConfig | None:
    """The DiT configuration of a diffusers teacher folder (of each expert of a Wan2.2
    folder), None for other checkpoints."""
    experts = None if path is None else expert_folders(path)
    if experts is not None:
        return experts.config
    folder = None if path is None else transformer_folder(path)
    return None if folder is None else config_from_diffusers(folder)


def diffusers_root(teacher: str | Path) -> Path:
    """The Diffusers folder of a teacher given as the folder or as its ``transformer/``."""
    folder = transformer_folder(teacher)
    if folder is not None and folder.name == "transformer":
        return folder.parent
    return Path(teacher)


def with_teacher_defaults(settings: dict[str, Any]) -> dict[str, Any]:
    """``settings`` (gpd_train.config.load.read_settings: the values given, before the rules)
    with a Diffusers teacher's defaults: task 'i2v' for an image-to-video folder unless a task
    was given; when no preset was given, the preset of that shape, else Wan's shift and CFG
    scale where those were not given either.

    The model's shape comes from the folder (gpd_train.run.folder); the preset only picks shift
    and CFG defaults, and the tiny preset's (made for the built-in RGB set) would be wrong.
    """
    teacher = settings.get("teacher")
    shape = teacher_dit_config(teacher) if isinstance(teacher, str) else None
    if shape is not None and shape.image_to_video and "task" not in settings:
        settings = {**settings, "task": "i2v"}  # an I2V folder's run is image-to-video
    if shape is None or "preset" in settings:
        return settings
    matching = [name for name, preset in PRESETS.items() if preset == shape]
    if matching:
        return {**settings, "preset": matching[0]}
    return {"shift": DEFAULT_SHIFT, "guidance": DEFAULT_GUIDANCE, **settings}
