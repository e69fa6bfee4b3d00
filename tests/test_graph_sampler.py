"""GraphSampler: eager path equals euler_sample; capture cache keyed on what a graph bakes in."""

import pytest
import torch
from cpu_graphs import emulate_cuda_graphs
from host_syncs import HostSyncs

from gpd_kernels import force_fused_dit_ops
from gpd_model import CFG, Conditioning, DiTDenoiser, WanDiT, euler_sample, get_preset, sigma_grid
from gpd_model.graph_sampler import GraphSampler, capture_key
from gpd_model.sampler import euler_loop

LATENT = (2, 3, 2, 4, 6)  # B, C, T, H, W: non-square, T=2


def _model(seed: int = 0) -> WanDiT:
    torch.manual_seed(seed)
    return WanDiT(get_preset("tiny", num_layers=1, patch_size=(1, 2, 2))).eval()


def _inputs(model: WanDiT, latent=LATENT, text_len: int = 3, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(latent, generator=gen)
    context = torch.randn(latent[0], text_len, model.cfg.text_dim, generator=gen)
    neg = torch.randn(1, text_len, model.cfg.text_dim, generator=gen)
    return noise, Conditioning(context), Conditioning(neg)


def test_eager_student_equals_euler_sample():
    student = DiTDenoiser(_model())
    noise, cond, _ = _inputs(student.model)
    sigmas = sigma_grid(6, 3.0)
    sampler = GraphSampler(student, sigmas)
    assert not sampler.graphs_enabled(noise.device)
    got = sampler(noise, cond)
    want = euler_sample(student, noise, cond, sigmas)
    assert torch.equal(got, want)
    assert sampler.nfe() == 6 and sampler.captures_made == 0


@pytest.mark.parametrize("guidance", [4.0, torch.tensor([1.5, 6.0])])
def test_eager_cfg_equals_euler_sample(guidance):
    model = _model()
    noise, cond, neg = _inputs(model, latent=(2, 3, 1, 2, 4), text_len=5)
    sigmas = sigma_grid(3, 5.0)
    teacher = CFG(DiTDenoiser(model), neg, guidance)
    want = euler_sample(teacher, noise, cond, sigmas)
    assert torch.equal(GraphSampler(teacher, sigmas)(noise, cond), want)
    assert GraphSampler(teacher, sigmas).nfe() == 6


def test_capture_key_changes_with_what_a_graph_bakes_in():
    model = _model()
    student = DiTDenoiser(model)
    noise, cond, _ = _inputs(model)
    sigmas = sigma_grid(6, 3.0)
    base = capture_key(student, noise, cond, sigmas)
    values = Conditioning(cond.text.clone())
    assert capture_key(student, noise.clone(), values, sigmas) == base  # values only
    assert capture_key(student, noise[:1], cond[:1], sigmas) != base  # batch
    assert capture_key(student, torch.randn(2, 3, 2, 4, 8), cond, sigmas) != base  # width
    assert capture_key(student, noise, Conditioning(torch.randn(2, 4, 32)), sigmas) != base
    assert capture_key(student, noise.double(), cond, sigmas) != base  # dtype
    assert capture_key(student, noise, cond, sigma_grid(3, 3.0)) != base  # steps
    with_w = Conditioning(cond.text, guidance=torch.ones(2))
    assert capture_key(student, noise, with_w, sigmas) != base  # a slot more
    assert capture_key(DiTDenoiser(model.double()), noise, cond, sigmas) != base  # re-allocated


def test_cache_recaptures_on_shape_change_and_replays_fresh_inputs(monkeypatch):
    emulate_cuda_graphs(monkeypatch)
    model = DiTDenoiser(_model())
    sigmas = sigma_grid(4, 3.0)
    sampler = GraphSampler(model, sigmas, max_graphs=2)
    first, context, _ = _inputs(model.model, seed=1)
    second, _, _ = _inputs(model.model, seed=2)
    out1 = sampler(first, context)
    out2 = sampler(second, context)  # same shapes, new values: replay, no capture
    assert sampler.captures_made == 1
    assert torch.equal(out1, euler_sample(model, first, context, sigmas))
    assert torch.equal(out2, euler_sample(model, second, context, sigmas))
    assert not torch.equal(out1, out2)  # the returned tensor is not the static buffer
    small, small_ctx, _ = _inputs(model.model, latent=(1, 3, 1, 2, 2), seed=3)
    assert torch.equal(sampler(small, small_ctx), euler_sample(model, small, small_ctx, sigmas))
    assert sampler.captures_made == 2
    sampler(first, context)  # still cached (max_graphs=2)
    assert sampler.captures_made == 2
    wide, wide_ctx, _ = _inputs(model.model, latent=(1, 3, 1, 2, 4), seed=4)
    sampler(wide, wide_ctx)  # evicts the least recently used (the small one)
    sampler(small, small_ctx)
    assert sampler.captures_made == 4


@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda m, n, c, g: GraphSampler(m, torch.tensor([1.0])), ValueError,
         r"sigmas must be a 1-D tensor of K\+1 >= 2 grid points, got \(1,\)"),
        (lambda m, n, c, g: GraphSampler(m.model, torch.ones(3)), TypeError,
         r"denoiser must be a gpd_model.Denoiser \(a network goes in DiTDenoiser\(model\)\), "
         "got WanDiT"),
        (lambda m, n, c, g: GraphSampler(m, torch.ones(3), max_graphs=0), ValueError,
         "max_graphs must be >= 1, got 0"),
        (lambda m, n, c, g: g(n, c.text), ValueError,
         "cond must be a Conditioning of batch 2 \\(noise's\\), got Tensor"),
        (lambda m, n, c, g: g(n, c[:1]), ValueError,
         r"cond must be a Conditioning of batch 2 \(noise's\), got 1"),
        (lambda m, n, c, g: g(n[0], c), ValueError, r"noise must be \[B, C, T, H, W\]"),
        (lambda m, n, c, g: GraphSampler(CFG(m, c[:1], torch.ones(3)), torch.ones(3))(n, c),
         ValueError, r"CFG scale must be a float or a \[2\] tensor, got shape \(3,\)"),
    ],
)
def test_bad_input_messages(call, error, match):
    model = DiTDenoiser(_model())
    noise, cond, _ = _inputs(model.model)
    sampler = GraphSampler(model, sigma_grid(2, 3.0))
    with pytest.raises(error, match=match):
        call(model, noise, cond, sampler)


needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU (none on this machine)"
)


@needs_cuda
def test_graph_replay_equals_eager_and_recaptures_on_cuda():
    model = _model().cuda()
    sigmas = sigma_grid(6, 3.0)
    student = DiTDenoiser(model)
    graph = GraphSampler(student, sigmas)
    eager = GraphSampler(student, sigmas, use_graphs=False)
    for latent, text_len, seed in [(LATENT, 3, 1), (LATENT, 3, 2), ((1, 3, 3, 6, 4), 5, 3)]:
        noise, cond, neg = _inputs(model, latent, text_len, seed)
        noise, cond, neg = noise.cuda(), cond.to("cuda"), neg.to("cuda")
        torch.testing.assert_close(graph(noise, cond), eager(noise, cond), atol=1e-5, rtol=1e-5)
        teacher = CFG(student, neg)  # w per call, from cond.guidance
        guided = Conditioning(cond.text, guidance=torch.full((len(noise),), 3.0, device="cuda"))
        graph_cfg = GraphSampler(teacher, sigmas)
        torch.testing.assert_close(graph_cfg(noise, guided),
                                   GraphSampler(teacher, sigmas, use_graphs=False)(noise, guided),
                                   atol=1e-5, rtol=1e-5)
    # Two shapes of the student: two captures; the second seed replayed.
    assert graph.captures_made == 2


@pytest.mark.parametrize("guided", [False, True])
def test_the_captured_loop_reads_nothing_back_and_draws_nothing(guided):
    """What GraphSampler captures (euler_loop on the model's fused path, sigmas as a device
    tensor) has no host sync and no random draw, checked by dispatch on the CPU: a capture
    would fail on the first and replay stale numbers for the second."""
    student = DiTDenoiser(_model())
    noise, cond, neg = _inputs(student.model)
    denoiser = CFG(student, neg, torch.tensor([1.5, 6.0])) if guided else student
    grid = GraphSampler(denoiser, sigma_grid(4, 3.0))._grid(noise.shape[0], noise.device)
    with HostSyncs() as mode, force_fused_dit_ops():
        euler_loop(denoiser, noise, cond, grid)
    assert mode.found == []


def test_emulated_cfg_capture_replays_fresh_guidance_and_contexts(monkeypatch):
    emulate_cuda_graphs(monkeypatch)
    model = _model()
    sigmas = sigma_grid(3, 5.0)
    _, _, neg = _inputs(model)
    teacher = CFG(DiTDenoiser(model), neg)  # each trajectory's w from cond.guidance
    sampler = GraphSampler(teacher, sigmas, max_graphs=1)
    for seed, guidance in ((1, torch.tensor([1.5, 6.0])), (2, torch.tensor([3.0, 3.0]))):
        noise, cond, _ = _inputs(model, seed=seed)
        cond = Conditioning(cond.text, guidance=guidance)
        assert torch.equal(sampler(noise, cond), euler_sample(teacher, noise, cond, sigmas))
    assert sampler.captures_made == 1
