"""Image-to-video DiT: parity with diffusers' WanTransformer3DModel at random I2V configs
(Wan2.1-I2V with image tokens, Wan2.2-I2V style without), presets, checkpoint keys, bad input."""

from __future__ import annotations

import json

import pytest
import torch
from model_reference import (
    assert_matches_diffusers,
    contiguous_state,
    diffusers_gradients,
    diffusers_model,
    relative_error,
    write_checkpoints,
)
from safetensors.torch import load_file, save_file

from gpd_model import CheckpointError, DiTConfig, WanDiT, get_preset, load_checkpoint
from gpd_model.checkpoint import (
    config_from_diffusers,
    convert_state_dict,
    diffusers_config,
    key_map,
    save_diffusers,
)

pytest.importorskip("diffusers")

# diffusers' Wan attention takes everything before the last 512 context tokens as the image
# tokens, so a reference with an image embedder gets exactly 512 text tokens.
DIFFUSERS_TEXT_TOKENS = 512

# (heads, head_dim, layers, image_dim, image tokens, batch, frames, height, width): image_dim
# None is the Wan2.2-I2V style (36 channels, no image tokens); 257 is CLIP ViT-H's count.
# Sizes are not powers of two, head_dims 10 and 14 split RoPE unevenly.
CASES = [
    (2, 16, 2, 24, 257, 1, 3, 6, 10),
    (3, 10, 1, 20, 5, 3, 5, 4, 6),
    (2, 12, 2, None, 0, 3, 3, 6, 10),
    (1, 14, 1, None, 0, 1, 5, 2, 6),
]


def _config(heads: int, head_dim: int, layers: int, image_dim: int | None, seed: int) -> DiTConfig:
    return DiTConfig(
        in_channels=36, out_channels=16, dim=heads * head_dim, ffn_dim=3 * heads * head_dim + 4,
        num_heads=heads, num_layers=layers, text_dim=7 + seed, freq_dim=16 + 2 * seed,
        image_dim=image_dim,
    )


def _inputs(cfg: DiTConfig, batch: int, frames: int, height: int, width: int,
            image_tokens: int, seed: int):
    """(x, timestep, context, {"image_tokens": ...} or {}) for one case."""
    generator = torch.Generator().manual_seed(200 + seed)
    x = torch.randn(batch, cfg.in_channels, frames, height, width, generator=generator)
    timestep = torch.rand(batch, generator=generator) * 1000
    timestep[0] = 999.0
    text_tokens = DIFFUSERS_TEXT_TOKENS if cfg.image_dim else 9
    context = torch.randn(batch, text_tokens, cfg.text_dim, generator=generator)
    if cfg.image_dim is None:
        return x, timestep, context, {}
    image = torch.randn(batch, image_tokens, cfg.image_dim, generator=generator)
    return x, timestep, context, {"image_tokens": image}


def _converted(reference, cfg: DiTConfig) -> dict[str, torch.Tensor]:
    return convert_state_dict(contiguous_state(reference), "diffusers", WanDiT(cfg))


@pytest.mark.parametrize("case", range(len(CASES)))
def test_forward_and_gradients_match_diffusers(case: int, tmp_path) -> None:
    heads, head_dim, layers, image_dim, image_tokens, batch, frames, height, width = CASES[case]
    cfg = _config(heads, head_dim, layers, image_dim, case)
    reference = diffusers_model(cfg, seed=10 + case)
    assert (reference.condition_embedder.image_embedder is None) == (image_dim is None)
    diffusers_file, wan_file = write_checkpoints(reference, tmp_path)
    x, timestep, context, extra = _inputs(cfg, batch, frames, height, width, image_tokens, case)
    want = diffusers_gradients(reference, x, timestep, context, **extra)
    for path, fmt in ((diffusers_file, "diffusers"), (wan_file, "wan")):
        ours = WanDiT(cfg)
        assert load_checkpoint(ours, path) == fmt
        out = assert_matches_diffusers(ours, want, x, timestep, context, fmt, **extra)
        assert out.shape == (batch, 16, frames, height, width)


