"""The denoiser interface (gpd_model.denoiser): Conditioning against hand-built tensors, CFG
and ExpertPair against forwards run by hand, and a two-expert denoiser that trains a GPD
stage, is evaluated and is sampled with no caller changed."""

from __future__ import annotations

import copy
import dataclasses
import re

import pytest
import torch
from builders import random_dit
from torch import nn

from gpd_model import (
    CFG,
    Conditioning,
    DiTDenoiser,
    ExpertPair,
    add_guidance_input,
    euler_sample,
    euler_step,
    make_noise,
    sigma_grid,
    unconditional,
)
from gpd_model.graph_sampler import GraphSampler
from gpd_train.data.procedural import ProceduralVideos
from gpd_train.eval.evaluate import Candidate, sample_set
from gpd_train.train.objectives import GuidanceRange, OnlineDistillation, StageGrid

TEXT_DIM = 32


def texts(batch: int, seed: int, length: int = 5) -> torch.Tensor:
    return torch.randn(batch, length, TEXT_DIM, generator=torch.Generator().manual_seed(seed))


def full_cond(batch: int = 3) -> Conditioning:
    g = torch.Generator().manual_seed(batch)
    return Conditioning(torch.randn(batch, 4, 6, generator=g),
                        image_latent=torch.randn(batch, 2, 1, 2, 2, generator=g),
                        image_tokens=torch.randn(batch, 3, 5, generator=g),
                        first_frames=torch.randn(batch, 3, 1, 2, 2, generator=g),
                        guidance=torch.rand(batch, generator=g))


# -- Conditioning ------------------------------------------------------------------------

@pytest.mark.parametrize("full", [False, True])
def test_conditioning_rows_follow_their_sample_in_every_operation(full):
    cond = full_cond() if full else Conditioning(texts(3, 0))
    slots = set(cond.tensors())
    assert slots == ({"text", "image_latent", "image_tokens", "first_frames", "guidance"}
                     if full else {"text"})
    assert cond.batch == len(cond) == 3
    picks = {"slice": slice(1, 3), "mask": torch.tensor([True, False, True]),
             "index": torch.tensor([2, 0])}
    for pick in picks.values():
        part = cond[pick]
        assert set(part.tensors()) == slots  # None slots stay None
        for name, tensor in part.tensors().items():
            assert torch.equal(tensor, cond.tensors()[name][pick])
    both = Conditioning.cat([cond, cond[1:2]])
    for name, tensor in both.tensors().items():
        assert torch.equal(tensor, torch.cat([cond.tensors()[name],
                                              cond.tensors()[name][1:2]]))
    wide = cond[:1].expand(4)
    assert wide.batch == 4 and set(wide.tensors()) == slots
    assert all(torch.equal(t, cond.tensors()[n][:1].expand(4, *t.shape[1:]))
               for n, t in wide.tensors().items())
    assert cond.expand(3) is cond
    other = full_cond(1) if full else Conditioning(texts(1, 5))  # a negative, batch 1
    mask = torch.tensor([True, False, True])
    mixed = cond.where(mask, other)
    for name, tensor in mixed.tensors().items():
        mine, theirs = cond.tensors()[name], other.tensors()[name]
        assert torch.equal(tensor[0], theirs[0]) and torch.equal(tensor[2], theirs[0])
        assert torch.equal(tensor[1], mine[1])
    put = cond.put(torch.tensor([2]), other)
    for name, tensor in put.tensors().items():
        assert torch.equal(tensor[2], other.tensors()[name][0])
        assert torch.equal(tensor[:2], cond.tensors()[name][:2])
    assert not torch.equal(put.text, cond.text)  # a copy: the original is untouched
    assert torch.equal(Conditioning.from_tensors({**cond.tensors(), "x": torch.ones(1)}).text,
                       cond.text)


