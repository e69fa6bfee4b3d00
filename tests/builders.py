"""Builders and helpers the test modules share (a support module, not a test module: no
test module imports another).

A tiny training run takes a model config and a data set (the micro ones by default: a
1-layer width-32 DiT on 4-frame 8x8 videos, seconds per stage on a CPU); the rest are the
helpers several test modules use: stand-in stage outputs, a simulated kill, file hashes,
the torchrun command. The tiny Wan2.1-T2V-Diffusers folder is built by realscale_fixtures.

Import this only after tests/conftest.py has run (pytest loads it first): it sets
TRITON_INTERPRET before anything imports triton.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import resource
import shlex
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from gpd_model import DiTConfig, WanDiT, add_guidance_input, get_preset
from gpd_train.__main__ import main
from gpd_train.config.chains import StageId
from gpd_train.config.load import load_config
from gpd_train.data.embeddings import PromptEmbeddingSet
from gpd_train.data.procedural import ProceduralVideos
from gpd_train.run.files import atomic_write_text
from gpd_train.run.lora import adapter_shapes
from gpd_train.train.builders import TrainingRun, build_stage0

# -- tiny runs ------------------------------------------------------------------------------
# A whole tiny pipeline in seconds: teacher 8 -> 4 -> 2 steps, a short evaluation (appended to
# a preset's lines or to an example TOML's).
TINY_PIPELINE_BUDGETS = """
steps = [8, 4, 2]
batch_size = 4
[stage0]
iterations = 4
[distill]
iterations = [2, 2]
freq_weight = [0.0, 1.0]
stage_guidance = [1.5, 1.0]
[eval]
prompts = 8
batch_size = 8
"""
# A run of one distillation stage on the micro model and data (the `micro` fixture's TOML).
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


def micro_dit(num_layers: int = 1) -> DiTConfig:
    """The tiny preset at width 32 (ffn 64) with ``num_layers`` blocks."""
    return get_preset("tiny", dim=32, ffn_dim=64, num_layers=num_layers)


def micro_data(dit_config: DiTConfig, speed: int | None = 1) -> ProceduralVideos:
    """4-frame 8x8 procedural videos for ``dit_config``'s text width (``speed`` None: the
    data set's own choice of speed)."""
    return ProceduralVideos(dit_config.text_dim, frames=4, size=8, speed=speed)


def tiny_run(values: dict[str, Any], dit_config: DiTConfig | None = None,
             data: ProceduralVideos | PromptEmbeddingSet | None = None) -> TrainingRun:
    """A training run of the configuration ``values`` (gpd_train.config.load.load_config
    keys) on ``dit_config`` (default: micro_dit()) and ``data`` (default: micro_data)."""
    dit_config = dit_config or micro_dit()
    return TrainingRun(load_config(None, values), dit_config=dit_config,
                       data=data if data is not None else micro_data(dit_config))


def micro_run(tmp_path: Path, **overrides: Any) -> TrainingRun:
    """A micro run of every chain's three halving stages (stage 0 by 8 steps)."""
    values = {"run_dir": str(tmp_path / "run"), "device": "cpu", "steps": [8, 4, 2, 1],
              "batch_size": 4, "checkpoint_every": 3, "stage0.iterations": 3,
              "distill.iterations": [4, 4, 4], "vanilla.iterations": [2, 2, 2],
              "guided.iterations": [2, 2, 2], "guided.guidance_iterations": 2,
              "eval.prompts": 4, "eval.batch_size": 4, "eval.examples": 2}
    return tiny_run({**values, **overrides})


def configured_run(tmp_path: Path, **overrides: Any) -> TrainingRun:
    """A one-stage run (stage 0 of 6 iterations) on the model and data its configuration
    names, as the CLI opens it: the tiny preset, or the micro ones under the `micro`
    fixture."""
    values = {"run_dir": str(tmp_path / "run"), "device": "cpu", "steps": [8, 4],
              "batch_size": 4, "checkpoint_every": 3, "stage0.iterations": 6,
              "distill.iterations": [3], "distill.freq_weight": [0.0],
              "vanilla.iterations": [2], "vanilla.freq_weight": [0.0]}
    return TrainingRun(load_config(None, {**values, **overrides}))


# The multi-process runs' global batch: 4 samples in 2 data streams, whatever the ranks.
GLOBAL_BATCH, STREAMS = 4, 2
LORA_VANILLA = {"vanilla.lora_rank": 2, "vanilla.lora_alpha": 4.0,
                "vanilla.iterations": [2, 2, 2]}


def parallel_run(run_dir: Path, ranks: int, **overrides: Any) -> TrainingRun:
    """A 2-layer width-32 DiT on 4-frame 8x8 videos; the global batch is 4 in 2 streams."""
    values = {"run_dir": str(run_dir), "device": "cpu", "steps": [8, 4, 2, 1],
              "batch_size": GLOBAL_BATCH // ranks, "checkpoint_every": 2,
              "stage0.iterations": 3, "distill.iterations": [4, 4, 4],
              "distill.state_source": "student", "distill.freq_weight": [0.5, 0.0, 0.0],
              "parallel.data_streams": STREAMS}
    dit_config = micro_dit(num_layers=2)
    return tiny_run({**values, **overrides}, dit_config, micro_data(dit_config, speed=None))


