"""--log tensorboard and --validate-every (gpd_train.train.monitor): the events TensorBoard's own
reader reads back, validation samples that are the stage output's, training unchanged."""

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from builders import MICRO_TOML
from PIL import Image

from gpd_model import CFG, DiTDenoiser, euler_sample, make_noise, sigma_grid
from gpd_train.__main__ import main
from gpd_train.config.chains import StageId
from gpd_train.config.load import load_run_config
from gpd_train.infer.media import write_contact_sheet
from gpd_train.run.files import load_weights
from gpd_train.run.folder import TEACHER
from gpd_train.train.builders import TrainingRun

event_accumulator = pytest.importorskip(
    "tensorboard.backend.event_processing.event_accumulator",
    reason="the [tensorboard] extra is not installed (pip install -e '.[tensorboard]')")

STAGE1 = StageId("gpd", 1)


def _train(micro: list[str], run_dir: Path, *extra: str) -> TrainingRun:
    args = [*micro, "--run-dir", str(run_dir), "--threads", "1"]
    assert main([*args, "--stage", "0", "--teacher-iterations", "6", *extra]) == 0
    assert main([*args, "--stage", "1", "--iterations", "4", "--freq-weight", "1", *extra]) == 0
    return TrainingRun(load_run_config(run_dir, device="cpu"))


def _events(folder: Path) -> event_accumulator.EventAccumulator:
    events = event_accumulator.EventAccumulator(str(folder / "tensorboard"),
                                                size_guidance={"images": 0, "scalars": 0})
    return events.Reload()


def _pixels(data: bytes | Path) -> np.ndarray:
    with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as image:
        return np.asarray(image.convert("RGB"), dtype=np.int16)


def test_events_read_back_as_the_metrics_log_and_the_stage_outputs_samples(micro, tmp_path):
    run = _train(micro, tmp_path / "logged", "--log", "tensorboard", "--validate-every", "2")
    for sid in (TEACHER, STAGE1):
        folder = run.stage_folder(sid)
        events = _events(folder)
        records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        for key in ("loss", "lr", "grad_norm"):
            logged = events.Scalars(f"train/{key}")
            assert [e.step for e in logged] == [r["step"] for r in records]
            np.testing.assert_allclose([e.value for e in logged], [r[key] for r in records],
                                       rtol=1e-6)  # TensorBoard keeps float32
        speed = [e.value for e in events.Scalars("train/iterations_per_s")]
        np.testing.assert_allclose(speed, [1 / r["seconds"] for r in records], rtol=1e-6)
        if sid == STAGE1:  # the loss is mse + 1 x freq
            share = [e.value for e in events.Scalars("train/freq_share")]
            np.testing.assert_allclose(share, [r["freq"] / r["loss"] for r in records],
                                       rtol=1e-4)
        else:
            assert "train/freq_share" not in events.Tags()["scalars"]
        videos = events.Images("validation/video")
        sheets = events.Images("validation/contact_sheet")
        last = records[-1]["step"]
        assert [e.step for e in videos] == [e.step for e in sheets] == list(range(2, last + 1, 2))
        for event in sheets:  # the PNG beside it, byte for byte
            saved = folder / "validation" / f"step-{event.step:08d}.png"
            assert event.encoded_image_string == saved.read_bytes()
        with Image.open(io.BytesIO(videos[-1].encoded_image_string)) as gif:
            assert (gif.format, gif.n_frames) == ("GIF", 4)  # the micro videos' frames


@pytest.mark.parametrize(("sid", "flags"), [
    (TEACHER, ["--teacher-iterations", "4"]),
    (STAGE1, ["--iterations", "4"]),
    (StageId("guided", "g"), ["--chain", "guided"]),  # w as the student's input
    (STAGE1, ["--iterations", "4", "--lora-rank", "2"]),  # the EMA of the adapter alone
], ids=["teacher", "gpd", "guidance-stage", "lora"])
def test_last_validation_is_the_stage_output_as_the_evaluation_samples_it(micro, tmp_path,
                                                                          sid, flags):
    """The validation at the last step (4) uses the EMA then: the stage output. Sampled as
    the evaluation does (its verified output, a guidance input folded at the run's w, a LoRA
    adapter merged), it gives the same contact sheet."""
    toml = tmp_path / "guided.toml"
    toml.write_text(MICRO_TOML + "[guided]\nguidance_iterations = 4\n")
    args = [*micro, "--config", str(toml), "--threads", "1"]
    if not sid.is_teacher:
        assert main([*args, "--stage", "0"]) == 0
    assert main([*args, "--stage", str(sid.stage), *flags, "--validate-every", "2"]) == 0
    run = TrainingRun(load_run_config(tmp_path / "run", device="cpu"))
    cfg, data, last = run.config, run.data, 4
    cond, _ = data.eval_prompts(cfg.eval.examples)
    noise = make_noise((cfg.eval.examples, *data.latent_shape), seed=cfg.eval.seed)
    denoiser = DiTDenoiser(run.load_stage_model(sid, fold_at=cfg.resolved_guidance).eval())
    if sid.is_teacher:
        denoiser = CFG(denoiser, data.negative, cfg.resolved_guidance)
    steps = run.steps(sid)
    expected = euler_sample(denoiser, noise, cond, sigma_grid(steps, cfg.resolved_shift))
    reference = tmp_path / "expected.png"
    write_contact_sheet(reference, [(f"{sid.name} EMA@{steps} step {last}", expected)])
    got = _pixels(run.stage_folder(sid) / "validation" / f"step-{last:08d}.png")
    assert np.abs(got - _pixels(reference)).max() <= 1  # a rounding step at most


def test_logging_and_validation_leave_the_trained_weights_bit_identical(micro, tmp_path):
    plain = _train(micro, tmp_path / "plain")
    watched = _train(micro, tmp_path / "watched", "--log", "tensorboard",
                     "--validate-every", "1")
    for sid, iterations in ((TEACHER, 6), (STAGE1, 4)):
        a = load_weights(plain.stage_folder(sid) / "model.safetensors")
        b = load_weights(watched.stage_folder(sid) / "model.safetensors")
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), (sid, key)
        assert not (plain.stage_folder(sid) / "tensorboard").exists()
        sheets = sorted((watched.stage_folder(sid) / "validation").glob("*.png"))
        assert [p.name for p in sheets] == [f"step-{k:08d}.png" for k in range(1, iterations + 1)]


@pytest.mark.parametrize(("flags", "message"), [
    (["--log", "wandb"], "log must be one of none, tensorboard, got 'wandb'"),
    (["--validate-every", "-1"], "validate_every"),
])
def test_bad_values_are_refused_before_work(micro, tmp_path, capsys, flags, message):
    assert main([*micro, "--stage", "0", *flags]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_eval_refuses_training_only_flags(micro, capsys):
    assert main([*micro, "--eval", "--validate-every", "5"]) == 2
    assert "--validate-every set(s) training" in capsys.readouterr().err
