"""Safetensors checkpoints in the original Wan2.1 and the diffusers key layouts.

Text-to-video and image-to-video models: Wan2.1-I2V's image embedder and image keys/values
(``img_emb.*``, ``cross_attn.k_img``; diffusers' ``condition_embedder.image_embedder.*``,
``attn2.add_k_proj``) are in the maps of models with ``image_dim`` set.

Our parameters fuse self-attention q/k/v and cross-attention k/v into one matrix each;
the key maps below say which external tensors are concatenated (along dim 0) to form
each of our parameters, so loading and exporting are the same table read both ways.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import DiTConfig
from .errors import GPDError
from .guidance import has_guidance_input

FORMATS = ("wan", "diffusers")
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
DIFFUSERS_CONFIG = "config.json"

# (our name, wan names, diffusers names) of the tensors whose name ends in .weight and .bias
_LINEAR_LIKE_TOP = (
    ("patch_embedding", ("patch_embedding",), ("patch_embedding",)),
    ("text_embedding.0", ("text_embedding.0",), ("condition_embedder.text_embedder.linear_1",)),
    ("text_embedding.2", ("text_embedding.2",), ("condition_embedder.text_embedder.linear_2",)),
    ("time_embedding.0", ("time_embedding.0",), ("condition_embedder.time_embedder.linear_1",)),
    ("time_embedding.2", ("time_embedding.2",), ("condition_embedder.time_embedder.linear_2",)),
    ("time_projection.1", ("time_projection.1",), ("condition_embedder.time_proj",)),
    ("head.head", ("head.head",), ("proj_out",)),
)
_LINEAR_LIKE_BLOCK = (
    ("self_attn.qkv", ("self_attn.q", "self_attn.k", "self_attn.v"),
     ("attn1.to_q", "attn1.to_k", "attn1.to_v")),
    ("self_attn.o", ("self_attn.o",), ("attn1.to_out.0",)),
    ("cross_attn.q", ("cross_attn.q",), ("attn2.to_q",)),
    ("cross_attn.kv", ("cross_attn.k", "cross_attn.v"), ("attn2.to_k", "attn2.to_v")),
    ("cross_attn.o", ("cross_attn.o",), ("attn2.to_out.0",)),
    # Wan's norm3 is the cross-attention LayerNorm; diffusers calls the same one norm2.
    ("norm3", ("norm3",), ("norm2",)),
    ("ffn.0", ("ffn.0",), ("ffn.net.0.proj",)),
    ("ffn.2", ("ffn.2",), ("ffn.net.2",)),
)
# The Wan2.1-I2V parts. Wan's img_emb.proj is Sequential(LayerNorm, Linear, GELU, Linear,
# LayerNorm), so index 2 (the GELU) has no tensors.
_LINEAR_LIKE_IMAGE_TOP = (
    ("image_embedding.0", ("img_emb.proj.0",), ("condition_embedder.image_embedder.norm1",)),
    ("image_embedding.1", ("img_emb.proj.1",),
     ("condition_embedder.image_embedder.ff.net.0.proj",)),
    ("image_embedding.3", ("img_emb.proj.3",), ("condition_embedder.image_embedder.ff.net.2",)),
    ("image_embedding.4", ("img_emb.proj.4",), ("condition_embedder.image_embedder.norm2",)),
)
_LINEAR_LIKE_IMAGE_BLOCK = (
    ("cross_attn.kv_img", ("cross_attn.k_img", "cross_attn.v_img"),
     ("attn2.add_k_proj", "attn2.add_v_proj")),
)
_SINGLE_IMAGE_BLOCK = (
    ("cross_attn.norm_k_img.weight", "cross_attn.norm_k_img.weight", "attn2.norm_added_k.weight"),
)
# diffusers' first Wan2.1-I2V conversions hold an unused query norm of the image branch;
# diffusers skips it on load (WanTransformer3DModel._keys_to_ignore_on_load_unexpected).
_IGNORED_DIFFUSERS_IMAGE_BLOCK = ("attn2.norm_added_q.weight",)
# Keys only the first-last-frame variant (FLF2V, diffusers' pos_embed_seq_len) has.
_FLF2V_KEYS = ("img_emb.emb_pos", "condition_embedder.image_embedder.pos_embed")
_FLF2V_REFUSAL = ("Wan2.1-FLF2V (first-last-frame, pos_embed_seq_len) is not supported; "
                  "image-to-video models are Wan2.1-I2V and Wan2.2-I2V")

# (our name, wan name, diffusers name) of single tensors
_SINGLE_TOP = (("head.modulation", "head.modulation", "scale_shift_table"),)
_SINGLE_BLOCK = (
    ("modulation", "modulation", "scale_shift_table"),
    ("self_attn.norm_q.weight", "self_attn.norm_q.weight", "attn1.norm_q.weight"),
    ("self_attn.norm_k.weight", "self_attn.norm_k.weight", "attn1.norm_k.weight"),
    ("cross_attn.norm_q.weight", "cross_attn.norm_q.weight", "attn2.norm_q.weight"),
    ("cross_attn.norm_k.weight", "cross_attn.norm_k.weight", "attn2.norm_k.weight"),
)


class CheckpointError(GPDError, ValueError):
    """A checkpoint that cannot be read or does not match the model."""


def _check_format(fmt: str) -> int:
    if fmt not in FORMATS:
        raise ValueError(f"unknown checkpoint format {fmt!r}; expected one of {FORMATS}")
    return FORMATS.index(fmt)


def key_map(num_layers: int, fmt: str, *, image: bool = False) -> dict[str, tuple[str, ...]]:
    """Our parameter name -> external tensor names (concatenated along dim 0) in ``fmt``;
    ``image``: with the Wan2.1-I2V image embedder and image keys/values."""
    column = _check_format(fmt)
    mapping: dict[str, tuple[str, ...]] = {}

    def add(prefix: str, linear_like: tuple, single: tuple) -> None:
        for ours, *external in linear_like:
            for suffix in (".weight", ".bias"):
                mapping[prefix + ours + suffix] = tuple(
                    prefix + name + suffix for name in external[column]
                )
        for ours, *external in single:
            mapping[prefix + ours] = (prefix + external[column],)

    add("", _LINEAR_LIKE_TOP, _SINGLE_TOP)
    if image:
        add("", _LINEAR_LIKE_IMAGE_TOP, ())
    for index in range(num_layers):
        add(f"blocks.{index}.", _LINEAR_LIKE_BLOCK, _SINGLE_BLOCK)
        if image:
            add(f"blocks.{index}.", _LINEAR_LIKE_IMAGE_BLOCK, _SINGLE_IMAGE_BLOCK)
    return mapping


def _model_key_map(cfg: DiTConfig, fmt: str) -> dict[str, tuple[str, ...]]:
    return key_map(cfg.num_layers, fmt, image=cfg.image_dim is not None)


def detect_format(keys: list[str] | set[str]) -> str:
    """'wan' or 'diffusers', judged from marker keys only one of the layouts has."""
    keys = set(keys)
    diffusers = any(k.startswith("condition_embedder.") or ".attn1." in k for k in keys)
    wan = any(k.startswith("text_embedding.") or ".self_attn." in k for k in keys)
    if diffusers == wan:
        sample = sorted(keys)[:5]
        raise CheckpointError(
            "cannot tell the checkpoint format: expected Wan keys (e.g. 'blocks.0.self_attn.q."
            "weight') or diffusers keys (e.g. 'blocks.0.attn1.to_q.weight'), "
            f"found {'both' if wan else 'neither'}; first keys: {sample}"
        )
    return "diffusers" if diffusers else "wan"


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError) as error:
        raise CheckpointError(
            f"could not read safetensors file {path} (truncated or corrupt?): {error}"
        ) from error


def _read_sharded(index_path: Path) -> dict[str, torch.Tensor]:
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CheckpointError(
            f"could not read shard index {index_path}: expected JSON with a 'weight_map' ({error})"
        ) from error
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        shard_path = index_path.parent / shard
        if not shard_path.is_file():
            raise CheckpointError(f"shard {shard_path} named in {index_path} does not exist")
        state.update(_read_safetensors(shard_path))
    listed, found = set(weight_map), set(state)
    if listed != found:
        raise CheckpointError(
            f"shards of {index_path} disagree with its weight_map: listed but absent "
            f"{sorted(listed - found)}, present but unlisted {sorted(found - listed)}"
        )
    return state


def _resolve(path: Path) -> Path:
    if path.is_file():
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint path {path} does not exist")
    indexes = sorted(path.glob("*.safetensors.index.json"))
    files = sorted(path.glob("*.safetensors"))
    if len(indexes) == 1:
        return indexes[0]
    if not indexes and len(files) == 1:
        return files[0]
    raise CheckpointError(
        f"checkpoint folder {path} must hold one *.safetensors.index.json or one *.safetensors "
        f"file, found indexes {[p.name for p in indexes]} and files {[p.name for p in files]}"
    )


def read_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], str]:
    """Read a safetensors file, a folder, or a sharded ``*.index.json``; return (tensors, fmt)."""
    resolved = _resolve(Path(path))
    if resolved.name.endswith(".json"):
        state = _read_sharded(resolved)
    else:
        state = _read_safetensors(resolved)
    if not state:
        raise CheckpointError(f"checkpoint {resolved} holds no tensors")
    return state, detect_format(state.keys())


def convert_state_dict(
    state: dict[str, torch.Tensor], fmt: str, model: nn.Module
) -> dict[str, torch.Tensor]:
    """External ``state`` in ``fmt`` -> our names; every problem is reported in one error."""
    flf2v = sorted(k for k in state if k.endswith(_FLF2V_KEYS))
    if flf2v:
        raise CheckpointError(f"checkpoint holds {flf2v[0]}: {_FLF2V_REFUSAL}")
    cfg = _model_config(model)
    ours = model.state_dict()
    mapping = _model_key_map(cfg, fmt)
    expected = {name for sources in mapping.values() for name in sources}
    ignored = set()
    if fmt == "diffusers" and cfg.image_dim is not None:
        ignored = {f"blocks.{index}.{name}" for index in range(cfg.num_layers)
                   for name in _IGNORED_DIFFUSERS_IMAGE_BLOCK}
    missing = sorted(expected - state.keys())
    unexpected = sorted(state.keys() - expected - ignored)
    misshaped, wrong_dtype, converted = [], [], {}
    for name, sources in mapping.items():
        if any(source not in state for source in sources):
            continue
        target = ours[name].shape
        rows = target[0] // len(sources) if target else 0
        want = (rows, *target[1:]) if len(sources) > 1 else tuple(target)
        for source in sources:
            tensor = state[source]
            if not tensor.is_floating_point():
                wrong_dtype.append(f"{source}: {tensor.dtype}")
            elif tuple(tensor.shape) != want:
                misshaped.append(f"{source}: expected {list(want)}, got {list(tensor.shape)}")
        parts = [state[source] for source in sources]
        converted[name] = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
    problems = [
        f"{label} ({len(items)}): {items}"
        for label, items in (("missing keys", missing), ("unexpected keys", unexpected),
                             ("mis-shaped keys", misshaped), ("non-float tensors", wrong_dtype))
        if items
    ]
    if problems:
        raise CheckpointError(
            f"checkpoint ({fmt} format) does not match the model; nothing was loaded. "
            + "; ".join(problems)
        )
    return converted


def _model_config(model: nn.Module) -> DiTConfig:
    cfg = getattr(model, "cfg", None)
    if not isinstance(cfg, DiTConfig):
        raise TypeError(f"expected a WanDiT (with a DiTConfig .cfg), got {type(model).__name__}")
    return cfg


def load_checkpoint(model: nn.Module, path: str | Path) -> str:
    """Load a Wan- or diffusers-format checkpoint into ``model``, all or nothing; return fmt."""
    state, fmt = read_state_dict(path)
    converted = convert_state_dict(state, fmt, model)
    model.load_state_dict(converted, strict=True)
    return fmt


def export_state_dict(model: nn.Module, fmt: str) -> dict[str, torch.Tensor]:
    """Our weights under ``fmt``'s names, fused matrices split back into their parts."""
    if has_guidance_input(model):
        raise CheckpointError(
            "this model has a guidance input, which Wan2.1 checkpoints cannot hold; fold it at "
            "the CFG scale to export first: gpd_model.fold_guidance(model, w)"
        )
    ours = model.state_dict()
    exported = {}
    for name, sources in _model_key_map(_model_config(model), fmt).items():
        for source, part in zip(sources, ours[name].chunk(len(sources), dim=0), strict=True):
            exported[source] = part.detach().contiguous().clone()
    return exported


