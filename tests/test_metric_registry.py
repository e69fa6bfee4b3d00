"""A metric added through the registry alone (one declaration and its computation, here) is
computed for every row, compared between paired rows and shown as a column in report.md and
report.html, through the trainer's CLI (stage 0, one stage per chain, the evaluation)."""

import json

import pytest
from builders import MICRO_TOML

from gpd_train.__main__ import main
from gpd_train.errors import ConfigError
from gpd_train.eval.metric_registry import (
    HIGHER,
    MEAN,
    METRICS,
    NONE,
    Metric,
    Sample,
    register,
    unregister,
)


def mean_level(judge, sample: Sample):
    """The toy metric: each video's mean value (per video: a bootstrap interval)."""
    return sample.videos.double().flatten(1).mean(dim=1)


@pytest.fixture
def toy_metric():
    metric = register(Metric("toy_level", "toy level", mean_level, MEAN, HIGHER, digits=3,
                             paired="toy level"))
    yield metric
    unregister(metric.key)


def test_a_registered_metric_gets_its_column(toy_metric, micro, tmp_path):
    toml = tmp_path / "micro.toml"
    toml.write_text(MICRO_TOML)
    assert main([*micro, "--config", str(toml)]) == 0
    eval_dir = tmp_path / "run" / "eval"
    report = json.loads((eval_dir / "report.json").read_text())
    for row in report["rows"] + report["sanity_rows"]:
        low, high = row["toy_level_ci"]
        assert low <= row["toy_level"] <= high and -1 <= row["toy_level"] <= 1, row["model"]
    paired = [c for c in report["comparisons"] if c["metric"] == "toy level"]
    psnr = [c for c in report["comparisons"] if c["metric"] == "PSNR (dB)"]
    assert paired and [(c["a"], c["b"]) for c in paired] == [(c["a"], c["b"]) for c in psnr]
    rows = {r["model"]: r for r in report["rows"]}
    for c in paired:  # a paired difference of means is the difference of the rows' means
        assert c["value"] == pytest.approx(rows[c["a"]]["toy_level"] - rows[c["b"]]["toy_level"])
    markdown = (eval_dir / "report.md").read_text()
    header = next(line for line in markdown.splitlines() if line.startswith("| model | steps"))
    assert header.endswith("| s/video | toy level |")  # after the registered columns
    first = report["rows"][1]
    low, high = first["toy_level_ci"]
    assert f"{first['toy_level']:.3f} [{low:.3f}, {high:.3f}] |" in markdown
    assert "<th>toy level</th>" in (eval_dir / "report.html").read_text()


def test_registry_refuses_a_taken_key_and_unknown_kinds():
    with pytest.raises(ConfigError, match="already registered"):
        register(Metric("psnr_db", "again", mean_level, MEAN))
    with pytest.raises(ConfigError, match="interval must be one of"):
        Metric("x", "x", mean_level, "bootstrap")
    with pytest.raises(ConfigError, match="paired comparison needs"):
        Metric("x", "x", mean_level, NONE, paired="x")
    assert list(METRICS)[:3] == ["psnr_db", "first_frame_psnr_db", "fd_data"]
