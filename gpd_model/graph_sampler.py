"""CUDA-graph Euler sampler: the whole K-step loop captured once, replayed per call.

The student samples guidance-free in a handful of steps, where kernel-launch overhead
of ~30 blocks x dozens of small kernels per step dominates at small sizes. Capturing the
complete loop (every model forward and Euler update) as one CUDA graph removes it.

Inputs are copied into static buffers and the graph is replayed; a change of shape,
dtype, device, step grid, conditioning slots or model placement gives a new capture key and
a new capture (the last `max_graphs` captures are kept). On CPU, or with
`use_graphs=False`, the same loop runs eagerly and matches `euler_sample`.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn

from .denoiser import CFG, Conditioning, Denoiser
from .sampler import euler_loop

__all__ = ["CaptureKey", "GraphSampler", "capture_key"]


@dataclass(frozen=True)
class CaptureKey:
    """Everything a captured graph depends on besides the values in its static buffers."""

    noise: tuple[tuple[int, ...], torch.dtype]
    cond: tuple[tuple[str, tuple[int, ...], torch.dtype], ...]  # the set slots' layouts
    device: torch.device
    sigmas: tuple[float, ...]
    # data_ptr of every parameter: moving or re-allocating the model invalidates a graph,
    # while in-place weight updates (optimizer steps, load_state_dict) do not.
    params: tuple[int, ...]


def _layout(tensor: torch.Tensor) -> tuple[tuple[int, ...], torch.dtype]:
    return tuple(tensor.shape), tensor.dtype


def capture_key(
    denoiser: Denoiser, noise: torch.Tensor, cond: Conditioning, sigmas: torch.Tensor,
) -> CaptureKey:
    """The cache key of a sampling call (see CaptureKey)."""
    return CaptureKey(
        noise=_layout(noise),
        cond=tuple((name, *_layout(tensor)) for name, tensor in cond.tensors().items()),
        device=noise.device,
        sigmas=tuple(float(s) for s in sigmas.tolist()),
        params=tuple(p.data_ptr() for module in denoiser.modules() for p in module.parameters()),
    )


class _Capture:
    """One captured graph with its static input/output buffers."""

    def __init__(self, graph, noise: torch.Tensor, cond: Conditioning, output: torch.Tensor):
        self.graph = graph
        self.noise = noise
        self.cond = cond
        self.output = output


class GraphSampler:
    """Euler sampler over a fixed sigma grid; CUDA-graph replay on CUDA, eager elsewhere.

    `sampler(noise, cond)` returns the final latent of `denoiser`'s Euler steps: a student
    guidance-free, a teacher as a `CFG` (cond and uncond batched into one forward per step).
    What the denoiser holds (a CFG's negative and scale) is baked into a capture; what
    `cond` holds is copied into static buffers per call.
    """

    def __init__(
        self, denoiser: Denoiser, sigmas: torch.Tensor, *, use_graphs: bool | None = None,
        max_graphs: int = 2, warmup_runs: int = 1,
    ) -> None:
        # A bare network is callable with modules() too, but takes a timestep, not sigma.
        if isinstance(denoiser, nn.Module) or not callable(getattr(denoiser, "modules", None)):
            raise TypeError(f"denoiser must be a gpd_model.Denoiser (a network goes in "
                            f"DiTDenoiser(model)), got {type(denoiser).__name__}")
        if not isinstance(sigmas, torch.Tensor) or sigmas.dim() != 1 or sigmas.numel() < 2:
            got = tuple(sigmas.shape) if isinstance(sigmas, torch.Tensor) else type(sigmas).__name__
            raise ValueError(f"sigmas must be a 1-D tensor of K+1 >= 2 grid points, got {got}")
        if max_graphs < 1:
            raise ValueError(f"max_graphs must be >= 1, got {max_graphs}")
        self.denoiser = denoiser
        self.sigmas = sigmas.detach().cpu().double()
        self.use_graphs = use_graphs
        self.max_graphs = max_graphs
        self.warmup_runs = warmup_runs
        self.captures_made = 0
        self._graphs: OrderedDict[CaptureKey, _Capture] = OrderedDict()

    @property
    def steps(self) -> int:
        return self.sigmas.numel() - 1

    def nfe(self) -> int:
        """Network evaluations per sample (a CFG step counts as two)."""
        return self.steps * (2 if isinstance(self.denoiser, CFG) else 1)

    def graphs_enabled(self, device: torch.device) -> bool:
        """Whether a call on `device` replays a CUDA graph."""
        if device.type != "cuda":
            return False
        return True if self.use_graphs is None else self.use_graphs

    def _check(self, noise: torch.Tensor, cond: Conditioning) -> None:
        if not isinstance(noise, torch.Tensor):
            raise TypeError(f"noise must be a torch.Tensor, got {type(noise).__name__}")
        if noise.dim() != 5:
            raise ValueError(f"noise must be [B, C, T, H, W], got shape {tuple(noise.shape)}")
        if not isinstance(cond, Conditioning) or cond.batch != noise.shape[0]:
            got = cond.batch if isinstance(cond, Conditioning) else type(cond).__name__
            raise ValueError(f"cond must be a Conditioning of batch {noise.shape[0]} (noise's), "
                             f"got {got}")
        if cond.text.device != noise.device:
            raise ValueError(f"cond must be on {noise.device} like noise, got {cond.text.device}")

    def _grid(self, batch: int, device: torch.device) -> torch.Tensor:
        return self.sigmas.float().to(device)[:, None].expand(-1, batch).contiguous()

    @torch.no_grad()
    def __call__(self, noise: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        self._check(noise, cond)
        batch, device = noise.shape[0], noise.device
        if not self.graphs_enabled(device):
            return euler_loop(self.denoiser, noise, cond, self._grid(batch, device))
        key = capture_key(self.denoiser, noise, cond, self.sigmas)
        capture = self._graphs.get(key)
        if capture is None:
            capture = self._capture(noise, cond)
            self._graphs[key] = capture
            while len(self._graphs) > self.max_graphs:
                self._graphs.popitem(last=False)
        else:
            self._graphs.move_to_end(key)
        capture.noise.copy_(noise)
        static = capture.cond.tensors()
        for name, value in cond.tensors().items():
            static[name].copy_(value)
        capture.graph.replay()
        return capture.output.clone()

    def _capture(self, noise: torch.Tensor, cond: Conditioning) -> _Capture:
        static_noise = noise.clone()
        static_cond = Conditioning.from_tensors(
            {name: value.clone() for name, value in cond.tensors().items()})
        sigmas = self._grid(noise.shape[0], noise.device)

        def run() -> torch.Tensor:
            return euler_loop(self.denoiser, static_noise, static_cond, sigmas)

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
        return _Capture(graph, static_noise, static_cond, output)
