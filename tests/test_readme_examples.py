"""Every `python -m gpd_train` example of the README's training section runs, on the micro model.

Each command runs as the README prints it (its comment cut), in a run folder of its own that
holds what the command needs first (stage 0, the stage before, a finished stage to resume or
restart, another run to compare), with the micro configuration's file in place of the
defaults' budgets. Those whose budget is the point of the line (a 3-step student at 7000
iterations, the image-to-video example) are parsed and planned, their training stood in for;
tests/test_config_resolve.py and tests/test_i2v.py train them at tiny counts. The real-scale
section's image-to-video commands run on a tiny Wan2.1-I2V folder.
"""

from __future__ import annotations

import shlex
import shutil
from pathlib import Path

import pytest

import gpd_train.__main__ as train_cli
from gpd_train.__main__ import main

README = Path(__file__).resolve().parents[1] / "README.md"

# Four sampling steps at the teacher, halving to one; every chain's lists one entry per stage.
EXAMPLES_TOML = """\
steps = [8, 4, 2, 1]
pipeline_chains = ["gpd", "vanilla"]
batch_size = 2
checkpoint_every = 2
[stage0]
iterations = 2
[distill]
iterations = [2, 2, 2]
guidance_iterations = 2
[vanilla]
iterations = [2, 2, 2]
[guided]
iterations = [2, 2, 2]
[horizon]
horizons = [2, 4]
iterations = [2, 2]
freq_weight = [0.0, 1.0]
[eval]
prompts = 4
batch_size = 4
examples = 2
"""

# What a command's run folder holds before it runs (in this order).
NEEDS: dict[str, list[list[str]]] = {
    "--stage 1": [["--stage", "0"]],
    "--stage 2": [["--stage", "0"], ["--stage", "1"]],
    "--stage 1 --chain vanilla": [["--stage", "0"]],
    "--stage g --chain guided": [["--stage", "0"]],
    "--stage 1 --chain guided": [["--stage", "0"], ["--stage", "g", "--chain", "guided"]],
    "--stage 2 --resume": [["--stage", "0"], ["--stage", "1"], ["--stage", "2"]],
    "--stage 2 --restart": [["--stage", "0"], ["--stage", "1"], ["--stage", "2"]],
    "--stage 1 --iterations 3": [["--stage", "0"]],
    "--stage 1 --lora-rank 16": [["--stage", "0"]],
    "--stage 1 --chain horizon": [["--stage", "0"]],
    "--stage 1 --log tensorboard --validate-every 200": [["--stage", "0"]],
    "--eval": [[]],
    '--eval --compare "lr 1e-4=runs/lr1e-4"': [[]],
}
# Whole pipelines at their own budgets: parsed and planned (their training stood in for); the
# image-to-video example trains at tiny counts in tests/test_i2v.py.
PLANNED_ONLY = ("--steps 48 24 12 6 3", "--config examples/i2v.toml")


def training_examples() -> list[str]:
    """The README's training commands, after `python -m gpd_train`, comments cut."""
    text = README.read_text()
    block = text[text.index("## Training: `python -m gpd_train`"):]
    start = block.index("```bash") + len("```bash")
    block = block[start:block.index("```", start)]
    commands = []
    for line in block.splitlines():
        command = line.partition("  #")[0].strip()
        if command.startswith("python -m gpd_train"):
            commands.append(command[len("python -m gpd_train"):].strip())
    return commands


def test_the_readme_lists_the_commands_this_test_knows():
    """A new README example must be placed here (what it needs), not silently skipped."""
    known = {"", "--stage 0", "--help", "--config run.toml", "--iterations 500 250 250",
             *NEEDS, *[c for c in training_examples() if c.startswith(PLANNED_ONLY)]}
    assert set(training_examples()) <= known, set(training_examples()) - known
    assert len(training_examples()) >= 15


