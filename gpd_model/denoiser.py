"""The denoiser interface: what every sampler, objective and evaluation calls for a velocity.

``velocity = denoiser(x, sigma, cond)``: the noisy latent ``x`` [B, C, T, H, W], its noise
level ``sigma`` [B] (one per sample) and a ``Conditioning``. A Wan DiT is one denoiser
(``DiTDenoiser``), two experts switched at a noise boundary another (``ExpertPair``), and
classifier-free guidance wraps any of them (``CFG``), so a new model family is a new
denoiser, never a change to a sampler or an objective.

Wan2.2-TI2V gives its conditioned first frame timestep 0 per token; that is the denoiser's
business (``DiTDenoiser`` with ``Conditioning.first_frames``), so ``sigma`` stays one per
sample for every caller and every denoiser refuses [B, T_tokens] with a clear error.

A denoiser is deliberately *not* an ``nn.Module``: it holds its networks by reference, so
the trained module stays the ``WanDiT`` itself (state-dict keys, FSDP wrapping, LoRA, EMA
and checkpoints do not see it). ``modules()`` names the networks it runs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn as nn

from .guidance import has_guidance_input
from .schedule import _broadcast_to, _per_sample, timestep_from_sigma

# Each slot's rank; the first dimension of every set slot is the batch.
_RANKS = {"text": 3, "image_latent": 5, "image_tokens": 3, "first_frames": 5, "guidance": 1}
# Slots that ``to(dtype=...)`` casts: the network inputs. The CFG scale stays float32, the
# precision its sinusoidal embedding and the CFG combine are computed in.
_CAST = ("text", "image_latent", "image_tokens", "first_frames")


@dataclass(frozen=True)
class Conditioning:
    """What a denoiser is conditioned on, one row per sample.

    ``text`` [B, L, D]: text embeddings. ``image_latent`` [B, C, T, H, W]: the VAE latent of
    the conditioned frames with its mask (image-to-video). ``image_tokens`` [B, N, D_img]:
    image-encoder tokens. ``first_frames`` [B, C, F, H, W]: Wan2.2-TI2V's condition, the
    latent of the first F latent frames (F = 1: the image), which replace the noisy latent's
    (``DiTDenoiser``); not the channel concatenation of ``image_latent``, which Wan2.1-I2V and
    Wan2.2-I2V-A14B take. ``guidance`` [B]: the CFG scale w each trajectory follows; it is
    here because it is per sample like the rest (rollout lanes carry it, slicing and
    batching keep it with its sample) and because a student with a guidance input takes it
    as an input, exactly as it takes the text. Unset slots stay None through every operation.
    """

    text: torch.Tensor
    image_latent: torch.Tensor | None = None
    image_tokens: torch.Tensor | None = None
    first_frames: torch.Tensor | None = None
    guidance: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.text, torch.Tensor):
            raise TypeError(f"Conditioning.text must be a tensor, got {type(self.text).__name__}")
        for name, tensor in self.tensors().items():
            if not isinstance(tensor, torch.Tensor):
                raise TypeError(f"Conditioning.{name} must be a tensor or None, got "
                                f"{type(tensor).__name__}")
            if tensor.ndim != _RANKS[name] or tensor.shape[0] != self.text.shape[0]:
                raise ValueError(f"Conditioning.{name} must have {_RANKS[name]} dims with batch "
                                 f"{self.text.shape[0]} (text's), got {tuple(tensor.shape)}")
            if tensor.device != self.text.device:
                raise ValueError(f"Conditioning.{name} is on {tensor.device}, text on "
                                 f"{self.text.device}: keep one device")

    @property
    def batch(self) -> int:
        return self.text.shape[0]

    def __len__(self) -> int:
        return self.batch

    def tensors(self) -> dict[str, torch.Tensor]:
        """The set slots by name (a flat dict, as a captured training step takes)."""
        return {field.name: getattr(self, field.name) for field in dataclasses.fields(self)
                if getattr(self, field.name) is not None}

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor]) -> Conditioning:
        """The Conditioning of the slot names in ``tensors`` (other keys are not read)."""
        if "text" not in tensors:
            raise ValueError(f"a Conditioning needs 'text', got keys {sorted(tensors)}")
        return cls(**{name: tensors[name] for name in _RANKS if name in tensors})

    def _map(self, fn: Callable[[str, torch.Tensor], torch.Tensor]) -> Conditioning:
        return Conditioning(**{name: fn(name, t) for name, t in self.tensors().items()})

    def _pairs(self, other: Conditioning, what: str
               ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """The slot pairs of ``self`` and ``other``, checked to set the same slots with the
        same shapes beyond the batch."""
        if not isinstance(other, Conditioning):
            raise TypeError(f"{what}: expected a Conditioning, got {type(other).__name__}")
        mine, theirs = self.tensors(), other.tensors()
        if mine.keys() != theirs.keys():
            raise ValueError(f"{what}: the two Conditionings set different slots: "
                             f"{sorted(mine)} vs {sorted(theirs)}")
        for name, tensor in mine.items():
            if tensor.shape[1:] != theirs[name].shape[1:]:
                raise ValueError(f"{what}: {name} shapes do not match: {tuple(tensor.shape)} vs "
                                 f"{tuple(theirs[name].shape)}")
        return {name: (tensor, theirs[name]) for name, tensor in mine.items()}

    def _zip(self, other: Conditioning, what: str,
             fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Conditioning:
        """``fn`` over the slot pairs of ``self`` and ``other``."""
        return Conditioning(**{name: fn(mine, theirs)
                               for name, (mine, theirs) in self._pairs(other, what).items()})

    def to(self, device: torch.device | str | None = None,
           dtype: torch.dtype | None = None) -> Conditioning:
        """Every slot on ``device``; ``dtype`` casts the network inputs, not the CFG scale."""
        return self._map(lambda name, t: t.to(
            device=device, dtype=dtype if dtype is not None and name in _CAST else t.dtype))

    def __getitem__(self, index: slice | torch.Tensor) -> Conditioning:
        """The rows ``index`` selects (a slice, a bool mask [B] or long indices)."""
        if not isinstance(index, (slice, torch.Tensor)) or (
                isinstance(index, torch.Tensor) and index.ndim != 1):
            got = tuple(index.shape) if isinstance(index, torch.Tensor) else type(index).__name__
            raise TypeError(f"Conditioning rows are picked by a slice or a 1-d tensor (the "
                            f"batch stays), got {got}")
        if isinstance(index, torch.Tensor) and index.dtype == torch.bool \
                and index.shape[0] != self.batch:
            raise ValueError(f"Conditioning: a row mask must be [{self.batch}], got "
                             f"{tuple(index.shape)}")
        return self._map(lambda _, t: t[index])

    @staticmethod
    def cat(conds: Sequence[Conditioning]) -> Conditioning:
        """The Conditionings one after the other along the batch."""
        if not conds:
            raise ValueError("Conditioning.cat: nothing to concatenate")
        first, *rest = conds
        for other in rest:
            first._pairs(other, "Conditioning.cat")
        return Conditioning(**{name: torch.cat([c.tensors()[name] for c in conds])
                               for name in first.tensors()})

    def expand(self, batch: int) -> Conditioning:
        """A batch-1 Conditioning (such as a negative prompt) as ``batch`` rows (views)."""
        if self.batch == batch:
            return self
        if self.batch != 1:
            raise ValueError(f"Conditioning.expand: only batch 1 expands, got batch "
                             f"{self.batch} to {batch}")
        return self._map(lambda _, t: t.expand(batch, *t.shape[1:]))

    def where(self, mask: torch.Tensor, other: Conditioning) -> Conditioning:
        """``other``'s row where ``mask`` [B] is True, ours elsewhere (CFG dropout picks the
        negative per sample); ``other`` has B rows or one that serves every row."""
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool \
                or mask.shape != (self.batch,):
            got = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(f"Conditioning.where: mask must be a bool [{self.batch}], got {got}")
        if other.batch not in (1, self.batch):
            raise ValueError(f"Conditioning.where: other must have 1 or {self.batch} rows, got "
                             f"{other.batch}")
        return self._zip(other, "Conditioning.where", lambda a, b: torch.where(
            mask.view(-1, *([1] * (a.ndim - 1))), b, a))

    def put(self, index: torch.Tensor, other: Conditioning) -> Conditioning:
        """A copy with the rows ``index`` (bool mask or long indices) set to ``other``'s."""
        def put_rows(mine: torch.Tensor, theirs: torch.Tensor) -> torch.Tensor:
            out = mine.clone()
            out[index] = theirs.to(out.dtype)
            return out

        return self._zip(other, "Conditioning.put", put_rows)


