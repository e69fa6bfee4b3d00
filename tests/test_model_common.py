"""Helpers shared by the gpd_model tests (no tests here): random diffusers reference, renaming."""

from __future__ import annotations

import re

import torch

# diffusers name -> original Wan2.1 name, written from Wan's public model layout (independent
# of gpd_model.checkpoint, so the loader is checked against a second reading of the formats).
_DIFFUSERS_TO_WAN = [
    (r"^condition_embedder\.text_embedder\.linear_1\.", "text_embedding.0."),
    (r"^condition_embedder\.text_embedder\.linear_2\.", "text_embedding.2."),
    (r"^condition_embedder\.time_embedder\.linear_1\.", "time_embedding.0."),
    (r"^condition_embedder\.time_embedder\.linear_2\.", "time_embedding.2."),
    (r"^condition_embedder\.time_proj\.", "time_projection.1."),
    (r"^proj_out\.", "head.head."),
    (r"^scale_shift_table$", "head.modulation"),
    (r"\.scale_shift_table$", ".modulation"),
    (r"\.attn1\.to_([qkv])\.", r".self_attn.\1."),
    (r"\.attn1\.to_out\.0\.", ".self_attn.o."),
    (r"\.attn1\.norm_", ".self_attn.norm_"),
    (r"\.attn2\.to_([qkv])\.", r".cross_attn.\1."),
    (r"\.attn2\.to_out\.0\.", ".cross_attn.o."),
    (r"\.attn2\.norm_", ".cross_attn.norm_"),
    (r"\.norm2\.", ".norm3."),
    (r"\.ffn\.net\.0\.proj\.", ".ffn.0."),
    (r"\.ffn\.net\.2\.", ".ffn.2."),
]


def diffusers_to_wan_name(name: str) -> str:
    for pattern, replacement in _DIFFUSERS_TO_WAN:
        name, count = re.subn(pattern, replacement, name)
        if count:
            return name
    return name


def diffusers_model(cfg, seed: int):
    """diffusers' WanTransformer3DModel for ``cfg`` with every weight random (norms included)."""
    from diffusers import WanTransformer3DModel

    model = WanTransformer3DModel(
        patch_size=cfg.patch_size, num_attention_heads=cfg.num_heads,
        attention_head_dim=cfg.head_dim, in_channels=cfg.in_channels,
        out_channels=cfg.out_channels, text_dim=cfg.text_dim, freq_dim=cfg.freq_dim,
        ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers, eps=cfg.eps,
    )
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            is_norm = name.endswith(("norm_q.weight", "norm_k.weight")) or ".norm2." in name
            if is_norm:
                # Norm gains away from 1 so that a swapped or dropped norm is visible.
                param.copy_(1.0 + 0.3 * noise if name.endswith("weight") else 0.1 * noise)
            else:
                param.copy_(noise * param.shape[-1] ** -0.5 if param.ndim > 1 else 0.1 * noise)
    return model.eval()


def contiguous_state(model) -> dict[str, torch.Tensor]:
    return {name: t.detach().contiguous().clone() for name, t in model.state_dict().items()}


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want.double()).norm() / want.double().norm()).item()