def test_image_tokens_change_the_output_and_text_length_is_free() -> None:
    """The image branch is used, and (unlike diffusers' 512-token split) any text length works."""
    cfg = _config(2, 8, 1, 12, seed=0)
    model = diffusers_model(cfg, seed=3)
    ours = WanDiT(cfg)
    ours.load_state_dict(_converted(model, cfg))
    x, timestep, context, extra = _inputs(cfg, 2, 1, 4, 2, 7, seed=0)
    with torch.no_grad():
        out = ours(x, timestep, context[:, :5], **extra)
        other = ours(x, timestep, context[:, :5], image_tokens=extra["image_tokens"].flip(0))
    assert out.shape == (2, 16, 1, 4, 2) and torch.isfinite(out).all()
    assert relative_error(other, out) > 1e-2


@pytest.mark.parametrize("image_dim", [12, None])
def test_export_round_trip_through_diffusers(image_dim: int | None, tmp_path) -> None:
    from diffusers import WanTransformer3DModel

    cfg = _config(2, 8, 2, image_dim, seed=1)
    ours = WanDiT(cfg)
    ours.load_state_dict(_converted(diffusers_model(cfg, seed=5), cfg))
    folder = save_diffusers(ours, tmp_path / "export")
    reloaded = WanTransformer3DModel.from_pretrained(folder).eval()
    x, timestep, context, extra = _inputs(cfg, 2, 2, 4, 6, 3, seed=1)
    with torch.no_grad():
        want = ours(x, timestep, context, **extra)
        got = reloaded(x, timestep, context,
                       encoder_hidden_states_image=extra.get("image_tokens")).sample
    assert relative_error(got, want) <= 1e-5
    assert config_from_diffusers(folder) == cfg
    again = WanDiT(cfg)
    assert load_checkpoint(again, folder) == "diffusers"
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in ours.state_dict().items())


def test_unused_image_query_norm_of_first_diffusers_conversions_is_skipped(tmp_path) -> None:
    cfg = _config(2, 8, 2, 12, seed=2)
    state = contiguous_state(diffusers_model(cfg, seed=6))
    for index in range(cfg.num_layers):
        state[f"blocks.{index}.attn2.norm_added_q.weight"] = torch.ones(cfg.dim)
    save_file(state, str(tmp_path / "model.safetensors"))
    ours = WanDiT(cfg)
    assert load_checkpoint(ours, tmp_path / "model.safetensors") == "diffusers"
    assert torch.equal(ours.blocks[1].cross_attn.norm_k_img.weight,
                       state["blocks.1.attn2.norm_added_k.weight"])


def test_presets_match_diffusers_configs_and_parameters() -> None:
    from diffusers import WanTransformer3DModel

    cfg = get_preset("wan2.1-i2v-14b")
    # transformer/config.json of Wan-AI/Wan2.1-I2V-14B-480P-Diffusers
    published = {
        "added_kv_proj_dim": 5120, "attention_head_dim": 128, "cross_attn_norm": True,
        "eps": 1e-06, "ffn_dim": 13824, "freq_dim": 256, "image_dim": 1280, "in_channels": 36,
        "num_attention_heads": 40, "num_layers": 40, "out_channels": 16,
        "patch_size": [1, 2, 2], "qk_norm": "rms_norm_across_heads", "text_dim": 4096,
    }
    exported = diffusers_config(cfg)
    assert {k: exported[k] for k in published} == published
    with torch.device("meta"):
        reference = WanTransformer3DModel(**published)
        ours = WanDiT(cfg)
    shapes = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    ours_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    names = key_map(cfg.num_layers, "diffusers", image=True)
    assert {s for sources in names.values() for s in sources} == set(shapes)
    for name, sources in names.items():
        rows = sum(shapes[s][0] for s in sources) if shapes[sources[0]] else None
        assert ours_shapes[name] == ((rows, *shapes[sources[0]][1:]) if rows else ()), name
    assert sum(p.numel() for p in ours.parameters()) == sum(
        p.numel() for p in reference.parameters())

    tiny = get_preset("tiny-i2v")
    assert (tiny.in_channels, tiny.image_dim) == (7, 32)  # RGB 3 + mask 1 + frame 3
    assert {**vars(tiny), "in_channels": 3, "image_dim": None} == vars(get_preset("tiny"))
    model = WanDiT(tiny)
    out = model(torch.randn(2, 7, 4, 6, 8), torch.tensor([999.0, 10.0]),
                torch.randn(2, 5, tiny.text_dim), image_tokens=torch.randn(2, 7, 32))
    assert out.shape == (2, 3, 4, 6, 8) and torch.isfinite(out).all()


