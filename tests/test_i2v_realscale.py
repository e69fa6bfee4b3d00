"""Image-to-video at real scale on tiny Wan I2V Diffusers folders made in code (no downloads).

Both layouts: Wan2.1-I2V (CLIP image tokens) and Wan2.2-I2V style (no image encoder).
prompts + images -> encode_prompts --images (checked against WanImageToVideoPipeline's own
prepare_latents, encode_image and encode_prompt) -> the teacher imported -> stage 1 ->
sample --image -> export; WanImageToVideoPipeline on the export reproduces our latents.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

pytest.importorskip("transformers")

from builders import finish_random_adapter, refused  # noqa: E402
from diffusers import (  # noqa: E402
    FlowMatchEulerDiscreteScheduler,
    WanImageToVideoPipeline,
    WanTransformer3DModel,
)
from PIL import Image  # noqa: E402
from realscale_fixtures import IMAGE_PROMPTS as PROMPTS  # noqa: E402
from realscale_fixtures import (  # noqa: E402
    IMAGES,
    LATENT_SHAPE,
    VIDEO,
    build_wan_folder,
    build_wan_i2v_folder,
    write_image_inputs,
)

from gpd_model import make_noise  # noqa: E402
from gpd_train.__main__ import main as train_main  # noqa: E402
from gpd_train.config.chains import StageId  # noqa: E402
from gpd_train.config.load import load_run_config  # noqa: E402
from gpd_train.data import encode_prompts  # noqa: E402
from gpd_train.data.embeddings import PromptEmbeddingSet  # noqa: E402
from gpd_train.infer import sample  # noqa: E402
from gpd_train.infer.export import cli as export  # noqa: E402
from gpd_train.infer.export.diffusers import student_scheduler_config  # noqa: E402
from gpd_train.train.builders import TrainingRun  # noqa: E402

VIDEO_ARGS = ["--height", VIDEO["height"], "--width", VIDEO["width"], "--frames", VIDEO["frames"]]
VARIANTS = {"wan21": True, "wan22": False}  # image encoder (CLIP tokens) or not
STUDENT_STEPS = 6
# Our sampler vs the pipeline, fp32: measured <= 4.8e-7 max abs difference on these folders.
PIPELINE_ATOL = 1e-4


def _args(*values: object) -> list[str]:
    return [str(v) for v in values]


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def wan_i2v(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param) / "Wan-I2V-tiny-Diffusers"
    return build_wan_i2v_folder(root, image_encoder=VARIANTS[request.param])


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """(prompts file, images file) with images of odd sizes."""
    return write_image_inputs(tmp_path_factory.mktemp("inputs"))


def _encode(model, inputs, out, *extra: object) -> list[str]:
    prompts, images = inputs
    return _args("--model", model, "--prompts", prompts, "--images", images, "--out", out,
                 "--dtype", "fp32", "--device", "cpu", "--shard-size", 2, *VIDEO_ARGS, *extra)


def test_encoding_matches_the_pipeline(wan_i2v, inputs, tmp_path):
    out = tmp_path / "data"
    assert encode_prompts.main(_encode(wan_i2v, inputs, out)) == 0
    pipe = WanImageToVideoPipeline.from_pretrained(str(wan_i2v))
    shards = [load_file(str(p)) for p in sorted(out.glob("shard-*.safetensors"))]
    got = {name: torch.cat([s[name] for s in shards]) for name in shards[0]}
    tokens = pipe.transformer.config.image_dim is not None
    assert sorted(got) == ["context", "image_latent", *(["image_tokens"] if tokens else [])]
    cpu = torch.device("cpu")
    text = pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=False,
                              max_sequence_length=512, device=cpu)[0]
    torch.testing.assert_close(got["context"], text, atol=1e-5, rtol=1e-5)
    for row, name in enumerate(IMAGES):
        image = Image.open(inputs[1].parent / name)
        rgb = image.convert("RGB")  # the pipeline's VAE takes 3 channels
        pixels = pipe.video_processor.preprocess(rgb, height=VIDEO["height"],
                                                 width=VIDEO["width"]).float()
        _, condition = pipe.prepare_latents(pixels, 1, LATENT_SHAPE[0], VIDEO["height"],
                                            VIDEO["width"], VIDEO["frames"], torch.float32, cpu)
        assert got["image_latent"][row].shape == condition[0].shape == (8, *LATENT_SHAPE[1:])
        torch.testing.assert_close(got["image_latent"][row], condition[0], atol=1e-6, rtol=0)
        if tokens:
            torch.testing.assert_close(got["image_tokens"][row],
                                       pipe.encode_image(image, cpu)[0], atol=1e-6, rtol=0)
    # The data set yields them in its Conditioning, row by row.
    data = PromptEmbeddingSet(out, text_dim=32, latent_channels=LATENT_SHAPE[0])
    assert data.task == "i2v" and data.num_rows == len(PROMPTS)
    cond, names = data.eval_prompts(4)
    assert names == ["row 0", "row 1", "row 2", "row 0"]
    assert torch.equal(cond.image_latent[3], got["image_latent"][0])
    assert (cond.image_tokens is not None) == tokens
    drawn, _ = data.draw(torch.Generator().manual_seed(0), 2, with_latents=False)
    assert drawn.image_latent.shape == (2, 8, *LATENT_SHAPE[1:])
    with safe_open(str(out / "shard-00000.safetensors"), framework="pt") as handle:
        listed = json.loads(handle.metadata()["images"])
    assert listed == [str(inputs[1].parent / name) for name in list(IMAGES)[:2]]

    # Resumable: the same prompts and images are not re-encoded; other images are refused.
    assert encode_prompts.main(_encode(wan_i2v, inputs, out)) == 0
    swapped = inputs[1].parent / "swapped.txt"
    swapped.write_text("b.jpg\na.png\nc.png\n")
    assert encode_prompts.main(_encode(wan_i2v, (inputs[0], swapped), out)) == 2


def _pipeline_latents(pipe: WanImageToVideoPipeline, image: Image.Image, texts: list[str],
                      steps: int, guidance: float, seed: int) -> torch.Tensor:
    """The pipeline's latents from our sampler's noise (gpd_model.make_noise at ``seed``);
    the image as RGB (the pipeline's VAE takes 3 channels; ours converts)."""
    noise = make_noise((len(texts), *LATENT_SHAPE), seed, torch.device("cpu"))
    return pipe(image=image.convert("RGB"), prompt=texts, num_inference_steps=steps,
                guidance_scale=guidance, num_frames=VIDEO["frames"], height=VIDEO["height"],
                width=VIDEO["width"], output_type="latent", latents=noise).frames


@pytest.mark.slow
def test_import_stage1_export_runs_in_the_pipeline(wan_i2v, inputs, tmp_path):
    """Issue 32's acceptance: stage-0 import, stage 1 on image shards, export; the pipeline on
    the export equals our sampler's latents from the same noise."""
    data = tmp_path / "data"
    assert encode_prompts.main(_encode(wan_i2v, inputs, data)) == 0
    run = tmp_path / "run"
    toml = tmp_path / "run.toml"
    toml.write_text("steps = [12, 6]\nbatch_size = 2\ncheckpoint_every = 100\n"
                    "[distill]\niterations = [3]\nfreq_weight = [1.0]\nlane_groups = 1\n"
                    "[eval]\nprompts = 2\nbatch_size = 2\nexamples = 1\n")
    common = _args("--config", toml, "--run-dir", run, "--device", "cpu", "--teacher", wan_i2v,
                   "--data", data, "--threads", 1)
    assert train_main(["--stage", "0", *common]) == 0
    assert json.loads((run / "config.json").read_text())["task"] == "i2v"
    assert train_main(["--stage", "1", *common]) == 0
    assert (run / "stage1" / "done.json").is_file()
    assert train_main(["--eval", *common]) == 0  # latents: no first-frame PSNR, no crash

    image = inputs[1].parent / "a.png"
    out = tmp_path / "videos"
    assert sample.main(_args("--checkpoint", run, "--model", wan_i2v, "--prompt", PROMPTS[0],
                             "--prompt", PROMPTS[1], "--image", image, "--vae", wan_i2v,
                             "--seed", 7, "--out", out, "--device", "cpu", *VIDEO_ARGS)) == 0
    latents = load_file(str(out / "latents.safetensors"))["latents"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["nfe_per_video"] == STUDENT_STEPS and len(summary["videos"]) == 2

    student = tmp_path / "student"
    assert export.main(_args("--run", run, "--base", wan_i2v, "--out", student)) == 0
    linked = {p.name for p in student.iterdir() if p.is_symlink()}
    clip = {"image_encoder", "image_processor"} if (wan_i2v / "image_encoder").exists() else set()
    assert linked == {"text_encoder", "tokenizer", "vae", *clip}
    exported = WanImageToVideoPipeline.from_pretrained(str(student))
    assert isinstance(exported.scheduler, FlowMatchEulerDiscreteScheduler)
    theirs = _pipeline_latents(exported, Image.open(image), PROMPTS[:2], STUDENT_STEPS, 1.0, 7)
    torch.testing.assert_close(theirs, latents, atol=PIPELINE_ATOL, rtol=0)


@pytest.mark.slow
def test_sampling_a_folder_equals_the_pipeline(wan_i2v, inputs, tmp_path):
    """``sample --images`` on the Wan I2V folder itself, with CFG, against the pipeline (its
    scheduler given our Euler grid)."""
    steps, shift, guidance = 4, 3.0, 2.5
    listed = inputs[1].parent / "two.txt"
    listed.write_text("b.jpg\nb.jpg\n")
    out = tmp_path / "videos"
    assert sample.main(_args("--checkpoint", wan_i2v, "--model", wan_i2v, "--prompt", PROMPTS[0],
                             "--prompt", PROMPTS[2], "--images", listed, "--steps", steps,
                             "--shift", shift, "--guidance", guidance, "--seed", 5, "--out",
                             out, "--device", "cpu", *VIDEO_ARGS)) == 0
    ours = load_file(str(out / "latents.safetensors"))["latents"]
    pipe = WanImageToVideoPipeline.from_pretrained(str(wan_i2v))
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(**student_scheduler_config(steps, shift))
    theirs = _pipeline_latents(pipe, Image.open(inputs[1].parent / "b.jpg"),
                               [PROMPTS[0], PROMPTS[2]], steps, guidance, 5)
    torch.testing.assert_close(theirs, ours, atol=PIPELINE_ATOL, rtol=0)


def test_bad_inputs_are_refused_before_work(wan_i2v, inputs, tmp_path, capsys):
    prompts, images = inputs
    out = tmp_path / "d"
    # An image-to-video folder with text-only data, to encode and to train.
    refused(capsys, _args("--model", wan_i2v, "--prompts", prompts, "--out", out, *VIDEO_ARGS),
            "is an image-to-video model", "--images FILE", command=encode_prompts.main)
    refused(capsys, _args("--stage", 0, "--teacher", wan_i2v, "--prompts", prompts,
                          "--run-dir", tmp_path / "run", "--device", "cpu"),
            "is an image-to-video model: --prompts alone is text-only data",
            "python -m gpd_train.encode_prompts", command=train_main)
    assert not (tmp_path / "run").exists()
    # A video size the VAE x patch stride does not divide (the pipeline would round it).
    refused(capsys, _encode(wan_i2v, inputs, out, "--height", 40),
            "video size 5 frames x 40 x 48 does not fit the VAE", "height a multiple of 16",
            "e.g. 5 x 32 x 48",
            command=encode_prompts.main)
    # Missing and unreadable images; a list that is not one image per prompt.
    listed = tmp_path / "list.txt"
    listed.write_text(f"{images.parent / 'a.png'}\nmissing.png\n{images.parent / 'b.jpg'}\n")
    refused(capsys, _encode(wan_i2v, (prompts, listed), out),
            f"image file {tmp_path / 'missing.png'} does not exist", command=encode_prompts.main)
    (tmp_path / "bad.png").write_text("not an image")
    listed.write_text(f"{images.parent / 'a.png'}\nbad.png\n{images.parent / 'b.jpg'}\n")
    refused(capsys, _encode(wan_i2v, (prompts, listed), out),
            f"cannot read image file {tmp_path / 'bad.png'} as an image",
            command=encode_prompts.main)
    listed.write_text(f"{images.parent / 'a.png'}\n")
    refused(capsys, _encode(wan_i2v, (prompts, listed), out), "has 1 lines, expected 3",
            command=encode_prompts.main)
    assert not out.exists()

    # The sampler, before any model is loaded: the same checks through the same code.
    videos = tmp_path / "videos"
    common = _args("--checkpoint", wan_i2v, "--model", wan_i2v, "--prompt", "a cat",
                   "--device", "cpu", "--out", videos)
    refused(capsys, _args(*common, *VIDEO_ARGS), "is an image-to-video model",
            "--image PATH / --images FILE", command=sample.main)
    refused(capsys, _args(*common, "--image", tmp_path / "missing.png", *VIDEO_ARGS),
            f"image file {tmp_path / 'missing.png'} does not exist", command=sample.main)
    refused(capsys, _args(*common, "--image", tmp_path / "bad.png", *VIDEO_ARGS),
            "cannot read image file", command=sample.main)
    refused(capsys, _args(*common, "--image", images.parent / "a.png", "--width", 56),
            "x 480 x 56 does not fit the VAE", "width of 16", command=sample.main)
    refused(capsys, _args(*common, "--image", images.parent / "a.png", "--images", images),
            "give --image PATH (one image for every prompt) or --images FILE", command=sample.main)
    refused(capsys, _args("--checkpoint", wan_i2v, "--image", images.parent / "a.png",
                          "--out", videos), "--image conditions text prompts", command=sample.main)
    text_only = tmp_path / "text.safetensors"  # before sampling, once the model is known
    save_file({"context": torch.zeros(1, 512, 32)}, str(text_only),
              metadata={"latent_shape": ",".join(map(str, LATENT_SHAPE))})
    refused(capsys, _args("--checkpoint", wan_i2v, "--prompt-embeddings", text_only, "--out",
                          videos, "--device", "cpu"), "is an image-to-video model and these "
            "prompts carry no image", command=sample.main)
    assert not videos.exists()


@pytest.mark.slow
def test_image_data_and_folders_that_cannot_take_it(tmp_path, inputs, capsys):
    wan21 = build_wan_i2v_folder(tmp_path / "w21", image_encoder=True)
    data = tmp_path / "data"
    assert encode_prompts.main(_encode(wan21, inputs, data)) == 0
    # A Wan2.1-I2V folder without its image encoder.
    partial = tmp_path / "partial"
    partial.mkdir()
    for child in wan21.iterdir():
        if child.name not in ("image_encoder", "image_processor", "model_index.json"):
            (partial / child.name).symlink_to(child)
    index = json.loads((wan21 / "model_index.json").read_text())
    index.update(image_encoder=[None, None], image_processor=[None, None])
    (partial / "model_index.json").write_text(json.dumps(index))
    refused(capsys, _encode(partial, inputs, tmp_path / "d"), "is a Wan2.1-I2V folder",
            f"missing {partial / 'image_encoder' / 'config.json'}", command=encode_prompts.main)
    # A text-to-video teacher with image data, and with images to encode.
    wan = build_wan_folder(tmp_path / "t2v")
    refused(capsys, _args("--stage", 0, "--teacher", wan, "--data", data, "--run-dir",
                          tmp_path / "run", "--device", "cpu"),
            "image conditions (image_latent) for an image-to-video model", "the model is t2v",
            command=train_main)
    refused(capsys, _encode(wan, inputs, tmp_path / "d"), "is a text-to-video model",
            command=encode_prompts.main)
    refused(capsys, _args("--checkpoint", wan, "--model", wan, "--prompt", "a cat", "--image",
                          inputs[1].parent / "a.png", "--out", tmp_path / "v", *VIDEO_ARGS),
            "is a text-to-video model", "drop the images", command=sample.main)
    refused(capsys, _args("--checkpoint", wan, "--prompt-embeddings", data, "--out",
                          tmp_path / "v"), "holds image conditions", command=sample.main)
    # A Wan2.1-I2V student exported onto its teacher folder lacking the image encoder (data
    # encoded elsewhere): its pipeline could not make the image tokens.
    assert train_main(_args("--stage", 0, "--teacher", partial, "--data", data, "--run-dir",
                            tmp_path / "run", "--device", "cpu")) == 0
    refused(capsys, _args("--run", tmp_path / "run", "--base", partial, "--out", tmp_path / "x",
                          "--stage", 0), "the student takes CLIP image tokens (image_dim 24",
            f"--base {partial} has no image_encoder", command=export.main)
    (partial / "model_index.json").write_text(json.dumps({**index, "_class_name": "WanPipeline"}))
    refused(capsys, _args("--run", tmp_path / "run", "--base", partial, "--out", tmp_path / "x",
                          "--stage", 0), "is a WanPipeline folder, the student is i2v",
            command=export.main)


@pytest.mark.slow
def test_a_lora_stage_exports_as_diffusers_lora_and_comfyui(wan_i2v, inputs, tmp_path):
    """An I2V LoRA stage (random adapter, so it changes the model): the diffusers LoRA on the
    base's WanImageToVideoPipeline equals our sampler; --format comfyui --merged loads
    through diffusers' single-file converter (image embedder and keys/values included)."""
    data = tmp_path / "data"
    assert encode_prompts.main(_encode(wan_i2v, inputs, data)) == 0
    run_dir = tmp_path / "run"
    toml = tmp_path / "run.toml"
    toml.write_text("steps = [12, 6]\ncheckpoint_every = 100\n[distill]\niterations = [3]\n"
                    "lora_rank = 3\nlora_alpha = 6.0\n")
    assert train_main(_args("--stage", 0, "--config", toml, "--run-dir", run_dir, "--device",
                            "cpu", "--teacher", wan_i2v, "--data", data)) == 0
    run = TrainingRun(load_run_config(run_dir, device="cpu"))
    finish_random_adapter(run, "gpd", 1, seed=8)

    image = inputs[1].parent / "c.png"
    out = tmp_path / "videos"
    assert sample.main(_args("--checkpoint", run_dir, "--model", wan_i2v, "--prompt", PROMPTS[1],
                             "--image", image, "--seed", 4, "--out", out, "--device", "cpu",
                             *VIDEO_ARGS)) == 0
    ours = load_file(str(out / "latents.safetensors"))["latents"]
    lora = tmp_path / "lora"
    assert export.main(_args("--run", run_dir, "--out", lora)) == 0
    pipe = WanImageToVideoPipeline.from_pretrained(str(wan_i2v))
    plain = _pipeline_latents(pipe, Image.open(image), PROMPTS[1:2], STUDENT_STEPS, 1.0, 4)
    pipe.load_lora_weights(str(lora))
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(str(lora),
                                                                     subfolder="scheduler")
    theirs = _pipeline_latents(pipe, Image.open(image), PROMPTS[1:2], STUDENT_STEPS, 1.0, 4)
    torch.testing.assert_close(theirs, ours, atol=PIPELINE_ATOL, rtol=0)
    assert (plain - ours).abs().max() > 1e-2  # the LoRA and the grid matter

    comfy = tmp_path / "comfy"
    assert export.main(_args("--run", run_dir, "--format", "comfyui", "--merged", "--out",
                             comfy)) == 0
    student = run.load_stage_model(StageId("gpd", 1)).eval()
    transformer = WanTransformer3DModel.from_single_file(
        str(comfy / "comfy.safetensors"), config=str(wan_i2v / "transformer"),
        local_files_only=True, torch_dtype=torch.float32).eval()
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, student.cfg.in_channels, *LATENT_SHAPE[1:], generator=generator)
    t = torch.rand(2, generator=generator) * 1000
    # 512 text tokens: diffusers splits image from text tokens by that length.
    text = torch.randn(2, 512, student.cfg.text_dim, generator=generator)
    image_tokens = None if student.cfg.image_dim is None else torch.randn(
        2, 5, student.cfg.image_dim, generator=generator)
    extra = {} if image_tokens is None else {"image_tokens": image_tokens}
    with torch.no_grad():
        got = transformer(hidden_states=x, timestep=t, encoder_hidden_states=text,
                          encoder_hidden_states_image=image_tokens, return_dict=False)[0]
        torch.testing.assert_close(got, student(x, t, text, **extra), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_a_wan22_i2v_expert_pair_samples_trains_and_exports(inputs, tmp_path):
    """Wan2.2-I2V-A14B's layout (two experts, no image encoder): sampling the folder with a
    CFG scale per expert, the import, a stage 1 that trains each expert, and the export all
    equal WanImageToVideoPipeline from the same noise."""
    # 4 steps at shift 3 visit sigmas 1, 0.9, 0.75, 0.5: two steps on each side of 0.85.
    steps, shift, guidance, guidance_2 = 4, 3.0, 2.5, 1.5
    folder = build_wan_i2v_folder(tmp_path / "Wan22-I2V-A14B-tiny", image_encoder=False,
                                  boundary_ratio=0.85)
    image = inputs[1].parent / "a.png"
    out = tmp_path / "teacher-videos"
    assert sample.main(_args("--checkpoint", folder, "--model", folder, "--prompt", PROMPTS[0],
                             "--image", image, "--steps", steps, "--shift", shift, "--guidance",
                             guidance, "--guidance-2", guidance_2, "--seed", 3, "--out", out,
                             "--device", "cpu", *VIDEO_ARGS)) == 0
    ours = load_file(str(out / "latents.safetensors"))["latents"]
    pipe = WanImageToVideoPipeline.from_pretrained(str(folder))
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(**student_scheduler_config(steps, shift))
    noise = make_noise((1, *LATENT_SHAPE), 3, torch.device("cpu"))
    theirs = pipe(image=Image.open(image).convert("RGB"), prompt=PROMPTS[:1],
                  num_inference_steps=steps, guidance_scale=guidance,
                  guidance_scale_2=guidance_2, num_frames=VIDEO["frames"],
                  height=VIDEO["height"], width=VIDEO["width"], output_type="latent",
                  latents=noise).frames
    torch.testing.assert_close(theirs, ours, atol=PIPELINE_ATOL, rtol=0)

    data = tmp_path / "data"
    assert encode_prompts.main(_encode(folder, inputs, data)) == 0
    run = tmp_path / "run"
    toml = tmp_path / "run.toml"
    toml.write_text("steps = [12, 6]\nbatch_size = 2\ncheckpoint_every = 100\n"
                    "[distill]\niterations = [4]\nlane_groups = 1\n")
    common = _args("--config", toml, "--run-dir", run, "--device", "cpu", "--teacher", folder,
                   "--data", data, "--threads", 1)
    assert train_main(["--stage", "0", *common]) == 0
    assert train_main(["--stage", "1", *common]) == 0
    for expert in ("high", "low"):  # each expert trained in its own phase
        assert (run / "stage1" / expert / "metrics.jsonl").read_text().strip()

    out = tmp_path / "student-videos"
    assert sample.main(_args("--checkpoint", run, "--model", folder, "--prompt", PROMPTS[1],
                             "--image", image, "--seed", 9, "--out", out, "--device", "cpu",
                             *VIDEO_ARGS)) == 0
    ours = load_file(str(out / "latents.safetensors"))["latents"]
    student = tmp_path / "student"
    assert export.main(_args("--run", run, "--base", folder, "--out", student)) == 0
    exported = WanImageToVideoPipeline.from_pretrained(str(student))
    assert exported.config.boundary_ratio == 0.85
    theirs = _pipeline_latents(exported, Image.open(image), PROMPTS[1:2], STUDENT_STEPS, 1.0, 9)
    torch.testing.assert_close(theirs, ours, atol=PIPELINE_ATOL, rtol=0)
