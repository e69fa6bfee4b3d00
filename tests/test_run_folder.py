"""The run folder as a record: nothing destroyed unasked, provenance and staleness, integrity
on load, every option validated up front. Each case checks the message and that no file was
lost (the SHA-256 of every file before and after)."""

import dataclasses
import hashlib
import json
import os
from collections import Counter
from pathlib import Path

import pytest
import torch
from builders import (
    MICRO_TOML,
    configured_run,
    hashes,
    killed_stage0,
    micro_data,
    micro_dit,
    suggested_args,
    tiny_run,
)

from gpd_kernels import double_step_target
from gpd_kernels.reference import double_step_target_reference
from gpd_model import get_preset
from gpd_train.__main__ import main
from gpd_train.config.chains import StageId
from gpd_train.config.load import load_config
from gpd_train.infer import sample
from gpd_train.run.files import CheckpointError
from gpd_train.run.folder import MissingStageError, RunFolder
from gpd_train.run.records import RunFolderError, RunLock, StaleStageError
from gpd_train.train.builders import TrainingRun, build_distill, build_stage0
from gpd_train.train.pipeline import run_pipeline, run_stage


def assert_nothing_lost(before: dict[str, str], folder: Path) -> None:
    """Every file's content is still in the folder (possibly moved aside); config.json is
    the last invocation's configuration, rewritten by design."""
    kept = {k: v for k, v in before.items() if k != "config.json"}
    missing = Counter(kept.values()) - Counter(hashes(folder).values())
    assert not missing, f"lost: {[k for k, v in kept.items() if v in missing]}"


# -- 1. nothing destroyed without being asked ----------------------------------------------
@pytest.mark.parametrize("state", ["checkpoints", "complete"])
def test_stage_run_without_resume_refuses_and_names_both_choices(micro, tmp_path, capsys,
                                                                  state):
    run_dir = tmp_path / "run"
    if state == "complete":
        assert main(["--stage", "0", *micro]) == 0
    else:
        killed_stage0(configured_run(tmp_path), pytest.MonkeyPatch(), at=5)
    before = hashes(run_dir)
    capsys.readouterr()
    assert main(["--stage", "0", *micro]) == 2
    err = capsys.readouterr().err
    assert "--restart" in err and "python -m gpd_train --stage 0" in err
    assert ("--resume" in err) == (state == "checkpoints")
    assert ("step-00000003" in err) == (state == "checkpoints")
    assert hashes(run_dir) == before


def test_trainer_itself_never_deletes_checkpoints(tmp_path, monkeypatch):
    run = configured_run(tmp_path)
    killed_stage0(run, monkeypatch, at=5)
    before = hashes(run.folder)
    with pytest.raises(CheckpointError, match=r"already holds checkpoints.*--resume.*--restart"):
        build_stage0(run).run(resume=False)
    assert hashes(run.folder) == before