# -- bad input ---------------------------------------------------------------------------------
I2V = _config(2, 8, 1, 12, seed=0)
I2V_NO_IMAGE = _config(2, 8, 1, None, seed=0)


@pytest.fixture(scope="module")
def models() -> dict[str, WanDiT]:
    return {"i2v": WanDiT(I2V), "no_image": WanDiT(I2V_NO_IMAGE),
            "t2v": WanDiT(get_preset("tiny", num_layers=1))}


def _good(cfg: DiTConfig, image: bool = True):
    x = torch.randn(2, cfg.in_channels, 4 if cfg.patch_size[0] == 4 else 1, 4, 6)
    tokens = {"image_tokens": torch.randn(2, 3, 12)} if image else {}
    return x, torch.tensor([10.0, 500.0]), torch.randn(2, 3, cfg.text_dim), tokens


@pytest.mark.parametrize(
    ("model", "change", "message"),
    [
        ("i2v", lambda x, t, c, i: (x, t, c, {}),
         r"this model has an image embedder \(image_dim 12, Wan2.1-I2V\): pass image_tokens "
         r"\[B, N, 12\]"),
        ("no_image", lambda x, t, c, i: (x, t, c, {"image_tokens": torch.randn(2, 3, 12)}),
         r"image_tokens given, but this model has no image embedder"),
        ("t2v", lambda x, t, c, i: (x, t, c, {"image_tokens": torch.randn(2, 3, 12)}),
         r"image_tokens given, but this model has no image embedder"),
        ("i2v", lambda x, t, c, i: (x[:, :16], t, c, i),
         r"x must be \[B, 36, T, H, W\] \(rank 5, 36 channels; noisy latent 16 \+ mask and "
         r"condition latent 20 along channels\), got shape \(2, 16, 1, 4, 6\)"),
        ("no_image", lambda x, t, c, i: (x[:, :16], t, c, i), r"36 channels; noisy latent 16"),
        ("i2v", lambda x, t, c, i: (x, t, c, {"image_tokens": i["image_tokens"][..., :10]}),
         r"image_tokens must be \[2, N, 12\] with N >= 1 \(image_dim 12\), got shape \(2, 3, 10\)"),
        ("i2v", lambda x, t, c, i: (x, t, c, {"image_tokens": i["image_tokens"][:1]}),
         r"image_tokens must be \[2, N, 12\].*got shape \(1, 3, 12\)"),
        ("i2v", lambda x, t, c, i: (x, t, c, {"image_tokens": i["image_tokens"][:, :0]}),
         r"image_tokens must be \[2, N, 12\] with N >= 1.*got shape \(2, 0, 12\)"),
        ("i2v", lambda x, t, c, i: (x, t, c, {"image_tokens": i["image_tokens"].long()}),
         r"image_tokens must be floating point, got torch.int64"),
        ("i2v", lambda x, t, c, i: (x, t, c, {"image_tokens": i["image_tokens"].numpy()}),
         r"image_tokens must be a torch.Tensor, got ndarray"),
    ],
)
def test_model_refuses_bad_image_input_in_one_line(models, model, change, message) -> None:
    cfg = models[model].cfg
    x, timestep, context, extra = change(*_good(cfg, image=cfg.image_dim is not None))
    with pytest.raises((ValueError, TypeError), match=message) as caught:
        models[model](x, timestep, context, **extra)
    assert str(caught.value).startswith("WanDiT: ") and "\n" not in str(caught.value)


