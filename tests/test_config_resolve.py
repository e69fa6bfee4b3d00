"""The configuration is resolved once and frozen, and one stage plan answers what a stage is.

Flags are merged into the TOML file's values before any rule runs (issue 30), the rules run
once on the merged values, and the stage plan carries `steps` from the command line to the
stage's sigma grid (issue 29). Each "set X" / "run this instead" hint of the configuration
errors is applied or run here and shown to be accepted.
"""

import dataclasses
import json
import re
import shlex
from pathlib import Path

import pytest
import tomllib
import torch
from safetensors.torch import load_file, save_file

import gpd_train.__main__ as train_cli
from gpd_model import sigma_grid
from gpd_train.__main__ import main
from gpd_train.config.chains import Chain, StageId, register, unregister
from gpd_train.config.load import fit_to_stages, load_config
from gpd_train.config.plan import stage_plan
from gpd_train.config.schedule import Schedule, ScheduleStage
from gpd_train.config.settings import RunConfig
from gpd_train.errors import ConfigError
from gpd_train.infer.export.comfyui import export_comfyui
from gpd_train.run.files import read_metadata, sha256_file
from gpd_train.run.records import OPTIONS_KEY
from gpd_train.train.builders import TrainingRun, stage_grid

REPO = Path(__file__).resolve().parents[1]
HORIZON = {"horizon.horizons": [2, 3, 4], "horizon.iterations": [1, 1, 1],
           "horizon.freq_weight": [0.0, 0.0, 0.0]}


def _cli(tmp_path: Path) -> list[str]:
    return ["--run-dir", str(tmp_path / "run"), "--device", "cpu", "--threads", "1"]


def _stage_runs_captured(monkeypatch, tmp_path: Path) -> list:
    """Stand in for training: each stage the CLI would run records its run and plan."""
    ran: list = []

    def run_stage(run, sid, **kwargs):
        ran.append((run, sid))
        return tmp_path / "stand-in"

    monkeypatch.setattr(train_cli, "run_stage", run_stage)
    return ran


def test_steps_from_the_flags_reach_the_stage_grid_through_one_resolve(micro, tmp_path,
                                                                       monkeypatch):
    """`--steps` and `--iterations` on top of a TOML file: the file is read once, the rules
    run once, and the stage's grid is the one the flags asked for."""
    toml = tmp_path / "run.toml"
    toml.write_text("shift = 2.0\nbatch_size = 4\n[distill]\nlr = 1e-4\n")
    loads, rules = [], []
    real_load, real_validate = tomllib.load, RunConfig.validate
    monkeypatch.setattr(tomllib, "load", lambda handle: loads.append(1) or real_load(handle))
    monkeypatch.setattr(RunConfig, "validate",
                        lambda self: rules.append(1) or real_validate(self))
    ran = _stage_runs_captured(monkeypatch, tmp_path)
    assert main(["--stage", "2", "--config", str(toml), *_cli(tmp_path), "--steps", "16", "8",
                 "4", "--iterations", "5", "7"]) == 0
    assert (len(loads), len(rules)) == (1, 1)
    (run, sid), = ran
    plan = run.plan(sid)
    assert (plan.steps, plan.teacher_steps, plan.iterations, plan.shift) == (4, 8, 7, 2.0)
    grid = stage_grid(run, sid)
    torch.testing.assert_close(grid.student, sigma_grid(4, 2.0).float())
    torch.testing.assert_close(grid.teacher, sigma_grid(8, 2.0).float())
    assert run.config.chain("gpd").lr == 1e-4  # the TOML's value, under the flags


def test_the_readme_three_step_command_is_accepted_and_trains(micro, tmp_path, monkeypatch):
    """The README's own command (refused at df7f83c: "distill.iterations has 3 ... its
    default"), then its first stages at tiny iteration counts."""
    line = next(line for line in (REPO / "README.md").read_text().splitlines()
                if "--steps 48 24 12 6 3" in line)
    argv = shlex.split(line.partition("#")[0])[3:]  # after `python -m gpd_train`
    seen: list = []
    monkeypatch.setattr(train_cli, "run_pipeline", lambda config, resume: seen.append(config))
    assert main([*argv, *_cli(tmp_path)]) == 0
    config, = seen
    assert config.steps == [48, 24, 12, 6, 3]
    assert config.chain("gpd").iterations == [2000, 1000, 2000, 2000]
    assert config.chain("gpd").freq_weight == [0.0, 0.0, 0.0, 1.0]  # the default, fitted
    assert config.chain("vanilla").iterations == [2000, 1000, 1000, 2000]  # not in the command
    steps = argv[argv.index("--steps"):argv.index("--iterations")]
    tiny = [*steps, *_cli(tmp_path), "--batch-size", "2"]
    assert main(["--stage", "0", *tiny, "--teacher-iterations", "1"]) == 0
    assert main(["--stage", "1", *tiny, "--iterations", "1"]) == 0  # stages 2..4 keep theirs
    record = json.loads((tmp_path / "run" / "stage1" / "done.json").read_text())
    assert record["iterations"] == 1
    assert (record["options"]["steps"], record["options"]["teacher_steps"]) == (24, 48)


