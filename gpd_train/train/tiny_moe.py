"""tiny-moe: a two-expert tiny teacher on the built-in data, written as a Wan2.2 folder.

    python -m gpd_train.train.tiny_moe --config examples/tiny_moe.toml
    python -m gpd_train --config examples/tiny_moe.toml      # its GPD pipeline and report

The first command builds the folder the TOML's ``teacher`` names, in three steps:

1. a one-model tiny teacher: stage 0 of ``<teacher>.work/base-run`` (the TOML's seed, batch
   and ``[stage0]`` options; a finished one is kept);
2. the split: each expert starts as that teacher and is fine-tuned by flow matching on its
   own side of the boundary alone (sigma >= ``--boundary``: the high expert; below: the low
   one), ``--expert-iterations`` updates each at ``--expert-lr`` (checkpoints in
   ``<teacher>.work/<expert>/``, resumed when there);
3. the Wan2.2 A14B layout at ``teacher``: ``model_index.json`` with ``boundary_ratio``,
   ``transformer/`` (high) and ``transformer_2/`` (low), each a diffusers
   WanTransformer3DModel folder. The second command imports it as a pair stage 0 and
   distils it (gpd_train.train.pair).

The default boundary, sigma 0.71, is t = 0.449 before the tiny preset's shift 3: of the
48-step teacher grid's starts 27 are the high expert's and 21 the low one's, and every GPD
student grid (24, 12, 6 steps) puts starts on both sides (14/10, 7/5, 4/2), so both
experts are distilled at every stage. It is 0.007 or more from every point of those grids
(0.7 is the 48-step grid's point t = 21/48), so no start's expert hangs on float rounding.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

from gpd_model import WanDiT, save_diffusers
from gpd_train.config.checks import check_number
from gpd_train.config.load import load_config
from gpd_train.config.settings import RunConfig
from gpd_train.errors import ConfigError, GPDError
from gpd_train.run.experts import COMPONENT, EXPERTS
from gpd_train.run.files import atomic_write_text
from gpd_train.run.folder import TEACHER
from gpd_train.train.builders import TrainingRun, stage_generator
from gpd_train.train.loop import StageTrainer
from gpd_train.train.objectives import FlowMatching
from gpd_train.train.pipeline import run_stage
from gpd_train.train.threads import set_threads

DEFAULT_BOUNDARY = 0.71


def unshifted_time(sigma: float, shift: float) -> float:
    """The t whose ``shift_sigma(t, shift)`` is ``sigma`` (its inverse)."""
    return sigma / (shift - (shift - 1.0) * sigma)


def expert_t_ranges(boundary: float, shift: float) -> dict[str, tuple[float, float]]:
    """Each expert's uniform time range before the shift: high [t_b, 1], low [0, t_b]."""
    t = unshifted_time(boundary, shift)
    return {"high": (t, 1.0), "low": (0.0, t)}


def base_run(config: RunConfig, work: Path) -> TrainingRun:
    """The one-model tiny teacher's run folder (the TOML's options, no teacher folder)."""
    return TrainingRun(dataclasses.replace(config, teacher=None, prompts=None,
                                           run_dir=str(work / "base-run")))


def fine_tune(run: TrainingRun, expert: str, t_range: tuple[float, float], iterations: int,
              lr: float, work: Path) -> dict[str, torch.Tensor]:
    """The base teacher fine-tuned on ``t_range`` (one expert's side); its EMA weights."""
    cfg = run.config
    model = run.load_stage_model(TEACHER)
    generator = stage_generator(run, TEACHER)
    objective = FlowMatching(
        model=model, data=run.data, generator=generator, batch_size=cfg.batch_size,
        shift=run.plan(TEACHER).shift, cfg_dropout=cfg.stage0.cfg_dropout, device=run.device,
        precision=cfg.precision, t_range=t_range)
    trainer = StageTrainer(
        name=f"tiny-moe/{expert}", model=model, objective=objective, folder=work / expert,
        iterations=iterations, lr=lr, warmup=min(cfg.stage0.warmup, iterations // 10),
        final_lr_ratio=cfg.stage0.final_lr_ratio, ema_decay=cfg.stage0.ema_decay,
        checkpoint_every=cfg.checkpoint_every, generator=generator,
        metadata={**run.metadata(TEACHER), "expert": expert},
        recipe={"t_range": list(t_range), "lr": lr, "seed": cfg.seed})
    trainer.run(resume=True)
    return trainer.ema.state_dict()


def build_tiny_moe(config: RunConfig, boundary: float, iterations: int, lr: float) -> Path:
    """Train, split and fine-tune the tiny teacher; write the Wan2.2 folder ``teacher``."""
    if config.teacher is None:
        raise ConfigError("tiny-moe writes its two-expert folder where the TOML's teacher "
                          "points: set teacher = \"...\" in it")
    folder = Path(config.teacher)
    work = folder.with_name(folder.name + ".work")
    run = base_run(config, work)
    run_stage(run, TEACHER, resume=True)
    ranges = expert_t_ranges(boundary, run.plan(TEACHER).shift)
    for expert in EXPERTS:
        weights = fine_tune(run, expert, ranges[expert], iterations, lr, work)
        model = WanDiT(run.dit_config)
        model.load_state_dict(weights)
        save_diffusers(model, folder / COMPONENT[expert])
    index = {"_class_name": "WanPipeline", "boundary_ratio": boundary,
             **{COMPONENT[e]: ["diffusers", "WanTransformer3DModel"] for e in EXPERTS}}
    atomic_write_text(folder / "model_index.json", json.dumps(index, indent=2) + "\n")
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gpd_train.train.tiny_moe",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="the pair run's TOML (its teacher is "
                        "where the folder is written)")
    parser.add_argument("--boundary", type=float, default=DEFAULT_BOUNDARY,
                        help=f"the sigma where the low expert takes over (default "
                             f"{DEFAULT_BOUNDARY})")
    parser.add_argument("--expert-iterations", type=int, default=2000,
                        help="flow-matching updates of each expert on its side (default 2000)")
    parser.add_argument("--expert-lr", type=float, default=3e-4,
                        help="each expert's fine-tuning learning rate (default 3e-4)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's)")
    args = parser.parse_args(argv)
    try:
        check_number("--boundary", args.boundary, low=0, high=1, low_open=True, high_open=True)
        check_number("--expert-iterations", args.expert_iterations, integer=True, low=1)
        check_number("--expert-lr", args.expert_lr, low=0, low_open=True)
        set_threads(args.threads)
        folder = build_tiny_moe(load_config(args.config), args.boundary,
                                args.expert_iterations, args.expert_lr)
    except GPDError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"tiny-moe: wrote {folder} (boundary sigma {args.boundary:g}); distil it with "
          f"python -m gpd_train --config {args.config}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