@pytest.mark.slow
@pytest.mark.parametrize("command", training_examples())
def test_a_readme_training_example_runs(command, request, tmp_path, monkeypatch, capsys):
    if command.startswith(PLANNED_ONLY):  # the model the command's own configuration names
        planned: list = []
        monkeypatch.setattr(train_cli, "run_pipeline",
                            lambda config, resume: planned.append(config))
        monkeypatch.chdir(README.parent)  # examples/ is the repository's
        own = ["--run-dir", str(tmp_path / "run"), "--device", "cpu", "--threads", "1"]
        assert main([*shlex.split(command), *own]) == 0, capsys.readouterr().err
        assert len(planned) == 1
        return
    micro = request.getfixturevalue("micro")
    toml = Path(micro[micro.index("--config") + 1])
    toml.write_text(EXAMPLES_TOML)
    monkeypatch.chdir(tmp_path)
    shutil.copy(toml, tmp_path / "run.toml")  # the README's --config run.toml
    flags = [*micro, "--threads", "1"]
    if command == "--help":
        with pytest.raises(SystemExit) as exit_info:
            main(["--help"])
        assert exit_info.value.code == 0 and "--stage" in capsys.readouterr().out
        return
    for needed in NEEDS.get(command, []):
        assert main([*needed, *flags]) == 0, f"setting up {needed}: {capsys.readouterr().err}"
    if "--compare" in command:  # another run: the same stage 0, its own GPD chain
        other = tmp_path / "runs" / "lr1e-4"
        other.mkdir(parents=True)
        shutil.copytree(tmp_path / "run" / "stage0", other / "stage0")
        other_flags = [*flags[:flags.index("--run-dir")], "--run-dir", str(other),
                       *flags[flags.index("--run-dir") + 2:]]
        for stage in ("1", "2", "3"):
            assert main(["--stage", stage, "--lr", "1e-4", *other_flags]) == 0, \
                capsys.readouterr().err
    rc = main([*shlex.split(command), *flags])
    assert rc == 0, f"`python -m gpd_train {command}` exited {rc}: {capsys.readouterr().err}"


def _real_scale_line(needle: str) -> list[str]:
    """The README's real-scale command holding ``needle``, split, its comment cut."""
    line = next(line for line in README.read_text().splitlines()
                if line.startswith("python -m") and needle in line)
    return shlex.split(line.partition("  #")[0])


@pytest.mark.slow
def test_the_readme_image_to_video_examples_run(tmp_path, monkeypatch):
    """encode_prompts --images and sample --image as the README prints them, on a tiny
    Wan2.1-I2V folder at a tiny video size ($I the folder; runs/i2v imported from it)."""
    pytest.importorskip("transformers")
    import numpy as np
    from PIL import Image
    from realscale_fixtures import VIDEO, build_wan_i2v_folder

    from gpd_train.data import encode_prompts
    from gpd_train.infer import sample

    folder = build_wan_i2v_folder(tmp_path / "Wan-I2V")
    monkeypatch.chdir(tmp_path)
    Image.fromarray(np.full((30, 44, 3), 200, dtype=np.uint8)).save("cat.png")
    Path("prompts.txt").write_text("a cat\na dog\n")
    Path("images.txt").write_text("cat.png\ncat.png\n")
    tiny = ["--device", "cpu", *(str(v) for name in ("height", "width", "frames")
                                 for v in (f"--{name}", VIDEO[name]))]

    def run(command: list[str], main_of) -> None:
        argv = [str(folder) if arg == "$I" else arg for arg in command[3:]]  # after the module
        assert main_of([*argv, *tiny]) == 0

    encode = _real_scale_line("--images images.txt")
    assert encode[:3] == ["python", "-m", "gpd_train.encode_prompts"]
    run(encode, encode_prompts.main)
    data = encode[encode.index("--out") + 1]
    assert main(["--stage", "0", "--teacher", str(folder), "--data", data, "--run-dir",
                 "runs/i2v", "--device", "cpu", "--threads", "1"]) == 0
    sampled = _real_scale_line("--image cat.png")
    assert sampled[:3] == ["python", "-m", "gpd_train.sample"]
    run(sampled, sample.main)
    assert (tmp_path / sampled[sampled.index("--out") + 1] / "latents.safetensors").is_file()
