"""CUDA-graph Euler sampler: the whole K-step loop captured once, replayed per call.

The student samples guidance-free in a handful of steps, where kernel-launch overhead
of ~30 blocks x dozens of small kernels per step dominates at small sizes. Capturing the
complete loop (every model forward and Euler update) as one CUDA graph removes it.

Inputs are copied into static buffers and the graph is replayed; a change of shape,
dtype, device, step grid, guidance mode or model placement gives a new capture key and
a new capture (the last `max_graphs` captures are kept). On CPU, or with
`use_graphs=False`, the same loop runs eagerly and matches `euler_sample`.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn

from .sampler import _per_sample, euler_loop

__all__ = ["CaptureKey", "GraphSampler", "capture_key", "sample_teacher"]


@dataclass(frozen=True)
class CaptureKey:
    """Everything a captured graph depends on besides the values in its static buffers."""

    noise: tuple[tuple[int, ...], torch.dtype]
    context: tuple[tuple[int, ...], torch.dtype]
    neg_context: tuple[tuple[int, ...], torch.dtype] | None
    device: torch.device
    sigmas: tuple[float, ...]
    # data_ptr of every parameter: moving or re-allocating the model invalidates a graph,
    # while in-place weight updates (optimizer steps, load_state_dict) do not.
    params: tuple[int, ...]


def _layout(tensor: torch.Tensor) -> tuple[tuple[int, ...], torch.dtype]:
    return tuple(tensor.shape), tensor.dtype


def capture_key(
    model: nn.Module, noise: torch.Tensor, context: torch.Tensor, sigmas: torch.Tensor,
    neg_context: torch.Tensor | None = None,
) -> CaptureKey:
    """The cache key of a sampling call (see CaptureKey)."""
    return CaptureKey(
        noise=_layout(noise),
        context=_layout(context),
        neg_context=None if neg_context is None else _layout(neg_context),
        device=noise.device,
        sigmas=tuple(float(s) for s in sigmas.tolist()),
        params=tuple(p.data_ptr() for p in model.parameters()),
    )


class _Capture:
    """One captured graph with its static input/output buffers."""

    def __init__(self, graph, inputs: dict[str, torch.Tensor | None], output: torch.Tensor):
        self.graph = graph
        self.inputs = inputs
        self.output = output


class GraphSampler:
    """Euler sampler over a fixed sigma grid; CUDA-graph replay on CUDA, eager elsewhere.

    `sampler(noise, context, neg_context=None, guidance=None)` returns the final latent.
    Guidance-free (the student) when `neg_context` is None; with it, classifier-free
    guidance batches cond and uncond into one forward per step (the teacher).
    """

    def __init__(
        self, model: nn.Module, sigmas: torch.Tensor, *, use_graphs: bool | None = None,
        max_graphs: int = 2, warmup_runs: int = 1,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if not isinstance(sigmas, torch.Tensor) or sigmas.dim() != 1 or sigmas.numel() < 2:
            got = tuple(sigmas.shape) if isinstance(sigmas, torch.Tensor) else type(sigmas).__name__
            raise ValueError(f"sigmas must be a 1-D tensor of K+1 >= 2 grid points, got {got}")
        if max_graphs < 1:
            raise ValueError(f"max_graphs must be >= 1, got {max_graphs}")
        self.model = model
        self.sigmas = sigmas.detach().cpu().double()
        self.use_graphs = use_graphs
        self.max_graphs = max_graphs
        self.warmup_runs = warmup_runs
        self.captures_made = 0
        self._graphs: OrderedDict[CaptureKey, _Capture] = OrderedDict()

    @property
    def steps(self) -> int:
        return self.sigmas.numel() - 1

    def nfe(self, guided: bool) -> int:
        """Network evaluations per sample (a CFG step counts as two)."""
        return self.steps * (2 if guided else 1)

    def graphs_enabled(self, device: torch.device) -> bool:
        """Whether a call on `device` replays a CUDA graph."""
        if device.type != "cuda":
            return False
        return True if self.use_graphs is None else self.use_graphs

    def _check(self, noise, context, neg_context, guidance) -> None:
        for name, tensor in (("noise", noise), ("context", context)):
            if not isinstance(tensor, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
        if noise.dim() != 5:
            raise ValueError(f"noise must be [B, C, T, H, W], got shape {tuple(noise.shape)}")
        if context.dim() != 3 or context.shape[0] != noise.shape[0]:
            raise ValueError(
                f"context must be [{noise.shape[0]}, L, text_dim] (batch of noise), "
                f"got {tuple(context.shape)}"
            )
        if context.device != noise.device:
            raise ValueError(f"context must be on {noise.device} like noise, got {context.device}")
        if (neg_context is None) != (guidance is None):
            raise ValueError(
                "neg_context and guidance go together: pass both for CFG or neither, got "
                f"neg_context={'set' if neg_context is not None else None}, "
                f"guidance={'set' if guidance is not None else None}"
            )
        if neg_context is not None and (
            neg_context.shape != context.shape or neg_context.device != context.device
        ):
            raise ValueError(
                f"neg_context must match context ({tuple(context.shape)} on {context.device}), "
                f"got {tuple(neg_context.shape)} on {neg_context.device}"
            )

    def _grid(self, batch: int, device: torch.device) -> torch.Tensor:
        return self.sigmas.float().to(device)[:, None].expand(-1, batch).contiguous()

    @torch.no_grad()
    def __call__(
        self, noise: torch.Tensor, context: torch.Tensor,
        neg_context: torch.Tensor | None = None, guidance: float | torch.Tensor | None = None,
    ) -> torch.Tensor:
        self._check(noise, context, neg_context, guidance)
        batch, device = noise.shape[0], noise.device
        guidance_vec = None if guidance is None else _per_sample(guidance, batch, noise, "guidance")
        if not self.graphs_enabled(device):
            return euler_loop(self.model, noise, context, self._grid(batch, device),
                               neg_context, guidance_vec)
        key = capture_key(self.model, noise, context, self.sigmas, neg_context)
        capture = self._graphs.get(key)
        if capture is None:
            capture = self._capture(noise, context, neg_context, guidance_vec)
            self._graphs[key] = capture
            while len(self._graphs) > self.max_graphs:
                self._graphs.popitem(last=False)
        else:
            self._graphs.move_to_end(key)
        for name, value in (("noise", noise), ("context", context),
                            ("neg_context", neg_context), ("guidance", guidance_vec)):
            if value is not None:
                capture.inputs[name].copy_(value)
        capture.graph.replay()
        return capture.output.clone()

    def _capture(self, noise, context, neg_context, guidance) -> _Capture:
        inputs = {
            "noise": noise.clone(),
            "context": context.clone(),
            "neg_context": None if neg_context is None else neg_context.clone(),
            "guidance": None if guidance is None else guidance.clone(),
            "sigmas": self._grid(noise.shape[0], noise.device),
        }

        def run() -> torch.Tensor:
            return euler_loop(self.model, inputs["noise"], inputs["context"], inputs["sigmas"],
                               inputs["neg_context"], inputs["guidance"])

        # Warm-up on a side stream (as CUDA graphs require): fills lazy caches such as the
        # model's RoPE tables and lets cuBLAS/attention pick their kernels before capture.
        side = torch.cuda.Stream(device=noise.device)
        side.wait_stream(torch.cuda.current_stream(noise.device))
        with torch.cuda.stream(side):
            for _ in range(self.warmup_runs):
                run()
        torch.cuda.current_stream(noise.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            output = run()
        self.captures_made += 1
        return _Capture(graph, inputs, output)


def sample_teacher(
    model: nn.Module, noise: torch.Tensor, context: torch.Tensor, neg_context: torch.Tensor,
    guidance: float | torch.Tensor, sigmas: torch.Tensor, *, use_graphs: bool | None = False,
) -> torch.Tensor:
    """The teacher's CFG Euler sampler (eager by default; `use_graphs=None` captures on CUDA)."""
    sampler = GraphSampler(model, sigmas, use_graphs=use_graphs, max_graphs=1)
    return sampler(noise, context, neg_context, guidance)
