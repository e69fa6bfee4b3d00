"""`python -m gpd_train.sample`: run folders, Wan/diffusers files, prompts, clear errors."""

import json

import pytest
import torch
from cpu_graphs import emulate_cuda_graphs
from safetensors.torch import load_file, save_file

from gpd_model import (
    CFG,
    Conditioning,
    DiTDenoiser,
    WanDiT,
    euler_sample,
    get_preset,
    make_noise,
    save_diffusers,
    sigma_grid,
)
from gpd_model.checkpoint import export_state_dict
from gpd_model.graph_sampler import GraphSampler
from gpd_train.config.chains import StageId
from gpd_train.config.load import load_config
from gpd_train.config.settings import RunConfig
from gpd_train.data.procedural import ProceduralVideos
from gpd_train.infer.sample import main
from gpd_train.train.builders import TrainingRun

STEPS = 2


def _expected(model, num, seed, shift, guidance=None, data=None):
    data = data or ProceduralVideos(model.cfg.text_dim)
    cond, _ = data.eval_prompts(num)
    noise = make_noise((num, *data.latent_shape), seed)
    denoiser = DiTDenoiser(model)
    if guidance:
        denoiser = CFG(denoiser, data.negative, guidance)
    return euler_sample(denoiser, noise, cond, sigma_grid(STEPS, shift))


def _run(tmp_path, *args):
    out = tmp_path / "out"
    code = main(["--steps", str(STEPS), "--seed", "3", "--out", str(out), *map(str, args)])
    return code, out


def test_run_folder_student_writes_latents_gifs_and_summary(run_folder, tmp_path, capsys):
    folder, model, config = run_folder
    code, out = _run(tmp_path, "--checkpoint", folder, "--num", 3, "--batch-size", 2)
    assert code == 0
    latents = load_file(str(out / "latents.safetensors"))["latents"]
    torch.testing.assert_close(latents, _expected(model, 3, 3, config.resolved_shift))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["nfe_per_video"] == STEPS and summary["seconds_per_video"] > 0
    assert summary["prompts"][0] == "a square moving right"
    assert len(list(out.glob("*.gif"))) == 3
    assert "s/video, NFE 2" in capsys.readouterr().out


def test_guidance_batches_cfg_and_counts_two_evaluations(run_folder, tmp_path):
    folder, model, config = run_folder
    code, out = _run(tmp_path, "--checkpoint", folder / "stage0", "--num", 2,
                     "--guidance", 4.0)
    assert code == 0
    latents = load_file(str(out / "latents.safetensors"))["latents"]
    torch.testing.assert_close(latents, _expected(model, 2, 3, config.resolved_shift, 4.0))
    assert json.loads((out / "summary.json").read_text())["nfe_per_video"] == 2 * STEPS


@pytest.mark.parametrize("fmt", ["diffusers", "wan"])
def test_external_formats_load(run_folder, tmp_path, fmt):
    _, model, _ = run_folder
    if fmt == "diffusers":
        path = save_diffusers(model, tmp_path / "diffusers")
        extra = []
    else:
        path = tmp_path / "wan.safetensors"
        save_file({k: v.contiguous() for k, v in export_state_dict(model, "wan").items()},
                  str(path))
        extra = ["--preset", "tiny"]
    code, out = _run(tmp_path, "--checkpoint", path, "--num", 1, "--shift", 3.0, *extra)
    assert code == 0
    latents = load_file(str(out / "latents.safetensors"))["latents"]
    torch.testing.assert_close(latents, _expected(model, 1, 3, 3.0))


def test_prompt_embeddings_file(run_folder, tmp_path):
    _, model, _ = run_folder
    context = torch.randn(2, 5, model.cfg.text_dim)
    path = tmp_path / "prompts.safetensors"
    save_file({"context": context}, str(path), metadata={"latent_shape": "3,4,4,6"})
    code, out = _run(tmp_path, "--checkpoint", save_diffusers(model, tmp_path / "d"),
                     "--prompt-embeddings", path, "--num", 3, "--shift", 3.0)
    assert code == 0
    latents = load_file(str(out / "latents.safetensors"))["latents"]
    want = euler_sample(DiTDenoiser(model), make_noise((3, 3, 4, 4, 6), 3),
                        Conditioning(context[[0, 1, 0]]), sigma_grid(STEPS, 3.0))
    torch.testing.assert_close(latents, want)
    assert not list(out.glob("*.gif"))  # videos only for the built-in set


def _error(tmp_path, capsys, *args):
    code, _ = _run(tmp_path, *args)
    assert code == 2
    return capsys.readouterr().err


def test_missing_checkpoint_names_the_command(tmp_path, capsys):
    err = _error(tmp_path, capsys, "--checkpoint", tmp_path / "nope")
    assert f"no checkpoint at {tmp_path / 'nope'}" in err
    assert "python -m gpd_train --stage 0" in err