def test_config_refuses_bad_image_dim() -> None:
    with pytest.raises(ValueError, match=r"image_dim must be a positive int or None, got 0"):
        _config(2, 8, 1, 0, seed=0)


def _write_config(folder, **changes) -> None:
    config = {**diffusers_config(I2V), **changes}
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"pos_embed_seq_len": 514},
         r"pos_embed_seq_len=514: Wan2.1-FLF2V \(first-last-frame, pos_embed_seq_len\) is not "
         r"supported"),
        ({"added_kv_proj_dim": 8},
         r"added_kv_proj_dim=8 with image_dim=12 is not supported \(expected "
         r"added_kv_proj_dim=16"),
        ({"image_dim": None}, r"added_kv_proj_dim=16 with image_dim=None .*expected "
                              r"added_kv_proj_dim=None"),
        ({"added_kv_proj_dim": None}, r"added_kv_proj_dim=None with image_dim=12"),
        ({"qk_norm": "rms_norm"}, r"qk_norm='rms_norm' is not supported"),
    ],
)
def test_diffusers_config_refusals_name_the_field(changes, message, tmp_path) -> None:
    _write_config(tmp_path, **changes)
    with pytest.raises(CheckpointError, match=message) as caught:
        config_from_diffusers(tmp_path)
    assert "\n" not in str(caught.value)


def test_config_from_diffusers_reads_the_i2v_fields(tmp_path) -> None:
    _write_config(tmp_path)
    assert config_from_diffusers(tmp_path) == I2V
    _write_config(tmp_path, image_dim=None, added_kv_proj_dim=None)
    assert config_from_diffusers(tmp_path) == I2V_NO_IMAGE


@pytest.mark.parametrize("fmt", ["diffusers", "wan"])
def test_flf2v_checkpoint_is_refused_by_name(fmt: str, tmp_path) -> None:
    reference = diffusers_model(I2V, seed=8)
    state = dict(zip(("diffusers", "wan"), write_checkpoints(reference, tmp_path), strict=True))
    tensors = load_file(state[fmt])
    key = "img_emb.emb_pos" if fmt == "wan" else "condition_embedder.image_embedder.pos_embed"
    tensors[key] = torch.zeros(1, 514, 12)
    save_file(tensors, str(tmp_path / "flf2v.safetensors"))
    model = WanDiT(I2V)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match=rf"holds {key}: Wan2.1-FLF2V") as caught:
        load_checkpoint(model, tmp_path / "flf2v.safetensors")
    assert "\n" not in str(caught.value)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_text_to_video_checkpoint_into_i2v_model_lists_the_image_keys(tmp_path) -> None:
    reference = diffusers_model(I2V_NO_IMAGE, seed=9)
    _, wan_file = write_checkpoints(reference, tmp_path)
    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(WanDiT(I2V), wan_file)
    message = str(caught.value)
    assert "missing keys (13):" in message and "nothing was loaded" in message
    for key in ("img_emb.proj.0.weight", "img_emb.proj.4.bias", "blocks.0.cross_attn.k_img.weight",
                "blocks.0.cross_attn.v_img.bias", "blocks.0.cross_attn.norm_k_img.weight"):
        assert repr(key) in message
    # and an I2V checkpoint into a model without the image parts: the image keys unexpected
    diffusers_file, _ = write_checkpoints(diffusers_model(I2V, seed=9), tmp_path)
    with pytest.raises(CheckpointError, match=r"unexpected keys \(13\):.*attn2\.add_k_proj"):
        load_checkpoint(WanDiT(I2V_NO_IMAGE), diffusers_file)
