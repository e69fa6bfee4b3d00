"""A run folder trained from prompts works from any directory and after a move.

On the tiny Wan2.1-Diffusers folder of realscale_fixtures: stage 0 and the whole pipeline
with ``--teacher W --prompts P`` typed relative to the training directory, then export and
sampling from another directory (subprocesses with their own cwd), before and after the
run folder is moved. Also: old config.json files with paths relative to the training
directory, the stage-0 export's CFG scale, and ``--stage N --iterations K``.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

from realscale_fixtures import LATENT_SHAPE, VIDEO, build_wan_folder  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from gpd_train.__main__ import main as train_main  # noqa: E402
from gpd_train.config.load import load_run_config  # noqa: E402
from gpd_train.config.settings import DEFAULT_GUIDANCE, RunConfig  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
VIDEO_ARGS = ["--height", str(VIDEO["height"]), "--width", str(VIDEO["width"]),
              "--frames", str(VIDEO["frames"])]
TOML = """steps = [8, 4, 2]
batch_size = 2
checkpoint_every = 100
[distill]
iterations = [2, 2]
freq_weight = [0.0, 1.0]
lane_groups = 1
[vanilla]
iterations = [2, 2]
freq_weight = [0.0, 0.0]
[eval]
prompts = 2
batch_size = 2
examples = 1
"""


def hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def cli(module: str, cwd: Path, *args: object) -> subprocess.CompletedProcess:
    """``python -m module args`` run from ``cwd``, this checkout's packages first."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def wan_dir(tmp_path_factory):
    return build_wan_folder(tmp_path_factory.mktemp("wan") / "Wan2.1-T2V-tiny-Diffusers")


@pytest.mark.slow
def test_prompt_pipeline_finishes_and_its_run_folder_works_from_anywhere(
        wan_dir, tmp_path, monkeypatch, capsys):
    train_dir, elsewhere = tmp_path / "X", tmp_path / "elsewhere"
    train_dir.mkdir()
    elsewhere.mkdir()
    (train_dir / "wanb").symlink_to(wan_dir)
    (train_dir / "p.txt").write_text("a red cat runs\nthe dog jumps\n")
    (train_dir / "t.toml").write_text(TOML)
    monkeypatch.chdir(train_dir)  # every path below is typed relative to it
    common = ["--config", "t.toml", "--teacher", "wanb", "--prompts", "p.txt", "--run-dir",
              "run", "--device", "cpu", *VIDEO_ARGS]
    run = train_dir / "run"

    assert train_main(["--stage", "0", *common]) == 0
    # One --iterations value with --stage N is that stage's; the others keep the TOML's.
    assert train_main(["--stage", "1", "--iterations", "1", *common]) == 0
    assert json.loads((run / "stage1" / "done.json").read_text())["iterations"] == 1
    assert json.loads((run / "config.json").read_text())["distill"]["iterations"] == [1, 2]
    capsys.readouterr()

    # The whole pipeline: GPD stage 2 trains, the vanilla chain (data states) is skipped with
    # one line saying why, and the evaluation runs on the prompt embeddings.
    assert train_main(common) == 0
    out = capsys.readouterr()
    skipped = [line for line in (out.out + out.err).splitlines() if "skipped:" in line]
    assert len(skipped) == 1 and skipped[0].startswith("[vanilla] skipped:")
    assert "state_source 'data'" in skipped[0] and "without latents" in skipped[0]
    assert json.loads((run / "stage2" / "done.json").read_text())["iterations"] == 2
    assert not (run / "vanilla").exists()
    rows = [row["model"] for row in json.loads((run / "eval" / "report.json").read_text())
            ["rows"]]
    assert "GPD@2" in rows and not any("vanilla" in row for row in rows)
    assert "learned FD, detail KID, prompt accuracy and first-frame PSNR need the built-in data" \
        in out.out
    assert not any("held out" in row for row in rows)  # no sanity rows without real videos
    config = json.loads((run / "config.json").read_text())
    assert config["data"] == "prompt-embeddings"  # inside the run folder: relative to it
    assert config["teacher"] == str(train_dir / "wanb")  # outside: absolute
    assert config["prompts"] == str(train_dir / "p.txt")

    # A single stage that needs data latents is refused before the folder is touched.
    before = hashes(run)
    assert train_main(["--stage", "1", "--chain", "vanilla", *common]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: vanilla/stage1 cannot train:") and "state_source" in err
    assert "--teacher" not in err  # the teacher was imported: no advice to import one
    assert hashes(run) == before

    # Export from another directory, absolute paths.
    result = cli("gpd_train.export", elsewhere, "--run", run, "--base", train_dir / "wanb",
                 "--out", tmp_path / "student")
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "student" / "gpd_export.json").read_text())[
        "guidance_scale"] == 1.0

    # Moved: the data set inside the run folder moves with it.
    moved = tmp_path / "Y" / "run2"
    moved.parent.mkdir()
    run.rename(moved)
    result = cli("gpd_train.sample", elsewhere, "--checkpoint", moved, "--stage", 2, "--num", 1,
                 "--device", "cpu", "--out", tmp_path / "videos")
    assert result.returncode == 0, result.stderr
    latents = load_file(str(tmp_path / "videos" / "latents.safetensors"))["latents"]
    assert tuple(latents.shape) == (1, *LATENT_SHAPE)
    # Stage 0 (the teacher) is exported with its CFG scale: Wan's default, as the tiny
    # folder's shape is no preset's.
    result = cli("gpd_train.export", elsewhere, "--run", moved, "--base", train_dir / "wanb",
                 "--out", tmp_path / "teacher", "--stage", 0)
    assert result.returncode == 0, result.stderr
    record = json.loads((tmp_path / "teacher" / "gpd_export.json").read_text())
    assert record["guidance_scale"] == DEFAULT_GUIDANCE == 5.0
    assert "guidance_scale=5.0" in result.stdout


