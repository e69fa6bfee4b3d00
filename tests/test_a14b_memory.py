"""docs/a14b-memory.md holds what benchmarks/a14b_memory.py prints, whose terms are checked
against counts written out here."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("a14b_memory",
                                                  ROOT / "benchmarks" / "a14b_memory.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_page_holds_the_scripts_output():
    script = _script()
    printed = script.report(script.build_parser().parse_args([]))
    assert printed in (ROOT / "docs" / "a14b-memory.md").read_text()
    assert "ARITHMETIC" in (ROOT / "docs" / "a14b-memory.md").read_text()


def test_terms():
    script = _script()
    counts = script._counts("wan2.1-t2v-14b", 64)
    assert counts["P"] == counts["n"] * counts["block"] + counts["root"]
    assert 14.288e9 <= counts["P"] < 14.289e9  # docs/real-scale.md: P = 14.288e9
    # 480p, 81 frames: latent 21 x 60 x 104, patch (1, 2, 2)
    assert script.tokens(480, 832, 81, (1, 2, 2)) == 21 * 30 * 52
    kept, block = script.activations(counts, 1000, 1)
    assert kept == 40 * 1000 * 5120 * 2 and block == 1000 * (17 * 5120 + 2 * 13824) * 2
    kept, block = script.activations(counts, 1000, 4)
    assert kept == 40 * 1000 * 5120 * 2 / 4 and block == 1000 * (20 * 5120 + 2 * 13824) * 2 / 4
    rows = dict(script.lora_rows(counts, 1000, 141.0))
    assert rows["**total**"] == pytest.approx(
        4 * counts["P"] + 32 * counts["A"] + sum(script.activations(counts, 1000, 1)))
