"""Bad inputs to the model, config and attention raise errors that name the problem."""

from __future__ import annotations

import pytest
import torch

from gpd_model import (
    DiTConfig,
    WanDiT,
    attention,
    attention_backend,
    force_attention_backend,
    get_preset,
)

CFG = DiTConfig(in_channels=3, out_channels=3, dim=16, ffn_dim=24, num_heads=2, num_layers=1,
                text_dim=5, freq_dim=8)


@pytest.fixture(scope="module")
def model() -> WanDiT:
    return WanDiT(CFG)


def _good():
    return torch.randn(2, 3, 1, 4, 6), torch.tensor([10.0, 500.0]), torch.randn(2, 3, 5)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda x, t, c: (x[0], t, c), r"rank 5.*got shape \(3, 1, 4, 6\)"),
        (lambda x, t, c: (x[:, :2], t, c), r"3 channels.*got shape \(2, 2, 1, 4, 6\)"),
        (lambda x, t, c: (x[..., :5], t, c), r"multiple of the patch.*W=5"),
        (lambda x, t, c: (x[:, :, :, :3], t, c), r"H=3"),
        (lambda x, t, c: (x, t, c[..., :4]), r"text_dim 5.*got shape \(2, 3, 4\)"),
        (lambda x, t, c: (x, t[:1], c), r"timestep must have shape \[2\]"),
        (lambda x, t, c: (x, t, c[:1]), r"context must be \[2, L, 5\]"),
        (lambda x, t, c: (x.long(), t, c), r"x must be floating point"),
        (lambda x, t, c: (x, t, c[:, :0]), r"at least one text token"),
    ],
)
def test_model_rejects_bad_input(model, change, message) -> None:
    with pytest.raises((ValueError, TypeError), match=message):
        model(*change(*_good()))


def test_any_divisible_size_works_and_keeps_shape(model) -> None:
    for shape in [(1, 3, 1, 2, 2), (3, 3, 5, 6, 2)]:
        x = torch.randn(shape)
        out = model(x, torch.full((shape[0],), 250.0), torch.randn(shape[0], 1, 5))
        assert out.shape == shape and torch.isfinite(out).all()


def test_config_and_preset_errors_are_named() -> None:
    with pytest.raises(ValueError, match=r"dim \(10\) must be divisible by num_heads \(3\)"):
        DiTConfig(in_channels=1, out_channels=1, dim=10, ffn_dim=4, num_heads=3, num_layers=1,
                  text_dim=2)
    with pytest.raises(ValueError, match="patch_size must be three positive ints"):
        DiTConfig(in_channels=1, out_channels=1, dim=8, ffn_dim=4, num_heads=2, num_layers=1,
                  text_dim=2, patch_size=(1, 2))
    with pytest.raises(ValueError, match=r"unknown DiT preset 'huge'.*'tiny'"):
        get_preset("huge")
    assert get_preset("wan2.1-t2v-1.3b").rope_split == (44, 42, 42)
    assert get_preset("tiny", num_layers=1).num_layers == 1


def test_attention_backend_is_observable_and_forceable() -> None:
    q, k, v = torch.randn(2, 7, 3, 8), torch.randn(2, 5, 3, 8), torch.randn(2, 5, 3, 8)
    assert attention_backend(q) == "sdpa"
    default = attention(q, k, v)
    with force_attention_backend("math"):
        assert attention_backend(q) == "math"
        forced = attention(q, k, v)
    assert attention_backend(q) == "sdpa"
    scores = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) / 8**0.5
    want = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v.double())
    torch.testing.assert_close(default.double(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(forced.double(), want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="unknown attention backend 'xformers'"):
        with force_attention_backend("xformers"):
            pass
    with pytest.raises(ValueError, match=r"k and v shapes differ"):
        attention(q, k, v[:, :4])
    with pytest.raises(ValueError, match=r"must be \[batch, length, heads, head_dim\]"):
        attention(q[0], k, v)


def test_flash_backend_refuses_cpu_tensors() -> None:
    from gpd_model.attention import flash_attn_available

    if not flash_attn_available():
        with pytest.raises(RuntimeError, match="flash_attn is not installed"):
            with force_attention_backend("flash_attn"):
                pass
        return
    q = torch.randn(1, 4, 2, 8)
    with force_attention_backend("flash_attn"), pytest.raises(ValueError, match="needs CUDA"):
        attention(q, q, q)
