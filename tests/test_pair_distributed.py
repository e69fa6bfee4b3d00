"""A Wan2.2 expert pair's distillation stage under torchrun (gloo, CPU, 2 processes): FSDP2
over data-parallel ranks, each video split over both ranks (sequence parallel), both again
with LoRA (one adapter per expert), the LoRA data-parallel run's stage 2 (each expert's
teacher: its stage-1 adapter on its base), and a kill in the low expert's phase resumed on
the same ranks. Workers are this file run as a script under ``python -m
torch.distributed.run``; one launch runs every layout (2 cores are shared).

The reference is the same run (with or without LoRA) in one process with the same global
batch in the same data streams (2 streams of 2 samples), so every sample, its noise and its
teacher targets are the same. The tolerances are tests/test_distributed.py's (its
docstring gives the reasoning): the reassociated float32 sums of the gradient average and
norm and of the logged mean, a few ulps per step, 2e-5 relative on the losses and 1e-4 on
the weights. Each rank also records how it prepared the frozen experts (sharded, split) and
how many all-to-alls it ran: equal results alone would not show that the lead-in was sharded
or the tokens split. The branch of RankAlignedPair where ranks need different experts is the
one-process test at the end: the rollout lanes give every rank the same sigmas, so these
runs never take it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from builders import logged_losses, random_dit, torchrun
from safetensors.torch import load_file

from gpd_model import CFG, Conditioning, DiTDenoiser, ExpertPair
from gpd_train import parallel
from gpd_train.__main__ import main as train_main
from gpd_train.config.chains import StageId
from gpd_train.config.load import load_run_config
from gpd_train.data.datasets import ProceduralVideos
from gpd_train.run.folder import RunFolder
from gpd_train.train import pair

ROOT = Path(__file__).resolve().parents[1]
RTOL, ATOL = 2e-5, 1e-7  # the losses (tests/test_distributed.py's)
WEIGHT_RTOL, WEIGHT_ATOL = 1e-4, 1e-6  # the EMA outputs (tests/test_distributed.py's)
# 6 student steps at shift 5: starts 1, .96, .91, .83 | .71, .5 (4 high, 2 low); the
# teacher's 12-step point .78 puts the second teacher step from .83 on the low expert, so
# a target's steps cross the boundary and a stream's batch of 2 (lanes at starts 1 and 3)
# is split between the experts. Student rollouts: the low phase's lanes are led in by the
# finished high expert.
BOUNDARY = 0.8
TOML = """\
steps = [12, 6, 3]
shift = 5.0
checkpoint_every = 1
pipeline_chains = ["gpd"]
[distill]
iterations = [6, 3]
freq_weight = [0.5, 0.5]
state_source = "student"
stage_guidance = [2.0, 2.0]
"""
# Each stage's iterations per phase: stage 2's 3 student steps start at 1, .91 | .71.
PHASE_STEPS = {"stage1": {"high": 4, "low": 2}, "stage2": {"high": 2, "low": 1}}
PROMPTS = ["a red cat runs in the park", "the blue dog jumps", "green bird flies",
           "a dog runs under the sky"]
# The global batch of 4 in 2 data streams of 2 samples, on every layout.
ONE_PROCESS = ["--batch-size", "4", "--data-streams", "2"]
DATA_PARALLEL = ["--batch-size", "2"]  # a stream per rank, FSDP2 over both
# One data group of 2 ranks, each video split over both; blocks recomputed in the backward.
SEQUENCE_PARALLEL = ["--sequence-parallel", "2", "--activation-checkpointing", *ONE_PROCESS]
# One adapter per expert on its stage-0 base, at an lr that moves it visibly.
LORA = ["--lora-rank", "2", "--lr", "0.02"]
# Each layout's flags and its stage 1's own (stage 0 refuses the LoRA flags).
LAYOUTS = {"data_parallel": (DATA_PARALLEL, []), "sequence_parallel": (SEQUENCE_PARALLEL, []),
           "lora_data_parallel": (DATA_PARALLEL, LORA),
           "lora_sequence_parallel": (SEQUENCE_PARALLEL, LORA)}
KILLED = "killed"  # the data-parallel layout killed at the low phase's step 2, resumed
KILLED_COPY = "killed_copy"  # the killed run as it was left, resumed in one process
KILL_STEP = 2
# Stage 2 of a LoRA pair: the data-parallel LoRA run's, and in one process on a copy of the
# same stages 0-1 (so both start from the same stage-1 adapters).
LORA_STAGE2 = "lora_data_parallel"
LORA_STAGE2_ONE = "lora_stage2_one"
PROBE_SIGMA = [0.95, 0.3]  # the stage-2 teacher views' probe: a sigma on each side


def _base_args(folder: Path) -> list[str]:
    """The pair run's CLI arguments but the run folder (files written by the fixture)."""
    return json.loads((folder / "args.json").read_text())


