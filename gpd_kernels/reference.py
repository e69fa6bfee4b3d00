"""Plain PyTorch references for the gpd ops: the CPU path and the test oracle.

Frequency loss (design section 4): d = pred - target, D = fftn(d, (T, H, W), "ortho"),
w = 1 + alpha_s (f_H^gamma + f_W^gamma) / 2 + alpha_t f_T^gamma with
f_X(k) = min(k, n - k) / (n / 2), loss = sum(w |D|^2) / numel. Computed in float64 when
an input is float64, else float32.

Band-amplitude loss (the second form, aimed at blur; ``band_amplitude_loss_reference``):
P = fftn(pred), Q = fftn(target) (same axes and norm), the bins split into bands by temporal
frequency f_T ({0}, (0, 1/2], (1/2, 1]) and spatial radius sqrt((f_H^2 + f_W^2) / 2) (rings
[0, 1/4], (1/4, 1/2], (1/2, 3/4], (3/4, 1]: the detail metric's), and
loss = sum over samples, channels and bands of (||P_band|| - ||Q_band||)^2 / numel.

Teacher double-step: g = u_uncond + w (u_cond - u_uncond) (g = u_cond without CFG),
x_next = x + (sigma_to - sigma_from) g, and the two-step target
u* = ((s_b - s_a) g1 + (s_c - s_b) g2) / (s_c - s_a); per-sample scalars, float32 math,
g rounded once (an fma), x_next computed exactly and rounded once to x's dtype (why:
gpd_kernels.double_step).
"""

from __future__ import annotations

import functools

import torch

from ._checks import (
    check_batched,
    check_float_tensor,
    check_loss_params,
    check_per_sample,
    check_rank,
    check_same_device,
    check_same_shape,
)

DEFAULT_ALPHA_S = 1.0
DEFAULT_ALPHA_T = 1.0
DEFAULT_GAMMA = 1.0
LATENT_LAYOUT = "[B, C, T, H, W]"


def check_latent_pair(pred: torch.Tensor, target: torch.Tensor) -> None:
    """Two non-empty same-shaped [B, C, T, H, W] float tensors on one device."""
    check_float_tensor("pred", pred)
    check_float_tensor("target", target)
    check_rank("pred", pred, 5, LATENT_LAYOUT)
    check_same_shape("pred", pred, target=target)
    check_same_device(pred=pred, target=target)
    if pred.numel() == 0:  # the mean would be 0/0
        raise ValueError(f"pred: expected a non-empty tensor, got shape {tuple(pred.shape)}")


def check_freq_loss_inputs(pred: torch.Tensor, target: torch.Tensor, alpha_s: float,
                           alpha_t: float, gamma: float) -> None:
    check_loss_params(alpha_s, alpha_t, gamma)
    check_latent_pair(pred, target)


def check_guided_inputs(lead_name: str, lead: torch.Tensor, u_cond: torch.Tensor,
                        u_uncond: torch.Tensor | None, guidance: torch.Tensor | None,
                        **per_sample: torch.Tensor) -> None:
    """Checks for the double-step ops: same-shaped [B, ...] inputs and [B] scalars."""
    check_batched(lead_name, lead)
    check_float_tensor("u_cond", u_cond)
    if (u_uncond is None) != (guidance is None):
        raise ValueError("guidance is required exactly when u_uncond is given; got "
                         f"u_uncond={'a tensor' if u_uncond is not None else None}, "
                         f"guidance={'a tensor' if guidance is not None else None}")
    if u_uncond is not None:
        check_float_tensor("u_uncond", u_uncond)
    check_same_shape(lead_name, lead, u_cond=u_cond, u_uncond=u_uncond)
    batch = lead.shape[0]
    scalars = dict(per_sample, guidance=guidance) if guidance is not None else per_sample
    for name, value in scalars.items():
        check_per_sample(name, value, batch)
    check_same_device(**{lead_name: lead}, u_cond=u_cond, u_uncond=u_uncond, **scalars)


