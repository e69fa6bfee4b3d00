"""A Wan2.1-T2V-Diffusers folder (e.g. Wan-AI/Wan2.1-T2V-1.3B-Diffusers) as the trainer sees it.

Layout (what diffusers' ``WanPipeline.from_pretrained`` reads)::

    model_index.json
    text_encoder/   config.json + weights      transformers' UMT5EncoderModel (umT5-XXL)
    tokenizer/      tokenizer.json + config    the umT5 tokenizer
    transformer/    config.json + weights      WanTransformer3DModel (the teacher)
    vae/            config.json + weights      AutoencoderKLWan
    scheduler/      scheduler_config.json

Only the components a command uses are required; a missing one is an error naming the path.
"""

from __future__ import annotations

import json
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


def teacher_dit_config(path: str | Path | None) -> DiTConfig | None:
    """The DiT configuration of a diffusers teacher folder, None for other checkpoints."""
    folder = None if path is None else transformer_folder(path)
    return None if folder is None else config_from_diffusers(folder)


def diffusers_root(teacher: str | Path) -> Path:
    """The Diffusers folder of a teacher given as the folder or as its ``transformer/``."""
    folder = transformer_folder(teacher)
    if folder is not None and folder.name == "transformer":
        return folder.parent
    return Path(teacher)


def with_teacher_defaults(settings: dict[str, Any]) -> dict[str, Any]:
    """``settings`` (gpd_train.config.settings.read_settings: the values given, before the rules)
    with a Diffusers teacher's defaults when no preset was given: the preset of that shape,
    else Wan's shift and CFG scale where those were not given either.

    The model's shape comes from the folder (gpd_train.run.folder); the preset only picks shift
    and CFG defaults, and the tiny preset's (made for the built-in RGB set) would be wrong.
    """
    teacher = settings.get("teacher")
    shape = teacher_dit_config(teacher) if isinstance(teacher, str) else None
    if shape is None or "preset" in settings:
        return settings
    matching = [name for name, preset in PRESETS.items() if preset == shape]
    if matching:
        return {**settings, "preset": matching[0]}
    return {"shift": DEFAULT_SHIFT, "guidance": DEFAULT_GUIDANCE, **settings}
