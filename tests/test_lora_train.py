"""LoRA distillation in the trainer: the step, the stage outputs, resume, the chain end to end."""

from __future__ import annotations

import json

import pytest
import torch
from builders import (
    finish_random_adapter,
    finish_random_guided_adapter,
    losses,
    micro_run,
    run_until_killed,
    with_random_stages,
)
from safetensors.torch import load_file

from gpd_model import CFG, Conditioning
from gpd_train.config.chains import GUIDANCE_STAGE, StageId
from gpd_train.config.settings import LoraSpec
from gpd_train.run.files import CheckpointError
from gpd_train.run.lora import (
    BASE,
    STUDENT,
    TEACHER,
    adapter_from_params,
    adapter_shapes,
    merge_adapter,
)
from gpd_train.run.records import RunFolderError
from gpd_train.train.builders import TrainingRun, build_distill
from gpd_train.train.objectives import stage_teacher, teacher_target
from gpd_train.train.pipeline import run_stage

pytest.importorskip("peft")

LORA = {"distill.lora_rank": 2, "distill.lora_alpha": 4.0}


def lora_run(tmp_path, **overrides):
    return micro_run(tmp_path, **{**LORA, **overrides})


@pytest.mark.parametrize("stage", [1, 2])
def test_lora_step_trains_the_student_adapter_only(tmp_path, stage):
    run = lora_run(tmp_path)
    with_random_stages(run, "gpd", 0)
    if stage == 2:
        finish_random_adapter(run, "gpd", 1, seed=5)
    trainer = build_distill(run, StageId("gpd", stage))
    model, teacher = trainer.model, trainer.objective.teacher
    assert isinstance(teacher, CFG) == (stage == 1)  # CFG only from T0 (w = 1.5)
    teacher = teacher.denoiser if stage == 1 else teacher
    assert teacher.model is model  # one model: the teacher is an adapter switch on it
    assert teacher.adapter == (BASE if stage == 1 else TEACHER)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    trainer.iterations = 2
    trainer.run(resume=False)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(before[k], v)}
    assert changed and all(f".{STUDENT}." in k for k in changed)
    assert set(trainer.ema.state_dict()) == {k for k, p in model.named_parameters()
                                             if p.requires_grad}


def test_lora_teacher_target_equals_a_separate_merged_teacher(tmp_path):
    """The target the LoRA trainer regresses on = the full-weight teacher's target."""
    run = lora_run(tmp_path)
    with_random_stages(run, "gpd", 0)
    adapter = finish_random_adapter(run, "gpd", 1, seed=6)
    trainer = build_distill(run, StageId("gpd", 2))
    merged_teacher = run.load_stage_model(StageId("gpd", 1))  # stage 0 + adapter 1, merged
    spec = run.lora_spec(StageId("gpd", 1))
    torch.testing.assert_close(
        merged_teacher.state_dict()["blocks.0.ffn.0.weight"],
        merge_adapter(run.load_stage_model(StageId("gpd", 0)), adapter, spec, "a").state_dict()[
            "blocks.0.ffn.0.weight"])
    grid = trainer.objective.grid
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, *run.data.latent_shape, generator=generator)
    cond, _ = run.data.draw(generator, 3, with_latents=False)
    index = torch.tensor([0, 1, 0])
    cond = Conditioning(cond.text, guidance=torch.ones(3))
    with torch.no_grad():
        ours = teacher_target(trainer.objective.teacher, x, cond, *grid.sigmas(index))
        want = teacher_target(stage_teacher(merged_teacher), x, cond, *grid.sigmas(index))
    torch.testing.assert_close(ours, want, rtol=1e-5, atol=1e-5)
    assert all(p.requires_grad == (f".{STUDENT}." in k)
               for k, p in trainer.model.named_parameters())  # restored after the switch


def test_lora_resume_gives_the_same_losses_as_an_uninterrupted_run(tmp_path, monkeypatch):
    def build(folder):
        run = lora_run(folder, **{"distill.iterations": [4, 7, 4]})
        with_random_stages(run, "gpd", 0)
        finish_random_adapter(run, "gpd", 1, seed=7)
        return run, build_distill(run, StageId("gpd", 2))

    _, reference = build(tmp_path / "a")
    reference.run(resume=False)
    broken, trainer = build(tmp_path / "b")
    run_until_killed(trainer, monkeypatch, at_step=5)
    # The checkpoint holds the student adapter and its EMA, not the base or the teacher.
    saved = trainer.checkpoints.latest()
    for part in ("model", "ema"):
        keys = set(load_file(str(saved / f"{part}.safetensors")))
        assert keys == set(trainer.ema.state_dict()) and all(f".{STUDENT}." in k for k in keys)
    resumed = build_distill(broken, StageId("gpd", 2))
    resumed.run(resume=True)
    assert losses(resumed) == losses(reference)
    for key, value in reference.ema.state_dict().items():
        assert torch.equal(resumed.ema.state_dict()[key], value)


