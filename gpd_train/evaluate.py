"""The evaluation report (design section 7): every model against the 48-step teacher.

All models sample the same fixed evaluation set (prompts x noise seeds). Metrics:

- PSNR to T0@48: per video ``10 log10(2^2 / MSE)`` against the reference teacher's video
  from the same noise and prompt (values live in [-1, 1]), averaged over the set. For the
  tiny preset the "latents" are the RGB pixels, so latent and pixel PSNR coincide.
- Frechet distance (FD) in a fixed feature space: features are the per-channel mean and
  standard deviation of a fixed random (seed 0) two-layer 3-D conv net with tanh
  (32 + 32 = 64 numbers per video); FD to the reference set, and for the built-in data
  set also to real data videos of the same prompts.
- High-frequency energy ratio: the share of spatial spectral energy above half the
  Nyquist radius, this model's over the reference's (1 = same detail; < 1 = blurrier).
- Motion energy ratio: mean |frame_{t+1} - frame_t|, this model's over the reference's.
- Prompt accuracy (built-in data only): the share of videos whose shape and motion,
  recognised by ``ProceduralVideos.classify``, are the prompt's.
- NFE per video and wall-clock seconds per video for the whole sampling run.
VBench needs models that cannot be downloaded here, so it is not reported.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from tqdm import tqdm

from gpd_model import euler_sample, make_noise, sigma_grid

from .checkpoint import atomic_write_text
from .data import ProceduralVideos
from .loop import autocast

FEATURE_SEED = 0
SHEET_SCALE = 3
GIF_SCALE = 4


@dataclass
class Candidate:
    label: str
    model: torch.nn.Module
    steps: int
    guided: bool


def _check_videos(videos: torch.Tensor, name: str) -> None:
    if not isinstance(videos, torch.Tensor) or videos.dim() != 5:
        got = tuple(videos.shape) if isinstance(videos, torch.Tensor) else type(videos).__name__
        raise ValueError(f"{name} must be a [N, C, T, H, W] tensor, got {got}")


def _check_pair(videos: torch.Tensor, reference: torch.Tensor) -> None:
    _check_videos(videos, "videos")
    _check_videos(reference, "reference")
    if videos.shape != reference.shape:
        raise ValueError(f"videos {tuple(videos.shape)} and reference {tuple(reference.shape)} "
                         "must have the same shape")


def psnr(videos: torch.Tensor, reference: torch.Tensor, peak_to_peak: float = 2.0) -> float:
    """Mean over videos of ``10 log10(peak_to_peak^2 / MSE)`` (inf when identical)."""
    _check_pair(videos, reference)
    mse = (videos.double() - reference.double()).square().flatten(1).mean(dim=1)
    return float((10.0 * torch.log10(peak_to_peak ** 2 / mse)).mean())


def _feature_weights(channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(FEATURE_SEED)
    first = torch.randn(32, channels, 3, 3, 3, generator=gen) / math.sqrt(channels * 27)
    second = torch.randn(32, 32, 3, 3, 3, generator=gen) / math.sqrt(32 * 27)
    return first, second


def video_features(videos: torch.Tensor) -> torch.Tensor:
    """Fixed random conv features [N, 64] (float64) of videos [N, C, T, H, W]."""
    _check_videos(videos, "videos")
    first, second = _feature_weights(videos.shape[1])
    hidden = torch.tanh(F.conv3d(videos.float().cpu(), first, stride=(1, 2, 2), padding=1))
    hidden = torch.tanh(F.conv3d(hidden, second, stride=(1, 2, 2), padding=1))
    flat = hidden.flatten(2)
    return torch.cat([flat.mean(dim=2), flat.std(dim=2)], dim=1).double()


def _psd_sqrt(matrix: torch.Tensor) -> torch.Tensor:
    values, vectors = torch.linalg.eigh(matrix)
    return (vectors * values.clamp_min(0).sqrt()) @ vectors.T


def frechet_distance(features_a: torch.Tensor, features_b: torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to two feature sets [N, F] (N >= 2)."""
    for name, feats in (("features_a", features_a), ("features_b", features_b)):
        if feats.dim() != 2 or feats.shape[0] < 2:
            raise ValueError(f"{name} must be [N >= 2, F], got {tuple(feats.shape)}")
    if features_a.shape[1] != features_b.shape[1]:
        raise ValueError(f"feature sizes differ: {features_a.shape[1]} vs {features_b.shape[1]}")
    a, b = features_a.double(), features_b.double()
    cov_a, cov_b = torch.atleast_2d(torch.cov(a.T)), torch.atleast_2d(torch.cov(b.T))
    root_a = _psd_sqrt(cov_a)
    cross = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp_min(0).sqrt().sum()
    mean_term = (a.mean(dim=0) - b.mean(dim=0)).square().sum()
    return float(mean_term + cov_a.trace() + cov_b.trace() - 2.0 * cross)


