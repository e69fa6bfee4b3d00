"""Distilling a Wan2.2 expert pair with the trainer (gpd_train.train.pair): a tiny two-expert
folder imports as stage 0, stage 1 trains each expert in its own phase, a kill in the low
expert's phase resumes to the same weights, and the pair stage samples as a pair."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
from builders import random_dit  # noqa: E402
from realscale_fixtures import VIDEO, build_wan22_folder, pair_run_args  # noqa: E402

from gpd_model import (  # noqa: E402
    CFG,
    DiTDenoiser,
    ExpertPair,
    WanDiT,
    load_checkpoint,
    shift_sigma,
    sigma_grid,
)
from gpd_train.__main__ import main as train_main  # noqa: E402
from gpd_train.config.chains import StageId  # noqa: E402
from gpd_train.config.load import load_run_config  # noqa: E402
from gpd_train.data.procedural import ProceduralVideos  # noqa: E402
from gpd_train.eval.evaluate import stage_denoiser  # noqa: E402
from gpd_train.infer import sample  # noqa: E402
from gpd_train.infer.export import cli as export  # noqa: E402
from gpd_train.run.experts import BOUNDARY_KEY, expert_phases, split_experts  # noqa: E402
from gpd_train.run.files import read_metadata  # noqa: E402
from gpd_train.run.folder import RunFolder  # noqa: E402
from gpd_train.run.wan_folder import expert_folders  # noqa: E402
from gpd_train.train import pair, tiny_moe  # noqa: E402
from gpd_train.train.objectives import (  # noqa: E402
    FlowMatching,  # noqa: E402
    GuidanceRange,
    StageGrid,
)

# 6 student steps at shift 5: starts 1, .96, .91, .83 | .71, .5. The boundary leaves four
# starts to the high expert, two to the low one, and the teacher's 12-step grid has a point
# (.78) inside the step .83 -> .71: that target's two teacher steps cross the boundary.
BOUNDARY = 0.8
TOML = """\
steps = [12, 6]
shift = 5.0
batch_size = 2
checkpoint_every = 1
pipeline_chains = ["gpd"]
[distill]
iterations = [6]
freq_weight = [0.0]
state_source = "student"
stage_guidance = [2.0]
"""
# Our sampler through the student pair vs WanPipeline on its export (float32): the task's bound.
PIPELINE_ATOL = 1e-4


def _args(*values: object) -> list[str]:
    return [str(v) for v in values]


@pytest.fixture(scope="module")
def wan22(tmp_path_factory):
    return build_wan22_folder(tmp_path_factory.mktemp("wan22") / "Wan2.2-T2V-tiny-Diffusers",
                              boundary_ratio=BOUNDARY)


@pytest.fixture
def pair_run(wan22, tmp_path):
    """The CLI arguments of a pair run and its folder, stage 0 imported."""
    args = pair_run_args(wan22, tmp_path, TOML)
    assert train_main(["--stage", "0", *args]) == 0
    return args, tmp_path / "run"


@pytest.fixture(scope="module")
def trained(wan22, tmp_path_factory):
    """A pair run's folder with stage 1 trained without interruption."""
    folder = tmp_path_factory.mktemp("trained")
    args = pair_run_args(wan22, folder, TOML)
    assert train_main(["--stage", "0", *args]) == 0
    assert train_main(["--stage", "1", *args]) == 0
    return folder / "run"


