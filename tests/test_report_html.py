"""eval/report.html (gpd_train.eval.report_page): the curves and the video grid read from the rows,
the tables of report.md, a page without matplotlib, and the page an evaluation writes
loading in headless Chromium (plots and videos)."""

import html
import json
import os
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser

import pytest
from PIL import Image

from gpd_train.__main__ import main
from gpd_train.eval.report import render_markdown
from gpd_train.eval.report_html import main as rebuild
from gpd_train.eval.report_page import (
    curves,
    grid_rows,
    plotted_metrics,
    render_html,
    running_mean,
)


def _row(model, steps, cfg, reference, group="main", psnr=30.0, **extra):
    nfe = 2 * steps if cfg.startswith("CFG") else steps
    return {"model": model, "group": group, "steps": steps, "cfg": cfg, "nfe": nfe,
            "psnr_db": psnr, "psnr_db_ci": None if psnr is None else [psnr - 1, psnr + 1],
            "hf_ratio": 1.0, "motion_ratio": 1.0, "seconds_per_video": 0.1,
            "reference": reference, "gif": re.sub(r"\W+", "_", model) + ".gif", **extra}


REF = "teacher@40 (ref)"
# Rows as a schedule other than the default could make them: 40 -> 20 -> 10 -> 5 steps, a
# chain evaluated at every stage, one at its last, a second CFG scale and an ablation.
ROWS = [_row(REF, 40, "CFG 2", REF, psnr=None),
        _row("ceiling: teacher@40, weights x(1+0.01N)", 40, "CFG 2", REF, psnr=45.0),
        *(_row(f"teacher@{k} naive", k, "CFG 2", REF, group=f"{k} steps") for k in (20, 10, 5)),
        *(_row(f"alpha@{k}", k, "input w=2", REF, group=f"{k} steps") for k in (20, 10, 5)),
        _row("beta PD@5", 5, "none", REF, group="5 steps"),
        _row("teacher@40 w=3 (ref)", 40, "CFG 3", "teacher@40 w=3 (ref)", "w=3", psnr=None),
        _row("alpha@5 w=3", 5, "input w=3", "teacher@40 w=3 (ref)", "w=3"),
        _row("abl: alpha@5", 5, "none", REF, group="ablations")]
# Two frames: one ring of each group per band name below, one lag.
BANDS = {"groups": {"spatial": ["0-0.5", "0.5-1"], "frame difference": ["0-0.5", "0.5-1"],
                    "temporal": ["lag 1"]},
         "reference": REF, "data": [2.0, 1.0, 0.5, 0.25, 0.4],
         "rows": [{"model": REF, "amplitude": [1.0, 1.0, 1.0, 1.0, 1.0]},
                  {"model": "alpha@5", "amplitude": [1.0, 0.9, 1.1, 0.95, 1.0],
                   "ratio": [1.0, 0.9, 1.1, 0.95, 1.0],
                   "ratio_ci": [[0.99, 1.01], [0.8, 0.95], [1.05, 1.2], [0.9, 1.0],
                                [0.9, 1.1]]}]}
REPORT = {"rows": ROWS, "prompts": ["a", "b"], "comparisons": [], "bands": BANDS,
          "eval_set": {"prompts": 4, "noise_seed": 1, "guidance": 2.0, "steps": 40},
          "stages": {}}


def test_band_table_shows_amplitudes_then_ratios_starred_beyond_their_interval():
    lines = render_markdown(REPORT).splitlines()
    start = lines.index("## Where detail goes: band amplitudes")
    tables = [line for line in lines[start:] if line.startswith("| ")][:-1]  # then stages
    header = "| model | S 0-0.5 | S 0.5-1 | D 0-0.5 | D 0.5-1 | T lag 1 |"
    assert tables == [
        header, "| data | 2.0000 | 1.0000 | 0.5000 | 0.2500 | 0.4000 |",
        f"| {REF} | 1.0000 | 1.0000 | 1.0000 | 1.0000 | 1.0000 |",
        header, "| data (other videos: unpaired) | 2.000 | 1.000 | 0.500 | 0.250 | 0.400 |",
        "| alpha@5 | 1.000 | 0.900* | 1.100* | 0.950 | 1.000 |"]
    assert render_markdown({**REPORT, "bands": None}).count("band amplitudes") == 0


def test_image_to_video_rows_get_a_first_frame_panel_and_column(tmp_path, monkeypatch):
    assert [key for key, _ in plotted_metrics(ROWS)] == ["psnr_db"]
    i2v = [{**row, "first_frame_psnr_db": 20.0 + row["steps"] / 10,
            "first_frame_psnr_db_ci": [19.0, 21.0]} for row in ROWS]
    panels = dict(plotted_metrics(i2v))
    assert list(panels) == ["psnr_db", "first_frame_psnr_db"]
    assert panels["first_frame_psnr_db"].startswith("first-frame PSNR to its condition (dB)")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # tables only, fast
    tables = _Tables()
    tables.feed(render_html({**REPORT, "rows": i2v}, tmp_path))
    header = next(row for row in tables.rows if row and row[0] == "model")
    column = header.index("first-frame PSNR (dB)")
    alpha = next(row for row in tables.rows if row and row[0] == "alpha@5")
    assert alpha[column].startswith("20.50")


