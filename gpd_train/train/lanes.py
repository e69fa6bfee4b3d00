"""Rollout lanes: the online states of a distillation stage, staggered over the student grid.

A pool of ``batch_size * groups`` trajectories, each with its prompt, its CFG scale w and
its position on the grid. Update ``n`` trains on group ``n % groups`` (every
``groups``-th lane, so each batch mixes grid indices) and then moves only those lanes one
student step on, restarting finished ones from fresh noise, prompt and w. With one group,
consecutive batches are the same trajectories one step on; more groups decorrelate them
at no extra compute.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from gpd_model import Conditioning
from gpd_train.errors import ConfigError


@dataclass
class LaneBatch:
    """The states one update trains on (copies; the pool changes only through ``advance``)."""

    x: torch.Tensor  # [B, C, T, H, W]
    cond: Conditioning  # its prompts, with ``guidance`` [B] the CFG scale each one follows
    index: torch.Tensor  # [B] student grid index of x

    def inputs(self) -> dict[str, torch.Tensor]:
        """A flat dict of the tensors themselves (what a captured step takes)."""
        return {"x": self.x, **self.cond.tensors(), "index": self.index}

    @classmethod
    def from_inputs(cls, inputs: dict[str, torch.Tensor]) -> LaneBatch:
        return cls(inputs["x"], Conditioning.from_tensors(inputs), inputs["index"])


# fresh(count) -> (noise, cond) for ``count`` new trajectories, cond carrying their w
FreshFn = Callable[[int], tuple[torch.Tensor, Conditioning]]
# step(batch) -> the states one student step on from ``batch``
StepFn = Callable[[LaneBatch], torch.Tensor]


class RolloutLanes:
    """``steps`` grid points; each update moves a lane ``stride`` of them. A lane that passes
    the end restarts from fresh noise at its overshoot (rolled there by ``step``), so lanes
    keep their phase on the grid (with stride 1 the overshoot is always 0)."""

    def __init__(self, *, batch_size: int, groups: int, steps: int, fresh: FreshFn,
                 device: torch.device, stride: int = 1) -> None:
        if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1:
            raise ValueError(f"lane_groups must be a positive int, got {groups!r}")
        self.batch_size = batch_size
        self.groups = groups
        self.steps = steps
        self.fresh = fresh
        self.device = device
        self.stride = stride
        self.pool: dict[str, torch.Tensor] | None = None  # x, index, group
        self.cond: Conditioning | None = None

    @property
    def count(self) -> int:
        return self.batch_size * self.groups

    @torch.no_grad()
    def start(self, step: StepFn) -> None:
        """Fresh lanes at indices spread evenly over the grid, rolled there by ``step``."""
        x, cond = self.fresh(self.count)
        index = torch.arange(self.count, device=self.device) * self.steps // self.count
        _roll(x, cond, index, step)
        self.pool = {"x": x, "index": index, "group": torch.zeros((), dtype=torch.long)}
        self.cond = cond

    def _rows(self) -> torch.Tensor:
        assert self.pool is not None
        return torch.arange(int(self.pool["group"]), self.count, self.groups,
                            device=self.device)

    def current(self, step: StepFn) -> LaneBatch:
        """The group whose turn it is (starting the pool on first use)."""
        if self.pool is None:
            self.start(step)
        assert self.pool is not None and self.cond is not None
        rows = self._rows()
        return LaneBatch(self.pool["x"][rows], self.cond[rows], self.pool["index"][rows])

    @torch.no_grad()
    def advance(self, x_next: torch.Tensor, step: StepFn) -> None:
        """Store the current group's next states, restart finished lanes, pass the turn on."""
        assert self.pool is not None and self.cond is not None
        rows = self._rows()
        index = self.pool["index"][rows] + self.stride
        finished = index >= self.steps
        x_next = x_next.to(self.pool["x"].dtype)
        cond = self.cond[rows]
        if finished.any():
            noise, fresh_cond = self.fresh(int(finished.sum()))
            x_next[finished] = noise.to(x_next.dtype)
            cond = cond.put(finished, fresh_cond)
            index[finished] -= self.steps
            _roll(x_next, cond, torch.where(finished, index, 0), step)
        for key, value in (("x", x_next), ("index", index)):
            self.pool[key][rows] = value
        self.cond = self.cond.put(rows, cond)
        self.pool["group"] = (self.pool["group"] + 1) % self.groups

    def state_dict(self) -> dict[str, Any]:
        """The pool (x, index, group) and its Conditioning's slots (text, guidance, ...)."""
        if self.pool is None or self.cond is None:
            return {}
        return {k: v.cpu() for k, v in {**self.pool, **self.cond.tensors()}.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            self.pool, self.cond = None, None
            return
        if not _POOL <= set(state) or "text" not in state or state["x"].shape[0] != self.count:
            raise ConfigError(f"checkpoint rollout lanes do not match this run (keys "
                             f"{sorted(state)}, expected {sorted(_POOL | {'text'})} and the "
                             f"conditioning's with {self.count} lanes = batch "
                             f"{self.batch_size} x {self.groups} groups)")
        self.pool = {key: state[key].to(self.device) if key != "group" else state[key]
                     for key in _POOL}
        self.cond = Conditioning.from_tensors(
            {key: value for key, value in state.items() if key not in _POOL}).to(self.device)


_POOL = {"x", "index", "group"}


def _roll(x: torch.Tensor, cond: Conditioning, index: torch.Tensor, step: StepFn) -> None:
    """Move each lane of ``x`` (in place) from grid point 0 to ``index`` by ``step``."""
    for position in range(int(index.max()) if len(index) else 0):
        active = index > position
        at = torch.full((int(active.sum()),), position, device=index.device)
        x[active] = step(LaneBatch(x[active], cond[active], at))