def high_frequency_share(videos: torch.Tensor) -> float:
    """Share of spatial spectral energy above half the Nyquist radius."""
    _check_videos(videos, "videos")
    height, width = videos.shape[-2:]
    frames = videos.double() - videos.double().mean(dim=(-2, -1), keepdim=True)
    energy = torch.fft.fft2(frames, norm="ortho").abs().square()

    def axis(n: int) -> torch.Tensor:
        k = torch.arange(n, dtype=torch.float64)
        return torch.minimum(k, n - k) / (n / 2)

    radius = ((axis(height)[:, None] ** 2 + axis(width)[None, :] ** 2) / 2).sqrt()
    total = energy.sum()
    return float(energy[..., radius > 0.5].sum() / total) if total > 0 else 0.0


def motion_energy(videos: torch.Tensor) -> float:
    """Mean |frame_{t+1} - frame_t|."""
    _check_videos(videos, "videos")
    if videos.shape[2] < 2:
        raise ValueError(f"motion energy needs >= 2 frames, got {videos.shape[2]}")
    return float((videos[:, :, 1:].double() - videos[:, :, :-1].double()).abs().mean())


def _ratio(value: float, reference: float) -> float:
    return value / reference if reference > 0 else float("nan")


@torch.no_grad()
def sample_set(candidate: Candidate, noise: torch.Tensor, context: torch.Tensor,
               negative: torch.Tensor, shift: float, guidance: float, batch_size: int,
               device: torch.device, precision: str) -> tuple[torch.Tensor, float]:
    """Videos of the whole evaluation set and seconds per video."""
    sigmas = sigma_grid(candidate.steps, shift).to(device)
    candidate.model.eval()
    outputs = []
    started = time.perf_counter()
    for begin in range(0, noise.shape[0], batch_size):
        x = noise[begin:begin + batch_size].to(device)
        ctx = context[begin:begin + batch_size].to(device)
        neg = negative.to(device).expand(len(x), -1, -1) if candidate.guided else None
        with autocast(device, precision):
            videos = euler_sample(candidate.model, x, ctx, sigmas, neg,
                                  guidance if candidate.guided else None)
        outputs.append(videos.float().cpu())
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = (time.perf_counter() - started) / noise.shape[0]
    return torch.cat(outputs), seconds