def test_conditioning_to_casts_the_network_inputs_not_the_scale():
    cond = full_cond().to(dtype=torch.bfloat16)
    assert {cond.text.dtype, cond.image_latent.dtype, cond.image_tokens.dtype,
            cond.first_frames.dtype} == {torch.bfloat16}
    assert cond.guidance.dtype == torch.float32  # the CFG combine and w's embedding stay fp32
    assert Conditioning(texts(2, 0)).to("cpu").guidance is None


@pytest.mark.parametrize("make,error,match", [
    (lambda: Conditioning(torch.ones(2, 3)), ValueError,
     r"Conditioning.text must have 3 dims with batch 2 \(text's\), got \(2, 3\)"),
    (lambda: Conditioning(torch.ones(2, 3, 4), guidance=torch.ones(3)), ValueError,
     r"Conditioning.guidance must have 1 dims with batch 2 \(text's\), got \(3,\)"),
    (lambda: Conditioning(torch.ones(2, 3, 4), image_latent=torch.ones(2, 3, 4)), ValueError,
     r"Conditioning.image_latent must have 5 dims with batch 2"),
    (lambda: Conditioning([1.0]), TypeError, "Conditioning.text must be a tensor, got list"),
    (lambda: Conditioning.cat([Conditioning(torch.ones(1, 3, 4)),
                               Conditioning(torch.ones(1, 2, 4))]), ValueError,
     r"Conditioning.cat: text shapes do not match: \(1, 3, 4\) vs \(1, 2, 4\)"),
    (lambda: Conditioning.cat([Conditioning(torch.ones(1, 3, 4)), full_cond(1)]), ValueError,
     "Conditioning.cat: the two Conditionings set different slots"),
    (lambda: Conditioning(torch.ones(2, 3, 4)).expand(4), ValueError,
     "Conditioning.expand: only batch 1 expands, got batch 2 to 4"),
    (lambda: Conditioning(torch.ones(2, 3, 4)).where(torch.ones(3, dtype=torch.bool),
                                                     Conditioning(torch.ones(1, 3, 4))),
     ValueError, r"Conditioning.where: mask must be a bool \[2\], got \(3,\)"),
    (lambda: Conditioning(torch.ones(4, 3, 4)).where(torch.ones(4, dtype=torch.bool),
                                                     Conditioning(torch.ones(2, 3, 4))),
     ValueError, "Conditioning.where: other must have 1 or 4 rows, got 2"),
    (lambda: Conditioning(torch.ones(2, 3, 4))[0], TypeError,
     "Conditioning rows are picked by a slice or a 1-d tensor"),
    (lambda: Conditioning(torch.ones(2, 3, 4))[torch.ones(3, dtype=torch.bool)], ValueError,
     r"a row mask must be \[2\], got \(3,\)"),
])
def test_conditioning_refuses_bad_shapes(make, error, match):
    with pytest.raises(error, match=match):
        make()


# -- DiTDenoiser -------------------------------------------------------------------------

def test_dit_denoiser_is_the_model_at_1000_sigma_and_feeds_w_only_to_a_guidance_input():
    model = random_dit(0)
    denoiser = DiTDenoiser(model)
    assert not isinstance(denoiser, nn.Module)  # trained, saved and wrapped: the WanDiT itself
    assert denoiser.modules() == (model,)
    x, sigma = make_noise((2, 3, 4, 8, 8), 1), torch.tensor([0.9, 0.2])
    cond = Conditioning(texts(2, 1), guidance=torch.tensor([1.0, 4.0]))
    with torch.no_grad():
        assert torch.equal(denoiser(x, sigma, cond), model(x, 1000 * sigma, cond.text))
        guided = add_guidance_input(copy.deepcopy(model))
        nn.init.normal_(guided.guidance_embedding.mlp[2].weight)
        want = guided(x, 1000 * sigma, cond.text, guidance=cond.guidance)
        assert torch.equal(DiTDenoiser(guided)(x, sigma, cond), want)
        with pytest.raises(ValueError, match="takes the CFG scale as an input; set "
                                             r"Conditioning.guidance \[B\]"):
            DiTDenoiser(guided)(x, sigma, Conditioning(cond.text))


