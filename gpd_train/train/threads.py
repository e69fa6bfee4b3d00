"""How many CPU threads torch runs on when ``--threads`` is 0: its default, unless other
processes keep cores busy.

torch's CPU ops run in OpenMP parallel regions whose threads wait for each other at the
end of every op, spinning first. With one thread per core (torch's default) and other
busy processes on those cores, each small op waits for a descheduled thread: the demo's
stage 0 went from ~34 it/s on an idle 2-core machine to ~1 it/s beside three busy
single-threaded processes. A process that runs on the cores others leave free (one
thread, at worst, which never waits for another) slows in proportion to its share
instead. benchmarks/busy_machine.sh measures both.

The count is chosen once, at the start (``choose_threads``, from ``MachineLoad``), and kept:
a different count changes the order of float sums and so the digits of every result. On
an idle machine it is torch's default, so the numbers are those of an idle run; ``--threads
N`` (or ``OMP_NUM_THREADS``) fixes it whatever the load.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch

from gpd_train.run.preflight import available_cores

# Long enough for /proc/stat's 10 ms ticks to resolve a busy core to a few percent, short
# beside any stage.
WINDOW_SECONDS = 0.25


@dataclass(frozen=True)
class MachineLoad:
    """What the thread choice depends on."""

    cores: int  # CPU cores this process may run on
    default: int  # torch's thread count before any choice (OMP_NUM_THREADS, else the cores)
    pinned: bool  # OMP_NUM_THREADS is set: the user chose the count
    others_busy: float | None  # cores' worth of CPU other processes use now; None: unknown


def choose_threads(requested: int, load: MachineLoad) -> int:
    """``requested`` when > 0; else torch's default, lowered to the cores other processes
    leave free (a core counts as busy from half use on; never below one thread)."""
    if requested > 0:
        return requested
    if load.pinned or load.others_busy is None:
        return load.default
    free = int(load.cores - load.others_busy + 0.5)
    return max(1, min(load.default, free))


def cpu_ticks(stat: str, cpus: set[int]) -> tuple[int, int]:
    """(busy, total) clock ticks since boot of ``cpus``, from the text of /proc/stat."""
    busy = total = 0
    for line in stat.splitlines():
        name, *fields = line.split()
        if not (name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus):
            continue
        # user nice system idle iowait irq softirq steal (guest time is inside user)
        ticks = [int(value) for value in fields[:8]]
        total += sum(ticks)
        busy += sum(ticks) - ticks[3] - ticks[4]
    return busy, total


def others_busy(before: tuple[int, int], after: tuple[int, int], cpus: int,
                own_cores: float) -> float | None:
    """Cores' worth of CPU used by other processes between two ``cpu_ticks`` readings:
    all busy time less this process's own (``own_cores``: its CPU seconds per second)."""
    busy, total = after[0] - before[0], after[1] - before[1]
    if total <= 0:
        return None
    return max(0.0, busy / total * cpus - own_cores)


def measure_others_busy(window: float = WINDOW_SECONDS) -> float | None:
    """``others_busy`` over ``window`` seconds on the cores this process may use; None where
    /proc/stat cannot be read (not Linux)."""
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set()
    try:
        before, own_before, started = (cpu_ticks(_read_stat(), cpus), _own_cpu_seconds(),
                                       time.perf_counter())
        time.sleep(window)
        after, own_after, ended = (cpu_ticks(_read_stat(), cpus), _own_cpu_seconds(),
                                   time.perf_counter())
    except OSError:
        return None
    return others_busy(before, after, len(cpus),
                       (own_after - own_before) / max(ended - started, 1e-9))


def _read_stat() -> str:
    with open("/proc/stat") as handle:
        return handle.read()


def _own_cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


def set_threads(requested: int) -> str | None:
    """Set this process's torch thread count (``choose_threads``); returns a line for the
    log when the machine's load lowered torch's default."""
    default = torch.get_num_threads()
    pinned = "OMP_NUM_THREADS" in os.environ
    # The measurement costs a quarter second: skipped when its answer could not matter.
    measured = None if requested > 0 or pinned or default == 1 else measure_others_busy()
    load = MachineLoad(available_cores(), default, pinned, measured)
    threads = choose_threads(requested, load)
    if requested > 0 or threads != default:
        torch.set_num_threads(threads)
    if requested > 0 or threads == default:
        return None
    return (f"threads: {threads} instead of torch's default {default}: other processes keep "
            f"{measured:.1f} of the {load.cores} cores busy (--threads N sets the count; "
            "numbers then depend on it, not on the load)")
