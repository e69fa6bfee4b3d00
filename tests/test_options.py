"""Every option is read or refused, sizes that cannot fit are refused before work, and faults
while writing name the file (issue 21, items 4 and 5). Each refusal: exit code 2, a message
naming the option, no traceback, and the user's files unchanged (SHA-256 of every file)."""

import errno
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from builders import configured_run, hashes, refused, suggested_args
from safetensors import SafetensorError
from safetensors.torch import save_file

from gpd_model import add_guidance_input, get_preset
from gpd_train.__main__ import main
from gpd_train.config.chains import StageId
from gpd_train.config.load import load_config
from gpd_train.infer import sample
from gpd_train.run import preflight, writes
from gpd_train.run.files import atomic_write_text
from gpd_train.train.builders import TrainingRun

REPO = Path(__file__).resolve().parents[1]


# -- the trainer: flags, TOML keys and environment values it would not read ------------------
@pytest.mark.parametrize("args,message", [
    (["--stage", "0", "--threads", "100000"], "--threads 100000 exceeds the"),
    (["--stage", "0", "--precision", "bf16"], "--precision bf16 is bf16 autocast on CUDA"),
    (["--stage", "1", "--lora-alpha", "8"], "distill.lora_alpha only apply to LoRA adapters"),
    (["--stage", "1", "--lora-rank", "100000"],
     "distill.lora_rank (--lora-rank) 100000 exceeds the width 32"),
    (["--stage", "0", "--height", "480"], "--height set(s) the videos --prompts are encoded"),
    (["--stage", "0", "--width", "832", "--frames", "81", "--negative", "wan"],
     "--frames, --negative, --width set(s) the videos --prompts are encoded for"),
    (["--height", "480"], "--height set(s) the videos --prompts are encoded for"),
    (["--eval", "--resume"], "--resume applies to one stage"),
    (["--resume"], "--resume applies to one stage"),
    (["--eval", "--iterations", "3"], "--iterations set(s) training, which --eval does not do"),
    (["--eval", "--batch-size", "2", "--teacher-iterations", "2"],
     "--batch-size, --teacher-iterations set(s) training"),
    (["--eval", "--compare", "x=runs/a", "--compare", "x=runs/b"],
     "--compare label 'x' given twice (runs/a and runs/b)"),
    (["--stage", "0", "--seed", str(10**24)],
     f"seed must be >= 0 and <= 4294967295, got {10**24}"),
    (["--stage", "0", "--seed", "-1"], "seed must be >= 0 and <= 4294967295, got -1"),
])
def test_unread_or_impossible_flags_are_refused(micro, tmp_path, capsys, args,  # noqa: F811
                                                 message):
    if "bf16" in args and torch.cuda.is_available():
        args = [*args, "--device", "cpu"]  # the later flag wins
    refused(capsys, [*micro, *args], message)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("toml,message", [
    ("[distill]\niterations = 5\n",
     "distill.iterations must be a list, got 5: one entry per stage (3 for steps "
     "[48, 24, 12, 6]), e.g. iterations = [2000, 2000, 2000]"),
    ("[vanilla]\nfreq_weight = 0.5\n", "vanilla.freq_weight must be a list, got 0.5"),
    # A list the user set for another schedule (an unset one follows steps).
    ("steps = [48, 24, 12]\n[distill]\nfreq_weight = [0.0, 0.0, 1.0]\n",
     "distill.freq_weight needs one entry per stage: steps [48, 24, 12] makes 2 stage(s), "
     "distill.freq_weight has 3 ([0.0, 0.0, 1.0]); give 2 value(s) "
     "(--freq-weight or [distill] freq_weight in the TOML file), or leave it unset"),
    ("[distill]\nlora_targets = [\"ffn.0\"]\n", "distill.lora_targets only apply to LoRA"),
    ("threads = 100000\n", "--threads 100000 exceeds the"),
])
def test_bad_toml_keys_are_refused_with_their_key(tmp_path, capsys, toml, message):
    path = tmp_path / "run.toml"
    path.write_text(toml)
    refused(capsys, ["--stage", "0", "--config", str(path), "--run-dir", str(tmp_path / "run"),
                     "--device", "cpu"], message)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("variable,value,message", [
    ("GPD_DISABLE_NATIVE", "yes", "GPD_DISABLE_NATIVE='yes': expected 1"),
    ("GPD_DIT_OP_BACKENDS", "foo", "GPD_DIT_OP_BACKENDS: expected name=backend items, got 'foo'"),
    ("GPD_DIT_OP_BACKENDS", "gated_residual=fast",
     "gated_residual: expected a backend in ('triton', 'compile'), got 'fast'"),
])
def test_bad_environment_values_are_refused_by_every_command(micro, tmp_path, capsys,  # noqa: F811
                                                              monkeypatch, variable, value,
                                                              message):
    monkeypatch.setenv(variable, value)
    refused(capsys, ["--stage", "0", *micro], message)
    assert not (tmp_path / "run").exists()
    out = tmp_path / "out"
    refused(capsys, ["--checkpoint", str(tmp_path), "--out", str(out)], message,
            command=sample.main)
    assert not out.exists()


