"""GraphSampler: eager path equals euler_sample; capture cache keyed on what a graph bakes in."""

import pytest
import torch
from cpu_graphs import emulate_cuda_graphs
from host_syncs import HostSyncs

from gpd_kernels import force_fused_dit_ops
from gpd_model import WanDiT, euler_sample, get_preset, sigma_grid
from gpd_model.graph_sampler import GraphSampler, capture_key, sample_teacher
from gpd_model.sampler import euler_loop

LATENT = (2, 3, 2, 4, 6)  # B, C, T, H, W: non-square, T=2


def _model(seed: int = 0) -> WanDiT:
    torch.manual_seed(seed)
    return WanDiT(get_preset("tiny", num_layers=1, patch_size=(1, 2, 2))).eval()


def _inputs(model: WanDiT, latent=LATENT, text_len: int = 3, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(latent, generator=gen)
    context = torch.randn(latent[0], text_len, model.cfg.text_dim, generator=gen)
    neg = torch.randn(latent[0], text_len, model.cfg.text_dim, generator=gen)
    return noise, context, neg


def test_eager_student_equals_euler_sample():
    model = _model()
    noise, context, _ = _inputs(model)
    sigmas = sigma_grid(6, 3.0)
    sampler = GraphSampler(model, sigmas)
    assert not sampler.graphs_enabled(noise.device)
    got = sampler(noise, context)
    want = euler_sample(model, noise, context, sigmas)
    assert torch.equal(got, want)
    assert sampler.nfe(guided=False) == 6 and sampler.captures_made == 0


@pytest.mark.parametrize("guidance", [4.0, torch.tensor([1.5, 6.0])])
def test_eager_cfg_equals_euler_sample(guidance):
    model = _model()
    noise, context, neg = _inputs(model, latent=(2, 3, 1, 2, 4), text_len=5)
    sigmas = sigma_grid(3, 5.0)
    want = euler_sample(model, noise, context, sigmas, neg_context=neg, guidance=guidance)
    assert torch.equal(sample_teacher(model, noise, context, neg, guidance, sigmas), want)
    assert GraphSampler(model, sigmas).nfe(guided=True) == 6


def test_capture_key_changes_with_what_a_graph_bakes_in():
    model = _model()
    noise, context, neg = _inputs(model)
    sigmas = sigma_grid(6, 3.0)
    base = capture_key(model, noise, context, sigmas)
    assert capture_key(model, noise.clone(), context.clone(), sigmas) == base  # values only
    assert capture_key(model, noise[:1], context[:1], sigmas) != base  # batch
    assert capture_key(model, torch.randn(2, 3, 2, 4, 8), context, sigmas) != base  # width
    assert capture_key(model, noise, torch.randn(2, 4, 32), sigmas) != base  # text length
    assert capture_key(model, noise.double(), context, sigmas) != base  # dtype
    assert capture_key(model, noise, context, sigma_grid(3, 3.0)) != base  # steps
    assert capture_key(model, noise, context, sigmas, neg_context=neg) != base  # CFG
    assert capture_key(model.double(), noise, context, sigmas) != base  # re-allocated weights


def test_cache_recaptures_on_shape_change_and_replays_fresh_inputs(monkeypatch):
    emulate_cuda_graphs(monkeypatch)
    model = _model()
    sigmas = sigma_grid(4, 3.0)
    sampler = GraphSampler(model, sigmas, max_graphs=2)
    first, context, _ = _inputs(model, seed=1)
    second, _, _ = _inputs(model, seed=2)
    out1 = sampler(first, context)
    out2 = sampler(second, context)  # same shapes, new values: replay, no capture
    assert sampler.captures_made == 1
    assert torch.equal(out1, euler_sample(model, first, context, sigmas))
    assert torch.equal(out2, euler_sample(model, second, context, sigmas))
    assert not torch.equal(out1, out2)  # the returned tensor is not the static buffer
    small, small_ctx, _ = _inputs(model, latent=(1, 3, 1, 2, 2), seed=3)
    assert torch.equal(sampler(small, small_ctx), euler_sample(model, small, small_ctx, sigmas))
    assert sampler.captures_made == 2
    sampler(first, context)  # still cached (max_graphs=2)
    assert sampler.captures_made == 2
    wide, wide_ctx, _ = _inputs(model, latent=(1, 3, 1, 2, 4), seed=4)
    sampler(wide, wide_ctx)  # evicts the least recently used (the small one)
    sampler(small, small_ctx)
    assert sampler.captures_made == 4


@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda m, n, c, g: GraphSampler(m, torch.tensor([1.0])), ValueError,
         r"sigmas must be a 1-D tensor of K\+1 >= 2 grid points, got \(1,\)"),
        (lambda m, n, c, g: GraphSampler("model", torch.ones(3)), TypeError,
         "model must be an nn.Module, got str"),
        (lambda m, n, c, g: GraphSampler(m, torch.ones(3), max_graphs=0), ValueError,
         "max_graphs must be >= 1, got 0"),
        (lambda m, n, c, g: g(n, c, neg_context=c), ValueError,
         "neg_context and guidance go together"),
        (lambda m, n, c, g: g(n, c[:1]), ValueError,
         r"context must be \[2, L, text_dim\] \(batch of noise\), got \(1, 3, 32\)"),
        (lambda m, n, c, g: g(n[0], c), ValueError, r"noise must be \[B, C, T, H, W\]"),
        (lambda m, n, c, g: g(n, c, c[:, :2], 3.0), ValueError,
         r"neg_context must match context \(\(2, 3, 32\) on cpu\), got \(2, 2, 32\)"),
        (lambda m, n, c, g: g(n, c, c, torch.ones(3)), ValueError,
         r"guidance must be a float or a \[2\] tensor, got shape \(3,\)"),
    ],
)
def test_bad_input_messages(call, error, match):
    model = _model()
    noise, context, _ = _inputs(model)
    sampler = GraphSampler(model, sigma_grid(2, 3.0))
    with pytest.raises(error, match=match):
        call(model, noise, context, sampler)


needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU (none on this machine)"
)


@needs_cuda
def test_graph_replay_equals_eager_and_recaptures_on_cuda():
    model = _model().cuda()
    sigmas = sigma_grid(6, 3.0)
    graph = GraphSampler(model, sigmas)
    eager = GraphSampler(model, sigmas, use_graphs=False)
    for latent, text_len, seed in [(LATENT, 3, 1), (LATENT, 3, 2), ((1, 3, 3, 6, 4), 5, 3)]:
        noise, context, neg = (t.cuda() for t in _inputs(model, latent, text_len, seed))
        torch.testing.assert_close(graph(noise, context), eager(noise, context),
                                   atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(graph(noise, context, neg, 3.0),
                                   eager(noise, context, neg, 3.0), atol=1e-5, rtol=1e-5)
    # Two shapes x (student, CFG) = four captures; the second seed replayed.
    assert graph.captures_made == 4


@pytest.mark.parametrize("guided", [False, True])
def test_the_captured_loop_reads_nothing_back_and_draws_nothing(guided):
    """What GraphSampler captures (euler_loop on the model's fused path, sigmas as a device
    tensor) has no host sync and no random draw, checked by dispatch on the CPU: a capture
    would fail on the first and replay stale numbers for the second."""
    model = _model()
    noise, context, neg = _inputs(model)
    grid = GraphSampler(model, sigma_grid(4, 3.0))._grid(noise.shape[0], noise.device)
    guidance = torch.tensor([1.5, 6.0]) if guided else None
    with HostSyncs() as mode, force_fused_dit_ops():
        euler_loop(model, noise, context, grid, neg if guided else None, guidance)
    assert mode.found == []


def test_emulated_cfg_capture_replays_fresh_guidance_and_contexts(monkeypatch):
    emulate_cuda_graphs(monkeypatch)
    model = _model()
    sigmas = sigma_grid(3, 5.0)
    sampler = GraphSampler(model, sigmas, max_graphs=1)
    for seed, guidance in ((1, torch.tensor([1.5, 6.0])), (2, 3.0)):
        noise, context, neg = _inputs(model, seed=seed)
        got = sampler(noise, context, neg, guidance)
        assert torch.equal(got, euler_sample(model, noise, context, sigmas, neg_context=neg,
                                             guidance=guidance))
    assert sampler.captures_made == 1
