"""The device check's Python parts run end to end on the CPU at toy sizes.

They only run for real on a lent GPU, rarely; these dry runs keep them from rotting
when the trainer's or model's interfaces move.
"""

import importlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cpu_graphs import emulate_cuda_graphs

pytestmark = pytest.mark.slow  # subprocesses and compilers: minutes on 2 cores

ROOT = Path(__file__).resolve().parents[1]


def test_stage_step_dry_run_reports_a_finite_loss_and_times(tmp_path) -> None:
    results = {}
    for rank in (0, 4):
        out = tmp_path / f"stage_step_{rank}.json"
        subprocess.run(
            [sys.executable, str(ROOT / "benchmarks" / "stage_step.py"), "--preset", "tiny",
             "--latent", "3,4,8,8", "--lora-rank", str(rank), "--out", str(out)],
            check=True, cwd=ROOT, capture_output=True, timeout=300,
        )
        result = results[rank] = json.loads(out.read_text())
        assert result["device"] == "cpu" and result["preset"] == "tiny"
        assert len(result["step_seconds"]) == 2 and all(t > 0 for t in result["step_seconds"])
        assert result["loss"] == result["loss"] and result["loss"] >= 0  # finite, not NaN
    # Full weights hold 24 bytes per parameter (student, gradient, Adam, EMA, teacher; Adam's
    # step counters add a few bytes).
    full, lora = results[0], results[4]
    expected = 24 * full["trained_parameters"]
    assert full["state_gib"] * 2**30 == pytest.approx(expected, rel=1e-3)
    assert lora["trained_parameters"] < full["trained_parameters"] / 5
    assert lora["state_gib"] < full["state_gib"] / 4


def test_realscale_path_tiny_dry_run_times_every_step(tmp_path) -> None:
    out = tmp_path / "realscale.json"
    run = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "realscale_path.py"), "--tiny",
         "--device", "cpu", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    result = json.loads(out.read_text())
    steps = ["encode", "sample", "decode", "write_mp4"]
    assert [row["step"] for row in result["rows"]] == steps
    assert all(math.isfinite(row["seconds"]) and row["seconds"] > 0 for row in result["rows"])
    assert result["device"] == "cpu" and result["latents_finite"] and result["mp4_bytes"] > 0
    assert result["video"] == [3, 5, 32, 48]  # latents [4, 2, 4, 6] through 4x time / 8x space
    lines = run.stdout.splitlines()
    assert [json.loads(line)["step"] for line in lines if line.startswith("{")] == steps
    assert lines[-1].startswith("SUMMARY realscale-path encode ")


def test_train_graph_dry_run_reports_it_s_per_stage(tmp_path) -> None:
    out = tmp_path / "train_graph.json"
    run = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "train_graph.py"), "--device", "cpu",
         "--modes", "eager", "--iterations", "3", "2", "--skip", "1", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert run.returncode == 0, run.stdout + run.stderr
    result = json.loads(out.read_text())
    for stage, iterations in (("stage0", 3), ("stage1", 2)):
        rates = result["eager"][stage]
        assert rates["iterations"] == iterations and rates["finite"]
        assert rates["steady_it_s"] > 0 and rates["wall_it_s"] > 0
    assert result["eager"]["pipeline_projected_s"] > 0 and "graph" not in result
    assert run.stdout.strip().splitlines()[-1].startswith(
        "SUMMARY tiny-train stage0 it/s eager ")


def test_sequence_overhead_dry_run_times_both_paths_and_matches(tmp_path) -> None:
    out = tmp_path / "sequence.json"
    run = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "sequence_overhead.py"), "--preset", "tiny",
         "--layers", "1", "--latent", "3,4,8,8", "--device", "cpu", "--repeats", "2",
         "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert run.returncode == 0, run.stdout + run.stderr
    result = json.loads(out.read_text())
    assert result["device"] == "cpu" and result["dtype"] == "float32"
    assert result["max_relative_difference"] < 1e-6  # fp32: the same numbers
    for label in ("plain", "split"):
        for kind in ("forward", "forward_backward"):
            assert result[f"{label}_{kind}_s"] > 0
    assert run.stdout.strip().splitlines()[-1].startswith(
        "SUMMARY sequence-parallel world of one: forward ")