def _stage(folder: Path, name: str, stage: str, layout: list[str], *flags: str) -> None:
    """Stage ``stage`` of the run ``name``."""
    args = [*_base_args(folder), "--run-dir", str(folder / name), *layout, *flags]
    if train_main(["--stage", stage, *args]) != 0:
        raise RuntimeError(f"{name}: stage {stage} failed")


def _train(folder: Path, name: str, layout: list[str], *flags: str,
           distill: list[str] | None = None) -> None:
    """Stages 0 and 1 of the run ``name``; ``distill``: stage 1's own flags."""
    for stage, own in (("0", []), ("1", distill or [])):
        _stage(folder, name, stage, layout, *flags, *own)


# -- the worker (runs under torchrun) -----------------------------------------------------
def worker(folder: Path) -> None:
    """Each layout's stage 0 (imported) and stage 1, the LoRA data-parallel run's stage 2,
    then the killed data-parallel run resumed (the kill raised on both ranks at the same
    step, after its checkpoint)."""
    # One process group for all the CLI calls: each call's teardown would destroy it, and
    # a group joined again in the same process hangs where the sequence mesh was built.
    parallel.setup("cpu")
    teardown, parallel.teardown = parallel.teardown, lambda: None
    try:
        _run_layouts(folder)
    finally:
        parallel.teardown = teardown
        teardown()


def _run_layouts(folder: Path) -> None:
    from torch.distributed.fsdp import FSDPModule

    all_to_all, prepare_teacher = dist.all_to_all_single, pair.prepare_teacher
    for name, (layout, distill) in LAYOUTS.items():
        # How this rank ran the layout: its all-to-alls (the split tokens' exchanges) and
        # how each frozen expert (teacher pair, lead-in) was prepared: sharded, split.
        seen: dict[str, list] = {"all_to_all": [], "frozen": []}

        def counted(*args, seen=seen, **kwargs):
            seen["all_to_all"].append(1)
            return all_to_all(*args, **kwargs)

        def recorded(model, *args, seen=seen):
            model = prepare_teacher(model, *args)
            seen["frozen"].append([isinstance(model, FSDPModule),
                                   getattr(model, "sequence_parallel", None) is not None])
            return model

        dist.all_to_all_single, pair.prepare_teacher = counted, recorded
        try:
            _train(folder, name, layout, distill=distill)
        finally:
            dist.all_to_all_single, pair.prepare_teacher = all_to_all, prepare_teacher
        seen["all_to_all"] = len(seen["all_to_all"])
        (folder / f"{name}.rank{os.environ['RANK']}.json").write_text(json.dumps(seen))

    parallel.main_only(shutil.copytree, folder / LORA_STAGE2, folder / LORA_STAGE2_ONE)
    pair.PairTrainer._lora_models = _probed
    try:
        _stage(folder, LORA_STAGE2, "2", DATA_PARALLEL, *LORA)
    finally:
        pair.PairTrainer._lora_models = _LORA_MODELS

    prepare = pair.PhaseDistillation.prepare

    def killed(self, step):
        if self.first > 0 and step == KILL_STEP:
            raise KeyboardInterrupt("simulated kill")
        return prepare(self, step)

    pair.PhaseDistillation.prepare = killed
    try:
        _train(folder, KILLED, DATA_PARALLEL)
    except KeyboardInterrupt:
        pass
    else:
        raise AssertionError("the low phase was not killed")
    pair.PhaseDistillation.prepare = prepare
    parallel.main_only(shutil.copytree, folder / KILLED, folder / KILLED_COPY)
    _train(folder, KILLED, DATA_PARALLEL, "--resume")


_LORA_MODELS = pair.PairTrainer._lora_models


def _probed(self, phase):
    """_lora_models, its teacher pair's experts run on a fixed probe and saved per phase
    and rank (the comparison with one process alone would pass a teacher built wrongly
    the same way in both). The frozen expert is sharded: its forward is a collective,
    which both ranks run in the same order."""
    student, views, lead_in = _LORA_MODELS(self, phase)
    run = self.run_folder
    generator = torch.Generator().manual_seed(7)
    x = torch.randn((len(PROBE_SIGMA), *run.data.latent_shape), generator=generator)
    text = torch.randn((len(PROBE_SIGMA), 5, run.dit_config.text_dim), generator=generator)
    with torch.no_grad():
        outputs = {name: view(x, torch.tensor(PROBE_SIGMA), Conditioning(text))
                   for name, view in zip(("high", "low"), views, strict=True)}
    torch.save({"x": x, "text": text, **outputs}, _probe_path(run.folder, phase.name,
                                                              os.environ["RANK"]))
    return student, views, lead_in



