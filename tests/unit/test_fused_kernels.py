"""The fused Triton layer kernels against float64 references (CPU, TRITON_INTERPRET=1), in
every dtype a model runs in. Half-precision results carry a rounding or two of that dtype
(the interpreter rounds toward zero where a GPU rounds to nearest), so their tolerance is a
few units of its last place; a kernel doing half-precision arithmetic on raw bits, as the
interpreter would for bfloat16, is off by orders of magnitude."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

triton = pytest.importorskip("triton")

from tachyon.layers import fused  # noqa: E402

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Relative error (norm of the difference over norm of the reference) allowed per dtype:
# fp32 sees only summation order; fp16 (2**-11) and bf16 (2**-8) up to two roundings.
REL_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _norm64(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    x = x.double()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w.double()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cols", [64, 96, 576])
def test_rms_norm(cols: int, dtype: torch.dtype) -> None:
    x = torch.randn(7, cols).to(dtype)
    w = (torch.rand(cols) + 0.5).to(dtype)
    out = fused.rms_norm(x, w, 1e-6)
    assert out.dtype == dtype
    assert _rel(out, _norm64(x, w, 1e-6)) < REL_TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_with_residual(dtype: torch.dtype) -> None:
    x, r = torch.randn(5, 128).to(dtype), torch.randn(5, 128).to(dtype)
    w = (torch.rand(128) + 0.5).to(dtype)
    out, new_r = fused.rms_norm(x, w, 1e-5, r)
    total = x.double() + r.double()
    assert _rel(new_r, total) < REL_TOL[dtype] / 2  # one rounding
    assert _rel(out, _norm64(total, w, 1e-5)) < REL_TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul(dtype: torch.dtype) -> None:
    x = torch.randn(6, 2 * 1500).to(dtype)
    out = fused.silu_and_mul(x)
    g, u = x.double().chunk(2, -1)
    assert out.dtype == dtype
    assert _rel(out, torch.nn.functional.silu(g) * u) < max(REL_TOL[dtype], 1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_norm", [False, True])
def test_norm_rope(with_norm: bool, dtype: torch.dtype) -> None:
    t, hq, hk, d = 9, 4, 2, 32
    base = torch.randn(t, (hq + 2 * hk) * d).to(dtype)  # a packed qkv row, as after the projection
    q = base[:, : hq * d].view(t, hq, d)
    k = base[:, hq * d:(hq + hk) * d].view(t, hk, d)
    positions = torch.randint(0, 100, (t,))
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    freqs = torch.outer(torch.arange(100, dtype=torch.float64), inv)
    cache = torch.cat([freqs.cos(), freqs.sin()], -1).float()
    qw, kw = ((torch.rand(d) + 0.5).to(dtype), (torch.rand(d) + 0.5).to(dtype)) if with_norm \
        else (None, None)
    q_out, k_out = fused.norm_rope(positions, q, k, cache, qw, kw, 1e-6)
    cos, sin = freqs[positions].cos().unsqueeze(1), freqs[positions].sin().unsqueeze(1)
    for x, w, out in ((q, qw, q_out), (k, kw, k_out)):
        ref = _norm64(x, w, 1e-6) if with_norm else x.double()
        x1, x2 = ref.chunk(2, -1)
        expected = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)
        assert out.dtype == dtype
        assert _rel(out, expected) < REL_TOL[dtype]
