"""LoRA on a Wan2.2 expert pair (gpd_train.train.pair): one adapter per expert, trained in
the pair's phases on its stage-0 base, stored as one stage output, sampled and exported per
expert (diffusers' WanPipeline with ``load_into_transformer_2``, a merged pipeline folder,
one ComfyUI LoRA per expert)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
from realscale_fixtures import VIDEO, build_wan22_folder, pair_run_args  # noqa: E402

from gpd_model import (  # noqa: E402
    CheckpointError,  # noqa: E402
    Conditioning,
    DiTDenoiser,
    ExpertPair,
)
from gpd_train.__main__ import main as train_main  # noqa: E402
from gpd_train.config.chains import StageId  # noqa: E402
from gpd_train.config.load import load_run_config  # noqa: E402
from gpd_train.infer import sample  # noqa: E402
from gpd_train.infer.export import cli as export  # noqa: E402
from gpd_train.parallel import World  # noqa: E402
from gpd_train.run.experts import BOUNDARY_KEY, ExpertPairError, split_experts  # noqa: E402
from gpd_train.run.files import read_metadata  # noqa: E402
from gpd_train.run.lora import METADATA_KEY, adapter_shapes, expert_adapters, split_lora  # noqa: E402
from gpd_train.train import pair  # noqa: E402
from gpd_train.train.builders import TrainingRun  # noqa: E402

# 6 student steps at shift 5: starts 1, .96, .91, .83 | .71, .5 (four high, two low); 3 steps:
# 1, .91 | .71. The lr is high so that a few updates move the adapters visibly.
BOUNDARY = 0.8
TOML = """\
steps = [12, 6, 3]
shift = 5.0
batch_size = 2
checkpoint_every = 1
pipeline_chains = ["gpd"]
[distill]
iterations = [6, 3]
freq_weight = [0.0, 0.0]
state_source = "student"
stage_guidance = [2.0, 1.0]
lr = 0.02
warmup = 0
lora_rank = 2
lora_alpha = 4.0
"""
PIPELINE_ATOL = 1e-4  # our sampler vs WanPipeline on the export (float32): the task's bound


def _args(*values: object) -> list[str]:
    return [str(v) for v in values]


@pytest.fixture(scope="module")
def wan22(tmp_path_factory):
    return build_wan22_folder(tmp_path_factory.mktemp("wan22") / "Wan2.2-T2V-tiny-Diffusers",
                              boundary_ratio=BOUNDARY)


@pytest.fixture(scope="module")
def trained(wan22, tmp_path_factory):
    """A LoRA pair run's folder with stages 0 (imported), 1 and 2 trained."""
    folder = tmp_path_factory.mktemp("lora-pair")
    args = pair_run_args(wan22, folder, TOML)
    for stage in (0, 1, 2):
        assert train_main(["--stage", str(stage), *args]) == 0
    return folder / "run"


def _open(run: Path) -> TrainingRun:
    return TrainingRun(load_run_config(run, device="cpu"))


