"""A Wan2.2 A14B Diffusers folder (two experts and boundary_ratio) as a teacher to sample:
the per-expert CFG scales of ``CFG(ExpertPair, ExpertScales)``, the sampler CLI against
diffusers' WanPipeline on a tiny random two-expert folder, and the folders refused before
any weight is read."""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
from realscale_fixtures import VIDEO, build_wan22_folder, tiny_transformer  # noqa: E402

from gpd_model import CFG, Conditioning, ExpertPair, ExpertScales, guided_branches  # noqa: E402
from gpd_train.infer import sample  # noqa: E402
from gpd_train.infer.export.diffusers import student_scheduler_config  # noqa: E402
from gpd_train.run import loading  # noqa: E402

STEPS, SHIFT = 4, 3.0  # sigma grid 1, 0.9, 0.75, 0.5, 0
BOUNDARY = 0.8  # inside the grid: one step on transformer/, three on transformer_2/
HIGH_W, LOW_W = 5.0, 2.0
# Our sampler through both experts vs WanPipeline's loop over the same two
# WanTransformer3DModels (float32): the task's bound.
PIPELINE_ATOL = 1e-4
VIDEO_ARGS = ["--height", VIDEO["height"], "--width", VIDEO["width"], "--frames", VIDEO["frames"]]


def _args(*values: object) -> list[str]:
    return [str(v) for v in values]


# -- CFG with a scale per expert ---------------------------------------------------------

@dataclass(frozen=True)
class Affine:
    """A stand-in expert: ``a * x + mean(text)``, so conditional and unconditional rows and
    the two experts give different velocities an exact reference can combine."""

    a: float

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor,
                 cond: Conditioning) -> torch.Tensor:
        return self.a * x + cond.text.mean((1, 2)).view(-1, 1, 1, 1, 1)

    def modules(self) -> tuple[torch.nn.Module, ...]:
        return ()


def test_cfg_guides_each_sample_with_the_scale_of_its_expert():
    pair = ExpertPair(Affine(2.0), Affine(-1.0), 0.5)
    negative = Conditioning(torch.full((1, 3, 4), -0.5, dtype=torch.float64))
    cfg = CFG(pair, negative, ExpertScales(HIGH_W, LOW_W))
    sigma = torch.tensor([0.9, 0.1, 0.5, 0.4999], dtype=torch.float64)
    x = torch.randn(4, 2, 1, 2, 2, dtype=torch.float64)
    cond = Conditioning(torch.randn(4, 3, 4, dtype=torch.float64))
    want = []
    for b, s in enumerate(sigma.tolist()):  # by hand, one sample at a time
        a, w = (2.0, HIGH_W) if s >= 0.5 else (-1.0, LOW_W)
        u_cond = a * x[b] + cond.text[b].mean()
        u_uncond = a * x[b] - 0.5
        want.append(u_uncond + w * (u_cond - u_uncond))
    torch.testing.assert_close(cfg(x, sigma, cond), torch.stack(want), rtol=1e-12, atol=1e-12)
    # The fused kernels' view: the same branches and the per-sample weight.
    _, _, weight = guided_branches(cfg, x, sigma, cond)
    assert weight.tolist() == [HIGH_W, LOW_W, HIGH_W, LOW_W]


def test_expert_scales_refused_around_one_model_or_when_not_positive():
    with pytest.raises(TypeError, match="ExpertScales guide an ExpertPair, got a Affine"):
        CFG(Affine(1.0), Conditioning(torch.zeros(1, 3, 4)), ExpertScales(2.0, 3.0))
    with pytest.raises(ValueError, match="low must be a CFG scale > 0, got 0"):
        ExpertScales(2.0, 0)


# -- a tiny Wan2.2 folder: the sampler CLI against WanPipeline ----------------------------

@pytest.fixture(scope="module")
def wan22(tmp_path_factory):
    return build_wan22_folder(tmp_path_factory.mktemp("wan22") / "Wan2.2-T2V-tiny-Diffusers",
                              boundary_ratio=BOUNDARY)