def test_denoisers_refuse_per_token_sigma_and_image_conditions_they_do_not_take():
    model = random_dit(0)
    x, cond = make_noise((2, 3, 4, 8, 8), 1), Conditioning(texts(2, 1))
    pair = ExpertPair(DiTDenoiser(model), DiTDenoiser(model), 0.5)
    for denoiser, who in ((DiTDenoiser(model), "DiTDenoiser"), (pair, "ExpertPair")):
        with pytest.raises(ValueError, match=rf"{who}: per-token sigma \(2, 8\) is not "
                                             r"supported yet; give one sigma per sample, \[2\]"):
            denoiser(x, torch.rand(2, 8), cond)
    image = Conditioning(cond.text, image_latent=torch.zeros(2, 4, 4, 8, 8))
    with pytest.raises(ValueError, match=r"no input for Conditioning.image_latent \(the mask "
                                         r"and condition latent; a text-to-video model\)"):
        DiTDenoiser(model)(x, torch.rand(2), image)
    with pytest.raises(ValueError, match=r"boundary must be a sigma in \(0, 1\], got 1.5"):
        ExpertPair(DiTDenoiser(model), DiTDenoiser(model), 1.5)


# -- DiTDenoiser, Wan2.2-TI2V image-to-video (Conditioning.first_frames) ---------------

def test_first_frames_replace_the_input_at_timestep_zero_and_move_straight_to_the_condition():
    model = random_dit(6, patch_size=(1, 2, 2), expand_timesteps=True)
    x = make_noise((3, 3, 3, 4, 6), 1)
    first = make_noise((3, 3, 1, 4, 6), 2)
    sigma = torch.tensor([0.8, 0.25, 0.0])
    cond = Conditioning(texts(3, 1), first_frames=first)
    with torch.no_grad():
        u = DiTDenoiser(model)(x, sigma, cond)
        # Written out: 2 x 3 tokens per latent frame, the first frame's at timestep 0.
        timestep = (1000 * sigma)[:, None].repeat(1, 18)
        timestep[:, :6] = 0
        model_u = model(torch.cat([first, x[:, :, 1:]], dim=2), timestep, cond.text)
    torch.testing.assert_close(u[:, :, 1:], model_u[:, :, 1:], atol=1e-6, rtol=0)
    straight = (x[:2, :, :1] - first[:2]) / sigma[:2].view(2, 1, 1, 1, 1)
    torch.testing.assert_close(u[:2, :, :1], straight, atol=1e-6, rtol=0)
    assert torch.equal(u[2, :, :1], torch.zeros_like(u[2, :, :1]))  # sigma 0: at its end
    # An Euler step to sigma 0 lands the first frame on the condition.
    torch.testing.assert_close(euler_step(x, u, sigma, 0.0)[:2, :, :1], first[:2],
                               atol=1e-6, rtol=0)
    # x's own first frame reaches no other frame's velocity.
    other = x.clone()
    other[:, :, 0] += 1.0
    with torch.no_grad():
        moved = DiTDenoiser(model)(other, sigma, cond)
    assert torch.equal(moved[:, :, 1:], u[:, :, 1:])
    # A temporal patch of 4 frames: no token is made of the first frame only, all are at t.
    coarse = random_dit(6, expand_timesteps=True)
    x = make_noise((3, 3, 8, 4, 6), 3)
    with torch.no_grad():
        got = DiTDenoiser(coarse)(x, sigma, cond)
        want = coarse(torch.cat([first, x[:, :, 1:]], dim=2), 1000 * sigma, cond.text)
    # (the per-token modulation rounds differently from the per-sample one)
    torch.testing.assert_close(got[:, :, 1:], want[:, :, 1:], atol=1e-5, rtol=1e-5)