def graph_capturing(tensor: torch.Tensor) -> bool:
    """Whether tensor's CUDA stream is being captured into a graph (gpd_train --cuda-graph):
    its values do not exist yet, so a data check, which reads them back, must not run."""
    return tensor.is_cuda and torch.cuda.is_current_stream_capturing()


def check_distinct_sigmas(s_a: torch.Tensor, s_c: torch.Tensor) -> None:
    """u* divides by s_c - s_a: a zero-length double step has no target (it would be NaN)."""
    if torch.compiler.is_compiling() or s_a.shape != s_c.shape or s_a.device != s_c.device:
        return  # shape/device errors are check_guided_inputs'; a data check breaks graphs
    if graph_capturing(s_a):
        return  # checked in the eager warm-up steps before the capture
    same = s_a == s_c
    if bool(same.any()):
        index = int(same.nonzero()[0, 0])
        raise ValueError(f"double_step_target: s_a must differ from s_c (the step divides by "
                         f"s_c - s_a), got s_a = s_c = {float(s_a[index])} at sample {index}")


def axis_frequency(n: int, dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
    """f(k) = min(k, n - k) / (n / 2) for k in 0..n-1 (n = 1 gives [0])."""
    k = torch.arange(n, dtype=dtype, device=device)
    return torch.minimum(k, n - k) / (n / 2)


def frequency_weights(t: int, h: int, w: int, alpha_s: float, alpha_t: float, gamma: float,
                      dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
    """The [T, H, W] spectral weight w of the design."""
    f_t, f_h, f_w = (axis_frequency(n, dtype, device).pow(gamma) for n in (t, h, w))
    spatial = (f_h[:, None] + f_w[None, :]) / 2
    return 1 + alpha_s * spatial[None, :, :] + alpha_t * f_t[:, None, None]


# Band edges (upper, inclusive) of the band-amplitude loss: temporal frequency, spatial radius.
TEMPORAL_BAND_EDGES = (0.0, 0.5, 1.0)
SPATIAL_RING_EDGES = (0.25, 0.5, 0.75, 1.0)


def _band_of(values: torch.Tensor, edges: tuple[float, ...]) -> torch.Tensor:
    """The index of the first edge >= each value (a small slack absorbs rounding at an edge)."""
    return torch.bucketize(values, torch.tensor(edges, dtype=values.dtype) + 1e-9)


def band_tables(t: int, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(temporal band [T], spatial ring [H, W]) of each FFT bin along its axes, int64: bin
    (kt, kh, kw) is in band temporal[kt] * len(SPATIAL_RING_EDGES) + ring[kh, kw]."""
    f_t, f_h, f_w = (axis_frequency(n, torch.float64) for n in (t, h, w))
    radius = ((f_h[:, None].square() + f_w[None, :].square()) / 2).sqrt()
    return _band_of(f_t, TEMPORAL_BAND_EDGES), _band_of(radius, SPATIAL_RING_EDGES)


def spectral_bands(t: int, h: int, w: int) -> tuple[torch.Tensor, int]:
    """([T, H, W] int64 band of each FFT bin, numbered over the bands that hold a bin, and
    their count): temporal band x spatial ring, ordered temporal-major."""
    temporal, ring = band_tables(t, h, w)
    band = temporal[:, None, None] * len(SPATIAL_RING_EDGES) + ring[None]
    present, numbered = torch.unique(band, return_inverse=True)
    return numbered, present.numel()


@functools.lru_cache(maxsize=16)
def _bands_on(t: int, h: int, w: int, device: torch.device) -> tuple[torch.Tensor, int]:
    """``spectral_bands`` on ``device``, made once per shape: a captured training step
    (gpd_train --cuda-graph) may not copy from the host, and its eager warm-up fills this."""
    band, count = spectral_bands(t, h, w)
    return band.to(device), count


def _band_amplitudes(x: torch.Tensor, band: torch.Tensor, count: int) -> torch.Tensor:
    """||X_band|| [B, C, bands] of x's orthonormal spectrum, with gradient 0 where a band's
    energy is 0 (sqrt's is infinite there; 0 is a subgradient of the norm)."""
    return _spectrum_band_amplitudes(torch.fft.fftn(x, dim=(2, 3, 4), norm="ortho"), band, count)


def _spectrum_band_amplitudes(spectrum: torch.Tensor, band: torch.Tensor,
                              count: int) -> torch.Tensor:
    power = spectrum.abs().square()
    energy = power.new_zeros(*spectrum.shape[:2], count).index_add(2, band.flatten(),
                                                                     power.flatten(2))
    nonzero = energy > 0
    return torch.where(nonzero, torch.where(nonzero, energy, 1).sqrt(), 0)


def band_amplitude_loss_reference(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared band-amplitude difference, differentiable through torch.fft.

    Each band's error splits into an amplitude and a direction part; this keeps the amplitude
    part only, so it is at most the MSE (triangle inequality per band) and 0 for a target of
    the prediction's band amplitudes in any phase. Its gradient in a band is
    2/numel (1 - ||Q_band|| / ||P_band||) P_band: it rescales the prediction's own content
    there, where the MSE's pulls toward Q. The MSE's optimum under an uncertain phase is a
    shrunken amplitude (blur); this term pushes the amplitude back.
    """
    check_latent_pair(pred, target)
    dtype = _compute_dtype(pred, target)
    band, count = _bands_on(*pred.shape[2:], pred.device)
    gap = _band_amplitudes(pred.to(dtype), band, count) - _band_amplitudes(target.to(dtype),
                                                                         band, count)
    return gap.square().sum() / pred.numel()


def band_amplitude_loss_grad_reference(pred: torch.Tensor, target: torch.Tensor
                                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, d loss / d pred) by the closed form real(ifftn(s P)), s = 2/numel
    (1 - ||Q_b|| / ||P_b||) on band b and 0 where ||P_b|| = 0 (no autograd: it also serves
    as an op's CPU kernel, where autograd does not record)."""
    check_latent_pair(pred, target)
    dtype = _compute_dtype(pred, target)
    band, count = _bands_on(*pred.shape[2:], pred.device)
    spectrum = torch.fft.fftn(pred.to(dtype), dim=(2, 3, 4), norm="ortho")
    amp_pred = _spectrum_band_amplitudes(spectrum, band, count)
    amp_target = _band_amplitudes(target.to(dtype), band, count)
    loss = (amp_pred - amp_target).square().sum() / pred.numel()
    filled = amp_pred > 0
    ratio = amp_target / torch.where(filled, amp_pred, 1)
    scale = torch.where(filled, 1 - ratio, 0)
    grad = torch.fft.ifftn(scale[:, :, band] * spectrum, dim=(2, 3, 4), norm="ortho").real
    return loss, grad * (2.0 / pred.numel())


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _weighted_spectrum(pred, target, alpha_s, alpha_t, gamma):
    dtype = _compute_dtype(pred, target)
    d = pred.to(dtype) - target.to(dtype)
    spectrum = torch.fft.fftn(d, dim=(2, 3, 4), norm="ortho")
    weights = frequency_weights(*d.shape[2:], alpha_s, alpha_t, gamma, dtype, d.device)
    return spectrum, weights


def freq_loss_reference(pred: torch.Tensor, target: torch.Tensor,
                        alpha_s: float = DEFAULT_ALPHA_S, alpha_t: float = DEFAULT_ALPHA_T,
                        gamma: float = DEFAULT_GAMMA) -> torch.Tensor:
    """Mean frequency-weighted squared error, differentiable through torch.fft."""
    check_freq_loss_inputs(pred, target, alpha_s, alpha_t, gamma)
    spectrum, weights = _weighted_spectrum(pred, target, alpha_s, alpha_t, gamma)
    return (weights * spectrum.abs().square()).sum() / pred.numel()


def freq_loss_grad_reference(pred: torch.Tensor, target: torch.Tensor,
                             alpha_s: float = DEFAULT_ALPHA_S, alpha_t: float = DEFAULT_ALPHA_T,
                             gamma: float = DEFAULT_GAMMA) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, d loss / d pred) by the closed form 2/numel * real(ifftn(w D))."""
    check_freq_loss_inputs(pred, target, alpha_s, alpha_t, gamma)
    spectrum, weights = _weighted_spectrum(pred, target, alpha_s, alpha_t, gamma)
    loss = (weights * spectrum.abs().square()).sum() / pred.numel()
    grad = torch.fft.ifftn(weights * spectrum, dim=(2, 3, 4), norm="ortho").real
    return loss, grad * (2.0 / pred.numel())


def _per_sample(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A [B] scalar as float32 shaped to broadcast over one sample of `like`."""
    return value.to(torch.float32).reshape((-1,) + (1,) * (like.dim() - 1))


def guided_velocity_reference(u_cond: torch.Tensor, u_uncond: torch.Tensor | None,
                              guidance: torch.Tensor | None) -> torch.Tensor:
    """CFG combine in float32: u_uncond + w (u_cond - u_uncond), or u_cond alone."""
    cond = u_cond.to(torch.float32)
    if u_uncond is None:
        return cond.clone() if cond is u_cond else cond
    uncond = u_uncond.to(torch.float32)
    return _fma(_per_sample(guidance, cond), cond - uncond, uncond)


def _fma(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """a * b + c of float32 tensors, rounded once to float32: the float64 product of two
    floats is exact, so only the final cast rounds (as the kernels' fma)."""
    return torch.addcmul(c.double(), a.double(), b.double()).to(torch.float32)


def cfg_euler_step_reference(x: torch.Tensor, u_cond: torch.Tensor,
                             u_uncond: torch.Tensor | None, guidance: torch.Tensor | None,
                             sigma_from: torch.Tensor, sigma_to: torch.Tensor
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_next in x's dtype, g float32) for one guided Euler step; scalars are [B]."""
    check_guided_inputs("x", x, u_cond, u_uncond, guidance,
                        sigma_from=sigma_from, sigma_to=sigma_to)
    g = guided_velocity_reference(u_cond, u_uncond, guidance)
    step = _per_sample(sigma_to, g) - _per_sample(sigma_from, g)
    exact = torch.addcmul(x.double(), step.double(), g.double())
    return round_once(exact, x.dtype), g


def round_once(value: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float64 `value` rounded once (to nearest even) to `dtype`.

    torch's float64 -> bf16/fp16 cast rounds to float32 first and then again; rounding
    to float32 with round-to-odd instead makes the second rounding the only one.
    """
    if dtype in (torch.float64, torch.float32):
        return value.to(dtype)
    nearest = value.float()
    back = nearest.double()
    bits = nearest.view(torch.int32)
    fix = (back != value) & (bits % 2 == 0)
    step = torch.where(value.abs() > back.abs(), 1, -1).to(torch.int32)
    return torch.where(fix, bits + step, bits).view(torch.float32).to(dtype)


def double_step_target_reference(g1: torch.Tensor, u_cond: torch.Tensor,
                                 u_uncond: torch.Tensor | None, guidance: torch.Tensor | None,
                                 s_a: torch.Tensor, s_b: torch.Tensor, s_c: torch.Tensor
                                 ) -> torch.Tensor:
    """u* = ((s_b - s_a) g1 + (s_c - s_b) g2) / (s_c - s_a), float32; scalars are [B]."""
    check_guided_inputs("g1", g1, u_cond, u_uncond, guidance, s_a=s_a, s_b=s_b, s_c=s_c)
    check_distinct_sigmas(s_a, s_c)
    g2 = guided_velocity_reference(u_cond, u_uncond, guidance)
    a, b, c = (_per_sample(s, g2) for s in (s_a, s_b, s_c))
    return ((b - a) * g1.to(torch.float32) + (c - b) * g2) / (c - a)