def _adapters(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    return split_experts(load_file(str(path)), path)


def test_each_expert_trains_its_own_adapter_in_its_phase(trained):
    run = _open(trained)
    spec = run.lora_spec(StageId("gpd", 1))
    shapes = adapter_shapes(run.new_model(), spec)
    previous = None
    for stage in ("stage1", "stage2"):
        output = trained / stage / "model.safetensors"
        meta = read_metadata(output)
        assert meta[BOUNDARY_KEY] == repr(BOUNDARY) and METADATA_KEY in meta
        high, low = _adapters(output)
        for name, adapter in (("high", high), ("low", low)):
            assert {k: tuple(v.shape) for k, v in adapter.items()} == shapes
            # The phase's output is the stage's adapter of that expert, as the phase left it.
            phase = load_file(str(trained / stage / name / "expert.safetensors"))
            assert all(torch.equal(adapter[k], v) for k, v in phase.items())
            # Its checkpoints hold its own trainable adapter alone (no base, no other expert).
            ckpt = trained / stage / name / "ckpt"
            saved = load_file(str(ckpt / (ckpt / "latest").read_text().strip() /
                                  "model.safetensors"))
            assert {k.replace(".student.", ".") for k in saved} == set(shapes)
            assert all(torch.count_nonzero(adapter[k]) for k in adapter if "lora_B" in k)
        if previous is not None:  # stage 2 starts from stage 1's adapters and moves both
            for mine, theirs in zip((high, low), previous, strict=True):
                assert any(not torch.equal(mine[k], v) for k, v in theirs.items())
        previous = high, low
        assert not (trained / stage / "diffusers").exists()  # an adapter: exported on demand


def test_the_stage_teacher_and_lead_in_are_the_merged_previous_experts(trained):
    """Stage 2's low phase: its teacher pair (each base with its stage-1 adapter) and its
    lead-in (the high base with the finished high adapter) against experts merged by hand,
    W + alpha / R * B A in float64."""
    run = _open(trained)
    spec = run.lora_spec(StageId("gpd", 2))
    trainer = pair.PairTrainer(run, StageId("gpd", 2))
    low_phase = trainer.phases[1]
    student, experts, lead_in = trainer._lora_models(low_phase)
    assert lead_in is not None
    assert {n for n, p in student.named_parameters() if p.requires_grad} == {
        n for n in dict(student.named_parameters()) if ".student." in n}

    def merged(base: torch.nn.Module, adapter: dict[str, torch.Tensor]) -> torch.nn.Module:
        state = {k: v.clone() for k, v in base.state_dict().items()}
        for key, down in adapter.items():
            if key.endswith("lora_A.weight"):
                module = key.removesuffix(".lora_A.weight")
                up = adapter[f"{module}.lora_B.weight"]
                weight = state[f"{module}.weight"]
                state[f"{module}.weight"] = (weight.double() + spec.alpha / spec.rank
                                             * up.double() @ down.double()).float()
        model = run.new_model()
        model.load_state_dict(state)
        return model.eval()

    bases = run.load_stage_experts(StageId("gpd", 0))
    stage1 = _adapters(trained / "stage1" / "model.safetensors")
    reference = ExpertPair(*(DiTDenoiser(merged(b, a)) for b, a in zip(bases, stage1,
                                                                        strict=True)), BOUNDARY)
    ours = ExpertPair(experts[0], experts[1], BOUNDARY)
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(4, *run.data.latent_shape, generator=generator)
    sigma = torch.tensor([0.95, 0.85, 0.7, 0.3])  # two samples on each side
    cond = Conditioning(torch.randn(4, 5, run.dit_config.text_dim, generator=generator))
    with torch.no_grad():
        torch.testing.assert_close(ours(x, sigma, cond), reference(x, sigma, cond),
                                   rtol=1e-5, atol=1e-5)
        finished_high = load_file(str(trained / "stage2" / "high" / "expert.safetensors"))
        torch.testing.assert_close(lead_in(x, sigma, cond),
                                   DiTDenoiser(merged(bases[0], finished_high))(x, sigma, cond),
                                   rtol=1e-5, atol=1e-5)


def test_a_kill_in_the_low_phase_resumes_to_the_same_adapters(wan22, trained, tmp_path,
                                                              monkeypatch, capsys):
    args = pair_run_args(wan22, tmp_path, TOML)
    assert train_main(["--stage", "0", *args]) == 0
    real_prepare = pair.PhaseDistillation.prepare

    def crash(self, step):
        if self.first > 0 and step == 2:
            raise KeyboardInterrupt("simulated kill")
        return real_prepare(self, step)

    monkeypatch.setattr(pair.PhaseDistillation, "prepare", crash)
    with pytest.raises(KeyboardInterrupt):
        train_main(["--stage", "1", *args])
    monkeypatch.setattr(pair.PhaseDistillation, "prepare", real_prepare)
    capsys.readouterr()
    assert train_main(["--stage", "1", "--resume", *args]) == 0
    assert "stage1/low] resumed from step 1" in capsys.readouterr().out
    resumed = load_file(str(tmp_path / "run" / "stage1" / "model.safetensors"))
    finished = load_file(str(trained / "stage1" / "model.safetensors"))
    assert resumed.keys() == finished.keys()
    assert all(torch.equal(resumed[k], v) for k, v in finished.items())
    # Another LoRA rank is another recipe: the finished stage is not kept silently.
    assert train_main(["--stage", "1", "--resume", "--lora-rank", "3", *args]) == 2
    assert "lora" in capsys.readouterr().err


def _pipeline_latents(pipe, texts: list[str], steps: int) -> torch.Tensor:
    return pipe(prompt=texts, num_inference_steps=steps, guidance_scale=1.0,
                num_frames=VIDEO["frames"], height=VIDEO["height"], width=VIDEO["width"],
                generator=torch.Generator().manual_seed(7), output_type="latent").frames


def test_the_lora_pair_exports_load_in_wanpipeline_as_we_sample(wan22, trained, tmp_path,
                                                                capsys):
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    texts = ["a red cat runs", "the dog jumps over water"]
    out = tmp_path / "samples"
    assert sample.main(_args("--checkpoint", trained, "--model", wan22, "--prompt", texts[0],
                             "--prompt", texts[1], "--seed", 7, "--device", "cpu", "--out", out,
                             "--height", VIDEO["height"], "--width", VIDEO["width"],
                             "--frames", VIDEO["frames"])) == 0
    ours = load_file(str(out / "latents.safetensors"))["latents"]

    lora = tmp_path / "lora"
    capsys.readouterr()
    assert export.main(_args("--run", trained, "--out", lora)) == 0
    assert "load_into_transformer_2=True" in capsys.readouterr().out
    record = json.loads((lora / "gpd_export.json").read_text())
    high_file, low_file = record["lora"]["file"]
    assert record["boundary"] == BOUNDARY and record["steps"] == 3
    pipe = WanPipeline.from_pretrained(str(wan22))
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(str(lora),
                                                                     subfolder="scheduler")
    pipe.load_lora_weights(str(lora), weight_name=high_file)
    only_high = _pipeline_latents(pipe, texts, 3)
    pipe.load_lora_weights(str(lora), weight_name=low_file, load_into_transformer_2=True)
    theirs = _pipeline_latents(pipe, texts, 3)
    print("max abs difference to WanPipeline + LoRAs:", float((ours - theirs).abs().max()))
    torch.testing.assert_close(theirs, ours, atol=PIPELINE_ATOL, rtol=0)
    assert (only_high - theirs).abs().max() > 10 * PIPELINE_ATOL  # the low adapter matters

    merged = tmp_path / "merged"
    assert export.main(_args("--run", trained, "--base", wan22, "--merged", "--out",
                             merged)) == 0
    merged_latents = _pipeline_latents(WanPipeline.from_pretrained(str(merged)), texts, 3)
    torch.testing.assert_close(merged_latents, ours, atol=PIPELINE_ATOL, rtol=0)


def test_the_lora_pair_exports_for_comfyui_as_one_lora_per_expert(trained, tmp_path):
    out = tmp_path / "wan22_lora"
    assert export.main(_args("--run", trained, "--format", "comfyui", "--out", out)) == 0
    run = _open(trained)
    spec = run.lora_spec(StageId("gpd", 2))
    for name, adapter in zip(("high", "low"), _adapters(trained / "stage2" / "model.safetensors"),
                             strict=True):
        state = load_file(str(out / f"wan22_lora_{name}_noise.safetensors"))
        parts = split_lora(adapter, run.dit_config.num_layers, "wan")
        assert len(state) == 3 * len(parts)
        for part, (down, up) in parts.items():
            assert torch.equal(state[f"diffusion_model.{part}.lora_down.weight"], down)
            assert torch.equal(state[f"diffusion_model.{part}.lora_up.weight"], up)
            assert float(state[f"diffusion_model.{part}.alpha"]) == spec.alpha
    assert json.loads((out / "gpd_export.json").read_text())["boundary"] == BOUNDARY


def test_an_adapter_pair_that_does_not_fit_is_refused_in_one_line_naming_the_expert(trained):
    run = _open(trained)
    spec = run.lora_spec(StageId("gpd", 2))
    joined = load_file(str(trained / "stage1" / "model.safetensors"))
    model = run.new_model()
    high, low = expert_adapters(joined, model, spec, "stage1")
    assert high.keys() == low.keys()
    dropped = next(k for k in joined if k.startswith("low.") and "self_attn.o." in k)
    with pytest.raises(CheckpointError) as caught:
        expert_adapters({k: v for k, v in joined.items() if k != dropped}, model, spec, "stage1")
    message = str(caught.value)
    assert "the low expert's LoRA adapter does not fit" in message and "\n" not in message
    assert dropped.removeprefix("low.") in message
    with pytest.raises(ExpertPairError, match=r"expert\(s\) missing: \['low'\]"):
        expert_adapters({k: v for k, v in joined.items() if k.startswith("high.")}, model, spec,
                        "stage1")


def test_an_expert_without_starts_keeps_its_teachers_adapter(tmp_path):
    """Boundary 0.3, below every student start: the low expert has no phase to train, so
    stage 1 keeps stage 0's low expert (a zero update) and stage 2 stage 1's adapter."""
    wan22 = build_wan22_folder(tmp_path / "Wan2.2-low-boundary", boundary_ratio=0.3)
    args = pair_run_args(wan22, tmp_path, TOML)
    for stage in (0, 1, 2):
        assert train_main(["--stage", str(stage), *args]) == 0
    run = tmp_path / "run"
    record = json.loads((run / "stage2" / "done.json").read_text())
    assert record["experts"]["low"]["iterations"] == 0
    (high1, low1), (high2, low2) = (_adapters(run / stage / "model.safetensors")
                                    for stage in ("stage1", "stage2"))
    assert all(torch.equal(low2[k], v) for k, v in low1.items())
    # Stage 1's low adapter is a student adapter as it starts: random A, zero B.
    assert all(bool(torch.count_nonzero(v)) != ("lora_B" in k) for k, v in low1.items())
    assert any(not torch.equal(high2[k], v) for k, v in high1.items())


def test_a_lora_pair_under_torchrun_is_accepted(trained, monkeypatch):
    """A LoRA pair stage is not refused under torchrun (tests/test_pair_distributed.py runs
    it there against one process)."""
    run = _open(trained)
    monkeypatch.setattr(pair, "world", lambda: World(rank=0, world_size=2, distributed=True))
    pair.check_pair_stage(run, StageId("gpd", 2))
