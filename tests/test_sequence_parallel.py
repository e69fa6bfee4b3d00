"""Ulysses sequence parallelism of the DiT against the one-process model (gloo, CPU).

One torchrun launch of 4 processes runs every multi-process check (2 cores are shared):
the forward and backward under sp = 4 and under dp = 2 x sp = 2 (blocks checkpointed)
on token counts that need padding (18 -> 20 for sp = 4; 9 -> 10 and 12; 3 tokens over 4
ranks, one rank holding only padding) and one that does not. The reference is the same
model, same weights, in each process without any collective. Rank 0 writes the largest
relative error of each check (max |a - b| / max |b| over outputs and over every parameter
gradient averaged across the ranks) to a JSON file that the tests read.

Tolerance 1e-5 relative in fp32: the split reorders no reduction inside a token (the
projections, norms and FFN are row-wise); attention sums over the same keys with
heads / sp heads per rank, and the gradient average over ranks reassociates the
parameter-gradient sums over tokens - a few ulps. A wrong RoPE position, an unmasked padded
key or a missing gradient share moves the results by percents.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from builders import LORA_VANILLA, logged_losses, parallel_run, point_latest, torchrun
from realscale_fixtures import LATENT_SHAPE, VIDEO, build_wan22_folder

from gpd_kernels import force_fused_dit_ops
from gpd_model import WanDiT, get_preset, save_diffusers
from gpd_model.sequence_parallel import check_size, enable_sequence_parallel, valid_sizes
from gpd_train import parallel
from gpd_train.__main__ import main as train_main
from gpd_train.config.chains import StageId
from gpd_train.config.settings import ParallelConfig
from gpd_train.infer.sample import _split_over_ranks as split_over_ranks
from gpd_train.infer.sample import build_parser as build_sample_parser
from gpd_train.infer.sample import main as sample_main
from gpd_train.run.checkpoint_store import CheckpointStore, read_manifest
from gpd_train.run.files import load_weights
from gpd_train.run.folder import DIFFUSERS_FOLDER
from gpd_train.train.builders import build_distill
from gpd_train.train.pipeline import run_stage

ROOT = Path(__file__).resolve().parents[1]
RTOL = 1e-5
# As tests/test_distributed.py's 1- vs 2-process runs (its docstring gives the reasoning):
# here the reassociated sums are the all-to-all's split of the attention heads and the
# gradient average over the 2 ranks of partial (per-token-block) gradients.
TRAIN_RTOL, TRAIN_ATOL = 2e-5, 1e-7
SEQUENCE_RUN = {"parallel.sequence": 2, "parallel.activation_checkpointing": True,
                **LORA_VANILLA}
# Latent (T, H, W) with the (1, 2, 2) patch: 18, 9 and 3 tokens.
GRIDS = {"18_tokens": (3, 4, 6), "9_tokens": (1, 6, 6), "3_tokens": (1, 2, 6)}


def tiny_config(**overrides):
    values = {"dim": 32, "ffn_dim": 64, "num_heads": 4, "num_layers": 2,
              "patch_size": (1, 2, 2), **overrides}
    return get_preset("tiny", **values)


def inputs(latent: tuple[int, int, int], batch: int, seed: int, per_token: bool = False):
    """per_token: Wan2.2-TI2V's [B, N] timesteps, the first latent frame's tokens at 0."""
    generator = torch.Generator().manual_seed(seed)
    cfg = tiny_config()
    x = torch.randn(batch, cfg.in_channels, *latent, generator=generator)
    timestep = torch.rand(batch, generator=generator) * 1000
    if per_token:
        frames, per_frame = latent[0], latent[1] * latent[2] // 4
        timestep = timestep[:, None].repeat(1, frames * per_frame)
        timestep[:, :per_frame] = 0.0
    context = torch.randn(batch, 5, cfg.text_dim, generator=generator)
    target = torch.randn(batch, cfg.out_channels, *latent, generator=generator)
    return x, timestep, context, target


def loss_of(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample squared error, averaged over the samples (a dp rank's mean of its own)."""
    return (out - target).square().flatten(1).mean(1).mean()


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return float((ours - reference).abs().max() / reference.abs().max())


