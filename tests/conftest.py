"""Test-session setup shared by every test module.

Triton kernels run on the CPU through the interpreter when no GPU is present; the
variable must be set before anything imports triton, hence here at the top.
"""

import os
import re
import shlex

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

# Imported once TRITON_INTERPRET is set: gpd_kernels imports triton.
from gpd_model import get_preset  # noqa: E402
from gpd_train.data.datasets import ProceduralVideos  # noqa: E402
from gpd_train.run.folder import RunFolder  # noqa: E402
from gpd_train.train.builders import TrainingRun  # noqa: E402


@pytest.fixture(autouse=True)
def idle_machine(monkeypatch):
    """The commands a test runs in-process see an idle machine: they keep the thread count
    set above whatever else the machine runs (gpd_train.train.threads; tests/test_threads.py
    tests the choice under load)."""
    monkeypatch.setattr("gpd_train.train.threads.measure_others_busy", lambda: 0.0)


# A run of one distillation stage on a 1-layer width-32 DiT and 4-frame 8x8 videos.
MICRO_TOML = """\
steps = [8, 4]
pipeline_chains = ["gpd", "vanilla"]
batch_size = 4
checkpoint_every = 3
[stage0]
iterations = 3
[distill]
iterations = [3]
freq_weight = [0.0]
[vanilla]
iterations = [2]
freq_weight = [0.0]
[eval]
prompts = 4
batch_size = 4
examples = 2
"""


def suggested_args(err: str, module: str = "gpd_train") -> list[str]:
    """The arguments of the command ``python -m MODULE ...`` an error message suggests in
    backticks: a test runs them to show the hint is accepted."""
    found = re.search(rf"`python -m {re.escape(module)} ([^`]*)`", err)
    assert found is not None, f"no `python -m {module} ...` hint in: {err}"
    return shlex.split(found.group(1))


@pytest.fixture()
def one_thread():
    """torch on one thread for the test (a one-process reference of a multi-rank run)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def micro(tmp_path, monkeypatch):
    """CLI arguments for a one-stage micro run; every run folder opened gets the micro
    model, and every training run the micro data."""
    real_folder, real_training = RunFolder.__init__, TrainingRun.__init__

    def micro_folder(self, config, device=None):
        real_folder(self, config, device)
        self.dit_config = get_preset("tiny", dim=32, ffn_dim=64, num_layers=1)

    def micro_training(self, config):
        real_training(self, config)
        self.data = ProceduralVideos(self.dit_config.text_dim, frames=4, size=8, speed=1)

    monkeypatch.setattr(RunFolder, "__init__", micro_folder)
    monkeypatch.setattr(TrainingRun, "__init__", micro_training)
    toml = tmp_path / "micro.toml"
    toml.write_text(MICRO_TOML)
    return ["--config", str(toml), "--run-dir", str(tmp_path / "run"), "--device", "cpu"]
