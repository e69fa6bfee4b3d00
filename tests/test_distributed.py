"""Multi-process training on the CPU (gloo, FSDP2, DCP), launched by torchrun from the tests.

Workers are this file run as a script under ``python -m torch.distributed.run``.

Tolerance of the 1-process vs 2-process comparisons: the data-stream partition makes the
global batch the same sample for sample (stream j has its own generator and lanes,
whichever process runs it), every stream's forward runs on the same shapes with one thread,
and the initial weights are identical. What differs is only where float32 sums are
reassociated: the gradient average (autograd's accumulation of two streams vs gloo's
reduce-scatter), the global gradient norm (per-shard partial norms vs one norm) and the
logged mean (float32 mean vs float64 all-reduce). Each is a few ulps (~1e-7 relative) per
step; Adam divides by sqrt(v), which keeps such relative errors relative, so over the
handful of steps here we allow 2e-5 relative (plus 1e-7 absolute for values near zero).
A wrong partition (different samples) moves the loss by percents, and a missing or doubled
gradient average changes it from the second step on by far more than the tolerance.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from builders import (
    LORA_VANILLA,
    logged_losses,
    parallel_run,
    point_latest,
    torchrun,
)

from gpd_model import WanDiT, get_preset, load_checkpoint
from gpd_train import parallel
from gpd_train.__main__ import main
from gpd_train.config.chains import StageId
from gpd_train.config.settings import ParallelConfig
from gpd_train.run.checkpoint_store import CheckpointStore, is_dcp, read_manifest
from gpd_train.run.files import CheckpointError, load_weights
from gpd_train.run.folder import DIFFUSERS_FOLDER
from gpd_train.train.builders import build_distill
from gpd_train.train.pipeline import run_stage
from gpd_train.train.streams import StreamGroup, stream_objectives

pytestmark = pytest.mark.slow  # subprocesses and compilers: minutes on 2 cores

ROOT = Path(__file__).resolve().parents[1]
RTOL, ATOL = 2e-5, 1e-7


# -- the worker (runs under torchrun) -----------------------------------------------------
def worker(run_dir: Path) -> None:
    """Stage 0 and stage 1 on 2 ranks (activation checkpointing on), the vanilla chain's
    stage 1 as LoRA (base frozen and sharded, adapters trained), then stage 1 resumed from
    its step-2 DCP checkpoint on the same 2 ranks."""
    parallel.setup("cpu")
    torch.set_num_threads(1)
    try:
        run = parallel_run(run_dir, parallel.world().world_size,
                           **{"parallel.activation_checkpointing": True, **LORA_VANILLA})
        run_stage(run, StageId("gpd", 0), resume=False)
        run_stage(run, StageId("gpd", 1), resume=False)
        run_stage(run, StageId("vanilla", 1), resume=False)
        stage1 = run.stage_folder(StageId("gpd", 1))
        parallel.main_only(shutil.copy, stage1 / "metrics.jsonl", stage1 / "continuous.jsonl")
        parallel.main_only(point_latest, stage1, 2)
        build_distill(run, StageId("gpd", 1)).run(resume=True)
    finally:
        parallel.teardown()


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
    sys.exit(0)


# -- tests --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("two_ranks") / "run"
    result = subprocess.run(torchrun([str(Path(__file__).resolve()), str(run_dir)]), cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return run_dir


def test_two_ranks_follow_the_one_process_loss_curve(two_rank_run, tmp_path, one_thread):
    run = parallel_run(tmp_path / "run", ranks=1)
    for stage in (0, 1):
        run_stage(run, StageId("gpd", stage), resume=False)
        name = f"stage{stage}"
        single = logged_losses(tmp_path / "run" / name / "metrics.jsonl")
        metrics = "continuous.jsonl" if stage == 1 else "metrics.jsonl"
        double = logged_losses(two_rank_run / name / metrics)
        assert len(single) == len(double) == (3 if stage == 0 else 4)
        torch.testing.assert_close(torch.tensor(double, dtype=torch.float64),
                                   torch.tensor(single, dtype=torch.float64), rtol=RTOL, atol=ATOL)
        # The consolidated EMA output (gathered from the shards) matches the 1-process one.
        ours = load_weights(two_rank_run / name / "model.safetensors")
        reference = load_weights(tmp_path / "run" / name / "model.safetensors")
        assert sorted(ours) == sorted(reference)
        for key in reference:
            torch.testing.assert_close(ours[key], reference[key], rtol=1e-4, atol=1e-6)


def test_lora_stage_on_two_ranks_follows_the_one_process_run(two_rank_run, tmp_path,
                                                              one_thread):
    run = parallel_run(tmp_path / "run", ranks=1, **LORA_VANILLA)
    run_stage(run, StageId("gpd", 0), resume=False)
    run_stage(run, StageId("vanilla", 1), resume=False)
    single = logged_losses(tmp_path / "run" / "vanilla" / "stage1" / "metrics.jsonl")
    double = logged_losses(two_rank_run / "vanilla" / "stage1" / "metrics.jsonl")
    assert len(single) == len(double) == 2
    torch.testing.assert_close(torch.tensor(double, dtype=torch.float64),
                               torch.tensor(single, dtype=torch.float64), rtol=RTOL, atol=ATOL)
    ours = load_weights(two_rank_run / "vanilla" / "stage1" / "model.safetensors")
    reference = load_weights(tmp_path / "run" / "vanilla" / "stage1" / "model.safetensors")
    assert sorted(ours) == sorted(reference) and all(".lora_" in key for key in ours)
    for key in reference:
        torch.testing.assert_close(ours[key], reference[key], rtol=1e-4, atol=1e-6)
    assert not (two_rank_run / "vanilla" / "stage1" / DIFFUSERS_FOLDER).exists()


def test_stage_export_is_readable_as_diffusers_and_by_the_next_stage(two_rank_run):
    stage1 = two_rank_run / "stage1"
    ema = load_weights(stage1 / "model.safetensors")
    model = WanDiT(get_preset("tiny", dim=32, ffn_dim=64, num_layers=2))
    assert load_checkpoint(model, stage1 / DIFFUSERS_FOLDER) == "diffusers"
    for key, value in model.state_dict().items():
        assert torch.equal(value, ema[key]), key
    # The 2-rank run's stage-1 student started from its own stage-0 export (done.json).
    assert json.loads((two_rank_run / "stage0" / "done.json").read_text())["stage"] == "stage0"


def test_dcp_checkpoint_resumes_on_two_ranks_identically(two_rank_run):
    stage1 = two_rank_run / "stage1"
    continuous = logged_losses(stage1 / "continuous.jsonl")
    resumed = logged_losses(stage1 / "metrics.jsonl")
    # Same ranks, same shards, same reductions: the resumed steps 3 and 4 are bit-identical.
    assert resumed == continuous


def test_dcp_checkpoint_from_two_ranks_resumes_in_one_process(two_rank_run, tmp_path,
                                                               one_thread):
    run_dir = tmp_path / "run"
    shutil.copytree(two_rank_run, run_dir)
    stage1 = run_dir / "stage1"
    point_latest(stage1, 2)
    assert is_dcp(CheckpointStore(stage1 / "ckpt").latest())
    trainer = build_distill(parallel_run(run_dir, ranks=1), StageId("gpd", 1))
    trainer.run(resume=True)
    resumed = logged_losses(stage1 / "metrics.jsonl")
    continuous = logged_losses(stage1 / "continuous.jsonl")
    assert resumed[:2] == continuous[:2]  # kept from before the checkpoint
    torch.testing.assert_close(torch.tensor(resumed[2:], dtype=torch.float64),
                               torch.tensor(continuous[2:], dtype=torch.float64),
                               rtol=RTOL, atol=ATOL)
    final_ema = load_weights(two_rank_run / "stage1" / "model.safetensors")  # step 4, 2 ranks
    for key, value in trainer.ema.state_dict().items():
        torch.testing.assert_close(value, final_ema[key], rtol=1e-4, atol=1e-6)


def test_resume_on_another_layout_is_refused_with_the_flags_to_use(two_rank_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(two_rank_run, run_dir)
    run = parallel_run(run_dir, ranks=1, **{"parallel.data_streams": 1})
    trainer = build_distill(run, StageId("gpd", 1))
    with pytest.raises(ValueError, match="2 data streams of 2 samples .*this run has 1 of 4.*"
                                         "--data-streams 2 --batch-size 4"):
        trainer.run(resume=True)
    shard = next((CheckpointStore(run_dir / "stage1" / "ckpt").latest()).glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:-8])
    with pytest.raises(CheckpointError, match="is corrupt .*the manifest says"):
        read_manifest(shard.parent)


def _children(pid: int) -> dict[int, int]:
    """{rank: pid} of the worker processes torchrun ``pid`` started."""
    ranks = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            env = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        rank = [v for v in env if v.startswith(b"RANK=")]
        if parent == pid and rank:
            ranks[int(rank[0][5:])] = int(entry.name)
    return ranks


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs /proc (Linux)")
@pytest.mark.parametrize("layout,resume_layout", [
    ([], ["--data-streams", "2", "--batch-size", "2"]),  # 2 ranks x 1 sample: 2 streams of 1
    # Each video split over both ranks: one data group, one stream of 1 sample.
    (["--sequence-parallel", "2"], ["--batch-size", "1"]),
], ids=["data-parallel", "sequence-parallel"])
def test_killing_one_rank_leaves_the_last_checkpoint_loadable(tmp_path, layout, resume_layout):
    run_dir = tmp_path / "run"
    flags = ["--stage", "0", "--run-dir", str(run_dir), "--device", "cpu", "--batch-size", "1",
             "--checkpoint-every", "1"]
    # Enough iterations that the kill lands mid-run; resuming keeps them (a changed
    # iteration count is refused), with rarer checkpoints so finishing is quick.
    iterations = ["--teacher-iterations", "200"]
    launcher = subprocess.Popen(torchrun(["-m", "gpd_train", *flags, *iterations, *layout]),
                                cwd=ROOT, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
    store = CheckpointStore(run_dir / "stage0" / "ckpt")
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and launcher.poll() is None:
            latest = store.latest() if (store.folder / "latest").exists() else None
            if latest is not None and latest.name >= "step-00000003":
                break
            time.sleep(0.2)
        assert launcher.poll() is None, launcher.stderr.read()[-4000:]
        workers = _children(launcher.pid)
        assert sorted(workers) == [0, 1]
        os.kill(workers[1], signal.SIGKILL)  # mid-run: training and checkpointing every step
        launcher.wait(timeout=60)  # torchrun stops the surviving rank and fails
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
    assert launcher.returncode != 0
    latest = store.latest()
    manifest = read_manifest(latest)
    assert is_dcp(latest) and manifest["world_size"] == 2
    # The checkpoint loads in one process (the same streams) and the stage finishes from it.
    step = manifest["step"]
    assert step < 200
    assert main([*flags, "--resume", *resume_layout, *iterations,
                 "--checkpoint-every", "1000"]) == 0
    records = [json.loads(line) for line in
               (run_dir / "stage0" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 201))
    assert (run_dir / "stage0" / "done.json").is_file()


# -- helpers' argument checks -------------------------------------------------------------
@pytest.mark.parametrize("field,value,message", [
    ("data_streams", -1, "data_streams must be an int >= 0, got -1"),
    ("activation_checkpointing", "yes", "activation_checkpointing must be true or false"),
    ("teacher", "copy", r"teacher must be one of \('shard', 'replicate'\), got 'copy'"),
])
def test_parallel_config_errors(field, value, message):
    with pytest.raises(ValueError, match=message):
        ParallelConfig(**{field: value}).validate()


def test_single_process_streams_and_errors():
    base = torch.Generator().manual_seed(7)
    made = []
    objective, generator = stream_objectives(
        base, 6, ParallelConfig(data_streams=3), lambda g, b: made.append((g, b)) or object())
    assert isinstance(objective, StreamGroup) and objective.ids == [0, 1, 2]
    assert generator is base and [b for _, b in made] == [2, 2, 2]
    seeds = [g.initial_seed() for g, _ in made]
    assert seeds[0] == 7 and len(set(seeds)) == 3
    alone, same = stream_objectives(base, 6, ParallelConfig(), lambda g, b: ("o", b))
    assert alone == ("o", 6) and same is base  # the unchanged single-process objective
    with pytest.raises(ValueError, match="per-rank batch 5 must be a multiple of the data "
                                         r"streams per rank \(2\)"):
        stream_objectives(base, 5, ParallelConfig(data_streams=2), lambda g, b: b)
    with pytest.raises(ValueError, match="one generator and objective per stream id, got 2 ids"):
        StreamGroup([0, 1], [base], [object()])
    with pytest.raises(TypeError, match="base must be a torch.Generator, got int"):
        parallel.stream_generator(3, 1)
    teacher = WanDiT(get_preset("tiny", dim=32, ffn_dim=64, num_layers=1))
    with pytest.raises(ValueError, match="stage teacher must be frozen"):
        parallel.prepare_teacher(teacher, ParallelConfig(), "fp32", torch.device("cpu"))
    with pytest.raises(TypeError, match="expected a tensor, got float"):
        parallel.all_finite(1.0)
    assert parallel.mean_across_ranks({"loss": 2.0}) == {"loss": 2.0}


def test_setup_refuses_a_fixed_gpu_under_torchrun(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(ValueError, match=r"pass --device auto or cuda .*got 'cuda:1'"):
        parallel.setup("cuda:1")
    monkeypatch.setenv("RANK", "one")
    with pytest.raises(ValueError, match="RANK must be an integer .*got 'one'"):
        parallel.setup("cpu")
    assert not parallel.world().distributed
