"""The thread count of a command with --threads 0 (gpd_train/train/threads.py): torch's default on
an idle machine, the cores left free by busy ones, never a different count when idle."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import torch

from gpd_train.__main__ import main as train
from gpd_train.train import threads
from gpd_train.train.threads import MachineLoad, choose_threads, cpu_ticks, others_busy

measure_others_busy = threads.measure_others_busy  # conftest replaces it during each test


@pytest.mark.parametrize(("cores", "default", "busy", "want"), [
    (2, 2, 0.0, 2),  # idle: torch's default, the digits of an idle run
    (2, 2, 0.49, 2),  # daemons: less than half a core is no busy core
    (2, 2, 0.6, 1),
    (2, 2, 3.0, 1),  # three busy processes on two cores: one thread, never zero
    (8, 8, 2.2, 6),
    (8, 4, 2.0, 4),  # the default is an upper bound: free cores never raise it
    (3, 3, 1.5, 2),  # half a core busy rounds up to a busy core
    (1, 1, 5.0, 1),
])
def test_auto_threads_leave_the_busy_cores(cores, default, busy, want):
    assert choose_threads(0, MachineLoad(cores, default, False, busy)) == want


@pytest.mark.parametrize("load", [MachineLoad(2, 2, True, 3.0), MachineLoad(2, 2, False, None)])
def test_pinned_or_unknown_load_keeps_torchs_default(load):
    assert choose_threads(0, load) == 2


def test_a_requested_count_is_kept_whatever_the_load():
    assert choose_threads(2, MachineLoad(2, 2, False, 3.0)) == 2
    assert choose_threads(1, MachineLoad(4, 4, False, 0.0)) == 1


STAT = """\
cpu  300 0 100 900 20 0 0 0 0 0
cpu0 100 0 50 400 10 0 0 0 0 0
cpu1 150 5 30 300 5 2 3 5 7 0
cpu2 50 0 20 200 5 0 0 0 0 0
intr 5939965 0 0
ctxt 123
"""


def test_cpu_ticks_sum_the_allowed_cores_and_count_iowait_as_idle():
    assert cpu_ticks(STAT, {0}) == (150, 560)
    assert cpu_ticks(STAT, {1}) == (195, 500)  # guest (7) is inside user
    assert cpu_ticks(STAT, {0, 2}) == (220, 835)
    assert cpu_ticks(STAT, set()) == (0, 0)


def test_others_busy_subtracts_this_process():
    # two cores, 3/4 busy over the window: 1.5 cores, of which this process used 0.5
    assert others_busy((0, 0), (150, 200), cpus=2, own_cores=0.5) == pytest.approx(1.0)
    assert others_busy((10, 10), (10, 10), cpus=2, own_cores=0.0) is None
    assert others_busy((0, 0), (10, 100), cpus=2, own_cores=0.5) == 0.0  # never negative


@pytest.fixture()
def two_cores(monkeypatch):
    """A 2-core machine whose torch default is 2; the session's count restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    monkeypatch.setattr(threads, "available_cores", lambda: 2)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    yield
    torch.set_num_threads(before)


def test_the_trainer_runs_on_the_cores_left_free(micro, two_cores, monkeypatch, capsys):
    monkeypatch.setattr(threads, "measure_others_busy", lambda: 3.0)
    assert train(["--stage", "0", *micro]) == 0
    assert torch.get_num_threads() == 1
    assert ("threads: 1 instead of torch's default 2: other processes keep 3.0 of the 2 "
            "cores busy") in capsys.readouterr().err


def test_the_trainer_keeps_torchs_default_when_idle_or_told(micro, two_cores, monkeypatch,
                                                            capsys):
    assert train(["--stage", "0", *micro]) == 0  # conftest: an idle machine
    assert torch.get_num_threads() == 2 and "threads:" not in capsys.readouterr().err

    def unexpected():
        raise AssertionError("measured although --threads or OMP_NUM_THREADS decides")

    monkeypatch.setattr(threads, "measure_others_busy", unexpected)
    assert train(["--stage", "0", "--restart", "--threads", "1", *micro]) == 0
    assert torch.get_num_threads() == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    torch.set_num_threads(2)
    assert train(["--stage", "0", "--restart", *micro]) == 0
    assert torch.get_num_threads() == 2


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads Linux's /proc/stat")
def test_a_busy_process_beside_this_one_is_measured():
    """At least the one busy loop started here (other processes may add to it), and no more
    than the machine has."""
    loop = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)  # running, past its start-up
        measured = measure_others_busy()
    finally:
        loop.kill()
        loop.wait()
    assert measured is not None and 0.7 <= measured <= threads.available_cores() + 0.1