def diffusers_config(cfg: DiTConfig) -> dict[str, object]:
    """The ``config.json`` fields of diffusers' WanTransformer3DModel for ``cfg``."""
    if cfg.rope_theta != 10000.0:
        raise ValueError(
            "diffusers' WanTransformer3DModel has RoPE theta 10000, "
            f"got rope_theta={cfg.rope_theta}"
        )
    return {
        "_class_name": "WanTransformer3DModel",
        "patch_size": list(cfg.patch_size),
        "num_attention_heads": cfg.num_heads,
        "attention_head_dim": cfg.head_dim,
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "text_dim": cfg.text_dim,
        "freq_dim": cfg.freq_dim,
        "ffn_dim": cfg.ffn_dim,
        "num_layers": cfg.num_layers,
        "cross_attn_norm": True,
        "qk_norm": "rms_norm_across_heads",
        "eps": cfg.eps,
        "image_dim": cfg.image_dim,
        # The image keys/values project the embedded image tokens, which have the model width.
        "added_kv_proj_dim": None if cfg.image_dim is None else cfg.dim,
        "rope_max_seq_len": 1024,
        "pos_embed_seq_len": None,
    }


def _pipeline_expand_timesteps(config_path: Path) -> bool:
    """``expand_timesteps`` of the Diffusers pipeline folder holding this transformer config
    (``<pipeline>/transformer/config.json``; Wan2.2-TI2V's model_index.json says true): the
    transformer's own config has no such field. False outside a pipeline folder."""
    index = config_path.parent.parent / "model_index.json"
    if not index.is_file():
        return False
    try:
        value = json.loads(index.read_text()).get("expand_timesteps", False)
    except (OSError, ValueError, AttributeError) as error:
        raise CheckpointError(f"could not read {index}: {error}") from error
    if not isinstance(value, bool):
        raise CheckpointError(f"{index}: expand_timesteps must be true or false, got {value!r}")
    return value


