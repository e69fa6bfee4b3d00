"""A CPU stand-in for CUDA graphs, so the real capture code (GraphStep, GraphSampler) runs in CI.

`emulate_cuda_graphs(monkeypatch)` replaces what that code calls in `torch.cuda`
(CUDAGraph, graph, Stream, stream, current_stream, is_current_stream_capturing) with:

- capture: the body runs once under a dispatch mode that records every aten op with its
  argument and result tensors (the tape), then every tensor it wrote in place is put back
  as it was, because a real capture launches nothing: the parameters, optimizer state and
  EMA must not move until the first replay;
- replay: the tape's ops run again on the same tensor objects, each result copied into the
  tensor the capture produced, as a graph's kernels write to fixed addresses. So values
  the body read from tensors (static inputs, a learning-rate tensor) are read afresh, and
  Python numbers it passed to ops are baked in, as in a real graph.

What it cannot show: anything about the GPU itself (streams, memory pools, capturable
kernels). Random ops and host reads are refused while capturing
(tests/host_syncs.py), as a real capture would fail or replay stale draws.
"""

from __future__ import annotations

import importlib
from contextlib import contextmanager
from typing import Any

import torch
from host_syncs import capture_problem
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import gpd_kernels.reference
import gpd_train.train.step
from gpd_model.graph_sampler import GraphSampler


def _written(func, args: tuple, kwargs: dict) -> list[torch.Tensor]:
    """The tensors an op writes in place (its schema's mutable arguments)."""
    written = []
    for position, argument in enumerate(func._schema.arguments):
        if argument.alias_info is None or not argument.alias_info.is_write:
            continue
        value = args[position] if position < len(args) else kwargs.get(argument.name)
        written += [t for t in tree_flatten(value)[0] if isinstance(t, torch.Tensor)]
    return written


class _Tape(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple[Any, tuple, dict, Any]] = []
        self.before: list[tuple[torch.Tensor, torch.Tensor]] = []  # (tensor, its old value)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        problem = capture_problem(func, args)
        if problem is not None:
            raise RuntimeError(f"emulated CUDA-graph capture: {problem} cannot be captured")
        self.before += [(t, t.detach().clone()) for t in _written(func, args, kwargs)]
        result = func(*args, **kwargs)
        self.ops.append((func, args, kwargs, result))
        return result

    def undo_writes(self) -> None:
        with torch.no_grad():
            for tensor, old in reversed(self.before):  # the oldest value of each wins
                tensor.copy_(old)
        self.before.clear()


class CpuGraph:
    """Stands in for torch.cuda.CUDAGraph."""

    def __init__(self) -> None:
        self.tape: _Tape | None = None
        self.replays = 0

    def replay(self) -> None:
        assert self.tape is not None, "replay before capture"
        self.replays += 1
        with torch.no_grad():
            for func, args, kwargs, captured in self.tape.ops:
                result = func(*args, **kwargs)
                for into, value in zip(tree_flatten(captured)[0], tree_flatten(result)[0],
                                       strict=True):
                    if isinstance(into, torch.Tensor) and into is not value:
                        into.copy_(value)


class _Stream:
    def __init__(self, *args, **kwargs) -> None:
        pass

    def wait_stream(self, other: _Stream) -> None:
        pass


_capturing: list[bool] = [False]


@contextmanager
def _graph(graph: CpuGraph, *args, **kwargs):
    graph.tape = _Tape()
    _capturing[0] = True
    try:
        with graph.tape:
            yield graph
    finally:
        _capturing[0] = False
        graph.tape.undo_writes()


@contextmanager
def _stream(stream: _Stream):
    yield stream


def emulate_cuda_graphs(monkeypatch) -> None:
    """Within the test, torch.cuda's graph API is the CPU stand-in above, and the CPU counts
    as a device with graphs: for --cuda-graph training (gpd_train.train.step.graphs_supported,
    AdamW(capturable=True)) and for the sampler (GraphSampler.graphs_enabled)."""
    monkeypatch.setattr(torch.cuda, "CUDAGraph", CpuGraph)
    monkeypatch.setattr(torch.cuda, "graph", _graph)
    monkeypatch.setattr(torch.cuda, "Stream", _Stream)
    monkeypatch.setattr(torch.cuda, "stream", _stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *args, **kwargs: _Stream())
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: _capturing[0])
    monkeypatch.setattr(gpd_kernels.reference, "graph_capturing", lambda tensor: _capturing[0])
    monkeypatch.setattr(gpd_train.train.step, "graphs_supported", lambda device: True)
    monkeypatch.setattr(importlib.import_module("torch.optim.adam"),
                        "_get_capturable_supported_devices", lambda supports_xla=True: ["cpu"])
    monkeypatch.setattr(GraphSampler, "graphs_enabled",
                        lambda self, device: True if self.use_graphs is None else self.use_graphs)
