"""Data-parallel training on PyTorch's own stack: torchrun, FSDP2, per-rank data streams.

Everything that depends on the number of processes is decided here, so the trainer reads
the same with one process or many:

- ``setup`` joins the process group torchrun describes in the environment (NCCL on CUDA,
  gloo on the CPU; each rank on ``cuda:LOCAL_RANK``) and mutes stdout on ranks > 0;
  without torchrun it does nothing and the run is the plain single-process one.
- ``shard_student`` / ``prepare_teacher`` wrap a WanDiT with FSDP2 (``fully_shard`` per
  transformer block, then the root), bf16 compute and fp32 master weights / gradient
  reduction when the run's precision is bf16 on CUDA; optional per-block activation
  checkpointing. Optimizer state and the EMA follow the parameters (sharded DTensors).
- Data streams: the global batch is cut into ``data_streams`` streams (default: one per
  rank), each with its own generator (stream 0 keeps the single-process seed, stream j
  is offset by ``j``), its own rollout lanes and its own objective. A rank owns a
  contiguous run of streams, so the global batch - and a resumed run - do not depend on
  how many processes share it.
- ``mean_across_ranks`` / ``all_finite`` / ``main_only`` keep logging, the non-finite
  guard and one-writer outputs consistent across ranks; ``any_across_ranks`` lets the ranks
  agree on which sharded networks to run (an expert pair, gpd_train.train.pair) and
  ``gathered_on_main`` brings sharded weights to the one writer.
- Sequence parallelism (``parallel.sequence`` = S): the ranks form a (data, sequence)
  mesh of (world / S) x S; the S ranks of a data group run the same data streams (same
  samples and noise) and split each video's tokens (gpd_model.sequence_parallel, Ulysses
  attention on the mesh's sequence groups). FSDP2 still shards over all ranks: its gradient
  average over the S ranks of a group is the group's gradient (the DiT's collectives are
  written for that), the average over the data groups the global-batch gradient.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TextIO, TypeVar

import torch
import torch.distributed as dist
import torch.nn as nn

from gpd_model.sequence_parallel import check_size, enable_sequence_parallel, valid_sizes
from gpd_train.config.settings import ParallelConfig
from gpd_train.errors import ConfigError

# Streams j > 0 seed their generator at base_seed + j * STREAM_SEED_STRIDE (a prime larger
# than any offset gpd_train adds to a run's seed, so streams never share a sequence).
STREAM_SEED_STRIDE = 1_000_003
PROCESS_GROUP_TIMEOUT = timedelta(minutes=30)  # rank 0 alone writes the stage export

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    """This process's place in the job; the default is the single-process run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    distributed: bool = False
    sequence: int = 1  # ranks splitting each video (consecutive ranks: one data group)
    sequence_group: Any = None  # this rank's sequence group when sequence > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def data_rank(self) -> int:
        """Which data group (set of ranks sharing samples) this rank belongs to."""
        return self.rank // self.sequence

    @property
    def data_ranks(self) -> int:
        return self.world_size // self.sequence


_world = World()
_muted_stdout: tuple[TextIO, TextIO] | None = None  # (the real stdout, /dev/null) on ranks > 0


def world() -> World:
    return _world


def is_main() -> bool:
    return _world.is_main


def _env_int(name: str) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name} must be an integer (set by torchrun), "
                         f"got {value!r}") from None


def setup(device: str = "auto") -> World:
    """Join torchrun's process group (env://); a no-op when not launched by torchrun.

    ``device`` is the run's device setting: ``auto``/``cuda`` put rank r on
    ``cuda:LOCAL_RANK`` with NCCL, ``cpu`` (or no CUDA) uses gloo.
    """
    global _world, _muted_stdout
    if not isinstance(device, str):
        raise TypeError(f"device must be a string, got {type(device).__name__}")
    if _world.distributed:
        return _world
    if "WORLD_SIZE" not in os.environ:
        return _world
    rank, world_size = _env_int("RANK"), _env_int("WORLD_SIZE")
    local_rank = _env_int("LOCAL_RANK")
    if device.startswith("cuda:"):
        raise ConfigError(f"under torchrun pass --device auto or cuda (each rank uses "
                         f"cuda:LOCAL_RANK), got {device!r}")
    use_cuda = device != "cpu" and torch.cuda.is_available()
    if device == "cuda" and not use_cuda:
        raise ConfigError("device 'cuda' requested but CUDA is not available")
    if use_cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if use_cuda else "gloo", timeout=PROCESS_GROUP_TIMEOUT)
    _world = World(rank=rank, world_size=world_size, local_rank=local_rank, distributed=True)
    if rank != 0:  # one voice: progress, prints and reports come from rank 0
        _muted_stdout = (sys.stdout, open(os.devnull, "w"))  # closed by teardown()
        sys.stdout = _muted_stdout[1]
    return _world


