"""The console scripts a pip install puts on PATH (setup.py's CONSOLE_SCRIPTS): each names the
main of its `python -m` module, and the installed script runs."""

from __future__ import annotations

import importlib
import importlib.metadata
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

SCRIPTS = {"gpd-train": "gpd_train.__main__", "gpd-sample": "gpd_train.sample",
           "gpd-export": "gpd_train.export", "gpd-encode-prompts": "gpd_train.encode_prompts"}


def installed() -> importlib.metadata.Distribution:
    try:
        dist = importlib.metadata.distribution("gpd-engine")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("gpd-engine is not installed (pip install -e '.[test]', or make setup)")
    if not any(ep.group == "console_scripts" for ep in dist.entry_points):
        pytest.skip("the installed gpd-engine predates its console scripts: reinstall it "
                    "(pip install --no-build-isolation -e '.[test]', or make setup)")
    return dist


def test_each_script_is_the_main_of_its_module():
    scripts = {ep.name: ep for ep in installed().entry_points if ep.group == "console_scripts"}
    assert set(scripts) == set(SCRIPTS)
    for name, module in SCRIPTS.items():
        main = scripts[name].load()
        assert callable(main) and main is importlib.import_module(module).main, name


def script_path(dist: importlib.metadata.Distribution, name: str) -> Path:
    """Where pip wrote the script: as the install's RECORD says (a venv or --user install),
    else the interpreter's scripts folder, else on PATH (e.g. pip install --target DIR, whose
    RECORD paths are relative to a prefix it did not use)."""
    recorded = [Path(dist.locate_file(f)) for f in dist.files or () if f.name == name]
    candidates = [*recorded, Path(sysconfig.get_path("scripts")) / name,
                  Path(shutil.which(name) or name)]
    found = next((path for path in candidates if path.is_file()), None)
    assert found is not None, f"no {name} script: looked at {candidates}"
    return found


@pytest.mark.slow
def test_installed_scripts_run(tmp_path):
    """Each script file pip wrote prints its help (the same as its `python -m` form), and a
    bad option is one error line with exit status 2, as with `python -m`."""
    paths = {name: script_path(installed(), name) for name in SCRIPTS}
    for name, module in SCRIPTS.items():
        done = subprocess.run([str(paths[name]), "--help"], capture_output=True, text=True,
                              cwd=tmp_path, timeout=120)
        assert done.returncode == 0, done.stderr
        want = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True,
                              text=True, cwd=tmp_path, timeout=120)
        assert done.stdout == want.stdout and "usage:" in done.stdout, name
    refused = subprocess.run([str(paths["gpd-export"]), "--no-such-option"], capture_output=True,
                             text=True, cwd=tmp_path, timeout=120)
    assert refused.returncode == 2 and "error:" in refused.stderr


@pytest.mark.slow
def test_each_python_m_form_exits_with_the_status_its_main_returns(tmp_path):
    """`python -m MODULE` on a request its main refuses: one error line and exit status 2
    (the module's `__main__` block passes main's status on, as the console script does)."""
    missing = str(tmp_path / "missing")
    refusals = {"gpd_train": ["--eval", "--run-dir", missing],
                "gpd_train.sample": ["--checkpoint", missing, "--out", "o"],
                "gpd_train.export": ["--run", missing, "--out", "o"],
                "gpd_train.encode_prompts": ["--model", missing, "--prompts", missing, "--out",
                                             "o"],
                "gpd_train.report_html": ["--run-dir", missing]}
    # Started together: each spends its seconds importing torch.
    runs = {module: subprocess.Popen([sys.executable, "-m", module, *args], cwd=tmp_path,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for module, args in refusals.items()}
    for module, run in runs.items():
        err = run.communicate(timeout=300)[1]
        assert run.returncode == 2 and err.count("error: ") == 1, (module, run.returncode, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written
