"""The device check's Python parts run end to end on the CPU at toy sizes.

They only run for real on a lent GPU, rarely; these dry runs keep them from rotting
when the trainer's or model's interfaces move.
"""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_stage_step_dry_run_reports_a_finite_loss_and_times(tmp_path) -> None:
    out = tmp_path / "stage_step.json"
    subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "stage_step.py"), "--preset", "tiny",
         "--latent", "3,4,8,8", "--out", str(out)],
        check=True, cwd=ROOT, capture_output=True, timeout=300,
    )
    result = json.loads(out.read_text())
    assert result["device"] == "cpu" and result["preset"] == "tiny"
    assert len(result["step_seconds"]) == 2 and all(t > 0 for t in result["step_seconds"])
    assert result["loss"] == result["loss"] and result["loss"] >= 0  # finite, not NaN