def _experts(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    return split_experts(load_file(str(path)), path)


def test_phases_split_the_starts_and_iterations_at_the_boundary():
    starts = sigma_grid(6, 5.0).float()[:-1]
    high, low = expert_phases(starts, BOUNDARY, 6)
    assert (high.name, high.first, high.count, high.iterations) == ("high", 0, 4, 4)
    assert (low.name, low.first, low.count, low.iterations) == ("low", 4, 2, 2)
    # A boundary below every start: the low expert has no phase to train.
    assert [p.iterations for p in expert_phases(starts, 0.1, 6)] == [6, 0]


def test_a_phase_trains_its_expert_on_its_starts_against_the_full_grids_targets():
    """The low phase (starts 4, 5 of 6): fresh lanes carried from noise through starts
    0..3 by the lead-in (the finished high expert), the loss on the full grid's targets."""
    cpu = torch.device("cpu")
    data = ProceduralVideos(32, frames=4, size=8, seed=1)
    teacher = CFG(ExpertPair(DiTDenoiser(random_dit(4)), DiTDenoiser(random_dit(5)), BOUNDARY),
                  data.negative)
    lead_in, student = random_dit(6), random_dit(7)
    grid = StageGrid(6, 5.0, 2, cpu)
    objective = pair.PhaseDistillation(
        first=4, count=2, lead_in=DiTDenoiser(lead_in), student=DiTDenoiser(student),
        teacher=teacher, data=data, generator=torch.Generator().manual_seed(3), grid=grid,
        guidance=GuidanceRange(2.0, 2.0), source="student", batch_size=2, freq_weight=0.0,
        freq_params={}, device=cpu, precision="fp32")
    inputs = objective.prepare(1)
    assert inputs["index"].tolist() == [0, 1]  # the phase's own starts, spread over them

    generator = torch.Generator().manual_seed(3)  # the same draws, by hand
    cond, _ = data.draw(generator, 2, with_latents=False)
    x = torch.randn((2, *data.latent_shape), generator=generator)
    s = grid.student
    with torch.no_grad():
        for i in range(4):
            x = x + (s[i + 1] - s[i]) * lead_in(x, torch.full((2,), 1000 * s[i]), cond.text)
        x[1] += (s[5] - s[4]) * student(x[1:], torch.full((1,), 1000 * s[4]), cond.text[1:])[0]
    torch.testing.assert_close(inputs["x"], x, rtol=1e-5, atol=1e-6)

    loss, _, _ = objective.forward(inputs)
    cond = objective.lanes.current(objective._rollout_step).cond
    full = torch.tensor([4, 5])
    with torch.no_grad():
        want = (student(x, 1000 * s[full], cond.text)
                - grid.target(teacher, x, cond, full)).square().mean()
    torch.testing.assert_close(loss.detach(), want, rtol=1e-5, atol=1e-7)


def test_stage0_imports_both_experts(wan22, pair_run):
    _, run = pair_run
    output = run / "stage0" / "model.safetensors"
    assert read_metadata(output)[BOUNDARY_KEY] == repr(BOUNDARY)
    folders = expert_folders(wan22)
    for state, folder in zip(_experts(output), (folders.high, folders.low), strict=True):
        model = WanDiT(folders.config)
        load_checkpoint(model, folder)
        assert state.keys() == model.state_dict().keys()
        assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    for component in ("transformer", "transformer_2"):  # the stage as WanPipeline parts
        assert (run / "stage0" / "diffusers" / component / "config.json").is_file()


def test_each_expert_moves_only_in_its_phase(trained):
    run = trained
    teacher_high, teacher_low = _experts(run / "stage0" / "model.safetensors")
    high, low = _experts(run / "stage1" / "model.safetensors")
    # The high expert as its phase left it: the low phase did not move it.
    phase_high = load_file(str(run / "stage1" / "high" / "expert.safetensors"))
    assert all(torch.equal(high[k], v) for k, v in phase_high.items())
    assert any(not torch.equal(high[k], v) for k, v in teacher_high.items())
    assert any(not torch.equal(low[k], v) for k, v in teacher_low.items())
    # Each phase's checkpoints (its trained weights, EMA and optimizer) hold one expert.
    for expert, state in (("high", teacher_high), ("low", teacher_low)):
        latest = (run / "stage1" / expert / "ckpt" / "latest").read_text().strip()
        saved = load_file(str(run / "stage1" / expert / "ckpt" / latest / "model.safetensors"))
        assert saved.keys() == state.keys()
        records = [json.loads(line) for line in
                   (run / "stage1" / expert / "metrics.jsonl").read_text().splitlines()]
        assert [r["stage"] for r in records] == [f"stage1/{expert}"] * {"high": 4, "low": 2}[
            expert]
    record = json.loads((run / "stage1" / "done.json").read_text())
    assert record["iterations"] == 6 and record["teacher"] == "stage0"
    for expert, starts in (("high", [0, 4]), ("low", [4, 2])):  # the report's expert rows
        phase = record["experts"][expert]
        losses = [json.loads(line)["loss"] for line in
                  (run / "stage1" / expert / "metrics.jsonl").read_text().splitlines()]
        assert phase["starts"] == starts and phase["iterations"] == len(losses)
        assert phase["loss_curve"] == losses  # fewer than ten steps: one per tenth
        assert phase["final_loss_mean20"] == pytest.approx(sum(losses) / len(losses))


def test_a_kill_in_the_low_phase_resumes_to_the_same_weights(pair_run, trained, monkeypatch,
                                                            capsys):
    args, run = pair_run
    seen: list[tuple[str, int]] = []
    real_prepare = pair.PhaseDistillation.prepare

    def crash(self, step):
        seen.append(("high" if self.first == 0 else "low", step))
        if self.first > 0 and step == 2:
            raise KeyboardInterrupt("simulated kill")
        return real_prepare(self, step)

    monkeypatch.setattr(pair.PhaseDistillation, "prepare", crash)
    with pytest.raises(KeyboardInterrupt):
        train_main(["--stage", "1", *args])
    # The high expert's four starts first, then the low one's.
    assert seen == [("high", s) for s in range(1, 5)] + [("low", 1), ("low", 2)]
    assert (run / "stage1" / "high" / "expert.safetensors").is_file()
    assert not (run / "stage1" / "done.json").exists()
    monkeypatch.setattr(pair.PhaseDistillation, "prepare", real_prepare)
    capsys.readouterr()
    assert train_main(["--stage", "1", *args]) == 2  # checkpoints: --resume or --restart
    assert "stage1 has checkpoints up to step-00000001 in" in capsys.readouterr().err
    assert train_main(["--stage", "1", "--resume", *args]) == 0
    assert "stage1/low] resumed from step 1" in capsys.readouterr().out
    resumed = load_file(str(run / "stage1" / "model.safetensors"))
    finished = load_file(str(trained / "stage1" / "model.safetensors"))
    assert resumed.keys() == finished.keys()
    assert all(torch.equal(resumed[k], v) for k, v in finished.items())


def test_the_pair_stage_exports_as_a_wan22_folder_that_wanpipeline_runs_as_we_sample(
        wan22, trained, tmp_path):
    from diffusers import WanPipeline

    texts = ["a red cat runs", "the dog jumps over water"]
    out = tmp_path / "samples"
    assert sample.main(_args("--checkpoint", trained, "--model", wan22, "--prompt", texts[0],
                             "--prompt", texts[1], "--seed", 7, "--device", "cpu", "--out", out,
                             "--height", VIDEO["height"], "--width", VIDEO["width"],
                             "--frames", VIDEO["frames"])) == 0
    ours = load_file(str(out / "latents.safetensors"))["latents"]
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["steps"], summary["boundary"], summary["nfe_per_video"]) == (6, BOUNDARY, 6)

    student = tmp_path / "student"
    assert export.main(_args("--run", trained, "--base", wan22, "--out", student)) == 0
    index = json.loads((student / "model_index.json").read_text())
    assert index["boundary_ratio"] == BOUNDARY and index["transformer_2"][1] == \
        "WanTransformer3DModel"
    pipe = WanPipeline.from_pretrained(str(student))
    theirs = pipe(prompt=texts, num_inference_steps=6, guidance_scale=1.0,
                  num_frames=VIDEO["frames"], height=VIDEO["height"], width=VIDEO["width"],
                  generator=torch.Generator().manual_seed(7), output_type="latent").frames
    print("max abs difference to WanPipeline:", float((ours - theirs).abs().max()))
    torch.testing.assert_close(theirs, ours, atol=PIPELINE_ATOL, rtol=0)
    # Both experts ran: the low one's weights swapped for the high one's change the video.
    pipe.transformer_2 = pipe.transformer
    swapped = pipe(prompt=texts, num_inference_steps=6, guidance_scale=1.0,
                   num_frames=VIDEO["frames"], height=VIDEO["height"], width=VIDEO["width"],
                   generator=torch.Generator().manual_seed(7), output_type="latent").frames
    assert (swapped - theirs).abs().max() > 10 * PIPELINE_ATOL


