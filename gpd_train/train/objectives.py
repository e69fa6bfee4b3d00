"""What each stage minimises: flow matching (stage 0) and online distillation (the rest)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from gpd_kernels import band_amplitude_loss, cfg_euler_step, double_step_target, freq_loss
from gpd_model import (
    CFG,
    Conditioning,
    Denoiser,
    DiTDenoiser,
    add_noise,
    euler_step,
    guided_branches,
    shift_sigma,
    sigma_grid,
    unconditional,
)
from gpd_train.devices import autocast
from gpd_train.errors import ConfigError
from gpd_train.run.lora import use_adapter
from gpd_train.train.lanes import LaneBatch, RolloutLanes
from gpd_train.train.step import eager_loss


class FlowMatching:
    """Stage 0: train the base teacher to predict ``u = eps - x0`` with CFG dropout.

    ``t_range``: the uniform time drawn before the shift, on [low, high] instead of [0, 1]
    (an expert learning its side of a boundary, gpd_train.train.tiny_moe)."""

    def __init__(self, *, model: nn.Module, data: Any, generator: torch.Generator,
                 batch_size: int, shift: float, cfg_dropout: float, device: torch.device,
                 precision: str, t_range: tuple[float, float] | None = None) -> None:
        self.model = model
        self.denoiser = DiTDenoiser(model)
        self.data = data
        self.generator = generator
        self.batch_size = batch_size
        self.shift = shift
        self.cfg_dropout = cfg_dropout
        self.device = device
        self.precision = precision
        self.t_range = t_range

    def prepare(self, step: int) -> dict[str, torch.Tensor]:
        cond, clean = self.data.draw(self.generator, self.batch_size, with_latents=True)
        dropped = torch.rand(self.batch_size, generator=self.generator) < self.cfg_dropout
        # Dropout drops the text only: an image condition stays (Wan's I2V guidance).
        cond = cond.where(dropped, unconditional(cond, self.data.negative))
        t = torch.rand(self.batch_size, generator=self.generator)
        if self.t_range is not None:
            t = self.t_range[0] + (self.t_range[1] - self.t_range[0]) * t
        sigma = shift_sigma(t, self.shift)
        noise = torch.randn(clean.shape, generator=self.generator)
        return {"noisy": add_noise(clean, noise, sigma).to(self.device),
                "target": (noise - clean).to(self.device), "sigma": sigma.to(self.device),
                **cond.to(self.device).tensors()}

    def forward(self, inputs: dict[str, torch.Tensor]
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        with autocast(self.device, self.precision):
            pred = self.denoiser(inputs["noisy"], inputs["sigma"],
                                 Conditioning.from_tensors(inputs))
        return (pred.float() - inputs["target"]).square().mean(), {}, {}

    def finish(self, outputs: dict[str, torch.Tensor]) -> None:
        pass

    def loss(self, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        return eager_loss(self, step)

    def stream_state(self) -> dict[str, Any]:
        return {}

    def load_stream_state(self, state: dict[str, Any]) -> None:
        if state:
            raise ConfigError(f"stage-0 checkpoint carries unexpected stream state {sorted(state)}")


@dataclass(frozen=True)
class AdapterDenoiser:
    """The student's own LoRA model (gpd_train.run.lora) run as a frozen stage teacher: the
    base plus ``adapter`` (``lora.TEACHER``) or the base alone (``lora.BASE``), with
    ``guidance_embedding`` as its guidance input (None: none)."""

    model: nn.Module
    adapter: str
    guidance_embedding: nn.Module | None = None

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor,
                 cond: Conditioning) -> torch.Tensor:
        with use_adapter(self.model, self.adapter, self.guidance_embedding):
            return DiTDenoiser(self.model)(x, sigma, cond)

    def modules(self) -> tuple[nn.Module, ...]:
        return (self.model,)


def stage_teacher(model: nn.Module, negative: Conditioning | None = None,
                  adapter: str | None = None,
                  guidance_embedding: nn.Module | None = None) -> Denoiser:
    """The frozen stage teacher as the targets query it: ``model`` (with ``adapter``, the
    student's LoRA model as ``AdapterDenoiser`` runs it), as a CFG pair around the lanes'
    w (``cond.guidance``) when ``negative`` is given, else one forward (taking w as an
    input if it has a guidance input)."""
    denoiser: Denoiser = (DiTDenoiser(model) if adapter is None
                          else AdapterDenoiser(model, adapter, guidance_embedding))
    return denoiser if negative is None else CFG(denoiser, negative)


@torch.no_grad()
def teacher_target(teacher: Denoiser, x_a: torch.Tensor, cond: Conditioning,
                   s_a: torch.Tensor, s_b: torch.Tensor,
                   s_c: torch.Tensor | None = None) -> torch.Tensor:
    """The velocity ``u*`` that takes ``x_a`` where the teacher goes (a ``CFG`` teacher's
    branches are combined by the fused kernels).

    Without ``s_c``: one teacher step ``s_a -> s_b``, i.e. the (guided) velocity itself (the
    guidance stage). With ``s_c``: the double step of design 4.2, ``x_a + (s_c - s_a) u* =
    x_c`` after two teacher Euler steps ``s_a -> s_b -> s_c`` (the halving stages).
    """
    u_cond, u_uncond, weight = guided_branches(teacher, x_a, s_a, cond)
    x_b, g1 = cfg_euler_step(x_a, u_cond, u_uncond, weight, s_a, s_b)
    if s_c is None:
        return g1
    u_cond, u_uncond, weight = guided_branches(teacher, x_b, s_b, cond)
    return double_step_target(g1, u_cond, u_uncond, weight, s_a, s_b, s_c)


@torch.no_grad()
def euler_path(teacher: Denoiser, x: torch.Tensor, cond: Conditioning,
               path: torch.Tensor) -> torch.Tensor:
    """Where the teacher's Euler steps along ``path`` [m + 1, B] take ``x`` (x's dtype); a
    step whose two sigmas are equal leaves that sample where it is."""
    for s_from, s_to in zip(path, path[1:], strict=False):
        u_cond, u_uncond, weight = guided_branches(teacher, x, s_from, cond)
        x, _ = cfg_euler_step(x, u_cond, u_uncond, weight, s_from, s_to)
    return x


def velocity_between(x_from: torch.Tensor, x_to: torch.Tensor, s_from: torch.Tensor,
                     s_to: torch.Tensor) -> torch.Tensor:
    """The one Euler velocity (float32) that goes from ``x_from`` at ``s_from`` [B] to
    ``x_to`` at ``s_to``."""
    step = (s_to - s_from).float().view(-1, *([1] * (x_from.dim() - 1)))
    return (x_to.float() - x_from.float()) / step


@torch.no_grad()
def rollout_target(teacher: Denoiser, x_a: torch.Tensor, cond: Conditioning,
                   path: torch.Tensor) -> torch.Tensor:
    """The velocity that takes ``x_a`` where ``len(path) - 1`` teacher Euler steps along
    ``path`` [r + 1, B] go: one or two steps through ``teacher_target`` (the double step's
    fused kernel), more by explicit steps."""
    if len(path) <= 3:
        return teacher_target(teacher, x_a, cond, *path, *([None] * (3 - len(path))))
    x_end = euler_path(teacher, x_a, cond, path)
    return velocity_between(x_a, x_end, path[0], path[-1])


@dataclass
class StageGrid:
    """A student grid of ``steps`` points and the teacher's finer points inside each step.

    ``fine_steps`` r teacher steps make one student step (the teacher's grid has rK steps
    and the K-step grid is every r-th of its points): 2 when halving, 1 for the guidance
    stage, any r for a schedule such as [48, 16, 8, 4].
    """

    steps: int
    shift: float
    fine_steps: int
    device: torch.device

    def __post_init__(self) -> None:
        if isinstance(self.fine_steps, bool) or not isinstance(self.fine_steps, int) \
                or self.fine_steps < 1:
            raise ValueError(f"fine_steps must be an int >= 1, got {self.fine_steps!r}")
        self.student = sigma_grid(self.steps, self.shift).float().to(self.device)
        self.teacher = sigma_grid(self.fine_steps * self.steps, self.shift).float().to(
            self.device)

    def sigmas(self, index: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(s_a, s_b, s_c) [B] of student indices ``index`` [B]; s_c is None for one fine step."""
        if self.fine_steps > 2:
            raise ValueError(f"sigmas() names at most two fine steps; this grid has "
                             f"{self.fine_steps}: use path()")
        if self.fine_steps == 1:
            return self.student[index], self.student[index + 1], None
        return self.student[index], self.teacher[2 * index + 1], self.teacher[2 * index + 2]

    lane_stride = 1  # rollout lanes index the student grid and move one step per update

    def path(self, index: torch.Tensor) -> torch.Tensor:
        """The teacher's sigmas [r + 1, B] inside the student steps from indices ``index``."""
        offsets = torch.arange(self.fine_steps + 1, device=index.device)
        return self.teacher[self.fine_steps * index[None, :] + offsets[:, None]]

    def next_sigma(self, index: torch.Tensor) -> torch.Tensor:
        return self.student[index + 1]

    def target(self, teacher: Denoiser, x: torch.Tensor, cond: Conditioning,
               index: torch.Tensor) -> torch.Tensor:
        """The stage teacher's r-step target from student indices ``index`` (the student
        grid is every r-th teacher point bit for bit, so ``path`` starts at its sigmas)."""
        return rollout_target(teacher, x, cond, self.path(index))


