"""Input checks shared by the ops; every message names what was expected and what came."""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def check_float_tensor(name: str, value: object) -> torch.Tensor:
    """A tensor of a floating dtype this package computes with."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    if value.dtype not in FLOAT_DTYPES:
        allowed = ", ".join(str(d).removeprefix("torch.") for d in FLOAT_DTYPES)
        raise TypeError(f"{name}: expected dtype in ({allowed}), got {value.dtype}")
    return value


def check_same_device(**tensors: torch.Tensor | None) -> None:
    """All given tensors (None skipped) live on one device."""
    present = {name: t for name, t in tensors.items() if t is not None}
    devices = {t.device for t in present.values()}
    if len(devices) > 1:
        listing = ", ".join(f"{name} on {t.device}" for name, t in present.items())
        raise ValueError(f"expected all tensors on one device, got {listing}")


def check_same_shape(reference_name: str, reference: torch.Tensor, **others) -> None:
    """Every tensor in `others` (None skipped) has `reference`'s shape."""
    for name, t in others.items():
        if t is not None and t.shape != reference.shape:
            raise ValueError(
                f"{name}: expected shape {tuple(reference.shape)} (that of {reference_name}), "
                f"got {tuple(t.shape)}"
            )


def check_rank(name: str, t: torch.Tensor, rank: int, layout: str) -> None:
    if t.dim() != rank:
        raise ValueError(f"{name}: expected a {rank}-D tensor {layout}, got shape {tuple(t.shape)}")


def check_batched(name: str, t: object) -> torch.Tensor:
    """A floating tensor with a leading batch axis."""
    check_float_tensor(name, t)
    if t.dim() < 1:
        raise ValueError(f"{name}: expected a batched tensor [B, ...], got a 0-D tensor")
    return t


def check_per_sample(name: str, t: torch.Tensor, batch: int) -> None:
    """A per-sample [B] float tensor (sigmas, guidance scales)."""
    check_float_tensor(name, t)
    if t.shape != (batch,):
        raise ValueError(f"{name}: expected shape ({batch},) (one value per sample), "
                         f"got {tuple(t.shape)}")


def check_loss_params(alpha_s: float, alpha_t: float, gamma: float) -> None:
    """Weights must keep w >= 1 and finite, so the loss stays a positive-definite form."""
    for name, value in (("alpha_s", alpha_s), ("alpha_t", alpha_t), ("gamma", gamma)):
        if not (value >= 0.0 and value != float("inf")):
            raise ValueError(f"{name}: expected a finite value >= 0, got {value}")