class Denoiser(Protocol):
    """``denoiser(x, sigma, cond)`` -> the velocity ``u = eps - x0`` at ``x``'s shape."""

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor,
                 cond: Conditioning) -> torch.Tensor: ...

    def modules(self) -> tuple[nn.Module, ...]:
        """The networks it runs (for their device, parameters and eval mode)."""
        ...


def check_sigma(x: torch.Tensor, sigma: torch.Tensor, who: str) -> None:
    """``sigma`` must be one noise level per sample, [B] for ``x`` [B, ...]."""
    if not isinstance(sigma, torch.Tensor):
        raise TypeError(f"{who}: sigma must be a [B] tensor, got {type(sigma).__name__}")
    if sigma.ndim == 2:
        raise ValueError(f"{who}: per-token sigma {tuple(sigma.shape)} is not supported yet; "
                         f"give one sigma per sample, [{x.shape[0]}]")
    if sigma.shape != (x.shape[0],):
        raise ValueError(f"{who}: sigma must be [{x.shape[0]}] (one per sample), got "
                         f"{tuple(sigma.shape)}")


def image_inputs(model: nn.Module) -> tuple[bool, bool]:
    """(takes an image latent, takes image tokens) of a Wan DiT: an image-to-video input is
    wider than its output (the mask and condition latent), and Wan2.1-I2V has an image
    embedder for image tokens."""
    return model.cfg.image_to_video, model.cfg.image_dim is not None


