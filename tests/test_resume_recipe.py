"""Resuming continues the same stage or says why not: identical training writes identical
files (provenance by SHA-256 never reports a false change), a kept stage verifies first, a
changed recipe is refused naming the option and both values, done.json is checked when
read, a corrupt trainer state falls back, and lost metrics are named."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from builders import configured_run, hashes, killed_stage0, run_until_killed, suggested_args

from gpd_train.__main__ import main
from gpd_train.config.chains import StageId
from gpd_train.config.load import load_config
from gpd_train.infer import sample
from gpd_train.run.checkpoint_store import MANIFEST, STATE_FILE
from gpd_train.run.files import CheckpointError, sha256_file
from gpd_train.run.records import RunFolderError, read_record
from gpd_train.train.builders import TrainingRun, build_distill, build_stage0

ROOT = Path(__file__).resolve().parents[1]
TWO_STAGE_TOML = """\
steps = [8, 4]
batch_size = 1
checkpoint_every = 1
[stage0]
iterations = 2
[distill]
iterations = [1]
freq_weight = [0.0]
lane_groups = 1
[vanilla]
iterations = [1]
freq_weight = [0.0]
"""


@pytest.mark.slow
def test_identical_training_in_two_processes_writes_identical_files(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text(TWO_STAGE_TOML)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    runs = [tmp_path / "a", tmp_path / "b"]
    for run_dir in runs:  # separate processes: safetensors' metadata order varied by process
        subprocess.run([sys.executable, "-m", "gpd_train", "--stage", "0", "--config", str(toml),
                        "--run-dir", str(run_dir), "--device", "cpu", "--threads", "1"],
                       check=True, env=env, cwd=tmp_path, capture_output=True)
    # Every weight, trainer state and manifest; done.json and metrics.jsonl hold durations.
    written = [{k: v for k, v in hashes(run_dir / "stage0").items()
                if k not in ("done.json", "metrics.jsonl")} for run_dir in runs]
    assert written[0] == written[1]
    assert {"model.safetensors", "ckpt/step-00000002/state.pt",
            "ckpt/step-00000002/model.safetensors", "ckpt/step-00000002/manifest.json"
            } <= set(written[0])
    records = [read_record(run_dir / "stage0") for run_dir in runs]
    assert records[0]["sha256"] == records[1]["sha256"]
    # A student of the first run's stage 0 is current under the second run's stage 0.
    subprocess.run([sys.executable, "-m", "gpd_train", "--stage", "1", "--config", str(toml),
                    "--run-dir", str(runs[0]), "--device", "cpu", "--threads", "1"],
                   check=True, env=env, cwd=tmp_path, capture_output=True)
    shutil.rmtree(runs[0] / "stage0")
    shutil.copytree(runs[1] / "stage0", runs[0] / "stage0")
    run = TrainingRun(load_config(toml, {"run_dir": str(runs[0]), "device": "cpu"}))
    assert run.stale_reason(StageId("gpd", 1)) is None
    run.load_stage_model(StageId("gpd", 1))  # the stage teacher and the student both verify


DISTILL_TOML = """\
steps = [8, 4]
batch_size = 2
checkpoint_every = 2
[stage0]
iterations = 2
[distill]
iterations = [4]
freq_weight = [0.0]
[vanilla]
iterations = [2]
freq_weight = [0.0]
"""


@pytest.fixture
def partial_stage1(micro, tmp_path, monkeypatch):  # noqa: F811
    """CLI arguments of a run whose stage 0 is complete and stage 1 stopped at step 2."""
    (tmp_path / "micro.toml").write_text(DISTILL_TOML)
    assert main(["--stage", "0", *micro]) == 0
    run = TrainingRun(load_config(micro[1], {"run_dir": str(tmp_path / "run"), "device": "cpu"}))
    with monkeypatch.context() as patch:
        run_until_killed(build_distill(run, StageId("gpd", 1)), patch, at_step=3)
    return micro


@pytest.mark.parametrize("args,option,saved,changed", [
    (["--iterations", "8"], "distill.iterations[0]", "4", "8"),
    (["--lr", "0.001"], "distill.lr", "0.0003", "0.001"),
    (["--state-source", "data"], "distill.state_source", "'teacher'", "'data'"),
    (["--shift", "4"], "shift", "3.0", "4.0"),
    (["--guidance", "2"], "distill.stage_guidance[0]", "1.5", "2.0"),
    (["--stage-guidance", "1"], "distill.stage_guidance[0]", "1.5", "1.0"),
    (["--seed", "5"], "seed", "0", "5"),
    (["--freq-weight", "0.5"], "distill.freq_weight[0]", "0.0", "0.5"),
    (["--batch-size", "3"], "global_batch_size", "2", "3"),
])
def test_resume_with_a_changed_option_is_refused_naming_both_values(
        partial_stage1, tmp_path, capsys, args, option, saved, changed):
    before = hashes(tmp_path / "run")
    capsys.readouterr()
    assert main(["--stage", "1", "--resume", *partial_stage1, *args]) == 2
    err = capsys.readouterr().err
    assert f"{option} = {saved} in the checkpoint, {changed} in this run" in err
    assert "Resume with the checkpoint's values" in err and "--restart" in err
    assert err.count("\n") == 1  # one line, no traceback
    assert hashes(tmp_path / "run") == before


def test_resume_with_the_same_options_finishes_the_stage(partial_stage1, tmp_path, capsys):
    assert main(["--stage", "1", "--resume", *partial_stage1]) == 0
    assert "resumed from step 2" in capsys.readouterr().out
    assert read_record(tmp_path / "run" / "stage1")["iterations"] == 4


def test_checkpoint_without_a_recipe_resumes_as_before(partial_stage1, tmp_path, capsys):
    for manifest in (tmp_path / "run" / "stage1" / "ckpt").glob(f"step-*/{MANIFEST}"):
        record = json.loads(manifest.read_text())
        del record["recipe"]  # as written before recipes were recorded
        manifest.write_text(json.dumps(record))
    assert main(["--stage", "1", "--resume", *partial_stage1, "--lr", "0.001"]) == 0
    assert "resumed from step 2" in capsys.readouterr().out


def test_resume_of_a_complete_stage_with_a_truncated_output_is_refused(micro, tmp_path,  # noqa: F811
                                                                       capsys):
    assert main(["--stage", "0", *micro]) == 0
    assert main(["--stage", "1", *micro]) == 0
    output = tmp_path / "run" / "stage1" / "model.safetensors"
    output.write_bytes(output.read_bytes()[:-100])
    before = hashes(tmp_path / "run")
    capsys.readouterr()
    assert main(["--stage", "1", "--resume", *micro]) == 2
    captured = capsys.readouterr()
    assert "already complete" not in captured.out
    assert f"stage1 is recorded complete, but stage output {output} is corrupt" in captured.err
    assert "python -m gpd_train --stage 1 --run-dir" in captured.err
    assert "--restart` moves" in captured.err
    assert hashes(tmp_path / "run") == before


@pytest.mark.parametrize("args,changed", [
    (["--iterations", "5"], "iterations 3 in {done}, 5 in this run"),
    (["--shift", "4"], "shift 3.0 in {done}, 4.0 in this run"),
    (["--stage-guidance", "1"], "guidance 1.5 in {done}, 1.0 in this run"),
])
def test_resume_of_a_complete_stage_refuses_a_changed_option(micro, tmp_path, capsys,  # noqa: F811
                                                             args, changed):
    assert main(["--stage", "0", *micro]) == 0
    assert main(["--stage", "1", *micro]) == 0
    before = hashes(tmp_path / "run")
    capsys.readouterr()
    assert main(["--stage", "1", "--resume", *micro]) == 0  # the same options: kept
    assert "already complete" in capsys.readouterr().out
    assert main(["--stage", "1", "--resume", *micro, *args]) == 2
    err = capsys.readouterr().err
    done = tmp_path / "run" / "stage1" / "done.json"
    assert "stage1 is complete but was trained with other options than this run: " in err
    assert changed.format(done=done) in err and err.count("\n") == 1
    assert hashes(tmp_path / "run") == before
    assert main([*suggested_args(err), *micro, *args]) == 0  # the remedy, with the change
    assert list((tmp_path / "run").glob("stage1.old-*"))


@pytest.mark.parametrize("field,value,message", [
    ("options.steps", 3, "options.steps must divide options.teacher_steps (8: a student step "
                         "is a whole number of its teacher's steps), got 3"),
    ("options.shift", "9", "options.shift must be a positive finite number, got '9'"),
    ("options.shift", -1, "options.shift must be a positive finite number, got -1"),
    ("options.guidance", [3, 1], "options.guidance must be a CFG scale > 0 or [low, high]"),
    ("options.guidance", "x", "options.guidance must be a CFG scale > 0 or [low, high]"),
    ("steps", 0, "steps must be a positive int, got 0"),
    ("steps", True, "steps must be a positive int, got True"),
    ("sha256", 12, "sha256 must be a SHA-256 (64 lowercase hex digits), got 12"),
    ("options", [], "options must be a JSON object, got []"),
])
def test_hand_edited_done_json_is_refused_naming_file_and_field(micro, tmp_path, capsys,  # noqa: F811
                                                                field, value, message):
    assert main(["--stage", "0", *micro]) == 0
    assert main(["--stage", "1", *micro]) == 0
    done = tmp_path / "run" / "stage1" / "done.json"
    record = json.loads(done.read_text())
    section, _, key = field.rpartition(".")
    (record[section] if section else record)[key] = value
    done.write_text(json.dumps(record))
    capsys.readouterr()
    out = tmp_path / "out"
    assert sample.main(["--checkpoint", str(done.parent), "--device", "cpu",
                        "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"corrupt stage record {done}: {message}" in err and "--restart" in err
    assert not out.exists()
    with pytest.raises(RunFolderError, match="corrupt stage record"):
        read_record(done.parent)


def test_done_json_options_edited_by_hand_are_refused(micro, tmp_path, capsys):  # noqa: F811
    assert main(["--stage", "0", *micro]) == 0
    assert main(["--stage", "1", *micro]) == 0
    done = tmp_path / "run" / "stage1" / "done.json"
    record = json.loads(done.read_text())
    record["options"]["shift"] = 9.0  # a valid value, not the one the stage was trained at
    done.write_text(json.dumps(record))
    capsys.readouterr()
    assert sample.main(["--checkpoint", str(done.parent), "--device", "cpu",
                        "--out", str(tmp_path / "out")]) == 2
    assert (f"stage record {done} was edited: options shift 9.0 (the output says 3.0)"
            in capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


def _forge_state(checkpoint: Path) -> None:
    """Garbage in state.pt, with a manifest that lists it (its files all verify)."""
    (checkpoint / STATE_FILE).write_bytes(b"PK\x03\x04 not a torch file" * 50)
    manifest = json.loads((checkpoint / MANIFEST).read_text())
    manifest["files"][STATE_FILE] = {"bytes": (checkpoint / STATE_FILE).stat().st_size,
                                     "sha256": sha256_file(checkpoint / STATE_FILE)}
    (checkpoint / MANIFEST).write_text(json.dumps(manifest))


def test_corrupt_trainer_state_falls_back_to_the_previous_checkpoint(tmp_path, monkeypatch,
                                                                     capsys):
    reference = build_stage0(configured_run(tmp_path / "a"))
    reference.iterations = 9
    reference.run(resume=False)
    run = configured_run(tmp_path / "b")
    trainer = killed_stage0(run, monkeypatch)  # checkpoints at steps 3 and 6
    ckpt = trainer.checkpoints.folder
    _forge_state(ckpt / "step-00000006")
    forged = hashlib.sha256((ckpt / "step-00000006" / STATE_FILE).read_bytes()).hexdigest()
    capsys.readouterr()
    resumed = build_stage0(run)
    resumed.iterations = 9
    resumed.run(resume=True)
    out = capsys.readouterr().out
    (warning,) = [line for line in out.splitlines() if "warning" in line]
    assert f"corrupt trainer state {ckpt / 'step-00000006' / STATE_FILE}" in warning
    assert "kept as corrupt-step-00000006" in warning
    assert "resuming from step-00000003, the newest checkpoint that verifies" in warning
    assert [r["loss"] for r in resumed.metrics.records()] == [
        r["loss"] for r in reference.metrics.records()]
    assert sha256_file(ckpt / "corrupt-step-00000006" / STATE_FILE) == forged  # kept


def test_no_readable_trainer_state_is_a_clear_error(tmp_path, monkeypatch):
    run = configured_run(tmp_path)
    trainer = killed_stage0(run, monkeypatch)
    for step in ("step-00000003", "step-00000006"):
        _forge_state(trainer.checkpoints.folder / step)
    with pytest.raises(CheckpointError) as caught:
        build_stage0(run).run(resume=True)
    lines = str(caught.value).splitlines()
    assert lines[0] == f"no checkpoint in {trainer.checkpoints.folder} verifies:"
    assert ["step-00000006" in lines[1], "step-00000003" in lines[2]] == [True, True]
    assert all("corrupt trainer state" in line for line in lines[1:3])
    assert "--restart" in lines[3] and len(lines) == 4


def test_deleted_metrics_are_named_as_lost_and_the_run_continues(tmp_path, monkeypatch, capsys):
    run = configured_run(tmp_path)
    trainer = killed_stage0(run, monkeypatch)  # resumes from step 6
    trainer.metrics.path.unlink()
    capsys.readouterr()
    resumed = build_stage0(run)
    resumed.iterations = 9
    resumed.run(resume=True)
    out = capsys.readouterr().out
    assert (f"warning: {trainer.metrics.path} is missing, but the checkpoint is at step 6: "
            "the metrics of steps 1-6 are lost") in out
    assert [r["step"] for r in resumed.metrics.records()] == [7, 8, 9]