# -- the worker (runs under torchrun) -----------------------------------------------------
def compare(model: WanDiT, reference: WanDiT, latent, dp_rank: int, dp: int,
            per_token: bool = False) -> float:
    """Largest relative error of this rank's output and of the rank-averaged gradients."""
    x, timestep, context, target = inputs(latent, batch=2 * dp, seed=sum(latent),
                                          per_token=per_token)
    reference.zero_grad()
    expected = reference(x, timestep, context)
    loss_of(expected, target).backward()
    mine = slice(2 * dp_rank, 2 * dp_rank + 2)  # this dp rank's samples
    model.zero_grad()
    out = model(x[mine], timestep[mine], context[mine])
    loss_of(out, target[mine]).backward()
    errors = [relative_error(out.detach(), expected[mine].detach())]
    for (name, param), ref in zip(model.named_parameters(), reference.parameters(),
                                  strict=True):
        grad = param.grad.clone()
        dist.all_reduce(grad)
        errors.append(relative_error(grad / dist.get_world_size(), ref.grad))
        assert ref.grad.abs().max() > 0, name  # every parameter is reached
    return max(errors)


def worker(out_file: Path) -> None:
    from gpd_train.parallel import checkpoint_blocks

    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        torch.manual_seed(0)
        reference = WanDiT(tiny_config())
        results: dict[str, float | str] = {}
        # sp = world: every rank holds all samples, a quarter of the tokens.
        model = copy.deepcopy(reference)
        enable_sequence_parallel(model, dist.group.WORLD)
        for name, latent in GRIDS.items():
            results[f"sp{world}_{name}"] = compare(model, reference, latent, 0, 1)
        # gpd_kernels' fused ops (RMSNorm + RoPE on the rank's rows of the table, adaLN,
        # gated residual; Triton interpreted) against the same ops in one process.
        with force_fused_dit_ops():
            results[f"sp{world}_fused_9_tokens"] = compare(model, reference, GRIDS["9_tokens"],
                                                           0, 1)
        # Per-token timesteps (TI2V): each rank embeds its own tokens' timesteps; 18 tokens
        # padded to 20, 6 of them (the first frame) at timestep 0, eager and fused.
        results[f"sp{world}_per_token_18_tokens"] = compare(
            model, reference, GRIDS["18_tokens"], 0, 1, per_token=True)
        with force_fused_dit_ops():
            results[f"sp{world}_fused_per_token_18_tokens"] = compare(
                model, reference, GRIDS["18_tokens"], 0, 1, per_token=True)
        # dp = 2 x sp = 2 on a DeviceMesh, blocks recomputed in the backward.
        if world == 4:
            mesh = dist.init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "sp"))
            model = copy.deepcopy(reference)
            checkpoint_blocks(model)
            enable_sequence_parallel(model, mesh.get_group("sp"))
            dp_rank = mesh.get_local_rank("dp")
            for name, latent in GRIDS.items():
                results[f"dp2_sp2_{name}"] = compare(model, reference, latent, dp_rank, 2)
        # A 2-head model cannot split its heads over 4 ranks.
        try:
            enable_sequence_parallel(WanDiT(tiny_config(num_heads=2)), dist.group.WORLD)
            results["refused"] = "accepted"
        except ValueError as exc:
            results["refused"] = str(exc)
        everyone: list[dict] = [{} for _ in range(world)]
        dist.all_gather_object(everyone, results)
        if rank == 0:
            merged = {key: (max(r[key] for r in everyone) if key != "refused" else value)
                      for key, value in results.items()}
            out_file.write_text(json.dumps(merged))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def train_worker(run_dir: Path) -> None:
    """GPD stages 0 and 1 (frequency loss on) with each video split over 2 ranks, blocks
    checkpointed, FSDP2 over both; stage 1 resumed from its step-2 checkpoint; the vanilla
    chain's stage 1 as LoRA (the frozen base, sharded, serving as teacher too)."""
    parallel.setup("cpu")
    torch.set_num_threads(1)
    swaps = count_calls(dist, ["all_to_all_single"])
    try:
        # ranks=1: one data group (of 2 ranks) runs the whole global batch's 2 streams.
        run = parallel_run(run_dir, ranks=1, **SEQUENCE_RUN)
        for stage in (0, 1):
            run_stage(run, StageId("gpd", stage), resume=False)
        stage1 = run.stage_folder(StageId("gpd", 1))
        parallel.main_only(shutil.copy, stage1 / "metrics.jsonl", stage1 / "continuous.jsonl")
        parallel.main_only(point_latest, stage1, 2)
        build_distill(run, StageId("gpd", 1)).run(resume=True)
        run_stage(run, StageId("vanilla", 1), resume=False)
        # Each rank's own count: the tokens really were split (the results alone would look
        # the same if both ranks ran whole videos).
        (run_dir / f"all_to_all_calls.{dist.get_rank()}").write_text(str(len(swaps)))
    finally:
        parallel.teardown()