def teardown() -> None:
    """Leave the process group and restore stdout (for tests running several jobs)."""
    global _world, _muted_stdout
    if _world.distributed and dist.is_initialized():  # only the group setup() joined
        # Every rank first reaches this point: a rank that destroyed its group while another
        # still had gloo work in flight aborted that rank at exit ("terminate called without
        # an active exception", ~1 in 6 two-rank CPU runs).
        dist.barrier()
        dist.destroy_process_group()
    if _muted_stdout is not None:
        sys.stdout, devnull = _muted_stdout
        devnull.close()
        _muted_stdout = None
    _world = World()


def set_sequence(size: int, num_heads: int) -> World:
    """Split each video over ``size`` ranks (``--sequence-parallel``) for a model with
    ``num_heads`` heads; builds the (data, sequence) mesh once. 1 is the plain layout."""
    global _world
    if size == _world.sequence:
        if size > 1:
            _check_sequence(size, num_heads)
        return _world
    _check_sequence(size, num_heads)
    group = None
    if size > 1:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(_collective_device().type, (_world.world_size // size, size),
                                mesh_dim_names=("data", "sequence"))
        group = mesh.get_group("sequence")
    _world = dataclasses.replace(_world, sequence=size, sequence_group=group)
    return _world


def _check_sequence(size: int, num_heads: int) -> None:
    flag = f"--sequence-parallel {size}"
    try:
        check_size(size, num_heads)
    except ValueError as exc:
        raise ConfigError(f"{flag}: {exc}") from None
    if size > 1 and not _world.distributed:
        raise ConfigError(f"{flag} splits each video over {size} processes: launch with "
                          f"torchrun --nproc_per_node {size} (or a multiple of {size}), or drop "
                          "it")
    if _world.world_size % size:
        both = [n for n in valid_sizes(num_heads) if _world.world_size % n == 0]
        raise ConfigError(f"{flag} must divide the {_world.world_size} ranks (each video is "
                          f"split over {size} of them); sizes dividing both the ranks and the "
                          f"model's {num_heads} heads: {both}")


def split_sequence(model: nn.Module) -> nn.Module:
    """``model`` (a WanDiT) with its tokens split over this rank's sequence group, when the
    run splits sequences (``set_sequence``); unchanged otherwise."""
    if _world.sequence > 1:
        enable_sequence_parallel(model, _world.sequence_group)
    return model


def _collective_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    if _world.distributed:
        dist.barrier()


def full_value(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor gathered to a plain tensor (collective); other tensors as they are."""
    from torch.distributed.tensor import DTensor

    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"expected a tensor, got {type(tensor).__name__}")
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def mean_across_ranks(values: dict[str, float]) -> dict[str, float]:
    """Each value averaged over the ranks (every rank must pass the same keys)."""
    if not _world.distributed:
        return dict(values)
    keys = sorted(values)
    packed = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64,
                          device=_collective_device())
    dist.all_reduce(packed)
    return dict(zip(keys, (packed / _world.world_size).tolist(), strict=True))


def all_finite(value: torch.Tensor) -> bool:
    """True when ``value`` is finite on every rank, so all ranks stop together."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"expected a tensor, got {type(value).__name__}")
    finite = bool(torch.isfinite(full_value(value)).all())
    if not _world.distributed:
        return finite
    flag = torch.tensor([0 if finite else 1], device=_collective_device())
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag.item()) == 0


def any_across_ranks(flags: list[bool]) -> list[bool]:
    """Each flag true on any rank (every rank must pass as many flags)."""
    if not _world.distributed:
        return list(flags)
    packed = torch.tensor([int(bool(flag)) for flag in flags], device=_collective_device())
    dist.all_reduce(packed, op=dist.ReduceOp.MAX)
    return [bool(value) for value in packed.tolist()]


def gathered_on_main(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state``'s tensors (sharded DTensors or plain) gathered one at a time (peak: one full
    tensor), on the CPU on rank 0; the other ranks get an empty dict. Collective: every
    rank passes its own view of the same state."""
    gathered = {}
    for key, value in state.items():
        full = full_value(value).detach()
        if _world.is_main:
            gathered[key] = full.cpu()
    return gathered


def main_only(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run ``fn`` on rank 0 only and hand its result (or its failure) to every rank."""
    if not _world.distributed:
        return fn(*args, **kwargs)
    outcome: list[Any] = [None]
    failure: BaseException | None = None
    if _world.is_main:
        try:
            outcome[0] = ("ok", fn(*args, **kwargs))
        except Exception as exc:  # re-raised below, after the other ranks are told
            failure = exc
            outcome[0] = ("error", f"{type(exc).__name__}: {exc}")
    dist.broadcast_object_list(outcome, src=0)
    status, value = outcome[0]
    if failure is not None:
        raise failure
    if status == "error":
        raise RuntimeError(f"rank 0 failed: {value}")
    return value


# -- data streams -----------------------------------------------------------------------
def owned_streams(config: ParallelConfig) -> list[int]:
    """The data streams this rank runs (contiguous; all of them in a single process; the
    same for the ranks of one sequence group)."""
    groups = _world.data_ranks  # the ranks, or the data groups under sequence parallelism
    total = config.data_streams or groups
    if total % groups:
        what = (f"data groups ({groups}, of {_world.sequence} ranks splitting each video)"
                if _world.sequence > 1 else f"ranks ({groups})")
        raise ConfigError(f"parallel.data_streams ({total}) must be a multiple of the number "
                         f"of {what}")
    per_rank = total // groups
    return list(range(_world.data_rank * per_rank, (_world.data_rank + 1) * per_rank))


def stream_generator(base: torch.Generator, stream: int) -> torch.Generator:
    """Stream 0 is ``base`` itself (the single-process run); stream j is offset by j."""
    if not isinstance(base, torch.Generator):
        raise TypeError(f"base must be a torch.Generator, got {type(base).__name__}")
    if stream == 0:
        return base
    return torch.Generator().manual_seed(base.initial_seed() + stream * STREAM_SEED_STRIDE)






def stream_batch(config: ParallelConfig, batch_size: int) -> int:
    """Samples per data stream for a per-rank ``batch_size``."""
    return batch_size // len(owned_streams(config))


# -- sharding ---------------------------------------------------------------------------
def checkpoint_blocks(model: nn.Module) -> None:
    """Recompute each transformer block in the backward instead of keeping its activations.

    Patches the blocks' ``forward`` (parameter names, hence checkpoints, stay the same).
    """
    from torch.utils.checkpoint import checkpoint

    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.ModuleList):
        raise TypeError(f"expected a WanDiT (with .blocks), got {type(model).__name__}")
    for block in blocks:
        if "forward" not in vars(block):  # idempotent
            block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)