def test_curves_join_step_counts_and_keep_the_main_reference_only():
    lines = {name: [r["model"] for r in points] for name, points in curves(ROWS).items()}
    assert lines == {
        "teacher, naive (CFG 2)": ["teacher@5 naive", "teacher@10 naive", "teacher@20 naive",
                                   REF],
        "ceiling: teacher@40, weights x(1+0.01N)": ["ceiling: teacher@40, weights x(1+0.01N)"],
        "alpha": ["alpha@5", "alpha@10", "alpha@20"],
        "beta PD@5": ["beta PD@5"],
        "abl: alpha@5": ["abl: alpha@5"]}


def test_grid_is_the_reference_the_fewest_step_naive_teacher_and_the_students():
    assert [r["model"] for r in grid_rows(ROWS)] == [
        REF, "teacher@5 naive", "alpha@20", "alpha@10", "alpha@5", "beta PD@5", "abl: alpha@5"]


def test_running_mean_against_a_direct_sum():
    values = [3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0]
    for window in (1, 2, 3, 7, 10):
        direct = [sum(values[max(0, i - window + 1):i + 1]) / len(values[max(0, i - window + 1):
                                                                         i + 1])
                  for i in range(len(values))]
        assert running_mean(values, window) == pytest.approx(direct)


class _Tables(HTMLParser):
    def __init__(self):
        super().__init__()
        self.rows, self.cell, self.images = [], None, []

    def handle_starttag(self, tag, attrs):
        if tag == "tr":
            self.rows.append([])
        elif tag in ("td", "th"):
            self.cell = ""
        elif tag == "img":
            self.images.append(dict(attrs))

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self.rows[-1].append(self.cell)
            self.cell = None

    def handle_data(self, data):
        if self.cell is not None:
            self.cell += data


