"""One training step split in a host part and a device part; the device part eager or
captured once as a CUDA graph (``--cuda-graph``).

An objective (gpd_train.train.loop.Objective) gives three functions:

- ``prepare(step)``, the host part before the update: draw the batch (CPU generator, data,
  rollout-lane bookkeeping) and return its inputs as a flat dict of device tensors;
- ``forward(inputs)``, the device part: ``(loss, extras, outputs)``, with extras (the
  scalars it logs) and outputs as tensors, without host syncs or branches on values;
- ``finish(outputs)``, the host part after it (e.g. moving the rollout lanes on).

StageTrainer runs forward, backward, gradient clipping, the optimizer and the EMA update
between them: eagerly (the CPU, and CUDA by default), or, with ``GraphStep``, as one CUDA
graph replayed per step: static input buffers the host part's tensors are copied into,
a capturable AdamW whose learning rate is a device tensor set before each replay, the EMA
weight likewise, and every logged scalar read back in one sync after the replay (when the
non-finite guard checks them). Both run the same functions, so the eager step is the
graph's step run without capture.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

# forward(inputs) -> (loss, extras, outputs); see the module docstring
ForwardFn = Callable[[Any], tuple[torch.Tensor, dict[str, torch.Tensor], Any]]


def host_value(value: torch.Tensor) -> float:
    """A logged scalar: a 0-d tensor's value, or the mean of one value per data stream
    (summed in Python in stream order, as the streams' values always were)."""
    values = value.detach().reshape(-1).tolist()
    return values[0] if len(values) == 1 else sum(values) / len(values)


def eager_loss(objective: Any, step: int) -> tuple[torch.Tensor, dict[str, float]]:
    """The three parts in one call: the differentiable loss and the logged extras."""
    inputs = objective.prepare(step)
    loss, extras, outputs = objective.forward(inputs)
    objective.finish(outputs)
    return loss, {key: host_value(value) for key, value in extras.items()}


def graphs_supported(device: torch.device) -> bool:
    """Whether training steps on ``device`` can be captured as graphs: CUDA only (the tests
    stand a CPU emulation of torch.cuda's graph API in for it, tests/cpu_graphs.py)."""
    return device.type == "cuda"


def cuda_graph_refusal(*, device: torch.device, processes: int, streams: int,
                       activation_checkpointing: bool, lora_stage: str | None) -> str | None:
    """Why ``--cuda-graph`` cannot train this stage (None: it can)."""
    if not graphs_supported(device):
        return (f"--cuda-graph captures the training step on a CUDA device, this run's device "
                f"is {device}: give --device cuda, or drop --cuda-graph (the CPU runs the "
                "eager step)")
    if processes > 1:
        return (f"--cuda-graph is not supported under torchrun ({processes} processes): "
                "FSDP2's collectives are not captured; drop --cuda-graph")
    if streams > 1:
        return (f"--cuda-graph is not supported with {streams} data streams per process "
                "(parallel.data_streams): the graph takes one batch; drop one of them")
    if activation_checkpointing:
        return ("--cuda-graph is not supported with --activation-checkpointing (recomputing "
                "blocks inside a captured backward is untested); drop one of them")
    if lora_stage is not None:
        return (f"--cuda-graph is not supported for LoRA stages ({lora_stage} trains "
                "adapters, and its stage teacher switches adapters on the shared model, "
                "which a captured graph cannot do); drop --cuda-graph or --lora-rank")
    return None


class GraphStep:
    """The device part of a training step as a CUDA graph: captured once, replayed per step.

    ``forward`` is the objective's; ``backward(loss)`` returns the clipped gradient's norm;
    ``update(ema_weight)`` steps the optimizer and the EMA. The first ``warmup_steps`` steps
    run eagerly on a side stream (the real training steps, not throw-away ones: they fill
    lazy caches and the optimizer state before capture); the next is captured and every
    step from it on replays. Shapes are those of the first batch: ``prepare`` must return
    the same shapes every step (it does: the batch size is fixed).
    """

    def __init__(self, *, forward: ForwardFn, backward: Callable[[torch.Tensor], torch.Tensor],
                 update: Callable[[torch.Tensor], None], optimizer: torch.optim.Optimizer,
                 device: torch.device, warmup_steps: int = 3) -> None:
        if not graphs_supported(device):
            raise ValueError(f"GraphStep needs a CUDA device, got {device}")
        if warmup_steps < 1:
            raise ValueError(f"GraphStep needs >= 1 eager warm-up step, got {warmup_steps}")
        self.forward = forward
        self.backward = backward
        self.update = update
        self.optimizer = optimizer
        self.device = device
        self.warmup_steps = warmup_steps
        self.lr = torch.zeros((), dtype=torch.float32, device=device)
        self.ema_weight = torch.zeros((), dtype=torch.float32, device=device)
        self.eager_steps = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.inputs: dict[str, torch.Tensor] = {}
        self.scalars: torch.Tensor | None = None
        self.outputs: Any = None
        self.extra_keys: list[str] = []
        self.bind_optimizer()

    def bind_optimizer(self) -> None:
        """A capturable optimizer reading ``self.lr`` (again after a checkpoint load, which
        brings back the portable float lr and non-capturable flag, see OptimizerState)."""
        if self.graph is not None:
            raise RuntimeError("the optimizer was rebound after the step was captured")
        self.optimizer.defaults["capturable"] = True
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr
            group["capturable"] = True
        for state in self.optimizer.state.values():
            if isinstance(state.get("step"), torch.Tensor):
                state["step"] = state["step"].to(self.device, torch.float32)

    def _body(self, inputs: Any) -> tuple[torch.Tensor, Any, list[str]]:
        loss, extras, outputs = self.forward(inputs)
        grad_norm = self.backward(loss)
        self.update(self.ema_weight)
        scalars = torch.stack([loss.detach().float(), grad_norm.detach().float(),
                               *(value.detach().float().reshape(()) for value in extras.values())])
        return scalars, outputs, list(extras)

    def run(self, inputs: dict[str, torch.Tensor], lr: float,
            ema_weight: float) -> tuple[list[float], dict[str, float], Any]:
        """One step: ``([loss, grad_norm], extras, outputs)`` (one host sync)."""
        self.lr.fill_(lr)
        self.ema_weight.fill_(ema_weight)
        if self.graph is None and self.eager_steps < self.warmup_steps:
            self.eager_steps += 1
            current = torch.cuda.current_stream(self.device)
            side = torch.cuda.Stream(device=self.device)
            side.wait_stream(current)
            with torch.cuda.stream(side):
                self.optimizer.zero_grad(set_to_none=True)
                scalars, outputs, self.extra_keys = self._body(inputs)
            current.wait_stream(side)
        else:
            if self.graph is None:
                self._capture(inputs)
            for key, value in inputs.items():
                self.inputs[key].copy_(value)
            assert self.graph is not None and self.scalars is not None
            self.graph.replay()
            scalars, outputs = self.scalars, self.outputs
        values = scalars.tolist()
        return values[:2], dict(zip(self.extra_keys, values[2:], strict=True)), outputs

    def _capture(self, inputs: dict[str, torch.Tensor]) -> None:
        if not isinstance(inputs, dict) or not all(
                isinstance(value, torch.Tensor) for value in inputs.values()):
            raise TypeError("a captured step takes a flat dict of tensors from prepare()")
        self.inputs = {key: value.clone() for key, value in inputs.items()}
        # Gradients allocated inside the capture live in the graph's pool: each replay's
        # backward writes them afresh, as zero_grad(set_to_none=True) + backward does eagerly.
        self.optimizer.zero_grad(set_to_none=True)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.scalars, self.outputs, keys = self._body(self.inputs)
        if keys != self.extra_keys:
            raise RuntimeError(f"the captured step logs {keys}, the eager steps {self.extra_keys}")
        self.graph = graph