@pytest.mark.parametrize("module", ["gpd_train", "gpd_train.sample", "gpd_train.export"])
def test_help_works_with_a_bad_dit_op_backends_value(module):
    """The variable is parsed at first use, not at import: --help never reads it."""
    env = {"GPD_DIT_OP_BACKENDS": "foo", "PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True,
                          text=True, env=env, cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "usage:" in done.stdout and "Traceback" not in done.stderr


# -- the machine's limits -------------------------------------------------------------------
def test_activation_floor_is_the_documented_arithmetic():
    tiny = get_preset("tiny")  # dim 64, ffn_dim 256, 3 layers, patch (4, 2, 2)
    tokens = (4 // 4) * (16 // 2) * (16 // 2)
    assert preflight.activation_floor(tiny, (3, 4, 16, 16), 10, False, "fp32") == (
        10 * tokens * 3 * (64 + 2 * 256) * 4)
    assert preflight.activation_floor(tiny, (3, 4, 16, 16), 10, True, "bf16") == (
        10 * tokens * 3 * 64 * 2)
    # Split over 3 ranks (--sequence-parallel 3) a GPU holds ceil(64 / 3) = 22 tokens.
    assert preflight.activation_floor(tiny, (3, 4, 16, 16), 10, True, "bf16", 3) == (
        10 * 22 * 3 * 64 * 2)


@pytest.mark.parametrize("batch,too_big", [(100000, True), (16, False), (2000, False)])
def test_batch_whose_activations_exceed_memory_is_refused(tmp_path, capsys, monkeypatch,
                                                          batch, too_big):
    """The tiny preset on a 16 GiB machine: 100000 (41 GiB of activations at least) is
    refused before work; the default 16 and a large but possible 2000 are not."""
    monkeypatch.setattr(preflight, "memory_bytes", lambda device: 16 * 2**30)
    run_dir = tmp_path / "run"
    argv = ["--stage", "0", "--batch-size", str(batch), "--run-dir", str(run_dir), "--device",
            "cpu", "--teacher-iterations", "1", "--threads", "1"]
    if too_big:
        refused(capsys, argv, f"--batch-size {batch} cannot fit", "16.0 GiB",
                "--activation-checkpointing")
        assert not run_dir.exists()
    else:  # checked, not trained: the check passes and the stage starts
        monkeypatch.setattr("gpd_train.__main__.run_stage", lambda *a, **k: "started")
        assert main(argv) == 0


# -- evaluation and provenance --------------------------------------------------------------
@pytest.fixture
def trained(tmp_path):
    """A micro run with stage 0 and GPD stage 1 finished (stage 1 absorbed CFG 1.5)."""
    run = configured_run(tmp_path)
    run.save_config()
    run.finish_stage(StageId("gpd", 0), run.new_model().state_dict(), {"stage": "stage0"})
    run.finish_stage(StageId("gpd", 1), run.new_model().state_dict(), {"stage": "stage1"})
    return run


def test_eval_at_another_guidance_than_trained_is_refused(micro, trained, tmp_path,  # noqa: F811
                                                          capsys):
    before = hashes(trained.folder)
    refused(capsys, [*micro, "--eval", "--guidance", "3"],
            "stage1 was trained at guidance 1.5", "teacher at CFG 3")
    assert hashes(trained.folder) == before and not (trained.folder / "eval").exists()


def test_teacher_other_than_the_imported_one_is_refused(micro, trained, tmp_path,  # noqa: F811
                                                        capsys):
    wan, other = tmp_path / "W", tmp_path / "W2"
    wan.mkdir()
    other.mkdir()
    record = trained.stage_folder(StageId("gpd", 0)) / "done.json"
    record.write_text(json.dumps({**json.loads(record.read_text()),
                                  "imported_from": str(wan)}))
    before = hashes(trained.folder)
    refused(capsys, [*micro, "--stage", "1", "--restart", "--teacher", str(other)],
            f"--teacher {other} is not the folder this run's stage 0 was imported from "
            f"({wan}", "--stage 0 --restart")
    assert hashes(trained.folder) == before


# -- the sampler ----------------------------------------------------------------------------
@pytest.mark.parametrize("args,message", [
    (["--latent-shape", "1,2"], "latent shape must be four positive ints 'C,T,H,W', got '1,2'"),
    (["--latent-shape", "3,1,8,8"], "--latent-shape 3,1,8,8 is read with text prompts"),
    (["--vae-tiling"], "--vae-tiling set(s) the VAE decoding to MP4, which only --vae"),
    (["--fps", "8", "--vae-dtype", "bf16"], "--vae-dtype, --fps set(s) the VAE decoding"),
    (["--preset", "tiny"], "is a run folder, whose config.json states the model; drop --preset"),
    (["--height", "480", "--frames", "81"], "--height, --frames set(s) the video size of text "
                                            "prompts"),
    (["--negative", "wan"], "--negative is the negative prompt text prompts are encoded with"),
    (["--guidance", "3"], "is a guidance-free student (it absorbed its teacher's CFG"),
    (["--chain", "vanilla"], "has no finished vanilla stage (only the shared stage0); train it "
                             "with `python -m gpd_train --stage 1 --chain vanilla --run-dir"),
    (["--stage", "5"], "has gpd stages 0..1 (steps [8, 4])"),
    (["--seed", str(2**64)], f"--seed must be >= 0 and <= 4294967295, got {2**64}"),
    (["--out", "/proc/gpd-out"], "--out /proc/gpd-out cannot be written"),
])
def test_sampler_refuses_unread_options(trained, tmp_path, capsys, args, message):
    out = tmp_path / "out"
    before = hashes(trained.folder)
    argv = ["--checkpoint", str(trained.folder), "--device", "cpu", "--out", str(out), *args]
    refused(capsys, argv, message, command=sample.main)
    assert hashes(trained.folder) == before and not out.exists()
    assert not Path("/proc/gpd-out").exists()


def test_sampler_on_a_run_folder_without_config_json_says_so(trained, tmp_path, capsys):
    (trained.folder / "config.json").unlink()
    refused(capsys, ["--checkpoint", str(trained.folder), "--out", str(tmp_path / "out")],
            "is not a complete run folder: it holds stage folders but no config.json",
            command=sample.main)


@pytest.mark.parametrize("form", ["file", "data set"])
def test_sampler_refuses_embeddings_for_another_channel_count(trained, tmp_path, capsys, form):
    context = {"context": torch.randn(1, 4, trained.dit_config.text_dim)}
    if form == "file":
        path = tmp_path / "prompts.safetensors"
        save_file(context, str(path), metadata={"latent_shape": "4,1,8,8"})
        message = "latent shape 4,1,8,8 has 4 channels, the model takes 3"
    else:
        path = tmp_path / "embeddings"
        path.mkdir()
        save_file(context, str(path / "shard-00000.safetensors"),
                  metadata={"latent_shape": "4,1,8,8"})
        save_file(context, str(path / "negative.safetensors"))
        message = f"--prompt-embeddings {path}: data set latent channels 4 do not match"
    out = tmp_path / "out"
    refused(capsys, ["--checkpoint", str(trained.stage_folder(StageId("gpd", 0))), "--device",
                     "cpu", "--prompt-embeddings", str(path), "--out", str(out), "--steps",
                     "1"], message, command=sample.main)
    assert not out.exists()


def test_guided_student_outside_its_learned_range_is_refused(tmp_path, capsys):
    config = load_config(None, {"run_dir": str(tmp_path / "run"), "device": "cpu",
                                "distill.guidance_stage": True,
                                "distill.guidance_range": [1.0, 2.0]})
    run = TrainingRun(config)
    run.save_config()
    guidance = StageId("gpd", "g")
    run.finish_stage(StageId("gpd", 0), run.new_model().state_dict(), {"stage": 0})
    run.finish_stage(guidance, add_guidance_input(run.new_model()).state_dict(), {})
    argv = ["--checkpoint", str(run.stage_folder(guidance)), "--device", "cpu", "--steps", "1",
            "--num", "1"]
    refused(capsys, [*argv, "--guidance", "10", "--out", str(tmp_path / "a")],
            "learned CFG scales 1..2 (its done.json); w = 10 is outside that range",
            command=sample.main)
    assert sample.main([*argv, "--guidance", "2", "--out", str(tmp_path / "b")]) == 0


# -- faults while writing -------------------------------------------------------------------
def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_names_the_file_and_leaves_no_partial_file(tmp_path, monkeypatch):
    target = tmp_path / "record.json"
    monkeypatch.setattr("gpd_train.run.files.os.fsync", _no_space)
    with pytest.raises(writes.WriteError, match=f"no space left while writing {target} "
                                                   r"\(\d+ MiB free on the disk holding"):
        atomic_write_text(target, "{}")
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_during_training_is_one_line_naming_the_file(micro, tmp_path,  # noqa: F811
                                                                 monkeypatch, capsys):
    def full(tensors, path, metadata=None):
        Path(path).write_bytes(b"partial")
        raise SafetensorError("Error while serializing: I/O error: No space left on device "
                              "(os error 28)")

    monkeypatch.setattr("gpd_train.run.files.save_file", full)
    err = refused(capsys, ["--stage", "0", *micro], "no space left while writing "
                  f"{tmp_path / 'run' / 'stage0'}", "free space there")
    assert ".safetensors" in err
    assert not list((tmp_path / "run").rglob(".*.tmp-*"))  # the partial file removed


def test_write_errors_other_than_space_name_the_path(tmp_path):
    with pytest.raises(writes.WriteError, match=f"cannot write {tmp_path / 'x'}: Permission "
                                                   "denied; choose a path in a writable folder"):
        with writes.writing(tmp_path / "x"):
            raise PermissionError(errno.EACCES, "Permission denied")


def test_a_full_disk_appending_metrics_names_the_log_and_the_resume(micro, tmp_path,  # noqa: F811
                                                                   monkeypatch, capsys):
    log = tmp_path / "run" / "stage0" / "metrics.jsonl"
    real_open = Path.open

    def full_after_two(path, mode="r", *args, **kwargs):
        if path == log and mode == "a" and log.exists() and len(log.read_text().split()) >= 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(Path, "open", full_after_two)
    err = refused(capsys, ["--stage", "0", *micro], f"[stage0] no space left while writing "
                  f"{log}", "free space there", "then continue the stage with --resume")
    assert err.count("error: ") == 1 and err.endswith("by itself)\n")  # one sentence
    monkeypatch.setattr(Path, "open", real_open)
    assert main(["--stage", "0", "--resume", *micro]) == 0  # the named next step
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1, 2, 3]


def test_a_lock_that_is_a_folder_is_one_line(micro, tmp_path, capsys):  # noqa: F811
    lock = tmp_path / "run" / ".lock"
    lock.mkdir(parents=True)
    (lock / "notes.txt").write_text("mine")
    refused(capsys, ["--stage", "0", *micro], f"cannot open the run folder's lock file {lock}",
            "move what is there elsewhere, or choose another --run-dir")
    assert hashes(lock) == {"notes.txt": hashes(lock)["notes.txt"]}
    lock.rename(tmp_path / "lock-moved")
    assert main(["--stage", "0", *micro]) == 0  # the remedy: moved elsewhere


@pytest.mark.parametrize("flag,folder", [(["--log", "tensorboard"], "tensorboard"),
                                         (["--validate-every", "1"], "validation")])
def test_a_file_where_a_stage_folder_goes_is_refused_before_training(
        micro, tmp_path, capsys, flag, folder):  # noqa: F811
    assert main(["--stage", "0", *micro]) == 0
    stage = tmp_path / "run" / "stage1"
    stage.mkdir()
    (stage / folder).write_text("mine")
    refused(capsys, ["--stage", "1", *micro, *flag], f"{stage / folder} is a file, where "
            f"{flag[0]}", f"writes stage1's {folder}/ folder; move the file elsewhere, or "
            f"drop {flag[0]}")
    assert sorted(p.name for p in stage.iterdir()) == [folder]  # nothing trained
    (stage / folder).rename(tmp_path / "moved")
    assert main(["--stage", "1", *micro, *flag]) == 0  # the remedy: moved elsewhere


def test_eval_where_no_run_exists_is_one_line_and_writes_nothing(micro, tmp_path, capsys,
                                                                 monkeypatch):  # noqa: F811
    run = tmp_path / "run"
    err = refused(capsys, ["--eval", *micro], f"--eval: {run} holds no trained run",
                  f"train it first with `python -m gpd_train --run-dir {run}`")
    assert len(err.strip().splitlines()) == 1 and not run.exists()  # no .lock left
    ran = []
    monkeypatch.setattr("gpd_train.__main__.run_pipeline", lambda config, **k: ran.append(1))
    assert main([*micro, *suggested_args(err)]) == 0 and ran == [1]


def test_eval_refuses_a_run_holding_a_stage_beyond_its_steps(micro, tmp_path, capsys):
    # Stage 2 trained with `--steps 8 4 2`, evaluated with the micro run's `steps = [8, 4]`:
    # the report would silently leave the 2-step student out.
    run = tmp_path / "run"
    for sid in (StageId("gpd", 0), StageId("gpd", 2)):
        folder = sid.folder(run)
        folder.mkdir(parents=True)
        (folder / "done.json").write_text("{}")
        (folder / "model.safetensors").write_bytes(b"")
    beyond = StageId("gpd", 2).folder(run)
    err = refused(capsys, ["--eval", *micro], f"--eval: {beyond} is a finished stage beyond the "
                  "1 gpd stages of steps [8, 4]", "give the --steps (or --config) it was trained")
    assert len(err.strip().splitlines()) == 1 and not (run / ".lock").exists()


def test_an_os_error_escaping_the_trainer_is_said_about_the_file(micro, tmp_path, capsys,
                                                                 monkeypatch):
    # A fault no writer wrapped (here the pipeline's own): one line naming the file and the
    # next step, not the OS's bare words.
    inside, outside = tmp_path / "run" / "stage1" / "x.bin", tmp_path / "teacher.bin"
    for fault, needles in (
            (OSError(errno.ENOSPC, "No space left on device", str(inside)),
             (f"no space left while writing {tmp_path / 'run'}", ", then run the command again")),
            (PermissionError(errno.EACCES, "Permission denied", str(outside)),
             (f"cannot access {outside}: Permission denied; make it accessible",))):
        def failing(config, resume, fault=fault):
            raise fault
        monkeypatch.setattr("gpd_train.__main__.run_pipeline", failing)
        err = refused(capsys, micro, *needles)
        assert len(err.strip().splitlines()) == 1