@dataclass(frozen=True)
class DiTDenoiser:
    """One Wan DiT: ``model(x, 1000 * sigma, cond.text)``, with ``cond.guidance`` as the
    model's guidance input when it has one (gpd_model.guidance). Whether it has one is
    read at every call: a LoRA teacher swaps it in and out (gpd_train.lora.use_adapter).

    Image-to-video: the model's input is ``cat([x, cond.image_latent], channels)`` (the mask
    and condition latent after the noisy latent, as diffusers' WanImageToVideoPipeline
    concatenates) and ``cond.image_tokens`` go to its image embedder; a model takes exactly
    the image slots it has inputs for.

    Wan2.2-TI2V image-to-video (``cond.first_frames`` c, F latent frames, on a model with
    ``expand_timesteps``), as diffusers' WanImageToVideoPipeline with ``expand_timesteps``:
    the model sees c in place of x's first F frames, with timestep 0 on the tokens made of
    those frames only. Its output there is not used: the velocity of the first frames is
    ``(x - c) / sigma``, the straight path to c, so that an Euler step from sigma to 0 lands
    them on c, where the pipeline's last step writes c. Samplers, objectives and the
    evaluation thus see an ordinary velocity field whose sample starts with the condition."""

    model: nn.Module

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor,
                 cond: Conditioning) -> torch.Tensor:
        check_sigma(x, sigma, "DiTDenoiser")
        first = self._first_frames(x, cond)
        inputs = self._inputs(x if first is None else torch.cat(
            [first, x[:, :, first.shape[2]:]], dim=2), cond)
        extra = {} if cond.image_tokens is None else {"image_tokens": cond.image_tokens}
        timestep = timestep_from_sigma(sigma)
        if first is not None:
            timestep = self._per_token(timestep, x, first.shape[2])
        if not has_guidance_input(self.model):
            u = self.model(inputs, timestep, cond.text, **extra)
        elif cond.guidance is None:
            raise ValueError("DiTDenoiser: the model takes the CFG scale as an input; set "
                             "Conditioning.guidance [B]")
        else:
            u = self.model(inputs, timestep, cond.text, guidance=cond.guidance, **extra)
        if first is None:
            return u
        frames = first.shape[2]
        # sigma 0 (a sample at its end): no direction is left; 0 instead of 0 / 0.
        positive = sigma > 0
        scale = _broadcast_to(torch.where(positive, sigma, torch.ones_like(sigma)), x)
        to_condition = ((x[:, :, :frames] - first) / scale).where(
            _broadcast_to(positive, x), 0.0)
        return torch.cat([to_condition.to(u.dtype), u[:, :, frames:]], dim=2)

    def _first_frames(self, x: torch.Tensor, cond: Conditioning) -> torch.Tensor | None:
        """``cond.first_frames`` in ``x``'s dtype, checked against the model and ``x``."""
        first = cond.first_frames
        if first is None:
            return None
        if not self.model.cfg.expand_timesteps:
            raise ValueError("DiTDenoiser: Conditioning.first_frames is Wan2.2-TI2V's "
                             "condition, for a model with expand_timesteps; this Wan DiT has "
                             "none (give image_latent to an image-to-video model)")
        want = (x.shape[0], x.shape[1], x.shape[3], x.shape[4])
        got = (first.shape[0], first.shape[1], first.shape[3], first.shape[4])
        if got != want or not 0 < first.shape[2] < x.shape[2]:
            raise ValueError(f"DiTDenoiser: first_frames must be [{x.shape[0]}, {x.shape[1]}, "
                             f"F, {x.shape[3]}, {x.shape[4]}] with 0 < F < {x.shape[2]} (x's "
                             f"frames), got {tuple(first.shape)}")
        return first.to(x.dtype)

    def _per_token(self, timestep: torch.Tensor, x: torch.Tensor, frames: int) -> torch.Tensor:
        """[B, N] timesteps: 0 on the tokens whose frames are all among the first ``frames``
        (with a temporal patch of one, the tokens of those frames, as diffusers' mask), the
        sample's timestep on the others (a token that mixes both is noisy)."""
        pt, ph, pw = self.model.cfg.patch_size
        per_frame = (x.shape[3] // ph) * (x.shape[4] // pw)
        clean = (frames // pt) * per_frame
        tokens = (x.shape[2] // pt) * per_frame
        keep = torch.arange(tokens, device=timestep.device) >= clean
        return timestep[:, None] * keep

    def _inputs(self, x: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The model's input: ``x``, with the image latent after it along channels."""
        takes_latent, takes_tokens = image_inputs(self.model)
        for name, takes, given, what, without in (
                ("image_latent", takes_latent, cond.image_latent, "the mask and condition "
                 "latent", "a text-to-video model"),
                ("image_tokens", takes_tokens, cond.image_tokens, "image-encoder tokens",
                 "no image embedder")):
            if takes and given is None:
                raise ValueError(f"DiTDenoiser: this image-to-video Wan DiT needs "
                                 f"Conditioning.{name} ({what}), got None")
            if given is not None and not takes:
                raise ValueError(f"DiTDenoiser: this Wan DiT has no input for "
                                 f"Conditioning.{name} ({what}; {without}), but it is set")
        latent = cond.image_latent
        if latent is None:
            return x
        if latent.shape[0] != x.shape[0] or latent.shape[2:] != x.shape[2:]:
            raise ValueError(f"DiTDenoiser: image_latent must be [{x.shape[0]}, C, "
                             f"{', '.join(map(str, x.shape[2:]))}] (x's batch and frames, "
                             f"height, width), got {tuple(latent.shape)}")
        return torch.cat([x, latent.to(x.dtype)], dim=1)

    def modules(self) -> tuple[nn.Module, ...]:
        return (self.model,)


# The slots of the image condition, which both branches of CFG share.
_IMAGE_SLOTS = ("image_latent", "image_tokens", "first_frames")


def unconditional(cond: Conditioning, negative: Conditioning) -> Conditioning:
    """The unconditional Conditioning of each of ``cond``'s rows: ``negative``'s text (batch
    1 or ``cond``'s) with ``cond``'s image slots and CFG scale. Wan guides image-to-video on
    the text alone: the image condition is kept in both branches, so CFG and CFG dropout
    both take their negative from here."""
    if any(getattr(negative, name) is not None for name in _IMAGE_SLOTS):
        raise ValueError("unconditional: the negative Conditioning carries text only; its "
                         "image slots come from each sample's own")
    return dataclasses.replace(negative.to(cond.text.device).expand(len(cond)),
                               **{name: getattr(cond, name) for name in _IMAGE_SLOTS},
                               guidance=cond.guidance)


@dataclass(frozen=True)
class ExpertScales:
    """Two CFG scales for an ``ExpertPair``: ``high`` for the samples its high-noise expert
    runs, ``low`` for the rest (Wan2.2's ``guidance_scale`` and ``guidance_scale_2``)."""

    high: float
    low: float

    def __post_init__(self) -> None:
        for name in ("high", "low"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f"ExpertScales: {name} must be a CFG scale > 0, got {value!r}")


@dataclass(frozen=True)
class CFG:
    """Classifier-free guidance around ``denoiser``: ``u_uncond + w (u_cond - u_uncond)``.

    ``negative`` is the unconditional text (batch 1, or the batch's size), completed per
    sample by ``unconditional``;
    ``scale`` w is a float or a [B] tensor, or None for each sample's ``cond.guidance``
    (the w rollout lanes draw per trajectory). Both branches run as one forward of 2B.

    Around an ``ExpertPair``, ``scale`` may be ``ExpertScales(high, low)``: each sample is
    guided by the scale of the expert that runs it, chosen by the pair's own boundary test
    (diffusers' WanPipeline ``guidance_scale`` / ``guidance_scale_2``). The pair stays inside
    one CFG so the two branches still come as one forward (the fused CFG kernels' input).
    """

    denoiser: Denoiser
    negative: Conditioning
    scale: float | torch.Tensor | ExpertScales | None = None

    def __post_init__(self) -> None:
        if isinstance(self.scale, ExpertScales) and not isinstance(self.denoiser, ExpertPair):
            raise TypeError(f"CFG: ExpertScales guide an ExpertPair, got a "
                            f"{type(self.denoiser).__name__}; give one scale")

    def weight(self, x: torch.Tensor, sigma: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """w per sample, float32 [B] on ``x``'s device."""
        scale = cond.guidance if self.scale is None else self.scale
        if scale is None:
            raise ValueError("CFG: no scale: give CFG(scale=w) or set Conditioning.guidance")
        if isinstance(scale, ExpertScales):
            assert isinstance(self.denoiser, ExpertPair)  # __post_init__
            high = self.denoiser.is_high(sigma).to(x.device)
            return torch.where(high, _per_sample(scale.high, x.shape[0], x, "CFG high scale"),
                               _per_sample(scale.low, x.shape[0], x, "CFG low scale"))
        return _per_sample(scale, x.shape[0], x, "CFG scale")

    def branches(self, x: torch.Tensor, sigma: torch.Tensor,
                 cond: Conditioning) -> tuple[torch.Tensor, torch.Tensor]:
        """``(u_cond, u_uncond)`` from one forward of batch 2B, the form the fused CFG
        kernels (gpd_kernels.cfg_euler_step, double_step_target) consume."""
        # The negative row takes each sample's w (a denoiser reading it sees one batch) and
        # image condition.
        negative = unconditional(cond, self.negative)
        both = self.denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]),
                             Conditioning.cat([cond, negative]))
        u_cond, u_uncond = both.chunk(2)
        return u_cond, u_uncond

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor,
                 cond: Conditioning) -> torch.Tensor:
        weight = self.weight(x, sigma, cond)
        u_cond, u_uncond = self.branches(x, sigma, cond)
        return torch.lerp(u_uncond, u_cond, _broadcast_to(weight, u_cond).to(u_cond.dtype))

    def modules(self) -> tuple[nn.Module, ...]:
        return self.denoiser.modules()


def guided_branches(denoiser: Denoiser, x: torch.Tensor, sigma: torch.Tensor,
                    cond: Conditioning
                    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """``(u_cond, u_uncond, w)`` for the fused CFG kernels: a ``CFG``'s two branches and
    its weight, or any other denoiser's velocity with ``(None, None)``."""
    if isinstance(denoiser, CFG):
        return (*denoiser.branches(x, sigma, cond), denoiser.weight(x, sigma, cond))
    return denoiser(x, sigma, cond), None, None


@dataclass(frozen=True)
class ExpertPair:
    """Two experts switched at a noise ``boundary`` (Wan2.2 A14B): ``high`` for samples with
    sigma >= boundary, ``low`` below. A batch on one side runs that expert only; a mixed
    batch is split, each part run by its expert, and re-assembled in order (the split
    reads sigma on the host, so a mixed batch cannot be captured in a CUDA graph)."""

    high: Denoiser
    low: Denoiser
    boundary: float

    def __post_init__(self) -> None:
        if isinstance(self.boundary, bool) or not isinstance(self.boundary, (int, float)) \
                or not 0.0 < self.boundary <= 1.0:
            raise ValueError(f"ExpertPair: boundary must be a sigma in (0, 1], got "
                             f"{self.boundary!r}")

    def is_high(self, sigma: torch.Tensor) -> torch.Tensor:
        """Which samples the high-noise expert runs: bool [B]. The one boundary test, shared
        by the split and by ``ExpertScales`` so a sample's expert and its scale agree."""
        return sigma >= self.boundary

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor,
                 cond: Conditioning) -> torch.Tensor:
        check_sigma(x, sigma, "ExpertPair")
        high = self.is_high(sigma)
        if bool(high.all()):
            return self.high(x, sigma, cond)
        low = ~high
        if not bool(high.any()):
            return self.low(x, sigma, cond)
        u_high = self.high(x[high], sigma[high], cond[high])
        u_low = self.low(x[low], sigma[low], cond[low])
        out = u_high.new_empty((len(x), *u_high.shape[1:]))
        out[high] = u_high
        out[low] = u_low.to(out.dtype)
        return out

    def modules(self) -> tuple[nn.Module, ...]:
        return (*self.high.modules(), *self.low.modules())
