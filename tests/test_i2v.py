"""Image-to-video through the denoiser interface: DiTDenoiser and CFG against hand-built model
calls in float64, the built-in data set's i2v mode, the task setting, first-frame fidelity,
and the tiny I2V pipeline of examples/i2v.toml."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from builders import TINY_PIPELINE_BUDGETS
from safetensors.torch import save_file

from gpd_model import CFG, Conditioning, DiTDenoiser, WanDiT, get_preset, unconditional
from gpd_train.config.settings import RunConfig
from gpd_train.data.datasets import open_data
from gpd_train.data.procedural import ProceduralVideos
from gpd_train.errors import ConfigError
from gpd_train.eval.metric_registry import FIRST_FRAME, Sample
from gpd_train.eval.metrics import first_frame_psnr
from gpd_train.train.objectives import FlowMatching

ROOT = Path(__file__).resolve().parents[1]
TEXT_DIM = 32


def random_i2v(seed: int, image_dim: int | None = 8) -> WanDiT:
    """A 1-layer float64 tiny-i2v DiT whose every weight is random."""
    torch.manual_seed(seed)
    model = WanDiT(get_preset("tiny-i2v", dim=32, ffn_dim=64, num_layers=1, image_dim=image_dim))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(0.2 * torch.randn(param.shape, generator=generator))
    return model.double().eval()


def i2v_inputs(batch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, Conditioning]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, 4, 8, 8, generator=g, dtype=torch.float64)
    sigma = torch.rand(batch, generator=g, dtype=torch.float64)
    cond = Conditioning(torch.randn(batch, 5, TEXT_DIM, generator=g, dtype=torch.float64),
                        image_latent=torch.randn(batch, 4, 4, 8, 8, generator=g,
                                                 dtype=torch.float64),
                        image_tokens=torch.randn(batch, 6, 8, generator=g, dtype=torch.float64))
    return x, sigma, cond


def test_dit_denoiser_feeds_the_image_latent_along_channels_and_the_image_tokens():
    model = random_i2v(0)
    x, sigma, cond = i2v_inputs(3, 1)
    with torch.no_grad():
        got = DiTDenoiser(model)(x, sigma, cond)
        want = model(torch.cat([x, cond.image_latent], dim=1), 1000 * sigma, cond.text,
                     image_tokens=cond.image_tokens)
        # both slots matter: changing either changes the velocity
        other_frame = Conditioning(cond.text, image_latent=cond.image_latent.flip(0),
                                   image_tokens=cond.image_tokens)
        other_tokens = Conditioning(cond.text, image_latent=cond.image_latent,
                                    image_tokens=cond.image_tokens.flip(0))
        assert not torch.allclose(DiTDenoiser(model)(x, sigma, other_frame), got)
        assert not torch.allclose(DiTDenoiser(model)(x, sigma, other_tokens), got)
        # the Wan2.2-I2V style: the latent alone
        plain = random_i2v(0, image_dim=None)
        no_tokens = Conditioning(cond.text, image_latent=cond.image_latent)
        torch.testing.assert_close(
            DiTDenoiser(plain)(x, sigma, no_tokens),
            plain(torch.cat([x, cond.image_latent], dim=1), 1000 * sigma, cond.text),
            rtol=0, atol=0)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert got.shape == x.shape


@pytest.mark.parametrize(("model", "slots", "message"), [
    ("i2v", {"image_tokens"}, r"this image-to-video Wan DiT needs Conditioning.image_latent "
                              r"\(the mask and condition latent\), got None"),
    ("i2v", {"image_latent"}, r"needs Conditioning.image_tokens \(image-encoder tokens\), "
                              r"got None"),
    ("plain", {"image_latent", "image_tokens"}, r"no input for Conditioning.image_tokens "
                                                r"\(image-encoder tokens; no image embedder\)"),
    ("t2v", {"image_tokens"}, r"no input for Conditioning.image_tokens"),
])
def test_dit_denoiser_refuses_image_slots_the_model_does_not_match(model, slots, message):
    models = {"i2v": random_i2v(0), "plain": random_i2v(0, image_dim=None),
              "t2v": WanDiT(get_preset("tiny", num_layers=1)).double()}
    x, sigma, cond = i2v_inputs(2, 2)
    given = Conditioning(cond.text, **{name: cond.tensors()[name] for name in slots})
    with pytest.raises(ValueError, match=message):
        DiTDenoiser(models[model])(x, sigma, given)


def test_dit_denoiser_refuses_an_image_latent_of_other_frames():
    x, sigma, cond = i2v_inputs(2, 3)
    short = Conditioning(cond.text, image_latent=cond.image_latent[:, :, :2],
                         image_tokens=cond.image_tokens)
    with pytest.raises(ValueError, match=r"image_latent must be \[2, C, 4, 8, 8\] \(x's batch "
                                         r"and frames, height, width\), got \(2, 4, 2, 8, 8\)"):
        DiTDenoiser(random_i2v(0))(x, sigma, short)


def test_i2v_cfg_guides_on_the_text_and_keeps_the_image_in_both_branches():
    model = random_i2v(4)
    x, sigma, cond = i2v_inputs(3, 5)
    negative = Conditioning(torch.randn(1, 5, TEXT_DIM, dtype=torch.float64,
                                        generator=torch.Generator().manual_seed(9)))
    w = torch.tensor([1.5, 3.0, 0.5], dtype=torch.float64)
    with torch.no_grad():
        got = CFG(DiTDenoiser(model), negative, w)(x, sigma, cond)
        inputs, t = torch.cat([x, cond.image_latent], dim=1), 1000 * sigma
        u_cond = model(inputs, t, cond.text, image_tokens=cond.image_tokens)
        u_uncond = model(inputs, t, negative.text.expand(3, -1, -1),
                         image_tokens=cond.image_tokens)
    want = u_uncond + w.view(-1, 1, 1, 1, 1) * (u_cond - u_uncond)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_unconditional_takes_each_samples_image_and_refuses_an_image_negative():
    _, _, cond = i2v_inputs(3, 6)
    negative = Conditioning(torch.zeros(1, 5, TEXT_DIM, dtype=torch.float64))
    uncond = unconditional(cond, negative)
    assert torch.equal(uncond.text, negative.text.expand(3, -1, -1))
    assert uncond.image_latent is cond.image_latent and uncond.image_tokens is cond.image_tokens
    with pytest.raises(ValueError, match="the negative Conditioning carries text only"):
        unconditional(cond, cond[:1])


# -- the built-in data set's image-to-video mode ------------------------------------------------

def test_i2v_data_conditions_on_the_first_frame_and_its_patch_tokens():
    data = ProceduralVideos(TEXT_DIM, task="i2v", image_dim=8)
    cond, videos = data.draw(torch.Generator().manual_seed(0), 5, with_latents=True)
    first = videos[:, :, 0]
    assert torch.equal(cond.image_latent[:, 0, 0], torch.ones(5, 16, 16))  # mask: frame 0 only
    assert torch.equal(cond.image_latent[:, 1:, 0], first)
    assert not cond.image_latent[:, :, 1:].any()  # zeros after the first frame
    assert torch.equal(data.condition_frames(cond), first)
    # token (i, j) is the 4 x 4 patch at rows 4i.., columns 4j.., channels outermost
    patches = first.unfold(2, 4, 4).unfold(3, 4, 4)  # [B, 3, 4, 4, 4, 4]
    patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(5, 16, 48)
    torch.testing.assert_close(cond.image_tokens, patches @ data._image_projection)
    # with_latents False: the same condition, no videos; the text is the prompt's
    again, none = data.draw(torch.Generator().manual_seed(0), 5, with_latents=False)
    assert none is None and torch.equal(again.image_latent, cond.image_latent)
    eval_cond, names = data.eval_prompts(14)
    assert torch.equal(data.condition_frames(eval_cond), data.videos(torch.arange(14))[:, :, 0])
    assert names[12] == names[0]


def test_text_to_video_draws_are_unchanged_by_the_task():
    t2v = ProceduralVideos(TEXT_DIM)
    i2v = ProceduralVideos(TEXT_DIM, task="i2v")
    a, videos_a = t2v.draw(torch.Generator().manual_seed(3), 4, with_latents=True)
    b, videos_b = i2v.draw(torch.Generator().manual_seed(3), 4, with_latents=True)
    assert set(a.tensors()) == {"text"} and b.image_tokens is None
    assert torch.equal(a.text, b.text) and torch.equal(videos_a, videos_b)


def test_cfg_dropout_drops_the_text_and_keeps_the_image():
    data = ProceduralVideos(TEXT_DIM, task="i2v", image_dim=32)
    objective = FlowMatching(model=WanDiT(get_preset("tiny-i2v", num_layers=1)), data=data,
                             generator=torch.Generator().manual_seed(0), batch_size=3, shift=3.0,
                             cfg_dropout=1.0, device=torch.device("cpu"), precision="fp32")
    inputs = objective.prepare(0)
    kept, _ = data.draw(torch.Generator().manual_seed(0), 3, with_latents=False)
    assert torch.equal(inputs["text"], data.negative.text.expand(3, -1, -1))
    assert torch.equal(inputs["image_latent"], kept.image_latent)
    assert torch.equal(inputs["image_tokens"], kept.image_tokens)


@pytest.mark.parametrize(("changes", "message"), [
    ({"task": "i2v"}, r"task 'i2v' does not fit preset 'tiny': it is t2v \(in_channels 3, "
                      r"out_channels 3\); give task 't2v' or a preset for i2v"),
    ({"preset": "tiny-i2v"}, r"task 't2v' does not fit preset 'tiny-i2v': it is i2v"),
    ({"task": "v2v"}, r"task must be one of t2v, i2v, got 'v2v'"),
])
def test_task_is_refused_with_a_preset_of_the_other_task(changes, message):
    with pytest.raises(ConfigError, match=message):
        RunConfig(**changes)
    RunConfig(preset="tiny-i2v", task="i2v")


def test_a_ti2v_model_does_image_to_video_on_data_with_first_frames_only(tmp_path):
    """Text-only embeddings serve a TI2V model's t2v, not its i2v (data with first frames:
    tests/test_ti2v_images.py)."""
    cfg = get_preset("tiny-ti2v")
    save_file({"context": torch.zeros(2, 4, cfg.text_dim)}, str(tmp_path / "shard-0.safetensors"),
              metadata={"latent_shape": "3,4,16,16"})
    save_file({"context": torch.zeros(1, 4, cfg.text_dim)}, str(tmp_path / "negative.safetensors"))
    with pytest.raises(ConfigError, match=r"holds prompt embeddings without images; the run's "
                                          r"task is i2v .* --images FILE"):
        open_data(tmp_path, cfg, 0, "i2v")
    assert open_data(tmp_path, cfg, 0, "t2v").task == "t2v"
    assert open_data(None, cfg, 0, "i2v").task == "i2v"


def test_open_data_refuses_what_the_i2v_model_cannot_train_on(tmp_path):
    cfg = get_preset("tiny-i2v")
    # Prompt embeddings without images (real-scale image data: tests/test_i2v_realscale.py).
    save_file({"context": torch.zeros(2, 4, cfg.text_dim)}, str(tmp_path / "shard-0.safetensors"),
              metadata={"latent_shape": "3,4,16,16"})
    save_file({"context": torch.zeros(1, 4, cfg.text_dim)}, str(tmp_path / "negative.safetensors"))
    with pytest.raises(ConfigError, match="holds prompt embeddings without images; the model is "
                                          "i2v .* --images FILE"):
        open_data(tmp_path, cfg, 0, "i2v")
    with pytest.raises(ConfigError, match=r"a model for i2v on it has in_channels 7 and "
                                          r"out_channels 3, got 36 and 3"):
        open_data(None, get_preset("tiny-i2v", in_channels=36), 0, "i2v")
    assert open_data(None, cfg, 0, "i2v").task == "i2v"


def test_first_frame_psnr_is_each_first_frames_psnr_to_its_condition():
    g = torch.Generator().manual_seed(0)
    videos = torch.rand(4, 3, 5, 6, 7, generator=g) * 2 - 1
    frames = torch.rand(4, 3, 6, 7, generator=g) * 2 - 1
    mse = (videos[:, :, 0].double() - frames.double()).square().mean(dim=(1, 2, 3))
    torch.testing.assert_close(first_frame_psnr(videos, frames), 10 * torch.log10(4 / mse))
    with pytest.raises(ValueError, match=r"frames must be a \[N, C, H, W\] tensor, got "
                                         r"\(4, 3, 1, 6, 7\)"):
        first_frame_psnr(videos, frames[:, :, None])


def test_first_frame_fidelity_is_not_measured_on_sets_not_sampled_from_the_conditions():
    # The held-out data row: other videos, whose first frames may even equal a condition
    # (an infinite PSNR); its column shows nan instead.
    g = torch.Generator().manual_seed(1)
    videos = torch.rand(3, 3, 4, 5, 5, generator=g) * 2 - 1
    judge = type("Judge", (), {"first_frames": videos[:, :, 0].clone()})()
    sampled = FIRST_FRAME.compute(judge, Sample("GPD@6", "ref", videos, videos, 0.1))
    assert torch.isinf(sampled).all()
    data = FIRST_FRAME.compute(judge, Sample("data", "ref", videos, videos, 0.1, sampled=False))
    assert torch.isnan(data).all() and data.shape == (3,)


# -- the tiny I2V pipeline -------------------------------------------------------------------


@pytest.mark.slow
def test_examples_i2v_runs_the_pipeline_with_first_frame_fidelity(tmp_path):
    config = tmp_path / "i2v.toml"
    config.write_text((ROOT / "examples" / "i2v.toml").read_text() + TINY_PIPELINE_BUDGETS)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-m", "gpd_train", "--config", str(config), "--run-dir",
                    str(tmp_path / "run"), "--threads", "1"], check=True, env=env,
                   capture_output=True, timeout=600)
    report = (tmp_path / "run" / "eval" / "report.md").read_text()
    assert "| first-frame PSNR (dB) |" in report
    assert "| GPD@2 - teacher@2 naive | first-frame PSNR (dB) |" in report
