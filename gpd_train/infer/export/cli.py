"""Export a distilled student for other tools to run: ``python -m gpd_train.export``.

    python -m gpd_train.export --run runs/wan --base Wan2.1-T2V-1.3B-Diffusers --out student/

writes a Diffusers folder that diffusers' WanPipeline runs (``--format diffusers``, the
default); a LoRA stage (``--lora-rank``) is written as a diffusers Wan LoRA instead (no
``--base``), ``--merged --base ...`` as a whole pipeline folder, the adapter merged.
``--format comfyui`` writes one safetensors file in Wan's original key layout, as ComfyUI
shares models (no ``--base``). Each format is a module of gpd_train/infer/export/ (its
docstring says what it writes); ``--format`` lists the registered ones.

Guidance-free students want ``guidance_scale=1.0`` (no CFG); stage 0, the teacher, wants its
own CFG scale (the run's ``guidance``). ``gpd_export.json`` records what was exported,
``guidance_scale`` included, and the command prints the call with it.

``--out`` must be a new or empty folder outside ``--base`` (a Wan/Diffusers folder or any
folder this command did not write is refused); an earlier export there is replaced only
with ``--overwrite``, which moves it aside (see gpd_train/run/destination.py).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from gpd_train.config.chains import add_chain_argument
from gpd_train.config.checks import check_number
from gpd_train.errors import ConfigError, SampleError
from gpd_train.infer.export import (
    DEFAULT_FORMAT,
    FULL,
    LORA,
    MERGED,
    ExportFormat,
    ExportRequest,
    formats,
    get_format,
)
from gpd_train.run.destination import check_export_destination
from gpd_train.run.files import read_metadata
from gpd_train.run.loading import run_stage_of
from gpd_train.run.lora import METADATA_KEY as LORA_KEY
from gpd_train.run.preflight import check_base_matches, check_environment, check_guidance_in_range
from gpd_train.run.records import OUTPUT
from gpd_train.run.writes import COMMAND_ERRORS, command_failed


def request_of(args: argparse.Namespace) -> ExportRequest:
    return ExportRequest(run=args.run, out=args.out, chain=args.chain, stage=args.stage,
                         base=args.base, guidance=args.guidance, copy=args.copy,
                         overwrite=args.overwrite)


def check_export_request(request: ExportRequest, merged: bool) -> str:
    """Refuse, before any work, options the exported stage would not read: --merged on full
    weights, --guidance on a guidance-free student or outside a w-student's range, and a
    --base other than the Wan folder the run was imported from; returns the kind of stage
    exported (FULL, LORA or MERGED)."""
    if request.guidance is not None:
        check_number("--guidance", request.guidance, low=0, low_open=True)
    if not (Path(request.run) / "config.json").is_file():
        raise SampleError(f"--run {request.run} is not a run folder: it has no config.json (the "
                          "trainer writes it when a stage starts); pass the --run-dir of "
                          "`python -m gpd_train`")
    run, sid = run_stage_of(Path(request.run), request.chain, request.stage)
    name = f"{request.chain} stage {sid.stage}"
    is_lora = LORA_KEY in read_metadata(run.stage_folder(sid) / OUTPUT)
    if merged and not is_lora:
        raise SampleError(f"--merged merges a LoRA adapter, but {name} holds full weights: drop "
                          "--merged (full weights are exported whole)")
    if run.guidance_input(sid):
        w = request.guidance if request.guidance is not None else run.config.resolved_guidance
        check_guidance_in_range(run.record(sid), w, name)
    elif request.guidance is not None:
        raise SampleError(f"--guidance {request.guidance:g}: {name} takes no CFG scale as an "
                          "input; the export samples it with guidance_scale=1.0: drop --guidance")
    if request.base is not None:
        check_base_matches(request.run, request.base)
    return MERGED if merged else LORA if is_lora else FULL


def check_format_takes(fmt: ExportFormat, request: ExportRequest, kind: str) -> None:
    """Refuse a kind of stage ``fmt`` does not write, or one it writes from --base without it."""
    if kind not in fmt.accepts:
        raise ConfigError(f"--format {fmt.name} writes {' or '.join(fmt.accepts)} stages; this "
                          f"export is {kind}")
    if request.base is None and kind in fmt.needs_base:
        raise ConfigError(f"{fmt.needs_base[kind]}: give --base (the Wan2.1-T2V-Diffusers "
                          "folder trained on)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m gpd_train.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="run folder of python -m gpd_train")
    parser.add_argument("--format", choices=list(formats()), default=DEFAULT_FORMAT,
                        help="; ".join(fmt.help for fmt in formats().values()))
    parser.add_argument("--base", help="the Wan2.1-T2V-Diffusers folder trained on (not needed "
                        "for a LoRA stage, which is written as a LoRA unless --merged)")
    parser.add_argument("--out", required=True,
                        help="the folder to write (the Diffusers folder, or the ComfyUI file's): "
                             "a new or empty folder, outside --base (written whole, then "
                             "renamed into place)")
    add_chain_argument(parser, "the chain of the run folder's stage to export")
    parser.add_argument("--stage", type=int, help="stage to export (default: the last finished)")
    parser.add_argument("--guidance", type=float, metavar="W",
                        help="a student with a guidance input is exported sampling at this CFG "
                             "scale (default: the run's)")
    parser.add_argument("--merged", action="store_true",
                        help="a LoRA stage: write a whole pipeline folder, the adapter merged")
    parser.add_argument("--overwrite", action="store_true",
                        help="--out holds an earlier export: move it aside to "
                             "<out>.old-<time>/ and write the new one")
    parser.add_argument("--copy", action="store_true",
                        help="copy text_encoder/, tokenizer/ and vae/ instead of linking them")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    request, fmt = request_of(args), get_format(args.format)
    try:
        check_environment()
        check_export_destination(args.out, args.base, args.overwrite)  # before any work
        if fmt.check is not None:
            fmt.check(request)
        kind = check_export_request(request, args.merged)
        check_format_takes(fmt, request, kind)
        with torch.no_grad():
            done = fmt.write(request, kind)
    except COMMAND_ERRORS as exc:  # e.g. a full disk: one line naming the file
        return command_failed(exc, args.out)
    print(done)
    return 0
