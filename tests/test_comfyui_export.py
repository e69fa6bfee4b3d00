"""`python -m gpd_train.export --format comfyui`: one safetensors file in Wan's original key
layout, read back through diffusers' own converters (WanTransformer3DModel.from_single_file
for a model, WanPipeline.load_lora_weights' non-diffusers Wan LoRA converter for a LoRA)."""

from __future__ import annotations

import json

import pytest
import torch
from builders import finish_random_adapter, finish_random_guided_adapter
from safetensors.torch import load_file

from gpd_model import add_guidance_input, fold_guidance
from gpd_model.checkpoint import diffusers_config
from gpd_train.config.chains import GUIDANCE_STAGE, StageId
from gpd_train.config.load import load_config
from gpd_train.infer.export.cli import main as export
from gpd_train.train.builders import TrainingRun

pytest.importorskip("diffusers")
pytest.importorskip("peft")

# (batch, frames, height, width) of the latents compared: the tiny preset's patch is
# (4, 2, 2); non-square, a batch of one and an odd batch, one and two latent patches in time.
SHAPES = [(1, 4, 6, 10), (3, 8, 4, 14)]


def saved_run(tmp_path, **options) -> TrainingRun:
    run = TrainingRun(load_config(None, {"run_dir": str(tmp_path / "run"), "device": "cpu",
                                         **options}))
    run.save_config()
    return run


def random_model(run: TrainingRun, seed: int, guided: bool = False) -> torch.nn.Module:
    """A fresh model with every tensor random (zero-initialised layers would hide a key
    that is dropped or swapped)."""
    model = run.new_model()
    if guided:
        add_guidance_input(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    return model


def finish(run: TrainingRun, stage, model: torch.nn.Module) -> None:
    sid = StageId("gpd", stage)
    run.finish_stage(sid, model.state_dict(), {"steps": run.steps(sid)})


def comfyui_export(tmp_path, run: TrainingRun, name: str, *extra: str) -> tuple[int, dict]:
    out = tmp_path / name
    code = export(["--run", str(run.config.run_dir), "--out", str(out), "--format", "comfyui",
                   *extra])
    record = json.loads((out / "gpd_export.json").read_text()) if code == 0 else {}
    return code, record


def from_single_file(path, cfg, tmp_path):
    """diffusers' single-file loader: its Wan converter on our file, offline (the config
    from a local folder rather than the Hub)."""
    from diffusers import WanTransformer3DModel

    config = tmp_path / "transformer-config"
    config.mkdir(exist_ok=True)
    (config / "config.json").write_text(json.dumps(diffusers_config(cfg)))
    return WanTransformer3DModel.from_single_file(str(path), config=str(config),
                                                  local_files_only=True,
                                                  torch_dtype=torch.float32).eval()


def inputs(cfg, shape, seed: int):
    batch, frames, height, width = shape
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.in_channels, frames, height, width, generator=generator)
    t = torch.rand(batch, generator=generator) * 1000
    context = torch.randn(batch, 7, cfg.text_dim, generator=generator)
    return x, t, context


@torch.no_grad()
def theirs(transformer, x, t, context) -> torch.Tensor:
    return transformer(hidden_states=x, timestep=t, encoder_hidden_states=context,
                       return_dict=False)[0]


