"""The evaluation report (design section 7): every model against the 48-step teacher.

All models sample the same fixed evaluation set (prompts x noise seeds); the metrics
(gpd_train/eval/metrics.py) compare each set with its reference, the teacher at its full step
count and CFG scale from the same noise and prompts:

- PSNR to the reference, per video, averaged (the tiny preset's latents are its pixels).
- On the built-in data, the learned Frechet distance (gpd_train/eval/feature_net.py) to real
  data videos of the same prompts and to the reference set, and prompt accuracy: the share
  of videos whose shape and motion, recognised by ``ProceduralVideos.classify``, are asked for.
- High-frequency and motion energy, each over the reference's.
- NFE per video and wall-clock seconds per video for the whole sampling run.

Every mean carries a 95% bootstrap interval over videos, and the report adds paired
differences (the same resampled videos for both rows) for the comparisons that matter:
the final student against naive sampling and against vanilla PD at its step count.

Rows: the reference, a ceiling (the teacher with 1% multiplicative weight noise: sampling is
chaotic enough that any separately trained network sits near that PSNR), the teacher sampled
naively at each student step count, vanilla PD, the guidance stage's student (when the chain
has one), the GPD students, rows of other run folders given to compare (ablations on the same
stage 0), and, for a chain with a guidance stage, the final student at other CFG scales
against the teacher at those scales. VBench needs models that cannot be downloaded here.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from gpd_model import (
    CFG,
    Conditioning,
    Denoiser,
    DiTDenoiser,
    ExpertPair,
    euler_sample,
    make_noise,
    sigma_grid,
)
from gpd_train.config.chains import CHAINS, DEFAULT_CHAIN, GUIDANCE_STAGE, StageId, get_chain
from gpd_train.config.load import load_run_config
from gpd_train.data.procedural import ProceduralVideos
from gpd_train.devices import autocast
from gpd_train.errors import ConfigError
from gpd_train.eval.detail_metric import SANITY, DetailJudge, real_videos, sanity_pairs, sanity_sets
from gpd_train.eval.feature_net import feature_net, video_features
from gpd_train.eval.metric_registry import METRICS, Sample
from gpd_train.eval.report import render_markdown
from gpd_train.eval.report_page import write_report_html
from gpd_train.infer.media import write_contact_sheet, write_gif
from gpd_train.run.destination import EVAL, reuse_or_move_aside
from gpd_train.run.files import atomic_write_text, sha256_file
from gpd_train.run.folder import TEACHER, RunFolder
from gpd_train.run.preflight import check_eval_guidance
from gpd_train.run.records import OUTPUT, read_record

CEILING_NOISE = 0.01
CEILING_SEED = 0
MAIN = "main"


@dataclass
class Candidate:
    label: str
    # What samples the row: a CFG pair (its scale in the table) or one forward. None: a set
    # made, not sampled (the data sanity row); the teacher's sanity rows carry its denoiser
    # for its CFG and NFE in the table, and are never sampled either.
    denoiser: Denoiser | None
    steps: int
    reference: str  # label of the row this one is compared with
    group: str = MAIN
    cfg: str = ""  # how guidance enters, for the table

    def __post_init__(self) -> None:
        if not self.cfg:
            self.cfg = f"CFG {self.guidance:g}" if self.guidance is not None else "none"

    @property
    def guidance(self) -> float | None:
        """The CFG scale the row is sampled at, None without CFG."""
        return self.denoiser.scale if isinstance(self.denoiser, CFG) else None

    @property
    def nfe(self) -> int:
        return self.steps * (2 if self.guidance is not None else 1)


@torch.no_grad()
def sample_set(candidate: Candidate, noise: torch.Tensor, cond: Conditioning, shift: float,
               batch_size: int, device: torch.device,
               precision: str) -> tuple[torch.Tensor, float]:
    """Videos of the whole evaluation set and seconds per video."""
    sigmas = sigma_grid(candidate.steps, shift).to(device)
    for module in candidate.denoiser.modules():
        module.eval()
    outputs = []
    started = time.perf_counter()
    for begin in range(0, noise.shape[0], batch_size):
        x = noise[begin:begin + batch_size].to(device)
        rows = cond[begin:begin + batch_size].to(device)
        with autocast(device, precision):
            videos = euler_sample(candidate.denoiser, x, rows, sigmas)
        outputs.append(videos.float().cpu())
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = (time.perf_counter() - started) / noise.shape[0]
    return torch.cat(outputs), seconds


@torch.no_grad()
def perturbed(model: torch.nn.Module, scale: float, seed: int) -> torch.nn.Module:
    """A copy of ``model`` with every weight multiplied by ``1 + scale * N(0, 1)``."""
    generator = torch.Generator().manual_seed(seed)
    copied = copy.deepcopy(model)
    for param in copied.parameters():
        noise = torch.randn(param.shape, generator=generator, dtype=torch.float32)
        param.mul_(1.0 + scale * noise.to(device=param.device, dtype=param.dtype))
    return copied


def _perturbed_denoiser(denoiser: Denoiser) -> Denoiser:
    """The ceiling's denoiser: ``perturbed`` weights of each of ``denoiser``'s networks."""
    if isinstance(denoiser, ExpertPair):
        return dataclasses.replace(denoiser, high=_perturbed_denoiser(denoiser.high),
                                   low=_perturbed_denoiser(denoiser.low))
    assert isinstance(denoiser, DiTDenoiser)
    return DiTDenoiser(perturbed(denoiser.model, CEILING_NOISE, CEILING_SEED))


def stage_denoiser(run: RunFolder, sid: StageId, fold_at: float | None = None) -> Denoiser:
    """A finished stage as the evaluation samples it: its model (a guidance input folded at
    ``fold_at``), or both experts of a Wan2.2 run's stage."""
    if run.boundary is not None:
        high, low = run.load_stage_experts(sid)
        return ExpertPair(DiTDenoiser(high), DiTDenoiser(low), run.boundary)
    return DiTDenoiser(run.load_stage_model(sid, fold_at=fold_at))


