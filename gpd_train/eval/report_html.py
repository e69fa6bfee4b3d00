"""``python -m gpd_train.report_html --run-dir DIR``: rebuild DIR/eval/report.html (and its
video grid) from the evaluation's report.json, e.g. after installing matplotlib or to take
a screenshot (``chromium --headless --screenshot=report.png DIR/eval/report.html``)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from gpd_train.errors import ConfigError
from gpd_train.eval.report_page import report_problems, write_report_html
from gpd_train.run.writes import COMMAND_ERRORS, command_failed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gpd_train.report_html",
        description="Rebuild eval/report.html from an evaluation's report.json.")
    parser.add_argument("--run-dir", required=True, help="the run folder (holding eval/)")
    args = parser.parse_args(argv)
    run_dir = Path(args.run_dir)
    source = run_dir / "eval" / "report.json"
    try:
        if not source.is_file():
            raise ConfigError(f"no evaluation in {run_dir} ({source} is missing): run "
                              f"`python -m gpd_train --eval --run-dir {run_dir}` first")
        rerun = f"rerun the evaluation: `python -m gpd_train --eval --run-dir {run_dir}`"
        try:
            report = json.loads(source.read_text())
        except ValueError as exc:
            raise ConfigError(f"{source} is not JSON ({exc}); {rerun}") from None
        problems = report_problems(report)
        if problems:
            shown = "; ".join(problems[:3]) + (f" (and {len(problems) - 3} more)"
                                               if len(problems) > 3 else "")
            raise ConfigError(f"{source} is not an evaluation report gpd_train can read: "
                              f"{shown}; {rerun}")
        print(f"report: {write_report_html(report, run_dir)}")
    except COMMAND_ERRORS as exc:  # an OSError: said about eval/ or the file it names
        return command_failed(exc, run_dir / "eval")
    return 0


if __name__ == "__main__":
    sys.exit(main())
