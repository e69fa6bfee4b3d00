"""Real scale end to end on a tiny Wan2.1-T2V-Diffusers folder made in code (no downloads).

prompts file -> umT5 encoding (checked against diffusers' WanPipeline.encode_prompt) ->
teacher imported from the folder -> stage 1 -> sampling with on-the-fly prompts -> VAE
decode (checked against WanPipeline's own decode) -> MP4 read back -> export -> WanPipeline
on the exported folder reproduces our sampler's latents.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("transformers")
pytest.importorskip("av")

from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline  # noqa: E402
from realscale_fixtures import LATENT_SHAPE, VIDEO, build_wan_folder  # noqa: E402

from gpd_model import sigma_grid  # noqa: E402
from gpd_train.__main__ import main as train_main  # noqa: E402
from gpd_train.data import encode_prompts
from gpd_train.data.embeddings import PromptEmbeddingSet  # noqa: E402
from gpd_train.infer import sample  # noqa: E402
from gpd_train.infer.export import cli as export  # noqa: E402
from gpd_train.infer.export.diffusers import student_scheduler_config  # noqa: E402
from gpd_train.infer.media import decode_latents, read_mp4, to_uint8_frames, write_mp4  # noqa: E402

PROMPTS = ["a red cat runs in the park", "the  blue dog &amp; a bird jumps", "green bird flies",
           "a dog runs quickly over water", "the cat jumps slowly"]
STUDENT_STEPS = 6
# Our WanDiT and sampler vs WanPipeline (its WanTransformer3DModel, its text encoding, its
# scheduler with the exported grid): measured 4.8e-7 max abs difference here, float32
# rounding; the tolerance leaves 20x headroom.
PIPELINE_ATOL = 1e-5
VIDEO_ARGS = ["--height", VIDEO["height"], "--width", VIDEO["width"], "--frames", VIDEO["frames"]]


def _args(*values: object) -> list[str]:
    return [str(v) for v in values]


@pytest.fixture(scope="module")
def wan_dir(tmp_path_factory):
    return build_wan_folder(tmp_path_factory.mktemp("wan") / "Wan2.1-T2V-tiny-Diffusers")


@pytest.fixture(scope="module")
def pipe(wan_dir):
    return WanPipeline.from_pretrained(str(wan_dir))


@pytest.fixture
def prompts_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    return path


def test_encoding_matches_wanpipeline_and_resumes(wan_dir, pipe, prompts_file, tmp_path):
    out = tmp_path / "data"
    argv = _args("--model", wan_dir, "--prompts", prompts_file, "--out", out, "--shard-size", 2,
                 "--batch-size", 3, "--dtype", "fp32", "--negative", "wan", "--device", "cpu",
                 *VIDEO_ARGS)
    assert encode_prompts.main(argv) == 0
    want, want_negative = pipe.encode_prompt(
        PROMPTS, negative_prompt=[encode_prompts.WAN_NEGATIVE_PROMPT] * len(PROMPTS),
        do_classifier_free_guidance=True, max_sequence_length=512, device=torch.device("cpu"))
    shards = sorted(out.glob("shard-*.safetensors"))
    assert [s.name for s in shards] == [f"shard-0000{k}.safetensors" for k in range(3)]
    got = torch.cat([load_file(str(s))["context"] for s in shards])
    assert got.shape == (len(PROMPTS), 512, 32) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    negative = load_file(str(out / "negative.safetensors"))["context"]
    torch.testing.assert_close(negative, want_negative[:1], atol=1e-5, rtol=1e-5)
    assert (got[1, 12:] == 0).all() and (got[1, :5].abs().sum(-1) > 0).all()  # padding zeroed
    data = PromptEmbeddingSet(out, text_dim=32, latent_channels=LATENT_SHAPE[0])
    assert data.num_rows == len(PROMPTS) and data.latent_shape == LATENT_SHAPE

    # Resumable: finished shards are kept as they are, a missing one is written again.
    kept = shards[0].stat().st_mtime_ns
    shards[1].unlink()
    assert encode_prompts.main(argv) == 0
    assert shards[0].stat().st_mtime_ns == kept
    torch.testing.assert_close(load_file(str(shards[1]))["context"], want[2:4], atol=1e-5,
                               rtol=1e-5)
    # A shard of other prompts is never overwritten.
    prompts_file.write_text("a cat\na dog\n")
    assert encode_prompts.main(argv) == 2

    # Default storage: bf16, the empty negative prompt (WanPipeline's default).
    assert encode_prompts.main(_args("--model", wan_dir, "--prompts", prompts_file, "--out",
                                     tmp_path / "bf16", "--device", "cpu", *VIDEO_ARGS)) == 0
    stored = load_file(str(tmp_path / "bf16" / "shard-00000.safetensors"))["context"]
    assert stored.dtype == torch.bfloat16
    empty = pipe.encode_prompt([""], do_classifier_free_guidance=False, max_sequence_length=512,
                               device=torch.device("cpu"))[0]
    torch.testing.assert_close(load_file(str(tmp_path / "bf16" / "negative.safetensors"))
                               ["context"].float(), empty, atol=2e-2, rtol=1e-2)


@pytest.mark.parametrize("steps,shift", [(6, 5.0), (6, 3.0), (12, 5.0), (48, 5.0), (2, 8.0),
                                         (1, 5.0), (4, 1.0)])
def test_exported_scheduler_grid_is_ours(steps, shift):
    scheduler = FlowMatchEulerDiscreteScheduler(**student_scheduler_config(steps, shift))
    scheduler.set_timesteps(steps)
    ours = sigma_grid(steps, shift)
    assert (scheduler.sigmas.double() - ours).abs().max() < 1e-6
    assert (scheduler.timesteps.double() / 1000 - ours[:-1]).abs().max() < 1e-6
    if steps == 6 and shift == 5.0:  # why the config is derived: the plain shift differs
        plain = FlowMatchEulerDiscreteScheduler(shift=shift)
        plain.set_timesteps(steps)
        assert (plain.sigmas.double() - ours).abs().max() > 0.1


def test_folder_to_mp4_to_wanpipeline(wan_dir, pipe, prompts_file, tmp_path):
    run = tmp_path / "run"
    toml = tmp_path / "run.toml"
    toml.write_text("steps = [12, 6]\nbatch_size = 2\ncheckpoint_every = 100\n"
                    "[distill]\niterations = [3]\nfreq_weight = [1.0]\nlane_groups = 1\n"
                    "[vanilla]\niterations = [3]\nfreq_weight = [0.0]\n")
    common = _args("--config", toml, "--run-dir", run, "--device", "cpu", "--teacher", wan_dir,
                   "--prompts", prompts_file, *VIDEO_ARGS)
    assert train_main(["--stage", "0", *common]) == 0
    assert len(list((run / "prompt-embeddings").glob("shard-*.safetensors"))) == 1
    config = json.loads((run / "config.json").read_text())
    assert config["data"] == "prompt-embeddings" and config["shift"] == 5.0
    assert train_main(["--stage", "1", *common]) == 0
    assert (run / "stage1" / "done.json").is_file()

    out = tmp_path / "videos"
    texts = ["a red cat runs", "the dog jumps over water"]
    assert sample.main(_args("--checkpoint", run, "--model", wan_dir, "--prompt", texts[0],
                             "--prompt", texts[1], "--steps", STUDENT_STEPS, "--vae", wan_dir,
                             "--seed", 7, "--out", out, "--device", "cpu", *VIDEO_ARGS)) == 0
    latents = load_file(str(out / "latents.safetensors"))["latents"]
    assert latents.shape == (2, *LATENT_SHAPE)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["nfe_per_video"] == STUDENT_STEPS and len(summary["videos"]) == 2
    frames, fps, codec = read_mp4(out / summary["videos"][0])
    assert frames.shape == (VIDEO["frames"], VIDEO["height"], VIDEO["width"], 3)
    assert fps == 16 and codec == "h264"

    student = tmp_path / "student"
    assert export.main(_args("--run", run, "--base", wan_dir, "--out", student)) == 0
    assert (student / "vae").is_symlink() and (student / "transformer" / "config.json").is_file()
    exported = WanPipeline.from_pretrained(str(student))
    assert isinstance(exported.scheduler, FlowMatchEulerDiscreteScheduler)
    call = dict(prompt=texts, num_inference_steps=STUDENT_STEPS, guidance_scale=1.0,
                num_frames=VIDEO["frames"], height=VIDEO["height"], width=VIDEO["width"])
    theirs = exported(**call, generator=torch.Generator().manual_seed(7),
                      output_type="latent").frames
    torch.testing.assert_close(theirs, latents, atol=PIPELINE_ATOL, rtol=0)
    # Decoding: WanPipeline de-normalises and decodes its (equal) latents on its own.
    pixels = exported(**call, generator=torch.Generator().manual_seed(7), output_type="pt").frames
    decoded = decode_latents(exported.vae, latents[:1])[0]  # [3, F, H, W] in [-1, 1]
    torch.testing.assert_close((decoded.permute(1, 0, 2, 3) + 1) / 2, pixels[0], atol=1e-5,
                               rtol=0)
    # The MP4 holds those frames through lossy H.264 (~7 of 255 levels on this noisy video).
    mp4 = torch.from_numpy(frames).float() / 255
    assert (mp4 - torch.from_numpy(to_uint8_frames(decoded)).float() / 255).abs().mean() < 0.05


def test_bad_inputs_name_the_path(wan_dir, prompts_file, tmp_path, capsys):
    partial = tmp_path / "partial"
    partial.mkdir()
    for name in ("tokenizer", "transformer", "vae", "scheduler", "model_index.json"):
        (partial / name).symlink_to(wan_dir / name)
    argv = _args("--model", partial, "--prompts", prompts_file, "--out", tmp_path / "d",
                 "--device", "cpu", *VIDEO_ARGS)
    assert encode_prompts.main(argv) == 2
    err = capsys.readouterr().err
    assert f"missing {partial / 'text_encoder' / 'config.json'}" in err
    assert "Wan2.1-T2V-Diffusers folder" in err

    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    assert encode_prompts.main(_args("--model", wan_dir, "--prompts", empty, "--out",
                                     tmp_path / "d", *VIDEO_ARGS)) == 2
    assert f"prompts file {empty} is empty" in capsys.readouterr().err
    gappy = tmp_path / "gappy.txt"
    gappy.write_text("a cat\n\na dog\n   \nthe bird\n")
    assert encode_prompts.main(_args("--model", wan_dir, "--prompts", gappy, "--out",
                                     tmp_path / "d", *VIDEO_ARGS)) == 2
    assert f"prompts file {gappy} has blank lines (2, 4)" in capsys.readouterr().err
    common = _args("--checkpoint", wan_dir, "--model", wan_dir, "--steps", 1, "--device", "cpu",
                   "--out", tmp_path / "o", *VIDEO_ARGS)
    assert sample.main([*common, "--prompts", str(gappy)]) == 2
    assert f"prompts file {gappy} has blank lines" in capsys.readouterr().err

    vae3 = tmp_path / "vae3"
    AutoencoderKLWan(base_dim=8, z_dim=3, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                     latents_mean=[0.0] * 3, latents_std=[1.0] * 3).save_pretrained(str(vae3))
    assert sample.main([*common, "--prompt", "a cat", "--vae", str(vae3)]) == 2
    err = capsys.readouterr().err
    assert f"the VAE at {vae3} has 3 latent channels (z_dim), the model makes 4" in err
    assert sample.main([*common[:2], *common[4:], "--prompt", "a cat"]) == 2
    assert "pass --model DIR" in capsys.readouterr().err

    (partial / "vae").unlink()
    (partial / "text_encoder").symlink_to(wan_dir / "text_encoder")
    assert export.main(_args("--run", tmp_path / "norun", "--base", partial, "--out",
                             tmp_path / "s")) == 2
    assert f"missing {partial / 'vae' / 'config.json'}" in capsys.readouterr().err


def test_mp4_round_trip_keeps_frames(tmp_path):
    video = torch.linspace(-1, 1, 3 * 9 * 16 * 24).reshape(3, 9, 16, 24)
    frames, fps, codec = read_mp4(write_mp4(tmp_path / "v.mp4", video, fps=16))
    assert frames.shape == (9, 16, 24, 3) and fps == 16 and codec == "h264"
    assert np.abs(frames.astype(float) - to_uint8_frames(video)).mean() < 6
    with pytest.raises(ValueError, match="even frame sizes"):
        write_mp4(tmp_path / "odd.mp4", torch.zeros(3, 2, 15, 24))
