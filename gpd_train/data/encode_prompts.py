"""Encode a prompts file with a Wan2.1 folder's umT5 into a prompt-embedding data set.

    python -m gpd_train.encode_prompts --model Wan2.1-T2V-1.3B-Diffusers \\
        --prompts prompts.txt --out data/

``--prompts`` is UTF-8 text, one prompt per line (row i of the data set is line i + 1;
blank lines are refused so that rows and lines never drift apart). Each prompt is cleaned
and tokenised as diffusers' WanPipeline does (ftfy when installed, HTML entities
unescaped, whitespace collapsed; padded or truncated to 512 tokens, end-of-sequence token
appended), encoded with the attention mask, and the positions after the prompt's tokens
are set to zero, as Wan's reference code and WanPipeline feed them to the DiT.

Output (the layout of gpd_train/data/embeddings.py, read by ``--data``): ``shard-NNNNN.safetensors``
with ``context`` [N, 512, text_dim] (bf16 by default) and metadata ``latent_shape`` (the
noise shape for ``--height/--width/--frames`` through the VAE's compression), ``prompts``
(the texts, JSON) and ``prompts_sha256``; ``negative.safetensors`` with the encoded
negative prompt [1, 512, text_dim]. Re-running skips shards already written for the same
prompts (each shard is written to a temporary file and renamed, so a killed run leaves
only whole shards); a shard written for other prompts, another latent shape (video
size) or another ``--dtype`` is an error, never overwritten. ``--out`` follows the rule of
every gpd_train output (gpd_train/run/destination.py): a new or empty folder, or a data set
this command wrote.

Image-to-video folders (Wan2.1-I2V, Wan2.2-I2V): ``--images FILE`` gives one image path per
line, line i for prompt i (relative paths are read from FILE's folder); each image becomes
the row's ``image_latent`` (and, Wan2.1-I2V, ``image_tokens``) at ``--height/--width/--frames``
as diffusers' WanImageToVideoPipeline builds them (gpd_train/data/image_condition.py), stored
beside ``context`` in the same shards; a Wan2.2-TI2V folder (text- and image-to-video) stores
``first_frames`` instead, and takes ``--images`` or not. An I2V folder without ``--images``, a
text-to-video folder with them, a missing or unreadable image and a video size that is not a
multiple of the VAE stride times the patch (16 for Wan) are refused before anything is encoded.

Negative prompt: ``--negative TEXT``; by default the empty string, which is what WanPipeline
uses when it is given none. Wan2.1's own sampling scripts use this one (its English
translation is in diffusers' WanPipeline example):
    色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走
(``--negative wan`` selects it).
"""

from __future__ import annotations

import argparse
import hashlib
import html
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from tqdm import tqdm

from gpd_train.config.checks import check_device, resolve_device
from gpd_train.config.settings import RunConfig
from gpd_train.data.image_condition import (
    ImageConditioner,
    check_image_model,
    check_images,
    folder_model,
    image_sha256,
)
from gpd_train.errors import GPDError
from gpd_train.run.destination import DATA, check_destination, claim
from gpd_train.run.files import save_weights
from gpd_train.run.wan_folder import (
    WanFolderError,
    component,
    diffusers_root,
    transformer_folder,
)
from gpd_train.run.writes import COMMAND_ERRORS, command_failed

MAX_TOKENS = 512  # Wan2.1's text length: WanPipeline's max_sequence_length default
WAN_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，"
    "低质量，JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，"
    "毁容的，形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
STORED = {"BF16": "bf16", "F16": "fp16", "F32": "fp32"}  # safetensors' names of DTYPES
VIDEO_DEFAULTS = {"height": 480, "width": 832, "frames": 81}  # WanPipeline's defaults


class EncodeError(GPDError, ValueError):
    """A user-facing problem with the prompts, the model folder or the output folder."""


