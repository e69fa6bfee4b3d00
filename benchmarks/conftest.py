"""Collect the bench_*.py suites when running `pytest benchmarks/`."""

import os

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_collect_file(file_path, parent):
    # Files named on the command line are collected by pytest itself; do not add them twice.
    if parent.session.isinitpath(file_path):
        return None
    if file_path.suffix == ".py" and file_path.name.startswith("bench_"):
        return pytest.Module.from_parent(parent, path=file_path)
    return None
