"""The evaluation report as markdown: tables with 95% intervals, then what the columns mean."""

from __future__ import annotations

import math
from typing import Any

from gpd_train.eval.metric_registry import Metric, columns


def fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "ref"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.{digits}f}"
    return str(value)


def fmt_interval(row: dict[str, Any], key: str, digits: int = 2) -> str:
    value = row.get(key)
    if value is None:
        return "ref"
    interval = row.get(f"{key}_ci")
    if not interval:
        return fmt(value, digits)
    return f"{fmt(value, digits)} [{fmt(interval[0], digits)}, {fmt(interval[1], digits)}]"


def _table(rows: list[dict[str, Any]], metrics: list[Metric]) -> list[str]:
    header = ["model", "steps", "CFG", "NFE", *(m.title for m in metrics)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["model"], fmt(row["steps"]), row["cfg"], fmt(row["nfe"])]
        cells += [fmt_interval(row, m.key, m.digits) for m in metrics]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _at_equal_steps(report: dict[str, Any], metrics: list[Metric]) -> list[str]:
    """The rows again, grouped by step count, where more than one step count is compared."""
    steps = report.get("compared_steps") or []
    if len(steps) < 2:
        return []
    lines = ["", "## At equal steps", ""]
    for count in steps:
        rows = [r for r in report["rows"]
                if r["steps"] == count and r["group"] in ("main", "ablations")]
        lines += [f"### {count} steps", ""] + _table(rows, metrics) + [""]
    return lines[:-1]


def _training(report: dict[str, Any]) -> list[str]:
    costs = report.get("training") or []
    if not costs:
        return []
    lines = ["", "## Training cost per chain", "",
             "| chain | stages | iterations | seconds | teacher forwards per sample and update |",
             "|---|---|---|---|---|"]
    for item in costs:
        lines.append(f"| {item['chain']} | {item['stages']} | {item['iterations']} | "
                     f"{fmt(item['seconds'], 0)} | {fmt(item['teacher_forwards_per_sample'], 2)} |")
    return lines


def _kid_parts(report: dict[str, Any]) -> list[str]:
    """The detail KID of each feature group alone, per row and paired: where a distance sits."""
    rows = [r for r in report["rows"] + (report.get("sanity_rows") or []) if "kid_parts" in r]
    if not rows:
        return []
    groups = list(rows[0]["kid_parts"])
    lines = ["", "## Detail KID by feature group", "",
             "Each group's features alone (the same standardisation and kernel): learned "
             "semantic features, spatial bands, frame-difference bands, temporal lags.", "",
             "| model | " + " | ".join(groups) + " |", "|" + "---|" * (len(groups) + 1)]
    lines += [f"| {r['model']} | " + " | ".join(fmt(r["kid_parts"][g], 3) for g in groups)
              + " |" for r in rows]
    paired = [c for c in report.get("comparisons") or [] if "parts" in c]
    if paired:
        lines += ["", "| comparison (paired) | " + " | ".join(groups) + " |",
                  "|" + "---|" * (len(groups) + 1)]
        lines += [f"| {c['a']} - {c['b']} | " + " | ".join(
            f"{fmt(c['parts'][g]['value'], 3)} [{fmt(c['parts'][g]['ci'][0], 3)}, "
            f"{fmt(c['parts'][g]['ci'][1], 3)}]" for g in groups) + " |" for c in paired]
    return lines


def _beyond_one(ratio: float, interval: list[float]) -> str:
    """A ratio, starred where its paired 95% interval excludes 1."""
    return fmt(ratio, 3) + ("*" if interval[0] > 1 or interval[1] < 1 else "")


def _bands(report: dict[str, Any]) -> list[str]:
    """Where detail goes: each band's RMS amplitude, then every model's over the
    reference's."""
    bands = report.get("bands")
    if not bands:
        return []
    prefix = {"spatial": "S", "frame difference": "D", "temporal": "T"}
    header = [f"{prefix.get(group, group)} {name}" for group, names in bands["groups"].items()
              for name in names]
    ref, *models = bands["rows"]
    head = ["| model | " + " | ".join(header) + " |", "|" + "---|" * (len(header) + 1)]

    def line(label: str, values: list[str]) -> str:
        return f"| {label} | " + " | ".join(values) + " |"

    lines = ["", "## Where detail goes: band amplitudes", "",
             "RMS amplitude, mean over videos, in each band: S = each frame's spatial "
             "spectrum in rings of the radius normalised to Nyquist, D = the same of the "
             "frame-to-frame difference (detail of what moves), T = x[t + k] - x[t] per lag "
             "k. Then every model's amplitude over the reference's; * where the paired 95% "
             "bootstrap interval (same noise and prompt per video) excludes 1.", "", *head,
             line("data", [fmt(v, 4) for v in bands["data"]]),
             line(ref["model"], [fmt(v, 4) for v in ref["amplitude"]]),
             "", f"Over {ref['model']}:", "", *head,
             line("data (other videos: unpaired)",
                  [fmt(d / r, 3) for d, r in zip(bands["data"], ref["amplitude"], strict=True)])]
    lines += [line(m["model"], [_beyond_one(v, ci) for v, ci in zip(m["ratio"], m["ratio_ci"],
                                                                      strict=True)])
              for m in models]
    return lines