def test_a_pair_runs_stage0_samples_with_a_cfg_scale_per_expert_as_its_folder(
        wan22, trained, tmp_path):
    """--guidance-2 guides the low expert of a pair run's stage 0 as of the Wan2.2 folder."""
    latents = []
    for checkpoint in (trained, wan22):
        out = tmp_path / checkpoint.name
        assert sample.main(_args("--checkpoint", checkpoint, "--stage", 0, "--model", wan22,
                                 "--prompt", "a red cat runs", "--steps", 6, "--shift", 5.0,
                                 "--guidance", 5.0, "--guidance-2", 2.0, "--seed", 7,
                                 "--device", "cpu", "--out", out, "--height", VIDEO["height"],
                                 "--width", VIDEO["width"], "--frames", VIDEO["frames"])) == 0
        assert json.loads((out / "summary.json").read_text())["guidance_2"] == 2.0
        latents.append(load_file(str(out / "latents.safetensors"))["latents"])
    assert torch.equal(latents[0], latents[1])


def test_the_pair_stage_exports_for_comfyui_as_one_file_per_expert(wan22, trained, tmp_path):
    out = tmp_path / "wan22_student"
    assert export.main(_args("--run", trained, "--format", "comfyui", "--out", out)) == 0
    names = sorted(p.name for p in out.glob("*.safetensors"))
    assert names == ["wan22_student_high_noise.safetensors",
                     "wan22_student_low_noise.safetensors"]
    for name, state in zip(("high", "low"), _experts(trained / "stage1" / "model.safetensors"),
                           strict=True):
        model = WanDiT(expert_folders(wan22).config)
        load_checkpoint(model, out / f"wan22_student_{name}_noise.safetensors")
        assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    record = json.loads((out / "gpd_export.json").read_text())
    assert record["boundary"] == BOUNDARY