def sample_worker(out_file: Path, argv: list[str]) -> None:
    """The sampler CLI on ``argv``; each rank writes its exit status and, per model that ran
    a forward, whether every forward of it was split (a pair's latents alone would look the
    same with an expert left whole on every rank)."""
    split: dict[int, bool] = {}
    plain = WanDiT.forward

    def recorded(self, *args, **kwargs):
        split[id(self)] = split.get(id(self), True) and self.sequence_parallel is not None
        return plain(self, *args, **kwargs)

    WanDiT.forward = recorded
    status = sample_main(argv)
    out_file.with_suffix(f".{os.environ['RANK']}.json").write_text(
        json.dumps({"status": status, "split": list(split.values())}))


def count_calls(module, names: list[str], patch=setattr) -> list[str]:
    """The names of the ``module`` functions called from now on (each still runs);
    ``patch`` is setattr, or pytest's monkeypatch.setattr to undo it after a test."""
    calls: list[str] = []
    for name in names:
        original = getattr(module, name)

        def counted(*args, _name=name, _original=original, **kwargs):
            calls.append(_name)
            return _original(*args, **kwargs)

        patch(module, name, counted)
    return calls


if __name__ == "__main__":
    if sys.argv[1] == "sample":
        sample_worker(Path(sys.argv[2]), sys.argv[3:])
    else:
        (train_worker if sys.argv[1] == "train" else worker)(Path(sys.argv[2]))
    sys.exit(0)


# -- tests --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("sp") / "results.json"
    launch(torchrun([str(Path(__file__).resolve()), "model", str(out)], ranks=4))
    return json.loads(out.read_text())


def launch(command: list[str]) -> None:
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]


@pytest.fixture(scope="module")
def sequence_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("sp_run") / "run"
    launch(torchrun([str(Path(__file__).resolve()), "train", str(run_dir)]))
    return run_dir