def render_markdown(report: dict[str, Any]) -> str:
    """The report's markdown: the tables, the paired comparisons, the columns, the stages."""
    rows = report["rows"]
    metrics = columns(rows)
    eval_set = report["eval_set"]
    lines = ["# GPD evaluation report", "",
             f"Evaluation set: {eval_set['prompts']} videos (prompts cycled, noise seed "
             f"{eval_set['noise_seed']}); reference: the teacher at {eval_set['steps']} steps "
             f"with CFG scale {eval_set['guidance']}; examples shown: "
             + ", ".join(report["prompts"]) + ".", "",
             "Each value with its 95% bootstrap interval over videos [low, high].", ""]
    lines += _table([r for r in rows if r["group"] == "main"], metrics)
    for group in sorted({r["group"] for r in rows} - {"main"}):
        lines += ["", f"### {group}", ""]
        lines += _table([r for r in rows if r["group"] == group], metrics)
    if report.get("sanity_rows"):
        lines += ["", f"### {report['sanity_rows'][0]['group']}", ""]
        lines += _table(report["sanity_rows"], metrics)
    if report.get("comparisons"):
        lines += ["", "## Paired differences (same videos resampled for both rows)", "",
                  "| comparison | metric | difference | 95% interval |", "|---|---|---|---|"]
        for item in report["comparisons"]:
            lines.append(f"| {item['a']} - {item['b']} | {item['metric']} | "
                         f"{fmt(item['value'], 3)} | [{fmt(item['ci'][0], 3)}, "
                         f"{fmt(item['ci'][1], 3)}] |")
    lines += _kid_parts(report) + _bands(report)
    lines += _at_equal_steps(report, metrics) + _training(report)
    lines += ["", "Columns: PSNR of each video to its reference's video from the same noise and "
              "prompt (range [-1, 1]; the ceiling row is the teacher with 1% multiplicative "
              "weight noise, what a separately trained network can hope to reach); learned "
              "FD: Frechet distance of a small video classifier's penultimate features "
              "(gpd_train/eval/feature_net.py, trained on the data's shape, motion and position "
              "labels) to real data videos of the same prompts and to the reference set; "
              "detail KID: kernel distance (unbiased MMD^2, kernel (x.y/d + 1)^3) to the real "
              "videos in those features beside spatial and temporal amplitude spectra "
              "(gpd_train/eval/detail_metric.py), which see blur and broken motion; its sanity "
              "rows are held-out data and the reference blurred (Gaussian sigma in latent pixels), "
              "its frames shuffled, or frozen; "
              "share of spatial spectral energy above half Nyquist, over the reference's; "
              "mean absolute frame difference, over the reference's; first-frame PSNR "
              "(image-to-video): each video's first frame to the frame it was conditioned on; "
              "share of videos whose "
              "recognised shape and motion match the prompt; wall-clock sampling seconds per "
              "video. VBench is not reported (its models cannot be downloaded here).", "",
              "## Stages", "",
              "| stage | steps | iterations | seconds | final loss (mean of last 20) |",
              "|---|---|---|---|---|"]
    for name, info in report["stages"].items():
        lines.append(f"| {name} | {info.get('steps', '')} | {info.get('iterations', 'import')} | "
                     f"{fmt(info.get('seconds', float('nan')), 0)} | "
                     f"{fmt(info.get('final_loss_mean20', float('nan')), 5)} |")
        for expert, phase in info.get("experts", {}).items():  # a Wan2.2 pair's phases
            first, count = phase["starts"]
            lines.append(f"| {name} {expert} expert (starts {first}-{first + count - 1}) | | "
                         f"{phase['iterations']} | | {fmt(phase['final_loss_mean20'], 5)} |")
    curves = [(f"{name} {expert}", phase["loss_curve"])
              for name, info in report["stages"].items()
              for expert, phase in info.get("experts", {}).items()]
    if curves:
        lines += ["", "Each expert's loss curve (mean loss of each tenth of its phase; "
                  "stageK/<expert>/metrics.jsonl has every step):", ""]
        lines += [f"- {label}: {', '.join(fmt(v, 4) for v in curve)}" for label, curve in curves]
    lines += ["", "Files: contact_sheet.png (one row per model), one GIF per model, "
              "report.json (everything above, plus the configuration).", ""]
    return "\n".join(lines)