def _old_run_folder(train_dir: Path, data: str) -> Path:
    """A run folder whose config.json holds ``data`` as typed in ``train_dir`` (the format
    before paths were stored absolute or relative to the run folder)."""
    run = train_dir / "runs" / "a"
    run.mkdir(parents=True)
    raw = json.loads(RunConfig(run_dir="runs/a", device="cpu").to_json())
    (run / "config.json").write_text(json.dumps({**raw, "data": data}))
    return run


def test_old_config_paths_resolve_from_any_directory(tmp_path, monkeypatch):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    run = _old_run_folder(tmp_path / "train", "runs/a/prompt-embeddings")
    (run / "prompt-embeddings").mkdir()
    assert load_run_config(run).data == str(run / "prompt-embeddings")
    moved = tmp_path / "moved"
    run.rename(moved)  # the training directory is no longer known; the cwd is tried
    (elsewhere / "runs" / "a" / "prompt-embeddings").mkdir(parents=True)
    assert load_run_config(moved).data == str(elsewhere / "runs" / "a" / "prompt-embeddings")


def test_ambiguous_old_config_path_says_which_was_used(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = _old_run_folder(tmp_path / "train", "emb")
    (run / "emb").mkdir()
    (tmp_path / "emb").mkdir()
    with pytest.warns(UserWarning, match="ambiguous") as caught:
        config = load_run_config(run)
    assert config.data == str(run / "emb")  # the run folder first
    message = str(caught[0].message)
    assert f"using {run / 'emb'}" in message and f"not {tmp_path / 'emb'}" in message


@pytest.mark.parametrize("args,message", [
    (["--stage", "1", "--iterations", "3", "4"], "--iterations takes one value per stage (3)"),
    (["--iterations", "5"], "--iterations takes one value per stage (3)"),
    (["--stage", "4", "--iterations", "5"], "--stage must be g or in 0..3, got 4"),
])
def test_wrong_iterations_counts_are_refused_naming_the_flag(tmp_path, capsys, args, message):
    run = tmp_path / "run"
    assert train_main([*args, "--run-dir", str(run), "--device", "cpu"]) == 2
    assert message in capsys.readouterr().err
    assert not run.exists()