@pytest.mark.slow
def test_gpd_stages_split_over_two_ranks_follow_the_one_process_run(sequence_run, tmp_path,
                                                                    one_thread):
    run = parallel_run(tmp_path / "run", ranks=1)
    for stage in (0, 1):
        run_stage(run, StageId("gpd", stage), resume=False)
        name = f"stage{stage}"
        single = logged_losses(tmp_path / "run" / name / "metrics.jsonl")
        split = logged_losses(sequence_run / name
                              / ("continuous.jsonl" if stage else "metrics.jsonl"))
        assert len(single) == len(split) == (3 if stage == 0 else 4)
        torch.testing.assert_close(torch.tensor(split, dtype=torch.float64),
                                   torch.tensor(single, dtype=torch.float64),
                                   rtol=TRAIN_RTOL, atol=TRAIN_ATOL)
        ours = load_weights(sequence_run / name / "model.safetensors")
        reference = load_weights(tmp_path / "run" / name / "model.safetensors")
        assert sorted(ours) == sorted(reference)
        for key in reference:
            torch.testing.assert_close(ours[key], reference[key], rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_lora_stage_split_over_two_ranks_follows_the_one_process_run(sequence_run, tmp_path,
                                                                     one_thread):
    run = parallel_run(tmp_path / "run", ranks=1, **LORA_VANILLA)
    run_stage(run, StageId("gpd", 0), resume=False)
    run_stage(run, StageId("vanilla", 1), resume=False)
    folder = Path("vanilla") / "stage1"
    single = logged_losses(tmp_path / "run" / folder / "metrics.jsonl")
    split = logged_losses(sequence_run / folder / "metrics.jsonl")
    assert len(single) == len(split) == 2
    torch.testing.assert_close(torch.tensor(split, dtype=torch.float64),
                               torch.tensor(single, dtype=torch.float64),
                               rtol=TRAIN_RTOL, atol=TRAIN_ATOL)
    ours = load_weights(sequence_run / folder / "model.safetensors")
    reference = load_weights(tmp_path / "run" / folder / "model.safetensors")
    assert sorted(ours) == sorted(reference) and all(".lora_" in key for key in ours)
    for key in reference:
        torch.testing.assert_close(ours[key], reference[key], rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_a_split_stage_resumes_from_its_checkpoint_identically(sequence_run):
    stage1 = sequence_run / "stage1"
    assert logged_losses(stage1 / "metrics.jsonl") == logged_losses(stage1 / "continuous.jsonl")
    manifest = read_manifest(CheckpointStore(stage1 / "ckpt").latest())
    # 2 ranks sharing 2 streams of 2 samples: one data group, the global batch of 4.
    assert manifest["world_size"] == 2
    assert (manifest["data_streams"], manifest["stream_batch"]) == (2, 2)
    for rank in (0, 1):
        assert int((sequence_run / f"all_to_all_calls.{rank}").read_text()) > 100


@pytest.mark.slow
def test_a_split_checkpoint_resumes_in_one_process(sequence_run, tmp_path, one_thread):
    run_dir = tmp_path / "run"
    shutil.copytree(sequence_run, run_dir)
    point_latest(run_dir / "stage1", 2)
    trainer = build_distill(parallel_run(run_dir, ranks=1), StageId("gpd", 1))
    trainer.run(resume=True)
    resumed = logged_losses(run_dir / "stage1" / "metrics.jsonl")
    continuous = logged_losses(run_dir / "stage1" / "continuous.jsonl")
    assert resumed[:2] == continuous[:2]
    torch.testing.assert_close(torch.tensor(resumed[2:], dtype=torch.float64),
                               torch.tensor(continuous[2:], dtype=torch.float64),
                               rtol=TRAIN_RTOL, atol=TRAIN_ATOL)


@pytest.mark.slow
def test_sampler_split_over_two_ranks_writes_the_one_process_latents(sequence_run, tmp_path,
                                                                     one_thread):
    # 4 videos, the default (torchrun would take --num for its --numa-binding).
    # The export's diffusers folder states the micro model's shape (the run's preset does not).
    checkpoint = sequence_run / "stage1" / DIFFUSERS_FOLDER
    flags = ["--checkpoint", str(checkpoint), "--device", "cpu", "--seed", "5"]
    launch(torchrun(["-m", "gpd_train.sample", *flags, "--sequence-parallel", "2",
                     "--out", str(tmp_path / "split")]))
    assert sample_main([*flags, "--out", str(tmp_path / "one")]) == 0
    split = load_weights(tmp_path / "split" / "latents.safetensors")["latents"]
    one = load_weights(tmp_path / "one" / "latents.safetensors")["latents"]
    assert split.shape == one.shape == (4, 3, 4, 16, 16)  # the built-in videos: 64 tokens
    torch.testing.assert_close(split, one, rtol=1e-5, atol=1e-6)
    # One writer: no second folder, no staging leftovers.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "split"]


@pytest.mark.slow  # a torchrun launch: 17-18 s measured here on 2 shared cores
def test_a_wan22_pair_split_over_two_ranks_writes_the_one_process_latents(tmp_path,
                                                                          one_thread):
    # Sigma grid 1, 0.9, 0.75, 0.5: one step on the high-noise expert, three on the low one,
    # each guided with its own scale.
    wan22 = build_wan22_folder(tmp_path / "Wan2.2-T2V-tiny-Diffusers", boundary_ratio=0.8)
    flags = [str(v) for v in (
        "--checkpoint", wan22, "--model", wan22, "--prompt", "a red cat runs",
        "--prompt", "the dog jumps over water", "--steps", 4, "--shift", 3.0,
        "--guidance", 5.0, "--guidance-2", 2.0, "--seed", 7, "--device", "cpu",
        "--height", VIDEO["height"], "--width", VIDEO["width"], "--frames", VIDEO["frames"])]
    record = tmp_path / "ranks"
    launch(torchrun([str(Path(__file__).resolve()), "sample", str(record), *flags,
                     "--sequence-parallel", "2", "--out", str(tmp_path / "split")]))
    for rank in (0, 1):
        ran = json.loads(record.with_suffix(f".{rank}.json").read_text())
        assert ran == {"status": 0, "split": [True, True]}, f"rank {rank}: {ran}"
    assert sample_main([*flags, "--out", str(tmp_path / "one")]) == 0
    split = load_weights(tmp_path / "split" / "latents.safetensors")["latents"]
    one = load_weights(tmp_path / "one" / "latents.safetensors")["latents"]
    assert split.shape == one.shape == (2, *LATENT_SHAPE)  # 12 tokens per video
    print("max abs difference to one process:", float((split - one).abs().max()))
    torch.testing.assert_close(split, one, rtol=1e-5, atol=1e-6)
    summary = json.loads((tmp_path / "split" / "summary.json").read_text())
    assert (summary["boundary"], summary["guidance_2"]) == (0.8, 2.0)
    # One writer: no folder but the two outputs, the fixture and the ranks' records.
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "Wan2.2-T2V-tiny-Diffusers", "one", "ranks.0.json", "ranks.1.json", "split"]


@pytest.mark.slow
@pytest.mark.parametrize("case", [f"{layout}_{grid}" for layout in ("sp4", "dp2_sp2")
                                  for grid in sorted(GRIDS)]
                         + ["sp4_fused_9_tokens", "sp4_per_token_18_tokens",
                            "sp4_fused_per_token_18_tokens"])
def test_split_forward_and_gradients_equal_one_process(four_ranks, case):
    assert four_ranks[case] <= RTOL


@pytest.mark.slow
def test_heads_not_divisible_are_refused_naming_valid_sizes(four_ranks):
    assert "size 4 does not divide the model's 2 attention heads" in four_ranks["refused"]
    assert "valid sizes: [1, 2]" in four_ranks["refused"]


# -- one process --------------------------------------------------------------------------
@pytest.fixture()
def world_of_one(tmp_path):
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1),
                            rank=0, world_size=1)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


