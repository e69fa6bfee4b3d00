"""Per-token timesteps (Wan2.2-TI2V): parity with diffusers' WanTransformer3DModel given a
[B, N] timestep, the fused adaLN path against the eager one, presets, bad timesteps."""

from __future__ import annotations

from dataclasses import asdict

import pytest
import torch
from model_reference import (
    assert_matches_diffusers,
    diffusers_gradients,
    diffusers_model,
    relative_error,
    write_checkpoints,
)

from gpd_kernels import force_fused_dit_ops
from gpd_model import CheckpointError, DiTConfig, WanDiT, get_preset, load_checkpoint
from gpd_model.checkpoint import config_from_diffusers, diffusers_config, save_diffusers

pytest.importorskip("diffusers")

# (channels, heads, head_dim, layers, batch, frames, height, width): in = out channels as
# TI2V (48 is Wan2.2's latent), at least two latent frames so that the conditioned first
# frame's tokens (timestep 0) and the others (timestep t) meet in every attention; odd sizes,
# head_dims that split RoPE unevenly, batch 1.
CASES = [
    (48, 2, 16, 2, 2, 3, 6, 10),
    (5, 3, 10, 1, 1, 2, 4, 6),
    (7, 1, 14, 2, 3, 5, 2, 6),
]


def _config(channels: int, heads: int, head_dim: int, layers: int, seed: int) -> DiTConfig:
    return DiTConfig(
        in_channels=channels, out_channels=channels, dim=heads * head_dim,
        ffn_dim=3 * heads * head_dim + 4, num_heads=heads, num_layers=layers,
        text_dim=7 + seed, freq_dim=16 + 2 * seed, expand_timesteps=True,
    )


