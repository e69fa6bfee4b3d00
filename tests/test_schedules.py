"""Any divisible step schedule and the horizon chain, against explicit float64 teacher steps.

The references below step the models one Euler step at a time in float64, sample by
sample, with the CFG combine written out; the trainer's targets run batched in float32
through the fused kernels (double step) or the explicit-step path (r >= 3, horizons).
"""

import copy
import json

import pytest
import torch
from builders import MICRO_TOML, losses, micro_run, random_dit, run_until_killed, with_random_stages

from gpd_model import CFG, Conditioning, sigma_grid
from gpd_train.__main__ import main
from gpd_train.config.chains import StageId
from gpd_train.config.horizon import HorizonGrid
from gpd_train.config.load import load_config
from gpd_train.errors import ConfigError
from gpd_train.infer.sample import main as sample
from gpd_train.train.builders import build_distill, stage_grid
from gpd_train.train.horizon import horizon_target
from gpd_train.train.lanes import LaneBatch, RolloutLanes
from gpd_train.train.objectives import StageGrid, rollout_target, stage_teacher

SHIFT = 3.0
HORIZON = {"horizon.horizons": [2, 3, 4], "horizon.iterations": [3, 3, 3],
           "horizon.freq_weight": [0.0, 0.0, 0.0]}


def inputs(batch: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, 4, 8, 8, generator=generator)
    context = torch.randn(batch, 5, 32, generator=generator)
    negative = torch.randn(5, 32, generator=generator)
    guidance = 1.0 + 2.0 * torch.rand(batch, generator=generator)
    return x, context, negative, guidance


def teacher(model, negative=None):
    """The stage teacher: a CFG pair around each trajectory's w, or one forward."""
    return stage_teacher(model, None if negative is None else Conditioning(negative[None]))


@torch.no_grad()
def velocity64(model, x, sigma, context, negative, w):
    """One sample's (guided) velocity in float64: u_uncond + w (u_cond - u_uncond)."""
    model = copy.deepcopy(model).double()
    t = torch.tensor([1000.0 * float(sigma)], dtype=torch.float64)
    cond = model(x[None], t, context[None].double())[0]
    if negative is None:
        return cond
    uncond = model(x[None], t, negative[None].double())[0]
    return uncond + float(w) * (cond - uncond)


def steps64(model, x, sigmas, context, negative, w):
    """Explicit Euler steps of one sample along ``sigmas`` (float64)."""
    for s_from, s_to in zip(sigmas, sigmas[1:], strict=False):
        x = x + (float(s_to) - float(s_from)) * velocity64(model, x, s_from, context, negative, w)
    return x


@pytest.mark.parametrize("ratio", [2, 3, 4])
@pytest.mark.parametrize("guided", [True, False])
def test_r_step_target_equals_r_explicit_teacher_steps(ratio, guided):
    model = random_dit(ratio)
    x, context, negative, guidance = inputs(3, seed=ratio)
    grid = StageGrid(3, SHIFT, ratio, torch.device("cpu"))
    index = torch.tensor([0, 2, 1])
    got = grid.target(teacher(model, negative if guided else None), x,
                      Conditioning(context, guidance=guidance), index)
    fine = sigma_grid(3 * ratio, SHIFT)
    for b, i in enumerate(index.tolist()):
        path = fine[ratio * i: ratio * i + ratio + 1]
        x_end = steps64(model, x[b].double(), path, context[b], negative if guided else None,
                        guidance[b])
        want = (x_end - x[b].double()) / (path[-1] - path[0])
        torch.testing.assert_close(got[b].double(), want, rtol=1e-4, atol=1e-4)


