"""The evaluation report as one HTML page, ``eval/report.html`` beside report.md.

Self-contained but for the videos: the plots are embedded as base64 PNGs (matplotlib, the
``[report]`` extra; without it the page says so and keeps the rest), the videos are the
evaluation's own GIFs beside it, linked relatively. The page holds

- quality against NFE: PSNR to the reference and the learned FD to data of every row
  measured against the main reference, with their 95% intervals as error bars; rows that
  differ only in step count (``label@K``) form one curve, the naive teacher's curve being
  the reference's CFG rows;
- where detail goes: each band group's amplitudes (spatial, frame difference, temporal lags)
  of the reference, the data and the students, over the reference's;
- each stage's loss curves from its metrics.jsonl;
- a side-by-side video grid (``video_grid.gif``, one GIF so the rows stay in step): the
  reference, the naive teacher at its fewest steps and every student, same prompts and noise;
- report.md itself (the same tables, rendered).

Rows are read by their fields (model, steps, cfg, nfe, metrics with ``_ci`` intervals), not
by chain names or step counts. The evaluation writes the page; ``python -m
gpd_train.report_html --run-dir DIR`` rebuilds it from an existing eval/report.json.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
import re
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageSequence

from gpd_train.eval.metric_registry import METRICS
from gpd_train.eval.report import render_markdown
from gpd_train.infer.media import GIF_FRAME_MS
from gpd_train.run.files import atomic_write_text
from gpd_train.run.writes import writing

PAGE = "report.html"
GRID = "video_grid.gif"
NO_PLOTS = ("Plots need matplotlib, which is not installed: pip install -e '.[report]', then "
            "python -m gpd_train.report_html --run-dir {run} rebuilds this page.")
STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
td:first-child, th:first-child { text-align: left; }
img { max-width: 100%; image-rendering: pixelated; }
.note { background: #fff4d6; padding: 0.5em 1em; border-left: 4px solid #e0a800; }
"""


# -- reading the report ----------------------------------------------------------------------
def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _rows_of(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(row, dict) for row in value)


# What the page and report.md read of report.json: key -> (check, what is expected).
_REPORT_FIELDS = {
    "rows": (lambda v: _rows_of(v) and len(v) > 0, "a non-empty list of row objects"),
    "eval_set": (lambda v: isinstance(v, dict) and all(
        _number(v.get(k)) for k in ("prompts", "noise_seed", "steps", "guidance")),
        "an object with numbers prompts, noise_seed, steps, guidance"),
    "prompts": (lambda v: isinstance(v, list) and all(isinstance(p, str) for p in v),
                "a list of prompt names"),
    "stages": (lambda v: isinstance(v, dict) and all(isinstance(i, dict) for i in v.values()),
               "an object of stage objects"),
}
_OPTIONAL_FIELDS = {
    "sanity_rows": (_rows_of, "a list of row objects"),
    "comparisons": (lambda v: isinstance(v, list) and all(
        isinstance(c, dict) and {"a", "b", "metric", "value"} <= set(c)
        and isinstance(c.get("ci"), list) and len(c["ci"]) == 2 for c in v),
        "a list of objects with a, b, metric, value and a two-value ci"),
    "training": (lambda v: isinstance(v, list) and all(isinstance(c, dict) for c in v),
                 "a list of objects"),
    "compared_steps": (lambda v: isinstance(v, list) and all(_number(k) for k in v),
                       "a list of step counts"),
}
# Each row's fields read by name (the metrics beside them are optional: shown as "ref").
_ROW_FIELDS = {"model": str, "group": str, "steps": int, "nfe": int}
def _row_keys() -> tuple[str, ...]:
    return ("cfg", *(m.key for m in METRICS.values() if m.required))


def report_problems(report: Any) -> list[str]:
    """What in a report.json the page cannot read (empty: it reads everything it needs)."""
    if not isinstance(report, dict):
        return [f"expected a JSON object, got {type(report).__name__}"]
    problems = [f"{key} must be {expected}, got {report.get(key)!r:.60}"
                for key, (check, expected) in _REPORT_FIELDS.items()
                if not check(report.get(key))]
    problems += [f"{key} must be {expected}, got {report[key]!r:.60}"
                 for key, (check, expected) in _OPTIONAL_FIELDS.items()
                 if report.get(key) is not None and not check(report[key])]
    for group in ("rows", "sanity_rows"):
        rows = report.get(group)
        for i, row in enumerate(rows if _rows_of(rows) else []):
            problems += [f"{group}[{i}].{key} must be a {kind.__name__}, got {row.get(key)!r}"
                         for key, kind in _ROW_FIELDS.items()
                         if not isinstance(row.get(key), kind) or isinstance(row[key], bool)]
            problems += [f"{group}[{i}] has no {key}" for key in _row_keys() if key not in row]
    return problems