def test_first_frames_are_refused_where_they_do_not_fit():
    x, cond = make_noise((2, 3, 3, 4, 6), 1), Conditioning(texts(2, 1))
    sigma = torch.rand(2)
    ti2v = DiTDenoiser(random_dit(0, patch_size=(1, 2, 2), expand_timesteps=True))
    wan21 = DiTDenoiser(random_dit(0, patch_size=(1, 2, 2)))
    first = dataclasses.replace(cond, first_frames=torch.zeros(2, 3, 1, 4, 6))
    with pytest.raises(ValueError, match=r"Conditioning.first_frames is Wan2.2-TI2V's condition, "
                                         "for a model with expand_timesteps; this Wan DiT has "
                                         "none"):
        wan21(x, sigma, first)
    for shape in ((2, 4, 1, 4, 6), (2, 3, 3, 4, 6), (2, 3, 1, 4, 4)):
        got = re.escape(str(shape))
        with pytest.raises(ValueError, match=r"first_frames must be \[2, 3, F, 4, 6\] with "
                                             rf"0 < F < 3 \(x's frames\), got {got}$"):
            ti2v(x, sigma, dataclasses.replace(cond, first_frames=torch.zeros(shape)))
    uncond = unconditional(first, cond[:1])
    assert uncond.first_frames is first.first_frames
    with pytest.raises(ValueError, match="the negative Conditioning carries text only"):
        unconditional(first, first[:1])


# -- CFG ---------------------------------------------------------------------------------

class Forwards:
    """Counts a model's forwards and their batch sizes."""

    def __init__(self, model: nn.Module) -> None:
        self.batches: list[int] = []
        model.register_forward_pre_hook(lambda _, args: self.batches.append(len(args[0])))


