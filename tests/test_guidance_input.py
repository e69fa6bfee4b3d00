"""The guidance input: zero-initialised, folded exactly, exported as a plain Wan2.1 model."""

from __future__ import annotations

import pytest
import torch

from gpd_model import (
    CheckpointError,
    DiTConfig,
    WanDiT,
    add_guidance_input,
    fold_guidance,
    has_guidance_input,
    save_diffusers,
)

# (heads, head_dim, layers, batch, frames, height, width): batch 1, odd sizes, T = 1.
CASES = [(2, 8, 1, 1, 1, 2, 6), (1, 12, 2, 3, 2, 4, 2), (3, 10, 1, 2, 3, 6, 4)]


def _model(heads: int, head_dim: int, layers: int, seed: int) -> WanDiT:
    torch.manual_seed(seed)
    cfg = DiTConfig(in_channels=3, out_channels=2, dim=heads * head_dim, ffn_dim=24,
                    num_heads=heads, num_layers=layers, text_dim=5, freq_dim=18)
    return WanDiT(cfg).eval()


def _inputs(model: WanDiT, batch: int, frames: int, height: int, width: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, model.cfg.in_channels, frames, height, width, generator=generator)
    timestep = torch.rand(batch, generator=generator) * 1000
    context = torch.randn(batch, 3, model.cfg.text_dim, generator=generator)
    return x, timestep, context


def _trained_embedding(model: WanDiT, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.guidance_embedding.parameters():
            param.copy_(0.3 * torch.randn(param.shape, generator=generator))


@pytest.mark.parametrize("case", CASES)
def test_a_new_guidance_input_leaves_the_model_bit_for_bit_unchanged(case):
    heads, head_dim, layers, *shape = case
    plain = _model(heads, head_dim, layers, seed=1)
    x, timestep, context = _inputs(plain, *shape, seed=2)
    with torch.no_grad():
        want = plain(x, timestep, context)
        conditioned = add_guidance_input(plain)
        for w in (1.0, 4.5):
            got = conditioned(x, timestep, context, guidance=torch.full((shape[0],), w))
            assert torch.equal(got, want)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("w", [1.0, 2.37, 6.0])
def test_folded_equals_unfolded(case, w):
    heads, head_dim, layers, *shape = case
    model = add_guidance_input(_model(heads, head_dim, layers, seed=3))
    _trained_embedding(model, seed=4)
    x, timestep, context = _inputs(model, *shape, seed=5)
    folded = fold_guidance(model, w)
    assert not has_guidance_input(folded) and has_guidance_input(model)
    with torch.no_grad():
        want = model.double()(x.double(), timestep.double(), context.double(),
                              guidance=torch.full((shape[0],), w, dtype=torch.float64))
        got = fold_guidance(model, w)(x.double(), timestep.double(), context.double())
        other = model(x.double(), timestep.double(), context.double(),
                      guidance=torch.full((shape[0],), w + 1.0, dtype=torch.float64))
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(other, want, atol=1e-3)  # w matters, so the check can fail
    with torch.no_grad():  # float32 as trained: the same to float rounding
        model32, folded32 = model.float(), fold_guidance(model.float(), w)
        want32 = model32(x, timestep, context, guidance=torch.full((shape[0],), w))
        torch.testing.assert_close(folded32(x, timestep, context), want32, atol=1e-5, rtol=1e-5)


def test_folded_student_exports_to_diffusers(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    model = add_guidance_input(_model(2, 8, 2, seed=6))
    _trained_embedding(model, seed=7)
    with pytest.raises(CheckpointError, match=r"fold_guidance\(model, w\)"):
        save_diffusers(model, tmp_path / "unfolded")
    save_diffusers(fold_guidance(model, 2.5), tmp_path / "student")
    loaded = diffusers.WanTransformer3DModel.from_pretrained(tmp_path / "student").eval()
    x, timestep, context = _inputs(model, 2, 2, 4, 6, seed=8)
    with torch.no_grad():
        want = model(x, timestep, context, guidance=torch.full((2,), 2.5))
        got = loaded(x, timestep, context, return_dict=False)[0]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_guidance_is_required_exactly_when_the_model_has_an_input():
    model = _model(1, 8, 1, seed=9)
    x, timestep, context = _inputs(model, 2, 1, 2, 2, seed=10)
    with pytest.raises(ValueError, match="no guidance input"):
        model(x, timestep, context, guidance=torch.ones(2))
    add_guidance_input(model)
    with pytest.raises(ValueError, match=r"pass guidance \[B\]"):
        model(x, timestep, context)
    with pytest.raises(ValueError, match=r"guidance must be a \[B\] tensor"):
        model(x, timestep, context, guidance=torch.ones(2, 1))
    with pytest.raises(ValueError, match="already has a guidance input"):
        add_guidance_input(model)
    with pytest.raises(ValueError, match="must be finite"):
        fold_guidance(model, float("nan"))
    with pytest.raises(ValueError, match="no guidance input to fold"):
        fold_guidance(_model(1, 8, 1, seed=9), 1.5)


def test_export_transformer_folds_at_the_asked_w(tmp_path):
    from gpd_train.infer.export.diffusers import export_transformer
    from gpd_train.infer.sample import SampleError

    model = add_guidance_input(_model(1, 8, 1, seed=11))
    _trained_embedding(model, seed=12)
    with pytest.raises(SampleError, match=r"say which w to export it at \(--guidance W\)"):
        export_transformer(model, tmp_path / "unfolded")
    folder = export_transformer(model, tmp_path / "student", guidance=1.75)
    exported = WanDiT(model.cfg).eval()
    from gpd_model import load_checkpoint

    load_checkpoint(exported, folder)
    x, timestep, context = _inputs(model, 2, 1, 2, 4, seed=13)
    with torch.no_grad():
        want = model(x, timestep, context, guidance=torch.full((2,), 1.75))
        torch.testing.assert_close(exported(x, timestep, context), want, atol=1e-5, rtol=1e-5)
