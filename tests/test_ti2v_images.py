"""Wan2.2-TI2V image-to-video from image files (issue 33, item 3): ``encode_prompts --images``
and ``sample --image/--images`` on a tiny random TI2V folder build ``first_frames`` as
diffusers' WanImageToVideoPipeline does with ``expand_timesteps`` (the image alone through the
Wan2.2 VAE, normalised); the sampler's latents equal the pipeline's from the same noise; a
TI2V run trains image-to-video on such a data set."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("transformers")

from builders import refused  # noqa: E402
from diffusers import FlowMatchEulerDiscreteScheduler, WanImageToVideoPipeline  # noqa: E402
from PIL import Image  # noqa: E402
from realscale_fixtures import IMAGE_PROMPTS as PROMPTS  # noqa: E402
from realscale_fixtures import (  # noqa: E402
    IMAGES,
    TI2V_LATENT_SHAPE,
    TI2V_VIDEO,
    build_wan_ti2v_folder,
    write_image_inputs,
)

from gpd_model import make_noise  # noqa: E402
from gpd_model.checkpoint import config_from_diffusers  # noqa: E402
from gpd_train.__main__ import main as train_main  # noqa: E402
from gpd_train.data import encode_prompts  # noqa: E402
from gpd_train.data.datasets import open_data  # noqa: E402
from gpd_train.data.embeddings import PromptEmbeddingSet  # noqa: E402
from gpd_train.errors import ConfigError  # noqa: E402
from gpd_train.infer import sample  # noqa: E402
from gpd_train.infer.export.diffusers import student_scheduler_config  # noqa: E402

VIDEO_ARGS = [a for k, v in TI2V_VIDEO.items() for a in (f"--{k}", str(v))]
SIZE = {"num_frames": TI2V_VIDEO["frames"], "height": TI2V_VIDEO["height"],
        "width": TI2V_VIDEO["width"]}  # as diffusers' pipelines name them
FIRST_FRAMES = (TI2V_LATENT_SHAPE[0], 1, *TI2V_LATENT_SHAPE[2:])
PIPELINE_ATOL = 1e-4  # the bound, float32


def _args(*values: object) -> list[str]:
    return [str(v) for v in values]


@pytest.fixture(scope="module")
def ti2v_dir(tmp_path_factory):
    return build_wan_ti2v_folder(tmp_path_factory.mktemp("ti2v") / "Wan2.2-TI2V-tiny-Diffusers")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """(prompts file, images file) with images of odd sizes."""
    return write_image_inputs(tmp_path_factory.mktemp("inputs"))


@pytest.fixture(scope="module")
def encoded(ti2v_dir, inputs, tmp_path_factory):
    """The prompts and their images encoded for the TI2V folder (fp32 shards)."""
    prompts, images = inputs
    out = tmp_path_factory.mktemp("encoded") / "data"
    assert encode_prompts.main(_args(
        "--model", ti2v_dir, "--prompts", prompts, "--images", images, "--out", out,
        "--dtype", "fp32", "--device", "cpu", "--shard-size", 2, *VIDEO_ARGS)) == 0
    return out


def _pipeline_condition(pipe: WanImageToVideoPipeline, image: Image.Image) -> torch.Tensor:
    """The pipeline's own condition latent of ``image`` [C, 1, h, w] (prepare_latents)."""
    pixels = pipe.video_processor.preprocess(image.convert("RGB"), height=SIZE["height"],
                                             width=SIZE["width"]).float()
    _, condition, _ = pipe.prepare_latents(
        pixels, 1, TI2V_LATENT_SHAPE[0], SIZE["height"], SIZE["width"], SIZE["num_frames"],
        torch.float32, torch.device("cpu"))
    return condition[0]


def test_stored_first_frames_are_the_pipelines_condition(ti2v_dir, inputs, encoded):
    pipe = WanImageToVideoPipeline.from_pretrained(str(ti2v_dir))
    shards = [load_file(str(p)) for p in sorted(encoded.glob("shard-*.safetensors"))]
    got = {name: torch.cat([s[name] for s in shards]) for name in shards[0]}
    assert sorted(got) == ["context", "first_frames"]  # no mask, no image_latent
    for row, name in enumerate(IMAGES):
        condition = _pipeline_condition(pipe, Image.open(inputs[1].parent / name))
        assert got["first_frames"][row].shape == condition.shape == FIRST_FRAMES
        torch.testing.assert_close(got["first_frames"][row], condition, atol=1e-6, rtol=0)
    # The data set yields them in its Conditioning; a TI2V model takes them for i2v only.
    data = PromptEmbeddingSet(encoded, text_dim=32, latent_channels=TI2V_LATENT_SHAPE[0])
    assert data.task == "i2v"
    cond, _ = data.eval_prompts(4)
    assert set(cond.tensors()) == {"text", "first_frames"}
    assert torch.equal(cond.first_frames[3], got["first_frames"][0])
    cfg = config_from_diffusers(ti2v_dir / "transformer")
    assert open_data(encoded, cfg, 0, "i2v").task == "i2v"
    with pytest.raises(ConfigError, match=r"holds image conditions \(first_frames\) for a "
                                          r"Wan2.2-TI2V model; the run's task is t2v"):
        open_data(encoded, cfg, 0, "t2v")


