"""The adaLN CPU ops (torch.ops.gpd.adaln_modulate_fwd/bwd, gated_residual_fwd/bwd): forward
against the float64 references, backward against float64 autograd of them, per sample and per
token, in the native library (csrc/adaln.cpp) and, in a subprocess, the Python references; bad
input fails alike on both."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gpd_kernels
from gpd_kernels.adaln import (
    _gated_bwd_op,
    _gated_fwd_op,
    _modulate_bwd_op,
    _modulate_fwd_op,
    gated_residual_reference,
    layernorm_modulate_reference,
)

B, L, D = 2, 5, 24
# Per sample as [B, D] and as [B, 1, D]; per token [B, L, D] (Wan2.2-TI2V).
VECTORS = {"sample": (B, D), "sample_1": (B, 1, D), "token": (B, L, D)}
# (dtype, atol, rtol) of the op against float64: float32 rounding, bf16 outputs.
DTYPES = {"float32": (torch.float32, 2e-5, 1e-5), "bfloat16": (torch.bfloat16, 5e-2, 2e-2)}


def _inputs(vector: str, dtype: torch.dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(B, L, D, generator=g) * 3 + 1).to(dtype)
    shift, scale, gate = (torch.randn(VECTORS[vector], generator=g).to(dtype) for _ in range(3))
    y, grad_out = (torch.randn(B, L, D, generator=g).to(dtype) for _ in range(2))
    return x, shift, scale, gate, y, grad_out


def _grads(fn, grad_out, *inputs):
    """float64 (output, input gradients) of ``fn`` by autograd."""
    leaves = [t.detach().double().requires_grad_(True) for t in inputs]
    out = fn(*leaves)
    out.backward(grad_out.double())
    return out.detach(), [leaf.grad for leaf in leaves]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vector", VECTORS)
def test_modulate_forward_and_backward_match_float64(vector, dtype):
    dtype, atol, rtol = DTYPES[dtype]
    x, shift, scale, _, _, grad_out = _inputs(vector, dtype, 0)
    out, mean, rstd = torch.ops.gpd.adaln_modulate_fwd(x, shift, scale, 1e-6)
    want, (want_x, want_shift, want_scale) = _grads(
        lambda *t: layernorm_modulate_reference(*t, eps=1e-6), grad_out, x, shift, scale)
    assert out.dtype == dtype and out.shape == x.shape
    torch.testing.assert_close(out.double(), want, atol=atol, rtol=rtol)
    x64 = x.double()
    torch.testing.assert_close(mean.double(), x64.mean(-1).reshape(-1), atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(rstd.double(), torch.rsqrt(x64.var(-1, unbiased=False) + 1e-6)
                               .reshape(-1), atol=1e-6, rtol=1e-5)
    grad_x, grad_shift, grad_scale = torch.ops.gpd.adaln_modulate_bwd(grad_out, x, scale, mean,
                                                                      rstd)
    assert grad_shift.shape == shift.shape and grad_scale.dtype == scale.dtype
    # the vector gradients sum L rows per sample: a bf16 result keeps ~3 digits of the sum
    for got, want_grad in ((grad_x, want_x), (grad_shift, want_shift), (grad_scale, want_scale)):
        torch.testing.assert_close(got.double(), want_grad, atol=atol * 4, rtol=rtol * 2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vector", VECTORS)
def test_gated_residual_forward_and_backward_match_float64(vector, dtype):
    dtype, atol, rtol = DTYPES[dtype]
    x, _, _, gate, y, grad_out = _inputs(vector, dtype, 1)
    out = torch.ops.gpd.gated_residual_fwd(x, y, gate)
    want, (_, want_y, want_gate) = _grads(gated_residual_reference, grad_out, x, y, gate)
    torch.testing.assert_close(out.double(), want, atol=atol, rtol=rtol)
    grad_y, grad_gate = torch.ops.gpd.gated_residual_bwd(grad_out, y, gate)
    assert grad_gate.shape == gate.shape
    torch.testing.assert_close(grad_y.double(), want_y, atol=atol, rtol=rtol)
    torch.testing.assert_close(grad_gate.double(), want_gate, atol=atol * 4, rtol=rtol * 2)


def test_per_token_vectors_differ_from_per_sample_ones_only_where_they_differ():
    """A per-token vector equal to its sample's on every token gives the per-sample result;
    changing one token's row changes that row only."""
    x, shift, scale, _, _, _ = _inputs("sample", torch.float32, 2)
    per_sample = torch.ops.gpd.adaln_modulate_fwd(x, shift, scale, 1e-6)[0]
    tokens = [v[:, None].expand(B, L, D).clone() for v in (shift, scale)]
    torch.testing.assert_close(torch.ops.gpd.adaln_modulate_fwd(x, *tokens, 1e-6)[0],
                               per_sample, atol=0, rtol=0)
    tokens[1][1, 3] += 1.0
    moved = torch.ops.gpd.adaln_modulate_fwd(x, *tokens, 1e-6)[0]
    changed = (moved != per_sample).any(-1)
    assert changed[1, 3] and changed.sum() == 1