def test_page_without_matplotlib_says_so_and_keeps_the_tables(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    (tmp_path / "eval").mkdir()
    page = render_html(REPORT, tmp_path)
    assert 'id="no-plots"' in page and "pip install -e '.[report]'" in html.unescape(page)
    parsed = _Tables()
    parsed.feed(page)
    assert not [i for i in parsed.images if i["src"].startswith("data:")]
    markdown = [[c.strip() for c in line.strip().strip("|").split("|")]
                for line in render_markdown(REPORT).splitlines()
                if line.startswith("|") and not line.startswith("|---")]
    assert parsed.rows == markdown  # every table row of report.md, cell for cell


@pytest.fixture(scope="session")
def chromium():
    """Debian's headless Chromium, installed with apt-get where missing and possible."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None and shutil.which("apt-get") and os.geteuid() == 0:
        for command in (["apt-get", "install", "-y", "-q", "chromium"],
                        ["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q",
                                                      "chromium"]):
            try:  # a mirror that does not answer is a skip, not a hang
                result = subprocess.run(command, capture_output=True, timeout=300)
            except subprocess.TimeoutExpired:
                break
            if command[1] == "install" and result.returncode == 0:
                break
        found = shutil.which("chromium")
    if found is None:
        pytest.skip("headless Chromium is missing and could not be installed (needs root and "
                    "apt-get: apt-get install chromium)")
    return found


PROBE = """<script>
window.addEventListener("load", () => {
  const out = document.createElement("pre");
  out.id = "probe";
  out.textContent = JSON.stringify([...document.images].map(
    i => ({src: i.getAttribute("src").slice(0, 40), ok: i.complete && i.naturalWidth > 0,
           width: i.naturalWidth})));
  document.body.appendChild(out);
});
</script>"""


@pytest.mark.slow
def test_evaluation_page_loads_its_plots_and_videos_in_chromium(micro, tmp_path, chromium):
    assert main([*micro, "--threads", "1"]) == 0  # the micro pipeline, then the evaluation
    folder = tmp_path / "run" / "eval"
    page = (folder / "report.html").read_text()
    # The page's own images plus a probe that writes what loaded into the DOM.
    probe = folder / "probe.html"
    probe.write_text(page.replace("</body>", PROBE + "</body>"))
    dom = subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=20000",
         "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=120).stdout
    found = re.search(r'<pre id="probe">(.*?)</pre>', dom, re.S)
    assert found, dom[-2000:]
    images = json.loads(found.group(1).replace("&quot;", '"'))
    assert [i["src"][:22] for i in images] == ["data:image/png;base64,", "video_grid.gif",
                                               "data:image/png;base64,",  # band amplitudes
                                               "data:image/png;base64,"]
    assert all(i["ok"] for i in images), images
    # The grid holds every shown model's GIF frame for frame (so the rows stay in step).
    report = json.loads((folder / "report.json").read_text())
    shown = grid_rows(report["rows"])
    assert [r["model"] for r in shown] == ["teacher@8 (ref)", "teacher@4 naive", "GPD@4",
                                           "vanilla PD@4"]
    with Image.open(folder / "video_grid.gif") as grid:
        frames, duration = grid.n_frames, grid.info["duration"]
    for row in shown:
        with Image.open(folder / row["gif"]) as gif:
            assert (gif.n_frames, gif.info["duration"]) == (frames, duration)
    for link in re.findall(r'<a href="([^"]+)"', page):
        assert (folder / link).is_file(), link
    # Rebuilding from report.json gives the same page.
    (folder / "report.html").unlink()
    assert rebuild(["--run-dir", str(tmp_path / "run")]) == 0
    assert (folder / "report.html").read_text() == page


def test_rebuild_without_an_evaluation_names_the_command(tmp_path, capsys):
    assert rebuild(["--run-dir", str(tmp_path)]) == 2
    assert f"run `python -m gpd_train --eval --run-dir {tmp_path}` first" in \
        capsys.readouterr().err


@pytest.mark.parametrize("change,named", [
    (lambda r: [r], "expected a JSON object, got list"),
    (lambda r: {**r, "rows": []}, "rows must be a non-empty list of row objects"),
    (lambda r: {k: v for k, v in r.items() if k != "eval_set"}, "eval_set must be an object"),
    (lambda r: {**r, "stages": []}, "stages must be an object of stage objects"),
    (lambda r: {**r, "comparisons": [{"a": "x"}]}, "comparisons must be a list of objects"),
    (lambda r: {**r, "rows": [{**ROWS[0], "steps": "40"}]}, "rows[0].steps must be a int, "
                                                            "got '40'"),
    (lambda r: {**r, "rows": [{k: v for k, v in ROWS[0].items() if k != "cfg"}]},
     "rows[0] has no cfg"),
])
def test_rebuild_of_a_malformed_report_is_one_line(tmp_path, capsys, monkeypatch, change, named):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # fast: the page without plots
    (tmp_path / "eval").mkdir()
    report = change(json.loads(json.dumps(REPORT)))
    (tmp_path / "eval" / "report.json").write_text(json.dumps(report))
    assert rebuild(["--run-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path / 'eval' / 'report.json'} is not an evaluation "
                          "report gpd_train can read: ") and named in err, err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"rerun the evaluation: `python -m gpd_train --eval --run-dir {tmp_path}`" in err
    assert sorted(p.name for p in (tmp_path / "eval").iterdir()) == ["report.json"]
    (tmp_path / "eval" / "report.json").write_text(json.dumps(REPORT))  # as --eval writes it
    assert rebuild(["--run-dir", str(tmp_path)]) == 0


def test_rebuild_that_cannot_write_names_the_folder_and_the_remedy(tmp_path, capsys,
                                                                  monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "report.json").write_text(json.dumps(REPORT))

    def read_only(report, run_dir):
        raise PermissionError(13, "Permission denied", str(run_dir / "eval" / "report.html"))
    monkeypatch.setattr("gpd_train.eval.report_html.write_report_html", read_only)
    assert rebuild(["--run-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot write {tmp_path / 'eval'} "
                          f"({tmp_path / 'eval' / 'report.html'}): Permission denied; choose a "
                          "path in a writable folder"), err
    assert err.count("\n") == 1


def test_loss_curves_read_only_metrics_records(tmp_path):
    from gpd_train.eval.report_page import read_metrics

    log = tmp_path / "metrics.jsonl"
    log.write_text('{"step": 1, "loss": 0.5, "mse": 0.4}\n[1, 2]\n"text"\n{"step": "2"}\n'
                   '{"loss": 0.3}\n{"step": 3, "loss": 0.2, "mse": null}\n{"step": 4, "lo')
    assert read_metrics(log) == [{"step": 1, "loss": 0.5, "mse": 0.4},
                                 {"step": 3, "loss": 0.2, "mse": None}]


def test_page_plots_the_band_ratios_of_the_grid_rows(tmp_path):
    pytest.importorskip("matplotlib")
    (tmp_path / "eval").mkdir()
    page = render_html(REPORT, tmp_path)
    parsed = _Tables()
    parsed.feed(page)
    assert [i["alt"] for i in parsed.images if i["src"].startswith("data:")] == [
        "quality against NFE", "band amplitudes"]
    assert "<h2>Where detail goes: band amplitudes</h2>" in page
    assert "band amplitudes" not in render_html({**REPORT, "bands": None}, tmp_path)