def _mixed_precision(precision: str, device: torch.device) -> Any:
    from torch.distributed.fsdp import MixedPrecisionPolicy

    # Inputs are not cast: the model casts latents/text itself and keeps the timestep in
    # fp32 (a bf16 timestep near 1000 would be rounded by up to 4).
    if precision == "bf16" and device.type == "cuda":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                    cast_forward_inputs=False)
    return MixedPrecisionPolicy(cast_forward_inputs=False)


def _fully_shard(model: nn.Module, precision: str, device: torch.device) -> None:
    from torch.distributed.fsdp import fully_shard

    policy = _mixed_precision(precision, device)
    for block in model.blocks:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)  # embeddings and head: the root group


def shard_student(model: nn.Module, config: ParallelConfig, precision: str,
                  device: torch.device) -> nn.Module:
    """The trained model: FSDP2 under torchrun, activation checkpointing when asked."""
    split_sequence(model)
    if config.activation_checkpointing:
        checkpoint_blocks(model)
    if _world.distributed:
        _fully_shard(model, precision, device)
    return model


def prepare_teacher(teacher: nn.Module, config: ParallelConfig, precision: str,
                    device: torch.device) -> nn.Module:
    """The frozen stage teacher: FSDP2-sharded (no gradients) or a full copy per rank."""
    if any(p.requires_grad for p in teacher.parameters()):
        raise ConfigError("the stage teacher must be frozen (requires_grad_(False)) first")
    split_sequence(teacher)
    if _world.distributed and config.teacher == "shard":
        _fully_shard(teacher, precision, device)
    return teacher
