"""Wan2.2-TI2V end to end on a tiny random TI2V Diffusers folder made in code (no downloads):
the folder runs in diffusers' WanPipeline and WanImageToVideoPipeline, imports as a stage-0
teacher (text-to-video), and a distilled student's export runs in diffusers' pipeline with
the latents of our sampler."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")

from diffusers import WanImageToVideoPipeline, WanPipeline  # noqa: E402
from realscale_fixtures import (  # noqa: E402
    TI2V_CHANNELS,
    TI2V_LATENT_SHAPE,
    TI2V_VIDEO,
    build_wan_ti2v_folder,
)

from gpd_model import get_preset  # noqa: E402
from gpd_train.__main__ import main as train_main  # noqa: E402
from gpd_train.run.files import read_metadata  # noqa: E402

PROMPTS = ["a red cat runs in the park", "the blue dog jumps over water"]
VIDEO_ARGS = [str(a) for k, v in TI2V_VIDEO.items() for a in (f"--{k}", v)]
SIZE = {"num_frames": TI2V_VIDEO["frames"], "height": TI2V_VIDEO["height"],
        "width": TI2V_VIDEO["width"]}  # as diffusers' pipelines name them


def _args(*values: object) -> list[str]:
    return [str(v) for v in values]


@pytest.fixture(scope="module")
def ti2v_dir(tmp_path_factory):
    return build_wan_ti2v_folder(tmp_path_factory.mktemp("ti2v") / "Wan2.2-TI2V-tiny-Diffusers")


@pytest.fixture
def prompts_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    return path


@pytest.mark.slow
def test_the_folder_runs_in_both_diffusers_pipelines(ti2v_dir):
    index = json.loads((ti2v_dir / "model_index.json").read_text())
    assert index["_class_name"] == "WanPipeline" and index["expand_timesteps"] is True
    vae = json.loads((ti2v_dir / "vae" / "config.json").read_text())
    assert (vae["z_dim"], vae["scale_factor_spatial"], vae["patch_size"], vae["is_residual"]) \
        == (TI2V_CHANNELS, 16, 2, True)
    call = dict(prompt=PROMPTS[0], num_inference_steps=2, output_type="latent", **SIZE)
    t2v = WanPipeline.from_pretrained(str(ti2v_dir))
    assert t2v.config.expand_timesteps
    assert t2v(**call).frames.shape == (1, *TI2V_LATENT_SHAPE)
    i2v = WanImageToVideoPipeline.from_pretrained(str(ti2v_dir))
    assert i2v.config.expand_timesteps
    image = torch.rand(3, TI2V_VIDEO["height"], TI2V_VIDEO["width"])
    assert i2v(image=image, **call).frames.shape == (1, *TI2V_LATENT_SHAPE)


@pytest.mark.slow
def test_imports_as_a_stage0_teacher(ti2v_dir, prompts_file, tmp_path):
    run = tmp_path / "run"
    assert train_main(["--stage", "0", *_args("--run-dir", run, "--device", "cpu", "--teacher",
                                              ti2v_dir, "--prompts", prompts_file, "--threads",
                                              1), *VIDEO_ARGS]) == 0
    meta = read_metadata(run / "stage0" / "model.safetensors")
    assert json.loads(meta["dit_config"]) == {
        **json.loads(get_preset("tiny").to_json()), "dim": 32, "ffn_dim": 64, "num_heads": 2,
        "num_layers": 2, "patch_size": [1, 2, 2], "in_channels": TI2V_CHANNELS,
        "out_channels": TI2V_CHANNELS, "expand_timesteps": True}
    shard = next((run / "prompt-embeddings").glob("shard-*.safetensors"))
    from safetensors import safe_open

    with safe_open(str(shard), framework="pt") as handle:
        assert handle.metadata()["latent_shape"] == ",".join(map(str, TI2V_LATENT_SHAPE))