@dataclass
class GuidanceRange:
    """The CFG scale w of each trajectory: fixed (``low == high``) or uniform in [low, high]."""

    low: float
    high: float

    def draw(self, count: int, generator: torch.Generator) -> torch.Tensor:
        if self.low == self.high:
            return torch.full((count,), float(self.low))
        return self.low + (self.high - self.low) * torch.rand(count, generator=generator)


class OnlineDistillation:
    """Regress the student on the frozen stage teacher's target at online states.

    ``student`` is the denoiser trained (its networks' parameters get the gradients),
    ``teacher`` the frozen stage teacher. The target is ``teacher_target`` on ``grid``
    (one or two teacher steps per student step). States come from ``source``: ``teacher``
    or ``student`` rollouts (``lanes``), or ``data`` (a data latent noised to a random grid
    point: vanilla PD). Each trajectory
    carries its CFG scale w from ``guidance`` in its Conditioning: a CFG teacher combines
    with it, a student (or teacher) with a guidance input is given it.
    """

    def __init__(self, *, student: Denoiser, teacher: Denoiser, data: Any,
                 generator: torch.Generator, grid: StageGrid, guidance: GuidanceRange,
                 source: str, batch_size: int, freq_weight: float,
                 freq_params: dict[str, float], device: torch.device, precision: str,
                 lane_groups: int = 1, freq_form: str = "fourier_mse") -> None:
        if source not in ("student", "teacher", "data"):
            raise ValueError(f"state source must be student, teacher or data, got {source!r}")
        self.student = student
        self.teacher = teacher
        self.data = data
        self.generator = generator
        self.grid = grid
        self.guidance = guidance
        self.source = source
        self.batch_size = batch_size
        self.freq_weight = freq_weight
        self.freq_params = freq_params
        self.freq_form = freq_form
        self.device = device
        self.precision = precision
        self.lanes = None if source == "data" else RolloutLanes(
            batch_size=batch_size, groups=lane_groups, steps=grid.steps, fresh=self._fresh,
            device=device, stride=grid.lane_stride)

    def _fresh(self, count: int) -> tuple[torch.Tensor, Conditioning]:
        cond, _ = self.data.draw(self.generator, count, with_latents=False)
        noise = torch.randn((count, *self.data.latent_shape), generator=self.generator)
        guidance = self.guidance.draw(count, self.generator)
        cond = dataclasses.replace(cond, guidance=guidance)
        return noise.to(self.device), cond.to(self.device)

    def _target(self, batch: LaneBatch) -> torch.Tensor:
        return self.grid.target(self.teacher, batch.x, batch.cond, batch.index)

    def _student_velocity(self, batch: LaneBatch) -> torch.Tensor:
        return self.student(batch.x, self.grid.student[batch.index], batch.cond).float()

    def _next_state(self, batch: LaneBatch, velocity: torch.Tensor) -> torch.Tensor:
        return euler_step(batch.x, velocity, self.grid.student[batch.index],
                          self.grid.next_sigma(batch.index))

    @torch.no_grad()
    def _rollout_step(self, batch: LaneBatch) -> torch.Tensor:
        """One student step of the state source (used to stagger fresh lanes)."""
        with autocast(self.device, self.precision):
            velocity = (self._target(batch) if self.source == "teacher"
                        else self._student_velocity(batch))
        return self._next_state(batch, velocity)

    def _noised_data(self) -> LaneBatch:
        cond, clean = self.data.draw(self.generator, self.batch_size, with_latents=True)
        index = torch.randint(0, self.grid.steps, (self.batch_size,), generator=self.generator)
        noise = torch.randn(clean.shape, generator=self.generator)
        guidance = self.guidance.draw(self.batch_size, self.generator)
        index = index.to(self.device)
        x = add_noise(clean, noise, self.grid.student[index].cpu())
        cond = dataclasses.replace(cond, guidance=guidance)
        return LaneBatch(x.to(self.device), cond.to(self.device), index)

    def prepare(self, step: int) -> dict[str, torch.Tensor]:
        """The states to train on: the lanes' current group, or noised data."""
        batch = self._noised_data() if self.lanes is None else self.lanes.current(
            self._rollout_step)
        return batch.inputs()

    def forward(self, inputs: dict[str, torch.Tensor]
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """The loss, and the batch's next states (``x_next``) when lanes roll out."""
        batch = LaneBatch.from_inputs(inputs)
        with autocast(self.device, self.precision):
            u_star = self._target(batch)
            u_student = self._student_velocity(batch)
        mse = (u_student - u_star).square().mean()
        loss = mse
        extras = {"mse": mse.detach(), "mean_index": batch.index.float().mean()}
        if self.freq_weight > 0:
            freq = self._freq_loss(batch, u_student, u_star)
            loss = loss + self.freq_weight * freq
            extras["freq"] = freq.detach()
        outputs = {}
        if self.lanes is not None:
            velocity = u_star if self.source == "teacher" else u_student.detach()
            outputs["x_next"] = self._next_state(batch, velocity)
        return loss, extras, outputs

    def _freq_loss(self, batch: LaneBatch, u_student: torch.Tensor,
                   u_star: torch.Tensor) -> torch.Tensor:
        if self.freq_form == "fourier_mse":
            return freq_loss(u_student, u_star, **self.freq_params)
        # Blur is lost amplitude of the clean sample x - sigma u, not of the velocity (whose
        # bands also hold the state's noise): compare x / sigma - u, the clean predictions in
        # velocity units, so the term weighs each step as the velocity MSE does (their
        # difference is u* - u_S). A student grid's start points have sigma > 0.
        sigma = self.grid.student[batch.index].reshape(-1, *(1,) * (u_star.dim() - 1))
        scaled = batch.x.float() / sigma
        return band_amplitude_loss(scaled - u_student, scaled - u_star)

    def finish(self, outputs: dict[str, torch.Tensor]) -> None:
        if self.lanes is not None:
            self.lanes.advance(outputs["x_next"], self._rollout_step)

    def loss(self, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        return eager_loss(self, step)

    def stream_state(self) -> dict[str, Any]:
        return {} if self.lanes is None else self.lanes.state_dict()

    def load_stream_state(self, state: dict[str, Any]) -> None:
        if self.lanes is not None:
            self.lanes.load_state_dict(state)


@dataclass
class DistillSetup:
    """What a distillation stage's objective is built from (a chain's objective factory
    receives it with one data stream's generator and batch size)."""

    student: nn.Module
    teacher: Denoiser  # the stage teacher (a CFG around it where it runs as a CFG pair)
    data: Any
    grid: Any  # StageGrid, or the grid the chain's objective reads (horizon.HorizonGrid)
    guidance: GuidanceRange
    chain: Any  # the chain's DistillConfig (state source, lane groups, frequency loss)
    freq_weight: float
    device: torch.device
    precision: str
    base: nn.Module | None = None  # the frozen stage-0 teacher, for a horizon chain's targets


def online_arguments(setup: DistillSetup, generator: torch.Generator, batch_size: int,
                     teacher: Denoiser | None = None) -> dict[str, Any]:
    """``OnlineDistillation``'s arguments from a stage's setup (``teacher``: another stage
    teacher than ``setup.teacher``)."""
    chain = setup.chain
    return {"student": DiTDenoiser(setup.student), "teacher": teacher or setup.teacher,
            "data": setup.data,
            "generator": generator, "grid": setup.grid, "guidance": setup.guidance,
            "source": chain.state_source, "batch_size": batch_size,
            "freq_weight": setup.freq_weight,
            "freq_params": {"alpha_s": chain.freq_alpha_s, "alpha_t": chain.freq_alpha_t,
                            "gamma": chain.freq_gamma},
            "device": setup.device, "precision": setup.precision,
            "lane_groups": chain.lane_groups, "freq_form": chain.freq_form}


def online_distillation(setup: DistillSetup, generator: torch.Generator,
                        batch_size: int) -> OnlineDistillation:
    """The built-in chains' objective (``Chain.objective`` None)."""
    return OnlineDistillation(**online_arguments(setup, generator, batch_size))
