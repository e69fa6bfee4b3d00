"""--log tensorboard and --validate-every (gpd_train.monitor): the events TensorBoard's own
reader reads back, validation samples that are the stage output's, training unchanged."""

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gpd_model import euler_sample, make_noise, sigma_grid
from gpd_train.__main__ import main
from gpd_train.builders import TrainingRun
from gpd_train.chains import StageId
from gpd_train.checkpoint import load_weights
from gpd_train.config import load_run_config
from gpd_train.media import write_contact_sheet
from gpd_train.stages import TEACHER

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
    for sid, steps in ((TEACHER, 8), (STAGE1, 4)):
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
        # The last validation is the EMA at the last step: the stage output, sampled as the
        # evaluation samples it (teacher: CFG pairs at its scale; student: one forward).
        cfg = run.config
        data = run.data
        context, _ = data.eval_prompts(cfg.eval.examples)
        noise = make_noise((cfg.eval.examples, *data.latent_shape), seed=cfg.eval.seed)
        model = run.load_stage_model(sid).eval()
        w = cfg.resolved_guidance if sid.is_teacher else None
        negative = data.negative_context.expand(len(noise), -1, -1) if w else None
        expected = euler_sample(model, noise, context, sigma_grid(steps, cfg.resolved_shift),
                                negative, w)
        reference = tmp_path / f"{sid.name.replace('/', '_')}.png"
        label = f"{sid.name} EMA@{steps} step {last}"
        write_contact_sheet(reference, [(label, expected)])
        got = _pixels(folder / "validation" / f"step-{last:08d}.png")
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