def test_sampler_through_the_experts_equals_wanpipeline(wan22, tmp_path):
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    texts = ["a red cat runs", "the dog jumps over water"]
    out = tmp_path / "samples"
    assert sample.main(_args("--checkpoint", wan22, "--model", wan22, "--prompt", texts[0],
                             "--prompt", texts[1], "--steps", STEPS, "--shift", SHIFT,
                             "--guidance", HIGH_W, "--guidance-2", LOW_W, "--seed", 7,
                             "--device", "cpu", "--out", out, *VIDEO_ARGS)) == 0
    ours = load_file(str(out / "latents.safetensors"))["latents"]
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["boundary"], summary["guidance"], summary["guidance_2"]) == (
        BOUNDARY, HIGH_W, LOW_W)
    assert summary["nfe_per_video"] == 2 * STEPS and not summary["cuda_graphs"]

    pipe = WanPipeline.from_pretrained(str(wan22))
    assert pipe.config.boundary_ratio == BOUNDARY
    # WanPipeline's Euler over our grid (the folder's own UniPC is another solver).
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(
        **student_scheduler_config(STEPS, SHIFT))
    pipe.scheduler.set_timesteps(STEPS)
    timesteps = pipe.scheduler.timesteps.tolist()
    on_high = sum(t >= BOUNDARY * 1000 for t in timesteps)
    assert 0 < on_high < STEPS, f"the boundary must split the grid, timesteps {timesteps}"
    call = dict(prompt=texts, num_inference_steps=STEPS, guidance_scale=HIGH_W,
                num_frames=VIDEO["frames"], height=VIDEO["height"], width=VIDEO["width"])
    theirs = pipe(**call, guidance_scale_2=LOW_W, generator=torch.Generator().manual_seed(7),
                  output_type="latent").frames
    print("max abs difference to WanPipeline:", float((ours - theirs).abs().max()))
    torch.testing.assert_close(ours, theirs, atol=PIPELINE_ATOL, rtol=0)
    # Sensitive to the second scale: the low expert at the high one's scale differs beyond
    # the tolerance (random tiny experts guide weakly: 6.8e-3 measured here).
    same = pipe(**call, generator=torch.Generator().manual_seed(7), output_type="latent").frames
    assert (same - theirs).abs().max() > 10 * PIPELINE_ATOL


# -- bad folders refused before any weight is read -----------------------------------------

def _copy_without(wan22: Path, root: Path, *skip: str) -> Path:
    """``wan22``'s components as links in ``root``, except ``skip``; a real model_index.json."""
    root.mkdir()
    for child in wan22.iterdir():
        if child.name not in skip and child.name != "model_index.json":
            (root / child.name).symlink_to(child)
    shutil.copy(wan22 / "model_index.json", root / "model_index.json")
    return root


def _set_boundary(root: Path, value: object) -> None:
    index = json.loads((root / "model_index.json").read_text())
    (root / "model_index.json").write_text(json.dumps({**index, "boundary_ratio": value}))


def _refused(folder: Path, tmp_path: Path, capsys, monkeypatch) -> str:
    def no_weights(*_: object) -> None:
        raise AssertionError("weights were read before the folder was checked")

    monkeypatch.setattr(loading, "load_checkpoint", no_weights)
    out = tmp_path / "out"
    argv = _args("--checkpoint", folder, "--prompt-embeddings", tmp_path / "none.safetensors",
                 "--steps", 1, "--device", "cpu", "--out", out)
    assert sample.main(argv) == 2
    assert not out.exists()
    err = capsys.readouterr().err.strip()
    assert "\n" not in err
    return err


@pytest.mark.parametrize("missing", ["transformer", "transformer_2"])
def test_a_folder_missing_an_expert_is_refused(wan22, tmp_path, capsys, monkeypatch, missing):
    folder = _copy_without(wan22, tmp_path / "partial", missing)
    err = _refused(folder, tmp_path, capsys, monkeypatch)
    assert f"has no {missing} expert: missing {folder / missing / 'config.json'}" in err


def test_experts_of_different_shapes_are_refused(wan22, tmp_path, capsys, monkeypatch):
    folder = _copy_without(wan22, tmp_path / "mixed", "transformer_2")
    tiny_transformer(num_layers=3).save_pretrained(str(folder / "transformer_2"))
    err = _refused(folder, tmp_path, capsys, monkeypatch)
    assert "the experts differ in shape (transformer vs transformer_2: num_layers 2 vs 3)" in err


@pytest.mark.parametrize("boundary", [0, 1, 1.5, -0.2, "0.8", True])
def test_a_boundary_outside_0_1_is_refused(wan22, tmp_path, capsys, monkeypatch, boundary):
    folder = _copy_without(wan22, tmp_path / "bad", "")
    _set_boundary(folder, boundary)
    err = _refused(folder, tmp_path, capsys, monkeypatch)
    assert f"boundary_ratio must be in (0, 1) (the sigma where transformer_2 takes over), " \
           f"got {boundary!r}" in err


def test_an_expert_without_a_boundary_is_refused(wan22, tmp_path, capsys, monkeypatch):
    folder = _copy_without(wan22, tmp_path / "unbounded", "")
    _set_boundary(folder, None)
    err = _refused(folder, tmp_path, capsys, monkeypatch)
    assert "has a transformer_2 expert but" in err and "sets no boundary_ratio" in err


def test_guidance_2_needs_guidance_and_a_pair(wan22, tmp_path, capsys):
    common = _args("--prompt-embeddings", tmp_path / "none.safetensors", "--device", "cpu",
                   "--out", tmp_path / "o", "--guidance-2", 3)
    assert sample.main(["--checkpoint", str(wan22), *common]) == 2
    assert "beside --guidance W (the high-noise one's): add --guidance" in capsys.readouterr().err
    one = _copy_without(wan22, tmp_path / "one", "transformer_2")
    index = json.loads((one / "model_index.json").read_text())
    del index["transformer_2"], index["boundary_ratio"]  # a Wan2.1 folder's index
    (one / "model_index.json").write_text(json.dumps(index))
    assert sample.main(["--checkpoint", str(one), *common, "--guidance", "4"]) == 2
    assert f"{one} is one model: drop it" in capsys.readouterr().err