BAD = {
    "vector": (_modulate_fwd_op, torch.ops.gpd.adaln_modulate_fwd,
               lambda: (torch.zeros(B, L, D), torch.zeros(B, 3, D), torch.zeros(B, D), 1e-6)),
    "mixed": (_modulate_fwd_op, torch.ops.gpd.adaln_modulate_fwd,
              lambda: (torch.zeros(B, L, D), torch.zeros(B, L, D), torch.zeros(B, D), 1e-6)),
    "eps": (_modulate_fwd_op, torch.ops.gpd.adaln_modulate_fwd,
            lambda: (torch.zeros(B, L, D), torch.zeros(B, D), torch.zeros(B, D), 0.0)),
    "rank": (_gated_fwd_op, torch.ops.gpd.gated_residual_fwd,
             lambda: (torch.zeros(B, D), torch.zeros(B, D), torch.zeros(B, D))),
    "dtype": (_gated_bwd_op, torch.ops.gpd.gated_residual_bwd,
              lambda: (torch.zeros(B, L, D), torch.zeros(B, L, D, dtype=torch.int64),
                       torch.zeros(B, D))),
    "stats": (_modulate_bwd_op, torch.ops.gpd.adaln_modulate_bwd,
              lambda: (torch.zeros(B, L, D), torch.zeros(B, L, D), torch.zeros(B, D),
                       torch.zeros(B * L + 1), torch.zeros(B * L))),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_fails_alike_on_both_backends(case):
    python_path, op, make = BAD[case]
    with pytest.raises((TypeError, ValueError)) as by_python:
        python_path(*make())
    with pytest.raises(type(by_python.value), match=None) as by_op:
        op(*make())
    assert str(by_op.value).splitlines()[0] == str(by_python.value), (by_op.value, by_python)


@pytest.mark.parametrize("op,make", [
    (torch.ops.gpd.adaln_modulate_fwd.default,
     lambda: (torch.randn(2, 3, 8), torch.randn(2, 3, 8), torch.randn(2, 3, 8), 1e-6)),
    (torch.ops.gpd.adaln_modulate_bwd.default,
     lambda: (torch.randn(2, 3, 8), torch.randn(2, 3, 8), torch.randn(2, 8), torch.randn(6),
              torch.rand(6) + 0.5)),
    (torch.ops.gpd.gated_residual_fwd.default,
     lambda: (torch.randn(2, 3, 8), torch.randn(2, 3, 8), torch.randn(2, 1, 8))),
    (torch.ops.gpd.gated_residual_bwd.default,
     lambda: (torch.randn(2, 3, 8), torch.randn(2, 3, 8), torch.randn(2, 3, 8))),
])
def test_opcheck(op, make):
    results = torch.library.opcheck(op, make())
    assert set(results.values()) == {"SUCCESS"}, results


@pytest.mark.slow
def test_the_python_references_pass_the_same_tests():
    if gpd_kernels.cpu_backend() != "native":
        pytest.skip("the in-process run used the references already")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "GPD_DISABLE_NATIVE": "1", "PYTHONPATH": str(root)}
    done = subprocess.run([sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider",
                           "-k", "not python_references"], env=env, capture_output=True,
                          text=True, timeout=600, cwd=root)
    assert done.returncode == 0, done.stdout[-3000:]
