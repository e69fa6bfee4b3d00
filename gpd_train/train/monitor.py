"""Watching a stage train: TensorBoard scalars and validation samples (``--log tensorboard``,
``--validate-every N``).

Scalars are the values each metrics.jsonl record holds (loss, lr, grad norm and the
objective's extras), plus iterations per second and the frequency loss's share of the loss.
Every N iterations the EMA student samples a fixed validation set (the first
``eval.examples`` evaluation prompts and noise, at the stage's step count): a contact sheet
``validation/step-XXXXXXXX.png`` in the stage folder, and with TensorBoard the same sheet and
an animated GIF of the videos (what ``SummaryWriter.add_video`` writes, without moviepy).

Validation must not change training: it reads the EMA through a temporary copy into the
model's trained parameters, restored bit for bit afterwards, draws its noise from its own
generator, and touches neither the optimizer, the data streams nor the global RNG
(tests/test_monitor.py trains with and without it and compares the weights).
"""

from __future__ import annotations

import dataclasses
import io
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tqdm import tqdm

from gpd_model import CFG, Denoiser, DiTDenoiser, euler_sample, make_noise, sigma_grid
from gpd_train.config.chains import StageId
from gpd_train.devices import autocast
from gpd_train.errors import ConfigError
from gpd_train.infer.media import write_contact_sheet, write_gif
from gpd_train.parallel import is_main, world
from gpd_train.run.folder import RunFolder
from gpd_train.run.writes import writing
from gpd_train.train.loop import StageTrainer

TENSORBOARD_FOLDER = "tensorboard"
VALIDATION_FOLDER = "validation"


def check_log_backend(backend: str) -> None:
    """Refuse ``--log tensorboard`` without its package, before any work."""
    if backend == "tensorboard":
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            raise ConfigError("--log tensorboard needs the tensorboard package: "
                             "pip install -e '.[tensorboard]' (or drop --log)") from None


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """A metrics.jsonl record's numbers by TensorBoard tag, with iterations per second and
    the frequency loss's share of the loss (the loss is mse + weight x freq)."""
    values = {f"train/{key}": float(value) for key, value in record.items()
              if isinstance(value, (int, float)) and not isinstance(value, bool)
              and key not in ("step", "seconds")}
    if record.get("seconds"):
        values["train/iterations_per_s"] = 1.0 / record["seconds"]
    if "freq" in record and "mse" in record and record["loss"]:
        values["train/freq_share"] = (record["loss"] - record["mse"]) / record["loss"]
    return values


class ValidationSet:
    """Fixed prompts and noise sampled by a stage's model at its step count, the way the
    evaluation samples that stage (CFG pairs for the teacher, w as an input after a
    guidance stage, one forward otherwise)."""

    def __init__(self, run: RunFolder, sid: StageId, data: Any) -> None:
        cfg = run.config
        self.cond, self.names = data.eval_prompts(cfg.eval.examples)
        self.noise = make_noise((cfg.eval.examples, *data.latent_shape), seed=cfg.eval.seed)
        self.negative = data.negative if sid.is_teacher else None
        self.guidance = cfg.resolved_guidance
        self.guidance_input = sid.is_guidance or run.guidance_input(sid)
        self.steps = run.steps(sid)
        self.sigmas = sigma_grid(self.steps, cfg.resolved_shift)
        self.precision = cfg.precision

    @torch.no_grad()
    def sample(self, model: torch.nn.Module) -> torch.Tensor:
        device = next(model.parameters()).device
        x, cond = self.noise.to(device), self.cond.to(device)
        denoiser: Denoiser = DiTDenoiser(model)
        if self.guidance_input:  # the student's own input, as load_stage_model(fold_at=w)
            cond = dataclasses.replace(cond, guidance=torch.full(
                (len(x),), self.guidance, device=device))
        elif self.negative is not None:  # the teacher: CFG pairs, as the evaluation
            denoiser = CFG(denoiser, self.negative.to(device), self.guidance)
        with autocast(device, self.precision):
            videos = euler_sample(denoiser, x, cond, self.sigmas.to(device))
        return videos.float().cpu()


@contextmanager
def ema_weights(trainer: StageTrainer) -> Iterator[torch.nn.Module]:
    """The trainer's model with its EMA in the trained parameters, then the training
    weights back exactly (copied, same storage: a captured CUDA graph still sees them)."""
    params = trainer.model_state.state_dict()
    saved = {name: value.clone() for name, value in params.items()}
    was_training = trainer.model.training
    try:
        with torch.no_grad():
            for name, value in params.items():
                value.copy_(trainer.ema.shadow[name])
        trainer.model.eval()
        yield trainer.model
    finally:
        with torch.no_grad():
            for name, value in params.items():
                value.copy_(saved[name])
        trainer.model.train(was_training)