def config_from_diffusers(path: str | Path) -> DiTConfig:
    """DiTConfig from a diffusers ``config.json`` (or the folder holding it); inside a
    pipeline folder, ``expand_timesteps`` from its model_index.json."""
    path = Path(path)
    if path.is_dir():
        path = path / DIFFUSERS_CONFIG
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise CheckpointError(f"could not read diffusers config {path}: {error}") from error
    if raw.get("pos_embed_seq_len") is not None:
        raise CheckpointError(
            f"{path}: pos_embed_seq_len={raw['pos_embed_seq_len']!r}: {_FLF2V_REFUSAL}"
        )
    for field, supported in (("cross_attn_norm", True), ("qk_norm", "rms_norm_across_heads")):
        if raw.get(field, supported) != supported:
            raise CheckpointError(
                f"{path}: {field}={raw[field]!r} is not supported (Wan2.1 needs {supported!r})"
            )
    heads, head_dim = raw["num_attention_heads"], raw["attention_head_dim"]
    image_dim, added_kv = raw.get("image_dim"), raw.get("added_kv_proj_dim")
    # Wan2.1-I2V has both (the image keys/values read the embedded tokens, of the model
    # width); a text-to-video or Wan2.2-I2V model has neither.
    wanted_kv = None if image_dim is None else heads * head_dim
    if added_kv != wanted_kv:
        raise CheckpointError(
            f"{path}: added_kv_proj_dim={added_kv!r} with image_dim={image_dim!r} is not "
            f"supported (expected added_kv_proj_dim={wanted_kv!r}: set with image_dim, to "
            "num_attention_heads * attention_head_dim, as Wan2.1-I2V)"
        )
    return DiTConfig(
        in_channels=raw["in_channels"], out_channels=raw.get("out_channels") or raw["in_channels"],
        dim=heads * head_dim, ffn_dim=raw["ffn_dim"], num_heads=heads,
        num_layers=raw["num_layers"], text_dim=raw["text_dim"], freq_dim=raw["freq_dim"],
        patch_size=tuple(raw["patch_size"]), eps=raw.get("eps", 1e-6), image_dim=image_dim,
        expand_timesteps=_pipeline_expand_timesteps(path),
    )


def save_diffusers(model: nn.Module, folder: str | Path) -> Path:
    """Write ``folder`` with diffusers' weights file and config.json; return the folder."""
    config = diffusers_config(_model_config(model))
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(export_state_dict(model, "diffusers"), str(folder / DIFFUSERS_WEIGHTS),
              metadata={"format": "pt"})
    (folder / DIFFUSERS_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return folder