def test_run_without_finished_stage_names_the_command(tmp_path, capsys):
    folder = tmp_path / "empty_run"
    TrainingRun(RunConfig(run_dir=str(folder), preset="tiny", device="cpu")).save_config()
    err = _error(tmp_path, capsys, "--checkpoint", folder)
    assert f"run folder {folder} has no finished stage" in err
    assert f"python -m gpd_train --stage 0 --run-dir {folder}" in err


def test_missing_stage_names_the_command(run_folder, tmp_path, capsys):
    folder, _, _ = run_folder
    err = _error(tmp_path, capsys, "--checkpoint", folder, "--stage", 2)
    assert "stage2 is not complete" in err and "python -m gpd_train --stage 2" in err


def test_mismatched_checkpoints_are_refused_with_the_keys(run_folder, tmp_path, capsys):
    _, model, _ = run_folder
    state = export_state_dict(model, "wan")
    state.pop("head.head.weight")
    path = tmp_path / "broken.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    err = _error(tmp_path, capsys, "--checkpoint", path, "--preset", "tiny")
    assert "does not fit the tiny model" in err and "head.head.weight" in err
    err = _error(tmp_path, capsys, "--checkpoint", path)
    assert "pass --preset" in err
    folder = save_diffusers(WanDiT(get_preset("tiny", num_layers=2)), tmp_path / "two_layers")
    config = json.loads((folder / "config.json").read_text())
    config["num_layers"] = 1
    (folder / "config.json").write_text(json.dumps(config))
    err = _error(tmp_path, capsys, "--checkpoint", folder)
    assert "blocks.1" in err


def test_bad_prompt_requests(run_folder, tmp_path, capsys):
    folder, model, _ = run_folder
    err = _error(tmp_path, capsys, "--checkpoint", folder, "--prompts", 99)
    assert "--prompts ids must be in [0, 12), got [99]" in err
    path = tmp_path / "p.safetensors"
    save_file({"context": torch.randn(1, 4, model.cfg.text_dim)}, str(path))
    err = _error(tmp_path, capsys, "--checkpoint", folder, "--prompt-embeddings", path)
    assert "no latent_shape metadata: pass --latent-shape C,T,H,W" in err
    err = _error(tmp_path, capsys, "--checkpoint", folder, "--prompt-embeddings", path,
                 "--latent-shape", "3,2,4,6", "--guidance", 2.0)
    assert "--guidance needs a 'negative' tensor" in err
    assert _error(tmp_path, capsys, "--checkpoint", folder, "--num", 0) == (
        "error: --num must be >= 1, got 0\n")


def test_a_guidance_input_student_samples_folded_at_the_asked_w(tmp_path):
    """A w-conditioned stage output samples in one forward per step at --guidance w."""
    from gpd_model import add_guidance_input, fold_guidance

    config = load_config(None, {"run_dir": str(tmp_path / "run"), "device": "cpu",
                                "distill.guidance_stage": True})
    run = TrainingRun(config)
    run.save_config()
    run.finish_stage(StageId("gpd", 0), run.new_model().state_dict(), {"stage": 0})
    student = add_guidance_input(run.new_model())
    torch.nn.init.normal_(student.guidance_embedding.mlp[2].weight, std=0.1)  # w matters
    run.finish_stage(StageId("gpd", "g"), student.state_dict(), {"stage": "g"})
    for w in (1.0, 2.5):
        code, out = _run(tmp_path / str(w), "--checkpoint", run.stage_folder(StageId("gpd", "g")),
                         "--num", 2, "--guidance", w)
        assert code == 0
        latents = load_file(str(out / "latents.safetensors"))["latents"]
        want = _expected(fold_guidance(student, w).eval(), 2, 3, config.resolved_shift)
        torch.testing.assert_close(latents, want)
        summary = json.loads((out / "summary.json").read_text())
        assert (summary["guidance"], summary["guidance_as"], summary["nfe_per_video"]) == (
            w, "input", STEPS)


@pytest.mark.parametrize("guidance", [None, 4.0])
def test_sampling_through_the_emulated_cuda_graph_path(run_folder, tmp_path, monkeypatch,
                                                        guidance):
    """The path CUDA takes (a captured graph per batch shape, replayed), with torch.cuda's
    graph API emulated on the CPU (tests/cpu_graphs.py): the same latents as eager, a last
    batch of another size included (a second capture)."""
    emulate_cuda_graphs(monkeypatch)
    captures = []
    real_capture = GraphSampler._capture
    monkeypatch.setattr(GraphSampler, "_capture",
                        lambda self, *a: captures.append(a[0].shape) or real_capture(self, *a))
    folder, model, config = run_folder
    extra = () if guidance is None else ("--guidance", guidance)
    code, out = _run(tmp_path, "--checkpoint", folder, "--num", 5, "--batch-size", 2, *extra)
    assert code == 0
    assert [shape[0] for shape in captures] == [2, 1]
    latents = load_file(str(out / "latents.safetensors"))["latents"]
    torch.testing.assert_close(latents, _expected(model, 5, 3, config.resolved_shift, guidance))
