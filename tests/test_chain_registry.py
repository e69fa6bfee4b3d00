"""A chain added through the registry alone (one declaration and its objective, here) runs
end to end: CLI, training, run folder, evaluation and sampling."""

import json
from dataclasses import replace

import pytest
import torch
from builders import MICRO_TOML

from gpd_model import Conditioning, DiTDenoiser, add_noise
from gpd_train.__main__ import main
from gpd_train.config.chains import CHAINS, Chain, StageId, register, unregister
from gpd_train.infer.sample import main as sample
from gpd_train.train.objectives import DistillSetup
from gpd_train.train.step import eager_loss


class TeacherVelocityMatching:
    """The toy objective: the student regresses its stage teacher's velocity (the stage's
    denoiser: a CFG pair at the stage's w where it is one) at noised data latents (no
    rollouts)."""

    calls = 0

    def __init__(self, setup: DistillSetup, generator: torch.Generator, batch_size: int):
        self.setup, self.generator, self.batch_size = setup, generator, batch_size

    def prepare(self, step):
        data = self.setup.data
        cond, clean = data.draw(self.generator, self.batch_size, with_latents=True)
        cond = replace(cond, guidance=self.setup.guidance.draw(self.batch_size, self.generator))
        sigma = torch.rand(self.batch_size, generator=self.generator)
        noisy = add_noise(clean, torch.randn(clean.shape, generator=self.generator), sigma)
        with torch.no_grad():
            target = self.setup.teacher(noisy, sigma, cond)
        return {"noisy": noisy, "sigma": sigma, **cond.tensors(), "target": target}

    def forward(self, inputs):
        TeacherVelocityMatching.calls += 1
        pred = DiTDenoiser(self.setup.student)(inputs["noisy"], inputs["sigma"],
                                               Conditioning.from_tensors(inputs))
        return (pred - inputs["target"]).square().mean(), {}, {}

    def finish(self, outputs):
        pass

    def loss(self, step):
        return eager_loss(self, step)

    def stream_state(self):
        return {}

    def load_stream_state(self, state):
        pass


@pytest.fixture
def toy_chain():
    chain = register(Chain(name="toy", section="toy", label="toy VM", folder="toy",
                           seed_offset=300, summary="velocity matching (a test's chain)",
                           defaults={"iterations": None, "freq_weight": None},
                           objective=TeacherVelocityMatching))
    yield chain
    unregister(chain.name)


def test_a_registered_chain_trains_evaluates_and_samples(toy_chain, micro, tmp_path, capsys):
    toml = tmp_path / "toy.toml"
    toml.write_text(MICRO_TOML.replace('pipeline_chains = ["gpd", "vanilla"]',
                                       'pipeline_chains = ["toy"]') + "[toy]\niterations = [3]\n")
    args = [*micro, "--config", str(toml)]  # the later --config wins
    TeacherVelocityMatching.calls = 0
    assert main(args) == 0  # stage 0, the toy chain's stage 1, then the evaluation
    assert TeacherVelocityMatching.calls == 3  # [toy] iterations = [3], one stream
    run_dir = tmp_path / "run"
    record = json.loads((run_dir / "toy" / "stage1" / "done.json").read_text())
    assert record["teacher"] == "stage0" and record["iterations"] == 3
    assert StageId.parse("toy/stage1") == StageId("toy", 1)
    report = json.loads((run_dir / "eval" / "report.json").read_text())
    rows = {row["model"] for row in report["rows"]}
    assert "toy VM@4" in rows and not any(r.startswith(("GPD", "vanilla")) for r in rows)
    out = tmp_path / "samples"
    assert sample(["--checkpoint", str(run_dir), "--chain", "toy", "--num", "2",
                   "--out", str(out), "--device", "cpu"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["checkpoint"].endswith("toy/stage1") and summary["steps"] == 4
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "toy: velocity matching" in capsys.readouterr().out


def test_registry_refuses_a_taken_name_or_folder(toy_chain):
    with pytest.raises(ValueError, match="already registered"):
        register(Chain(name="toy", section="t2", label="x", folder="t2", seed_offset=1,
                       summary="x"))
    with pytest.raises(ValueError, match="folder 'toy' is taken"):
        register(Chain(name="toy2", section="t2", label="x", folder="toy", seed_offset=1,
                       summary="x"))
    assert "toy2" not in CHAINS
    with pytest.raises(ValueError, match="chain must be one of"):
        StageId("nope", 1)
    with pytest.raises(ValueError, match="not a stage folder"):
        StageId.parse("toy/stageX")
