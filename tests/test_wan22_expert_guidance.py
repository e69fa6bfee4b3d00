"""A stage-teacher CFG scale per expert of a Wan2.2 pair (``stage_guidance_2``, the training
side of the sampler's ``--guidance-2``): the targets guide the low expert's steps by it and
the high expert's by ``stage_guidance``; it is recorded, and refused on a one-model run."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from realscale_fixtures import PAIR_PROMPTS, build_wan22_folder, pair_run_args  # noqa: E402

from gpd_model import Conditioning, sigma_grid  # noqa: E402
from gpd_train.__main__ import main as train_main  # noqa: E402
from gpd_train.config.chains import StageId  # noqa: E402
from gpd_train.config.load import load_config, load_run_config  # noqa: E402
from gpd_train.errors import ConfigError  # noqa: E402
from gpd_train.train import pair  # noqa: E402
from gpd_train.train.builders import TrainingRun, stage_grid, stage_recipe  # noqa: E402

BOUNDARY = 0.8
HIGH, LOW = 2.0, 4.0
# 6 student steps at shift 5 on the 12-step teacher grid: student start 3 (.83) has its
# teacher steps at .83 (high expert) and .78 (low): one target crosses the boundary.
TOML = f"""\
steps = [12, 6]
shift = 5.0
batch_size = 2
checkpoint_every = 1
pipeline_chains = ["gpd"]
[distill]
iterations = [2]
freq_weight = [0.0]
state_source = "student"
stage_guidance = [{HIGH}]
stage_guidance_2 = [{LOW}]
"""


@pytest.fixture(scope="module")
def run_args(tmp_path_factory):
    folder = tmp_path_factory.mktemp("expert-guidance")
    wan22 = build_wan22_folder(folder / "Wan2.2-T2V-tiny-Diffusers", boundary_ratio=BOUNDARY)
    args = pair_run_args(wan22, folder, TOML, PAIR_PROMPTS[:2])
    assert train_main(["--stage", "0", *args]) == 0
    return args, folder / "run"


def test_the_targets_guide_each_teacher_step_by_its_experts_scale(run_args):
    """Double-step targets by hand: each of the two teacher Euler steps taken by the expert
    of its sigma, guided by that expert's scale (u_neg + w (u_pos - u_neg))."""
    _, folder = run_args
    run = TrainingRun(load_run_config(folder, device="cpu"))
    sid = StageId("gpd", 1)
    teacher, _ = pair.pair_teacher(run, sid)
    grid = stage_grid(run, sid)
    index = torch.tensor([0, 3, 4, 5])  # starts 1, .83 (crossing), .71, .5
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(4, *run.data.latent_shape, generator=generator)
    text = torch.randn(4, *run.data.negative.text.shape[1:], generator=generator)
    with torch.no_grad():
        ours = grid.target(teacher, x, Conditioning(text), index)

    high, low = run.load_stage_experts(StageId("gpd", 0))
    negative = run.data.negative.text.expand(1, -1, -1)
    fine = sigma_grid(12, 5.0).float()

    def guided(x_i: torch.Tensor, s: torch.Tensor, text_i: torch.Tensor) -> torch.Tensor:
        model, w = (high, HIGH) if float(s) >= BOUNDARY else (low, LOW)
        t = torch.full((1,), 1000 * float(s))
        u_pos, u_neg = model(x_i, t, text_i), model(x_i, t, negative)
        return u_neg + w * (u_pos - u_neg)

    want, scales_used = [], []
    with torch.no_grad():
        for i, start in enumerate(index.tolist()):
            s_a, s_b, s_c = fine[2 * start], fine[2 * start + 1], fine[2 * start + 2]
            x_a = x[i:i + 1]
            x_b = x_a + (s_b - s_a) * guided(x_a, s_a, text[i:i + 1])
            x_c = x_b + (s_c - s_b) * guided(x_b, s_b, text[i:i + 1])
            want.append((x_c - x_a) / (s_c - s_a))
            scales_used.append([float(s) >= BOUNDARY for s in (s_a, s_b)])
    assert scales_used == [[True, True], [True, False], [False, False], [False, False]]
    torch.testing.assert_close(ours, torch.cat(want), rtol=1e-4, atol=1e-5)


def test_the_low_scale_is_recorded_and_a_change_refused_on_resume(run_args, capsys):
    args, folder = run_args
    assert train_main(["--stage", "1", *args]) == 0
    record = json.loads((folder / "stage1" / "done.json").read_text())
    assert (record["options"]["guidance"], record["options"]["guidance_2"]) == (HIGH, LOW)
    run = TrainingRun(load_run_config(folder, device="cpu"))
    assert stage_recipe(run, StageId("gpd", 1))["distill.stage_guidance_2[0]"] == LOW
    capsys.readouterr()
    assert train_main(["--stage", "1", "--resume", "--stage-guidance-2", "3", *args]) == 2
    err = capsys.readouterr().err
    assert f"guidance_2 {LOW!r} in" in err and "3.0 in this run" in err


def test_the_low_scale_defaults_to_the_high_one():
    config = load_config(None, {"distill.stage_guidance": [3.0, 1.5, 1.0]})
    assert config.chain("gpd").stage_guidance_2 == [3.0, 1.5, 1.0]
    given = load_config(None, {"distill.stage_guidance_2": [5.0, 1.0, 1.0]})
    assert given.chain("gpd").stage_guidance_2 == [5.0, 1.0, 1.0]
    assert given.chain("gpd").stage_guidance != given.chain("gpd").stage_guidance_2


def test_a_low_expert_scale_on_a_one_model_run_is_refused_in_one_line(tmp_path, capsys):
    assert train_main(["--stage", "1", "--run-dir", str(tmp_path / "run"), "--device", "cpu",
                       "--stage-guidance-2", "2", "1", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "distill.stage_guidance_2 (--stage-guidance-2) is the low-noise expert's" in err
    assert "\n" not in err and not (tmp_path / "run").exists()


@pytest.mark.parametrize("overrides,why", [
    ({"distill.stage_guidance_2": [2.0]}, "needs one CFG scale > 0 per stage (3), got [2.0]"),
    ({"distill.stage_guidance_2": [2.0, 0.0, 1.0]}, "needs one CFG scale > 0 per stage"),
    ({"guided.stage_guidance_2": [2.0, 1.0, 1.0]}, "and guided.guidance_stage exclude each"),
])
def test_bad_low_scales_are_refused_in_one_line(overrides, why):
    with pytest.raises(ConfigError) as caught:
        load_config(None, overrides)
    assert why in str(caught.value) and "\n" not in str(caught.value)