def with_random_stages(run: TrainingRun, chain: str, upto: int) -> None:
    """Stand-in outputs for stages 0..upto, so a later stage can be built directly."""
    for stage in range(upto + 1):
        sid = StageId(chain, stage)
        run.finish_stage(sid, run.new_model().state_dict(), {"steps": run.steps(sid)})


def finish_random_adapter(run: TrainingRun, chain: str, stage: int,
                          seed: int) -> dict[str, torch.Tensor]:
    """A stand-in LoRA output for ``stage`` (random A and B, so it changes the base)."""
    generator = torch.Generator().manual_seed(seed)
    spec = run.lora_spec(StageId(chain, stage))
    adapter = {key: torch.randn(shape, generator=generator) * 0.2
               for key, shape in adapter_shapes(run.new_model(), spec).items()}
    sid = StageId(chain, stage)
    run.finish_stage(sid, adapter, {"steps": run.steps(sid)})
    return adapter


def finish_random_guided_adapter(run: TrainingRun, stage: int | str, seed: int) -> None:
    """A stand-in output of a w-conditioned LoRA stage: random adapter and guidance input."""
    generator = torch.Generator().manual_seed(seed)
    guidance = add_guidance_input(run.new_model()).guidance_embedding.state_dict()
    shapes = {**adapter_shapes(run.new_model(), run.lora_spec(StageId("gpd", stage))),
              **{f"guidance_embedding.{k}": tuple(v.shape) for k, v in guidance.items()}}
    run.finish_stage(StageId("gpd", stage), {k: torch.randn(s, generator=generator) * 0.2
                                    for k, s in shapes.items()},
                     {"steps": run.steps(StageId("gpd", stage))})


# -- kills, resumes and what a run leaves -------------------------------------------------
def run_until_killed(trainer, monkeypatch: pytest.MonkeyPatch, at_step: int) -> None:
    """Train from scratch until a simulated kill at ``at_step`` (before its update)."""
    real_prepare = trainer.objective.prepare

    def crash(step):
        if step == at_step:
            raise KeyboardInterrupt("simulated kill")
        return real_prepare(step)

    monkeypatch.setattr(trainer.objective, "prepare", crash)
    with pytest.raises(KeyboardInterrupt):
        trainer.run(resume=False)


def killed_stage0(run: TrainingRun, monkeypatch: pytest.MonkeyPatch, at: int = 8):
    """Stage 0 killed (KeyboardInterrupt) at step ``at``: checkpoints at steps 3 and 6."""
    trainer = build_stage0(run)
    trainer.iterations = 9
    run_until_killed(trainer, monkeypatch, at_step=at)
    monkeypatch.undo()
    return trainer


def point_latest(folder: Path, step: int) -> None:
    """Make checkpoint ``step`` of a stage the one --resume continues from."""
    atomic_write_text(folder / "ckpt" / "latest", f"step-{step:08d}")


def losses(trainer) -> list[float]:
    """The losses a trainer logged, in step order."""
    return [record["loss"] for record in trainer.metrics.records()]


def logged_losses(path: Path) -> list[float]:
    """The losses in a metrics file (``metrics.jsonl``, or a copy of it)."""
    return [json.loads(line)["loss"] for line in path.read_text().splitlines() if line.strip()]


def hashes(folder: Path) -> dict[str, str]:
    """SHA-256 of every file under ``folder`` (the lock file aside)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".lock"}


@contextlib.contextmanager
def file_size_limit(size: int) -> Iterator[None]:
    """Writes past ``size`` bytes of any file fail with EFBIG, as a full disk fails them,
    however the writer writes (Python, safetensors' Rust, torch.save)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the signal kills us
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


# -- commands -------------------------------------------------------------------------------
def torchrun(args: list[str], ranks: int = 2) -> list[str]:
    """The command line that runs ``args`` in ``ranks`` processes on this machine."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={ranks}", *args]


def suggested_args(err: str, module: str = "gpd_train") -> list[str]:
    """The arguments of the command ``python -m MODULE ...`` an error message suggests in
    backticks: a test runs them to show the hint is accepted."""
    found = re.search(rf"`python -m {re.escape(module)} ([^`]*)`", err)
    assert found is not None, f"no `python -m {module} ...` hint in: {err}"
    return shlex.split(found.group(1))


def refused(capsys: pytest.CaptureFixture[str], argv: list[str], *needles: str,
            command=main) -> str:
    """Run ``command(argv)``: exit 2, one ``error:`` line holding every needle."""
    assert command(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "error: " in err
    for needle in needles:
        assert needle in err, err
    return err


def random_dit(seed: int, **changes: object) -> WanDiT:
    """A 1-layer DiT whose every weight is random (no zero-initialised output); ``changes``
    override its config (a TI2V one: ``expand_timesteps=True``)."""
    torch.manual_seed(seed)
    model = WanDiT(get_preset("tiny", **{"dim": 32, "ffn_dim": 64, "num_layers": 1,
                                         **changes}))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(0.2 * torch.randn(param.shape, generator=generator))
    return model.eval()