@pytest.mark.slow
@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_sampling_with_an_image_equals_the_pipeline(ti2v_dir, inputs, tmp_path, guidance):
    """``sample --image`` on the TI2V folder against WanImageToVideoPipeline (its scheduler on
    our Euler grid) from the same noise; with CFG the condition is in both branches."""
    steps, shift, seed = 4, 3.0, 5
    image = inputs[1].parent / "b.jpg"
    out = tmp_path / "videos"
    cfg_args = [] if guidance == 1.0 else ["--guidance", guidance]
    assert sample.main(_args("--checkpoint", ti2v_dir, "--model", ti2v_dir, "--prompt",
                             PROMPTS[0], "--prompt", PROMPTS[2], "--image", image, "--steps",
                             steps, "--shift", shift, *cfg_args, "--seed", seed, "--out", out,
                             "--device", "cpu", *VIDEO_ARGS)) == 0
    ours = load_file(str(out / "latents.safetensors"))["latents"]
    pipe = WanImageToVideoPipeline.from_pretrained(str(ti2v_dir))
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(**student_scheduler_config(steps, shift))
    noise = make_noise((2, *TI2V_LATENT_SHAPE), seed, torch.device("cpu"))
    theirs = pipe(image=Image.open(image).convert("RGB"), prompt=[PROMPTS[0], PROMPTS[2]],
                  num_inference_steps=steps, guidance_scale=guidance, output_type="latent",
                  latents=noise, **SIZE).frames
    assert ours.shape == theirs.shape == (2, *TI2V_LATENT_SHAPE)
    torch.testing.assert_close(ours, theirs, atol=PIPELINE_ATOL, rtol=0)
    condition = _pipeline_condition(pipe, Image.open(image))
    torch.testing.assert_close(ours[:, :, :1], condition.expand(2, *FIRST_FRAMES), atol=1e-6,
                               rtol=0)


@pytest.mark.slow
def test_a_ti2v_run_trains_image_to_video_on_encoded_images(ti2v_dir, inputs, encoded,
                                                            tmp_path):
    image = inputs[1].parent / "c.png"
    run = tmp_path / "run"
    toml = tmp_path / "run.toml"
    toml.write_text("steps = [8, 4]\nbatch_size = 2\ncheckpoint_every = 100\n"
                    "[distill]\niterations = [3]\nfreq_weight = [1.0]\nlane_groups = 1\n")
    common = _args("--config", toml, "--run-dir", run, "--device", "cpu", "--teacher", ti2v_dir,
                   "--data", encoded, "--task", "i2v", "--threads", 1)
    assert train_main(["--stage", "0", *common]) == 0
    assert json.loads((run / "config.json").read_text())["task"] == "i2v"
    assert train_main(["--stage", "1", *common]) == 0
    assert (run / "stage1" / "done.json").is_file()
    assert train_main(["--eval", *common]) == 0  # latents: no first-frame PSNR, no crash
    # The student samples from an image; its first latent frame is the image's condition.
    out = tmp_path / "videos"
    assert sample.main(_args("--checkpoint", run, "--model", ti2v_dir, "--prompt", PROMPTS[0],
                             "--image", image, "--seed", 3, "--out", out, "--device", "cpu",
                             *VIDEO_ARGS)) == 0
    latents = load_file(str(out / "latents.safetensors"))["latents"]
    condition = _pipeline_condition(WanImageToVideoPipeline.from_pretrained(str(ti2v_dir)),
                                    Image.open(image))
    assert latents.shape == (1, *TI2V_LATENT_SHAPE)
    torch.testing.assert_close(latents[0, :, :1], condition, atol=1e-6, rtol=0)


def test_text_only_prompts_are_refused_for_ti2v_image_to_video_before_work(
        ti2v_dir, inputs, tmp_path, capsys):
    run = tmp_path / "run"
    refused(capsys, _args("--stage", 0, "--teacher", ti2v_dir, "--prompts", inputs[0],
                          "--task", "i2v", "--run-dir", run, "--device", "cpu", *VIDEO_ARGS),
            "is a Wan2.2-TI2V model trained here with --task i2v: --prompts alone is text-only "
            "data", "--images FILE --out DIR", command=train_main)
    assert not run.exists()
