"""Every example command of the README runs as printed: the training section's on the micro
model, the sampling of `runs/default` on a micro run, and the real-scale, sampling, export and
encoding examples of a Wan folder on the tiny random one of tests/realscale_fixtures.py.

Training commands run as the README prints them (their comment cut), in a run folder of their
own that holds what the command needs first (stage 0, the stage before, a finished stage to
resume or restart, another run to compare), with a small configuration file appended in place
of the defaults' budgets (flags win over it; the README's own `--config` lines get it as their
file). Those whose budget is the point of the line (a 3-step student at 7000 iterations, the
image-to-video example) and the torchrun lines (8 ranks of a 1.3B or 14B model) are parsed and
planned; tests/test_config_resolve.py and tests/test_i2v.py train the former at tiny counts,
tests/test_distributed.py and tests/test_sequence_parallel.py run torchrun at 2 CPU ranks.
The image-to-video encoding and sampling run on a tiny Wan2.1-I2V folder. A README command
this module does not know fails the fast suite.
"""

from __future__ import annotations

import importlib
import re
import shlex
import shutil
from pathlib import Path

import pytest

import gpd_train.__main__ as train_cli
from gpd_train.__main__ import main
from gpd_train.run import preflight

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
[vanilla]
iterations = [2, 2, 2]
[guided]
iterations = [2, 2, 2]
guidance_iterations = 2
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


BASH_BLOCK = re.compile(r"```bash\n(.*?)```", re.S)
TRAIN = "python -m gpd_train"


def block_commands(block: str) -> list[str]:
    """The `python -m gpd_train...` and `torchrun` commands of a bash block as a shell runs
    them: continued lines joined, comments cut, a `for k in ...; do` body once per value."""
    lines, pending = [], ""
    for raw in block.splitlines():
        line = raw.partition("  #")[0].strip()
        if line.startswith("#"):
            continue
        pending = f"{pending} {line}".strip()
        if pending.endswith("\\"):
            pending = pending[:-1].rstrip()
            continue
        lines.append(pending)
        pending = ""
    commands, loop = [], None
    for line in lines:
        found = re.fullmatch(r"for (\w+) in ([^;]+); do", line)
        if found:
            loop = found.groups()
        elif line == "done":
            loop = None
        elif line.startswith((TRAIN, "torchrun")):
            values = loop[1].split() if loop else [None]
            commands += [line if v is None else line.replace(f"${loop[0]}", v) for v in values]
    return commands


def readme_commands() -> list[str]:
    """Every example command of the README: its bash blocks' and each inline
    `python -m gpd_train... --option` of its text."""
    text = README.read_text()
    commands = [c for block in BASH_BLOCK.findall(text) for c in block_commands(block)]
    spans = re.findall(rf"`({TRAIN}[^`]*)`", text)
    return commands + [" ".join(span.split()) for span in spans if " --" in span]


def training_examples() -> list[str]:
    """The README's training commands, after `python -m gpd_train`."""
    text = README.read_text()
    section = text[text.index("## Training: `python -m gpd_train`"):]
    return [c[len(TRAIN):].strip() for c in block_commands(BASH_BLOCK.findall(section)[0])]


def test_the_readme_lists_the_commands_this_test_knows():
    """A new README example must be placed here (what it needs), not silently skipped."""
    known = {"", "--stage 0", "--help", "--config run.toml", "--iterations 500 250 250",
             *NEEDS, *[c for c in training_examples() if c.startswith(PLANNED_ONLY)]}
    assert set(training_examples()) <= known, set(training_examples()) - known
    assert len(training_examples()) >= 15
    training = {f"{TRAIN} {c}".strip() for c in training_examples()}
    others = set(readme_commands()) - training
    known_others = {*MICRO_RUN_EXAMPLES, *WAN_EXAMPLES, *I2V_EXAMPLES, *TORCHRUN_PLANNED}
    assert others == known_others, (f"unknown: {others - known_others}; "
                                    f"gone from the README: {known_others - others}")


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


