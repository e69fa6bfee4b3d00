"""A compact Wan2.1 video diffusion transformer: text-to-video and image-to-video.

Timesteps are per sample ([B], Wan2.1 and Wan2.2-A14B) or per patch token ([B, N],
Wan2.2-TI2V, whose conditioned first latent frame keeps timestep 0 while the rest is
denoised): per-token timesteps give per-token time embeddings and so per-token adaLN
shift/scale/gate in every block and in the head, as diffusers' WanTransformer3DModel.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from gpd_kernels import dit_op, fused_dit_ops

from .attention import attention
from .config import DiTConfig
from .sequence_parallel import SequenceParallel, TokenSplit


def rope_frequencies(axis_dim: int, length: int, theta: float) -> torch.Tensor:
    """Rotation angles [length, axis_dim // 2] of one rotary axis (float64, as Wan2.1)."""
    inverse = theta ** (-torch.arange(0, axis_dim, 2, dtype=torch.float64) / axis_dim)
    return torch.outer(torch.arange(length, dtype=torch.float64), inverse)


def rope_table(
    cfg: DiTConfig, grid: tuple[int, int, int], device: torch.device,
    dtype: torch.dtype = torch.complex64,
) -> torch.Tensor:
    """Complex rotations [f*h*w, 1, head_dim // 2] for a token grid (f, h, w), t-major order."""
    f, h, w = grid
    dims = cfg.rope_split
    angles = [rope_frequencies(d, n, cfg.rope_theta) for d, n in zip(dims, grid, strict=True)]
    per_token = torch.cat(
        [
            angles[0].view(f, 1, 1, -1).expand(f, h, w, -1),
            angles[1].view(1, h, 1, -1).expand(f, h, w, -1),
            angles[2].view(1, 1, w, -1).expand(f, h, w, -1),
        ],
        dim=-1,
    ).reshape(f * h * w, 1, -1)
    # Angles are computed in float64 and rounded once to the rotation dtype, as Wan and diffusers.
    return torch.polar(torch.ones_like(per_token), per_token).to(device=device, dtype=dtype)


def apply_rope(x: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved channel pairs of x [B, L, heads, head_dim] by complex ``rotations``."""
    real = torch.promote_types(x.dtype, torch.float32)
    pairs = torch.view_as_complex(x.to(real).unflatten(-1, (-1, 2)))
    return torch.view_as_real(pairs * rotations).flatten(-2).to(x.dtype)


def sinusoidal_embedding(timestep: torch.Tensor, dim: int) -> torch.Tensor:
    """[cos | sin] features [..., dim] of ``timestep`` ([B] or [B, N]) at geometric
    frequencies 1 .. 1/10000."""
    half = dim // 2
    # Same float32 operation order as diffusers: at timestep ~1000 a one-ulp change in a
    # frequency moves the angle by ~1e-4, visible at the 1e-5 parity level.
    steps = torch.arange(half, dtype=torch.float32, device=timestep.device)
    frequencies = torch.exp(-math.log(10000.0) * steps / half)
    angles = timestep.float()[..., None] * frequencies
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


def over_tokens(vec: torch.Tensor) -> torch.Tensor:
    """A modulation vector broadcastable over tokens [B, L, dim]: per sample [B, dim] ->
    [B, 1, dim]; per token [B, L, dim] as it is."""
    return vec if vec.ndim == 3 else vec.unsqueeze(1)


def modulate(normed: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: ``normed * (1 + scale) + shift``; shift and scale per sample [B, dim] or per
    token [B, L, dim]."""
    return torch.addcmul(over_tokens(shift), normed, 1 + over_tokens(scale))


# On CUDA the three helpers below run gpd_kernels' fused DiT ops (fp32/bf16/fp16; each
# op's Triton kernel or compiled reference, see gpd_kernels.dit); elsewhere, and for
# float64 checks, the eager reference code, unchanged. Tests force the fused path on the
# CPU with gpd_kernels.force_fused_dit_ops() (Triton interpreted).
def _fused(x: torch.Tensor) -> bool:
    return fused_dit_ops(x)


def norm_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float):
    """LayerNorm without affine, then adaLN (shift, scale [B, dim] or [B, L, dim])."""
    if _fused(x):
        return dit_op("layernorm_modulate")(x, shift, scale, eps)
    return modulate(F.layer_norm(x, (x.shape[-1],), eps=eps), shift, scale)


def gated_add(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """``x + gate * y`` with a per-sample [B, dim] or per-token [B, L, dim] gate."""
    if _fused(x):
        return dit_op("gated_residual")(x, y, gate)
    return torch.addcmul(x, y, over_tokens(gate))


def norm_rope_qk(
    q: torch.Tensor, k: torch.Tensor, norm_q: nn.RMSNorm, norm_k: nn.RMSNorm,
    rotations: torch.Tensor, num_heads: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm across heads, split into heads [B, L, heads, head_dim], rotate by RoPE."""
    if _fused(q):
        table = torch.view_as_real(rotations.squeeze(1))  # cos/sin as views, no copy
        q, k = (
            dit_op("rms_norm_rope")(x.unflatten(-1, (num_heads, -1)), norm.weight, table[..., 0],
                          table[..., 1], norm.eps)
            for x, norm in ((q, norm_q), (k, norm_k))
        )
        return q, k
    # Eager path: q and k go through RMSNorm and RoPE stacked, one set of ops for both,
    # which halves the kernel launches and autograd nodes that dominate small CPU models.
    qk = torch.stack([q, k], dim=2)  # [B, L, 2, dim]
    real = torch.promote_types(qk.dtype, torch.float32)
    mean_square = qk.to(real).square().mean(-1, keepdim=True)
    # Weights in the activations' dtype: under bf16 autocast fp32 weights would promote q
    # and k to fp32 (and differ from v); in fp32 the cast is a no-op.
    weight = torch.stack([norm_q.weight, norm_k.weight]).to(qk.dtype)
    qk = (qk.to(real) * torch.rsqrt(mean_square + norm_q.eps)).to(qk.dtype) * weight
    qk = apply_rope(qk.unflatten(-1, (num_heads, -1)), rotations.unsqueeze(1))
    q, k = qk.unbind(2)
    return q, k


def rms_norm(x: torch.Tensor, norm: nn.RMSNorm) -> torch.Tensor:
    """``norm(x)`` with its weight cast to x's dtype: under bf16 autocast an fp32 weight
    makes torch skip its fused RMSNorm ("Mismatch dtype between input and weight");
    in fp32 the cast is a no-op, so the numerics are nn.RMSNorm's."""
    return F.rms_norm(x, norm.normalized_shape, norm.weight.to(x.dtype), norm.eps)


class SelfAttention(nn.Module):
    """Self-attention with q/k RMSNorm across all heads and 3D RoPE; q, k, v fused in one matmul."""

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim)
        self.norm_q = nn.RMSNorm(cfg.dim, eps=cfg.eps)
        self.norm_k = nn.RMSNorm(cfg.dim, eps=cfg.eps)
        self.o = nn.Linear(cfg.dim, cfg.dim)

    def forward(
        self, x: torch.Tensor, rotations: torch.Tensor, split: TokenSplit | None = None
    ) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        q, k = norm_rope_qk(q, k, self.norm_q, self.norm_k, rotations, self.num_heads)
        v = v.unflatten(-1, (self.num_heads, -1))
        out = attention(q, k, v) if split is None else split.attention(q, k, v)
        return self.o(out.flatten(2))


class CrossAttention(nn.Module):
    """Attention from video tokens to text tokens, q/k RMSNorm across heads, k and v fused.

    With ``cfg.image_dim`` (Wan2.1-I2V) the queries also attend to the embedded image tokens
    through keys/values of their own (``kv_img``, key norm ``norm_k_img``), in a softmax of
    their own, and the two results are summed before the output projection.
    """

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.q = nn.Linear(cfg.dim, cfg.dim)
        self.kv = nn.Linear(cfg.dim, 2 * cfg.dim)
        self.norm_q = nn.RMSNorm(cfg.dim, eps=cfg.eps)
        self.norm_k = nn.RMSNorm(cfg.dim, eps=cfg.eps)
        self.o = nn.Linear(cfg.dim, cfg.dim)
        self.kv_img: nn.Linear | None = None
        self.norm_k_img: nn.RMSNorm | None = None
        if cfg.image_dim is not None:
            self.kv_img = nn.Linear(cfg.dim, 2 * cfg.dim)
            self.norm_k_img = nn.RMSNorm(cfg.dim, eps=cfg.eps)

    def _attend(
        self, q: torch.Tensor, tokens: torch.Tensor, kv: nn.Linear, norm_k: nn.RMSNorm
    ) -> torch.Tensor:
        k, v = kv(tokens).chunk(2, dim=-1)
        heads = (self.num_heads, -1)
        return attention(q, rms_norm(k, norm_k).unflatten(-1, heads), v.unflatten(-1, heads))

    def forward(
        self, x: torch.Tensor, context: torch.Tensor, image: torch.Tensor | None = None
    ) -> torch.Tensor:
        q = rms_norm(self.q(x), self.norm_q).unflatten(-1, (self.num_heads, -1))
        out = self._attend(q, context, self.kv, self.norm_k)
        if image is not None:
            out = out + self._attend(q, image, self.kv_img, self.norm_k_img)
        return self.o(out.flatten(2))


class Block(nn.Module):
    """Modulated self-attention, affine-LayerNorm cross-attention, modulated tanh-GELU FFN."""

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.eps = cfg.eps
        self.self_attn = SelfAttention(cfg)
        self.norm3 = nn.LayerNorm(cfg.dim, eps=cfg.eps)  # Wan's name for the cross-attn norm
        self.cross_attn = CrossAttention(cfg)
        self.ffn = nn.Sequential(
            nn.Linear(cfg.dim, cfg.ffn_dim), nn.GELU(approximate="tanh"),
            nn.Linear(cfg.ffn_dim, cfg.dim),
        )
        self.modulation = nn.Parameter(torch.randn(1, 6, cfg.dim) / cfg.dim**0.5)

    def forward(
        self, x: torch.Tensor, time_mod: torch.Tensor, rotations: torch.Tensor,
        context: torch.Tensor, split: TokenSplit | None = None, image: torch.Tensor | None = None,
    ) -> torch.Tensor:
        # time_mod [B, 6, dim] or per token [B, L, 6, dim]: six [B, dim] or [B, L, dim] views.
        mod = (self.modulation + time_mod).unbind(-2)
        shift_sa, scale_sa, gate_sa, shift_ff, scale_ff, gate_ff = mod
        attn = self.self_attn(norm_modulate(x, shift_sa, scale_sa, self.eps), rotations, split)
        x = gated_add(x, attn, gate_sa)
        x = x + self.cross_attn(self.norm3(x), context, image)
        ffn = self.ffn(norm_modulate(x, shift_ff, scale_ff, self.eps))
        return gated_add(x, ffn, gate_ff)


class Head(nn.Module):
    """Final modulated LayerNorm and projection to patch pixels."""

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.eps = cfg.eps
        self.head = nn.Linear(cfg.dim, cfg.out_channels * math.prod(cfg.patch_size))
        self.modulation = nn.Parameter(torch.randn(1, 2, cfg.dim) / cfg.dim**0.5)

    def forward(self, x: torch.Tensor, time_emb: torch.Tensor) -> torch.Tensor:
        # time_emb [B, dim] or per token [B, L, dim]: shift and scale of the same shape.
        shift, scale = (self.modulation + time_emb.unsqueeze(-2)).unbind(-2)
        return self.head(norm_modulate(x, shift, scale, self.eps))


class WanDiT(nn.Module):
    """Wan2.1 DiT: ``forward(x, timestep, context)`` predicts the velocity.

    Image-to-video models take the noisy latent, the mask and the condition latent
    concatenated along channels as ``x``; Wan2.1-I2V ones (``cfg.image_dim`` set) also
    ``image_tokens``.
    """

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        if not isinstance(cfg, DiTConfig):
            raise TypeError(f"WanDiT expects a DiTConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        self.patch_embedding = nn.Conv3d(
            cfg.in_channels, cfg.dim, kernel_size=cfg.patch_size, stride=cfg.patch_size
        )
        self.text_embedding = nn.Sequential(
            nn.Linear(cfg.text_dim, cfg.dim), nn.GELU(approximate="tanh"),
            nn.Linear(cfg.dim, cfg.dim),
        )
        # Wan2.1-I2V's image embedder (Wan's MLPProj layout: LayerNorm, Linear, exact GELU,
        # Linear, LayerNorm; torch's default eps 1e-5, as Wan and diffusers).
        self.image_embedding: nn.Sequential | None = None
        if cfg.image_dim is not None:
            self.image_embedding = nn.Sequential(
                nn.LayerNorm(cfg.image_dim), nn.Linear(cfg.image_dim, cfg.image_dim), nn.GELU(),
                nn.Linear(cfg.image_dim, cfg.dim), nn.LayerNorm(cfg.dim),
            )
        self.time_embedding = nn.Sequential(
            nn.Linear(cfg.freq_dim, cfg.dim), nn.SiLU(), nn.Linear(cfg.dim, cfg.dim)
        )
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(cfg.dim, 6 * cfg.dim))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.head = Head(cfg)
        # Optional guidance-scale input (gpd_model.guidance); absent, this is Wan2.1 exactly.
        self.guidance_embedding: nn.Module | None = None
        # Ulysses sequence parallelism (gpd_model.sequence_parallel); None: one process.
        self.sequence_parallel: SequenceParallel | None = None
        self._rope_cache: dict[tuple, torch.Tensor] = {}

    def rotations(
        self, grid: tuple[int, int, int], device: torch.device, dtype: torch.dtype
    ) -> torch.Tensor:
        """Complex RoPE table for a token grid and real ``dtype``, built once and cached."""
        complex_dtype = torch.complex128 if dtype == torch.float64 else torch.complex64
        key = (*grid, device, complex_dtype)
        table = self._rope_cache.get(key)
        if table is None:
            table = rope_table(self.cfg, grid, device, complex_dtype)
            self._rope_cache[key] = table
        return table

    def _check_inputs(
        self, x: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor,
        image_tokens: torch.Tensor | None,
    ) -> None:
        cfg = self.cfg
        inputs = [("x", x), ("timestep", timestep), ("context", context)]
        if image_tokens is not None:
            inputs.append(("image_tokens", image_tokens))
        for label, tensor in inputs:
            if not isinstance(tensor, torch.Tensor):
                raise TypeError(
                    f"WanDiT: {label} must be a torch.Tensor, got {type(tensor).__name__}"
                )
        if x.ndim != 5 or x.shape[1] != cfg.in_channels:
            # An image-to-video input is wider than the output: say what it is made of.
            parts = (f"; noisy latent {cfg.out_channels} + mask and condition latent "
                     f"{cfg.in_channels - cfg.out_channels} along channels"
                     if cfg.in_channels > cfg.out_channels else "")
            raise ValueError(
                f"WanDiT: x must be [B, {cfg.in_channels}, T, H, W] (rank 5, {cfg.in_channels} "
                f"channels{parts}), got shape {tuple(x.shape)}"
            )
        bad = [
            f"{axis}={size} (patch {p})"
            for axis, size, p in zip("THW", x.shape[2:], cfg.patch_size, strict=True)
            if size % p or size == 0
        ]
        if bad:
            raise ValueError(
                f"WanDiT: latent size must be a positive multiple of the patch {cfg.patch_size}, "
                f"got {', '.join(bad)}"
            )
        batch = x.shape[0]
        if batch == 0:
            raise ValueError(f"WanDiT: x must hold at least one sample, got shape {tuple(x.shape)}")
        tokens = math.prod(size // p for size, p in zip(x.shape[2:], cfg.patch_size, strict=True))
        if timestep.shape not in ((batch,), (batch, tokens)):
            raise ValueError(
                f"WanDiT: timestep must have shape [{batch}] (one per sample) or "
                f"[{batch}, {tokens}] (one per patch token of x {tuple(x.shape)}, patch "
                f"{cfg.patch_size}), got {tuple(timestep.shape)}"
            )
        if context.ndim != 3 or context.shape[0] != batch or context.shape[2] != cfg.text_dim:
            raise ValueError(
                f"WanDiT: context must be [{batch}, L, {cfg.text_dim}] (text_dim {cfg.text_dim}), "
                f"got shape {tuple(context.shape)}"
            )
        if context.shape[1] == 0:
            raise ValueError("WanDiT: context must hold at least one text token, got L=0")
        if (image_tokens is None) != (cfg.image_dim is None):
            raise ValueError(
                "WanDiT: " + (f"this model has an image embedder (image_dim {cfg.image_dim}, "
                              f"Wan2.1-I2V): pass image_tokens [B, N, {cfg.image_dim}] (CLIP "
                              "image tokens)" if image_tokens is None else
                              "image_tokens given, but this model has no image embedder "
                              "(image_dim None: text-to-video or Wan2.2-I2V style)")
            )
        if image_tokens is not None and (
            image_tokens.ndim != 3 or image_tokens.shape[0] != batch
            or image_tokens.shape[1] == 0 or image_tokens.shape[2] != cfg.image_dim
        ):
            raise ValueError(
                f"WanDiT: image_tokens must be [{batch}, N, {cfg.image_dim}] with N >= 1 "
                f"(image_dim {cfg.image_dim}), got shape {tuple(image_tokens.shape)}"
            )
        for label, tensor in inputs:
            if label != "timestep" and not tensor.is_floating_point():
                raise TypeError(f"WanDiT: {label} must be floating point, got {tensor.dtype}")
            if tensor.is_complex() or tensor.dtype == torch.bool:
                raise TypeError(f"WanDiT: {label} must be real numbers, got {tensor.dtype}")
        device = self.head.head.weight.device
        for label, tensor in inputs:
            if tensor.device != device:
                raise ValueError(
                    f"WanDiT: {label} is on {tensor.device} but the model is on {device}"
                )

    def forward(
        self, x: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor,
        guidance: torch.Tensor | None = None, *, image_tokens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Velocity [B, out, T, H, W] for latents x [B, in, T, H, W] at timestep [B] = 1000 sigma.

        ``timestep`` may instead be [B, N], one per patch token (N = T*H*W / patch volume, in
        the t-major order of the patches): Wan2.2-TI2V gives the conditioned first latent
        frame's tokens timestep 0 this way.

        ``context`` [B, L, text_dim] is used as given (Wan's pipelines zero-pad it to 512 tokens).
        ``image_tokens`` [B, N, image_dim] (Wan2.1-I2V: CLIP ViT-H's 257 x 1280) are required
        by, and only accepted by, a model with an image embedder (``cfg.image_dim`` set).
        ``guidance`` [B] is the CFG scale the velocity stands for; it is required by, and only
        accepted by, a model with a guidance input (``gpd_model.guidance.add_guidance_input``).
        Inputs are cast to the parameters' dtype, which is also the output's. With
        ``sequence_parallel`` set (gpd_model.sequence_parallel) every rank of its group passes
        the same inputs, computes its share of the tokens and returns the whole output.
        """
        self._check_inputs(x, timestep, context, image_tokens)
        if (guidance is None) != (self.guidance_embedding is None):
            raise ValueError(
                "WanDiT: " + ("this model has a guidance input: pass guidance [B] (the CFG scale)"
                              if guidance is None else "guidance given, but this model has no "
                              "guidance input (gpd_model.guidance.add_guidance_input adds one)")
            )
        cfg = self.cfg
        dtype = self.head.head.weight.dtype
        batch, channels, frames, height, width = x.shape
        pt, ph, pw = cfg.patch_size
        grid = (frames // pt, height // ph, width // pw)

        # Patchify as one matmul: the Conv3d has stride == kernel, so each patch is a dot product.
        patches = x.to(dtype).reshape(batch, channels, grid[0], pt, grid[1], ph, grid[2], pw)
        patches = patches.permute(0, 2, 4, 6, 1, 3, 5, 7).reshape(batch, math.prod(grid), -1)
        rotations = self.rotations(grid, x.device, dtype)
        split = None
        if self.sequence_parallel is not None:
            split = self.sequence_parallel.split(math.prod(grid))
            patches, rotations = split.local_part(patches), split.local_rotations(rotations)
        conv = self.patch_embedding
        tokens = F.linear(patches, conv.weight.flatten(1), conv.bias)

        if timestep.ndim == 2 and split is not None:
            timestep = split.local_part(timestep)  # this rank's tokens' timesteps
        # [B, dim], or [B, L, dim] for per-token timesteps.
        time_emb = self.time_embedding(sinusoidal_embedding(timestep, cfg.freq_dim).to(dtype))
        if self.guidance_embedding is not None:
            # In the activations' dtype: a trained (fp32) input on a frozen bf16 LoRA base.
            guide = self.guidance_embedding(guidance).to(time_emb.dtype)
            time_emb = time_emb + (guide.unsqueeze(1) if time_emb.ndim == 3 else guide)
        time_mod = self.time_projection(time_emb).unflatten(-1, (6, cfg.dim))
        text = self.text_embedding(context.to(dtype))
        image = None
        if self.image_embedding is not None:
            image = self.image_embedding(image_tokens.to(dtype))

        for block in self.blocks:
            tokens = block(tokens, time_mod, rotations, text, split, image)

        out = self.head(tokens, time_emb)
        if split is not None:
            out = split.gather(out)
        out = out.view(batch, *grid, pt, ph, pw, cfg.out_channels).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return out.reshape(batch, cfg.out_channels, frames, height, width)