def _slug(label: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in label.lower()).strip("_")


def final_steps(run: RunFolder, others: list[int] = ()) -> list[int]:
    """The step counts the report compares at (descending): each pipeline chain's final
    student's and ``others`` (the --compare rows')."""
    finals = {run.steps(StageId(chain, run.config.stage_count(chain)))
              for chain in run.config.pipeline_chains}
    return sorted(finals | set(others), reverse=True)


def _candidates(run: RunFolder, compared_steps: list[int],
                negative: Conditioning) -> list[Candidate]:
    """The run's rows; ``compared_steps``: ``final_steps``, naive sampling's step counts;
    ``negative``: the CFG pairs' unconditional prompt."""
    cfg = run.config
    w, full = cfg.resolved_guidance, cfg.steps[0]
    base = stage_denoiser(run, TEACHER)
    teacher = CFG(base, negative, w)  # one object: the naive rows are its own
    reference = f"teacher@{full} (ref)"
    ceiling = CFG(_perturbed_denoiser(base), negative, w)
    rows = [Candidate(reference, teacher, full, reference),
            Candidate(f"ceiling: teacher@{full}, weights x(1+{CEILING_NOISE:g}N)",
                      ceiling, full, reference)]
    naive = sorted(set(cfg.steps[1:]) | set(compared_steps), reverse=True)
    rows += [Candidate(f"teacher@{k} naive", teacher, k, reference) for k in naive]
    for chain in cfg.pipeline_chains:
        rows += _chain_rows(run, chain, reference, compared_steps)
    return rows + _other_guidance_rows(run, base, negative)


def _chain_rows(run: RunFolder, chain: str, reference: str,
                compared_steps: list[int]) -> list[Candidate]:
    """A chain's students at the run's CFG scale: every stage, or for a chain evaluated by
    its final student, that one and its stages at the other compared step counts."""
    cfg, declared = run.config, get_chain(chain)
    w, last = cfg.resolved_guidance, cfg.stage_count(chain)
    how = f"input w={w:g}" if run.has_guidance_stage(chain) else "none"
    stages: list[Any] = [k for k in range(1, last + 1) if declared.evaluate_every_stage
                         or k == last or run.steps(StageId(chain, k)) in compared_steps]
    if run.has_guidance_stage(chain):
        stages.insert(0, GUIDANCE_STAGE)
    rows = []
    for sid in (StageId(chain, stage) for stage in stages):
        steps = run.steps(sid)
        name = (f"{declared.label} guidance stage@{steps}" if sid.is_guidance
                else f"{declared.label}@{steps}")
        rows.append(Candidate(name, stage_denoiser(run, sid, fold_at=w), steps, reference,
                              cfg=how))
    return rows