# -- the other sections' examples -------------------------------------------------------------
# The sampling of runs/default (and its report page), on a micro run of the GPD and guided
# chains evaluated at the examples' budgets.
MICRO_RUN_EXAMPLES = (
    "python -m gpd_train.sample --checkpoint runs/default --steps 6 --num 8 --out samples/",
    "python -m gpd_train.sample --checkpoint runs/default --stage 0 --steps 48 --guidance 1.5 "
    "--out t48/",
    "python -m gpd_train.sample --checkpoint runs/default/guided/stage3 --guidance 2.5 "
    "--out w25/",
    "python -m gpd_train.report_html --run-dir runs/default",
)
MICRO_RUN_SETUP = (["--stage", "0"], ["--stage", "1"], ["--stage", "2"], ["--stage", "3"],
                   ["--stage", "g", "--chain", "guided"], *(["--stage", k, "--chain", "guided"]
                                                           for k in ("1", "2", "3")), ["--eval"])
# A Wan folder's examples ($W: the tiny random one), in the order a user runs them.
WAN_EXAMPLES = (
    "python -m gpd_train --stage 0 --teacher $W --prompts prompts.txt --run-dir runs/wan",
    *(f"python -m gpd_train --stage {k} --teacher $W --prompts prompts.txt --run-dir runs/wan "
      "--precision bf16 --batch-size 1 --activation-checkpointing" for k in (1, 2, 3)),
    "python -m gpd_train --teacher $W --prompts prompts.txt --run-dir runs/wan",
    "python -m gpd_train.sample --checkpoint runs/wan --model $W --prompts prompts.txt --vae $W "
    "--vae-tiling --dtype bf16 --out videos/",
    "python -m gpd_train.export --run runs/wan --base $W --out wan-gpd-6step/",
    "python -m gpd_train.encode_prompts --model $W --prompts prompts.txt --out data/wan "
    "--negative wan",
    'python -m gpd_train.sample --checkpoint runs/wan --model $W --prompt "a cat surfing a wave" '
    "--vae $W --dtype bf16 --out wan/",
    "python -m gpd_train.export --run runs/wan --base $W --out student/",
    "python -m gpd_train.export --run runs/wan-lora --out student-lora/",
    "python -m gpd_train.export --run runs/wan-lora --base $W --merged --out s/",
    "python -m gpd_train.export --run runs/wan --base $W --stage 0 --out t/",
    "python -m gpd_train.export --run runs/wan --format comfyui --out wan-gpd-comfyui/",
    "python -m gpd_train.export --run runs/wan-lora --format comfyui --out wan-gpd-lora/",
)
# runs/wan-lora, as docs/real-scale.md makes it (on the encoded set, `--data data/wan`, the
# README's next step after encoding): before the first example that exports it.
WAN_LORA_SETUP = (["--stage", "0", "--teacher", "$W", "--data", "data/wan", "--run-dir",
                   "runs/wan-lora"],
                  ["--stage", "1", "--teacher", "$W", "--data", "data/wan", "--run-dir",
                   "runs/wan-lora", "--lora-rank", "4"])
# 8 ranks of a 1.3B / 14B model do not run on a CPU: parsed and resolved (the configuration
# the ranks would train), their data paths the encoded set's.
TORCHRUN_PLANNED = (
    "torchrun --nproc_per_node 8 -m gpd_train --stage 1 --preset wan2.1-t2v-1.3b --data "
    "/data/prompt-embeddings --run-dir runs/wan --precision bf16 --batch-size 2 "
    "--activation-checkpointing",
    "torchrun --nproc_per_node 8 -m gpd_train --stage 1 --teacher $W --data data/wan14-720p "
    "--run-dir runs/wan14-720p --precision bf16 --batch-size 1 --activation-checkpointing "
    "--sequence-parallel 4",
)
PROMPTS = ("a red cat runs in the park", "the blue dog jumps over water", "green bird flies",
           "a dog runs quickly", "the cat jumps slowly")


def run_readme(command: str, capsys, paths: dict[str, str], *appended: str) -> None:
    """Run a README command in this process: its module's main on its words (``paths``
    put in for the README's), then ``appended``; it must succeed."""
    for name, value in paths.items():
        command = command.replace(name, value)
    words = shlex.split(command)
    assert words[:2] == ["python", "-m"], command
    module = "gpd_train.__main__" if words[2] == "gpd_train" else words[2]
    rc = importlib.import_module(module).main([*words[3:], *appended])
    assert rc == 0, f"`{command}` exited {rc}: {capsys.readouterr().err}"


