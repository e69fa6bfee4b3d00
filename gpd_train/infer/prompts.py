"""The sampler's prompts: built-in ids, a data set's rows, an embeddings file, or text (and
images) encoded on the fly by ``--model``'s encoders (gpd_train.infer.sample's docstring
says which flags pick which)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from gpd_model import Conditioning, has_guidance_input
from gpd_train.data.datasets import open_data
from gpd_train.data.embeddings import PromptEmbeddingSet
from gpd_train.data.encode_prompts import (
    VIDEO_DEFAULTS,
    EncodeError,
    TextEncoder,
    image_rows,
    latent_shape_for,
    negative_text,
    read_prompts,
)
from gpd_train.data.image_condition import ImageConditioner, takes_image
from gpd_train.data.procedural import ProceduralVideos
from gpd_train.errors import ConfigError, SampleError
from gpd_train.run.loading import LoadedModel

DEFAULT_NUM = 4

@dataclass
class Prompts:
    cond: Conditioning  # text [N, L, text_dim]; image-to-video: the image slots too
    negative: Conditioning | None  # text [1, L, text_dim], the CFG pairs' unconditional prompt
    names: list[str]
    latent_shape: tuple[int, ...]
    built_in: bool


def _embeddings_file(path: Path, text_dim: int, latent_shape: str | None,
                     num: int, guided: bool) -> Prompts:
    try:
        with safe_open(str(path), framework="pt") as handle:
            keys = set(handle.keys())
            if "context" not in keys:
                raise SampleError(f"{path} has no 'context' tensor (expected [N, L, {text_dim}])")
            context = handle.get_tensor("context").float()
            negative = handle.get_tensor("negative").float() if "negative" in keys else None
            latent_shape = latent_shape or (handle.metadata() or {}).get("latent_shape")
    except (SafetensorError, OSError) as exc:
        raise SampleError(f"cannot read prompt embeddings {path}: {exc}") from None
    if context.dim() != 3 or context.shape[2] != text_dim or context.shape[0] < 1:
        raise SampleError(f"{path}: 'context' must be [N, L, {text_dim}] (the model's text_dim), "
                          f"got {tuple(context.shape)}")
    if latent_shape is None:
        raise SampleError(f"{path} has no latent_shape metadata: pass --latent-shape C,T,H,W")
    if guided and negative is None:
        raise SampleError(f"--guidance needs a 'negative' tensor [L, {text_dim}] in {path}")
    rows = [i % context.shape[0] for i in range(num)]
    if negative is not None:
        negative = Conditioning(negative.reshape(-1, context.shape[1], text_dim)[:1])
    return Prompts(Conditioning(context[rows]), negative, [f"row {i}" for i in rows],
                   parse_shape(latent_shape), built_in=False)


def parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(v) for v in str(text).split(","))
    except ValueError:
        shape = ()
    if len(shape) != 4 or min(shape) < 1:
        raise SampleError(f"latent shape must be four positive ints 'C,T,H,W', got {text!r}")
    return shape


def _from_data_set(data: ProceduralVideos | PromptEmbeddingSet, num: int,
                   prompt_ids: list[int] | None) -> Prompts:
    built_in = isinstance(data, ProceduralVideos)
    if prompt_ids is not None:
        if not built_in:
            raise SampleError("--prompts picks built-in prompts; with prompt embeddings the "
                              "first --num rows are used")
        bad = [p for p in prompt_ids if not 0 <= p < data.num_prompts]
        if bad:
            raise SampleError(f"--prompts ids must be in [0, {data.num_prompts}), got {bad}; "
                              f"0 is {data.prompt_name(0)!r}")
        ids = torch.tensor([prompt_ids[i % len(prompt_ids)] for i in range(num)])
        cond, names = Conditioning(data.context(ids)), [data.prompt_name(int(i)) for i in ids]
    else:
        cond, names = data.eval_prompts(num)
    return Prompts(cond.to(dtype=torch.float32), data.negative.to(dtype=torch.float32), names,
                   tuple(data.latent_shape), built_in)


def prompt_request(args: argparse.Namespace) -> tuple[list[int] | None, list[str] | None]:
    """(built-in prompt ids, text prompts) from --prompt and --prompts (ids or a file)."""
    if args.prompts is None:
        return None, args.prompt
    if args.prompt:
        raise SampleError("give --prompt TEXT or --prompts, not both")
    try:
        return [int(v) for v in args.prompts], None
    except ValueError:
        pass
    if len(args.prompts) != 1:
        raise SampleError("--prompts takes built-in prompt ids (numbers) or one prompts file, got "
                          f"{args.prompts}")
    try:
        return None, read_prompts(args.prompts[0])
    except EncodeError as exc:
        raise SampleError(str(exc)) from None


def image_paths(args: argparse.Namespace, texts: list[str] | None) -> list[Path] | None:
    """The image of each text prompt (--image, --images), checked against --model's
    transformer before any model is loaded: None for a text-to-video model."""
    if args.image is not None and args.images is not None:
        raise ConfigError("give --image PATH (one image for every prompt) or --images FILE "
                          "(one per prompt), not both")
    given = "--image" if args.image is not None else "--images" if args.images else None
    if given is not None and not texts:
        raise ConfigError(f"{given} conditions text prompts (--prompt, --prompts FILE, with "
                          "--model DIR, an image-to-video Wan folder): add them")
    if given is not None and args.latent_shape is not None:
        raise ConfigError(f"{given}: the image is encoded at --height/--width/--frames, which "
                          f"give the noise shape too; drop --latent-shape {args.latent_shape}")
    if not texts or args.model is None:
        return None
    return image_rows(args.model, args.image or args.images, len(texts),
                      one_for_all=args.image is not None)


def _encode_texts(texts: list[str], loaded: LoadedModel, args: argparse.Namespace) -> Prompts:
    """Text prompts through the umT5 of --model (with their images through its VAE and
    image encoder, image-to-video), cycled to --num rows."""
    if args.model is None:
        raise SampleError("text prompts are encoded by a Wan2.1 text encoder: pass --model DIR "
                          "(a Wan2.1-T2V-Diffusers folder)")
    cfg = loaded.model.cfg
    encoder = TextEncoder(args.model, args.device)
    if encoder.text_dim != cfg.text_dim:
        raise SampleError(f"the text encoder of {args.model} makes {encoder.text_dim}-d "
                          f"embeddings, the model takes text_dim {cfg.text_dim}")
    rows = [texts[i % len(texts)] for i in range(args.num)]
    unique = list(dict.fromkeys(rows))
    encoded = torch.cat([encoder.encode(unique[i:i + 8]).float().cpu()
                         for i in range(0, len(unique), 8)])
    context = encoded[[unique.index(text) for text in rows]]
    negative = None
    if _needs_negative(loaded, args):
        negative = Conditioning(
            encoder.encode([negative_text(args.negative or "")]).float().cpu())
    shape = parse_shape(latent_shape(args))
    images = image_paths(args, texts)  # checked in check_args; the same answer
    if images is None:  # an image-to-video model is refused by sample() then
        return Prompts(Conditioning(context), negative, rows, shape, built_in=False)
    if not takes_image(cfg):
        raise SampleError(f"{loaded.description} is a text-to-video model: --image/--images "
                          "condition an image-to-video (or Wan2.2-TI2V) one; drop them")
    size = _video_size(args)
    wanted = [images[i % len(texts)] for i in range(args.num)]
    unique_images = list(dict.fromkeys(wanted))
    conditioner = ImageConditioner(args.model, args.device)
    latent, tokens = conditioner.encode(
        unique_images, size["height"], size["width"], size["frames"])
    pick = [unique_images.index(path) for path in wanted]
    cond = Conditioning.from_tensors({
        "text": context, conditioner.latent_name: latent[pick],
        **({} if tokens is None else {"image_tokens": tokens[pick]})})
    return Prompts(cond, negative, rows, shape, built_in=False)


def _video_size(args: argparse.Namespace) -> dict[str, int]:
    """--height, --width, --frames, each Wan's 480p default when not given."""
    return {name: getattr(args, name) or default for name, default in VIDEO_DEFAULTS.items()}


