"""Options refused against a run imported from a tiny Wan2.1-Diffusers folder (issue 21):
export, encode_prompts and the trainer's --teacher and --prompts. Each refusal: exit code 2,
a message naming the option, and every file of the run and of both Wan folders unchanged."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from builders import hashes, refused  # noqa: E402
from realscale_fixtures import VIDEO, build_wan_folder  # noqa: E402

from gpd_train.__main__ import main as train_main  # noqa: E402
from gpd_train.config.chains import StageId  # noqa: E402
from gpd_train.data import encode_prompts
from gpd_train.infer.export import cli as export  # noqa: E402

VIDEO_ARGS = ["--height", str(VIDEO["height"]), "--width", str(VIDEO["width"]), "--frames",
              str(VIDEO["frames"])]
TOML = ("steps = [12, 6]\nbatch_size = 2\ncheckpoint_every = 100\n"
        "[distill]\niterations = [2]\nfreq_weight = [0.0]\nlane_groups = 1\n"
        "[vanilla]\niterations = [2]\nfreq_weight = [0.0]\n")


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """(run folder, its Wan folder W, another Wan folder W2 of the same shape, the trainer's
    arguments): stage 0 imported from W, GPD stage 1 trained for 2 iterations."""
    root = tmp_path_factory.mktemp("wan-options")
    wan, other = build_wan_folder(root / "W"), build_wan_folder(root / "W2", seed=1)
    (root / "prompts.txt").write_text("a red cat runs\nthe dog jumps\n")
    (root / "run.toml").write_text(TOML)
    run = root / "run"
    args = ["--config", str(root / "run.toml"), "--run-dir", str(run), "--device", "cpu",
            "--threads", "1", "--prompts", str(root / "prompts.txt")]
    for stage in ("0", "1"):
        assert train_main(["--stage", stage, *args, "--teacher", str(wan), *VIDEO_ARGS]) == 0
    return run, wan, other, args


@pytest.fixture
def unchanged(imported):
    """Every file of the run and of both Wan folders is the same after the test."""
    folders = imported[:3]
    before = [hashes(folder) for folder in folders]
    yield
    assert [hashes(folder) for folder in folders] == before


@pytest.mark.parametrize("extra,message", [
    (["--base", "{other}"], "--base {other} is not the Wan folder this run was trained from "
                            "({wan}"),
    (["--base", "{wan}", "--merged"], "--merged merges a LoRA adapter, but gpd stage 1 holds "
                                      "full weights"),
    (["--base", "{wan}", "--guidance", "2"], "--guidance 2: gpd stage 1 takes no CFG scale as "
                                             "an input"),
    (["--base", "{wan}", "--stage", "5"], "--stage 5: run folder"),
    (["--base", "{wan}", "--chain", "vanilla"], "has no finished vanilla stage (only the shared "
                                                "stage0)"),
])
def test_export_refuses_options_the_stage_would_not_read(imported, unchanged, tmp_path, capsys,
                                                         extra, message):
    run, wan, other, _ = imported
    out = tmp_path / "student"
    names = {"wan": wan, "other": other}
    refused(capsys, ["--run", str(run), "--out", str(out),
                     *(item.format(**names) for item in extra)],
            message.format(**names), command=export.main)
    assert not out.exists()


@pytest.mark.parametrize("make", ["a file", "under /proc"])
def test_export_and_encode_out_that_cannot_be_written_is_refused(imported, unchanged, tmp_path,
                                                                  capsys, make):
    run, wan, _, _ = imported
    out = tmp_path / "out"
    if make == "a file":
        out.write_text("keep me")
        message = f"--out {out} is a file"
    else:
        out = Path("/proc/gpd-options-out")
        message = f"--out {out} cannot be written"
    refused(capsys, ["--run", str(run), "--base", str(wan), "--out", str(out)], message,
            command=export.main)
    refused(capsys, ["--model", str(wan), "--prompts", str(run.parent / "prompts.txt"),
                     "--out", str(out), *VIDEO_ARGS], message, command=encode_prompts.main)
    assert make == "under /proc" or out.read_text() == "keep me"


def test_export_of_a_folder_without_config_json_says_it_is_no_run_folder(imported, tmp_path,
                                                                         capsys):
    _, wan, _, _ = imported
    (tmp_path / "stage0").mkdir()
    refused(capsys, ["--run", str(tmp_path), "--base", str(wan), "--out",
                     str(tmp_path / "out")],
            f"--run {tmp_path} is not a run folder: it has no config.json", command=export.main)


def test_teacher_other_than_the_imported_one_is_refused(imported, unchanged, capsys):
    run, wan, other, args = imported
    for stage in ("1", "0"):  # stage 0 without --restart would keep the old import
        refused(capsys, ["--stage", stage, "--resume", *args, "--teacher", str(other),
                         *VIDEO_ARGS],
                f"--teacher {other} is not the folder this run's stage 0 was imported from "
                f"({wan}", "--stage 0 --restart")


def test_the_named_remedy_reimporting_stage_0_is_not_refused(imported, monkeypatch):
    run, _, other, args = imported
    ran = []
    monkeypatch.setattr("gpd_train.__main__.run_stage", lambda run, sid, **k: ran.append(sid))
    assert train_main(["--stage", "0", "--restart", *args, "--teacher", str(other),
                       *VIDEO_ARGS]) == 0
    assert ran == [StageId("gpd", 0)]


def test_reencoding_for_another_video_size_is_refused(imported, unchanged, capsys):
    run, wan, _, args = imported
    taller = ["--height", str(2 * VIDEO["height"]), *VIDEO_ARGS[2:]]
    message = "holds shards encoded for latent shape 4,2,4,6"
    err = refused(capsys, ["--stage", "1", "--resume", *args, "--teacher", str(wan), *taller],
                  message, "this video size needs 4,2,8,6", "use another --run-dir")
    assert "--out" not in err  # an encode_prompts flag: the trainer has none
    refused(capsys, ["--model", str(wan), "--prompts", str(run.parent / "prompts.txt"),
                     "--out", str(run / "prompt-embeddings"), *taller], message,
            "use another --out", command=encode_prompts.main)


def test_the_trainers_reencoding_hint_another_run_dir_is_accepted(imported, tmp_path,
                                                                  monkeypatch):
    run, wan, _, args = imported
    ran = []
    monkeypatch.setattr("gpd_train.__main__.run_stage", lambda run, sid, **k: ran.append(sid))
    taller = ["--height", str(2 * VIDEO["height"]), *VIDEO_ARGS[2:]]
    other = tmp_path / "taller"
    assert train_main(["--stage", "0", *args, "--teacher", str(wan), *taller,
                       "--run-dir", str(other)]) == 0
    assert ran == [StageId("gpd", 0)] and (other / "prompt-embeddings" / "negative.safetensors"
                                           ).is_file()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_encode_on_cuda_without_cuda_is_refused(imported, tmp_path, capsys):
    run, wan, _, _ = imported
    refused(capsys, ["--model", str(wan), "--prompts", str(run.parent / "prompts.txt"),
                     "--out", str(tmp_path / "enc"), "--device", "cuda", *VIDEO_ARGS],
            "device 'cuda' requested, but this machine has 0 CUDA device(s)",
            command=encode_prompts.main)
    assert not (tmp_path / "enc").exists()