@pytest.mark.parametrize("scale", [3.5, torch.tensor([0.0, 1.0, 6.0]), None])
def test_cfg_equals_two_separate_forwards_combined_in_float64(scale):
    model = random_dit(1)
    forwards = Forwards(model)
    x, sigma = make_noise((3, 3, 4, 8, 8), 2), torch.tensor([0.95, 0.5, 0.05])
    w = torch.tensor([2.0, 0.5, 4.0])  # each trajectory's own scale, read when scale is None
    cond = Conditioning(texts(3, 2), guidance=w)
    negative = Conditioning(texts(1, 9))
    pair = CFG(DiTDenoiser(model), negative, scale)
    with torch.no_grad():
        got = pair(x, sigma, cond)
        u_cond, u_uncond = pair.branches(x, sigma, cond)
        assert forwards.batches == [6, 6]  # both branches in one forward of 2B
        reference = copy.deepcopy(model).double()
        t = 1000 * sigma.double()
        want_cond = reference(x.double(), t, cond.text.double())
        want_uncond = reference(x.double(), t, negative.text.double().expand(3, -1, -1))
    weight = (w if scale is None else torch.as_tensor(scale).expand(3)).double()
    want = want_uncond + weight.view(-1, 1, 1, 1, 1) * (want_cond - want_uncond)
    # float32 forwards; w up to 6 multiplies their rounding
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(u_cond.double(), want_cond, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(u_uncond.double(), want_uncond, rtol=1e-5, atol=1e-5)


# -- ExpertPair --------------------------------------------------------------------------

BOUNDARY = 0.5


@pytest.mark.parametrize("sigmas", [
    [0.9, 0.7, 0.6],  # all high
    [0.1, 0.3, 0.2],  # all low
    [0.9, 0.1, 0.6, 0.3],  # mixed
    [0.5, 0.4999, 0.5001],  # at the boundary: high
    [0.2],  # batch 1
])
def test_expert_pair_runs_each_sample_by_the_expert_of_its_sigma(sigmas):
    high, low = random_dit(2), random_dit(3)
    runs = {"high": Forwards(high), "low": Forwards(low)}
    pair = ExpertPair(DiTDenoiser(high), DiTDenoiser(low), BOUNDARY)
    assert pair.modules() == (high, low)
    sigma = torch.tensor(sigmas)
    batch = len(sigmas)
    x, cond = make_noise((batch, 3, 4, 8, 8), batch), Conditioning(texts(batch, batch))
    with torch.no_grad():
        got = pair(x, sigma, cond)
        want = torch.stack([
            (high if s >= BOUNDARY else low)(x[b:b + 1], 1000 * sigma[b:b + 1],
                                             cond.text[b:b + 1])[0]
            for b, s in enumerate(sigmas)])
    # batched against per-sample forwards: float32 rounding only
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    on_high = sum(s >= BOUNDARY for s in sigmas)
    # One forward per expert that has samples (plus the reference's per-sample forwards).
    assert runs["high"].batches[:1] == ([on_high] if on_high else [])
    assert runs["low"].batches[:1] == ([batch - on_high] if on_high < batch else [])


# -- acceptance: a two-expert denoiser through training, evaluation and sampling -----------

def test_a_two_expert_denoiser_trains_a_gpd_stage_is_evaluated_and_sampled():
    """Wan2.2's shape of model, two tiny DiTs switched at sigma 0.6, passes through the
    unchanged callers: OnlineDistillation (teacher a CFG pair around an expert pair, the
    student an expert pair), the evaluation's sample_set and the sampler."""
    torch.manual_seed(0)
    data = ProceduralVideos(TEXT_DIM, frames=4, size=8, seed=1)
    teacher_high, teacher_low = random_dit(4), random_dit(5)
    student_high, student_low = copy.deepcopy(teacher_high), copy.deepcopy(teacher_low)
    for net in (student_high, student_low):
        net.train()
    boundary = 0.6
    teacher = CFG(ExpertPair(DiTDenoiser(teacher_high), DiTDenoiser(teacher_low), boundary),
                  data.negative)
    student = ExpertPair(DiTDenoiser(student_high), DiTDenoiser(student_low), boundary)
    objective = OnlineDistillation(
        student=student, teacher=teacher, data=data, generator=torch.Generator().manual_seed(0),
        grid=StageGrid(4, 3.0, 2, torch.device("cpu")), guidance=GuidanceRange(2.0, 2.0),
        source="teacher", batch_size=4, freq_weight=0.0, freq_params={},
        device=torch.device("cpu"), precision="fp32")
    params = [p for net in student.modules() for p in net.parameters()]
    frozen = {name: p.clone() for name, p in teacher_high.named_parameters()}
    before = [p.clone() for p in params]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    losses = []
    for step in range(1, 5):
        optimizer.zero_grad()
        loss, _ = objective.loss(step)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert all(torch.isfinite(torch.tensor(losses)))
    for net in (student_high, student_low):  # the lanes put samples on both sides
        moved = [not torch.equal(p, b) for p, b in zip(net.parameters(), before, strict=False)]
        assert any(moved)
        before = before[len(list(net.parameters())):]
    assert all(torch.equal(p, frozen[n]) for n, p in teacher_high.named_parameters())

    for net in student.modules():
        net.eval()
    cond, _ = data.eval_prompts(3)
    noise = make_noise((3, *data.latent_shape), 7)
    sigmas = sigma_grid(4, 3.0)
    with torch.no_grad():
        want = euler_sample(student, noise, cond, sigmas)
        by_hand = noise
        for s, s_next in zip(sigmas, sigmas[1:], strict=False):
            net = student_high if float(s) >= boundary else student_low
            sigma = torch.full((3,), float(s))
            by_hand = by_hand + float(s_next - s) * net(by_hand, 1000 * sigma, cond.text)
    torch.testing.assert_close(want, by_hand, rtol=1e-5, atol=1e-5)
    videos, _ = sample_set(Candidate("two experts", student, 4, "two experts"), noise, cond,
                           3.0, 2, torch.device("cpu"), "fp32")
    # in batches of 2 against one of 3: float32 rounding only
    torch.testing.assert_close(videos, want, rtol=1e-4, atol=1e-5)
    assert torch.equal(GraphSampler(student, sigmas)(noise, cond), want)
    guided = GraphSampler(teacher, sigmas)
    assert guided.nfe() == 8
    assert torch.equal(guided(noise, Conditioning(cond.text, guidance=torch.full((3,), 2.0))),
                       euler_sample(teacher, noise, Conditioning(
                           cond.text, guidance=torch.full((3,), 2.0)), sigmas))