def read_prompts(path: str | Path, what: str = "prompt") -> list[str]:
    """The ``what``s (prompts) of a UTF-8 file, one per line; empty files and blank lines are
    errors."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise EncodeError(f"{what}s file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise EncodeError(f"cannot read {what}s file {path} as UTF-8 text: {exc}") from None
    if not any(line.strip() for line in lines):
        raise EncodeError(f"{what}s file {path} is empty: expected one {what} per line")
    blank = [number for number, line in enumerate(lines, 1) if not line.strip()]
    if blank:
        shown = ", ".join(map(str, blank[:10])) + (" ..." if len(blank) > 10 else "")
        raise EncodeError(f"{what}s file {path} has blank lines ({shown}): one {what} per line, "
                          "no blank lines (row i of the data set is line i + 1); remove them, "
                          f"e.g. `sed -i '/^[[:space:]]*$/d' {path}`")
    return lines


def read_image_list(path: str | Path, count: int) -> list[Path]:
    """The image paths of an images file, one per line for each of ``count`` prompts (line i
    is prompt i's image); relative paths are read from the file's folder. Every image is
    opened here, before any model is loaded."""
    path = Path(path)
    lines = read_prompts(path, what="image")
    if len(lines) != count:
        raise EncodeError(f"images file {path} has {len(lines)} lines, expected {count} (one "
                          "image per prompt, line i for prompt i)")
    paths = [path.parent / line.strip() for line in lines]
    check_images(paths)
    return paths


def clean_prompt(text: str) -> str:
    """Wan's clean-up: mojibake fixed (ftfy if installed), HTML unescaped, spaces collapsed."""
    try:
        import ftfy  # optional in WanPipeline too: installed by the `real` extra

        text = ftfy.fix_text(text)
    except ImportError:
        pass
    # Twice, as Wan does: prompts scraped from the web are often escaped twice.
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


class TextEncoder:
    """The umT5 tokenizer and encoder of a Wan2.1-T2V-Diffusers folder."""

    def __init__(self, model_dir: str | Path, device: str = "auto",
                 dtype: torch.dtype | None = None) -> None:
        try:
            from transformers import AutoTokenizer, UMT5EncoderModel
        except ImportError:
            raise EncodeError("prompt encoding needs transformers: pip install -e '.[real]'") \
                from None
        tokenizer_dir = component(model_dir, "tokenizer")
        encoder_dir = component(model_dir, "text_encoder")
        self.device = resolve_device(device)
        # Wan runs umT5 in bf16 on GPUs; the CPU keeps fp32 (bf16 matmuls are slow there).
        self.dtype = dtype or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
            self.model = UMT5EncoderModel.from_pretrained(str(encoder_dir), dtype=self.dtype)
        except (OSError, ValueError) as exc:
            raise WanFolderError(f"cannot load the text encoder from {model_dir}: {exc}") from None
        self.model.to(self.device).eval().requires_grad_(False)
        self.text_dim = int(self.model.config.d_model)

    @torch.no_grad()
    def encode(self, prompts: list[str], max_tokens: int = MAX_TOKENS) -> torch.Tensor:
        """[B, max_tokens, text_dim] in the encoder's dtype, zero after each prompt's tokens."""
        tokens = self.tokenizer([clean_prompt(p) for p in prompts], padding="max_length",
                                max_length=max_tokens, truncation=True, add_special_tokens=True,
                                return_attention_mask=True, return_tensors="pt")
        mask = tokens.attention_mask.to(self.device)
        hidden = self.model(tokens.input_ids.to(self.device), attention_mask=mask).last_hidden_state
        # The encoder writes values at padded positions too; Wan cuts each prompt to its
        # length and pads with zeros, which the DiT's cross-attention then sees.
        return hidden * (mask > 0).unsqueeze(-1).to(hidden.dtype)


WAN_PATCH = (1, 2, 2)  # every Wan transformer's (t, h, w) patch: for a folder without one


def _patch(model_dir: str | Path) -> tuple[int, int, int]:
    """The (t, h, w) patch of the folder's transformer, Wan's where it has none."""
    folder = transformer_folder(model_dir)
    if folder is None:
        return WAN_PATCH
    try:
        return tuple(json.loads((folder / "config.json").read_text()).get("patch_size",
                                                                         WAN_PATCH))
    except (OSError, ValueError) as exc:
        raise WanFolderError(f"cannot read {folder / 'config.json'}: {exc}") from None


def latent_shape_for(model_dir: str | Path, height: int, width: int, frames: int) -> str:
    """'C,T,H,W' of the noise for a video of this size, from the folder's VAE config; a size
    the VAE cannot encode, or whose latent the transformer's patch does not tile (height and
    width multiples of 16 at Wan2.1's 8x VAE, of 32 at Wan2.2-TI2V's 16x), is refused."""
    vae_config = component(model_dir, "vae") / "config.json"
    raw = json.loads(vae_config.read_text())
    temporal = int(raw.get("scale_factor_temporal") or 4)
    spatial = int(raw.get("scale_factor_spatial") or 8)
    _, ph, pw = _patch(model_dir)
    step_h, step_w = spatial * ph, spatial * pw
    if (frames - 1) % temporal or height % step_h or width % step_w \
            or min(height, width, frames) < 1:
        fit = " x ".join(str(v) for v in (max(1, (frames - 1) // temporal * temporal + 1),
                                          max(step_h, height // step_h * step_h),
                                          max(step_w, width // step_w * step_w)))
        raise EncodeError(f"video size {frames} frames x {height} x {width} does not fit the VAE "
                          f"({vae_config}): frames must be {temporal}k + 1, height a multiple "
                          f"of {step_h} and width of {step_w} (its {spatial}x compression times "
                          f"the transformer's {ph} x {pw} patch; Wan 480p: 81 x 480 x 832); give "
                          f"--frames/--height/--width, e.g. {fit}")
    return f"{raw['z_dim']},{(frames - 1) // temporal + 1},{height // spatial},{width // spatial}"


def _digest(texts: list[str], images: list[Path] | None = None) -> str:
    """What a shard was encoded from: its prompts and (image-to-video) its images' bytes."""
    rows: list[Any] = texts if images is None else [
        [text, image_sha256(image)] for text, image in zip(texts, images, strict=True)]
    return hashlib.sha256(json.dumps(rows, ensure_ascii=False).encode()).hexdigest()


def _written_for(path: Path) -> dict[str, str] | None:
    """The metadata of a finished shard: its prompts digest and latent shape, and its
    ``dtype`` (a --dtype name) as stored (None when unreadable)."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            stored = handle.get_slice("context").get_dtype()
            return {**(handle.metadata() or {}), "dtype": STORED.get(stored, stored)}
    except (SafetensorError, OSError):
        return None


def _write(path: Path, texts: list[str], tensors: dict[str, torch.Tensor],
           metadata: dict[str, str], images: list[Path] | None) -> None:
    if images is not None:
        metadata = {**metadata, "images": json.dumps([str(i) for i in images])}
    save_weights(path, tensors, {
        **metadata, "prompts": json.dumps(texts, ensure_ascii=False),
        "prompts_sha256": _digest(texts, images)})


def encode_to_folder(model_dir: str | Path, prompts: list[str], out: str | Path, *,
                     negative: str = "", latent_shape: str, shard_size: int = 128,
                     batch_size: int = 8, dtype: str = "bf16", device: str = "auto",
                     progress: bool = True, flag: str = "--out",
                     images: list[Path] | None = None,
                     video: tuple[int, int, int] | None = None) -> int:
    """Write the data set for ``prompts`` into ``out`` (resumable); returns how many shards
    (the negative prompt's included) were written, 0 when all were there already. ``flag``
    is the option that chose ``out``, named in the remedies (the trainer's: --run-dir).
    ``images`` (one per prompt, image-to-video) are encoded at ``video`` = (height, width,
    frames) into each row's ``image_latent`` (Wan2.2-TI2V: ``first_frames``) and, Wan2.1-I2V,
    ``image_tokens``."""
    if dtype not in DTYPES:
        raise EncodeError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    for name, value in (("shard_size", shard_size), ("batch_size", batch_size)):
        if value < 1:
            raise EncodeError(f"{name} must be >= 1, got {value}")
    if not prompts:
        raise EncodeError("no prompts to encode")
    if images is not None and (len(images) != len(prompts) or video is None):
        raise EncodeError(f"{len(images)} images for {len(prompts)} prompts (and video size "
                          f"{video}): give one image per prompt and the video size")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    jobs: list[tuple[Path, list[str], list[Path] | None]] = [
        (out / f"shard-{k:05d}.safetensors", prompts[begin:begin + shard_size],
         None if images is None else images[begin:begin + shard_size])
        for k, begin in enumerate(range(0, len(prompts), shard_size))]
    jobs.append((out / "negative.safetensors", [negative], None))  # text only: Wan's I2V CFG
    todo = []
    for path, texts, shard_images in jobs:
        found = _written_for(path) if path.exists() else None
        if path.exists() and (found or {}).get("prompts_sha256") != _digest(texts, shard_images):
            raise EncodeError(f"{path} exists but was written for other prompts (or is "
                              f"unreadable); use another {flag}, or delete {path} to re-encode")
        # The shape of the noise the shards are trained with: another video size (--height,
        # --width, --frames) needs other shards, never the old ones relabelled.
        written_shape = (found or {}).get("latent_shape")
        if path.name != "negative.safetensors" and found and written_shape != latent_shape:
            raise EncodeError(f"{out} holds shards encoded for latent shape {written_shape} "
                              f"({path}); this video size needs {latent_shape}: use another "
                              f"{flag}, or give the original --height/--width/--frames")
        if found and found["dtype"] != dtype:
            # The trainer encodes as bf16 and has no --dtype: it can train on the set as is.
            remedy = (f"give --dtype {found['dtype']} to use them, or another --out for a "
                      f"{dtype} set" if flag == "--out" else
                      f"drop --prompts and pass --data {out} to train on them, or use another "
                      f"{flag}")
            raise EncodeError(f"{out} holds shards stored as {found['dtype']} ({path}); this "
                              f"run asks for {dtype}: {remedy}")
        if not path.exists():
            todo.append((path, texts, shard_images))
    if not todo:
        return 0
    claim(out, DATA)
    encoder = TextEncoder(model_dir, device)
    conditioner = None if images is None else ImageConditioner(model_dir, device)
    metadata = {"latent_shape": latent_shape, "text_encoder": str(Path(model_dir).resolve()),
                "max_tokens": str(MAX_TOKENS)}
    bar = tqdm(total=sum(len(texts) for _, texts, _ in todo), desc="encode", unit="prompt",
               disable=not progress)
    for path, texts, shard_images in todo:
        parts: dict[str, list[torch.Tensor]] = {}
        for begin in range(0, len(texts), batch_size):
            batch = {"context": encoder.encode(texts[begin:begin + batch_size])}
            if conditioner is not None and shard_images is not None:
                assert video is not None  # checked above
                latent, tokens = conditioner.encode(shard_images[begin:begin + batch_size],
                                                    *video)
                batch[conditioner.latent_name] = latent
                if tokens is not None:
                    batch["image_tokens"] = tokens
            for name, tensor in batch.items():
                parts.setdefault(name, []).append(tensor.to(DTYPES[dtype]).cpu())
            bar.update(len(texts[begin:begin + batch_size]))
        _write(path, texts, {name: torch.cat(p) for name, p in parts.items()}, metadata,
               shard_images)
    bar.close()
    return len(todo)


def check_prompts_teacher(config: RunConfig) -> None:
    """The trainer's ``--prompts`` are text only: refused for an image-to-video teacher, and
    for a Wan2.2-TI2V one trained image-to-video (``--task i2v``)."""
    if config.prompts is None or config.teacher is None:
        return
    root = diffusers_root(config.teacher)
    if transformer_folder(root) is None:
        return
    cfg = folder_model(root)
    if cfg.image_to_video or (cfg.expand_timesteps and config.task == "i2v"):
        what = ("an image-to-video model" if cfg.image_to_video else
                "a Wan2.2-TI2V model trained here with --task i2v")
        raise EncodeError(f"--teacher {config.teacher} is {what}: --prompts "
                          "alone is text-only data; encode the prompts with their images, "
                          f"`python -m gpd_train.encode_prompts --model {root} --prompts "
                          f"{config.prompts} --images FILE --out DIR`, then train with --data DIR")


def encode_for_run(config: RunConfig, negative: str = "", height: int = VIDEO_DEFAULTS["height"],
                   width: int = VIDEO_DEFAULTS["width"],
                   frames: int = VIDEO_DEFAULTS["frames"]) -> str:
    """Encode ``config.prompts`` with the teacher folder's umT5 into the run folder (resumable).

    Returns the data-set folder, ``<run_dir>/prompt-embeddings`` (absolute), for ``config.data``.
    """
    folder = Path(os.path.abspath(config.run_dir)) / "prompt-embeddings"
    if config.data is not None and Path(os.path.abspath(config.data)) != folder:
        raise EncodeError(f"give either --data ({config.data}) or --prompts ({config.prompts}), "
                          f"not both: --prompts is encoded into {folder}")
    check_prompts_teacher(config)
    root = diffusers_root(config.teacher)
    shape = latent_shape_for(root, height, width, frames)
    encode_to_folder(root, read_prompts(config.prompts), folder, negative=negative,
                     latent_shape=shape, device=config.device, flag="--run-dir")
    return str(folder)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m gpd_train.encode_prompts",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="Wan2.1-T2V-Diffusers folder")
    parser.add_argument("--prompts", required=True, help="UTF-8 text file, one prompt per line")
    parser.add_argument("--images", help="image-to-video folders: a text file, one image path "
                                         "per line (line i: prompt i's first frame)")
    parser.add_argument("--out", required=True, help="data-set folder to write")
    parser.add_argument("--negative", default="",
                        help="negative prompt (default '' as WanPipeline; 'wan' = Wan's own)")
    parser.add_argument("--height", type=int, default=VIDEO_DEFAULTS["height"])
    parser.add_argument("--width", type=int, default=VIDEO_DEFAULTS["width"])
    parser.add_argument("--frames", type=int, default=VIDEO_DEFAULTS["frames"])
    parser.add_argument("--shard-size", type=int, default=128, help="prompts per shard")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per encoder call")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16",
                        help="storage dtype of the embeddings")
    parser.add_argument("--device", default="auto")
    return parser


def image_rows(model_dir: str | Path, images: str | Path | None, count: int,
               one_for_all: bool = False) -> list[Path] | None:
    """The image of each of ``count`` prompts (None: text only) from ``images``, an images
    file or (``one_for_all``) the one image of every prompt, checked against the folder's
    model before any work: an image-to-video folder needs them (and Wan2.1-I2V its image
    encoder), a text-to-video one refuses them (the video size: ``latent_shape_for``)."""
    if images is None and transformer_folder(model_dir) is None:
        return None  # a text-encoder folder: nothing says it is image-to-video
    check_image_model(model_dir, images=images is not None)
    if images is None:
        return None
    if not one_for_all:
        return read_image_list(images, count)
    check_images([Path(images)])
    return [Path(images)] * count


def negative_text(value: str) -> str:
    return WAN_NEGATIVE_PROMPT if value == "wan" else value


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        try:
            check_device(args.device)
        except ValueError as exc:
            raise EncodeError(str(exc)) from None
        check_destination("--out", args.out, DATA)
        out = Path(os.path.abspath(args.out))
        prompts = read_prompts(args.prompts)
        shape = latent_shape_for(args.model, args.height, args.width, args.frames)
        images = image_rows(args.model, args.images, len(prompts))
        written = encode_to_folder(args.model, prompts, out,
                                   negative=negative_text(args.negative), latent_shape=shape,
                                   shard_size=args.shard_size, batch_size=args.batch_size,
                                   dtype=args.dtype, device=args.device, images=images,
                                   video=(args.height, args.width, args.frames))
    except COMMAND_ERRORS as exc:  # e.g. a full disk: one line naming the file
        return command_failed(exc, args.out)
    done = (f"encoded {len(prompts)} prompts -> {out}" if written else
            f"{out} already holds these {len(prompts)} prompts, encoded as {args.dtype}")
    print(f"{done} (latent shape {shape}); train with "
          f"`python -m gpd_train --teacher {args.model} --data {out}`")
    return 0


if __name__ == "__main__":
    sys.exit(main())