@pytest.mark.slow
def test_the_readme_samples_a_micro_run(micro, tmp_path, monkeypatch, capsys):
    toml = Path(micro[micro.index("--config") + 1])
    toml.write_text(EXAMPLES_TOML.replace('"gpd", "vanilla"', '"gpd"'))  # evaluated: trained
    monkeypatch.chdir(tmp_path)
    flags = ["--config", str(toml), "--run-dir", "runs/default", "--device", "cpu",
             "--threads", "1"]
    for needed in MICRO_RUN_SETUP:
        assert main([*needed, *flags]) == 0, f"setting up {needed}: {capsys.readouterr().err}"
    for command in MICRO_RUN_EXAMPLES:
        run_readme(command, capsys, {})
    assert (tmp_path / "runs" / "default" / "eval" / "report.html").is_file()
    assert {p.name for p in tmp_path.iterdir()} >= {"samples", "t48", "w25"}


@pytest.mark.slow
def test_the_readme_examples_of_a_wan_folder(tmp_path, monkeypatch, capsys):
    pytest.importorskip("transformers")
    pytest.importorskip("av")
    from realscale_fixtures import VIDEO, build_wan_folder

    wan = build_wan_folder(tmp_path / "Wan2.1-T2V-1.3B-Diffusers")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    (tmp_path / "wan.toml").write_text(EXAMPLES_TOML)  # budgets: the defaults' take hours
    # bf16 is CUDA's autocast, refused on the CPU: let it pass here (a no-op, fp32 training).
    monkeypatch.setattr(preflight, "check_precision", lambda precision, device: None)
    paths = {"$W": str(wan)}
    budgets = ["--config", "wan.toml", "--threads", "1"]
    size = [str(word) for name, value in VIDEO.items() for word in (f"--{name}", value)]
    for command in WAN_EXAMPLES:
        if "runs/wan-lora" in command and not (tmp_path / "runs" / "wan-lora").exists():
            for needed in WAN_LORA_SETUP:
                run_readme(shlex.join([*TRAIN.split(), *needed]), capsys, paths, *budgets)
        # Text prompts are encoded for Wan's 81 frames at 480 x 832 unless told: the folder's.
        appended = [*(budgets if command.startswith(f"{TRAIN} ") else []),
                    *(size if "--prompt" in command else [])]
        run_readme(command, capsys, paths, *appended)
    assert (tmp_path / "runs" / "wan" / "eval" / "report.md").is_file()
    assert len(list((tmp_path / "videos").glob("*.mp4"))) == len(PROMPTS)
    for command in TORCHRUN_PLANNED:
        for name, value in {**paths, "/data/prompt-embeddings": "data/wan",
                            "data/wan14-720p": "data/wan"}.items():
            command = command.replace(name, value)
        words = shlex.split(command)
        ranks = int(words[words.index("--nproc_per_node") + 1])
        config = train_cli.configure(train_cli.parse_args(words[words.index("gpd_train") + 1:]))
        assert ranks % config.parallel.sequence == 0 and config.stage_count("gpd") == 3


# Image-to-video ($I: a tiny Wan2.1-I2V folder; runs/i2v imported from it before sampling).
I2V_EXAMPLES = (
    "python -m gpd_train.encode_prompts --model $I --prompts prompts.txt --images images.txt "
    "--out data/i2v",
    'python -m gpd_train.sample --checkpoint runs/i2v --model $I --prompt "a cat" --image cat.png '
    "--out i2v/",
)


@pytest.mark.slow
def test_the_readme_image_to_video_examples_run(tmp_path, monkeypatch, capsys):
    """encode_prompts --images and sample --image as the README prints them, on a tiny
    Wan2.1-I2V folder at a tiny video size."""
    pytest.importorskip("transformers")
    import numpy as np
    from PIL import Image
    from realscale_fixtures import VIDEO, build_wan_i2v_folder

    folder = build_wan_i2v_folder(tmp_path / "Wan-I2V")
    monkeypatch.chdir(tmp_path)
    Image.fromarray(np.full((30, 44, 3), 200, dtype=np.uint8)).save("cat.png")
    Path("prompts.txt").write_text("a cat\na dog\n")
    Path("images.txt").write_text("cat.png\ncat.png\n")
    tiny = ["--device", "cpu", *(str(v) for name in ("height", "width", "frames")
                                 for v in (f"--{name}", VIDEO[name]))]
    encode, sampled = I2V_EXAMPLES
    run_readme(encode, capsys, {"$I": str(folder)}, *tiny)
    assert main(["--stage", "0", "--teacher", str(folder), "--data", "data/i2v", "--run-dir",
                 "runs/i2v", "--device", "cpu", "--threads", "1"]) == 0
    run_readme(sampled, capsys, {"$I": str(folder)}, *tiny)
    assert (tmp_path / "i2v" / "latents.safetensors").is_file()
