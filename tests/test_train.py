"""gpd_train stages on micro configs: who changes, the online target, grids, resume, faults."""

import json

import pytest
import torch
from builders import losses, micro_run, run_until_killed, with_random_stages

import gpd_train.train.checkpoint as checkpoint_module
from gpd_model import (
    CFG,
    Conditioning,
    DiTDenoiser,
    add_guidance_input,
    euler_step,
    sigma_grid,
)
from gpd_train.__main__ import main
from gpd_train.config.chains import GUIDANCE_STAGE, StageId
from gpd_train.config.load import load_config
from gpd_train.eval.detail_metric import SANITY, sanity_pairs
from gpd_train.eval.evaluate import evaluate_run
from gpd_train.run.checkpoint_store import read_manifest
from gpd_train.run.files import CheckpointError, load_exact
from gpd_train.run.folder import MissingStageError
from gpd_train.train.builders import TrainingRun, build_distill, build_stage0
from gpd_train.train.loop import NonFiniteLossError
from gpd_train.train.objectives import stage_teacher, teacher_target
from gpd_train.train.pipeline import pipeline_plan, run_stage


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("stage,source", [(1, "student"), (1, "teacher"), (2, "data"),
                                          (3, "student")])
def test_one_step_changes_only_the_student(tmp_path, stage, source):
    run = micro_run(tmp_path, **{"distill.state_source": source,
                                 "distill.freq_weight": [0.0, 0.0, 1.0]})
    with_random_stages(run, "gpd", stage - 1)
    trainer = build_distill(run, StageId("gpd", stage))
    (teacher,), student = trainer.objective.teacher.modules(), trainer.model
    assert all(not p.requires_grad for p in teacher.parameters())
    assert all(p.requires_grad for p in student.parameters())
    before_teacher, before_student = snapshot(teacher), snapshot(student)
    # S_k starts as S_{k-1}.
    assert all(torch.equal(before_teacher[k], before_student[k]) for k in before_teacher)
    trainer.iterations = 1
    trainer.run(resume=False)
    assert all(torch.equal(before_teacher[k], v) for k, v in teacher.state_dict().items())
    changed = [k for k, v in student.state_dict().items() if not torch.equal(before_student[k], v)]
    assert len(changed) > len(before_student) // 2
    # CFG only from T0: a CFG pair at w = 1.5 in stage 1, a single plain forward after.
    assert isinstance(trainer.objective.teacher, CFG) == (stage == 1)
    assert trainer.objective.guidance.low == trainer.objective.guidance.high == (
        1.5 if stage == 1 else 1.0)


def test_stage0_step_trains_the_teacher_with_cfg_dropout(tmp_path):
    run = micro_run(tmp_path, **{"stage0.cfg_dropout": 0.5})
    trainer = build_stage0(run)
    before = snapshot(trainer.model)
    trainer.iterations = 1
    trainer.run(resume=False)
    assert any(not torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())
    assert len(losses(trainer)) == 1 and losses(trainer)[0] > 0


@pytest.mark.parametrize("guided", [True, False])
def test_double_step_target_equals_two_explicit_teacher_euler_steps(tmp_path, guided):
    run = micro_run(tmp_path)
    teacher = run.new_model().eval()
    torch.manual_seed(1)
    batch = 3
    x_a = torch.randn(batch, 3, 4, 8, 8)
    context = torch.randn(batch, 4, run.dit_config.text_dim)
    neg = torch.randn(4, run.dit_config.text_dim) if guided else None
    guidance = torch.tensor([1.0, 3.5, 7.0])
    grid = sigma_grid(6, 3.0).float()
    index = torch.tensor([0, 1, 2])  # a batch mixing grid indices
    s_a, s_b, s_c = grid[2 * index], grid[2 * index + 1], grid[2 * index + 2]
    negative = Conditioning(neg[None]) if guided else None
    cond = Conditioning(context, guidance=guidance)
    u_star = teacher_target(stage_teacher(teacher, negative), x_a, cond, s_a, s_b, s_c)
    # The reference combines CFG with torch.lerp, the target in the fused kernels.
    explicit = CFG(DiTDenoiser(teacher), negative) if guided else DiTDenoiser(teacher)
    with torch.no_grad():
        g1 = explicit(x_a, s_a, cond)
        x_b = euler_step(x_a, g1, s_a, s_b)
        g2 = explicit(x_b, s_b, cond)
        x_c = euler_step(x_b, g2, s_b, s_c)
    got = x_a + (s_c - s_a).view(-1, 1, 1, 1, 1) * u_star
    torch.testing.assert_close(got, x_c, atol=2e-5, rtol=1e-5)


