"""A C++ (libtorch) program links libgpd_native and calls the gpd:: ops via the dispatcher.

Builds examples/cpp with the project's CMakeLists.txt in a temporary folder and runs it; the
program checks each op against a small inline computation and exits with its failure count.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch.utils

pytestmark = pytest.mark.slow  # subprocesses and compilers: minutes on 2 cores

ROOT = Path(__file__).resolve().parents[1]
COMPILERS = (os.environ.get("CXX", "c++"), "c++", "g++", "clang++")


def _missing_tool() -> str | None:
    if shutil.which("cmake") is None:
        return "cmake not found"
    if not any(shutil.which(compiler) for compiler in COMPILERS):
        return "no C++ compiler found"
    return None


@pytest.mark.skipif(_missing_tool() is not None, reason=f"C++ consumer: {_missing_tool()}")
def test_cpp_consumer_builds_links_and_calls_the_ops(tmp_path):
    build = tmp_path / "build"

    def run(*command: str) -> subprocess.CompletedProcess:
        done = subprocess.run(command, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"{' '.join(command)} failed:\n{done.stdout}\n{done.stderr}"
        return done

    run("cmake", "-S", str(ROOT), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
        "-DGPD_BUILD_EXAMPLES=ON", f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
        f"-DGPD_PYTHON={sys.executable}")
    run("cmake", "--build", str(build), "--target", "gpd_cpp_consumer",
        "--parallel", str(min(2, os.cpu_count() or 1)))
    result = run(str(build / "examples" / "cpp" / "gpd_cpp_consumer"))
    assert "0 failed" in result.stdout
    checks = [line for line in result.stdout.splitlines() if line.startswith(("ok", "FAIL"))]
    assert len(checks) == 8 and all(line.startswith("ok") for line in checks), result.stdout