def test_two_step_target_is_the_same_by_the_fused_kernel_and_by_explicit_steps():
    model = random_dit(7)
    x, context, negative, guidance = inputs(4, seed=7)
    grid = StageGrid(4, SHIFT, 2, torch.device("cpu"))
    index = torch.tensor([0, 1, 2, 3])
    pair, cond = teacher(model, negative), Conditioning(context, guidance=guidance)
    fused = grid.target(pair, x, cond, index)
    explicit = rollout_target(pair, x, cond, torch.cat([grid.path(index), grid.path(index)[-1:]]))
    torch.testing.assert_close(fused, explicit, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("previous_jump,jump", [(1, 2), (2, 3), (3, 5)])
def test_horizon_target_is_the_previous_jump_then_explicit_cfg_teacher_steps(previous_jump,
                                                                               jump):
    """Index 0 jumps in full; 5, 6 and 7 reach the end of the 8-step grid early (the
    previous student's jump or the teacher steps stop there)."""
    previous, base = random_dit(1), random_dit(2)
    x, context, negative, guidance = inputs(4, seed=jump)
    grid = HorizonGrid(8, SHIFT, previous_jump, jump, torch.device("cpu"))
    index = torch.tensor([0, 5, 6, 7])
    previous_teacher = teacher(base if previous_jump == 1 else previous,
                               negative if previous_jump == 1 else None)
    got = horizon_target(previous_teacher, teacher(base, negative), x,
                         Conditioning(context, guidance=guidance), grid, index)
    fine = sigma_grid(8, SHIFT)
    for b, i in enumerate(index.tolist()):
        middle, end = min(i + previous_jump, 8), min(i + jump, 8)
        if previous_jump == 1:
            x_mid = steps64(base, x[b].double(), fine[i:middle + 1], context[b], negative,
                            guidance[b])
        else:  # the previous student: one unguided jump
            x_mid = x[b].double() + (fine[middle] - fine[i]) * velocity64(
                previous, x[b].double(), fine[i], context[b], None, 1.0)
        x_end = steps64(base, x_mid, fine[middle:end + 1], context[b], negative, guidance[b])
        want = (x_end - x[b].double()) / (fine[end] - fine[i])
        # float32 rounding of x, over the short last sigma gaps of the grid
        torch.testing.assert_close(got[b].double(), want, rtol=1e-3,
                                   atol=1e-4 * float(want.abs().max()))


def test_horizon_stage_starts_as_its_stage_teacher_and_steps_with_t0_at_the_annealed_scale(
        tmp_path):
    run = micro_run(tmp_path, **HORIZON)
    with_random_stages(run, "horizon", 1)
    trainer = build_distill(run, StageId("horizon", 2))
    objective = trainer.objective
    previous = run.load_stage_model(StageId("horizon", 1)).state_dict()
    t0 = run.load_stage_model(StageId("horizon", 0)).state_dict()
    assert all(torch.equal(previous[k], v) for k, v in trainer.model.state_dict().items())
    assert all(torch.equal(previous[k], v)
               for k, v in objective.teacher.model.state_dict().items())
    assert all(torch.equal(t0[k], v)
               for k, v in objective.base.denoiser.model.state_dict().items())
    scales = run.config.chain("horizon").stage_guidance  # 1.5 -> 1.05 over three stages
    assert scales == pytest.approx([1.5, 1.275, 1.05])
    assert objective.guidance.low == objective.guidance.high == pytest.approx(scales[1])
    assert not isinstance(objective.teacher, CFG) and isinstance(objective.base, CFG)
    assert (objective.grid.previous_jump, objective.grid.jump) == (2, 3)
    # one unguided student forward, one CFG step (2 forwards), restarts: 3/8 x 2 steps x 2
    assert run.plan(StageId("horizon", 2)).teacher_forwards == pytest.approx(1 + 2 * (1 + 0.375))


def test_lanes_keep_their_phase_and_cover_every_fine_start():
    """A fake step adds 1 per fine step, so every lane's x must equal its index."""
    def fresh(count):
        return torch.zeros(count, 1), Conditioning(torch.zeros(count, 1, 1),
                                                   guidance=torch.ones(count))

    def step(batch: LaneBatch):
        return batch.x + 1

    lanes = RolloutLanes(batch_size=3, groups=2, steps=8, fresh=fresh, device=torch.device("cpu"),
                         stride=3)
    seen, previous = set(), {}
    for update in range(40):
        batch = lanes.current(step)
        group = update % 2
        if group in previous:  # each lane moved 3 on, a restarted one to its overshoot
            assert torch.equal(batch.index, (previous[group] + 3) % 8), update
            seen |= set(batch.index.tolist())  # not the first update's: its spread is given
        previous[group] = batch.index
        assert torch.equal(batch.x[:, 0], batch.index.float())
        lanes.advance(batch.x + 3, step)  # a jump of 3 (past the end: replaced by fresh noise)
    assert seen == set(range(8))


@pytest.mark.parametrize("chain,stage,overrides", [
    ("horizon", 2, HORIZON),
    ("gpd", 1, {"steps": [12, 4, 2, 1]}),  # a ratio-3 stage
])
def test_resume_mid_stage_is_bit_identical(tmp_path, monkeypatch, chain, stage, overrides):
    table = "horizon" if chain == "horizon" else "distill"
    overrides = {**overrides, f"{table}.iterations": [7, 7, 7]}

    def build(folder):
        run = micro_run(folder, **overrides)
        with_random_stages(run, chain, stage - 1)
        return run, build_distill(run, StageId(chain, stage))

    _, reference = build(tmp_path / "a")
    reference.run(resume=False)
    broken, trainer = build(tmp_path / "b")
    run_until_killed(trainer, monkeypatch, at_step=5)
    resumed = build_distill(broken, StageId(chain, stage))
    resumed.run(resume=True)
    assert losses(resumed) == losses(reference)
    for key, value in reference.ema.state_dict().items():
        assert torch.equal(resumed.ema.state_dict()[key], value)


def test_a_ratio_three_stage_learns_on_its_teachers_grid(tmp_path):
    run = micro_run(tmp_path, steps=[12, 4, 2, 1])
    grid = stage_grid(run, StageId("gpd", 1))
    assert (grid.steps, grid.fine_steps) == (4, 3)
    torch.testing.assert_close(grid.path(torch.tensor([1]))[:, 0],
                               sigma_grid(12, run.config.resolved_shift).float()[3:7])
    assert run.plan(StageId("gpd", 1)).teacher_forwards == 6  # 3 CFG steps at w = 1.5
    assert run.plan(StageId("gpd", 2)).teacher_forwards == 2  # 2 unguided steps


@pytest.mark.parametrize("overrides,needle", [
    ({"steps": [48, 20]}, "stage 1 has 48 -> 20"),
    ({"steps": [8, 8]}, "stage 1 has 8 -> 8"),
    ({"steps": [8, 0]}, "steps must list >= 2 positive ints"),
    ({**HORIZON, "horizon.horizons": [3, 2, 4]}, "horizon.horizons must be increasing"),
    ({**HORIZON, "horizon.horizons": [1, 2, 4]}, "horizon.horizons must be increasing"),
    ({**HORIZON, "horizon.iterations": [3, 3]}, "horizon.iterations needs one entry per stage"),
    ({**HORIZON, "horizon.lora_rank": 4}, "horizon.lora_rank must be 0"),
    ({**HORIZON, "horizon.guidance_anneal": [2.0]}, "guidance_anneal must be [from, to]"),
    ({**HORIZON, "horizon.horizons": [2, 3], "horizon.iterations": [3, 3],
      "horizon.freq_weight": [0.0, 0.0], "pipeline_chains": ["gpd", "horizon"]},
     "horizon.horizons ends at 3, which does not divide the teacher's 8 steps"),
])
def test_bad_schedules_are_refused_naming_the_option(tmp_path, overrides, needle):
    with pytest.raises(ConfigError) as caught:
        load_config(None, {"run_dir": str(tmp_path / "run"), "steps": [8, 4, 2, 1],
                           "distill.iterations": [1, 1, 1], "vanilla.iterations": [1, 1, 1],
                           **overrides})
    assert needle in str(caught.value)


def test_the_horizon_chain_runs_from_the_cli_and_its_intermediate_students_are_not_sampled(
        micro, tmp_path, capsys):
    toml = tmp_path / "horizon.toml"
    toml.write_text(MICRO_TOML.replace('pipeline_chains = ["gpd", "vanilla"]',
                                       'pipeline_chains = ["gpd", "horizon"]')
                    + "[horizon]\nhorizons = [2, 3, 4]\niterations = [2, 2, 2]\n"
                      "freq_weight = [0.0, 0.0, 1.0]\n")
    args = [*micro, "--config", str(toml)]
    assert main(args) == 0
    report = json.loads((tmp_path / "run" / "eval" / "report.json").read_text())
    rows = {row["model"]: row for row in report["rows"]}
    assert rows["GPD-horizon@2"]["nfe"] == 2 and "teacher@2 naive" in rows
    pairs = {(c["a"], c["b"]) for c in report["comparisons"]}
    assert {("GPD-horizon@2", "teacher@2 naive"), ("GPD-horizon@2", "teacher@4 naive")} <= pairs
    record = json.loads((tmp_path / "run" / "horizon" / "stage2" / "done.json").read_text())
    assert record["options"]["horizon"] == 3 and record["options"]["fine_steps"] == 8
    capsys.readouterr()
    out = tmp_path / "samples"
    assert sample(["--checkpoint", str(tmp_path / "run"), "--chain", "horizon", "--stage", "2",
                   "--out", str(out), "--device", "cpu"]) == 2
    assert "jumps 3 of the teacher's 8 steps, which does not divide them" in capsys.readouterr().err
    assert not out.exists()