def test_guided_target_equals_two_explicit_forwards(tmp_path):
    """The guidance stage's target: u_uncond + w (u_cond - u_uncond), forward by forward."""
    run = micro_run(tmp_path)
    teacher = run.new_model().eval()
    torch.manual_seed(2)
    x = torch.randn(3, 3, 4, 8, 8)
    context = torch.randn(3, 4, run.dit_config.text_dim)
    neg = torch.randn(4, run.dit_config.text_dim)
    guidance = torch.tensor([1.0, 2.25, 3.0])
    sigma, sigma_next = torch.tensor([0.9, 0.5, 0.1]), torch.tensor([0.8, 0.4, 0.0])
    got = teacher_target(stage_teacher(teacher, Conditioning(neg[None])), x,
                         Conditioning(context, guidance=guidance), sigma, sigma_next)
    with torch.no_grad():
        timestep = 1000 * sigma
        u_cond = teacher(x, timestep, context).double()
        u_uncond = teacher(x, timestep, neg.expand(3, -1, -1)).double()
    want = u_uncond + guidance.double().view(-1, 1, 1, 1, 1) * (u_cond - u_uncond)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


def test_guidance_input_teacher_takes_w_in_one_forward(tmp_path):
    run = micro_run(tmp_path)
    teacher = add_guidance_input(run.new_model()).eval()
    torch.nn.init.normal_(teacher.guidance_embedding.mlp[2].weight)  # make w matter
    x = torch.randn(2, 3, 4, 8, 8)
    context = torch.randn(2, 4, run.dit_config.text_dim)
    sigma, sigma_next = torch.tensor([0.7, 0.3]), torch.tensor([0.6, 0.2])
    guidance = torch.tensor([1.0, 3.0])
    got = teacher_target(stage_teacher(teacher), x, Conditioning(context, guidance=guidance),
                         sigma, sigma_next)
    with torch.no_grad():
        want = teacher(x, 1000 * sigma, context, guidance=guidance)
        other = teacher(x, 1000 * sigma, context, guidance=guidance.flip(0))
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(got, other, atol=1e-3)


def test_stage_grids_are_even_points_of_the_previous_grid(tmp_path):
    run = micro_run(tmp_path, steps=[48, 24, 12, 6], **{"distill.iterations": [1, 1, 1],
                                                        "vanilla.iterations": [1, 1, 1]})
    with_random_stages(run, "gpd", 2)
    grids = [build_distill(run, StageId("gpd", k)).objective.grid for k in (1, 2, 3)]
    assert [g.steps for g in grids] == [24, 12, 6]
    assert torch.equal(grids[0].teacher, sigma_grid(48, 3.0).float())
    for grid in grids:
        assert torch.equal(grid.student, grid.teacher[::2])
    for previous, current in zip(grids, grids[1:], strict=False):
        assert torch.equal(current.teacher, previous.student)
    index = torch.arange(6)
    s_a, s_b, s_c = grids[2].sigmas(index)
    teacher = grids[2].teacher
    assert torch.equal(s_a, teacher[2 * index]) and torch.equal(s_c, teacher[2 * index + 2])
    assert bool(((s_a > s_b) & (s_b > s_c)).all())


def test_pipelined_lanes_mix_grid_indices_and_restart(tmp_path):
    run = micro_run(tmp_path, batch_size=4, **{"distill.lane_groups": 1})
    with_random_stages(run, "gpd", 0)
    trainer = build_distill(run, StageId("gpd", 1))  # 4 student steps, 4 lanes
    trainer.iterations = 3
    trainer.run(resume=False)
    indices = [r["mean_index"] for r in trainer.metrics.records()]
    # Lanes start at 0, 1, 2, 3 and advance together, wrapping to fresh noise at the end.
    assert indices == [1.5, 1.5, 1.5]
    assert sorted(trainer.objective.lanes.pool["index"].tolist()) == [0, 1, 2, 3]


