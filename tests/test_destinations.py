"""Outputs never overwrite what their command did not write (gpd_train/run/destination.py).

Every refused case records the whole state of the user's folder (each file's SHA-256, each
symbolic link's target, each folder) before and after and asserts it is identical, plus the
exit code and that the message names the option at fault.
"""

import hashlib
import os
import shutil
from pathlib import Path

import pytest
from builders import MICRO_TOML, file_size_limit

from gpd_train.__main__ import main as train_main
from gpd_train.data import encode_prompts
from gpd_train.infer import sample
from gpd_train.infer.export import cli as export
from gpd_train.infer.export import diffusers as diffusers_format
from gpd_train.run.destination import (
    EVAL,
    EXPORT,
    MARKER,
    SAMPLES,
    reuse_or_move_aside,
    write_marker,
)
from gpd_train.run.writes import WriteError


def tree(folder: Path) -> dict[str, str]:
    """Everything under ``folder``: file contents, link targets, folders (links not followed)."""
    state = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = Path(root) / name
            key = str(path.relative_to(folder))
            if path.is_symlink():
                state[key] = "link -> " + os.readlink(path)
            elif path.is_dir():
                state[key] = "folder"
            else:
                state[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return state


def leftovers(parent: Path) -> list[str]:
    """Temporary folders a staged write left behind (none may survive a failure)."""
    return [p.name for p in parent.iterdir() if ".partial-" in p.name]


def refused(capsys, code: int, *needles: str) -> str:
    err = capsys.readouterr().err
    assert code == 2, err
    assert "\nerror: " in "\n" + err and "Traceback" not in err
    for needle in needles:
        assert needle in err, err
    return err


# -- export -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def wan_run(tmp_path_factory):
    """(a tiny Wan2.1-T2V-Diffusers folder W, a run whose stage 0 was imported from W)."""
    pytest.importorskip("transformers")
    from realscale_fixtures import VIDEO, build_wan_folder

    root = tmp_path_factory.mktemp("wan")
    wan = build_wan_folder(root / "Wan2.1-T2V-tiny-Diffusers")
    prompts = root / "prompts.txt"
    prompts.write_text("a red cat runs\nthe dog jumps\n")
    run = root / "run"
    args = ["--stage", "0", "--run-dir", run, "--device", "cpu", "--threads", 1, "--teacher",
            wan, "--prompts", prompts, "--height", VIDEO["height"], "--width", VIDEO["width"],
            "--frames", VIDEO["frames"]]
    assert train_main([str(a) for a in args]) == 0
    return wan, run


def _export(run: Path, out: Path, base: Path | None, *extra: str) -> int:
    base_args = [] if base is None else ["--base", str(base)]
    return export.main(["--run", str(run), *base_args, "--out", str(out), *extra])


@pytest.mark.parametrize("where,relation", [("base", "is --base"),
                                            ("inside", "is inside --base"),
                                            ("around", "contains --base")])
def test_export_refuses_out_equal_inside_or_around_base(wan_run, capsys, where, relation):
    wan, run = wan_run
    out = {"base": wan, "inside": wan / "student", "around": wan.parent}[where]
    before = tree(wan.parent)
    code = _export(run, out, wan)
    refused(capsys, code, f"--out {out} {relation} {wan}", "choose an --out outside")
    assert tree(wan.parent) == before


@pytest.mark.parametrize("lora", [False, True], ids=["pipeline", "lora-path"])
def test_export_refuses_another_wan_folder(wan_run, tmp_path, capsys, lora):
    """A second Wan folder as --out: with --base (a pipeline export) or without it (the
    LoRA export path, which once replaced the folder's scheduler/)."""
    wan, run = wan_run
    other = tmp_path / "Wan-other"
    shutil.copytree(wan, other)
    before = tree(other)
    code = _export(run, other, None if lora else wan)
    refused(capsys, code, f"--out {other} is a Diffusers pipeline folder",
            "choose another --out")
    assert tree(other) == before
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("content", ["model folder", "foreign config.json", "user files"])
def test_export_refuses_any_folder_it_did_not_write(wan_run, tmp_path, capsys, content):
    wan, run = wan_run
    out = tmp_path / "out"
    if content == "model folder":
        shutil.copytree(wan / "transformer", out)
    else:
        out.mkdir()
        name = "config.json" if content == "foreign config.json" else "notes.txt"
        (out / name).write_text('{"mine": 1}')
    before = tree(out)
    code = _export(run, out, wan, "--overwrite")  # --overwrite covers only its own output
    refused(capsys, code, f"--out {out} is a", "only the command's own earlier output")
    assert tree(out) == before


def test_export_again_needs_overwrite_which_moves_the_old_one_aside(wan_run, tmp_path, capsys):
    wan, run = wan_run
    out = tmp_path / "student"
    assert _export(run, out, wan) == 0
    assert (out / MARKER).is_file() and (out / "vae").is_symlink()
    first = tree(out)
    refused(capsys, _export(run, out, wan), f"--out {out} already holds an export",
            "pass --overwrite", "student.old-<time>/")
    assert tree(out) == first
    base_before = tree(wan)
    assert _export(run, out, wan, "--overwrite") == 0
    (old,) = tmp_path.glob("student.old-*")
    assert tree(old) == first  # the earlier export, whole
    assert (out / "transformer" / "config.json").is_file() and (out / "vae").is_symlink()
    assert tree(wan) == base_before


def test_failed_export_leaves_nothing_half_written(wan_run, tmp_path, capsys, monkeypatch):
    wan, run = wan_run
    out = tmp_path / "student"

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(diffusers_format, "export_transformer", disk_full)
    refused(capsys, _export(run, out, wan), "no space left")
    assert not out.exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize("fault,message", [
    (OSError(28, "No space left on device"), "no space left while writing {out}/text_encoder/"),
    (PermissionError(13, "Permission denied"), "cannot copy {wan}/"),
])
def test_export_copy_that_fails_is_one_line(wan_run, tmp_path, capsys, monkeypatch, fault,
                                            message):
    wan, run = wan_run
    out = tmp_path / "student"

    def failing(*args, **kwargs):
        raise fault

    monkeypatch.setattr(shutil, "copyfile", failing)  # what copytree's copy2 calls per file
    err = refused(capsys, _export(run, out, wan, "--copy"),
                  message.format(out=out, wan=wan),
                  "then run the command again")
    assert err.count("error: ") == 1 and "[(" not in err  # not shutil.Error's raw list
    assert not out.exists() and leftovers(tmp_path) == []


# -- the trainer's run folder -----------------------------------------------------------------
@pytest.mark.parametrize("content", ["wan transformer", "foreign config.json"])
def test_run_dir_that_is_not_a_run_is_refused(micro, tmp_path, capsys, content):  # noqa: F811
    folder = tmp_path / "transformer"
    folder.mkdir()
    config = ('{"_class_name": "WanTransformer3DModel", "num_layers": 2}'
              if content == "wan transformer" else '{"learning_rate": 1}')
    (folder / "config.json").write_text(config)
    (folder / "diffusion_pytorch_model.safetensors").write_bytes(b"weights")
    before = tree(tmp_path)
    code = train_main(["--stage", "0", *micro, "--run-dir", str(folder)])
    refused(capsys, code, f"--run-dir {folder} is a", "not a gpd_train run folder",
            "choose another --run-dir")
    assert tree(tmp_path) == before


@pytest.mark.parametrize("command", ["train", "sample"])
def test_empty_paths_are_refused(micro, tmp_path, capsys, monkeypatch, command):  # noqa: F811
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    (cwd / "notes.txt").write_text("keep")
    monkeypatch.chdir(cwd)
    if command == "train":
        code, flag = train_main(["--stage", "0", *micro, "--run-dir", ""]), "--run-dir"
    else:
        code, flag = sample.main(["--checkpoint", str(tmp_path), "--out", ""]), "--out"
    refused(capsys, code, f"{flag} is empty")
    assert tree(cwd) == {"notes.txt": hashlib.sha256(b"keep").hexdigest()}


THREE_STAGES = (MICRO_TOML.replace("steps = [8, 4]", "steps = [8, 4, 2]")
                .replace("iterations = [3]\n", "iterations = [3, 3]\n")
                .replace("iterations = [2]\n", "iterations = [2, 2]\n")
                .replace("freq_weight = [0.0]", "freq_weight = [0.0, 0.0]"))


@pytest.mark.parametrize("damage,message", [
    ("stage1 corrupt", "stage1/model.safetensors is corrupt"),
    ("stage1 missing", "stage1 is not complete"),
    ("stage1 stale", "stage1 is stale: its stage teacher stage0 changed"),
])
def test_restart_checks_its_inputs_before_moving_anything(micro, tmp_path, capsys,  # noqa: F811
                                                         damage, message):
    (tmp_path / "micro.toml").write_text(THREE_STAGES)
    run_dir = tmp_path / "run"
    for stage in ("0", "1", "2"):
        assert train_main(["--stage", stage, *micro]) == 0
    if damage == "stage1 corrupt":
        output = run_dir / "stage1" / "model.safetensors"
        output.write_bytes(output.read_bytes()[:-64] + bytes(64))
    elif damage == "stage1 missing":
        (run_dir / "stage1" / "done.json").rename(tmp_path / "stage1-done.json")
    else:
        assert train_main(["--stage", "0", "--restart", "--seed", "7", *micro]) == 0
    before = tree(run_dir)
    capsys.readouterr()
    refused(capsys, train_main(["--stage", "2", "--restart", *micro]), message)
    assert tree(run_dir) == before  # the complete stage 2 was not moved aside


def test_restart_of_stage1_without_stage0_moves_nothing(micro, tmp_path, capsys):  # noqa: F811
    run_dir = tmp_path / "run"
    assert train_main(["--stage", "0", *micro]) == 0
    assert train_main(["--stage", "1", *micro]) == 0
    os.rename(run_dir / "stage0", tmp_path / "stage0-elsewhere")
    before = tree(run_dir)
    capsys.readouterr()
    refused(capsys, train_main(["--stage", "1", "--restart", *micro]),
            "stage0 is not complete", "python -m gpd_train --stage 0")
    assert tree(run_dir) == before


@pytest.mark.slow
def test_pipeline_moves_an_outdated_eval_aside_and_the_sampler_refuses_it(
        micro, tmp_path, capsys):  # noqa: F811
    run_dir = tmp_path / "run"
    assert train_main(micro) == 0  # every stage, then eval/
    files = sorted(tree(run_dir / "eval"))
    assert train_main(micro) == 0  # same inputs: rewritten in place (its timings change)
    assert list(run_dir.glob("eval.old-*")) == [] and sorted(tree(run_dir / "eval")) == files
    first = tree(run_dir / "eval")
    # The sampler never writes into the evaluation's folder, --overwrite or not.
    for extra in ([], ["--overwrite"]):
        code = sample.main(["--checkpoint", str(run_dir), "--device", "cpu", "--steps", "1",
                            "--out", str(run_dir / "eval"), *extra])
        refused(capsys, code, f"--out {run_dir / 'eval'} is a run's evaluation report",
                "not samples of gpd_train.sample")
    assert train_main(["--stage", "0", "--restart", "--seed", "7", *micro]) == 0
    capsys.readouterr()
    assert train_main(micro) == 0  # stale stages retrained, then a new evaluation
    assert "[eval] its inputs changed: moved the old report to" in capsys.readouterr().out
    (old,) = run_dir.glob("eval.old-*")
    assert tree(old) == first
    assert (run_dir / "eval" / "report.md").is_file()


def test_an_old_report_is_moved_aside_only_once_the_new_one_can_be_written(tmp_path):
    out = tmp_path / "eval"
    assert reuse_or_move_aside(out, EVAL, {"stages": "a"}) is None
    (out / "report.md").write_text("the old report")
    before = tree(tmp_path)
    with pytest.raises(WriteError, match=f"cannot write {tmp_path}/.eval.partial-"), \
            file_size_limit(4):  # a full disk: the new report's marker cannot be written
        reuse_or_move_aside(out, EVAL, {"stages": "b"})
    assert tree(tmp_path) == before  # nothing moved, no empty marker or folder left
    assert reuse_or_move_aside(out, EVAL, {"stages": "a"}) is None  # same inputs: kept
    moved = reuse_or_move_aside(out, EVAL, {"stages": "b"})
    assert (moved / "report.md").read_text() == "the old report"
    assert sorted(tree(out)) == [MARKER]


# -- the sampler ------------------------------------------------------------------------------
def _sample(checkpoint: Path, out: Path, *extra: str) -> int:
    return sample.main(["--checkpoint", str(checkpoint), "--steps", "1", "--device", "cpu",
                        "--out", str(out), *extra])


def test_sampler_refuses_a_folder_it_did_not_write(run_folder, tmp_path, capsys):  # noqa: F811
    folder, _, _ = run_folder
    out = tmp_path / "mine"
    out.mkdir()
    (out / "summary.json").write_text("my own summary")
    (out / "000-holiday.gif").write_bytes(b"GIF89a")
    before = tree(out)
    refused(capsys, _sample(folder, out), f"--out {out} is a folder holding 2 entries",
            "choose another --out")
    assert tree(out) == before


def test_sampler_again_needs_overwrite_and_leaves_no_old_gifs(run_folder, tmp_path,  # noqa: F811
                                                              capsys):
    folder, _, _ = run_folder
    out = tmp_path / "samples"
    assert _sample(folder, out, "--num", "3") == 0
    first = tree(out)
    refused(capsys, _sample(folder, out, "--num", "1"), "already holds samples",
            "pass --overwrite")
    assert tree(out) == first
    assert _sample(folder, out, "--num", "1", "--overwrite") == 0
    (old,) = tmp_path.glob("samples.old-*")
    assert tree(old) == first
    assert len(list(out.glob("*.gif"))) == 1  # only the new run's videos


def test_failed_sampling_leaves_nothing_half_written(run_folder, tmp_path, capsys,  # noqa: F811
                                                     monkeypatch):
    folder, _, _ = run_folder
    out = tmp_path / "samples"
    assert _sample(folder, out) == 0
    first = tree(out)

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(sample, "write_contact_sheet", broken)
    capsys.readouterr()
    assert _sample(folder, out, "--overwrite") == 2  # one line, no traceback
    err = capsys.readouterr().err
    assert "error: no space left while writing" in err and "Traceback" not in err
    assert tree(out) == first and list(tmp_path.glob("samples.old-*")) == []
    assert leftovers(tmp_path) == []


# -- encode_prompts ---------------------------------------------------------------------------
def _encode(wan: Path, out: str | Path, *extra: str) -> int:
    from realscale_fixtures import VIDEO

    prompts = wan.parent / "prompts.txt"
    return encode_prompts.main(["--model", str(wan), "--prompts", str(prompts), "--out",
                                str(out), "--device", "cpu", "--height", str(VIDEO["height"]),
                                "--width", str(VIDEO["width"]), "--frames", str(VIDEO["frames"]),
                                *extra])


@pytest.mark.parametrize("what,needle", [
    ("wan", "is a Diffusers pipeline folder"), ("run", "is a gpd_train run folder"),
    ("export", "is an export of gpd_train.export"), ("samples", "is samples of gpd_train.sample"),
    ("user files", "is a folder holding 1 entries not written by gpd_train")])
def test_encode_refuses_a_folder_it_did_not_write(wan_run, tmp_path, capsys, what, needle):
    wan, run = wan_run
    out = {"wan": wan, "run": run}.get(what, tmp_path / what)
    if what in ("export", "samples"):
        out.mkdir()
        write_marker(out, EXPORT if what == "export" else SAMPLES)
    elif what == "user files":
        out.mkdir()
        (out / "notes.txt").write_text("keep")
    before = tree(out)
    refused(capsys, _encode(wan, out), f"--out {out} {needle}",
            "not a prompt-embedding data set", "choose another --out")
    assert tree(out) == before


@pytest.mark.parametrize("command", ["encode", "sample", "export", "train"])
@pytest.mark.parametrize("inside", ["stage0", "stage0/ckpt", "eval", "vanilla/stage1"])
def test_outputs_inside_what_a_run_writes_are_refused(wan_run, micro, tmp_path, capsys,
                                                      command, inside):
    """Ancestors count: not only the stage folder itself, anything below it too."""
    wan, run = wan_run
    (run / "eval").mkdir(exist_ok=True)
    out = run / inside / "mine"
    before = tree(run)
    if command == "encode":
        code = _encode(wan, out)
    elif command == "sample":
        code = _sample(run, out)
    elif command == "export":
        code = _export(run, out, wan)
    else:
        code = train_main(["--stage", "0", *micro, "--run-dir", str(out)])
    flag = "--run-dir" if command == "train" else "--out"
    refused(capsys, code, f"{flag} {out} is inside {run / inside.split('/')[0]}, which the "
            f"gpd_train run folder {run} writes itself", f"choose an {flag} outside it")
    assert tree(run) == before


def test_outputs_inside_another_output_are_refused_and_beside_a_run_accepted(
        run_folder, tmp_path, capsys):  # noqa: F811
    folder, _, _ = run_folder
    samples = tmp_path / "samples"
    assert _sample(folder, samples) == 0
    before = tree(samples)
    refused(capsys, _sample(folder, samples / "more"),
            f"--out {samples / 'more'} is inside {samples}, samples of gpd_train.sample",
            f"choose an --out outside it, e.g. a new folder beside {samples}")
    assert tree(samples) == before
    assert _sample(folder, tmp_path / "more") == 0  # the hint: a new folder beside it
    # A folder the run would write itself, not there yet: its name is the run's.
    refused(capsys, _sample(folder, folder / "stage1"), f"--out {folder / 'stage1'} is a folder "
            f"the gpd_train run folder {folder} writes itself")
    assert not (folder / "stage1").exists()
    # A run folder's own entries are the run's; a new folder beside them is the user's.
    assert _sample(folder, folder / "samples") == 0
    assert (folder / "samples" / "summary.json").is_file()


def test_out_dot_is_the_current_directory(wan_run, run_folder, tmp_path, capsys,  # noqa: F811
                                          monkeypatch):
    wan, _ = wan_run
    folder, _, _ = run_folder
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    # Samples are renamed into place as a whole folder: not onto the shell's directory.
    refused(capsys, _sample(folder, "."), "--out . is the current directory",
            "give a folder name, e.g. --out ./samples")
    refused(capsys, _sample(folder, ".."), "--out .. holds the current directory")
    assert list(tmp_path.iterdir()) == [here] and list(here.iterdir()) == []
    # The hint's command is accepted.
    assert _sample(folder, "./samples") == 0 and (here / "samples" / MARKER).is_file()
    # A data set is written in place: an empty current directory is a new data set.
    data = tmp_path / "data"
    data.mkdir()
    monkeypatch.chdir(data)
    assert _encode(wan, ".") == 0
    assert (data / "shard-00000.safetensors").is_file() and (data / MARKER).is_file()


def test_encode_with_another_dtype_refuses_and_keeps_the_set(wan_run, tmp_path, capsys):
    wan, _ = wan_run
    out = tmp_path / "data"
    assert _encode(wan, out, "--dtype", "bf16") == 0
    before = tree(out)
    capsys.readouterr()
    refused(capsys, _encode(wan, out, "--dtype", "fp32"), "holds shards stored as bf16",
            "give --dtype bf16 to use them, or another --out for a fp32 set")
    assert tree(out) == before
    assert _encode(wan, out, "--dtype", "bf16") == 0  # the hint: accepted, nothing rewritten
    assert "already holds these 2 prompts, encoded as bf16" in capsys.readouterr().out
    assert tree(out) == before
    assert _encode(wan, tmp_path / "fp32", "--dtype", "fp32") == 0  # the other hint


def test_encode_resumes_a_data_set_from_before_markers(wan_run, tmp_path, capsys):
    wan, _ = wan_run
    out = tmp_path / "data"
    assert _encode(wan, out) == 0
    (out / MARKER).unlink()
    (out / "shard-00000.safetensors").unlink()
    assert _encode(wan, out) == 0
    assert (out / "shard-00000.safetensors").is_file()