def _probe_path(run: Path, phase: str, rank: int | str) -> Path:
    """Where ``_probed`` saves the teacher pair of stage 2's ``phase`` on ``rank``."""
    return run.parent / f"{run.name}.stage2_{phase}.rank{rank}.probe.pt"


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
    sys.exit(0)


# -- tests --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, str]:
    """The folder of every layout's run (and the one-process runs, ``one`` and
    ``one_lora``) and the launch's stdout."""
    from realscale_fixtures import build_wan22_folder, pair_run_args

    folder = tmp_path_factory.mktemp("pair_ranks")
    wan22 = build_wan22_folder(folder / "Wan2.2-T2V-tiny-Diffusers", boundary_ratio=BOUNDARY)
    args = pair_run_args(wan22, folder, TOML, PROMPTS, run_dir=False)
    (folder / "args.json").write_text(json.dumps(args))
    result = subprocess.run(torchrun([str(Path(__file__).resolve()), str(folder)]), cwd=ROOT,
                            capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    _train(folder, "one", ONE_PROCESS)
    _train(folder, "one_lora", ONE_PROCESS, distill=LORA)
    _stage(folder, LORA_STAGE2_ONE, "2", ONE_PROCESS, *LORA)
    return folder, result.stdout


def _reference(layout: str) -> str:
    """The one-process run a layout is compared with."""
    return "one_lora" if layout.startswith("lora") else "one"


def _assert_same_pair_stage(ours: Path, reference: Path, stage: str = "stage1") -> None:
    """Each phase's losses and the stage output (both experts) of two runs agree."""
    for expert, steps in PHASE_STEPS[stage].items():
        got = logged_losses(ours / stage / expert / "metrics.jsonl")
        want = logged_losses(reference / stage / expert / "metrics.jsonl")
        assert len(got) == len(want) == steps, expert
        torch.testing.assert_close(torch.tensor(got, dtype=torch.float64),
                                   torch.tensor(want, dtype=torch.float64), rtol=RTOL,
                                   atol=ATOL, msg=lambda m, e=expert: f"{e} losses: {m}")
    got = load_file(str(ours / stage / "model.safetensors"))
    want = load_file(str(reference / stage / "model.safetensors"))
    assert sorted(got) == sorted(want)
    assert {key.split(".")[0] for key in want} == {"high", "low"}
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, rtol=WEIGHT_RTOL, atol=WEIGHT_ATOL, msg=key)


@pytest.mark.slow
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_a_pair_stage_under_torchrun_follows_the_one_process_run(runs, layout):
    folder, _ = runs
    _assert_same_pair_stage(folder / layout, folder / _reference(layout))
    record = json.loads((folder / layout / "stage1" / "done.json").read_text())
    assert sorted(record["experts"]) == ["high", "low"]
    output = load_file(str(folder / layout / "stage1" / "model.safetensors"))
    # A LoRA stage's output is the two adapters alone (rank 0 gathered no base weight).
    assert all(".lora_" in key for key in output) == layout.startswith("lora")


@pytest.mark.slow
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_the_frozen_experts_are_prepared_as_a_teacher_and_the_tokens_split(runs, layout):
    folder, _ = runs
    split = layout.endswith("sequence_parallel")
    for rank in (0, 1):
        seen = json.loads((folder / f"{layout}.rank{rank}.json").read_text())
        # The teacher pair in each phase, and the low phase's lead-in (the finished high
        # expert): FSDP2-sharded (--teacher-sharding shard, the default), split if the run is.
        # With LoRA the phase's expert is the student's model (sharded as the student), so
        # only the other expert is prepared, once per phase (teacher and lead-in views).
        frozen = 2 if layout.startswith("lora") else 5
        assert seen["frozen"] == [[True, split]] * frozen
        # Each rank's own count: the tokens really were split (the results alone would
        # look the same if both ranks ran whole videos).
        assert (seen["all_to_all"] > 100) == split