def test_one_process_runs_no_collective_and_a_world_of_one_equals_it(world_of_one,
                                                                       monkeypatch):
    torch.manual_seed(1)
    model = WanDiT(tiny_config(num_layers=1))
    split = copy.deepcopy(model)
    enable_sequence_parallel(split, world_of_one)
    x, timestep, context, target = inputs(GRIDS["9_tokens"], batch=2, seed=3)
    calls = count_calls(dist, ["all_to_all_single", "all_gather_single",
                               "all_gather_into_tensor", "all_reduce", "all_gather"],
                        monkeypatch.setattr)
    outputs = []
    for net in (model, split):
        calls.clear()
        out = net(x, timestep, context)
        loss_of(out, target).backward()
        outputs.append((out, list(calls)))
    (plain, plain_calls), (ours, split_calls) = outputs
    assert plain_calls == []
    # Forward: an all-to-all there and one back in the (one) layer; backward: the same two,
    # and the gather's reduce-scatter.
    assert split_calls.count("all_to_all_single") == 2 * 2 + 1
    torch.testing.assert_close(ours, plain, rtol=1e-6, atol=1e-7)
    for (name, a), b in zip(split.named_parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_sizes_that_do_not_divide_the_heads_are_refused():
    assert valid_sizes(12) == [1, 2, 3, 4, 6, 12] and valid_sizes(40)[-3:] == [10, 20, 40]
    check_size(4, 40)
    with pytest.raises(ValueError, match=r"size 3 does not divide the model's 40 attention "
                                         r"heads .*valid sizes: \[1, 2, 4, 5, 8, 10, 20, 40\]"):
        check_size(3, 40)
    with pytest.raises(ValueError, match="must be an int >= 1, got 0"):
        check_size(0, 12)
    with pytest.raises(ValueError, match="needs an initialised process group"):
        enable_sequence_parallel(WanDiT(tiny_config(num_layers=1)), None)
    with pytest.raises(TypeError, match="expected a WanDiT, got Linear"):
        enable_sequence_parallel(torch.nn.Linear(2, 2), None)


# -- bad sizes ----------------------------------------------------------------------------
@pytest.mark.parametrize("flags,message", [
    (["--sequence-parallel", "0"], "parallel.sequence (--sequence-parallel) must be an int >= 1, "
                                   "got 0"),
    (["--sequence-parallel", "2"], "--sequence-parallel 2 splits each video over 2 processes: "
                                   "launch with torchrun --nproc_per_node 2"),
    (["--sequence-parallel", "4"], "--sequence-parallel 4: sequence-parallel size 4 does not "
                                   "divide the model's 2 attention heads"),
])
def test_trainer_refuses_bad_sequence_sizes_naming_the_fix(micro, capsys, flags, message):
    assert train_main([*micro, "--stage", "0", *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_sequence_size_must_divide_the_ranks(monkeypatch):
    monkeypatch.setattr(parallel, "_world", parallel.World(world_size=6, distributed=True))
    with pytest.raises(ValueError, match=r"--sequence-parallel 4 must divide the 6 ranks .*"
                                         r"dividing both the ranks and the model's 12 heads: "
                                         r"\[1, 2, 3, 6\]"):
        parallel.set_sequence(4, 12)
    with pytest.raises(ValueError, match="parallel.data_streams \\(3\\) must be a multiple of "
                                         "the number of data groups \\(2, of 3 ranks"):
        monkeypatch.setattr(parallel, "_world", parallel.World(world_size=6, distributed=True,
                                                               sequence=3))
        parallel.owned_streams(ParallelConfig(data_streams=3, sequence=3))


def test_sampler_refuses_bad_sequence_sizes_naming_the_fix(tmp_path, capsys, monkeypatch):
    folder = save_diffusers(WanDiT(tiny_config(num_layers=1)), tmp_path / "model")
    flags = ["--checkpoint", str(folder), "--device", "cpu", "--out", str(tmp_path / "out")]
    assert sample_main([*flags, "--sequence-parallel", "2"]) == 2
    assert ("--sequence-parallel 2 splits each video over 2 processes: launch with torchrun "
            "--nproc_per_node 2") in capsys.readouterr().err
    assert sample_main([*flags, "--sequence-parallel", "0"]) == 2
    assert "--sequence-parallel must be" in capsys.readouterr().err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    flags[flags.index("cpu")] = "auto"
    assert sample_main([*flags, "--sequence-parallel", "2"]) == 2
    assert ("splitting each video over 2 ranks (--sequence-parallel 2) needs the eager sampler "
            "(the CUDA-graph sampler is single-GPU): add --eager") in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "2")  # under torchrun: split over all ranks by default
    assert sample_main(flags) == 2
    assert "add --eager" in capsys.readouterr().err
    monkeypatch.delenv("WORLD_SIZE")
    assert not (tmp_path / "out").exists()
    # Under torchrun the sampler splits each video over all the ranks started.
    monkeypatch.setattr(parallel, "_world", parallel.World(world_size=4, distributed=True))
    args = build_sample_parser().parse_args([*flags, "--sequence-parallel", "2"])
    with pytest.raises(ValueError, match="splits each video over all 4 processes torchrun "
                                         "started; pass --sequence-parallel 4 or "
                                         "--nproc_per_node 2"):
        split_over_ranks(args, WanDiT(tiny_config(num_layers=1)))