def first_frame_timesteps(t: torch.Tensor, frames: int, height: int, width: int) -> torch.Tensor:
    """[B, N] timesteps of a (1, 2, 2)-patch latent whose first latent frame is the condition:
    its tokens at 0, every other token at its sample's t (written here from the token order,
    t-major then h then w, independently of the pipelines' mask arithmetic)."""
    per_frame = (height // 2) * (width // 2)
    timestep = t[:, None].repeat(1, frames * per_frame)
    timestep[:, :per_frame] = 0.0
    return timestep


def _inputs(cfg: DiTConfig, batch: int, frames: int, height: int, width: int, seed: int):
    generator = torch.Generator().manual_seed(300 + seed)
    x = torch.randn(batch, cfg.in_channels, frames, height, width, generator=generator)
    t = torch.rand(batch, generator=generator) * 1000
    t[0] = 999.0
    context = torch.randn(batch, 9, cfg.text_dim, generator=generator)
    return x, first_frame_timesteps(t, frames, height, width), context


@pytest.mark.parametrize("case", range(len(CASES)))
def test_per_token_forward_and_gradients_match_diffusers(case: int, tmp_path) -> None:
    channels, heads, head_dim, layers, batch, frames, height, width = CASES[case]
    cfg = _config(channels, heads, head_dim, layers, case)
    reference = diffusers_model(cfg, seed=20 + case)
    diffusers_file, _ = write_checkpoints(reference, tmp_path)
    x, timestep, context = _inputs(cfg, batch, frames, height, width, case)
    assert timestep.shape == (batch, frames * (height // 2) * (width // 2))
    want = diffusers_gradients(reference, x, timestep, context)
    ours = WanDiT(cfg)
    assert load_checkpoint(ours, diffusers_file) == "diffusers"
    out = assert_matches_diffusers(ours, want, x, timestep, context)
    assert out.shape == (batch, channels, frames, height, width)


def _tiny_case():
    torch.manual_seed(1)
    model = WanDiT(get_preset("tiny-ti2v", num_layers=2))
    pt, ph, pw = model.cfg.patch_size
    x = torch.randn(2, model.cfg.in_channels, 3 * pt, 3 * ph, 5 * pw)
    timestep = torch.tensor([900.0, 250.0])[:, None].repeat(1, 3 * 3 * 5)
    timestep[:, :15] = 0.0  # the first token frame of tiny's (4, 2, 2) patch
    return model, x, timestep, torch.randn(2, 5, model.cfg.text_dim)


def _forward_backward(model, x, timestep, context):
    x = x.detach().requires_grad_(True)
    out = model(x, timestep, context)
    out.square().mean().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return out, x.grad, grads


def test_fused_per_token_path_matches_eager() -> None:
    """The model through the fused adaLN ops' per-token kernels (Triton interpreted on the
    CPU) against its eager path, forward and every gradient (the modulation's included)."""
    model, *inputs = _tiny_case()
    want, want_x, want_grads = _forward_backward(model, *inputs)
    with force_fused_dit_ops():
        got, got_x, got_grads = _forward_backward(model, *inputs)
    names = {type(n).__name__ for n in _nodes(got)}
    assert {"_LayerNormModulateFunctionBackward", "_GatedResidualFunctionBackward"} <= names
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got_x, want_x, atol=1e-5, rtol=1e-3)
    for name, grad in want_grads.items():
        assert relative_error(got_grads[name], grad) <= 1e-4, name


def _nodes(out: torch.Tensor) -> list:
    seen, stack = [], [out.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.append(node)
        stack.extend(next_fn for next_fn, _ in node.next_functions)
    return seen


def test_equal_per_token_timesteps_are_the_per_sample_model() -> None:
    """[B, N] timesteps all equal to t give what [B] = t gives (text-to-video with TI2V), and
    the first frame at 0 changes every frame's output (attention mixes the frames)."""
    model, x, timestep, context = _tiny_case()
    t = timestep[:, -1]
    with torch.no_grad():
        per_sample = model(x, t, context)
        per_token = model(x, t[:, None].expand_as(timestep), context)
        conditioned = model(x, timestep, context)
    torch.testing.assert_close(per_token, per_sample, atol=2e-6, rtol=1e-5)
    assert (conditioned - per_sample)[:, :, 4:].abs().amax() > 1e-3


def test_guidance_input_is_added_to_every_tokens_time_embedding() -> None:
    """A guidance input [B] on per-token timesteps: all tokens at t equal the per-sample run."""
    from gpd_model.guidance import add_guidance_input

    model, x, _, context = _tiny_case()
    add_guidance_input(model)
    torch.nn.init.normal_(model.guidance_embedding.mlp[2].weight)  # zero until trained
    t, guidance = torch.tensor([700.0, 30.0]), torch.tensor([5.0, 2.0])
    tokens = t[:, None].repeat(1, 45)
    with torch.no_grad():
        want = model(x, t, context, guidance)
        torch.testing.assert_close(model(x, tokens, context, guidance), want,
                                   atol=2e-6, rtol=1e-5)
        assert (model(x, tokens, context, guidance.flip(0)) - want).abs().amax() > 1e-3


def test_presets() -> None:
    from diffusers import WanTransformer3DModel

    cfg = get_preset("wan2.2-ti2v-5b")
    assert cfg.expand_timesteps
    # transformer config of Wan2.2-TI2V-5B in diffusers' scripts/convert_wan_to_diffusers.py
    published = {
        "added_kv_proj_dim": None, "attention_head_dim": 128, "cross_attn_norm": True,
        "eps": 1e-06, "ffn_dim": 14336, "freq_dim": 256, "in_channels": 48,
        "num_attention_heads": 24, "num_layers": 30, "out_channels": 48,
        "patch_size": [1, 2, 2], "qk_norm": "rms_norm_across_heads", "text_dim": 4096,
    }
    exported = diffusers_config(cfg)
    assert {k: exported[k] for k in published} == published
    with torch.device("meta"):
        reference = WanTransformer3DModel(**published)
        ours = WanDiT(cfg)
    assert sum(p.numel() for p in ours.parameters()) == sum(
        p.numel() for p in reference.parameters())

    tiny = get_preset("tiny-ti2v")
    assert {**asdict(tiny), "expand_timesteps": False} == asdict(get_preset("tiny"))
    assert DiTConfig(**asdict(tiny)) == tiny  # the run metadata's round trip keeps the flag


@pytest.mark.parametrize(
    ("timestep", "message"),
    [
        (torch.zeros(2, 31), r"timestep must have shape \[2\] \(one per sample\) or \[2, 30\] "
                             r"\(one per patch token of x \(2, 3, 8, 6, 10\), patch \(4, 2, 2\)\), "
                             r"got \(2, 31\)"),
        (torch.zeros(2, 1), r"or \[2, 30\] .*got \(2, 1\)"),
        (torch.zeros(1, 30), r"got \(1, 30\)"),
        (torch.zeros(2, 30, 1), r"got \(2, 30, 1\)"),
        (torch.tensor(5.0), r"got \(\)"),
    ],
)
def test_bad_timestep_shapes_are_refused_in_one_line(timestep, message) -> None:
    model = WanDiT(get_preset("tiny-ti2v", num_layers=1))
    x = torch.randn(2, 3, 8, 6, 10)
    with pytest.raises(ValueError, match=message) as caught:
        model(x, timestep, torch.randn(2, 4, model.cfg.text_dim))
    assert str(caught.value).startswith("WanDiT: ") and "\n" not in str(caught.value)


def test_the_flag_comes_from_the_pipeline_folders_model_index(tmp_path) -> None:
    """diffusers keeps expand_timesteps in model_index.json, not in the transformer's config."""
    cfg = get_preset("tiny-ti2v", num_layers=1)
    transformer = save_diffusers(WanDiT(cfg), tmp_path / "pipeline" / "transformer")
    assert "expand_timesteps" not in diffusers_config(cfg)
    assert config_from_diffusers(transformer) == get_preset("tiny", num_layers=1)
    index = tmp_path / "pipeline" / "model_index.json"
    index.write_text('{"_class_name": "WanPipeline", "expand_timesteps": true}')
    assert config_from_diffusers(transformer) == cfg
    assert config_from_diffusers(transformer / "config.json") == cfg
    index.write_text('{"_class_name": "WanPipeline", "expand_timesteps": "yes"}')
    with pytest.raises(CheckpointError, match=r"model_index.json: expand_timesteps must be true "
                                              r"or false, got 'yes'$"):
        config_from_diffusers(transformer)


def test_config_refuses_a_non_bool_flag() -> None:
    with pytest.raises(ValueError, match=r"expand_timesteps must be a bool, got 'yes'"):
        get_preset("tiny", expand_timesteps="yes")
