"""Ulysses sequence parallelism for the DiT on ``torch.distributed``.

The video tokens of one forward are split across the ``size`` ranks of a process group
(rank r holds the contiguous tokens ``[r * local, (r + 1) * local)`` of the sequence padded
to ``size * local``). Everything per token - patch embedding, modulation, q/k RMSNorm,
RoPE at the rank's own positions, cross-attention to the replicated text, FFN - runs on
the local tokens. Self-attention swaps the split from tokens to heads with one
``all_to_all_single`` (q, k and v together), so each rank attends over the whole sequence
with ``heads / size`` heads, and swaps back after. Padded tokens are cut off before the
attention, so they are never keys (exactly as unpadded) and their outputs are zeros. The
head output is gathered, so every rank returns the full velocity.

Gradients: the all-to-all is a permutation, its adjoint the reverse all-to-all; the adjoint
of the final all-gather is a reduce-scatter. With every rank computing the same loss on the
gathered output, a parameter's gradient averaged over the group is the one-process
gradient - what FSDP2's (or DDP's) gradient average over the group gives.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .attention import attention

# torch >= 2.10 names it all_gather_single (all_gather_into_tensor is deprecated there).
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def valid_sizes(num_heads: int) -> list[int]:
    """The sequence-parallel sizes a model with ``num_heads`` heads allows (its divisors)."""
    return [n for n in range(1, num_heads + 1) if num_heads % n == 0]


def check_size(size: int, num_heads: int) -> None:
    """Refuse a sequence-parallel size that does not divide the heads, naming valid ones."""
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ValueError(f"sequence-parallel size must be an int >= 1, got {size!r}")
    if num_heads % size:
        raise ValueError(
            f"sequence-parallel size {size} does not divide the model's {num_heads} attention "
            f"heads (each rank attends with heads / size of them); valid sizes: "
            f"{valid_sizes(num_heads)}"
        )


class SequenceParallel:
    """The process group a model's tokens are split over (``WanDiT.sequence_parallel``)."""

    def __init__(self, group: dist.ProcessGroup, num_heads: int) -> None:
        if not dist.is_initialized():
            raise ValueError("sequence parallelism needs an initialised process group "
                             "(launch with torchrun)")
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        check_size(self.size, num_heads)

    def split(self, tokens: int) -> TokenSplit:
        return TokenSplit(self, tokens, math.ceil(tokens / self.size))

    def __deepcopy__(self, memo: dict) -> SequenceParallel:
        # A copy of the model (e.g. an EMA) splits over the same group.
        return self


@dataclass(frozen=True)
class TokenSplit:
    """One forward's split of ``tokens`` tokens into ``local`` per rank (last ones padded)."""

    parallel: SequenceParallel
    tokens: int
    local: int

    @property
    def padded(self) -> int:
        return self.local * self.parallel.size

    def local_part(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's tokens of x [B, tokens, ...] (the sequence padded with zeros)."""
        return self._pad(x, 0.0, dim=1).narrow(1, self.parallel.rank * self.local, self.local)

    def local_rotations(self, rotations: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a RoPE table [tokens, 1, Dh/2]; padding rotates by 0."""
        return self._pad(rotations, 1.0, dim=0).narrow(0, self.parallel.rank * self.local,
                                                       self.local)

    def _pad(self, x: torch.Tensor, value: float, dim: int) -> torch.Tensor:
        missing = self.padded - self.tokens
        if missing == 0:
            return x
        shape = list(x.shape)
        shape[dim] = missing
        return torch.cat([x, x.new_full(shape, value)], dim=dim)

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Full-sequence self-attention of local q/k/v [B, local, H, Dh] -> [B, local, H, Dh]."""
        size = self.parallel.size
        batch, _, heads, head_dim = q.shape
        qkv = torch.stack([q, k, v], dim=2).unflatten(3, (size, heads // size))
        # [B, local, 3, size, H/size, Dh] -> chunk j (heads group j) goes to rank j.
        sent = qkv.permute(3, 0, 1, 2, 4, 5)
        received = _AllToAll.apply(sent, self.parallel.group)  # [size(token block), B, ...]
        full = received.permute(1, 0, 2, 3, 4, 5).flatten(1, 2)[:, : self.tokens]
        out = attention(*full.unbind(2))  # [B, tokens, H/size, Dh]
        out = self._pad(out, 0.0, dim=1).unflatten(1, (size, self.local))
        # [B, size(token block), local, H/size, Dh] -> token block j goes back to rank j.
        back = _AllToAll.apply(out.permute(1, 0, 2, 3, 4), self.parallel.group)
        return back.permute(1, 2, 0, 3, 4).reshape(batch, self.local, heads, head_dim)

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """Local x [B, local, ...] -> the whole sequence [B, tokens, ...] on every rank."""
        gathered = _AllGather.apply(x, self.parallel.group)  # [size, B, local, ...]
        return gathered.movedim(0, 1).flatten(1, 2)[:, : self.tokens]


class _AllToAll(torch.autograd.Function):
    """Chunk j of dim 0 goes to rank j, chunk j of the result came from rank j. Its own
    adjoint: the gradient of a received chunk goes back to the rank that sent it."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return _all_to_all(x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _all_to_all(grad, ctx.group), None


def _all_to_all(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    x = x.contiguous()
    out = torch.empty_like(x)
    dist.all_to_all_single(out, x, group=group)
    return out


class _AllGather(torch.autograd.Function):
    """x -> [size, *x.shape], chunk j from rank j. Backward: reduce-scatter (sum over the
    ranks of the gradient of chunk r goes to rank r), done as an all-to-all and a sum because
    gloo has no reduce-scatter."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        x = x.contiguous()
        # The concatenated output form: gloo refuses the stacked one.
        out = x.new_empty((dist.get_world_size(group) * x.shape[0], *x.shape[1:]))
        _all_gather_single(out, x, group=group)
        return out.unflatten(0, (-1, x.shape[0]))

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _all_to_all(grad, ctx.group).sum(0), None


def enable_sequence_parallel(model: torch.nn.Module, group: dist.ProcessGroup) -> None:
    """Split ``model``'s (a WanDiT's) tokens over ``group`` in every later forward; the
    group must be the same on every rank that shares the samples. A group of one runs the
    collectives too (how their overhead is measured on one GPU)."""
    cfg = getattr(model, "cfg", None)
    if not hasattr(model, "sequence_parallel") or cfg is None:
        raise TypeError(f"expected a WanDiT, got {type(model).__name__}")
    model.sequence_parallel = SequenceParallel(group, cfg.num_heads)
