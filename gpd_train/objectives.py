"""What each stage minimises: flow matching (stage 0) and online GPD distillation (1..3)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from gpd_kernels import cfg_euler_step, double_step_target, freq_loss
from gpd_model import branch_velocities, shift_sigma, sigma_grid, timestep_from_sigma

from .loop import autocast


def _per_sample(values: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return values.view(-1, *([1] * (x.dim() - 1)))


class FlowMatching:
    """Stage 0: train the base teacher to predict ``u = eps - x0`` with CFG dropout."""

    def __init__(self, *, model: nn.Module, data: Any, generator: torch.Generator,
                 batch_size: int, shift: float, cfg_dropout: float, device: torch.device,
                 precision: str) -> None:
        self.model = model
        self.data = data
        self.generator = generator
        self.batch_size = batch_size
        self.shift = shift
        self.cfg_dropout = cfg_dropout
        self.device = device
        self.precision = precision

    def loss(self, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        context, clean = self.data.draw(self.generator, self.batch_size, with_latents=True)
        dropped = torch.rand(self.batch_size, generator=self.generator) < self.cfg_dropout
        context = torch.where(dropped[:, None, None], self.data.negative_context, context)
        sigma = shift_sigma(torch.rand(self.batch_size, generator=self.generator), self.shift)
        noise = torch.randn(clean.shape, generator=self.generator)
        noisy = (1.0 - _per_sample(sigma, clean)) * clean + _per_sample(sigma, clean) * noise
        noisy, target = noisy.to(self.device), (noise - clean).to(self.device)
        with autocast(self.device, self.precision):
            pred = self.model(noisy, timestep_from_sigma(sigma.to(self.device)),
                              context.to(self.device))
        return (pred.float() - target).square().mean(), {}

    def after_update(self) -> None:
        """Flow matching keeps no state between batches."""

    def stream_state(self) -> dict[str, Any]:
        return {}

    def load_stream_state(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"stage-0 checkpoint carries unexpected stream state {sorted(state)}")


@torch.no_grad()
def online_target(teacher: nn.Module, x_a: torch.Tensor, context: torch.Tensor,
                  neg_context: torch.Tensor | None, guidance: torch.Tensor | None,
                  s_a: torch.Tensor, s_b: torch.Tensor, s_c: torch.Tensor) -> torch.Tensor:
    """The teacher double-step target ``u*`` (design 4.2): ``x_a + (s_c - s_a) u* = x_c``.

    ``guidance`` [B] and ``neg_context`` [B, L, D] are both given (CFG teacher) or both None.
    """
    if (guidance is None) != (neg_context is None):
        raise ValueError("online_target: guidance and neg_context must be given together, got "
                         f"guidance={'set' if guidance is not None else None}, "
                         f"neg_context={'set' if neg_context is not None else None}")
    u_cond, u_uncond = branch_velocities(teacher, x_a, s_a, context, neg_context)
    x_b, g1 = cfg_euler_step(x_a, u_cond, u_uncond, guidance, s_a, s_b)
    u_cond, u_uncond = branch_velocities(teacher, x_b, s_b, context, neg_context)
    return double_step_target(g1, u_cond, u_uncond, guidance, s_a, s_b, s_c)


class OnlineDistillation:
    """Stage k >= 1: regress the student on the frozen stage teacher's double step.

    States come from ``source``: ``student`` or ``teacher`` rollouts, or ``data`` (noised
    data latents at a random grid index: vanilla PD). Rollouts live in a pool of
    ``batch_size * lane_groups`` lanes staggered over the student grid; update ``n`` trains
    on group ``n % lane_groups`` (every ``lane_groups``-th lane, so each batch mixes grid
    indices) and advances only those lanes one student step, restarting finished ones from
    fresh noise and a fresh prompt. With one group, consecutive batches are the same
    trajectories one step on; more groups decorrelate them at no extra compute.
    """

    def __init__(self, *, student: nn.Module, teacher: nn.Module, data: Any,
                 generator: torch.Generator, student_steps: int, shift: float,
                 guidance: float | None, source: str, batch_size: int, freq_weight: float,
                 freq_params: dict[str, float], device: torch.device, precision: str,
                 lane_groups: int = 1) -> None:
        if source not in ("student", "teacher", "data"):
            raise ValueError(f"state source must be student, teacher or data, got {source!r}")
        if not isinstance(lane_groups, int) or isinstance(lane_groups, bool) or lane_groups < 1:
            raise ValueError(f"lane_groups must be a positive int, got {lane_groups!r}")
        self.student = student
        self.teacher = teacher
        self.data = data
        self.generator = generator
        self.steps = student_steps
        self.student_grid = sigma_grid(student_steps, shift).float().to(device)
        self.teacher_grid = sigma_grid(2 * student_steps, shift).float().to(device)
        self.guidance = guidance
        self.source = source
        self.batch_size = batch_size
        self.lane_groups = lane_groups
        self.freq_weight = freq_weight
        self.freq_params = freq_params
        self.device = device
        self.precision = precision
        self.lanes: dict[str, torch.Tensor] | None = None
        self._last: dict[str, torch.Tensor] = {}

    # -- states -------------------------------------------------------------------------
    def _fresh(self, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        context, _ = self.data.draw(self.generator, count, with_latents=False)
        noise = torch.randn((count, *self.data.latent_shape), generator=self.generator)
        return noise.to(self.device), context.to(self.device)

    def _guided(self, count: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if self.guidance is None:
            return None, None
        neg = self.data.negative_context.to(self.device).expand(count, -1, -1)
        return torch.full((count,), float(self.guidance), device=self.device), neg

    def sigmas(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(s_a, s_b, s_c) [B] of student grid indices ``index`` [B]."""
        return (self.student_grid[index], self.teacher_grid[2 * index + 1],
                self.teacher_grid[2 * index + 2])

    def _rollout_velocity(self, x: torch.Tensor, context: torch.Tensor,
                          index: torch.Tensor) -> torch.Tensor:
        """The source's velocity for one student step from grid ``index``."""
        s_a, s_b, s_c = self.sigmas(index)
        with autocast(self.device, self.precision):
            if self.source == "teacher":
                guidance, neg = self._guided(len(index))
                return online_target(self.teacher, x, context, neg, guidance, s_a, s_b, s_c)
            return self.student(x, timestep_from_sigma(s_a), context).float()

    @torch.no_grad()
    def _start_lanes(self) -> None:
        """Fresh lanes staggered over the grid, rolled out by the state source."""
        count = self.batch_size * self.lane_groups
        x, context = self._fresh(count)
        index = torch.arange(count, device=self.device) * self.steps // count
        for position in range(int(index.max())):
            active = index > position
            at = torch.full((int(active.sum()),), position, device=self.device)
            velocity = self._rollout_velocity(x[active], context[active], at)
            s_a, _, s_c = self.sigmas(at)
            x[active] = (x[active] + _per_sample(s_c - s_a, velocity) * velocity).to(x.dtype)
        self.lanes = {"x": x, "context": context, "index": index,
                      "group": torch.zeros((), dtype=torch.long)}

    def _group_rows(self) -> torch.Tensor:
        assert self.lanes is not None
        group = int(self.lanes["group"])
        return torch.arange(group, self.batch_size * self.lane_groups, self.lane_groups,
                            device=self.device)

    def _states(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.source == "data":
            context, clean = self.data.draw(self.generator, self.batch_size, with_latents=True)
            index = torch.randint(0, self.steps, (self.batch_size,), generator=self.generator)
            noise = torch.randn(clean.shape, generator=self.generator)
            index = index.to(self.device)
            s_a = self.student_grid[index].cpu()
            x_a = (1.0 - _per_sample(s_a, clean)) * clean + _per_sample(s_a, clean) * noise
            return x_a.to(self.device), context.to(self.device), index
        if self.lanes is None:
            self._start_lanes()
        rows = self._group_rows()
        assert self.lanes is not None
        return self.lanes["x"][rows], self.lanes["context"][rows], self.lanes["index"][rows]

    # -- objective ----------------------------------------------------------------------
    def loss(self, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        x_a, context, index = self._states()
        s_a, s_b, s_c = self.sigmas(index)
        guidance, neg = self._guided(len(index))
        with autocast(self.device, self.precision):
            u_star = online_target(self.teacher, x_a, context, neg, guidance, s_a, s_b, s_c)
            u_student = self.student(x_a, timestep_from_sigma(s_a), context).float()
        mse = (u_student - u_star).square().mean()
        loss = mse
        extras = {"mse": mse.item(), "mean_index": index.float().mean().item()}
        if self.freq_weight > 0:
            freq = freq_loss(u_student, u_star, **self.freq_params)
            loss = loss + self.freq_weight * freq
            extras["freq"] = freq.item()
        self._last = {"x": x_a, "u_student": u_student.detach(), "u_star": u_star,
                      "index": index}
        return loss, extras

    @torch.no_grad()
    def after_update(self) -> None:
        if self.source == "data" or self.lanes is None:
            return
        last, rows = self._last, self._group_rows()
        velocity = last["u_star"] if self.source == "teacher" else last["u_student"]
        s_a, _, s_c = self.sigmas(last["index"])
        x = (last["x"] + _per_sample(s_c - s_a, velocity) * velocity).to(last["x"].dtype)
        index = last["index"] + 1
        context = self.lanes["context"][rows]
        finished = index >= self.steps
        if finished.any():
            noise, fresh_context = self._fresh(int(finished.sum()))
            x[finished] = noise.to(x.dtype)
            context[finished] = fresh_context
            index[finished] = 0
        self.lanes["x"][rows], self.lanes["context"][rows] = x, context
        self.lanes["index"][rows] = index
        self.lanes["group"] = (self.lanes["group"] + 1) % self.lane_groups

    def stream_state(self) -> dict[str, Any]:
        if self.lanes is None:
            return {}
        return {key: value.cpu() for key, value in self.lanes.items()}

    def load_stream_state(self, state: dict[str, Any]) -> None:
        if self.source == "data" or not state:
            self.lanes = None
            return
        expected = {"x", "context", "index", "group"}
        lanes = self.batch_size * self.lane_groups
        if set(state) != expected or state["x"].shape[0] != lanes:
            raise ValueError(f"checkpoint rollout lanes do not match this run (keys "
                             f"{sorted(state)}, expected {sorted(expected)} with {lanes} lanes "
                             f"= batch {self.batch_size} x {self.lane_groups} groups)")
        self.lanes = {key: value.to(self.device) if key != "group" else value
                      for key, value in state.items()}