def test_lora_chain_end_to_end(tmp_path):
    run = lora_run(tmp_path)
    for stage in range(4):
        run_stage(run, StageId("gpd", stage), resume=False)
    spec = run.lora_spec(StageId("gpd", 3))
    for stage in (1, 2, 3):
        folder = run.stage_folder(StageId("gpd", stage))
        output = load_file(str(folder / "model.safetensors"))
        assert {k: tuple(v.shape) for k, v in output.items()} == adapter_shapes(
            run.new_model(), spec)  # the adapter alone, not a model
        record = json.loads((folder / "done.json").read_text())
        assert record["options"]["lora"] == {"rank": 2, "alpha": 4.0,
                                             "targets": list(spec.targets)}
    # The final student loads as stage 0 + its adapter, merged.
    merged = run.load_stage_model(StageId("gpd", 3))
    want = merge_adapter(run.load_stage_model(StageId("gpd", 0)),
                         load_file(str(run.stage_folder(StageId("gpd", 3)) / "model.safetensors")),
                         spec, "s3")
    for key, value in want.state_dict().items():
        assert torch.equal(merged.state_dict()[key], value)


def test_lora_stage_refuses_a_teacher_with_full_weights_or_another_rank(tmp_path):
    with_random_stages(micro_run(tmp_path), "gpd", 1)  # stage 1 with full weights
    run = lora_run(tmp_path)
    with pytest.raises(RunFolderError, match="holds full weights"):
        build_distill(run, StageId("gpd", 2))
    other = lora_run(tmp_path / "other")
    with_random_stages(other, "gpd", 0)
    finish_random_adapter(other, "gpd", 1, seed=8)
    changed = lora_run(tmp_path / "other", **{"distill.lora_rank": 3})
    with pytest.raises(RunFolderError, match="rank 2.*asks for rank 3"):
        build_distill(changed, StageId("gpd", 2))


def test_corrupt_adapter_output_is_refused(tmp_path):
    run = lora_run(tmp_path)
    with_random_stages(run, "gpd", 0)
    finish_random_adapter(run, "gpd", 1, seed=9)
    path = run.stage_folder(StageId("gpd", 1)) / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-8:] = b"\xff" * 8
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt"):
        run.load_stage_model(StageId("gpd", 1))
    with pytest.raises(CheckpointError, match="corrupt"):
        build_distill(run, StageId("gpd", 2))


def test_lora_spec_round_trip_in_run_metadata(tmp_path):
    run = lora_run(tmp_path)
    meta = run.metadata(StageId("gpd", 2))
    assert LoraSpec.from_metadata(meta["lora"], "meta") == run.lora_spec(StageId("gpd", 2))
    assert "lora" not in run.metadata(StageId("gpd", 0))
    assert "lora" not in run.metadata(StageId("vanilla", 2))  # the [vanilla] table has no lora_rank