def test_restart_moves_the_old_stage_aside(micro, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(["--stage", "0", *micro]) == 0
    before = hashes(run_dir)
    assert main(["--stage", "0", "--restart", "--seed", "1", *micro]) == 0
    assert "moved the old stage to" in capsys.readouterr().out
    (old,) = run_dir.glob("stage0.old-*")
    assert hashes(old) == {k.removeprefix("stage0/"): v for k, v in before.items()
                           if k.startswith("stage0/")}
    assert (run_dir / "stage0" / "done.json").is_file()
    assert_nothing_lost(before, run_dir)


def test_restart_and_resume_exclude_each_other(micro, capsys):
    with pytest.raises(SystemExit):
        main(["--stage", "0", "--resume", "--restart", *micro])
    assert "not allowed with argument" in capsys.readouterr().err


@pytest.mark.parametrize("damage,resumed_from", [("missing latest", "step-00000006"),
                                                 ("latest to nowhere", "step-00000006"),
                                                 ("newest corrupt", "step-00000003")])
def test_resume_falls_back_to_the_newest_checkpoint_that_verifies(tmp_path, monkeypatch, capsys,
                                                                  damage, resumed_from):
    reference = build_stage0(configured_run(tmp_path / "a"))
    reference.iterations = 9
    reference.run(resume=False)
    run = configured_run(tmp_path / "b")
    trainer = killed_stage0(run, monkeypatch)
    ckpt = trainer.checkpoints.folder
    if damage == "missing latest":
        (ckpt / "latest").unlink()
    elif damage == "latest to nowhere":
        (ckpt / "latest").write_text("step-99999999")
    else:
        weights = ckpt / "step-00000006" / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:-3] + b"\x00\x00\x00")
    before = hashes(run.folder)
    resumed = build_stage0(run)
    resumed.iterations = 9
    resumed.run(resume=True)
    out = capsys.readouterr().out
    assert f"resuming from {resumed_from}, the newest checkpoint that verifies" in out
    assert f"resumed from step {int(resumed_from[-8:])}" in out
    assert [r["loss"] for r in resumed.metrics.records()] == [
        r["loss"] for r in reference.metrics.records()]
    kept = {p.name for p in ckpt.iterdir()}
    assert {"step-00000006", "step-00000009"} <= kept  # the usual rolling two
    if damage == "newest corrupt":
        assert "corrupt-step-00000006" in kept and "kept as corrupt-step-00000006" in out
        bad = ckpt / "corrupt-step-00000006" / "model.safetensors"
        assert hashlib.sha256(bad.read_bytes()).hexdigest() == before[
            "stage0/ckpt/step-00000006/model.safetensors"]


def test_no_checkpoint_verifies_is_refused_with_every_reason(tmp_path, monkeypatch):
    run = configured_run(tmp_path)
    trainer = killed_stage0(run, monkeypatch)
    for step in ("step-00000003", "step-00000006"):
        (trainer.checkpoints.folder / step / "manifest.json").write_text("{")
    with pytest.raises(CheckpointError, match=r"no checkpoint in .* verifies:\n.*step-00000006"
                                              r".*\n.*step-00000003.*\n.*--restart"):
        build_stage0(run).run(resume=True)


def test_second_trainer_is_refused_with_the_holders_pid(micro, tmp_path, capsys):
    with RunLock(tmp_path / "run"):
        assert main(["--stage", "0", *micro]) == 2
    err = capsys.readouterr().err
    assert f"in use by another gpd_train process (PID {os.getpid()}" in err
    assert not (tmp_path / "run" / "stage0").exists()
    assert main(["--stage", "0", *micro]) == 0  # released


def test_torn_metrics_line_is_cut_off_on_resume(tmp_path, monkeypatch, capsys):
    run = configured_run(tmp_path)
    trainer = killed_stage0(run, monkeypatch)
    with trainer.metrics.path.open("a") as handle:
        handle.write('{"stage": "stage0", "step": 8, "lo')
    resumed = build_stage0(run)
    resumed.run(resume=True)
    assert f"{trainer.metrics.path} ends in a torn line" in capsys.readouterr().out
    steps = [json.loads(line)["step"] for line in trainer.metrics.path.read_text().splitlines()]
    assert steps == list(range(1, 7))


def test_corrupt_metrics_line_inside_the_file_names_file_and_line(tmp_path, monkeypatch):
    run = configured_run(tmp_path)
    trainer = killed_stage0(run, monkeypatch)
    lines = trainer.metrics.path.read_text().splitlines()
    lines[1] = "garbage"
    trainer.metrics.path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"metrics.jsonl line 2 is not JSON"):
        build_stage0(run).run(resume=True)


