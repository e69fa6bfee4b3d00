"""Forward and gradient parity with diffusers' WanTransformer3DModel at random small configs."""

from __future__ import annotations

import pytest
import torch
from model_reference import diffusers_model, loss_and_grads, relative_error, write_checkpoints

from gpd_model import DiTConfig, WanDiT, load_checkpoint
from gpd_model.checkpoint import key_map
from gpd_model.model import rope_table

pytest.importorskip("diffusers")

# (heads, head_dim, layers, batch, frames, height, width); head_dims 10 and 14 split RoPE
# unevenly (6/2/2 and 10/2/2 channels... t gets the remainder), T=1 and non-square latents.
CASES = [
    (2, 16, 2, 2, 1, 4, 6),
    (3, 10, 1, 1, 3, 6, 4),
    (1, 14, 2, 3, 2, 2, 8),
    (2, 12, 1, 2, 5, 4, 2),
]


def _config(heads: int, head_dim: int, layers: int, seed: int) -> DiTConfig:
    channels = 2 + seed % 3
    return DiTConfig(
        in_channels=channels, out_channels=channels + 1, dim=heads * head_dim,
        ffn_dim=3 * heads * head_dim + 4, num_heads=heads, num_layers=layers, text_dim=7 + seed,
        freq_dim=16 + 2 * seed,
    )


def _inputs(cfg: DiTConfig, batch: int, frames: int, height: int, width: int, seed: int):
    generator = torch.Generator().manual_seed(100 + seed)
    x = torch.randn(batch, cfg.in_channels, frames, height, width, generator=generator)
    timestep = torch.rand(batch, generator=generator) * 1000
    timestep[0] = 999.0
    context = torch.randn(batch, 5 + seed, cfg.text_dim, generator=generator)
    return x, timestep, context


@pytest.mark.parametrize("case", range(len(CASES)))
def test_forward_and_gradients_match_diffusers(case: int, tmp_path) -> None:
    heads, head_dim, layers, batch, frames, height, width = CASES[case]
    cfg = _config(heads, head_dim, layers, case)
    reference = diffusers_model(cfg, seed=case)
    diffusers_file, wan_file = write_checkpoints(reference, tmp_path)
    x, timestep, context = _inputs(cfg, batch, frames, height, width, case)

    ref_params = dict(reference.named_parameters())
    ref_out, ref_inputs, ref_grads = loss_and_grads(
        lambda *a: reference(*a).sample, ref_params, x, timestep, context
    )
    for path, fmt in ((diffusers_file, "diffusers"), (wan_file, "wan")):
        ours = WanDiT(cfg)
        assert load_checkpoint(ours, path) == fmt
        params = dict(ours.named_parameters())
        out, inputs, grads = loss_and_grads(ours, params, x, timestep, context)
        assert out.shape == ref_out.shape
        assert relative_error(out, ref_out) <= 1e-5, fmt
        for name, grad in inputs.items():
            assert relative_error(grad, ref_inputs[name]) <= 1e-5, (fmt, name)
        for name, sources in key_map(cfg.num_layers, "diffusers").items():
            want = torch.cat([ref_grads[s] for s in sources])
            assert relative_error(grads[name], want) <= 1e-5, (fmt, name)


@pytest.mark.parametrize("head_dim", [10, 14, 32, 128])
def test_rope_frequencies_match_diffusers_up_to_its_table_length(head_dim: int) -> None:
    from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

    cfg = DiTConfig(in_channels=1, out_channels=1, dim=head_dim, ffn_dim=8, num_heads=1,
                    num_layers=1, text_dim=4)
    reference = WanRotaryPosEmbed(head_dim, (1, 2, 2), max_seq_len=1024)
    for grid in [(1, 1, 1024), (1024, 1, 1), (3, 7, 5)]:
        latent = torch.zeros(1, 1, grid[0], 2 * grid[1], 2 * grid[2])
        cos, sin = reference(latent)
        rotations = rope_table(cfg, grid, torch.device("cpu")).squeeze(1)
        torch.testing.assert_close(rotations.real, cos[0, :, 0, 0::2], rtol=0, atol=1e-6)
        torch.testing.assert_close(rotations.imag, sin[0, :, 0, 1::2], rtol=0, atol=1e-6)
