"""The shape of gpd_train: sub-packages in layers, imports pointing down, no circles, and the
sampler, the export and the evaluation free of the trainer (issue 29's acceptance)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "gpd_train"

# Bottom up; a module may import its own layer's packages and any layer below it.
LAYERS = (
    {"errors", "devices"},
    {"config"},
    {"parallel", "run"},
    {"data"},
    {"infer"},
    {"eval"},
    {"train"},
    {"__main__", "sample", "export", "encode_prompts", "report_html", "__init__"},
)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """The gpd_train modules ``path`` imports, anywhere in it (function bodies included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            raise AssertionError(f"{path}: relative import (gpd_train imports absolutely)")
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("gpd_train"):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in modules else node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("gpd_train")}
    return found


def _part(module: str) -> str:
    """The sub-package (or top-level module) a module belongs to."""
    parts = module.split(".")
    if len(parts) == 1:
        return "__init__"
    return parts[1]


def _layer(part: str) -> int:
    for rank, layer in enumerate(LAYERS):
        if part in layer:
            return rank
    raise AssertionError(f"gpd_train.{part} is in no layer of tests/test_layout.py: place it")


def test_imports_point_down_the_layers():
    modules = _modules()
    upward = []
    for module, path in modules.items():
        own = _layer(_part(module))
        for target in _imports(path, modules):
            if _layer(_part(target)) > own:
                upward.append(f"{module} -> {target}")
    assert not upward, f"imports pointing up: {upward}"


def test_no_import_circle():
    modules = _modules()
    graph = {m: _imports(p, modules) & set(modules) for m, p in modules.items()}
    # A package's __init__ is imported with any of its modules; count only what it imports.
    state: dict[str, int] = {}
    circles = []

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                circles.append(trail[trail.index(target):] + [target])
            elif target not in state:
                visit(target, trail + [target])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not circles, f"import circles: {circles}"


@pytest.mark.slow
@pytest.mark.parametrize("entry", ["gpd_train", "gpd_train.sample", "gpd_train.export",
                                   "gpd_train.eval.evaluate", "gpd_train.infer.sample",
                                   "gpd_train.report_html", "gpd_train.encode_prompts"])
def test_inference_and_evaluation_load_no_training_module(entry):
    code = (f"import sys, {entry}\n"
            "print(sorted(m for m in sys.modules if m.startswith('gpd_train.train')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, check=True).stdout
    assert out.strip() == "[]", f"importing {entry} loaded {out.strip()}"


def test_the_package_face_loads_only_the_configuration():
    code = ("import sys, gpd_train\n"
            "print(sorted(m for m in sys.modules if m.startswith('gpd_train')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, check=True).stdout
    loaded = {m.split(".")[1] for m in ast.literal_eval(out) if "." in m}
    assert loaded <= {"config", "errors"}, loaded


def test_every_built_in_chain_is_known_without_the_trainer():
    code = ("import sys\nfrom gpd_train.config.chains import CHAINS\n"
            "print(sorted(CHAINS), any(m.startswith('gpd_train.train') for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, check=True).stdout
    assert out.strip() == "['gpd', 'guided', 'horizon', 'vanilla'] False"