# -- 2. provenance and staleness -----------------------------------------------------------
def test_done_json_records_hashes_teacher_and_options(micro, tmp_path):
    assert main(["--stage", "0", *micro]) == 0
    assert main(["--stage", "1", *micro]) == 0
    run_dir = tmp_path / "run"
    teacher, student = (json.loads((run_dir / s / "done.json").read_text())
                        for s in ("stage0", "stage1"))
    digest = hashlib.sha256((run_dir / "stage1" / "model.safetensors").read_bytes()).hexdigest()
    assert student["sha256"] == digest
    assert student["teacher"] == "stage0" and student["teacher_sha256"] == teacher["sha256"]
    assert student["options"] == {"shift": 3.0, "steps": 4, "teacher_steps": 8,
                                  "guidance": 1.5, "guidance_input": False,
                                  "state_source": "teacher"}
    assert teacher["options"] == {"shift": 3.0, "steps": 8, "guidance": 1.5}


def test_retrained_teacher_makes_students_stale(micro, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(["--stage", "0", *micro]) == 0
    assert main(["--stage", "1", *micro]) == 0
    assert main(["--stage", "1", "--chain", "vanilla", *micro]) == 0
    assert main(["--stage", "0", "--restart", "--seed", "7", *micro]) == 0
    before = hashes(run_dir)
    capsys.readouterr()
    assert main(["--stage", "1", *micro]) == 2
    err = capsys.readouterr().err
    assert "stage1 is stale: its stage teacher stage0 changed since" in err
    assert "python -m gpd_train --stage 1 --run-dir" in err and "--restart" in err
    assert main(["--stage", "1", "--resume", *micro]) == 2  # --resume does not bypass it
    run = TrainingRun(load_config(micro[1], {"run_dir": str(run_dir), "device": "cpu"}))
    with pytest.raises(StaleStageError, match="stage1 is stale"):
        run.load_stage_model(StageId("gpd", 1))  # the evaluation and the next stage load this way
    assert hashes(run_dir) == before
    # The pipeline says so, moves both stale students aside and retrains them.
    assert run_pipeline(run.config, evaluate=False) is None
    out = capsys.readouterr().out
    assert "[stage1] stale: its stage teacher stage0 changed" in out
    assert "[vanilla/stage1] stale" in out
    assert len(list(run_dir.glob("stage1.old-*"))) == 1
    assert len(list((run_dir / "vanilla").glob("stage1.old-*"))) == 1
    assert run.stale_reason(StageId("gpd", 1)) is None
    assert run.stale_reason(StageId("vanilla", 1)) is None
    assert_nothing_lost(before, run_dir)


def test_resuming_a_stage_under_a_changed_teacher_is_refused(tmp_path):
    run = configured_run(tmp_path, **{"distill.iterations": [6]})
    run_stage(run, StageId("gpd", 0), resume=False)
    trainer = build_distill(run, StageId("gpd", 1))
    trainer.iterations = 3
    trainer.run(resume=False)  # a partial stage 1 at step 3
    run_stage(run, StageId("gpd", 0), resume=False, restart=True)
    run.config = dataclasses.replace(run.config, seed=5)  # another teacher (frozen config)
    run_stage(run, StageId("gpd", 0), resume=False, restart=True)
    before = hashes(run.folder)
    with pytest.raises(CheckpointError, match=r"teacher_sha256=.*--restart"):
        run_stage(run, StageId("gpd", 1), resume=True)
    assert hashes(run.folder) == before


def test_pipeline_moves_a_partial_stage_of_a_changed_teacher_aside(tmp_path, capsys):
    run = configured_run(tmp_path, **{"distill.iterations": [6]})
    run_stage(run, StageId("gpd", 0), resume=False)
    trainer = build_distill(run, StageId("gpd", 1))
    trainer.iterations = 3
    trainer.run(resume=False)  # a partial stage 1 at step 3
    assert run.partial_stale_reason(StageId("gpd", 1)) is None  # its teacher is unchanged
    run.config = dataclasses.replace(run.config, seed=5)  # another teacher (frozen config)
    run_stage(run, StageId("gpd", 0), resume=False, restart=True)
    reason = run.partial_stale_reason(StageId("gpd", 1))
    assert "were written under its stage teacher stage0" in reason
    before = hashes(run.folder)
    capsys.readouterr()
    assert run_pipeline(run.config, evaluate=False) is None
    assert "[stage1] stale: its checkpoints (step-00000003)" in capsys.readouterr().out
    assert len(list(run.folder.glob("stage1.old-*"))) == 1
    assert run.is_done(StageId("gpd", 1)) and run.stale_reason(StageId("gpd", 1)) is None
    assert_nothing_lost(before, run.folder)


def test_config_json_is_written_only_after_validation(micro, tmp_path):
    run_dir = tmp_path / "run"
    assert main(["--stage", "0", *micro]) == 0
    assert main(["--stage", "1", *micro]) == 0
    before = hashes(run_dir)
    assert main(["--stage", "1", "--restart", "--shift", "8", "--guidance", "nan", *micro]) == 2
    assert main(["--stage", "1", "--shift", "8", *micro]) == 2
    assert hashes(run_dir) == before  # config.json included; nothing moved aside


def test_evaluation_uses_only_current_stages_on_their_grid(micro, tmp_path, capsys):
    assert main(["--stage", "0", *micro]) == 0
    assert main(["--stage", "1", *micro]) == 0
    assert main(["--stage", "1", "--chain", "vanilla", *micro]) == 0
    capsys.readouterr()
    assert main(["--eval", "--shift", "8", *micro]) == 2
    assert ("stage1 was distilled with shift 3.0" in capsys.readouterr().err)
    assert main(["--stage", "1", "--restart", *micro]) == 0
    assert main(["--eval", *micro]) == 0  # on the recorded grid; moved-aside stages left out
    report = json.loads((tmp_path / "run" / "eval" / "report.json").read_text())
    assert sorted(report["stages"]) == ["stage0", "stage1", "vanilla/stage1"]


def test_sampler_reads_the_stage_own_shift_and_steps(micro, tmp_path):
    run_dir = tmp_path / "run"
    assert main(["--stage", "0", *micro]) == 0
    assert main(["--stage", "1", *micro]) == 0
    config = json.loads((run_dir / "config.json").read_text())
    (run_dir / "config.json").write_text(json.dumps({**config, "shift": 8.0}))  # a later run's
    for checkpoint in (run_dir, run_dir / "stage1"):
        out = tmp_path / f"out-{checkpoint.name}"
        assert sample.main(["--checkpoint", str(checkpoint), "--num", "2", "--device", "cpu",
                            "--out", str(out)]) == 0
        summary = json.loads((out / "summary.json").read_text())
        assert (summary["shift"], summary["steps"]) == (3.0, 4)


# -- 3. integrity on load ------------------------------------------------------------------
def test_flipped_bytes_in_a_stage_output_are_refused_everywhere(micro, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(["--stage", "0", *micro]) == 0
    output = run_dir / "stage0" / "model.safetensors"
    data = bytearray(output.read_bytes())
    data[-64:] = bytes(64)  # weights, not the header: the file still parses
    output.write_bytes(bytes(data))
    before = hashes(run_dir)
    capsys.readouterr()
    assert main(["--stage", "1", *micro]) == 2
    assert f"stage output {output} is corrupt: its SHA-256" in capsys.readouterr().err
    assert sample.main(["--checkpoint", str(run_dir / "stage0"), "--device", "cpu",
                        "--out", str(tmp_path / "out")]) == 2
    assert f"stage output {output} is corrupt" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert hashes(run_dir) == before


def test_corrupt_done_json_is_named(tmp_path):
    run = configured_run(tmp_path)
    run.finish_stage(StageId("gpd", 0), run.new_model().state_dict(), {})
    done = run.stage_folder(StageId("gpd", 0)) / "done.json"
    done.write_text('{"sha256": ')
    with pytest.raises(RunFolderError, match=f"corrupt stage record {done}"):
        run.load_stage_model(StageId("gpd", 0))


# -- 4. every option validated up front ----------------------------------------------------
@pytest.mark.parametrize("args,message", [
    (["--stage", "1", "--shift", "inf"], "shift must be a finite number > 0, got inf"),
    (["--guidance", "nan"], "guidance must be a finite number > 0 (1 = no guidance), got nan"),
    (["--stage", "0", "--guidance", "-1"], "guidance must be > 0 (1 = no guidance), got -1.0"),
    (["--stage", "1", "--freq-weight", "nan"],
     "distill.freq_weight[0] must be a finite number >= 0, got nan"),
    (["--stage", "0", "--teacher-iterations", "-5"], "stage0.iterations must be >= 1, got -5"),
    (["--stage", "0", "--batch-size", "0"], "batch_size must be >= 1, got 0"),
    (["--stage", "0", "--device", "foo"], "device must be auto, cpu, cuda or cuda:N, got 'foo'"),
    (["--stage", "0", "--device", "cuda:7"], "device 'cuda:7' requested, but this machine has"),
    (["--stage", "0", "--teacher", "/nonexistent/wan"],
     "--teacher /nonexistent/wan does not exist"),
    (["--stage", "0", "--data", "/nonexistent/data"], "--data /nonexistent/data does not exist"),
    (["--stage", "0", "--lr", "1e-3"], "--lr not used by stage 0"),
    (["--stage", "1", "--chain", "vanilla", "--state-source", "data"],
     "--state-source set the [distill] table (read by --chain gpd)"),
    (["--restart"], "--restart applies to one stage"),
    (["--compare", "x=runs/x"], "--compare adds rows to the evaluation report"),
])
def test_bad_flags_are_refused_before_anything_is_written(micro, tmp_path, capsys, args,
                                                          message):
    if "cuda:7" in args and torch.cuda.device_count() > 7:
        pytest.skip("this machine has 8 GPUs")
    assert main([*micro, *args]) == 2  # the later flag wins
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("toml,message", [
    ("[stage0]\nwarmup = -5\n", "stage0.warmup must be >= 0, got -5"),
    ("[stage0]\niterations = \"50\"\n", "stage0.iterations must be an int >= 1, got '50'"),
    ("[distill]\niterations = [1.5]\n", "distill.iterations[0] must be an int >= 1, got 1.5"),
    ("[distill]\niterations = \"50\"\n", "distill.iterations must be a list, got '50'"),
    ("[distill]\nlr = nan\n", "distill.lr must be a finite number > 0, got nan"),
    ("[distill]\nema_decay = 1.0\n", "distill.ema_decay must be >= 0 and < 1, got 1.0"),
    ("seed = 1.5\n", "seed must be an int >= 0 and <= 4294967295, got 1.5"),
    ("[eval]\nprompts = 0\n", "eval.prompts must be >= 1, got 0"),
])
def test_bad_toml_values_are_refused_with_their_key(micro, tmp_path, capsys, toml, message):
    (tmp_path / "micro.toml").write_text(toml)  # the file --config reads
    assert main(["--stage", "0", *micro]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("make", ["file", "under a file"])
def test_run_dir_that_cannot_be_a_folder_is_refused(micro, tmp_path, capsys, make):
    blocker = tmp_path / "blocker"
    blocker.write_text("keep me")
    run_dir = blocker if make == "file" else blocker / "run"
    assert main(["--stage", "0", *micro, "--run-dir", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert ("is a file" in err) if make == "file" else ("cannot be written" in err)
    assert blocker.read_text() == "keep me"


def test_teacher_iterations_given_to_a_distillation_stage_warns(micro, capsys):
    assert main(["--stage", "1", "--teacher-iterations", "5", *micro]) == 2  # no stage 0 yet
    err = capsys.readouterr().err
    assert "warning: --teacher-iterations is ignored by stage 1" in err
    assert "python -m gpd_train --stage 0" in err


@pytest.mark.parametrize("args,message", [
    (["--guidance", "nan"], "--guidance must be a finite number > 0, got nan"),
    (["--shift", "inf"], "--shift must be a finite number > 0, got inf"),
    (["--steps", "0"], "--steps must be >= 1, got 0"),
    (["--device", "foo"], "device must be auto, cpu, cuda or cuda:N, got 'foo'"),
])
def test_sampler_options_are_refused_before_sampling(tmp_path, capsys, args, message):
    out = tmp_path / "out"
    assert sample.main(["--checkpoint", str(tmp_path / "nothing"), *args, "--out", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_sampler_out_that_is_a_file_is_refused_before_sampling(tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    out.write_text("keep me")
    monkeypatch.setattr(sample, "load_model", lambda *a, **k: pytest.fail("loaded a model"))
    assert sample.main(["--checkpoint", str(tmp_path), "--out", str(out)]) == 2
    assert f"--out {out} is a file" in capsys.readouterr().err
    assert out.read_text() == "keep me"


@pytest.mark.parametrize("op", [double_step_target, double_step_target_reference])
def test_double_step_with_equal_endpoints_is_an_error_not_nan(op):
    g = torch.randn(2, 3, 1, 2, 2)
    s_a, s_b = torch.tensor([0.9, 0.5]), torch.tensor([0.8, 0.5])
    s_c = torch.tensor([0.7, 0.5])
    with pytest.raises(ValueError, match=r"s_a must differ from s_c .* got s_a = s_c = 0.5 at "
                                         r"sample 1"):
        op(g, g, None, None, s_a, s_b, s_c)


def test_wan_dit_with_an_empty_batch_is_a_clear_error(tmp_path):
    model = configured_run(tmp_path).new_model()
    with pytest.raises(ValueError, match=r"WanDiT: x must hold at least one sample, got shape "
                                         r"\(0, 3, 4, 16, 16\)"):
        model(torch.zeros(0, 3, 4, 16, 16), torch.zeros(0), torch.zeros(0, 4, 32))


def test_missing_stage_still_names_the_command(micro, capsys):
    assert main(["--stage", "1", *micro]) == 2
    assert "python -m gpd_train --stage 0 --run-dir" in capsys.readouterr().err
    assert issubclass(MissingStageError, RuntimeError)


# The micro run with the guided chain's guidance stage and one halving stage.
GUIDED_TOML = (MICRO_TOML + "[guided]\nguidance_iterations = 2\niterations = [2]\n"
               "freq_weight = [0.0]\n")


def test_a_guided_stage_on_a_wider_range_than_its_guidance_stage_learned_is_refused(
        micro, tmp_path, capsys):
    (tmp_path / "micro.toml").write_text(GUIDED_TOML)
    assert main(["--stage", "0", *micro]) == 0
    assert main(["--stage", "g", "--chain", "guided", *micro]) == 0  # learns w in 1..3
    before = hashes(tmp_path / "run")
    capsys.readouterr()
    wider = ["--stage", "1", "--chain", "guided", *micro, "--guidance-range", "0.5", "4"]
    assert main(wider) == 2
    err = capsys.readouterr().err
    assert "guided/guidance learned CFG scales 1..3" in err and err.count("\n") == 1
    assert "this run asks for --guidance-range 0.5 4, outside them" in err
    assert hashes(tmp_path / "run") == before
    assert main([*suggested_args(err), *micro]) == 0  # the guidance stage on the wider range
    assert main(wider) == 0  # now its teacher learned every scale it is taught at


@pytest.mark.parametrize("target", ["run folder", "stage folder", "stage file",
                                    "guidance stage folder", "guidance stage file"])
def test_a_stale_stage_is_refused_however_it_is_named(micro, tmp_path, capsys, target):
    run_dir = tmp_path / "run"
    (tmp_path / "micro.toml").write_text(GUIDED_TOML)
    stage, name = (["g", "--chain", "guided"], "guided/guidance") if "guidance" in target else (
        ["1"], "stage1")
    assert main(["--stage", "0", *micro]) == 0
    assert main(["--stage", *stage, *micro]) == 0
    checkpoint = {"run folder": run_dir, "folder": run_dir / name,
                  "file": run_dir / name / "model.safetensors"}[target.rpartition("stage ")[2]]
    if "guidance" in target:  # fresh, it samples as its run's stage (w an input)
        assert sample.main(["--checkpoint", str(checkpoint), "--device", "cpu", "--steps", "1",
                            "--guidance", "2", "--out", str(tmp_path / "fresh")]) == 0
        summary = json.loads((tmp_path / "fresh" / "summary.json").read_text())
        assert summary["checkpoint"] == f"{run_dir}/{name}", summary
    assert main(["--stage", "0", "--restart", "--seed", "7", *micro]) == 0  # {name} now stale
    capsys.readouterr()
    code = sample.main(["--checkpoint", str(checkpoint), "--device", "cpu", "--steps", "1",
                        "--out", str(tmp_path / "samples"), "--stage", "1"][
        :None if target == "run folder" else -2])
    err = capsys.readouterr().err
    assert code == 2 and f"{name} is stale: its stage teacher stage0 changed since" in err, err
    assert err.count("\n") == 1 and not (tmp_path / "samples").exists()


def test_a_run_whose_last_stage_lost_its_output_is_refused(micro, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(["--stage", "0", *micro]) == 0
    assert main(["--stage", "1", *micro]) == 0
    (run_dir / "stage1" / "model.safetensors").rename(tmp_path / "moved.safetensors")
    capsys.readouterr()
    out = ["--device", "cpu", "--steps", "1", "--out", str(tmp_path / "samples")]
    assert sample.main(["--checkpoint", str(run_dir), *out]) == 2
    err = capsys.readouterr().err
    assert f"stage1, the last stage {run_dir} records as finished, lost its output" in err
    assert "or pass --stage 0 for the stage before it" in err and err.count("\n") == 1
    assert not (tmp_path / "samples").exists()
    assert sample.main(["--checkpoint", str(run_dir), *out, "--stage", "0"]) == 0  # the hint


@pytest.mark.parametrize("command", ["sample", "export"])
def test_an_unreadable_run_config_is_named_as_such_not_as_missing(micro, tmp_path, capsys,
                                                                  command):
    from gpd_train.infer.export import cli as export

    run_dir = tmp_path / "run"
    assert main(["--stage", "0", *micro]) == 0
    config = run_dir / "config.json"
    config.write_text(config.read_text()[:40])  # cut short
    capsys.readouterr()
    out = str(tmp_path / "out")
    code = (sample.main(["--checkpoint", str(run_dir), "--device", "cpu", "--out", out])
            if command == "sample" else
            export.main(["--run", str(run_dir), "--format", "comfyui", "--out", out]))
    err = capsys.readouterr().err
    assert code == 2 and f"unreadable run configuration {config}" in err, err
    assert "no config.json" not in err and err.count("\n") == 1


def test_a_run_trains_the_callers_model_config_and_data_set(tmp_path):
    """RunFolder / TrainingRun take a model config and a data set (a user's trainer, the
    tests' micro runs); without them, the configured preset and the built-in data."""
    dit_config, values = micro_dit(num_layers=2), {"run_dir": str(tmp_path), "device": "cpu"}
    data = micro_data(dit_config)
    run = tiny_run(values, dit_config, data)
    assert run.dit_config == dit_config and run.data is data
    assert run.new_model().cfg == dit_config
    assert RunFolder(run.config, dit_config=dit_config).dit_config == dit_config
    configured = TrainingRun(run.config)
    assert configured.dit_config == get_preset("tiny") and configured.data.size == 16