@pytest.mark.parametrize("source", ["student", "teacher"])
def test_lane_groups_take_turns_advance_by_the_source_and_restart_fresh(tmp_path, source,
                                                                       monkeypatch):
    run = micro_run(tmp_path, batch_size=3, **{"distill.lane_groups": 2,
                                                "distill.state_source": source})
    with_random_stages(run, "gpd", 0)
    objective = build_distill(run, StageId("gpd", 1)).objective  # 4 student steps, 6 lanes
    seen: dict[str, torch.Tensor] = {}
    real_target, real_student = objective._target, objective._student_velocity

    def record(name, real):
        def wrapped(batch):
            seen[name] = real(batch).detach()
            return seen[name]
        return wrapped

    monkeypatch.setattr(objective, "_target", record("u_star", real_target))
    monkeypatch.setattr(objective, "_student_velocity", record("u_student", real_student))
    lanes = objective.lanes
    for update, (group, waiting, after) in enumerate([([0, 2, 4], [1, 3, 5], [1, 2, 3]),
                                                      ([1, 3, 5], [0, 2, 4], [1, 3, 0])]):
        if update == 0:
            lanes.start(objective._rollout_step)
            assert lanes.pool["index"].tolist() == [0, 0, 1, 2, 2, 3]  # staggered over the grid
        group, waiting = torch.tensor(group), torch.tensor(waiting)
        before = {key: value.clone() for key, value in lanes.state_dict().items()}
        objective.loss(update + 1)
        now = lanes.state_dict()
        for key in ("x", "text", "index", "guidance"):  # the other group waits its turn
            assert torch.equal(now[key][waiting], before[key][waiting])
        assert lanes.pool["index"][group].tolist() == after
        s_a, _, s_c = objective.grid.sigmas(before["index"][group])
        velocity = seen["u_star" if source == "teacher" else "u_student"]
        stepped = before["x"][group] + (s_c - s_a).view(-1, 1, 1, 1, 1) * velocity
        running = torch.tensor(after) > 0
        assert torch.allclose(lanes.pool["x"][group[running]], stepped[running], atol=1e-6)
    # Lane 5 finished on update 2 and restarted from fresh noise.
    assert not torch.allclose(lanes.pool["x"][5], stepped[2], atol=1e-3)
    assert lanes.pool["x"][5].std() > 0.5
    assert int(lanes.pool["group"]) == 0


def test_lane_groups_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="distill.lane_groups must be a positive int, got 0"):
        micro_run(tmp_path, **{"distill.lane_groups": 0})


@pytest.mark.parametrize("stage", [1, GUIDANCE_STAGE])
def test_resume_gives_the_same_losses_as_an_uninterrupted_run(tmp_path, monkeypatch, stage):
    def build(folder):
        run = micro_run(folder, **{"distill.iterations": [7, 4, 4],
                                   "distill.guidance_stage": stage == GUIDANCE_STAGE,
                                   "distill.guidance_iterations": 7})
        with_random_stages(run, "gpd", 0)
        return run, build_distill(run, StageId("gpd", stage))

    _, reference = build(tmp_path / "a")
    reference.run(resume=False)
    broken, trainer = build(tmp_path / "b")
    run_until_killed(trainer, monkeypatch, at_step=5)
    assert trainer.checkpoints.latest().name == "step-00000003"
    resumed = build_distill(broken, StageId("gpd", stage))
    resumed.run(resume=True)
    assert losses(resumed) == losses(reference)
    for key, value in reference.ema.state_dict().items():
        assert torch.equal(resumed.ema.state_dict()[key], value)


def test_crash_mid_save_leaves_the_previous_checkpoint_loadable(tmp_path, monkeypatch):
    run = micro_run(tmp_path, checkpoint_every=2, **{"stage0.iterations": 4})
    trainer = build_stage0(run)
    real_save = torch.save
    calls = {"n": 0}

    def dies_on_second_checkpoint(obj, handle):
        calls["n"] += 1
        if calls["n"] == 2:
            handle.write(b"partial")
            raise OSError("disk vanished mid-save")
        real_save(obj, handle)

    monkeypatch.setattr(checkpoint_module.torch, "save", dies_on_second_checkpoint)
    with pytest.raises(OSError, match="mid-save"):
        trainer.run(resume=False)
    monkeypatch.setattr(checkpoint_module.torch, "save", real_save)
    path, problems = trainer.checkpoints.load()
    assert path.name == "step-00000002" and not problems
    assert trainer.step == 2 and trainer.ema.updates == 2