def _other_guidance_rows(run: RunFolder, base: Denoiser,
                         negative: Conditioning) -> list[Candidate]:
    """Final w-conditioned students at other CFG scales, each against the teacher there."""
    cfg = run.config
    full, last = cfg.steps[0], cfg.steps[-1]
    chains = [chain for chain in cfg.pipeline_chains if run.has_guidance_stage(chain)]
    scales: list[float] = []
    for chain in chains:
        values = cfg.eval.guidance_values
        scales += [float(w) for w in (values if values is not None
                                      else cfg.chain(chain).guidance_range)
                   if w != cfg.resolved_guidance and float(w) not in scales]
    rows = []
    for w in scales:
        group, reference = f"guidance w={w:g}", f"teacher@{full} w={w:g} (ref)"
        teacher = CFG(base, negative, w)
        rows += [Candidate(reference, teacher, full, reference, group),
                 Candidate(f"teacher@{last} naive w={w:g}", teacher, last, reference, group)]
        rows += [Candidate(f"{get_chain(chain).label}@{last} w={w:g}",
                           DiTDenoiser(run.load_stage_model(StageId(chain, cfg.stage_count(chain)),
                                                             fold_at=w)),
                           last, reference, group, cfg=f"input w={w:g}") for chain in chains]
    return rows


def _compare_candidates(run: RunFolder, compare: dict[str, str]) -> list[Candidate]:
    """Each other run folder's final student (an ablation on the same stage 0): its first
    pipeline chain that finished."""
    own_teacher = sha256_file(run.stage_folder(TEACHER) / OUTPUT)
    cfg = run.config
    reference = f"teacher@{cfg.steps[0]} (ref)"
    rows = []
    for label, folder in compare.items():
        config_path = Path(folder) / "config.json"
        if not config_path.is_file():
            raise ConfigError(f"--compare {label}={folder}: no run folder there (missing "
                             f"{config_path})")
        other = RunFolder(load_run_config(folder, device=cfg.device), run.device)
        teacher = other.stage_folder(TEACHER) / OUTPUT
        if not teacher.is_file() or sha256_file(teacher) != own_teacher:
            raise ConfigError(f"--compare {label}={folder}: its stage0 is not this run's teacher "
                             f"({teacher}); comparisons need the same stage 0 (copy stage0/ "
                             "into the other run folder before training it)")
        done = [StageId(c, other.config.stage_count(c)) for c in other.config.pipeline_chains]
        done = [sid for sid in done if other.is_done(sid)]
        if not done:
            raise ConfigError(f"--compare {label}={folder}: no chain of "
                             f"{other.config.pipeline_chains} has finished its last stage")
        w, sid = cfg.resolved_guidance, done[0]
        how = f"input w={w:g}" if other.has_guidance_stage(sid.chain) else "none"
        steps = other.steps(sid)
        rows.append(Candidate(f"{label}: {get_chain(sid.chain).label}@{steps}",
                              DiTDenoiser(other.load_stage_model(sid, fold_at=w)), steps,
                              reference, "ablations", cfg=how))
    return rows


@dataclass
class _Judge:
    """What every row is measured against: references, real-data features, prompt labels.

    Each set's learned features are computed once (``features``, by row label) and reused
    as a reference; what each metric measured of a set (``measured``, by row label, then
    metric key) is reused in the paired comparisons.
    """

    data: Any
    prompt_ids: torch.Tensor | None
    net: Any
    data_features: torch.Tensor | None
    detail: DetailJudge | None = None
    # Image-to-video: each video's condition frame [N, 3, H, W] (first-frame fidelity).
    first_frames: torch.Tensor | None = None
    features: dict[str, torch.Tensor] = field(default_factory=dict)
    measured: dict[str, dict[str, Any]] = field(default_factory=dict)

    def row(self, candidate: Candidate, videos: torch.Tensor, reference: torch.Tensor,
            seconds: float) -> dict[str, Any]:
        """The row of one set: every registered metric this judge can compute, in column
        order; what each measured is kept for the paired comparisons."""
        row: dict[str, Any] = {"model": candidate.label, "group": candidate.group,
                               "steps": candidate.steps, "cfg": candidate.cfg,
                               "nfe": candidate.nfe}
        sample = Sample(candidate.label, candidate.reference, videos, reference, seconds,
                        sampled=candidate.denoiser is not None)
        measured = self.measured.setdefault(candidate.label, {})
        for metric in METRICS.values():
            if metric.available(self):
                measured[metric.key] = metric.compute(self, sample)
                row.update(metric.entries(measured[metric.key], len(videos)))
        return row

    def learned_features(self, label: str, videos: torch.Tensor) -> torch.Tensor:
        """The set's learned features, computed once (a reference's are reused by its rows)."""
        if label not in self.features:
            self.features[label] = video_features(self.net, videos)
        return self.features[label]

    def correct(self, videos: torch.Tensor) -> torch.Tensor:
        shape, motion = self.data.classify(videos)
        want_shape, want_motion = self.data.prompt_labels(self.prompt_ids)
        return ((shape == want_shape) & (motion == want_motion)).double()

    def comparisons(self, pairs: list[tuple[str, str]], count: int) -> list[dict[str, Any]]:
        """Paired differences ``a - b`` (same ``count`` videos) of every paired metric, then
        the detail metric's."""
        out = []
        for a, b in pairs:
            if a not in self.measured or b not in self.measured:
                continue
            out += [{"a": a, "b": b, **metric.difference(self.measured[a][metric.key],
                                                         self.measured[b][metric.key], count)}
                    for metric in METRICS.values()
                    if metric.paired and metric.key in self.measured[a]]
            out += self.detail.comparisons([(a, b)]) if self.detail is not None else []
        return out