@pytest.mark.parametrize("flags,why", [
    (["--validate-every", "2"], "with --log / --validate-every"),
])
def test_what_a_pair_stage_does_not_support_is_refused_before_work(pair_run, capsys, flags,
                                                                   why):
    args, run = pair_run
    capsys.readouterr()
    assert train_main(["--stage", "1", *args, *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert "stage1 distils a Wan2.2 expert pair" in err and f"not supported {why}" in err
    assert "\n" not in err
    assert not (run / "stage1").exists()


def test_the_evaluation_samples_a_pair_stage_through_both_experts(trained):
    run = RunFolder(load_run_config(trained, device="cpu"))
    denoiser = stage_denoiser(run, StageId("gpd", 1))
    assert isinstance(denoiser, ExpertPair) and denoiser.boundary == BOUNDARY
    for net, state in zip((denoiser.high.model, denoiser.low.model),
                          _experts(trained / "stage1" / "model.safetensors"), strict=True):
        assert all(torch.equal(net.state_dict()[k], v) for k, v in state.items())


# -- tiny-moe: the two-expert tiny teacher -------------------------------------------------

@pytest.mark.parametrize("expert", ["high", "low"])
def test_an_expert_is_fine_tuned_on_its_side_of_the_boundary_alone(expert):
    shift = 3.0
    t_range = tiny_moe.expert_t_ranges(tiny_moe.DEFAULT_BOUNDARY, shift)[expert]
    t = torch.tensor(t_range[1] if expert == "low" else t_range[0], dtype=torch.float64)
    assert float(shift_sigma(t, shift)) == pytest.approx(tiny_moe.DEFAULT_BOUNDARY, abs=1e-12)
    data = ProceduralVideos(32, frames=4, size=8, seed=1)
    objective = FlowMatching(model=random_dit(0), data=data,
                             generator=torch.Generator().manual_seed(0), batch_size=256,
                             shift=shift, cfg_dropout=0.1, device=torch.device("cpu"),
                             precision="fp32", t_range=t_range)
    sigma = objective.prepare(1)["sigma"]
    side = sigma >= tiny_moe.DEFAULT_BOUNDARY
    assert bool(side.all() if expert == "high" else (~side).all())
    assert float(sigma.max() - sigma.min()) > 0.25  # its whole side, not a point of it


def test_tiny_moe_writes_a_wan22_folder_of_two_fine_tuned_experts(tmp_path):
    (tmp_path / "moe.toml").write_text(f"""\
run_dir = "{tmp_path / 'run'}"
teacher = "{tmp_path / 'teacher'}"
preset = "tiny"
batch_size = 2
checkpoint_every = 100
[stage0]
iterations = 3
""")
    assert tiny_moe.main(_args("--config", tmp_path / "moe.toml", "--expert-iterations", 2,
                               "--threads", 1)) == 0
    experts = expert_folders(tmp_path / "teacher")
    assert experts is not None and experts.boundary == tiny_moe.DEFAULT_BOUNDARY
    base = load_file(str(tmp_path / "teacher.work" / "base-run" / "stage0" /
                         "model.safetensors"))
    models = []
    for folder in (experts.high, experts.low):
        model = WanDiT(experts.config)
        load_checkpoint(model, folder)
        models.append(model.state_dict())
        assert any(not torch.equal(model.state_dict()[k], v) for k, v in base.items())
    assert any(not torch.equal(models[0][k], v) for k, v in models[1].items())