class StageMonitor:
    """What ``StageTrainer`` calls after each step (loop.StepMonitor)."""

    def __init__(self, folder: Path, name: str, backend: str, validate_every: int,
                 validation: ValidationSet | None) -> None:
        self.folder = folder
        self.name = name
        self.backend = backend
        self.validate_every = validate_every
        self.validation = validation
        self.writer: Any = None
        self.validation_seconds: list[float] = []

    def _writer(self, step: int) -> Any:
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: a resumed stage's events after its checkpoint are superseded.
            self.writer = SummaryWriter(str(self.folder / TENSORBOARD_FOLDER), purge_step=step)
        return self.writer

    def after_step(self, trainer: StageTrainer, record: dict[str, Any]) -> None:
        step = record["step"]
        if self.backend == "tensorboard":
            writer = self._writer(step)
            for tag, value in scalars(record).items():
                writer.add_scalar(tag, value, step)
        if self.validation is not None and step % self.validate_every == 0:
            self.validate(trainer, step)

    def validate(self, trainer: StageTrainer, step: int) -> Path:
        """Sample the validation set with the EMA weights; returns the contact sheet."""
        assert self.validation is not None
        started = time.perf_counter()
        with ema_weights(trainer) as model:
            videos = self.validation.sample(model)
        label = f"{self.name} EMA@{self.validation.steps} step {step}"
        sheet = self.folder / VALIDATION_FOLDER / f"step-{step:08d}.png"
        with writing(sheet):
            sheet.parent.mkdir(parents=True, exist_ok=True)
            write_contact_sheet(sheet, [(label, videos)])
        if self.backend == "tensorboard":
            self._log_images(step, sheet, videos)
        self.validation_seconds.append(time.perf_counter() - started)
        if self.backend == "tensorboard":
            self.writer.add_scalar("validation/seconds", self.validation_seconds[-1], step)
        return sheet

    def _log_images(self, step: int, sheet: Path, videos: torch.Tensor) -> None:
        from tensorboard.compat.proto.summary_pb2 import Summary

        gif = io.BytesIO()
        write_gif(gif, videos)
        with Image.open(sheet) as image, Image.open(gif) as video:
            images = {"validation/contact_sheet": (image.size, sheet.read_bytes()),
                      "validation/video": (video.size, gif.getvalue())}
        values = [Summary.Value(tag=tag, image=Summary.Image(
            height=size[1], width=size[0], colorspace=3, encoded_image_string=data))
            for tag, (size, data) in images.items()]
        self._writer(step).file_writer.add_summary(Summary(value=values), step)

    def close(self) -> None:
        if self.validation_seconds:  # what watching cost, beside the stage's own time
            mean = sum(self.validation_seconds) / len(self.validation_seconds)
            tqdm.write(f"[{self.name}] validation: {len(self.validation_seconds)} call(s), "
                       f"{mean:.2f} s each on average")
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def stage_monitor(run: RunFolder, sid: StageId, data: Any) -> StageMonitor | None:
    """The monitor ``--log`` and ``--validate-every`` ask for (None: neither); this
    process's share of it under torchrun (rank 0 logs)."""
    cfg = run.config
    check_log_backend(cfg.log)
    if cfg.validate_every and world().distributed:
        raise ConfigError("--validate-every samples on one process; under torchrun the "
                          "student is sharded: drop it, and sample a checkpoint's stage "
                          "output with python -m gpd_train.sample instead")
    if (cfg.log == "none" and not cfg.validate_every) or not is_main():
        return None
    wanted = ((TENSORBOARD_FOLDER, "--log tensorboard", cfg.log == "tensorboard"),
              (VALIDATION_FOLDER, "--validate-every", bool(cfg.validate_every)))
    for name, flag, used in wanted:  # found now, not at the first event or validation
        folder = run.stage_folder(sid) / name
        if used and folder.exists() and not folder.is_dir():
            raise ConfigError(f"{folder} is a file, where {flag} writes {sid}'s {name}/ "
                              "folder; move the file elsewhere, or drop " + flag)
    validation = ValidationSet(run, sid, data) if cfg.validate_every else None
    if validation is not None:
        tqdm.write(f"[{sid}] validation every {cfg.validate_every} iterations: "
                   f"{len(validation.names)} videos at {validation.steps} steps -> "
                   f"{run.stage_folder(sid) / VALIDATION_FOLDER}")
    return StageMonitor(run.stage_folder(sid), sid.name, cfg.log, cfg.validate_every,
                        validation)
