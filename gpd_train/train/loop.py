"""The training loop shared by every stage: optimizer, EMA, checkpoints, metrics, guard.

A stage supplies an ``Objective`` (its loss and its data-stream state); this module does
the rest, so that resuming, the non-finite guard and logging behave the same everywhere.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn, Protocol

import torch
from tqdm import tqdm

from gpd_train import parallel
from gpd_train.errors import ConfigError, GPDError
from gpd_train.run.files import CheckpointError, atomic_write_text, load_exact_state
from gpd_train.run.writes import WriteError, writing
from gpd_train.train.checkpoint import STREAM_PREFIX, Checkpointer, Stateful
from gpd_train.train.step import GraphStep, host_value
from gpd_train.train.streams import StreamGroup

GRAD_CLIP = 1.0


class NonFiniteLossError(GPDError, RuntimeError):
    """Training met a NaN/inf loss or gradient and stopped without saving."""


class Objective(Protocol):
    """A stage's loss, split as gpd_train.train.step describes (host, device, host)."""

    batch_size: int  # samples per step (of this data stream)

    def prepare(self, step: int) -> Any:
        """Host part: draw the batch; its inputs as device tensors (a flat dict)."""

    def forward(self, inputs: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor], Any]:
        """Device part: the differentiable loss, the extra scalars to log (tensors) and
        the outputs ``finish`` takes; no host syncs."""

    def finish(self, outputs: Any) -> None:
        """Host part after the update (e.g. the rollout lanes move on)."""

    def loss(self, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        """The three in one call (gpd_train.train.step.eager_loss): the loss and its extras."""

    def stream_state(self) -> dict[str, Any]:
        """Tensors/values that, with the RNG, let a resumed run continue exactly."""

    def load_stream_state(self, state: dict[str, Any]) -> None: ...




class Ema:
    """Exponential moving average of the tensors of ``source`` (the trainer's "model" part:
    its trained parameters), with a short warm-up."""

    def __init__(self, source: Stateful, decay: float) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.updates = 0
        self.shadow = {k: v.detach().clone().float() for k, v in source.state_dict().items()}

    def next_weight(self) -> float:
        """Count an update and return its weight (1 - decay): the host part of ``update``."""
        self.updates += 1
        # Early on the average would mostly remember the initial weights.
        decay = min(self.decay, (1.0 + self.updates) / (10.0 + self.updates))
        return 1.0 - decay

    @torch.no_grad()
    def apply(self, source: Stateful, weight: float | torch.Tensor) -> None:
        """The device part: move the average ``weight`` of the way to ``source``."""
        for key, value in source.state_dict().items():
            self.shadow[key].lerp_(value.float(), weight)

    def update(self, source: Stateful) -> None:
        self.apply(source, self.next_weight())

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.shadow

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        load_exact_state(self.shadow, state, "part 'ema'")


class ModelState:
    """The "model" part of a checkpoint, and what the EMA averages: the parameters of
    ``model`` that are trained (require gradients). That is all of a full-weight student
    and the adapter alone of a LoRA student, whose frozen base and teacher adapter come
    from the stages it was built from (pinned by the checkpoint's metadata)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    def state_dict(self) -> dict[str, torch.Tensor]:
        # Detached views share the parameters' storage: loading into them loads the model.
        return {name: p.detach() for name, p in self.model.named_parameters()
                if p.requires_grad}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        load_exact_state(self.state_dict(), state, "part 'model'")


class OptimizerState:
    """The "optimizer" part: its state keyed by parameter name, so DCP can reshard it."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model = model
        self.optimizer = optimizer

    def state_dict(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        state = get_optimizer_state_dict(self.model, self.optimizer)
        if any(isinstance(group.get("lr"), torch.Tensor) for group in state["param_groups"]):
            # A --cuda-graph trainer's lr is a device tensor and its AdamW capturable: saved
            # as the eager trainer's (float lr, not capturable), so either resumes it.
            state["param_groups"] = [{**group, "lr": float(group["lr"]), "capturable": False}
                                     for group in state["param_groups"]]
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        # DCP first gives a stateless optimizer its state by stepping it on zero gradients
        # with lr 0; a capturable AdamW divides by its lr (NaN weights). So a --cuda-graph
        # trainer's optimizer loads in the eager form the checkpoint holds, and is rebound
        # to its device-tensor lr afterwards (GraphStep.bind_optimizer).
        for group in self.optimizer.param_groups:
            if isinstance(group.get("lr"), torch.Tensor):
                group["lr"], group["capturable"] = float(group["lr"]), False
        set_optimizer_state_dict(self.model, self.optimizer, state)


class StepMonitor(Protocol):
    """Watches training from outside (gpd_train.train.monitor): sees each step's metrics record
    and may read the trainer, but must leave its weights, optimizer and RNG as they were."""

    def after_step(self, trainer: StageTrainer, record: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


class StreamState:
    """A "stream.<j>" part: data stream j's generator and rollout state."""

    def __init__(self, generator: torch.Generator, objective: Objective) -> None:
        self.generator = generator
        self.objective = objective

    def state_dict(self) -> dict[str, Any]:
        return {"rng": self.generator.get_state(), "stream": self.objective.stream_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["rng"])
        self.objective.load_stream_state(state["stream"])


def stream_parts(objective: Objective | StreamGroup,
                 generator: torch.Generator) -> dict[str, StreamState]:
    """The checkpoint part of each data stream this process runs."""
    if isinstance(objective, StreamGroup):
        return {f"{STREAM_PREFIX}{i}": StreamState(g, o) for i, g, o in
                zip(objective.ids, objective.generators, objective.objectives, strict=True)}
    return {f"{STREAM_PREFIX}0": StreamState(generator, objective)}


class MetricsLog:
    """Metrics as JSON lines; a resumed run drops the records after its checkpoint."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def reset(self, keep_until_step: int | None = None) -> None:
        """Start the log over, or (resuming) keep its records up to ``keep_until_step``.

        Records the resumed checkpoint's steps should have but the log lacks (a deleted or
        cut file) cannot be rebuilt: the training itself continues exactly from the
        checkpoint, so the run goes on and a warning names the steps whose records are gone.
        """
        if keep_until_step is None:
            self.path.unlink(missing_ok=True)
            return
        kept = ([(line, record) for line, record in self._parsed(warn=True)
                 if record.get("step", 0) <= keep_until_step] if self.path.exists() else [])
        last = max((int(record.get("step", 0)) for _, record in kept), default=0)
        if last < keep_until_step:
            state = "ends at step " + str(last) if self.path.exists() else "is missing"
            tqdm.write(f"warning: {self.path} {state}, but the checkpoint is at step "
                       f"{keep_until_step}: the metrics of steps {last + 1}-{keep_until_step} "
                       "are lost (training resumes exactly; the log continues after them)")
        atomic_write_text(self.path, "".join(line + "\n" for line, _ in kept))

    def _parsed(self, warn: bool = False) -> Iterator[tuple[str, dict[str, Any]]]:
        """(line, record) pairs; a torn last line (a kill mid-write) is dropped."""
        lines = [line for line in self.path.read_text().splitlines() if line.strip()]
        for number, line in enumerate(lines, 1):
            try:
                record = json.loads(line)
            except ValueError as exc:
                if number == len(lines):
                    if warn:
                        tqdm.write(f"warning: {self.path} ends in a torn line ({line[:40]!r}"
                                   "...), left by a killed run; it is cut off")
                    return
                raise ConfigError(f"{self.path} line {number} is not JSON ({exc}): "
                                 f"{line[:60]!r}") from None
            if not isinstance(record, dict):
                raise ConfigError(f"{self.path} line {number} is not a metrics record (a JSON "
                                  f"object): {line[:60]!r}; remove the line")
            yield line, record

    def log(self, record: dict[str, Any]) -> None:
        """Append one record (a write cut short leaves a torn last line, which is dropped)."""
        with writing(self.path):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a") as handle:
                handle.write(json.dumps(record) + "\n")

    def records(self) -> Iterator[dict[str, Any]]:
        if self.path.exists():
            for _, record in self._parsed():
                yield record


class StageTrainer:
    """Run ``objective`` for ``iterations`` steps on ``model`` with checkpoints in ``folder``."""

    def __init__(self, *, name: str, model: torch.nn.Module,
                 objective: Objective | StreamGroup, folder: Path, iterations: int, lr: float,
                 warmup: int, final_lr_ratio: float, ema_decay: float,
                 checkpoint_every: int, generator: torch.Generator,
                 metadata: dict[str, str], cuda_graph: bool = False,
                 recipe: dict[str, Any] | None = None) -> None:
        self.name = name
        self.model = model
        self.objective = objective
        self.folder = folder
        self.iterations = iterations
        self.lr = lr
        self.warmup = warmup
        self.final_lr_ratio = final_lr_ratio
        self.checkpoint_every = checkpoint_every
        self.generator = generator
        self.metadata = metadata
        trainable = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
        self.model_state = ModelState(model)
        self.ema = Ema(self.model_state, ema_decay)
        streams = stream_parts(objective, generator)
        self.checkpoints = Checkpointer(
            folder / "ckpt", {"model": self.model_state, "ema": self.ema,
                              "optimizer": OptimizerState(model, self.optimizer),
                              "trainer": self, **streams},
            metadata, stream_batch=int(next(iter(streams.values())).objective.batch_size),
            recipe=recipe)
        self.metrics = MetricsLog(folder / "metrics.jsonl")
        self.step = 0
        self.monitor: StepMonitor | None = None  # set by the caller (gpd_train.train.pipeline)
        self.graph: GraphStep | None = None
        if cuda_graph:  # the options were checked (gpd_train.train.step.cuda_graph_refusal)
            if isinstance(objective, StreamGroup):
                raise ConfigError("--cuda-graph takes one data stream per process")
            self.graph = GraphStep(forward=objective.forward, backward=self._backward,
                                   update=self._update, optimizer=self.optimizer,
                                   device=next(model.parameters()).device)

    def state_dict(self) -> dict[str, int]:
        """The checkpoint's "trainer" part."""
        return {"step": self.step, "ema_updates": self.ema.updates}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.step = int(state["step"])
        self.ema.updates = int(state["ema_updates"])

    def _restore(self) -> None:
        path, problems = self.checkpoints.load()  # any format, on any number of ranks
        if problems:
            tqdm.write(f"[{self.name}] warning: " + "; ".join(problems)
                       + f"; resuming from {path.name}, the newest checkpoint that verifies")
        if self.graph is not None:
            self.graph.bind_optimizer()

    def run(self, resume: bool) -> None:
        """Train to ``iterations``; ``resume`` continues from the newest good checkpoint.

        Without ``resume`` the stage must hold no checkpoint: they are never deleted here
        (gpd_train.train.pipeline.run_stage moves a stage aside on --restart).
        """
        if resume and self.checkpoints.steps():
            self._restore()
            parallel.main_only(self.metrics.reset, keep_until_step=self.step)
            tqdm.write(f"[{self.name}] resumed from step {self.step}")
        else:
            if self.checkpoints.steps():
                raise CheckpointError(
                    f"[{self.name}] {self.checkpoints.folder} already holds checkpoints "
                    f"({self.checkpoints.steps()[0].name}); continue with --resume, or "
                    "start over with --restart (moves the stage aside)")
            parallel.main_only(self.metrics.reset)
        bar = tqdm(total=self.iterations, initial=self.step, desc=self.name, unit="it",
                   mininterval=2.0, dynamic_ncols=True, disable=not parallel.is_main())
        try:
            while self.step < self.iterations:
                self._train_step(bar)
        except WriteError as exc:  # a full disk: the next step is a resume, not a rerun
            raise self._resume_after(exc) from None
        finally:
            bar.close()
            if self.monitor is not None:
                self.monitor.close()
        latest = self._latest()
        if latest is None or latest.name != f"step-{self.step:08d}":
            try:
                self.checkpoints.save(self.step)
            except WriteError as exc:
                raise self._resume_after(exc) from None

    def _resume_after(self, exc: WriteError) -> WriteError:
        latest = self._latest()
        kept = (f"its last checkpoint {latest.name} is intact" if latest is not None
                else "it had no checkpoint yet")
        return exc.followed_by(f"continue the stage with --resume ({kept}; without --stage "
                               "the pipeline resumes by itself)", prefix=f"[{self.name}] ")

    def _latest(self) -> Path | None:
        """The ``latest`` pointer's checkpoint; None when it is missing or broken."""
        try:
            return self.checkpoints.latest()
        except (CheckpointError, OSError, UnicodeDecodeError):
            return None

    def learning_rate(self, step: int) -> float:
        """Linear warm-up, then cosine decay to ``final_lr_ratio * lr`` at the last step."""
        progress = step / max(1, self.iterations)
        cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
        scale = self.final_lr_ratio + (1.0 - self.final_lr_ratio) * cosine
        return self.lr * min(1.0, step / max(1, self.warmup)) * scale

    def _backward(self, loss: torch.Tensor) -> torch.Tensor:
        """Device part: gradients, clipped; returns their norm before clipping."""
        loss.backward()
        return parallel.full_value(torch.nn.utils.clip_grad_norm_(
            [p for p in self.model.parameters() if p.requires_grad], GRAD_CLIP))

    def _update(self, ema_weight: float | torch.Tensor) -> None:
        """Device part: the optimizer step, then the EMA."""
        self.optimizer.step()
        self.ema.apply(self.model_state, ema_weight)

    def _eager_step(self, inputs: Any, lr: float,
                    step: int) -> tuple[float, float, dict[str, float], Any]:
        """The device part run eagerly, the guard checking the loss before the backward and
        the gradient norm before the update: (loss, grad_norm, extras, outputs)."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss, extras, outputs = self.objective.forward(inputs)
        self._guard(loss, step, "loss")
        self.optimizer.zero_grad(set_to_none=True)
        grad_norm = self._backward(loss)
        self._guard(grad_norm, step, "gradient norm")
        self._update(self.ema.next_weight())
        return (loss.item(), float(grad_norm),
                {key: host_value(value) for key, value in extras.items()}, outputs)

    def _graph_step(self, inputs: Any, lr: float,
                    step: int) -> tuple[float, float, dict[str, float], Any]:
        """The device part replayed (gpd_train.train.step.GraphStep); the guard checks the loss
        and gradient norm after it (the one sync of a step). A non-finite value has then
        reached the weights in memory, but nothing is saved: the checkpoints stay intact."""
        assert self.graph is not None
        (loss, grad_norm), extras, outputs = self.graph.run(inputs, lr, self.ema.next_weight())
        for value, what in ((loss, "loss"), (grad_norm, "gradient norm")):
            if not math.isfinite(value):
                self._stop(value, step, what)
        return loss, grad_norm, extras, outputs

    def _train_step(self, bar: tqdm) -> None:
        started = time.perf_counter()
        step = self.step + 1
        lr = self.learning_rate(step)
        self.model.train()
        inputs = self.objective.prepare(step)
        device_step = self._eager_step if self.graph is None else self._graph_step
        loss, grad_norm, extras, outputs = device_step(inputs, lr, step)
        self.objective.finish(outputs)
        self.step = step
        record = {"stage": self.name, "step": step, "loss": loss, "lr": lr,
                  "grad_norm": grad_norm, "seconds": time.perf_counter() - started,
                  **extras}
        record.update(parallel.mean_across_ranks({k: record[k] for k in ("loss", *extras)}))
        if parallel.is_main():
            self.metrics.log(record)
        if self.monitor is not None:
            self.monitor.after_step(self, record)
        bar.set_postfix(loss=f"{record['loss']:.4f}", refresh=False)
        bar.update(1)
        if step % self.checkpoint_every == 0:
            self.checkpoints.save(step)

    def _guard(self, value: torch.Tensor, step: int, what: str) -> None:
        if not parallel.all_finite(value):
            self._stop(value.item(), step, what)

    def _stop(self, value: float, step: int, what: str) -> NoReturn:
        latest = self._latest()
        kept = (f"the last good checkpoint {latest} is intact" if latest is not None
                else "no checkpoint had been written yet")
        raise NonFiniteLossError(
            f"[{self.name}] non-finite {what} ({value}) at step {step}; training stopped "
            f"without saving and {kept}. Lower the learning rate and continue with --resume.")