def test_device_check_quick_dry_run_checks_and_summarises(tmp_path) -> None:
    run = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "device_check.py"), "--device", "cpu",
         "--quick", "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    result = json.loads((tmp_path / "device_check.json").read_text())
    assert result["checks"] and all(row["ok"] for row in result["checks"])
    assert result["timings"] == [] and result["dit_timings"] == []
    last = run.stdout.strip().splitlines()[-1]
    assert last == f"SUMMARY correctness {len(result['checks'])}/{len(result['checks'])} ok"


def _run_device_check_sh(tmp_path, *args: str, slow: str = "") -> subprocess.CompletedProcess:
    """device_check.sh with PYTHON replaced by a stub that prints a summary line per block
    (fails the stage steps, and sleeps a minute in the block whose command has `slow`), so
    the script's own logic runs in a second."""
    stub = tmp_path / "python"
    stub.write_text('#!/usr/bin/env bash\necho "noise"\necho "SUMMARY stub $*"\n'
                    + (f'case "$*" in *{slow}*) sleep 60;; esac\n' if slow else "")
                    + 'case "$*" in *stage_step*) exit 3;; esac\n')
    stub.chmod(0o755)
    env = {"PATH": "/usr/bin:/bin", "PYTHON": str(stub), "OUT": str(tmp_path / "out")}
    return subprocess.run(["bash", str(ROOT / "benchmarks" / "device_check.sh"), *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def _summary_rows(stdout: str) -> list[list[str]]:
    table = stdout.split("one line per block")[1].splitlines()
    return [[cell.strip() for cell in line.strip("|").split("|")]
            for line in table if line.startswith("| ") and not line.startswith("| block")]


def test_device_check_sh_quick_runs_the_correctness_blocks_only(tmp_path) -> None:
    run = _run_device_check_sh(tmp_path, "--quick", "--skip-timings")
    assert run.returncode == 0, run.stdout + run.stderr
    rows = _summary_rows(run.stdout)
    assert [row[0] for row in rows] == ["kernel-tests", "kernel-checks"]
    assert all(row[1] == "ok" for row in rows)
    # --quick is the script's own flag; the others pass through to device_check.py.
    assert rows[1][3].startswith("stub benchmarks/device_check.py --out ")
    assert rows[1][3].endswith("--quick --skip-timings")
    assert (tmp_path / "out" / "kernel-tests.log").exists()


def test_device_check_sh_full_runs_every_block_and_reports_a_failure(tmp_path) -> None:
    run = _run_device_check_sh(tmp_path)
    assert run.returncode == 3, run.stdout + run.stderr
    rows = _summary_rows(run.stdout)
    # Most wanted first: issue 14's kernel numbers, then its trainer, then the rest.
    assert [row[0] for row in rows] == ["kernel-tests", "kernels", "dit-op-backends",
                                        "tiny-train", "stage-step", "stage-step-lora",
                                        "sampler-mfu", "realscale-path", "sequence-parallel"]
    assert [row[1] for row in rows] == ["ok", "ok", "ok", "ok", "FAIL (3)", "FAIL (3)", "ok",
                                        "ok", "ok"]
    assert rows[1][3].startswith("stub benchmarks/device_check.py --out ")
    assert rows[2][3].startswith("stub benchmarks/dit_op_backends.py --out ")
    assert rows[3][3].startswith("stub benchmarks/train_graph.py --out ")
    assert "bench_sampler or mfu" in rows[6][3]
    assert rows[7][3].startswith("stub benchmarks/realscale_path.py --out ")
    assert rows[8][3].startswith("stub benchmarks/sequence_overhead.py --out ")


def test_device_check_sh_only_reruns_the_named_blocks(tmp_path) -> None:
    run = _run_device_check_sh(tmp_path, "--only", "tiny-train,realscale-path")
    assert run.returncode == 0, run.stdout + run.stderr
    assert [row[0] for row in _summary_rows(run.stdout)] == ["tiny-train", "realscale-path"]


def test_device_check_sh_caps_a_hung_block_and_skips_what_the_budget_cannot_fit(tmp_path):
    run = _run_device_check_sh(tmp_path, "--budget", "22", slow="train_graph")
    rows = {row[0]: row for row in _summary_rows(run.stdout)}
    assert run.returncode == 124, run.stdout + run.stderr
    assert rows["kernel-tests"][1] == rows["kernels"][1] == "ok"
    assert rows["tiny-train"][1].startswith("TIMEOUT (")  # cut at the budget left, not 60 s
    assert int(rows["tiny-train"][2]) < 30
    assert all(rows[name][1].startswith("skipped: ") for name in
               ("stage-step", "stage-step-lora", "sampler-mfu", "realscale-path",
                "sequence-parallel"))
    assert rows["dit-op-backends"][1] == "ok"
    bad = _run_device_check_sh(tmp_path, "--budget", "soon")
    assert bad.returncode == 2 and "--budget takes whole seconds, got 'soon'" in bad.stderr


def test_dit_table_names_the_faster_backend_per_op_as_the_environment_takes_it(capsys):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import device_check
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    from gpd_kernels.dit import ENV_VAR, _from_environment

    rows = [{"op": "layernorm_modulate", "bytes": 4e8, "triton_us": 565.0, "eager_us": 1551.0,
             "compile_us": 600.0},
            {"op": "gated_residual", "bytes": 6e8, "triton_us": 672.0, "eager_us": 900.0,
             "compile_us": 462.0},
            {"op": "rms_norm_rope", "bytes": 4e8, "triton_us": 1313.0, "eager_us": 2000.0,
             "compile_error": "RuntimeError: inductor failed"}]
    device_check.print_dit_table(rows)
    line = capsys.readouterr().out.strip().splitlines()[-1]
    prefix = f"faster backend per op (gpd_kernels.dit): {ENV_VAR}="
    assert line.startswith(prefix)
    assert _from_environment(line.removeprefix(prefix)) == {
        "layernorm_modulate": "triton", "gated_residual": "compile", "rms_norm_rope": "triton"}


def test_train_graph_compares_both_modes_under_the_emulated_graph_api(monkeypatch, capsys):
    """The tiny-train block's eager-vs-graph comparison, its --cuda-graph half through the
    CPU emulation of torch.cuda's graph API (tests/cpu_graphs.py): both modes train, their
    first losses agree and the summary names the speed-up."""
    emulate_cuda_graphs(monkeypatch)
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    train_graph = importlib.import_module("train_graph")
    assert train_graph.main(["--device", "cpu", "--iterations", "6", "5", "--skip", "4"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("SUMMARY tiny-train stage0 it/s eager ") and "x)" in last
    diff = float(last.rsplit("loss rel diff ", 1)[1])
    assert diff < 1e-4


def test_dit_op_backends_times_each_switch_in_the_model_and_restores_them(monkeypatch, capsys,
                                                                          tmp_path):
    """Dry run on the CPU (Triton interpreted; torch.compile stubbed: inductor would take
    minutes on 2 cores): every configuration is timed, the backends are put back, and the
    recommendation follows the times."""
    from gpd_kernels import dit

    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: fn)
    dit._compiled.cache_clear()
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    backends = importlib.import_module("dit_op_backends")
    try:
        code = backends.main(["--device", "cpu", "--preset", "tiny", "--layers", "1",
                              "--latent", "3,4,4,4", "--text-tokens", "3", "--rounds", "1",
                              "--warmup", "0", "--out", str(tmp_path / "rows.json")])
    finally:
        dit._compiled.cache_clear()
    assert code == 0
    assert {name: dit.dit_op_backend(name) for name in dit.DIT_OPS} == dict.fromkeys(
        dit.DIT_OPS, "triton")
    result = json.loads((tmp_path / "rows.json").read_text())
    assert [row["config"] for row in result["rows"]] == ["triton"] + [
        f"{name}=compile" for name in dit.DIT_OPS]
    assert all(row["seconds"] > 0 for row in result["rows"])
    assert capsys.readouterr().out.strip().splitlines()[-1] == (
        "SUMMARY dit-op-backends in the model: GPD_DIT_OP_BACKENDS="
        + ",".join(f"{k}={v}" for k, v in result["recommended"].items()))
    rows = [{"config": "triton", "seconds": 1.0},
            {"config": "layernorm_modulate=compile", "seconds": 0.99},
            {"config": "gated_residual=compile", "seconds": 0.90},
            {"config": "rms_norm_rope=compile", "seconds": 1.2}]
    assert backends.recommended(rows, margin=0.02) == {
        "layernorm_modulate": "triton", "gated_residual": "compile", "rms_norm_rope": "triton"}