def _frames_to_image(video: torch.Tensor, scale: int) -> list[Image.Image]:
    rgb = video[:3] if video.shape[0] >= 3 else video[:1].expand(3, -1, -1, -1)
    pixels = ((rgb.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # [3, T, H, W]
    images = []
    for t in range(pixels.shape[1]):
        image = Image.fromarray(pixels[:, t].permute(1, 2, 0).numpy(), "RGB")
        images.append(image.resize((image.width * scale, image.height * scale), Image.NEAREST))
    return images


def write_contact_sheet(path: Path, rows: list[tuple[str, torch.Tensor]]) -> None:
    """One row per model: each example video's frames left to right."""
    label_width, gap = 150, 6
    first = _frames_to_image(rows[0][1][0], SHEET_SCALE)
    cell_w, cell_h = first[0].size
    frames, examples = len(first), rows[0][1].shape[0]
    width = label_width + examples * (frames * cell_w + gap)
    sheet = Image.new("RGB", (width, len(rows) * (cell_h + gap)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for r, (label, videos) in enumerate(rows):
        top = r * (cell_h + gap)
        draw.text((4, top + cell_h // 2 - 6), label, fill=(0, 0, 0))
        for e in range(examples):
            left = label_width + e * (frames * cell_w + gap)
            for t, image in enumerate(_frames_to_image(videos[e], SHEET_SCALE)):
                sheet.paste(image, (left + t * cell_w, top))
    sheet.save(path)


def write_gif(path: Path, videos: torch.Tensor) -> None:
    """The example videos side by side, animated."""
    per_video = [_frames_to_image(video, GIF_SCALE) for video in videos]
    cell_w, cell_h = per_video[0][0].size
    frames = []
    for t in range(len(per_video[0])):
        canvas = Image.new("RGB", (len(per_video) * (cell_w + 2), cell_h), (255, 255, 255))
        for e, video in enumerate(per_video):
            canvas.paste(video[t], (e * (cell_w + 2), 0))
        frames.append(canvas)
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=150, loop=0)


def _slug(label: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in label.lower()).strip("_")


def _candidates(run: Any) -> list[Candidate]:
    cfg = run.config
    last = cfg.num_stages
    teacher = run.load_stage_model("gpd", 0)
    rows = [Candidate(f"teacher@{cfg.steps[0]} (ref)", teacher, cfg.steps[0], True)]
    rows += [Candidate(f"teacher@{k} naive", teacher, k, True) for k in cfg.steps[1:]]
    rows.append(Candidate(f"vanilla PD@{cfg.steps[last]}", run.load_stage_model("vanilla", last),
                          cfg.steps[last], False))
    rows += [Candidate(f"GPD@{cfg.steps[k]}", run.load_stage_model("gpd", k), cfg.steps[k],
                       False) for k in range(1, last + 1)]
    return rows


def evaluate_run(run: Any) -> Path:
    """Sample every model on the evaluation set and write the report; returns report.md."""
    cfg, ev = run.config, run.config.eval
    out = run.folder / "eval"
    out.mkdir(parents=True, exist_ok=True)
    candidates = _candidates(run)
    context, names = run.data.eval_prompts(ev.prompts)
    noise = make_noise((ev.prompts, *run.data.latent_shape), seed=ev.seed)
    builtin = isinstance(run.data, ProceduralVideos)
    prompt_ids = torch.arange(ev.prompts) % run.data.num_prompts if builtin else None
    data_features = None
    if builtin:
        real = run.data.videos(prompt_ids + run.data.num_prompts * 10**6)
        data_features = video_features(real)
    examples = torch.linspace(0, ev.prompts - 1, min(ev.examples, ev.prompts)).round().long()
    results, sheet_rows, reference = [], [], None
    for candidate in tqdm(candidates, desc="eval", unit="model"):
        videos, seconds = sample_set(candidate, noise, context, run.data.negative_context,
                                     cfg.resolved_shift, cfg.resolved_guidance, ev.batch_size,
                                     run.device, cfg.precision)
        if reference is None:
            reference, reference_features = videos, video_features(videos)
            reference_hf, reference_motion = high_frequency_share(videos), motion_energy(videos)
        features = video_features(videos)
        row: dict[str, Any] = {
            "model": candidate.label, "steps": candidate.steps, "cfg": candidate.guided,
            "nfe": candidate.steps * (2 if candidate.guided else 1),
            "psnr_db": None if videos is reference else psnr(videos, reference),
            "fd_ref": frechet_distance(features, reference_features),
            "hf_ratio": _ratio(high_frequency_share(videos), reference_hf),
            "motion_ratio": _ratio(motion_energy(videos), reference_motion),
            "seconds_per_video": seconds,
        }
        if builtin:
            shape, motion = run.data.classify(videos)
            row["fd_data"] = frechet_distance(features, data_features)
            row["prompt_acc"] = float(((shape == prompt_ids // 4) & (motion == prompt_ids % 4))
                                      .float().mean())
        results.append(row)
        sheet_rows.append((candidate.label, videos[examples]))
        write_gif(out / f"{_slug(candidate.label)}.gif", videos[examples])
    write_contact_sheet(out / "contact_sheet.png", sheet_rows)
    report = {"rows": results, "prompts": [names[int(i)] for i in examples],
              "eval_set": {"prompts": ev.prompts, "noise_seed": ev.seed,
                           "guidance": cfg.resolved_guidance},
              "stages": _stage_summaries(run), "config": cfg.to_dict()}
    atomic_write_text(out / "report.json", json.dumps(report, indent=1))
    atomic_write_text(out / "report.md", render_markdown(report))
    return out / "report.md"


def _stage_summaries(run: Any) -> dict[str, Any]:
    summaries = {}
    for done in sorted(run.folder.glob("**/done.json")):
        summaries[str(done.parent.relative_to(run.folder))] = json.loads(done.read_text())
    return summaries


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "ref"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.{digits}f}"
    return str(value)


def render_markdown(report: dict[str, Any]) -> str:
    """The report's markdown: the table, what the columns mean, and the stage budgets."""
    rows = report["rows"]
    builtin = "prompt_acc" in rows[0]
    header = ["model", "steps", "CFG", "NFE", "PSNR to T0@48 (dB)", "FD to ref"]
    header += ["FD to data"] if builtin else []
    header += ["HF energy ratio", "motion energy ratio"]
    header += ["prompt acc"] if builtin else []
    header += ["s/video"]
    lines = ["# GPD evaluation report", "",
             f"Evaluation set: {report['eval_set']['prompts']} videos (prompts cycled, noise seed "
             f"{report['eval_set']['noise_seed']}, teacher CFG scale "
             f"{report['eval_set']['guidance']}); examples shown: "
             + ", ".join(report["prompts"]) + ".", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["model"], _fmt(row["steps"]), _fmt(row["cfg"]), _fmt(row["nfe"]),
                 _fmt(row["psnr_db"]), _fmt(row["fd_ref"], 3)]
        cells += [_fmt(row["fd_data"], 3)] if builtin else []
        cells += [_fmt(row["hf_ratio"]), _fmt(row["motion_ratio"])]
        cells += [_fmt(row["prompt_acc"])] if builtin else []
        cells += [_fmt(row["seconds_per_video"], 4)]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Columns: PSNR of each video to the 48-step CFG teacher's video from the same "
              "noise and prompt (range [-1, 1]); Frechet distance of fixed random 3-D conv "
              "features (64-d) to the reference set and to real data videos; share of spatial "
              "spectral energy above half Nyquist, over the reference's; mean absolute frame "
              "difference, over the reference's; share of videos whose recognised shape and "
              "motion match the prompt; wall-clock sampling seconds per video. VBench is not "
              "reported (its models cannot be downloaded here).", "", "## Stages", "",
              "| stage | steps | iterations | seconds | final loss (mean of last 20) |",
              "|---|---|---|---|---|"]
    for name, info in report["stages"].items():
        lines.append(f"| {name} | {info.get('steps', '')} | {info.get('iterations', 'import')} | "
                     f"{_fmt(info.get('seconds', float('nan')), 0)} | "
                     f"{_fmt(info.get('final_loss_mean20', float('nan')), 5)} |")
    lines += ["", "Files: contact_sheet.png (one row per model), one GIF per model, "
              "report.json (everything above, plus the configuration).", ""]
    return "\n".join(lines)