def test_exported_lora_in_diffusers_equals_the_merged_student(tmp_path, capsys):
    """Stage 0 from the CLI, a LoRA stage 1 (a random adapter, so it matters), the export
    CLI, then diffusers' WanTransformer3DModel with the base exported beside it."""
    from diffusers import WanTransformer3DModel

    from gpd_model import save_diffusers
    from gpd_train.__main__ import main as train
    from gpd_train.config.load import load_config
    from gpd_train.infer.export.cli import main as export
    run_dir, out = tmp_path / "run", tmp_path / "lora"
    assert train(["--stage", "0", "--teacher-iterations", "2", "--run-dir", str(run_dir),
                  "--device", "cpu", "--batch-size", "2"]) == 0
    run = TrainingRun(load_config(None, {"run_dir": str(run_dir), "device": "cpu",
                                 "distill.lora_rank": 3, "distill.lora_alpha": 6.0}))
    finish_random_adapter(run, "gpd", 1, seed=10)
    assert export(["--run", str(run_dir), "--out", str(out), "--stage", "1"]) == 0
    assert "load_lora_weights" in capsys.readouterr().out
    record = json.loads((out / "gpd_export.json").read_text())
    assert record["steps"] == 24 and record["lora"]["rank"] == 3
    assert (out / "scheduler" / "scheduler_config.json").is_file()

    save_diffusers(run.load_stage_model(StageId("gpd", 0)), tmp_path / "base")
    transformer = WanTransformer3DModel.from_pretrained(str(tmp_path / "base"))
    student = run.load_stage_model(StageId("gpd", 1))
    cfg = student.cfg
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(2, cfg.in_channels, 4, 6, 10, generator=generator)
    t = torch.tensor([900.0, 30.0])
    c = torch.randn(2, 5, cfg.text_dim, generator=generator)

    def diffusers_output():
        with torch.no_grad():
            return transformer(hidden_states=x, timestep=t, encoder_hidden_states=c,
                               return_dict=False)[0]

    base = diffusers_output()
    transformer.load_lora_adapter(str(out / "pytorch_lora_weights.safetensors"),
                                  prefix="transformer")
    theirs = diffusers_output()
    with torch.no_grad():
        torch.testing.assert_close(theirs, student(x, t, c), rtol=1e-4, atol=1e-5)
    assert (theirs - base).abs().max() > 1e-2  # the adapter was applied
    # --merged writes a pipeline folder, which needs the base folder's other components.
    assert export(["--run", str(run_dir), "--out", str(tmp_path / "m"), "--merged"]) == 2
    assert "--merged writes a whole pipeline folder: give --base" in capsys.readouterr().err


def test_sampler_loads_a_lora_stage_file_through_its_run(tmp_path):
    import shutil

    from gpd_train.__main__ import main as train
    from gpd_train.config.load import load_config
    from gpd_train.infer.sample import SampleError
    from gpd_train.run.loading import load_model

    run_dir = tmp_path / "run"
    assert train(["--stage", "0", "--teacher-iterations", "1", "--run-dir", str(run_dir),
                  "--device", "cpu", "--batch-size", "2"]) == 0
    run = TrainingRun(load_config(None, {"run_dir": str(run_dir), "device": "cpu",
                                 "distill.lora_rank": 2}))
    finish_random_adapter(run, "gpd", 1, seed=11)
    stage_file = run.stage_folder(StageId("gpd", 1)) / "model.safetensors"
    loaded = load_model(stage_file, device="cpu")
    assert loaded.plan.stage.stage == 1 and loaded.record["options"]["lora"]["rank"] == 2
    want = run.load_stage_model(StageId("gpd", 1)).state_dict()
    assert all(torch.equal(want[k], v) for k, v in loaded.model.state_dict().items())
    alone = tmp_path / "elsewhere" / "model.safetensors"
    alone.parent.mkdir()
    shutil.copy(stage_file, alone)
    with pytest.raises(SampleError, match="holds a LoRA adapter.*needs its stage-0 base"):
        load_model(alone, device="cpu")


def test_bf16_lora_keeps_the_frozen_base_in_bf16_and_the_adapter_in_fp32(tmp_path):
    run = lora_run(tmp_path, precision="bf16")
    with_random_stages(run, "gpd", 0)
    trainer = build_distill(run, StageId("gpd", 1))
    dtypes = {k: p.dtype for k, p in trainer.model.named_parameters()}
    assert {d for k, d in dtypes.items() if ".lora_" not in k} == {torch.bfloat16}
    assert {d for k, d in dtypes.items() if ".lora_" in k} == {torch.float32}
    trainer.iterations = 2
    trainer.run(resume=False)
    assert all(torch.isfinite(torch.tensor(losses(trainer))))
    assert {v.dtype for v in trainer.ema.state_dict().values()} == {torch.float32}


GUIDED = {"distill.guidance_stage": True, "distill.guidance_iterations": 2}


def guidance_inputs(run, batch: int = 3):
    generator = torch.Generator().manual_seed(12)
    x = torch.randn(batch, *run.data.latent_shape, generator=generator)
    cond, _ = run.data.draw(generator, batch, with_latents=False)
    t = torch.tensor([950.0, 400.0, 20.0])[:batch]
    w = torch.tensor([1.0, 2.2, 3.0])[:batch]
    return x, t, cond.text, w