# -- reading the rows ------------------------------------------------------------------------
def _reference(rows: list[dict[str, Any]]) -> str:
    return rows[0]["model"]


def _main_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows measured against the first row (the main reference); a report.json from
    before rows named their reference: the first row's group."""
    ref = rows[0]
    if "reference" in ref:
        return [r for r in rows if r["reference"] == ref["model"]]
    return [r for r in rows if r["group"] == ref["group"]]


def _is_teacher_cfg(row: dict[str, Any], ref: dict[str, Any]) -> bool:
    """Sampled as the reference is (a CFG pair per step at its scale): the naive teacher."""
    return row["cfg"] == ref["cfg"] and row["nfe"] == 2 * row["steps"]


def curves(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """The quality-against-NFE curves: name -> rows by increasing NFE.

    The naive teacher's curve is the reference and its CFG rows at fewer steps (a CFG row at
    the reference's own step count is another model, e.g. the ceiling); the other rows form
    one curve per label with its ``@K`` removed. A one-point curve keeps its full label.
    """
    main = _main_rows(rows)
    ref = main[0]
    named: dict[str, list[dict[str, Any]]] = {}
    for row in main:
        if row is ref or (_is_teacher_cfg(row, ref) and row["steps"] < ref["steps"]):
            name = f"teacher, naive ({ref['cfg']})"
        else:
            name = re.sub(r"@\d+", "", row["model"])
        named.setdefault(name, []).append(row)
    return {(name if len(points) > 1 else points[0]["model"]):
            sorted(points, key=lambda r: r["nfe"]) for name, points in named.items()}


def grid_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The video grid: the reference, the naive teacher at its fewest steps, the students
    (every row sampled with one forward per step)."""
    main = _main_rows(rows)
    ref = main[0]
    naive = [r for r in main if _is_teacher_cfg(r, ref) and r["steps"] < ref["steps"]]
    fewest = [min(naive, key=lambda r: r["steps"])] if naive else []
    return [ref, *fewest, *(r for r in main if r["nfe"] == r["steps"])]


# -- plots ---------------------------------------------------------------------------------
def _pyplot() -> Any:
    """matplotlib's pyplot on the file backend, or None when the extra is missing."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(plt: Any, figure: Any) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(figure)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def plotted_metrics(rows: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(key, panel title) of each plotted metric the rows carry, in column order."""
    return [(m.key, m.plot_title(_reference(rows))) for m in METRICS.values()
            if m.plot is not None and m.key in rows[0]]


def quality_plot(plt: Any, rows: list[dict[str, Any]]) -> str:
    """The plotted metrics (PSNR to the reference, first-frame PSNR for image-to-video, learned
    FD to data) against NFE, 95% intervals as bars."""
    metrics = plotted_metrics(rows)
    figure, axes = plt.subplots(1, len(metrics), figsize=(6.2 * len(metrics), 4.4),
                                squeeze=False)
    lines = curves(rows)
    for ax, (key, title) in zip(axes[0], metrics, strict=True):
        for name, points in lines.items():
            points = [p for p in points if p.get(key) is not None]
            if not points:
                continue
            x, y = [p["nfe"] for p in points], [p[key] for p in points]
            low = [v - p.get(f"{key}_ci", [v, v])[0] for v, p in zip(y, points, strict=True)]
            high = [p.get(f"{key}_ci", [v, v])[1] - v for v, p in zip(y, points, strict=True)]
            ax.errorbar(x, y, yerr=[low, high], marker="o", capsize=3, label=name)
        nfes = sorted({r["nfe"] for r in _main_rows(rows)})
        ax.set_xscale("log", base=2)
        ax.set_xticks(nfes, [str(n) for n in nfes])
        ax.set_xlabel("network evaluations per video (NFE; a CFG step is 2)")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    legend = {}  # one legend under the panels, each curve once
    for ax in axes[0]:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            legend.setdefault(label, handle)
    figure.legend(legend.values(), legend.keys(), loc="upper center", fontsize=8,
                  ncol=min(3, len(legend)), bbox_to_anchor=(0.5, 0.0))
    return _png(plt, figure)


def band_plot(plt: Any, bands: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    """Where detail goes: one panel per band group, each row's amplitude over the
    reference's by band (paired 95% intervals as bars), the data's dashed; the rows are
    ``grid_rows``' (the reference, the fewest-step naive teacher, the students)."""
    shown = {r["model"] for r in grid_rows(rows)}
    ref = bands["rows"][0]
    figure, axes = plt.subplots(1, len(bands["groups"]), squeeze=False,
                                figsize=(4.2 * len(bands["groups"]), 3.8))
    begin = 0
    for ax, (group, names) in zip(axes[0], bands["groups"].items(), strict=True):
        part = slice(begin, begin + len(names))
        begin += len(names)
        x = list(range(len(names)))
        ax.axhline(1.0, color="black", linewidth=0.8, label=ref["model"])
        data = [d / r for d, r in zip(bands["data"][part], ref["amplitude"][part], strict=True)]
        ax.plot(x, data, "k--", marker="s", label="data (other videos)")
        for row in bands["rows"][1:]:
            if row["model"] not in shown:
                continue
            y, ci = row["ratio"][part], row["ratio_ci"][part]
            ax.errorbar(x, y, yerr=[[v - c[0] for v, c in zip(y, ci, strict=True)],
                                    [c[1] - v for v, c in zip(y, ci, strict=True)]],
                        marker="o", capsize=3, label=row["model"])
        ax.set_xticks(x, names)
        ax.set_title(f"{group}: amplitude over {ref['model']}", fontsize=9)
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="upper center", fontsize=8, ncol=min(3, len(labels)),
                  bbox_to_anchor=(0.5, 0.0))
    return _png(plt, figure)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """A stage's metrics.jsonl records with a numeric step and loss, the plot's axes; other
    lines (a torn last line of a killed run, text that is no record) are left out."""
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and _number(record.get("step")) and _number(
                record.get("loss")):
            records.append(record)
    return records


def running_mean(values: list[float], window: int) -> list[float]:
    """Each value averaged with up to ``window - 1`` values before it."""
    sums = [0.0]
    for value in values:
        sums.append(sums[-1] + value)
    return [(sums[i + 1] - sums[max(0, i + 1 - window)]) / min(i + 1, window)
            for i in range(len(values))]


def loss_plot(plt: Any, run_dir: Path, stages: list[str]) -> str | None:
    """One panel per stage with a metrics log: the loss (raw and a running mean) and the
    objective's other loss terms."""
    logs = {name: read_metrics(run_dir / name / "metrics.jsonl") for name in stages
            if (run_dir / name / "metrics.jsonl").is_file()}
    logs = {name: records for name, records in logs.items() if records}
    if not logs:
        return None
    columns = min(3, len(logs))
    count = -(-len(logs) // columns)
    figure, axes = plt.subplots(count, columns, figsize=(4.6 * columns, 3.2 * count),
                                squeeze=False)
    for ax, (name, records) in zip(axes.flat, logs.items(), strict=False):
        steps, positive = [r["step"] for r in records], True
        for key in ("loss", "mse", "freq"):
            values = [r[key] for r in records if _number(r.get(key))]
            if len(values) != len(steps) or (key == "mse" and values == [r["loss"] for r
                                                                          in records]):
                continue  # absent, or the loss itself (no other term)
            window = max(1, len(values) // 50)
            shown = ax.plot(steps, running_mean(values, window),
                            label=f"{key} (mean of {window})")
            ax.plot(steps, values, alpha=0.25, color=shown[0].get_color(), linewidth=0.8)
            positive = positive and min(values) > 0
        if positive:  # losses span decades; a zero (a toy objective) cannot be log-scaled
            ax.set_yscale("log")
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(logs):]:
        ax.axis("off")
    figure.tight_layout()
    return _png(plt, figure)


# -- the video grid ------------------------------------------------------------------------
def write_video_grid(folder: Path, rows: list[dict[str, Any]]) -> tuple[Path | None, list[str]]:
    """One GIF stacking the rows' GIFs (labelled), so every row shows the same frame at
    the same time; returns it (None: no GIFs) and notes on the rows left out."""
    videos: list[tuple[str, list[Image.Image], int]] = []
    notes = []
    for row in rows:
        gif = folder / row.get("gif", "")
        if not row.get("gif") or not gif.is_file():
            notes.append(f"{row['model']}: no GIF ({row.get('gif') or 'not named in the row'})")
            continue
        with Image.open(gif) as image:
            frames = [frame.convert("RGB") for frame in ImageSequence.Iterator(image)]
            videos.append((row["model"], frames, int(image.info.get("duration",
                                                                    GIF_FRAME_MS))))
    if not videos:
        return None, notes
    frame_count, duration = len(videos[0][1]), videos[0][2]
    fits = [len(frames) == frame_count and ms == duration for _, frames, ms in videos]
    kept = [video for video, fit in zip(videos, fits, strict=True) if fit]
    notes += [f"{label}: {len(frames)} frames of {ms} ms, not {frame_count} of {duration}"
              for (label, frames, ms), fit in zip(videos, fits, strict=True) if not fit]
    label_width = max(150, 6 * max(len(label) for label, _, _ in kept) + 8)  # as the sheet
    width = label_width + max(frames[0].width for _, frames, _ in kept)
    heights = [frames[0].height + 4 for _, frames, _ in kept]
    canvases = []
    for t in range(frame_count):
        canvas = Image.new("RGB", (width, sum(heights)), (255, 255, 255))
        draw, top = ImageDraw.Draw(canvas), 0
        for (label, frames, _), height in zip(kept, heights, strict=True):
            draw.text((4, top + height // 2 - 6), label, fill=(0, 0, 0))
            canvas.paste(frames[t], (label_width, top))
            top += height
        canvases.append(canvas)
    path = folder / GRID
    tmp = path.with_name(f".{GRID}.tmp-{os.getpid()}")
    with writing(path, partial=tmp):
        canvases[0].save(tmp, format="GIF", save_all=True, append_images=canvases[1:],
                         duration=duration, loop=0)
        os.replace(tmp, path)
    return path, notes


# -- the page ------------------------------------------------------------------------------
def markdown_html(text: str) -> str:
    """The subset of markdown report.md uses: headings, pipe tables, paragraphs."""
    out: list[str] = []
    table: list[list[str]] = []

    def flush() -> None:
        if table:
            head, *body = table
            out.append("<table><tr>" + "".join(f"<th>{c}</th>" for c in head) + "</tr>"
                       + "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>"
                                 for row in body) + "</table>")
            table.clear()

    for line in text.splitlines():
        if line.startswith("|"):
            cells = [html.escape(c.strip()) for c in line.strip().strip("|").split("|")]
            if not all(set(c) <= {"-", ":"} for c in cells):  # the separator row
                table.append(cells)
            continue
        flush()
        heading = re.match(r"(#{1,3}) (.*)", line)
        if heading:
            level = len(heading.group(1))
            out.append(f"<h{level}>{html.escape(heading.group(2))}</h{level}>")
        elif line.strip():
            out.append(f"<p>{html.escape(line)}</p>")
    flush()
    return "\n".join(out)


def _figure(data: str, alt: str) -> str:
    return f'<img class="plot" alt="{alt}" src="data:image/png;base64,{data}">'


def render_html(report: dict[str, Any], run_dir: Path) -> str:
    """The page for ``report`` (what evaluate_run writes to report.json) of ``run_dir``;
    writes the video grid beside it."""
    folder = run_dir / "eval"
    rows = report["rows"]
    plt = _pyplot()
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>GPD evaluation: "
             f"{html.escape(str(run_dir))}</title><style>{STYLE}</style></head><body>",
             f"<h1>GPD evaluation report</h1><p>Run folder: <code>{html.escape(str(run_dir))}"
             "</code></p>"]
    if plt is None:
        parts.append(f'<p class="note" id="no-plots">{html.escape(NO_PLOTS.format(run=run_dir))}'
                     "</p>")
    parts.append("<h2>Quality against network evaluations</h2>")
    if plt is not None:
        parts.append(_figure(quality_plot(plt, rows), "quality against NFE"))
    parts.append("<h2>Videos: same prompts and noise</h2>")
    grid, notes = write_video_grid(folder, grid_rows(rows))
    if grid is not None:
        parts.append(f'<img class="video" alt="video grid" src="{GRID}">')
    parts += [f'<p class="note">{html.escape(note)}</p>' for note in notes]
    links = [f'<a href="{html.escape(r["gif"])}">{html.escape(r["model"])}</a>'
             for r in rows if r.get("gif") and (folder / r["gif"]).is_file()]
    parts.append("<p>Examples: " + html.escape(", ".join(report.get("prompts", []))) + ". "
                 "Each model's GIF: " + ", ".join(links) + "; all frames: "
                 '<a href="contact_sheet.png">contact_sheet.png</a>.</p>')
    if report.get("bands"):
        parts.append("<h2>Where detail goes: band amplitudes</h2>")
        if plt is not None:
            parts.append(_figure(band_plot(plt, report["bands"], rows), "band amplitudes"))
        parts.append("<p>The numbers: the band table below (report.md).</p>")
    parts.append("<h2>Training losses</h2>")
    if plt is not None:
        losses = loss_plot(plt, run_dir, list(report.get("stages", {})))
        parts.append(_figure(losses, "loss curves") if losses is not None
                     else "<p>No stage holds a metrics log (imported stages train nothing).</p>")
    markdown = render_markdown(report)
    if markdown.startswith("# "):  # the page has its own title
        markdown = markdown.split("\n", 1)[1]
    parts += ["<h2>Tables (report.md)</h2>", markdown_html(markdown), "</body></html>"]
    return "\n".join(parts)


def write_report_html(report: dict[str, Any], run_dir: Path) -> Path:
    """``run_dir``/eval/report.html (and video_grid.gif) for ``report``; returns the page."""
    page = run_dir / "eval" / PAGE
    atomic_write_text(page, render_html(report, run_dir))
    return page
