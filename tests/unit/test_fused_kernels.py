"""The fused Triton layer kernels against float64 references (CPU, TRITON_INTERPRET=1)."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

triton = pytest.importorskip("triton")

from tachyon.layers import fused  # noqa: E402


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _norm64(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    x = x.double()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w.double()


@pytest.mark.parametrize("cols", [64, 96, 576])
def test_rms_norm(cols):
    x = torch.randn(7, cols)
    w = torch.rand(cols) + 0.5
    out = fused.rms_norm(x, w, 1e-6)
    assert _rel(out, _norm64(x, w, 1e-6)) < 1e-5


def test_rms_norm_with_residual():
    x, r = torch.randn(5, 128), torch.randn(5, 128)
    w = torch.rand(128) + 0.5
    out, new_r = fused.rms_norm(x, w, 1e-5, r)
    assert _rel(new_r, x.double() + r.double()) < 1e-6
    assert _rel(out, _norm64(x + r, w, 1e-5)) < 1e-5


def test_silu_and_mul():
    x = torch.randn(6, 2 * 1500)
    out = fused.silu_and_mul(x)
    g, u = x.double().chunk(2, -1)
    assert _rel(out, torch.nn.functional.silu(g) * u) < 1e-6


@pytest.mark.parametrize("with_norm", [False, True])
def test_norm_rope(with_norm):
    t, hq, hk, d = 9, 4, 2, 32
    base = torch.randn(t, (hq + 2 * hk) * d)  # a packed qkv row, as after the projection
    q = base[:, : hq * d].view(t, hq, d)
    k = base[:, hq * d:(hq + hk) * d].view(t, hk, d)
    positions = torch.randint(0, 100, (t,))
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    freqs = torch.outer(torch.arange(100, dtype=torch.float64), inv)
    cache = torch.cat([freqs.cos(), freqs.sin()], -1).float()
    qw, kw = (torch.rand(d) + 0.5, torch.rand(d) + 0.5) if with_norm else (None, None)
    q_out, k_out = fused.norm_rope(positions, q, k, cache, qw, kw, 1e-6)
    cos, sin = freqs[positions].cos().unsqueeze(1), freqs[positions].sin().unsqueeze(1)
    for x, w, out in ((q, qw, q_out), (k, kw, k_out)):
        ref = _norm64(x, w, 1e-6) if with_norm else x.double()
        x1, x2 = ref.chunk(2, -1)
        expected = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)
        assert _rel(out, expected) < 1e-5