def test_corrupt_checkpoint_is_refused(tmp_path):
    run = micro_run(tmp_path, checkpoint_every=2, **{"stage0.iterations": 2})
    trainer = build_stage0(run)
    trainer.run(resume=False)
    weights = trainer.checkpoints.latest() / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="model.safetensors is corrupt"):
        read_manifest(trainer.checkpoints.latest())


def test_mismatched_weights_are_refused_and_nothing_is_loaded(tmp_path):
    model = micro_run(tmp_path).new_model()
    before = snapshot(model)
    state = {k: torch.zeros_like(v) for k, v in before.items()}
    dropped = sorted(state)[0]
    del state[dropped]
    state["extra.weight"] = torch.zeros(2)
    with pytest.raises(CheckpointError, match=r"missing keys: \['" + dropped.replace(".", r"\.")):
        load_exact(model, state, tmp_path)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_non_finite_loss_stops_with_the_last_checkpoint_intact(tmp_path, monkeypatch):
    run = micro_run(tmp_path, checkpoint_every=2, **{"stage0.iterations": 6})
    trainer = build_stage0(run)
    real_forward = trainer.objective.forward

    def nan_at_three(inputs):
        loss, extras, outputs = real_forward(inputs)
        return (loss * float("nan") if trainer.step == 2 else loss), extras, outputs

    monkeypatch.setattr(trainer.objective, "forward", nan_at_three)
    with pytest.raises(NonFiniteLossError, match=r"step 3.*step-00000002 is intact"):
        trainer.run(resume=False)
    trainer.checkpoints.load()
    assert trainer.step == 2
    assert all(torch.isfinite(v).all() for v in trainer.model.state_dict().values())


def test_missing_previous_stage_names_the_command(tmp_path, capsys):
    run = micro_run(tmp_path)
    with pytest.raises(MissingStageError, match=r"`python -m gpd_train --stage 0 --run-dir"):
        build_distill(run, StageId("gpd", 1))
    with_random_stages(run, "gpd", 0)
    with pytest.raises(MissingStageError, match=r"--stage 1 --chain vanilla"):
        build_distill(run, StageId("vanilla", 2))
    assert main(["--stage", "2", "--run-dir", str(tmp_path / "empty")]) == 2
    assert "python -m gpd_train --stage 1" in capsys.readouterr().err


@pytest.mark.parametrize("preset,given,resolved", [("tiny", None, 1.5),
                                                   ("wan2.1-t2v-1.3b", None, 5.0),
                                                   ("tiny", 3.0, 3.0)])
def test_guidance_defaults_per_preset_and_flags_override(preset, given, resolved):
    config = load_config(None, {"preset": preset, "guidance": given})
    assert config.resolved_guidance == resolved


def test_guidance_must_be_positive():
    with pytest.raises(ValueError, match=r"guidance must be > 0 \(1 = no guidance\), got -1.0"):
        load_config(None, {"guidance": -1.0})


