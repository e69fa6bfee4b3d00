"""Why the frequency loss does little: its share of the gradient and the error it weights.

On real training batches of a GPD stage (the stage's own objective: teacher-rollout states,
the stage teacher's target u*), for the student the stage starts from (the previous stage's
output) and, with ``--trained``, the stage's finished student:

- gradient norms of the MSE term and of the frequency term's excess over it (the loss is
  ``w = 1 + ...`` times the error's power, so ``freq = mse + excess``) with respect to the
  student's weights, and the cosine between the MSE gradient and the whole loss's: Adam
  is blind to a common scale, so only a change of direction can change training;
- the error ``u_S - u*`` by temporal frequency and spatial ring (the detail metric's bands):
  its share of the error power, its power over the target's (how much of that band the
  student misses), and the loss's mean weight ``w`` there;
- the share of the error in frame differences (temporal frequencies above 0);
- with ``--freq-form band_amplitude`` (the run's form by default): the band-amplitude term's
  gradient instead of the excess (the loss is then ``mse + weight x band``), and each band's
  amplitude of the student's clean prediction ``x - sigma u`` over the target's.

The PyTorch references of the loss (``freq_loss_reference``, ``band_amplitude_loss_reference``)
are used, so the numbers do not depend on a kernel. Run on a copy of a run folder (building
the stage's trainer opens its checkpoint folder):

    python benchmarks/freq_diagnosis.py --run-dir COPY --stage 3 --trained --batches 8
"""

from __future__ import annotations

import argparse
import math
import sys

import torch

from gpd_kernels.reference import (
    band_amplitude_loss_reference,
    freq_loss_reference,
    frequency_weights,
    spectral_bands,
)
from gpd_train.config.chains import StageId
from gpd_train.config.load import load_run_config
from gpd_train.config.settings import FREQ_FORMS
from gpd_train.eval.detail_metric import BAND_EDGES
from gpd_train.eval.metrics import spectral_radius
from gpd_train.train.builders import TrainingRun, build_distill
from gpd_train.train.lanes import LaneBatch