def _judge(run: RunFolder, data: Any, cond: Conditioning, out: Path) -> _Judge:
    prompts = len(cond)
    first_frames = (None if cond.image_latent is None and cond.first_frames is None
                    else ProceduralVideos.condition_frames(cond))
    if not isinstance(data, ProceduralVideos):
        # Image-to-video embeddings hold VAE latents, not the condition's pixels: no
        # first-frame PSNR without decoding.
        tqdm.write("[eval] prompt embeddings: PSNR, HF and motion ratios only (learned FD, "
                   "detail KID, prompt accuracy and first-frame PSNR need the built-in data's "
                   "real videos and labels)")
        return _Judge(data, None, None, None)
    prompt_ids = torch.arange(prompts) % data.num_prompts
    net = feature_net(data, run.config.seed, out / "feature_net.safetensors")
    real = real_videos(data, prompts)
    return _Judge(data, prompt_ids, net, video_features(net, real), DetailJudge.build(net, real),
                  first_frames=first_frames)


def evaluate_run(run: RunFolder, data: Any, compare: dict[str, str] | None = None) -> Path:
    """Sample every model of ``run`` on the evaluation set drawn from ``data`` (the run's
    data set) and write the report; returns report.md.

    ``compare`` maps labels to other run folders (same stage 0) whose final GPD student is
    added as a row: the ablation table in one evaluation.
    """
    check_eval_guidance(run)
    cfg, ev = run.config, run.config.eval
    out = run.folder / "eval"
    compared = _compare_candidates(run, compare or {})
    steps = final_steps(run, [c.steps for c in compared])
    candidates = _candidates(run, steps, data.negative) + compared  # all verified
    stages = _stage_summaries(run)
    # A report of other stages, runs or settings is kept aside, not overwritten.
    moved = reuse_or_move_aside(out, EVAL, {
        "stages": {name: record.get("sha256") for name, record in stages.items()},
        "compare": compare or {}, "eval": cfg.to_dict()["eval"],
        "shift": cfg.resolved_shift, "guidance": cfg.resolved_guidance})
    if moved is not None:
        tqdm.write(f"[eval] its inputs changed: moved the old report to {moved}")
    cond, names = data.eval_prompts(ev.prompts)
    noise = make_noise((ev.prompts, *data.latent_shape), seed=ev.seed)
    judge = _judge(run, data, cond, out)
    examples = torch.linspace(0, ev.prompts - 1, min(ev.examples, ev.prompts)).round().long()
    rows, sheet_rows, sets = [], [], {}
    for candidate in tqdm(candidates, desc="eval", unit="model"):
        videos, seconds = sample_set(candidate, noise, cond, cfg.resolved_shift,
                                     ev.batch_size, run.device, cfg.precision)
        sets[candidate.label] = videos
        gif = f"{_slug(candidate.label)}.gif"
        rows.append({**judge.row(candidate, videos, sets[candidate.reference], seconds),
                     "reference": candidate.reference, "gif": gif})  # for report.html
        sheet_rows.append((candidate.label, videos[examples]))
        write_gif(out / gif, videos[examples])
    write_contact_sheet(out / "contact_sheet.png", sheet_rows)
    sanity = _sanity_rows(judge, data, candidates[0], sets[candidates[0].label], ev.seed)
    reference = candidates[0].label
    pairs = _pairs(candidates, steps)
    report = {"rows": rows, "sanity_rows": sanity, "prompts": [names[int(i)] for i in examples],
              "comparisons": judge.comparisons(pairs, ev.prompts)
              + _detail_comparisons(judge, candidates, pairs),
              "bands": _band_table(judge, rows, reference),
              "compared_steps": steps, "training": _training_costs(run),
              "eval_set": {"prompts": ev.prompts, "noise_seed": ev.seed,
                           "guidance": cfg.resolved_guidance, "steps": cfg.steps[0]},
              "stages": stages, "config": cfg.to_dict(),
              "compare": compare or {}}
    atomic_write_text(out / "report.json", json.dumps(report, indent=1))
    atomic_write_text(out / "report.md", render_markdown(report))
    write_report_html(report, run.folder)
    return out / "report.md"