@pytest.mark.slow
def test_a_lora_pairs_stage_2_under_torchrun_follows_the_one_process_run(runs):
    folder, _ = runs
    _assert_same_pair_stage(folder / LORA_STAGE2, folder / LORA_STAGE2_ONE, "stage2")
    output = load_file(str(folder / LORA_STAGE2 / "stage2" / "model.safetensors"))
    assert all(".lora_" in key for key in output)  # the two adapters alone


@pytest.mark.slow
def test_a_lora_pairs_stage_2_teacher_under_torchrun_is_the_stage_1_output(runs):
    """Each phase's teacher pair on each rank (its adapters on the frozen bases, one expert
    sharded) against stage 1's experts with their adapters merged (float64 product)."""
    folder, _ = runs
    run = RunFolder(load_run_config(folder / LORA_STAGE2, device="cpu"))
    experts = run.load_stage_experts(StageId("gpd", 1))
    for phase in ("high", "low"):
        for rank in (0, 1):
            probe = torch.load(_probe_path(folder / LORA_STAGE2, phase, rank))
            cond = Conditioning(probe["text"])
            for name, expert in zip(("high", "low"), experts, strict=True):
                with torch.no_grad():
                    want = DiTDenoiser(expert)(probe["x"], torch.tensor(PROBE_SIGMA), cond)
                torch.testing.assert_close(probe[name], want, rtol=1e-5, atol=1e-5,
                                           msg=lambda m, e=(phase, rank, name): f"{e}: {m}")


@pytest.mark.slow
def test_a_pair_stage_killed_in_its_low_phase_resumes_on_two_ranks_identically(runs):
    folder, stdout = runs
    assert "stage1/low] resumed from step 1" in stdout
    # Same ranks, same shards, same reductions: the resumed run is bit-identical.
    for expert in ("high", "low"):
        assert logged_losses(folder / KILLED / "stage1" / expert / "metrics.jsonl") == \
            logged_losses(folder / "data_parallel" / "stage1" / expert / "metrics.jsonl")
    resumed = load_file(str(folder / KILLED / "stage1" / "model.safetensors"))
    finished = load_file(str(folder / "data_parallel" / "stage1" / "model.safetensors"))
    assert resumed.keys() == finished.keys()
    assert all(torch.equal(resumed[key], value) for key, value in finished.items())


@pytest.mark.slow
def test_a_pair_stage_killed_on_two_ranks_resumes_in_one_process(runs, capsys):
    folder, _ = runs
    run = folder / KILLED_COPY
    assert not (run / "stage1" / "low" / "expert.safetensors").exists()  # as the kill left it
    _train(folder, KILLED_COPY, ONE_PROCESS, "--resume")
    assert "stage1/low] resumed from step 1" in capsys.readouterr().out
    _assert_same_pair_stage(run, folder / "one")


# -- one process --------------------------------------------------------------------------
def test_a_rank_runs_an_expert_another_rank_needs_and_keeps_its_own_velocities(monkeypatch):
    """RankAlignedPair with every rank's needs given: an expert no own sample needs runs on
    one sample when another rank needs it (its forward gathers the shards), not otherwise;
    the velocities are the plain pair's."""
    data = ProceduralVideos(32, frames=4, size=8, seed=1)
    high, low = random_dit(4), random_dit(5)
    calls: list[tuple[str, int]] = []
    for name, model in (("high", high), ("low", low)):
        model.register_forward_pre_hook(
            lambda _, inputs, name=name: calls.append((name, inputs[0].shape[0])))
    plain = CFG(ExpertPair(DiTDenoiser(high), DiTDenoiser(low), BOUNDARY), data.negative, 2.0)
    aligned = CFG(pair.RankAlignedPair(DiTDenoiser(high), DiTDenoiser(low), BOUNDARY),
                  data.negative, 2.0)
    generator = torch.Generator().manual_seed(0)
    cond, _ = data.draw(generator, 2, with_latents=False)
    x = torch.randn((2, *data.latent_shape), generator=generator)
    for sigma, everyone, want in (
            ([0.9, 0.85], [True, True], [("high", 4), ("low", 1)]),  # another rank: low
            ([0.5, 0.3], [True, True], [("high", 1), ("low", 4)]),
            ([0.9, 0.5], [True, True], [("high", 2), ("low", 2)]),  # mixed: as the pair
            ([0.9, 0.85], [True, False], [("high", 4)])):  # no rank needs the low expert
        sigma = torch.tensor(sigma)
        monkeypatch.setattr(pair, "any_across_ranks", lambda flags, e=everyone: e)
        with torch.no_grad():
            reference = plain(x, sigma, cond)
            calls.clear()
            ours = aligned(x, sigma, cond)
        assert calls == want, sigma
        assert torch.equal(ours, reference)