def test_a_wrong_iterations_count_names_the_counts_that_are_accepted(micro, tmp_path,
                                                                     monkeypatch, capsys):
    """"--iterations takes one value per stage (3), or with --stage N the value for stage
    N": both suggestions run, on steps the flags set (the defaults fitted to them)."""
    ran = _stage_runs_captured(monkeypatch, tmp_path)
    steps = ["--steps", "16", "8", "4", "2", *_cli(tmp_path)]
    assert main([*steps, "--stage", "1", "--iterations", "5", "6"]) == 2
    err = capsys.readouterr().err
    assert "--iterations takes one value per stage (3)" in err and not ran
    assert main([*steps, "--stage", "1", "--iterations", "5", "6", "7"]) == 0
    assert main([*steps, "--stage", "2", "--iterations", "9"]) == 0
    run, sid = ran[-1]
    assert run.config.chain("gpd").iterations == [2000, 9, 2000]
    assert run.plan(sid).iterations == 9


def test_the_resolved_configuration_is_frozen():
    config = load_config(None, {"steps": [8, 4, 2]})
    for target, key in ((config, "seed"), (config, "resolved_shift"), (config.stage0, "lr"),
                        (config.chain("gpd"), "lr"), (config.parallel, "sequence")):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(target, key, 1)
    # Derived values are fields, set once: the preset's shift and CFG scale, each chain's
    # inherited lists and its stage teachers' CFG scales.
    assert (config.resolved_shift, config.resolved_guidance) == (3.0, 1.5)
    assert config.chain("guided").iterations == config.chain("gpd").iterations
    assert config.chain("gpd").stage_guidance == [1.5, 1.0]


@pytest.mark.parametrize("default,stages,fitted", [
    ([2000, 1000, 2000], 3, [2000, 1000, 2000]),
    ([2000, 1000, 2000], 5, [2000, 1000, 1000, 1000, 2000]),
    ([2000, 1000, 2000], 2, [2000, 2000]),
    ([0.0, 0.0, 1.0], 1, [1.0]),
    ([700] * 7, 2, [700, 700]),
    ([0.0] * 6 + [1.0], 3, [0.0, 0.0, 1.0]),
])
def test_unset_stage_lists_follow_the_schedule(default, stages, fitted):
    assert fit_to_stages(default, stages) == fitted


def test_a_stage_list_given_for_another_schedule_is_refused_and_its_hints_work():
    with pytest.raises(ConfigError) as caught:
        load_config(None, {"steps": [8, 4, 2], "vanilla.iterations": [1, 1, 1]})
    message = str(caught.value)
    assert "vanilla.iterations needs one entry per stage" in message and "\n" not in message
    assert "give 2 value(s)" in message and "leave it unset" in message
    load_config(None, {"steps": [8, 4, 2], "vanilla.iterations": [1, 1]})  # give 2 values
    load_config(None, {"steps": [8, 4, 2]})  # leave it unset


def _refusal(settings: dict) -> str:
    with pytest.raises(ConfigError) as caught:
        load_config(None, settings)
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_steps_that_do_not_divide_name_steps_that_do():
    message = _refusal({"steps": [48, 20]})
    choices = json.loads(re.search(r"choose one of (\[.*\])", message).group(1))
    for student in choices[:3]:
        load_config(None, {"steps": [48, student]})


def test_stage_guidance_and_guidance_anneal_together_are_refused_naming_both():
    both = {**HORIZON, "horizon.stage_guidance": [2.0, 1.5, 1.0],
            "horizon.guidance_anneal": [2.0, 1.0]}
    message = _refusal(both)
    assert "horizon.stage_guidance" in message and "horizon.guidance_anneal" in message
    for dropped in ("horizon.stage_guidance", "horizon.guidance_anneal"):  # "set one of them"
        kept = load_config(None, {key: v for key, v in both.items() if key != dropped})
        assert kept.chain("horizon").stage_guidance[0] == 2.0