def _pairs(candidates: list[Candidate], steps: list[int]) -> list[tuple[str, str]]:
    """The paired comparisons: each student at a compared step count S against naive
    sampling at S, the baseline chains and the default chain at S, and naive sampling at
    every larger compared S (e.g. a 3-step student against naive@6 at 12 NFE)."""
    labels = {c.label for c in candidates}
    default = get_chain(DEFAULT_CHAIN).label
    baselines = [c.label for c in CHAINS.values() if c.baseline]
    pairs = []
    for candidate in candidates:
        label, at = candidate.label, candidate.steps
        chain_label = label.split(": ")[-1].rsplit("@", 1)[0]
        if (candidate.group not in (MAIN, "ablations") or at not in steps
                or chain_label in baselines or candidate.guidance is not None):
            continue
        others = [f"teacher@{at} naive", *(f"{b}@{at}" for b in baselines)]
        others += [f"{default}@{at}"] if label != f"{default}@{at}" else []
        others += [f"teacher@{k} naive" for k in steps if k > at]
        pairs += [(label, other) for other in others if other in labels]
    return pairs


def _training_costs(run: RunFolder) -> list[dict[str, Any]]:
    """Each pipeline chain's finished stages: iterations, recorded wall seconds and frozen-
    model forwards per training sample and update (iteration-weighted over its stages)."""
    costs = []
    for chain in run.config.pipeline_chains:
        stages = [StageId(chain, k) for k in range(1, run.config.stage_count(chain) + 1)]
        if run.has_guidance_stage(chain):
            stages.insert(0, StageId(chain, GUIDANCE_STAGE))
        records = [(sid, run.record(sid)) for sid in stages if run.is_done(sid)]
        if not records:
            continue
        iterations = sum(int(record.get("iterations", 0)) for _, record in records)
        forwards = sum(run.plan(sid).teacher_forwards * int(record.get("iterations", 0))
                       for sid, record in records)
        costs.append({"chain": get_chain(chain).label, "stages": len(records),
                      "iterations": iterations,
                      "seconds": sum(float(record.get("seconds", 0.0)) for _, record in records),
                      "teacher_forwards_per_sample": forwards / max(iterations, 1)})
    return costs


def _sanity_rows(judge: _Judge, data: Any, teacher: Candidate, videos: torch.Tensor,
                 seed: int) -> list[dict[str, Any]]:
    """The detail metric's sanity rows (gpd_train/eval/detail_metric.py): held-out data and
    the reference's videos degraded, each measured like a model's but kept apart from the
    models' rows (report.html plots and shows those)."""
    if judge.detail is None:
        return []
    rows = []
    for label, from_teacher, made in sanity_sets(data, teacher.label, videos, seed):
        sanity = (Candidate(label, teacher.denoiser, teacher.steps, teacher.label, SANITY)
                  if from_teacher else
                  Candidate(label, None, 0, teacher.label, SANITY, cfg="data"))
        rows.append(judge.row(sanity, made, videos, float("nan")))
    return rows


def _band_table(judge: _Judge, rows: list[dict[str, Any]], reference: str
                ) -> dict[str, Any] | None:
    """The per-band amplitudes of every row measured against ``reference`` (not the sanity
    rows: the band table shows where the models' detail goes)."""
    if judge.detail is None:
        return None
    return judge.detail.band_table(reference, [r["model"] for r in rows
                                               if r["reference"] == reference])


def _detail_comparisons(judge: _Judge, candidates: list[Candidate],
                        pairs: list[tuple[str, str]]) -> list[dict[str, Any]]:
    """The detail metric's ordering steps (sanity rows, then naive sampling by step count)
    and each student of ``pairs`` against the reference (no PSNR difference to show there)."""
    if judge.detail is None:
        return []
    teacher = candidates[0]
    naive = sorted((c for c in candidates
                    if c.denoiser is teacher.denoiser and c.group == teacher.group),
                   key=lambda c: -c.steps)
    students = dict.fromkeys(student for student, _ in pairs)
    return judge.detail.comparisons(sanity_pairs(teacher.label, [c.label for c in naive])
                                    + [(student, teacher.label) for student in students])


def _stage_summaries(run: RunFolder) -> dict[str, Any]:
    summaries = {}
    for done in sorted(run.folder.glob("**/done.json")):
        if ".old-" in str(done.relative_to(run.folder)):
            continue  # a stage moved aside by --restart or as stale: not this run's
        summaries[str(done.parent.relative_to(run.folder))] = read_record(done.parent)
    return summaries