def test_full_student_loads_through_from_single_file(tmp_path, capsys):
    run = saved_run(tmp_path)
    finish(run, 0, random_model(run, seed=1))
    finish(run, 1, random_model(run, seed=2))
    capsys.readouterr()
    code, record = comfyui_export(tmp_path, run, "wan-gpd-24step", "--stage", "1")
    assert code == 0
    printed = capsys.readouterr().out
    assert "ComfyUI/models/diffusion_models/" in printed and "steps 24" in printed
    path = tmp_path / "wan-gpd-24step" / "wan-gpd-24step.safetensors"
    assert record["file"] == path.name and record["student_guidance"] is None
    keys = set(load_file(str(path)))
    assert {"patch_embedding.weight", "text_embedding.0.weight", "time_embedding.0.weight",
            "time_projection.1.weight", "head.head.weight", "head.modulation",
            "blocks.0.modulation", "blocks.0.self_attn.q.weight",
            "blocks.0.cross_attn.k.weight", "blocks.0.norm3.weight"} <= keys
    student = run.load_stage_model(StageId("gpd", 1)).eval()
    transformer = from_single_file(path, student.cfg, tmp_path)
    for seed, shape in enumerate(SHAPES):
        x, t, context = inputs(student.cfg, shape, seed)
        with torch.no_grad():
            torch.testing.assert_close(theirs(transformer, x, t, context),
                                       student(x, t, context), rtol=1e-5, atol=1e-5)


