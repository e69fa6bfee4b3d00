"""Sample videos from a checkpoint: `python -m gpd_train.sample --checkpoint PATH ...`.

PATH may be a run folder (the last finished stage of `--chain`, or `--stage N`), a stage
folder or its `model.safetensors`, or an original-Wan / diffusers checkpoint (file, folder
or sharded index; give `--preset` unless the folder has a diffusers config.json).
A Wan2.2 A14B Diffusers folder samples through its two experts as WanPipeline does: each
step by `transformer/` while sigma >= the folder's `boundary_ratio`, by `transformer_2/`
below, guided by `--guidance` and `--guidance-2` (the low-noise expert's; default
`--guidance`); eager (a CUDA graph cannot hold the switch).
Prompts come from the built-in set (RGB models), the run's prompt-embedding data set, or
`--prompt-embeddings` (a data-set folder, or a safetensors file with `context` [N, L, D],
optional `negative` [L, D] and metadata `latent_shape` = "C,T,H,W").

Text prompts (`--prompt "..."`, repeatable, or `--prompts FILE`, one per line) are encoded
on the fly by the umT5 of `--model DIR` (a Wan2.1-T2V-Diffusers folder), padded to 512
tokens as WanPipeline does; the noise shape then follows `--height/--width/--frames`
(WanPipeline's defaults 480 x 832 x 81) through the folder's VAE. `--prompts 0 3` (numbers)
picks built-in prompts instead. An image-to-video model (a Wan I2V folder or a run trained
from one, with `--model` its folder) takes an image with each text prompt: `--image PATH`
(the same for every prompt) or `--images FILE` (one image path per line, line i for prompt
i), encoded as `encode_prompts --images` does (gpd_train/data/image_condition.py).

Writes `latents.safetensors` ([N, C, T, H, W] float32 plus the prompts' names in the
metadata), `summary.json`, and for the built-in set one GIF per video and a contact sheet.
`--out` must be a new or empty folder, or earlier samples replaced with `--overwrite` (moved
aside to `<out>.old-<time>/`); the folder is written whole, then renamed into place.
With `--vae DIR` (a VAE folder or a Diffusers folder with vae/) the latents are
de-normalised with the VAE config's latents_mean/std and decoded, as WanPipeline does, and
each video is written as H.264 MP4 at 16 fps (`--fps`); `--vae-tiling` and `--vae-slicing`
bound the decoder's memory. Sampling uses the CUDA-graph sampler on CUDA (`--eager` to
turn it off), eager Euler elsewhere.

Under `torchrun --nproc_per_node N`, `--sequence-parallel N` splits each video's tokens over
the N ranks (Ulysses attention, gpd_model.sequence_parallel; eager sampler only; both
experts of a Wan2.2 pair) and rank 0 writes the outputs.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from gpd_model import (
    CFG,
    PRESETS,
    Denoiser,
    DiTConfig,
    DiTDenoiser,
    ExpertPair,
    ExpertScales,
    fold_guidance,
    has_guidance_input,
    make_noise,
    sigma_grid,
)
from gpd_model.graph_sampler import GraphSampler
from gpd_train import parallel
from gpd_train.config.chains import add_chain_argument
from gpd_train.config.checks import check_device, check_number
from gpd_train.config.settings import DEFAULT_SHIFT, PRESET_SHIFT, SEED_MAX
from gpd_train.data.encode_prompts import VIDEO_DEFAULTS
from gpd_train.errors import ConfigError, SampleError
from gpd_train.infer.media import (
    WAN_FPS,
    decode_latents,
    load_vae,
    write_contact_sheet,
    write_gif,
    write_mp4,
)
from gpd_train.infer.prompts import (
    Prompts,
    choose_prompts,
    image_paths,
    latent_shape,
    parse_shape,
    prompt_request,
)
from gpd_train.run.destination import SAMPLES, check_destination, staged_output
from gpd_train.run.loading import LoadedModel, expert_boundary, load_model, recorded_grid
from gpd_train.run.preflight import check_environment, check_guidance_in_range
from gpd_train.run.writes import COMMAND_ERRORS, command_failed

DEFAULT_STEPS = 6  # a model without a stage record: the final student's step count


def _preset_shift(cfg: DiTConfig) -> float:
    """The trainer's default shift for the preset this config equals, else Wan's 480p."""
    names = [name for name, preset in PRESETS.items() if preset == cfg]
    return PRESET_SHIFT.get(names[0], DEFAULT_SHIFT) if names else DEFAULT_SHIFT


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def check_args(args: argparse.Namespace) -> None:
    """Every option checked before any model is loaded or video sampled (config.py's rules)."""
    for name in ("steps", "num", "batch_size", "fps", "height", "width", "frames"):
        if getattr(args, name) is not None:
            check_number(f"--{name.replace('_', '-')}", getattr(args, name), integer=True, low=1)
    if args.guidance is not None:
        check_number("--guidance", args.guidance, low=0, low_open=True)
    if args.guidance_2 is not None:
        _check_guidance_2(args)
    if args.shift is not None:
        check_number("--shift", args.shift, low=0, low_open=True)
    check_number("--seed", args.seed, integer=True, low=0, high=SEED_MAX)
    check_device(args.device)
    check_environment()
    check_destination("--out", args.out, SAMPLES, args.overwrite)
    _check_option_use(args)
    texts = prompt_request(args)[1]
    if texts and args.model is not None:
        latent_shape(args)  # the video size, before any model is loaded
    image_paths(args, texts)
    _check_sequence_parallel(args)


def _check_guidance_2(args: argparse.Namespace) -> None:
    """--guidance-2 guides the low-noise expert of a Wan2.2 folder, beside --guidance."""
    check_number("--guidance-2", args.guidance_2, low=0, low_open=True)
    if args.guidance is None:
        raise ConfigError(f"--guidance-2 {args.guidance_2:g} is the low-noise expert's CFG "
                          "scale beside --guidance W (the high-noise one's): add --guidance")
    if expert_boundary(args.checkpoint) is None:
        raise ConfigError(f"--guidance-2 is the low-noise expert's CFG scale of a Wan2.2 "
                          f"two-expert folder or run; {args.checkpoint} is one model: drop it")


def _check_sequence_parallel(args: argparse.Namespace) -> None:
    """--sequence-parallel N splits one video over the N processes torchrun starts (all of
    them by default), with the eager sampler (the CUDA-graph sampler captures a single-GPU
    forward)."""
    if args.sequence_parallel is not None:
        check_number("--sequence-parallel", args.sequence_parallel, integer=True, low=1)
    size = args.sequence_parallel or int(os.environ.get("WORLD_SIZE", "1"))
    if size > 1 and not args.eager and args.device != "cpu" and torch.cuda.is_available():
        raise ConfigError(f"splitting each video over {size} ranks (--sequence-parallel "
                          f"{size}) needs the eager sampler (the CUDA-graph sampler is "
                          "single-GPU): add --eager")


def _split_over_ranks(args: argparse.Namespace, *models: torch.nn.Module) -> None:
    """Under torchrun: every rank samples the same videos, each holding 1/N of the tokens
    in every model given (both experts of a Wan2.2 pair: every rank sees the same sigmas,
    so all switch experts at the same step)."""
    world = parallel.world()
    if not world.distributed:
        if (args.sequence_parallel or 1) > 1:  # refused with the torchrun command to use
            parallel.set_sequence(args.sequence_parallel, models[0].cfg.num_heads)
        return
    size = args.sequence_parallel or world.world_size
    if size != world.world_size:
        raise ConfigError(f"--sequence-parallel {size}: the sampler splits each video over all "
                          f"{world.world_size} processes torchrun started; pass "
                          f"--sequence-parallel {world.world_size} or --nproc_per_node {size}")
    for model in models:
        parallel.set_sequence(size, model.cfg.num_heads)  # checks each model's heads
        parallel.split_sequence(model)


def _check_option_use(args: argparse.Namespace) -> None:
    """Refuse options this request would not read, naming what reads them."""
    decoding = [flag for flag, value in (("--vae-tiling", args.vae_tiling),
                                         ("--vae-slicing", args.vae_slicing),
                                         ("--vae-dtype", args.vae_dtype), ("--fps", args.fps))
                if value]
    if decoding and args.vae is None:
        raise ConfigError(f"{', '.join(decoding)} set(s) the VAE decoding to MP4, which only "
                         "--vae DIR turns on: add --vae or drop them")
    _, texts = prompt_request(args)
    if args.latent_shape is not None:
        parse_shape(args.latent_shape)
        embeddings = args.prompt_embeddings
        if not texts and (embeddings is None or Path(embeddings).is_dir()):
            raise ConfigError(f"--latent-shape {args.latent_shape} is read with text prompts "
                             "(--prompt, --prompts FILE) or a --prompt-embeddings file; these "
                             "prompts come from a data set, which states its own shape: drop it")
    size = [f"--{name}" for name in VIDEO_DEFAULTS if getattr(args, name) is not None]
    if size and (not texts or args.latent_shape is not None):
        raise ConfigError(f"{', '.join(size)} set(s) the video size of text prompts (--prompt, "
                         "--prompts FILE, with --model), without --latent-shape; nothing else "
                         "reads them: drop them")
    if args.negative is not None and not (texts and args.guidance is not None):
        raise ConfigError("--negative is the negative prompt text prompts are encoded with for "
                         "CFG (--prompt/--prompts FILE with --guidance); here nothing reads it: "
                         "drop it")


def sample(args: argparse.Namespace) -> dict[str, object]:
    try:
        check_args(args)
    except ValueError as exc:
        raise SampleError(str(exc)) from None
    if args.sequence_parallel is not None or "WORLD_SIZE" in os.environ:
        parallel.setup(args.device)  # joins torchrun's process group (one GPU per rank)
    loaded = load_model(args.checkpoint, preset=args.preset, chain=args.chain, stage=args.stage,
                        device=args.device)
    _split_over_ranks(args, loaded.model,
                      *(() if loaded.low_expert is None else (loaded.low_expert,)))
    model, cfg_scale, folded_at = _guidance_plan(loaded, args)
    device = next(model.parameters()).device
    low = None if loaded.low_expert is None else loaded.low_expert.eval()
    if args.dtype == "bf16":
        model = model.to(torch.bfloat16)
        low = None if low is None else low.to(torch.bfloat16)
    prompts = choose_prompts(loaded, args)
    if loaded.model.cfg.image_to_video and prompts.cond.image_latent is None:
        raise SampleError(f"{loaded.description} is an image-to-video model and these prompts "
                          "carry no image: give text prompts with --model DIR and --image PATH "
                          "or --images FILE, or a data set encoded with --images")
    if prompts.latent_shape[0] != loaded.model.cfg.out_channels:
        raise SampleError(f"the prompts' latent shape {','.join(map(str, prompts.latent_shape))} "
                          f"has {prompts.latent_shape[0]} channels, the model takes "
                          f"{loaded.model.cfg.out_channels} (its latent channels, out_channels): "
                          "give embeddings (or --latent-shape C,T,H,W) made for this "
                          "model's VAE")
    vae = None if args.vae is None else load_vae(  # loaded first: a wrong VAE fails fast
        args.vae, loaded.model.cfg.out_channels, device=device, tiling=args.vae_tiling,
        dtype=torch.bfloat16 if args.vae_dtype == "bf16" else torch.float32,
        slicing=args.vae_slicing)
    args.steps, shift = _sampling_grid(loaded, args)
    denoiser: Denoiser = DiTDenoiser(model)
    scale: float | ExpertScales | None = cfg_scale
    if low is not None:
        assert loaded.boundary is not None  # set with low_expert
        denoiser = ExpertPair(denoiser, DiTDenoiser(low), loaded.boundary)
        if cfg_scale is not None:  # WanPipeline: guidance_scale_2 defaults to guidance_scale
            scale = ExpertScales(cfg_scale, args.guidance_2 or cfg_scale)
    if scale is not None:
        denoiser = CFG(denoiser, prompts.negative.to(device), scale)
    # The pair reads each step's sigma on the host to pick its expert: no CUDA graph.
    sampler = GraphSampler(denoiser, sigma_grid(args.steps, shift),
                           use_graphs=False if args.eager or low is not None else None)
    noise = make_noise((args.num, *prompts.latent_shape), args.seed, device)
    guided = cfg_scale is not None
    latents, elapsed = _sample_batches(sampler, noise, prompts, args.batch_size)
    summary = {
        "checkpoint": loaded.description, "num": args.num, "steps": args.steps,
        "guidance": args.guidance if folded_at is None else folded_at,
        "guidance_as": "input" if folded_at is not None else ("cfg" if guided else "none"),
        "shift": shift, "seed": args.seed,
        "nfe_per_video": sampler.nfe(), "seconds_per_video": elapsed / args.num,
        "device": str(device), "dtype": args.dtype,
        "cuda_graphs": sampler.graphs_enabled(device),
        "captures_in_timing": sampler.captures_made, "prompts": prompts.names,
    }
    if isinstance(scale, ExpertScales):
        summary["guidance_2"] = scale.low
    if loaded.boundary is not None:
        summary["boundary"] = loaded.boundary
    parallel.main_only(_write_samples, args, latents, prompts, vae, summary)
    return summary


def _guidance_plan(loaded: LoadedModel, args: argparse.Namespace
                   ) -> tuple[torch.nn.Module, float | None, float | None]:
    """(model to sample, CFG scale of a CFG pair or None, w folded into a w-conditioned
    student or None): such a student takes w as an input, sampled in one forward."""
    model, run = loaded.model.eval(), loaded.run_config
    if not has_guidance_input(model):
        if args.guidance is not None:
            _refuse_cfg_on_student(loaded.record, args.guidance, loaded.description)
        return model, args.guidance, None
    folded_at = args.guidance if args.guidance is not None else (
        run.resolved_guidance if run is not None else None)
    if folded_at is None:
        raise SampleError(f"{loaded.description} takes the CFG scale as an input: pass "
                          "--guidance W (the w to sample at)")
    check_guidance_in_range(loaded.record, folded_at, loaded.description)
    return fold_guidance(model, folded_at), None, folded_at


def _sampling_grid(loaded: LoadedModel, args: argparse.Namespace) -> tuple[int, float]:
    """(steps, shift): the flags, else the stage's own grid (its done.json beats the run's
    config.json, which a later invocation rewrites), else its stage plan's, else the
    defaults."""
    trained_steps, trained_shift = recorded_grid(loaded.record)  # None: unknown
    plan = loaded.plan
    planned = (plan.steps, plan.shift) if plan else (DEFAULT_STEPS,
                                                     _preset_shift(loaded.model.cfg))
    steps = args.steps if args.steps is not None else trained_steps or planned[0]
    if args.shift is not None:
        return steps, args.shift
    return steps, trained_shift if trained_shift is not None else planned[1]


def _sample_batches(sampler: GraphSampler, noise: torch.Tensor, prompts: Prompts,
                    batch_size: int) -> tuple[torch.Tensor, float]:
    """The videos of every batch and the seconds spent sampling them (synchronised)."""
    device = noise.device
    outputs, elapsed = [], 0.0
    for start in range(0, len(noise), batch_size):
        part = slice(start, start + batch_size)
        cond = prompts.cond[part].to(device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        began = time.perf_counter()
        outputs.append(sampler(noise[part], cond).float().cpu())
        elapsed += time.perf_counter() - began
    return torch.cat(outputs), elapsed


def _write_samples(args: argparse.Namespace, latents: torch.Tensor, prompts: Prompts,
                   vae: object, summary: dict[str, object]) -> None:
    """Latents, GIFs and contact sheet (built-in prompts), MP4s (with a VAE) and the
    summary, written whole into --out (gpd_train.run.destination)."""
    with staged_output(args.out, SAMPLES, overwrite=args.overwrite) as out:
        save_file({"latents": latents.contiguous()}, str(out / "latents.safetensors"),
                  metadata={"summary": json.dumps(summary)})
        if prompts.built_in:
            for i, (video, name) in enumerate(zip(latents, prompts.names, strict=True)):
                write_gif(out / f"{i:03d}-{_slug(name)}.gif", video.clamp(-1, 1)[None])
            write_contact_sheet(out / "contact_sheet.png",
                                [("samples", latents[:8].clamp(-1, 1))])
        if vae is not None:
            summary.update(write_videos(vae, latents, prompts.names, out, args.fps or WAN_FPS))
        (out / "summary.json").write_text(json.dumps(summary, indent=1))


def _refuse_cfg_on_student(record: dict[str, Any] | None, guidance: float,
                          description: str) -> None:
    """A distilled stage without a guidance input absorbed its teacher's CFG: a CFG pair on
    it would guide a second time."""
    options = (record or {}).get("options")
    if isinstance(options, dict) and "teacher_steps" in options:
        raise SampleError(f"--guidance {guidance:g}: {description} is a guidance-free student "
                          f"(it absorbed its teacher's CFG, done.json options.guidance "
                          f"{options.get('guidance')}), sampled in one forward per step: drop "
                          "--guidance, or give --stage 0 to sample the teacher with CFG")


def write_videos(vae: object, latents: torch.Tensor, names: list[str], out: Path,
                 fps: int) -> dict[str, object]:
    """Decode each video and write it as MP4; returns what to add to the summary."""
    files, began = [], time.perf_counter()
    for i, name in enumerate(names):
        video = decode_latents(vae, latents[i:i + 1])[0]
        files.append(write_mp4(out / f"{i:03d}-{_slug(name)[:60]}.mp4", video, fps).name)
    return {"videos": files, "fps": fps, "frames": int(video.shape[1]),
            "decode_seconds_per_video": (time.perf_counter() - began) / len(names)}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m gpd_train.sample", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="run folder, stage, Wan or diffusers")
    parser.add_argument("--stage", type=int, help="stage of a run folder (default: the last done)")
    add_chain_argument(parser, "the chain of the run folder's stage to sample")
    parser.add_argument("--preset", help="model preset for a Wan/diffusers file")
    parser.add_argument("--steps", type=int,
                        help=f"sampling steps (default: the stage's own, else {DEFAULT_STEPS})")
    parser.add_argument("--guidance", type=float,
                        help="CFG scale (default: none, as students); a student with a guidance "
                             "input samples at this w in one forward per step (default: the "
                             "run's CFG scale)")
    parser.add_argument("--guidance-2", type=float,
                        help="a Wan2.2 two-expert folder: the low-noise expert's CFG scale "
                             "(diffusers' guidance_scale_2; default --guidance)")
    parser.add_argument("--shift", type=float,
                        help="sigma-grid shift (default: the one the stage was trained at)")
    parser.add_argument("--prompts", nargs="+", metavar="IDS_OR_FILE",
                        help="built-in prompt ids, or a text file with one prompt per line")
    parser.add_argument("--prompt", action="append", metavar="TEXT",
                        help="a text prompt (repeatable); needs --model")
    parser.add_argument("--model", help="Wan2.1-T2V-Diffusers folder whose umT5 encodes prompts")
    parser.add_argument("--image", metavar="PATH",
                        help="image-to-video: the first frame of every text prompt's video")
    parser.add_argument("--images", metavar="FILE",
                        help="image-to-video: one image path per line, line i for prompt i")
    parser.add_argument("--negative",
                        help="negative prompt with --guidance (default '' as WanPipeline; "
                             "'wan' = Wan's own)")
    for name, default in VIDEO_DEFAULTS.items():  # None: not given (refused where unread)
        parser.add_argument(f"--{name}", type=int,
                            help=f"video size text prompts are sampled at (default {default})")
    parser.add_argument("--vae", help="decode to MP4 with this AutoencoderKLWan (or Diffusers) "
                                      "folder")
    parser.add_argument("--vae-tiling", action="store_true", help="decode in spatial tiles")
    parser.add_argument("--vae-slicing", action="store_true", help="decode one video at a time")
    parser.add_argument("--vae-dtype", choices=("fp32", "bf16"),
                        help="the decoder's dtype (default fp32)")
    parser.add_argument("--fps", type=int, help=f"MP4 frame rate (default {WAN_FPS})")
    parser.add_argument("--prompt-embeddings", help="data-set folder or safetensors file")
    parser.add_argument("--latent-shape", help="C,T,H,W when the embeddings file lacks it")
    parser.add_argument("--num", type=int, help="videos (default: one per text prompt, else 4)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--eager", action="store_true", help="no CUDA graphs")
    parser.add_argument("--sequence-parallel", "--sp", type=int, metavar="N",
                        help="under torchrun --nproc_per_node N: split each video's tokens over "
                             "the N ranks (with --eager on CUDA); rank 0 writes")
    parser.add_argument("--out", required=True,
                        help="a new or empty folder to write into (written whole, then renamed "
                             "into place)")
    parser.add_argument("--overwrite", action="store_true",
                        help="--out holds earlier samples: move them aside to "
                             "<out>.old-<time>/ and write new ones")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        summary = sample(args)
        # Inside the try: ranks > 0 print into /dev/null until the teardown.
        print(f"sampled {summary['num']} videos from {summary['checkpoint']}: "
              f"{summary['seconds_per_video']:.3f} s/video, NFE {summary['nfe_per_video']} "
              f"({summary['steps']} steps, guidance {summary['guidance']}) -> {args.out}")
    except COMMAND_ERRORS as exc:  # SampleError, ..., a full disk: one line naming the file
        return command_failed(exc, args.out)
    finally:
        parallel.teardown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