def spectral_bins(frames: int, height: int, width: int) -> list[tuple[str, torch.Tensor]]:
    """(name, [T, H, W] bool mask) per temporal frequency |k_t| and spatial ring (DC with
    ring 0)."""
    radius = spectral_radius(height, width)
    k_t = torch.arange(frames)
    k_t = torch.minimum(k_t, frames - k_t)
    bins = []
    for kt in range(frames // 2 + 1):
        for ring, (low, high) in enumerate(zip(BAND_EDGES[:-1], BAND_EDGES[1:], strict=True)):
            spatial = (radius <= high) & ((radius > low) if ring else torch.ones_like(radius,
                                                                                    dtype=bool))
            mask = (k_t == kt)[:, None, None] & spatial[None]
            if bool(mask.any()):
                bins.append((f"k_t={kt} S {low:g}-{min(high, 1.0):g}", mask))
    return bins


def clean_predictions(batch: LaneBatch, grid, velocity: torch.Tensor) -> torch.Tensor:
    """x / sigma - u: the clean sample x - sigma u in velocity units (the band form's input)."""
    sigma = grid.student[batch.index].reshape(-1, 1, 1, 1, 1)
    return batch.x.float() / sigma - velocity


def band_amplitudes(x: torch.Tensor) -> torch.Tensor:
    """Each band's energy [bands] (float64), summed over the batch and channels."""
    band, count = spectral_bands(*x.shape[2:])
    power = torch.fft.fftn(x.double(), dim=(2, 3, 4), norm="ortho").abs().square()
    power = power.sum(dim=(0, 1)).flatten()
    return power.new_zeros(count).index_add(0, band.flatten(), power)


def diagnose(objective, batches: int, freq_weight: float, params: dict[str, float],
             form: str) -> None:
    network = objective.student.model  # the DiT inside the stage's DiTDenoiser
    weights = [p for p in network.parameters() if p.requires_grad]
    norms, cosines = [], []
    error_power = target_power = None
    student_bands = target_bands = 0
    for step in range(batches):
        batch = LaneBatch.from_inputs(objective.prepare(step))
        with torch.no_grad():
            u_star = objective._target(batch)  # the stage's own target and student call
        u_student = objective._student_velocity(batch)
        mse = (u_student - u_star).square().mean()
        if form == "fourier_mse":
            excess = freq_loss_reference(u_student, u_star, **params) - mse
        else:
            clean_student = clean_predictions(batch, objective.grid, u_student)
            clean_target = clean_predictions(batch, objective.grid, u_star)
            excess = band_amplitude_loss_reference(clean_student, clean_target)
            student_bands = student_bands + band_amplitudes(clean_student.detach())
            target_bands = target_bands + band_amplitudes(clean_target)
        g_mse = torch.autograd.grad(mse, weights, retain_graph=True)
        g_excess = torch.autograd.grad(freq_weight * excess, weights)
        flat_mse = torch.cat([g.flatten() for g in g_mse]).double()
        flat_excess = torch.cat([g.flatten() for g in g_excess]).double()
        # The whole loss is mse + fw * freq: = (1 + fw) mse + fw * excess for the Fourier
        # form (freq = mse + excess), mse + fw * band for the band form.
        total = (1 + freq_weight * (form == "fourier_mse")) * flat_mse + flat_excess
        norms.append((float(flat_mse.norm()), float(flat_excess.norm())))
        cosines.append(float(torch.dot(flat_mse, total) / (flat_mse.norm() * total.norm())))
        d = (u_student - u_star).detach().double()
        power = torch.fft.fftn(d, dim=(2, 3, 4), norm="ortho").abs().square().mean(dim=(0, 1))
        target = torch.fft.fftn(u_star.double(), dim=(2, 3, 4), norm="ortho").abs().square() \
            .mean(dim=(0, 1))
        error_power = power if error_power is None else error_power + power
        target_power = target if target_power is None else target_power + target
        # Teacher-rollout lanes advance along the target (what forward() hands finish()).
        objective.finish({"x_next": objective._next_state(batch, u_star)})
    mse_norm = sum(n for n, _ in norms) / len(norms)
    excess_norm = sum(e for _, e in norms) / len(norms)
    if not math.isfinite(mse_norm):
        raise SystemExit("non-finite gradients")
    term = "frequency excess" if form == "fourier_mse" else "band-amplitude term"
    print(f"gradient norms over {batches} batches: MSE {mse_norm:.4g}, {term} x "
          f"weight {freq_weight:g} {excess_norm:.4g} (ratio {excess_norm / mse_norm:.3f}); "
          f"cosine(MSE gradient, whole loss's) {sum(cosines) / len(cosines):.4f} "
          f"(min {min(cosines):.4f})")
    if form == "band_amplitude":
        ratios = (student_bands / target_bands).sqrt()
        print("clean-prediction band amplitude, student over target (temporal band x spatial "
              "ring, temporal-major): " + " ".join(f"{float(r):.4f}" for r in ratios))
        return  # the table below is the error against the Fourier form's per-bin weight
    frames, height, width = error_power.shape
    w = frequency_weights(frames, height, width, params["alpha_s"], params["alpha_t"],
                          params["gamma"], torch.float64)
    effective = 1 + freq_weight * w  # the whole loss's weight per bin (MSE's is 1)
    relative = effective / (1 + freq_weight)  # over its weight at DC
    total_error = float(error_power.sum())
    print("| bin | share of error power | error / target power | loss weight w | "
          "(1 + fw w) / (1 + fw) |")
    print("|---|---|---|---|---|")
    for name, mask in spectral_bins(frames, height, width):
        share = float(error_power[mask].sum()) / total_error
        missed = float(error_power[mask].sum() / target_power[mask].sum())
        print(f"| {name} | {share:.4f} | {missed:.4f} | {float(w[mask].mean()):.3f} | "
              f"{float(relative[mask].mean()):.3f} |")
    moving = float(error_power[1:].sum()) / total_error

    def weighted(part: slice) -> float:  # the mean relative weight an error power meets
        return float((error_power[part] * relative[part]).sum() / error_power[part].sum())

    print(f"error power at temporal frequencies > 0 (frame differences): {moving:.4f}; "
          f"the whole loss's mean relative weight there {weighted(slice(1, None)):.3f} "
          f"against {weighted(slice(0, 1)):.3f} at k_t = 0 (error-power weighted)")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run-dir", required=True, help="a copy of a run folder")
    parser.add_argument("--stage", type=int, default=3)
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--trained", action="store_true",
                        help="also the stage's finished student (its done output)")
    parser.add_argument("--freq-weight", type=float, default=None,
                        help="the weight to measure at (default: the run's for the stage)")
    parser.add_argument("--freq-form", choices=FREQ_FORMS, default=None,
                        help="the loss form to measure (default: the run's)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    config = load_run_config(args.run_dir, device="cpu")
    run = TrainingRun(config)
    sid = StageId("gpd", args.stage)
    chain = config.chain("gpd")
    if chain.state_source != "teacher":
        raise SystemExit(f"state_source must be teacher (the lanes advance along u*), got "
                         f"{chain.state_source!r}")
    params = {"alpha_s": chain.freq_alpha_s, "alpha_t": chain.freq_alpha_t,
              "gamma": chain.freq_gamma}
    weight = (chain.freq_weight[args.stage - 1] if args.freq_weight is None
              else args.freq_weight)
    form = chain.freq_form if args.freq_form is None else args.freq_form
    print(f"{args.run_dir} stage {args.stage}: freq weight {weight:g}, {form}, {params}")
    students = [("start (previous stage's output)", None)]
    if args.trained:
        students.append(("trained (this stage's output)", run.load_stage_model(sid)))
    for name, trained in students:
        objective = build_distill(run, sid).objective  # fresh stream: the same batches
        if trained is not None:
            objective.student.model.load_state_dict(trained.state_dict())
        print(f"\n## student: {name}")
        diagnose(objective, args.batches, weight, params, form)
    return 0


if __name__ == "__main__":
    sys.exit(main())
