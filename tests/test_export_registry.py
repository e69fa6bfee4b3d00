"""An export format added through the registry alone (one declaration and its writer, here)
is offered by ``--format``, checked by the shared preflight and written through the CLI."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gpd_train.config.chains import StageId
from gpd_train.config.load import load_config
from gpd_train.errors import ConfigError
from gpd_train.infer.export import FULL, LORA, ExportFormat, ExportRequest, register, unregister
from gpd_train.infer.export.cli import main as export
from gpd_train.run.destination import EXPORT, staged_output
from gpd_train.run.loading import run_stage_of
from gpd_train.train.builders import TrainingRun

ROOT = Path(__file__).resolve().parents[1]


def write_toy(request: ExportRequest, kind: str) -> str:
    """The toy format: the stage's tensor names and shapes as one JSON file."""
    run, sid = run_stage_of(request.run, request.chain, request.stage)
    model = run.load_stage_model(sid, check_grid=False)
    shapes = {name: list(p.shape) for name, p in model.state_dict().items()}
    with staged_output(request.out, EXPORT, overwrite=request.overwrite) as staging:
        (staging / "toy.json").write_text(json.dumps({"kind": kind, "shapes": shapes}))
    return f"toy export of {sid} -> {request.out}"


@pytest.fixture
def toy_format():
    fmt = register(ExportFormat(name="toy", help="toy: tensor shapes as JSON", write=write_toy,
                                accepts=(FULL,)))
    yield fmt
    unregister("toy")


@pytest.fixture
def run_dir(tmp_path):
    """A run folder whose stage 0 is finished (untrained weights: the format reads shapes)."""
    run = TrainingRun(load_config(None, {"run_dir": str(tmp_path / "run"), "device": "cpu"}))
    run.save_config()
    sid = StageId("gpd", 0)
    run.finish_stage(sid, run.new_model().state_dict(), {"steps": run.steps(sid)})
    return run.config.run_dir


def test_a_registered_format_writes_through_the_cli(toy_format, run_dir, tmp_path, capsys):
    out = tmp_path / "toy-out"
    assert export(["--run", str(run_dir), "--format", "toy", "--out", str(out)]) == 0
    written = json.loads((out / "toy.json").read_text())
    assert written["kind"] == FULL and "blocks.0.self_attn.qkv.weight" in written["shapes"]
    assert capsys.readouterr().out == f"toy export of stage0 -> {out}\n"
    # the destination rules are the CLI's, for every format: an earlier export is kept
    assert export(["--run", str(run_dir), "--format", "toy", "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_a_format_is_refused_what_it_does_not_declare(run_dir, tmp_path, capsys):
    """A kind outside ``accepts`` and a missing ``--base`` it needs: one line each, before
    anything is written."""
    register(ExportFormat(name="toy", help="toy", write=write_toy, accepts=(LORA,)))
    try:
        assert export(["--run", str(run_dir), "--format", "toy", "--out",
                       str(tmp_path / "a")]) == 2
        assert capsys.readouterr().err == ("error: --format toy writes lora stages; this export "
                                           "is full\n")
    finally:
        unregister("toy")
    register(ExportFormat(name="toy", help="toy", write=write_toy,
                          needs_base={FULL: "toy reads the base"}))
    try:
        assert export(["--run", str(run_dir), "--format", "toy", "--out",
                       str(tmp_path / "b")]) == 2
        assert capsys.readouterr().err == ("error: toy reads the base: give --base (the "
                                           "Wan2.1-T2V-Diffusers folder trained on)\n")
    finally:
        unregister("toy")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_an_unregistered_format_is_not_offered(run_dir, tmp_path, capsys):
    with pytest.raises(SystemExit):
        export(["--run", str(run_dir), "--format", "toy", "--out", str(tmp_path / "o")])
    assert "invalid choice: 'toy'" in capsys.readouterr().err


def test_a_format_declares_known_kinds_only():
    with pytest.raises(ConfigError, match="kinds must be among"):
        ExportFormat(name="bad", help="", write=write_toy, accepts=("whole",))


def test_the_export_and_its_formats_load_no_training_module():
    """Checked in a fresh interpreter: this one has the trainer loaded by the fixtures."""
    code = ("import sys, gpd_train.export, gpd_train.infer.export as e; e.formats(); "
            "print(sorted(m for m in sys.modules if m.startswith('gpd_train.train')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env={**os.environ, "PYTHONPATH": str(ROOT)}).stdout
    assert out == "[]\n"