def test_guided_student_is_folded_at_the_asked_w(tmp_path):
    run = saved_run(tmp_path, **{"distill.guidance_stage": True})
    finish(run, 0, random_model(run, seed=3))
    finish(run, GUIDANCE_STAGE, random_model(run, seed=4, guided=True))
    finish(run, 1, random_model(run, seed=5, guided=True))
    student = run.load_stage_model(StageId("gpd", 1)).eval()
    for w, extra in ((2.5, ("--guidance", "2.5")), (run.config.resolved_guidance, ())):
        code, record = comfyui_export(tmp_path, run, f"w{w}", "--stage", "1", *extra)
        assert code == 0 and record["student_guidance"] == w
        transformer = from_single_file(tmp_path / f"w{w}" / f"w{w}.safetensors", student.cfg,
                                       tmp_path)
        folded = fold_guidance(student, w)
        x, t, context = inputs(student.cfg, SHAPES[1], seed=6)
        with torch.no_grad():
            got = theirs(transformer, x, t, context)
            torch.testing.assert_close(got, folded(x, t, context), rtol=1e-5, atol=1e-5)
            unfolded = student(x, t, context, guidance=torch.full((x.shape[0],), float(w)))
            torch.testing.assert_close(got, unfolded, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # w matters: the two exports differ
        other = fold_guidance(student, 2.5)(x, t, context)
    assert (other - folded(x, t, context)).abs().max() > 1e-3


def test_lora_stage_loads_through_wanpipeline_load_lora_weights(tmp_path, capsys):
    """The ComfyUI workflow read by diffusers: stage 0 as a single file, the LoRA of stage 1
    applied on it by WanPipeline.load_lora_weights (its non-diffusers Wan converter)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    run = saved_run(tmp_path, **{"distill.lora_rank": 3, "distill.lora_alpha": 6.0})
    finish(run, 0, random_model(run, seed=7))
    finish_random_adapter(run, "gpd", 1, seed=8)
    assert comfyui_export(tmp_path, run, "base", "--stage", "0")[0] == 0
    capsys.readouterr()
    code, record = comfyui_export(tmp_path, run, "lora", "--stage", "1")
    assert code == 0 and record["lora"]["rank"] == 3 and record["base"] == "stage0"
    assert "ComfyUI/models/loras/" in capsys.readouterr().out
    lora = load_file(str(tmp_path / "lora" / "lora.safetensors"))
    assert all(key.startswith("diffusion_model.blocks.") for key in lora)
    assert {key.rsplit(".", 2)[-2] if key.endswith(".weight") else "alpha" for key in lora} == {
        "lora_down", "lora_up", "alpha"}
    assert torch.equal(lora["diffusion_model.blocks.0.self_attn.q.alpha"], torch.tensor(6.0))

    student = run.load_stage_model(StageId("gpd", 1)).eval()
    base = from_single_file(tmp_path / "base" / "base.safetensors", student.cfg, tmp_path)
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=base,
                       scheduler=FlowMatchEulerDiscreteScheduler())
    x, t, context = inputs(student.cfg, SHAPES[1], seed=9)
    before = theirs(pipe.transformer, x, t, context)
    pipe.load_lora_weights(str(tmp_path / "lora" / "lora.safetensors"))
    for seed, shape in enumerate(SHAPES):
        x, t, context = inputs(student.cfg, shape, seed=9 + seed)
        got = theirs(pipe.transformer, x, t, context)
        with torch.no_grad():
            want = student(x, t, context)
        assert ((got - want).norm() / want.norm()).item() < 1e-4
    assert (got - before).abs().max() > 1e-2  # the LoRA was applied

    # --merged: the whole merged student instead of the LoRA
    assert comfyui_export(tmp_path, run, "merged", "--stage", "1", "--merged")[0] == 0
    merged = from_single_file(tmp_path / "merged" / "merged.safetensors", student.cfg, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(theirs(merged, x, t, context), want, rtol=1e-5, atol=1e-5)


def test_a_guided_lora_stage_is_refused_and_merged_folds_it(tmp_path, capsys):
    run = saved_run(tmp_path, **{"distill.lora_rank": 2, "distill.guidance_stage": True})
    finish(run, 0, random_model(run, seed=10))
    for stage in (GUIDANCE_STAGE, 1):
        finish_random_guided_adapter(run, stage, seed=11)
    capsys.readouterr()
    assert comfyui_export(tmp_path, run, "lora", "--stage", "1")[0] == 2
    assert "a ComfyUI LoRA cannot carry" in capsys.readouterr().err
    assert not (tmp_path / "lora").exists()
    code, record = comfyui_export(tmp_path, run, "m", "--stage", "1", "--merged",
                                  "--guidance", "2")
    assert code == 0 and record["student_guidance"] == 2.0
    student = run.load_stage_model(StageId("gpd", 1), fold_at=2.0).eval()
    transformer = from_single_file(tmp_path / "m" / "m.safetensors", student.cfg, tmp_path)
    x, t, context = inputs(student.cfg, SHAPES[0], seed=12)
    with torch.no_grad():
        torch.testing.assert_close(theirs(transformer, x, t, context), student(x, t, context),
                                   rtol=1e-5, atol=1e-5)


def test_destination_rules_and_options_it_would_not_read(tmp_path, capsys):
    run = saved_run(tmp_path)
    finish(run, 0, random_model(run, seed=13))
    users = tmp_path / "users"
    users.mkdir()
    (users / "mine.safetensors").write_bytes(b"not ours")
    capsys.readouterr()
    assert comfyui_export(tmp_path, run, "users", "--stage", "0")[0] == 2
    assert "not an export of gpd_train.export" in capsys.readouterr().err
    assert [p.name for p in users.iterdir()] == ["mine.safetensors"]
    assert (users / "mine.safetensors").read_bytes() == b"not ours"
    assert comfyui_export(tmp_path, run, "once", "--stage", "0")[0] == 0
    assert comfyui_export(tmp_path, run, "once", "--stage", "0")[0] == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert comfyui_export(tmp_path, run, "once", "--stage", "0", "--overwrite")[0] == 0
    assert list(tmp_path.glob("once.old-*/once.safetensors"))
    assert comfyui_export(tmp_path, run, "c", "--stage", "0", "--copy")[0] == 2
    assert capsys.readouterr().err == (
        "error: --copy copies the base's text_encoder/, tokenizer/ and vae/ into a Diffusers "
        "folder; --format comfyui writes one weights file: drop --copy\n")
    base = tmp_path / "base"
    base.mkdir()
    assert comfyui_export(tmp_path, run, "c", "--stage", "0", "--base", str(base))[0] == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --base {base}: --format comfyui writes the run's weights "
                          "alone") and err.endswith("nothing of --base is read: drop --base\n")
    assert not (tmp_path / "c").exists()
    assert comfyui_export(tmp_path, run, "c", "--stage", "0")[0] == 0  # the hint: dropped