def test_an_empty_horizons_list_is_told_what_to_give():
    message = _refusal({"horizon.horizons": []})
    assert "horizon.horizons needs at least one stage's jump" in message
    assert "value(s)" not in message
    example = [int(k) for k in re.search(r"horizons = \[([\d, ]+)", message).group(1)
               .split(",") if k.strip()]
    config = load_config(None, {"horizon.horizons": example})  # its lists follow it
    assert config.chain("horizon").iterations == [700] * len(example)


def test_a_last_horizon_that_does_not_divide_names_ones_that_do():
    settings = {"steps": [8, 4, 2, 1], "pipeline_chains": ["gpd", "horizon"], **HORIZON,
                "horizon.horizons": [2, 3, 5]}
    message = _refusal(settings)
    choices = json.loads(re.search(r"end at one of (\[.*\])", message).group(1))
    for last in choices[1:]:  # an end above the jumps before it
        load_config(None, {**settings, "horizon.horizons": [2, 3, last]})


@pytest.mark.parametrize("chain,extra", [("horizon", []), ("vanilla", []), ("gpd", [])])
def test_a_guidance_stage_the_chain_lacks_is_refused_with_a_command_that_is_accepted(
        micro, tmp_path, monkeypatch, capsys, chain, extra):
    """At df7f83c `--stage g --chain horizon` suggested horizon.guidance_stage = true, which
    is refused; now the hint is a command (or a key) that is accepted."""
    ran = _stage_runs_captured(monkeypatch, tmp_path)
    assert main(["--stage", "g", "--chain", chain, *_cli(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1 and not ran
    command = re.search(r"`python -m gpd_train (.*?)`", err).group(1)
    assert main([*shlex.split(command), *_cli(tmp_path)]) == 0
    assert ran[-1][1] == StageId("guided", "g")
    key = re.search(r"set (\w+)\.guidance_stage = true", err)
    if chain == "gpd":  # a chain that allows one: the key works too
        toml = tmp_path / "g.toml"
        toml.write_text(f"[{key.group(1)}]\nguidance_stage = true\n")
        assert main(["--stage", "g", "--config", str(toml), *_cli(tmp_path)]) == 0
        assert ran[-1][1] == StageId("gpd", "g")
    else:
        assert key is None


def test_export_of_an_old_horizon_record_takes_its_steps_from_the_plan(micro, tmp_path):
    """A horizon stage whose done.json predates recorded options: the exported scheduler's
    steps are ceil(steps[0] / horizon) = 2 (df7f83c took steps[3] = 1, the halving rule)."""
    config = load_config(None, {"run_dir": str(tmp_path / "run"), "device": "cpu",
                                "steps": [8, 4, 2, 1], **HORIZON})
    run = TrainingRun(config)
    run.save_config()
    sids = [StageId("horizon", stage) for stage in range(4)]
    for sid in sids:
        run.finish_stage(sid, run.new_model().state_dict(), {"steps": run.steps(sid)})
    folder = run.stage_folder(sids[-1])
    path = folder / "model.safetensors"
    meta = read_metadata(path)
    del meta[OPTIONS_KEY]
    save_file(load_file(str(path)), str(path), metadata=meta)
    record = json.loads((folder / "done.json").read_text())
    del record["options"]
    record["sha256"] = sha256_file(path)
    (folder / "done.json").write_text(json.dumps(record))
    exported = export_comfyui(tmp_path / "run", tmp_path / "comfy", chain="horizon", stage=3)
    assert exported["steps"] == stage_plan(config, sids[-1]).steps == 2
    assert exported["shift"] == config.resolved_shift


class Quarters(Schedule):
    """A toy schedule: two stages, each a quarter of the steps before it."""

    def stage_count(self, steps, table):
        return 2

    def stage(self, steps, table, stage):
        return ScheduleStage(steps[0] // 4**stage)


def test_a_new_schedule_is_one_class_and_its_registration(micro, tmp_path):
    chain = register(Chain(name="quarters", section="quarters", label="Q", folder="quarters",
                           seed_offset=400, summary="a test's schedule", schedule=Quarters()))
    try:
        config = load_config(None, {"run_dir": str(tmp_path / "run"), "device": "cpu",
                                    "steps": [16, 8]})
        assert config.chain(chain.name).iterations == [2000, 2000]  # fitted to its 2 stages
        plan = stage_plan(config, StageId(chain.name, 2))
        assert (plan.steps, plan.teacher_steps, plan.ratio) == (1, 4, 4)
        grid = stage_grid(TrainingRun(config), StageId(chain.name, 2))
        torch.testing.assert_close(grid.teacher, sigma_grid(4, config.resolved_shift).float())
    finally:
        unregister(chain.name)
