"""Tiny-preset training eager vs ``--cuda-graph`` (issue 14 item 3): it/s of stages 0 and 1.

For each mode, ``python -m gpd_train --stage 0`` and then ``--stage 1`` (in-process) in a
fresh run folder for a fixed number of iterations, same seed and data. Reported per stage
and mode: the steady-state it/s (each step's ``seconds`` from metrics.jsonl, the first
``--skip`` steps left out: the graph's eager warm-up steps and its capture are in them) and
the wall-clock it/s of the whole stage (model loading, checkpoints and the first steps
included). Also the largest relative difference of the two modes' stage-0 losses over
the first 20 steps: the replayed kernels are the eager ones, but the capturable AdamW and
the EMA's tensor weight round differently, so close, not bit for bit (fails above 1e-2:
a stale input buffer or a lost update shows as a different loss at once). And the
embedded pipeline's training time projected from the wall-clock rates: stage-0 iterations
at stage 0's, every distillation stage at stage 1's (its CFG teacher makes it the
slowest), evaluation not included. ``--pipeline`` then runs the whole embedded pipeline
with ``--cuda-graph`` and reports its real time.

    python benchmarks/train_graph.py                       # on a GPU
    python benchmarks/train_graph.py --device cpu --modes eager --iterations 4 3  # dry run
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from gpd_train.__main__ import main as gpd_train
from gpd_train.config.settings import RunConfig


def _records(run_dir: Path, stage: str) -> list[dict]:
    lines = (run_dir / stage / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def _train(run_dir: Path, device: str, graph: bool, iterations: tuple[int, int]) -> dict:
    common = ["--device", device, "--run-dir", str(run_dir), "--checkpoint-every", "50",
              *(["--cuda-graph"] if graph else [])]
    stages = {}
    for stage, extra in (("stage0", ["--stage", "0", "--teacher-iterations",
                                     str(iterations[0])]),
                         ("stage1", ["--stage", "1", "--iterations", *[str(iterations[1])] * 3])):
        started = time.perf_counter()
        code = gpd_train(extra + common)
        if code != 0:
            raise SystemExit(f"gpd_train {' '.join(extra + common)} exited with {code}")
        wall = time.perf_counter() - started
        stages[stage] = {"records": _records(run_dir, stage), "wall_seconds": wall}
    return stages


def _rates(stage: dict, skip: int) -> dict:
    records = stage["records"]
    steady = records[skip:] or records
    losses = [r["loss"] for r in records]
    return {"iterations": len(records),
            "steady_it_s": len(steady) / sum(r["seconds"] for r in steady),
            "wall_it_s": len(records) / stage["wall_seconds"],
            "wall_seconds": stage["wall_seconds"],
            "finite": all(loss == loss and abs(loss) != float("inf") for loss in losses),
            "losses": losses}


def _pipeline_iterations() -> tuple[int, int]:
    config = RunConfig()
    distill = sum(sum(config.chain(chain).iterations) for chain in config.pipeline_chains)
    return config.stage0.iterations, distill


def measure(device: str, modes: list[str], iterations: tuple[int, int], skip: int) -> dict:
    result: dict = {"device": device, "modes": modes, "iterations": list(iterations),
                    "skip": skip, "gpu": torch.cuda.get_device_name()
                    if device.startswith("cuda") else None}
    with tempfile.TemporaryDirectory() as folder:
        for mode in modes:
            stages = _train(Path(folder) / mode, device, mode == "graph", iterations)
            result[mode] = {stage: _rates(data, skip) for stage, data in stages.items()}
    stage0_iterations, distill_iterations = _pipeline_iterations()
    for mode in modes:
        rates = result[mode]
        rates["pipeline_projected_s"] = (stage0_iterations / rates["stage0"]["wall_it_s"]
                                         + distill_iterations / rates["stage1"]["wall_it_s"])
    if {"eager", "graph"} <= set(modes):
        pairs = zip(result["eager"]["stage0"]["losses"][:20],
                    result["graph"]["stage0"]["losses"][:20], strict=False)
        result["loss_rel_diff_20"] = max(abs(g - e) / max(abs(e), 1e-12) for e, g in pairs)
        result["speedup"] = {stage: result["graph"][stage]["steady_it_s"]
                             / result["eager"][stage]["steady_it_s"]
                             for stage in ("stage0", "stage1")}
    return result


def _summary(result: dict) -> str:
    parts = []
    for stage in ("stage0", "stage1"):
        rates = " ".join(f"{mode} {result[mode][stage]['steady_it_s']:.1f}"
                         for mode in result["modes"])
        speedup = result.get("speedup", {}).get(stage)
        parts.append(f"{stage} it/s {rates}" + (f" ({speedup:.1f}x)" if speedup else ""))
    last = result["modes"][-1]
    parts.append(f"pipeline ~{result[last]['pipeline_projected_s']:.0f} s at {last} speed")
    if "loss_rel_diff_20" in result:
        parts.append(f"loss rel diff {result['loss_rel_diff_20']:.1e}")
    if "pipeline_seconds" in result:
        parts.append(f"pipeline --cuda-graph {result['pipeline_seconds']:.0f} s")
    return "SUMMARY tiny-train " + "; ".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--modes", default="eager,graph", help="eager, graph or both")
    parser.add_argument("--iterations", type=int, nargs=2, default=(200, 100),
                        metavar=("STAGE0", "STAGE1"))
    parser.add_argument("--skip", type=int, default=10,
                        help="first steps left out of the steady-state it/s")
    parser.add_argument("--pipeline", action="store_true",
                        help="then run the whole embedded pipeline with --cuda-graph")
    parser.add_argument("--out", type=Path, help="also write the result as JSON here")
    args = parser.parse_args(argv)
    modes = args.modes.split(",")
    if not modes or not set(modes) <= {"eager", "graph"}:
        parser.error(f"--modes takes eager, graph or eager,graph, got {args.modes!r}")
    result = measure(args.device, modes, tuple(args.iterations), args.skip)
    if args.pipeline:
        with tempfile.TemporaryDirectory() as folder:
            started = time.perf_counter()
            code = gpd_train(["--device", args.device, "--cuda-graph", "--run-dir", folder])
            result["pipeline_seconds"] = time.perf_counter() - started
            result["pipeline_exit"] = code
    for mode in modes:
        for stage in ("stage0", "stage1"):
            rates = result[mode][stage]
            print(json.dumps({"mode": mode, "stage": stage,
                              **{k: v for k, v in rates.items() if k != "losses"}}))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    print(_summary(result))
    failed = [f"{mode} {stage} loss not finite" for mode in modes
              for stage in ("stage0", "stage1") if not result[mode][stage]["finite"]]
    if result.get("loss_rel_diff_20", 0.0) > 1e-2:
        failed.append(f"graph and eager stage-0 losses differ by {result['loss_rel_diff_20']:.1e}")
    if result.get("pipeline_exit", 0):
        failed.append(f"the pipeline exited with {result['pipeline_exit']}")
    for line in failed:
        print(f"FAIL: {line}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