def latent_shape(args: argparse.Namespace) -> str:
    """'C,T,H,W' of text prompts' noise: --latent-shape, else the video size through
    --model's VAE (a size it cannot encode is refused)."""
    return args.latent_shape or latent_shape_for(args.model, **_video_size(args))


def _needs_negative(loaded: LoadedModel, args: argparse.Namespace) -> bool:
    """CFG needs the negative prompt; a student taking w as an input does not."""
    return args.guidance is not None and not has_guidance_input(loaded.model)


def choose_prompts(loaded: LoadedModel, args: argparse.Namespace) -> Prompts:
    cfg = loaded.model.cfg
    ids, texts = prompt_request(args)
    if args.num is None:  # one video per text prompt, else a few
        args.num = len(texts) if texts else DEFAULT_NUM
    if texts:
        return _encode_texts(texts, loaded, args)
    if args.prompt_embeddings is not None:
        path = Path(args.prompt_embeddings)
        if path.is_dir():
            try:
                data_set = PromptEmbeddingSet(path, cfg.text_dim, cfg.out_channels)
                data_set.check_condition(cfg)
            except ValueError as exc:  # made for another model: channels, text_dim, layout
                raise SampleError(f"--prompt-embeddings {path}: {exc}") from None
            return _from_data_set(data_set, args.num, ids)
        if not path.is_file():
            raise SampleError(f"no prompt embeddings at {path}")
        return _embeddings_file(path, cfg.text_dim, args.latent_shape, args.num,
                                _needs_negative(loaded, args))
    run = loaded.run_config
    try:
        data = open_data(run.data if run else None, cfg, run.seed if run else 0,
                         run.task if run else "t2v")
    except ValueError as exc:
        raise SampleError(f"{exc} (or --prompt-embeddings FILE, or --prompt TEXT with "
                          "--model DIR)") from None
    return _from_data_set(data, args.num, ids)