def test_lora_guidance_stage_starts_as_t0_and_learns_from_t0_with_cfg(tmp_path):
    run = lora_run(tmp_path, **GUIDED)
    with_random_stages(run, "gpd", 0)
    trainer = build_distill(run, StageId("gpd", GUIDANCE_STAGE))
    model, teacher = trainer.model, trainer.objective.teacher
    assert isinstance(teacher, CFG)  # T0 with CFG
    assert teacher.denoiser.model is model and teacher.denoiser.adapter == BASE
    assert teacher.denoiser.guidance_embedding is None
    t0 = run.load_stage_model(StageId("gpd", 0))
    x, t, c, w = guidance_inputs(run)
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, c, guidance=w), t0(x, t, c), rtol=0, atol=0)
        grid = trainer.objective.grid
        index = torch.tensor([0, 3, 7])
        cond = Conditioning(c, guidance=w)
        ours = teacher_target(teacher, x, cond, *grid.sigmas(index))
        want = teacher_target(stage_teacher(t0, run.data.negative), x, cond, *grid.sigmas(index))
    torch.testing.assert_close(ours, want, rtol=1e-5, atol=1e-6)
    trainer.iterations = 2
    trainer.run(resume=False)
    trained = {k for k, p in model.named_parameters() if p.requires_grad}
    assert any(k.startswith("guidance_embedding.") for k in trained)
    assert all(k.startswith("guidance_embedding.") or f".{STUDENT}." in k for k in trained)


def test_lora_halving_after_a_guidance_stage_keeps_w(tmp_path):
    run = lora_run(tmp_path, **GUIDED)
    with_random_stages(run, "gpd", 0)
    finish_random_guided_adapter(run, GUIDANCE_STAGE, seed=13)
    merged_g = run.load_stage_model(StageId("gpd", GUIDANCE_STAGE))  # stage 0 + adapter + w input

    trainer = build_distill(run, StageId("gpd", 1))
    model, teacher = trainer.model, trainer.objective.teacher
    assert teacher.adapter == TEACHER and not isinstance(teacher, CFG)
    x, t, c, w = guidance_inputs(run)
    with torch.no_grad():
        want = merged_g(x, t, c, guidance=w)
        torch.testing.assert_close(model(x, t, c, guidance=w), want, rtol=1e-5, atol=1e-5)
        grid = trainer.objective.grid
        index = torch.tensor([0, 1, 1])
        cond = Conditioning(c, guidance=w)
        ours = teacher_target(teacher, x, cond, *grid.sigmas(index))
        ref = teacher_target(stage_teacher(merged_g), x, cond, *grid.sigmas(index))
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    trainer.iterations = 2
    trainer.run(resume=False)
    with torch.no_grad():  # training moved the student's w input, not the teacher's
        torch.testing.assert_close(teacher_target(teacher, x, cond, *grid.sigmas(index)), ref,
                                   rtol=1e-5, atol=1e-5)
    output = adapter_from_params(trainer.ema.state_dict())
    assert any(k.startswith("guidance_embedding.") for k in output)
    run.finish_stage(StageId("gpd", 1), output, {"steps": run.steps(StageId("gpd", 1))})
    unfolded = run.load_stage_model(StageId("gpd", 1))  # stage 0 + adapter, with its w input
    student = run.load_stage_model(StageId("gpd", 1), fold_at=2.0)  # w folded: a plain Wan2.1 model
    assert student.guidance_embedding is None
    with torch.no_grad():
        torch.testing.assert_close(student(x, t, c), unfolded(x, t, c, guidance=torch.full(
            (3,), 2.0)), rtol=1e-5, atol=1e-5)


def test_export_refuses_a_w_conditioned_lora_and_names_merged(tmp_path, capsys):
    from gpd_train.__main__ import main as train
    from gpd_train.config.load import load_config
    from gpd_train.infer.export.cli import main as export
    run_dir = tmp_path / "run"
    assert train(["--stage", "0", "--teacher-iterations", "1", "--run-dir", str(run_dir),
                  "--device", "cpu", "--batch-size", "2"]) == 0
    run = TrainingRun(load_config(None, {"run_dir": str(run_dir), "device": "cpu",
                                 "distill.lora_rank": 2, "distill.guidance_stage": True}))
    for stage in (GUIDANCE_STAGE, 1):
        finish_random_guided_adapter(run, stage, seed=14)
    run.save_config()  # what the stages would have recorded
    capsys.readouterr()
    assert export(["--run", str(run_dir), "--out", str(tmp_path / "lora"), "--stage", "1"]) == 2
    assert "takes the CFG scale as an input" in capsys.readouterr().err
