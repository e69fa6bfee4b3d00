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
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from gpd_model import WanDiT, get_preset
from gpd_model.sequence_parallel import check_size, enable_sequence_parallel, valid_sizes

ROOT = Path(__file__).resolve().parents[1]
RTOL = 1e-5
# Latent (T, H, W) with the (1, 2, 2) patch: 18, 9 and 3 tokens.
GRIDS = {"18_tokens": (3, 4, 6), "9_tokens": (1, 6, 6), "3_tokens": (1, 2, 6)}


def tiny_config(**overrides):
    values = {"dim": 32, "ffn_dim": 64, "num_heads": 4, "num_layers": 2,
              "patch_size": (1, 2, 2), **overrides}
    return get_preset("tiny", **values)


def inputs(latent: tuple[int, int, int], batch: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    cfg = tiny_config()
    x = torch.randn(batch, cfg.in_channels, *latent, generator=generator)
    timestep = torch.rand(batch, generator=generator) * 1000
    context = torch.randn(batch, 5, cfg.text_dim, generator=generator)
    target = torch.randn(batch, cfg.out_channels, *latent, generator=generator)
    return x, timestep, context, target


def loss_of(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample squared error, averaged over the samples (a dp rank's mean of its own)."""
    return (out - target).square().flatten(1).mean(1).mean()


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return float((ours - reference).abs().max() / reference.abs().max())


# -- the worker (runs under torchrun) -----------------------------------------------------
def compare(model: WanDiT, reference: WanDiT, latent, dp_rank: int, dp: int) -> float:
    """Largest relative error of this rank's output and of the rank-averaged gradients."""
    x, timestep, context, target = inputs(latent, batch=2 * dp, seed=sum(latent))
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


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
    sys.exit(0)


# -- tests --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("sp") / "results.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node=4", str(Path(__file__).resolve()), str(out)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return json.loads(out.read_text())


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["sp4", "dp2_sp2"])
@pytest.mark.parametrize("grid", sorted(GRIDS))
def test_split_forward_and_gradients_equal_one_process(four_ranks, layout, grid):
    assert four_ranks[f"{layout}_{grid}"] <= RTOL


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
    calls: list[str] = []
    for name in ("all_to_all_single", "all_gather_single", "all_gather_into_tensor",
                 "all_reduce", "all_gather"):
        original = getattr(dist, name)

        def counted(*args, _name=name, _original=original, **kwargs):
            calls.append(_name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(dist, name, counted)
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
