"""The checkpoint component: a dict of stateful parts saved and loaded together, all or
nothing (gpd_train.train.checkpoint.Checkpointer with the trainer's parts from
gpd_train.train.loop)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from builders import file_size_limit

from gpd_train.errors import ConfigError
from gpd_train.run.destination import RUN, write_marker
from gpd_train.run.files import CheckpointError, atomic_write_text
from gpd_train.run.writes import WriteError
from gpd_train.train.checkpoint import Checkpointer
from gpd_train.train.loop import Ema, MetricsLog, ModelState, OptimizerState

METADATA = {"stage": "stage1", "dit_config": "{}"}


class Box:
    """A part holding any picklable state (the trainer's counters, a data stream)."""

    def __init__(self, state: dict[str, Any]) -> None:
        self.state = state

    def state_dict(self) -> dict[str, Any]:
        return self.state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state = state


def parts(seed: int, out_features: int = 3, adapter: bool = False,
          streams: int = 1) -> dict[str, Any]:
    """The trainer's kinds of parts around a small model trained one step from ``seed``."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, out_features))
    if adapter:  # a LoRA-like extra trained tensor on a frozen base
        model[0].requires_grad_(False)
        model.register_parameter("adapter", torch.nn.Parameter(torch.randn(2, 4)))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    sum(p.sum() for p in model.parameters()).backward()
    optimizer.step()
    model_state = ModelState(model)
    result = {"model": model_state, "ema": Ema(model_state, 0.9),
              "optimizer": OptimizerState(model, optimizer),
              "trainer": Box({"step": seed, "ema_updates": seed})}
    for j in range(streams):
        result[f"stream.{j}"] = Box({"rng": torch.Generator().manual_seed(seed + j).get_state(),
                                     "lanes": torch.randn(2, 3)})
    return result


def snapshot(state: Any) -> Any:
    """A deep copy of every part's state, to compare after a load."""
    if isinstance(state, dict):
        return {key: snapshot(value) for key, value in state.items()}
    if isinstance(state, list):
        return [snapshot(value) for value in state]
    return state.clone() if isinstance(state, torch.Tensor) else state


def assert_same(a: Any, b: Any) -> None:
    if isinstance(a, dict):
        assert sorted(a) == sorted(b)
        for key in a:
            assert_same(a[key], b[key])
    elif isinstance(a, list):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same(x, y)
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    else:
        assert a == b


def states(of: dict[str, Any]) -> dict[str, Any]:
    return {name: snapshot(part.state_dict()) for name, part in of.items()}


def test_parts_round_trip_through_the_one_process_format(tmp_path):
    saved = parts(seed=0)
    written = Checkpointer(tmp_path, saved, METADATA, stream_batch=2).save(step=3)
    assert written == tmp_path / "step-00000003"
    assert sorted(p.name for p in written.iterdir()) == [
        "ema.safetensors", "manifest.json", "model.safetensors", "state.pt"]
    manifest = json.loads((written / "manifest.json").read_text())
    assert manifest["format"] == "safetensors" and manifest["step"] == 3
    assert manifest["metadata"] == METADATA
    assert (manifest["data_streams"], manifest["stream_batch"]) == (1, 2)
    assert all(len(info["sha256"]) == 64 for info in manifest["files"].values())

    loaded = parts(seed=1)
    assert states(loaded)["model"]["0.weight"].ne(states(saved)["model"]["0.weight"]).any()
    path, problems = Checkpointer(tmp_path, loaded, METADATA, stream_batch=2).load()
    assert (path, problems) == (written, [])
    assert_same(states(loaded), states(saved))


def test_model_part_holds_only_the_trained_tensors(tmp_path):
    saved = parts(seed=0, adapter=True)
    assert sorted(saved["model"].state_dict()) == sorted(saved["ema"].state_dict()) == ["adapter"]
    Checkpointer(tmp_path, saved, METADATA, stream_batch=2).save(step=1)
    loaded = parts(seed=1, adapter=True)
    Checkpointer(tmp_path, loaded, METADATA, stream_batch=2).load()
    assert torch.equal(loaded["model"].model.adapter, saved["model"].model.adapter)
    # The frozen base is not the checkpoint's: it keeps what the stage was built from.
    assert not torch.equal(loaded["model"].model[0].weight, saved["model"].model[0].weight)


def _drop_format(folder: Path) -> None:
    """Make checkpoint ``folder`` look written by gpd_train before the parts format."""
    manifest_path = folder / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    del manifest["format"]
    manifest_path.write_text(json.dumps(manifest))


@pytest.mark.parametrize("change,message", [
    ("shape", r"part 'model':\n  missing keys: \[\]\n  unexpected keys: \[\]\n  mismatched: "
              r"\['0.bias: checkpoint \(3,\) torch.float32, model \(5,\) torch.float32'"),
    ("adapter", r"part 'model':\n  missing keys: \['adapter'\]\n  unexpected keys: "
                r"\['0.bias', '0.weight'\]"),
    ("missing part", r"parts: missing \['extra'\], unexpected \[\]"),
    ("stage", r"written for stage='stage1', this run has 'stage2'; start the stage over with "
              r"--restart"),
    ("streams", r"has 1 data streams of 2 samples \(global batch 2\); this run has 2 of 2\. "
                r"On 1 rank\(s\) pass --data-streams 1 --batch-size 2"),
    ("old format", r"written by an earlier gpd_train \(format None.*--restart"),
])
def test_a_checkpoint_that_does_not_fit_is_refused_and_nothing_loads(tmp_path, change, message):
    store = Checkpointer(tmp_path, parts(seed=0), METADATA, stream_batch=2)
    written = store.save(step=1)
    if change == "old format":
        _drop_format(written)
    loaded = parts(seed=1, out_features=5 if change == "shape" else 3,
                   adapter=change == "adapter", streams=2 if change == "streams" else 1)
    if change == "missing part":
        loaded["extra"] = Box({})
    metadata = {**METADATA, "stage": "stage2"} if change == "stage" else METADATA
    before = states(loaded)
    with pytest.raises(CheckpointError, match=message):
        Checkpointer(tmp_path, loaded, metadata, stream_batch=2).load()
    assert_same(states(loaded), before)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-00000001"]


def test_a_corrupt_checkpoint_is_passed_over_for_the_previous_one(tmp_path):
    first, second = parts(seed=0), parts(seed=1)
    Checkpointer(tmp_path, first, METADATA, stream_batch=2).save(step=1)
    written = Checkpointer(tmp_path, second, METADATA, stream_batch=2).save(step=2)
    state = written / "state.pt"
    data = bytearray(state.read_bytes())
    data[len(data) // 2] ^= 0xFF
    state.write_bytes(bytes(data))
    loaded = parts(seed=2)
    path, problems = Checkpointer(tmp_path, loaded, METADATA, stream_batch=2).load()
    assert path.name == "step-00000001"
    assert problems == [f"checkpoint file {state} is corrupt (its SHA-256 differs from the "
                        "manifest) (kept as corrupt-step-00000002)"]
    assert_same(states(loaded), states(first))


def _metrics(path: Path) -> MetricsLog:
    if not path.exists():  # the log of a run killed after step 2, checkpointed at step 1
        path.write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "loss": 0.4}\n')
    return MetricsLog(path)


REWRITES: dict[str, tuple[str, Callable[[Path], None]]] = {
    # name: (the file rewritten, inside the test's folder; the rewrite)
    "ckpt/latest": ("latest", lambda path: atomic_write_text(path, "step-00000002")),
    "output marker": (".gpd_output.json", lambda path: write_marker(path.parent, RUN)),
    "metrics.jsonl on resume": ("metrics.jsonl",
                                lambda path: _metrics(path).reset(keep_until_step=1)),
}


@pytest.mark.parametrize("name", sorted(REWRITES))
def test_a_failing_rewrite_keeps_the_previous_file(tmp_path, name):
    """Every rewrite of an existing file goes through a temporary file and a rename: a write
    that fails (a full disk) leaves the previous content, and no temporary file."""
    filename, rewrite = REWRITES[name]
    path = tmp_path / filename
    rewrite(path)  # the previous content, written by the same writer
    before = path.read_bytes()
    with pytest.raises(WriteError, match=f"cannot write {path}"), file_size_limit(4):
        rewrite(path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [filename]


def test_a_metrics_line_that_is_no_record_is_named(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 0.5}\n[1, 2]\n{"step": 2, "loss": 0.4}\n')
    with pytest.raises(ConfigError, match=f"{path} line 2 is not a metrics record"):
        MetricsLog(path).reset(keep_until_step=1)
    assert path.read_text().count("\n") == 3  # left as it was