def test_config_file_and_flags(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('batch_size = 8\n[distill]\niterations = [5, 6, 7]\nstate_source = "data"\n')
    config = load_config(toml, {"distill.lr": 3e-4, "guidance": 2.0})
    gpd = config.table("distill")
    assert (config.batch_size, gpd.iterations, gpd.state_source, gpd.lr,
            config.guidance) == (8, [5, 6, 7], "data", 3e-4, 2.0)
    toml.write_text("bacth_size = 8\n")
    with pytest.raises(ValueError, match="unknown key 'bacth_size'"):
        load_config(toml)
    with pytest.raises(ValueError, match="must divide its teacher.*48 -> 20"):
        load_config(None, {"steps": [48, 20, 10, 5]})
    with pytest.raises(ValueError, match="state_source must be one of"):
        load_config(None, {"distill.state_source": "buffer"})
    with pytest.raises(SystemExit):
        main(["--help"])


@pytest.mark.slow
def test_embedded_pipeline_end_to_end_writes_the_report(tmp_path):
    run = micro_run(tmp_path, pipeline_chains=["gpd", "guided", "vanilla"])
    for sid in pipeline_plan(run.config):
        run_stage(run, sid, resume=True)
    report = evaluate_run(run, run.data)
    table = report.read_text()
    for label in ("teacher@8 (ref)", "ceiling: teacher@8, weights x(1+0.01N)",
                  "teacher@1 naive", "vanilla PD@1", "GPD@4", "GPD@1", "GPD-w guidance stage@8",
                  "GPD-w@1", "GPD-w@1 w=3", "teacher@8 w=3 (ref)"):
        assert f"| {label} |" in table
    data = json.loads((report.parent / "report.json").read_text())
    # ref, ceiling, naive 4/2/1; GPD 4/2/1; GPD-w: guidance stage, 4/2/1; vanilla PD@1;
    # then at w = 1 and 3: the teacher, the teacher naive at 1 step, GPD-w@1.
    assert [r["nfe"] for r in data["rows"]] == [16, 16, 8, 4, 2, 4, 2, 1, 8, 4, 2, 1, 1,
                                                16, 2, 1, 16, 2, 1]
    assert {r["group"] for r in data["sanity_rows"]} == {SANITY}
    assert [r["model"] for r in data["sanity_rows"]] == [
        "data, held out", "teacher@8 (ref) blurred sigma=0.5 px",
        "teacher@8 (ref) blurred sigma=1 px", "teacher@8 (ref) frames shuffled",
        "teacher@8 (ref) frozen (first frame)"]
    assert data["eval_set"]["guidance"] == run.config.resolved_guidance
    assert f"CFG scale {run.config.resolved_guidance}" in table
    assert data["rows"][0]["psnr_db"] is None and data["rows"][1]["psnr_db"] > 0
    for row in data["rows"] + data["sanity_rows"]:  # each value inside its interval
        for key in (("psnr_db", "fd_data", "kid_data", "prompt_acc")
                    if row["psnr_db"] is not None else ()):
            low, high = row[f"{key}_ci"]
            assert low <= row[key] + 1e-9 and row[key] <= high + 1e-9, (row["model"], key)
    # each student against naive sampling, the baseline and (the guided one) the GPD chain
    assert [(c["a"], c["b"], c["metric"]) for c in data["comparisons"]] == [
        (student, other, metric)
        for student, others in (("GPD@1", ("teacher@1 naive", "vanilla PD@1")),
                                ("GPD-w@1", ("teacher@1 naive", "vanilla PD@1", "GPD@1")))
        for other in others
        for metric in ("PSNR (dB)", "learned FD to data", "detail KID to data")] + [
        (a, b, "detail KID to data") for a, b in sanity_pairs(
            "teacher@8 (ref)", ["teacher@8 (ref)", "teacher@4 naive", "teacher@2 naive",
                                "teacher@1 naive"])] + [
        (student, "teacher@8 (ref)", "detail KID to data") for student in ("GPD@1", "GPD-w@1")]
    # The band table: every row measured against the main reference, in the rows' order.
    assert [r["model"] for r in data["bands"]["rows"]] == [
        r["model"] for r in data["rows"] if r["reference"] == "teacher@8 (ref)"]
    assert "## Where detail goes: band amplitudes" in table
    assert (report.parent / "contact_sheet.png").stat().st_size > 0
    assert (report.parent / "feature_net.safetensors").is_file()
    # One GIF per model, and report.html's grid of them.
    assert sorted(p.name for p in report.parent.glob("*.gif")) == sorted(
        [row["gif"] for row in data["rows"]] + ["video_grid.gif"])
    assert len(data["rows"]) == 19 and (report.parent / "report.html").is_file()
    record = run.stage_folder(StageId("vanilla", 1)) / "done.json"
    assert json.loads(record.read_text())["iterations"] == 2


def guided_run(tmp_path, **overrides) -> TrainingRun:
    return micro_run(tmp_path, **{"distill.guidance_stage": True,
                                  "distill.guidance_range": [1.0, 3.0],
                                  "distill.guidance_iterations": 3, **overrides})


def test_guidance_stage_starts_as_the_teacher_and_learns_the_guided_velocity(tmp_path):
    run = guided_run(tmp_path)
    assert pipeline_plan(run.config)[:3] == [StageId("gpd", 0), StageId("gpd", GUIDANCE_STAGE),
                                             StageId("gpd", 1)]
    with_random_stages(run, "gpd", 0)
    trainer = build_distill(run, StageId("gpd", GUIDANCE_STAGE))
    objective, student = trainer.objective, trainer.model
    assert isinstance(objective.teacher, CFG)  # T0 as a CFG pair
    assert objective.grid.steps == 8 and objective.grid.fine_steps == 1
    x = torch.randn(2, 3, 4, 8, 8)
    context = torch.randn(2, 4, run.dit_config.text_dim)
    timestep = torch.tensor([900.0, 100.0])
    with torch.no_grad():  # zero-initialised: the student is T0 for every w
        want = objective.teacher.denoiser.model(x, timestep, context)
        got = student(x, timestep, context, guidance=torch.tensor([1.0, 3.0]))
    assert torch.equal(got, want)
    trainer.run(resume=False)
    guidance = objective.lanes.cond.guidance
    assert ((guidance >= 1.0) & (guidance <= 3.0)).all() and guidance.unique().numel() > 1
    output = run_stage(run, StageId("gpd", GUIDANCE_STAGE), resume=True)
    assert output.parent.name == "guidance"
    assert run.load_stage_model(StageId("gpd", GUIDANCE_STAGE)).guidance_embedding is not None
    folded = run.load_stage_model(StageId("gpd", GUIDANCE_STAGE), fold_at=2.0)
    assert folded.guidance_embedding is None


def test_halving_after_the_guidance_stage_keeps_w_as_an_input(tmp_path):
    run = guided_run(tmp_path)
    with_random_stages(run, "gpd", 0)
    run_stage(run, StageId("gpd", GUIDANCE_STAGE), resume=False)
    for stage in (1, 2):
        trainer = build_distill(run, StageId("gpd", stage))
        teacher = trainer.objective.teacher
        assert not isinstance(teacher, CFG) and teacher.model.guidance_embedding is not None
        assert trainer.model.guidance_embedding is not None
        run_stage(run, StageId("gpd", stage), resume=False)
    # The vanilla chain is unchanged: a CFG pair at the run's scale in stage 1, no input.
    with_random_stages(run, "vanilla", 0)
    vanilla = build_distill(run, StageId("vanilla", 1))
    assert vanilla.model.guidance_embedding is None
    assert isinstance(vanilla.objective.teacher, CFG)


def test_stage_guidance_list_sets_each_stage_teachers_cfg(tmp_path):
    run = micro_run(tmp_path, **{"distill.stage_guidance": [2.0, 1.25, 1.0]})
    with_random_stages(run, "gpd", 2)
    objectives = [build_distill(run, StageId("gpd", k)).objective for k in (1, 2, 3)]
    assert [o.guidance.low for o in objectives] == [2.0, 1.25, 1.0]
    assert [isinstance(o.teacher, CFG) for o in objectives] == [True, True, False]
    with pytest.raises(ValueError, match="stage_guidance needs one CFG scale > 0 per stage"):
        micro_run(tmp_path, **{"distill.stage_guidance": [2.0, 1.0]})
    with pytest.raises(ValueError, match="exclude each other"):
        micro_run(tmp_path, **{"distill.stage_guidance": [2.0, 1.0, 1.0],
                               "distill.guidance_stage": True})
    with pytest.raises(ValueError, match=r"guidance_range must be \[low, high\]"):
        micro_run(tmp_path, **{"distill.guidance_range": [1.0, float("inf")]})


@pytest.mark.slow
def test_a_guidance_stage_on_the_gpd_chain_reports_it_at_other_w(tmp_path):
    run = guided_run(tmp_path, pipeline_chains=["gpd"], **{"eval.guidance_values": [2.5]})
    assert pipeline_plan(run.config) == [StageId("gpd", s) for s in (0, "g", 1, 2, 3)]
    for sid in pipeline_plan(run.config):
        run_stage(run, sid, resume=True)
    data = json.loads((evaluate_run(run, run.data).parent / "report.json").read_text())
    rows = {row["model"]: row for row in data["rows"]}
    assert rows["GPD guidance stage@8"]["nfe"] == 8 and rows["GPD@1"]["cfg"] == "input w=1.5"
    assert rows["teacher@8 w=2.5 (ref)"]["group"] == "guidance w=2.5"
    student = rows["GPD@1 w=2.5"]
    assert student["nfe"] == 1 and student["psnr_db"] > 0 and student["cfg"] == "input w=2.5"
    assert not any(name.startswith(("vanilla", "GPD-w")) for name in rows)
