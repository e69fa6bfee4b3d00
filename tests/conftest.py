"""Test-session setup shared by every test module.

Triton kernels run on the CPU through the interpreter when no GPU is present; the
variable must be set before anything imports triton, hence here at the top.
"""

import os
from functools import partialmethod

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

# Imported once TRITON_INTERPRET is set: gpd_kernels imports triton.
from builders import MICRO_TOML, micro_data, micro_dit  # noqa: E402

from gpd_train.config.chains import StageId  # noqa: E402
from gpd_train.config.settings import RunConfig  # noqa: E402
from gpd_train.run.folder import RunFolder  # noqa: E402
from gpd_train.train.builders import TrainingRun  # noqa: E402


@pytest.fixture(autouse=True)
def idle_machine(monkeypatch):
    """The commands a test runs in-process see an idle machine: they keep the thread count
    set above whatever else the machine runs (gpd_train.train.threads; tests/test_threads.py
    tests the choice under load)."""
    monkeypatch.setattr("gpd_train.train.threads.measure_others_busy", lambda: 0.0)


@pytest.fixture()
def one_thread():
    """torch on one thread for the test (a one-process reference of a multi-rank run)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def micro(tmp_path, monkeypatch):
    """CLI arguments for a one-stage micro run; every run folder the command opens gets the
    micro model, and every training run the micro data.

    The command opens run folders in several places (the trainer, the pipeline's per-chain
    run, the evaluation of a compared folder, the sampler's loader), each as
    ``RunFolder(config)``: binding the constructors' own ``dit_config`` / ``data``
    arguments reaches them all without a test switch in the CLI. A ``--preset`` could name
    a micro model, but no option names the micro data set."""
    dit_config = micro_dit()
    monkeypatch.setattr(RunFolder, "__init__",
                        partialmethod(RunFolder.__init__, dit_config=dit_config))
    monkeypatch.setattr(TrainingRun, "__init__",
                        partialmethod(TrainingRun.__init__, dit_config=dit_config,
                                      data=micro_data(dit_config)))
    toml = tmp_path / "micro.toml"
    toml.write_text(MICRO_TOML)
    return ["--config", str(toml), "--run-dir", str(tmp_path / "run"), "--device", "cpu"]


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    """(a run folder whose stage 0 is a fresh tiny-preset model, the model, its config)."""
    folder = tmp_path_factory.mktemp("run")
    config = RunConfig(run_dir=str(folder), preset="tiny", device="cpu")
    run = TrainingRun(config)
    run.save_config()
    model = run.new_model()
    run.finish_stage(StageId("gpd", 0), model.state_dict(), {"stage": 0})
    return folder, model.eval(), config
