"""The skinny decode GEMM against float64 references (CPU, TRITON_INTERPRET=1).

Configs are chosen for the interpreter (few programs, few K tiles) but keep ragged tails: N
and K are never multiples of the tile, and some configs split K into uneven slices.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import random

import pytest
import torch

triton = pytest.importorskip("triton")

from tachyon.layers import linear as linear_mod  # noqa: E402
from tachyon.layers.activation import SiluAndMul  # noqa: E402
from tachyon.layers.fused import silu_and_mul_ref  # noqa: E402
from tachyon.layers.kernels.skinny_gemm import (  # noqa: E402
    Prologue,
    SkinnyConfig,
    SkinnyPath,
    default_config,
    shape_class,
    skinny_gemm,
    skinny_gemm_rms_norm,
)
from tachyon.layers.linear import MergedColumnParallelLinear, RowParallelLinear, linear  # noqa: E402
from tachyon.layers.norm import RMSNorm  # noqa: E402

# (N, K) pairs off every tile: N=1000 leaves a partial last N tile, K=72 a partial K tile;
# N=130, K=1040 splits K unevenly (see test_k_slices).
RAGGED_SHAPES = [(1000, 72), (130, 1040)]
FMA_CONFIGS = [  # paired with RAGGED_SHAPES by index: few programs for the interpreter
    SkinnyConfig(SkinnyPath.FMA, block_n=128, block_k=512, split_k=1),
    SkinnyConfig(SkinnyPath.FMA, block_n=64, block_k=256, split_k=2),
]
DOT_CONFIGS = [
    SkinnyConfig(SkinnyPath.DOT, block_n=64, block_k=256, split_k=1),
    SkinnyConfig(SkinnyPath.DOT_SWAP, block_n=64, block_k=256, split_k=4),
]


def _inputs(rng: random.Random, m: int, n: int, k: int, dtype: torch.dtype = torch.float32,
            bias: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    gen = torch.Generator().manual_seed(rng.randrange(1 << 31))
    x = torch.randn(m, k, generator=gen).to(dtype)
    # Rows of W with different scales: a mixed-up output feature changes the answer.
    w = (torch.randn(n, k, generator=gen) * torch.rand(n, 1, generator=gen) * 2).to(dtype)
    b = torch.randn(n, generator=gen).to(dtype) if bias else None
    return x, w, b


def _ref(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    y = x.double() @ w.double().T
    return y if b is None else y + b.double()


def _norm64(h: torch.Tensor, g: torch.Tensor, eps: float) -> torch.Tensor:
    h = h.double()
    return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * g.double()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b).norm() / b.norm()).item()


@pytest.mark.parametrize("m", range(1, 17))
def test_matches_float64(m: int, rng: random.Random) -> None:
    # Every row count on CUDA cores and on one MMA path, with one ragged shape (both cycled).
    n, k = RAGGED_SHAPES[m % len(RAGGED_SHAPES)]
    x, w, b = _inputs(rng, m, n, k, bias=m % 2 == 0)
    ref = _ref(x, w, b)
    for config in (FMA_CONFIGS[m % len(FMA_CONFIGS)], DOT_CONFIGS[m % len(DOT_CONFIGS)]):
        out = skinny_gemm(x, w, b, config=config)
        assert out.shape == (m, n) and out.dtype == x.dtype
        assert _rel(out, ref) < 1e-6, (config, n, k)


@pytest.mark.parametrize(("path", "dtype"), [
    *((p, torch.float16) for p in SkinnyPath),
    # The interpreter's bf16 dot is wrong (triton-lang/triton#11584): bf16 on CUDA cores only.
    (SkinnyPath.FMA, torch.bfloat16),
])
def test_half_precision_rounds_once(path: SkinnyPath, dtype: torch.dtype,
                                    rng: random.Random) -> None:
    # fp32 accumulation, one rounding at the end: within an ulp of the exact result (half
    # precision accumulation over K=1040 would be off by many).
    m, n, k = 5, 130, 1040
    x, w, b = _inputs(rng, m, n, k, dtype=dtype)
    config = SkinnyConfig(path, block_n=64, block_k=256, split_k=2)
    out = skinny_gemm(x, w, b, config=config)
    ref = _ref(x, w, b)
    ulp = torch.finfo(dtype).eps
    err = (out.double() - ref).abs()
    assert out.dtype == dtype and bool((err <= ref.abs() * ulp + 1e-3).all())


def test_bf16_prologues_on_cuda_cores(rng: random.Random) -> None:
    # bf16 prologues compute in fp32 with explicit roundings: under the interpreter, whose bf16
    # arithmetic works on raw bits (results off by orders of magnitude), they must still be
    # right. Its fp32->bf16 conversion truncates instead of rounding, which leaves ~1e-2.
    m, n, k, eps = 3, 70, 200, 1e-6
    gate_up, w, _ = _inputs(rng, m, n, 2 * k, dtype=torch.bfloat16, bias=False)
    w = (w[:, :k] / k**0.5).contiguous()
    config = SkinnyConfig(SkinnyPath.FMA, block_n=64, block_k=256)
    out = skinny_gemm(gate_up, w, config=config, prologue=Prologue.SILU_MUL)
    assert _rel(out, silu_and_mul_ref(gate_up).double() @ w.double().T) < 3e-2
    x, residual = gate_up[:, :k].contiguous(), gate_up[:, k:].contiguous()
    g = (torch.rand(k) + 0.5).to(torch.bfloat16)
    out, new_res = skinny_gemm_rms_norm(x, g, eps, w, None, residual, config=config)
    h = x.double() + residual.double()
    assert _rel(new_res, h) < 3e-2
    assert _rel(out, _ref(_norm64(h, g, eps), w, None)) < 3e-2


def test_leading_dims_and_default_config(rng: random.Random) -> None:
    # [2, 3, K] activations, the default config (split K as on a small GPU).
    x, w, b = _inputs(rng, 6, 130, 1040)
    out = skinny_gemm(x.view(2, 3, -1), w, b)
    assert out.shape == (2, 3, 130)
    assert _rel(out.view(6, 130), _ref(x, w, b)) < 1e-6


@pytest.mark.parametrize("path", [SkinnyPath.FMA, SkinnyPath.DOT_SWAP])
def test_silu_mul_prologue(path: SkinnyPath, rng: random.Random) -> None:
    m, n, k = 3, 70, 200
    gate_up, w, _ = _inputs(rng, m, n, 2 * k, bias=False)
    w = w[:, :k].contiguous()
    config = SkinnyConfig(path, block_n=64, block_k=64, split_k=2)
    out = skinny_gemm(gate_up, w, config=config, prologue=Prologue.SILU_MUL)
    gate, up = gate_up.double().chunk(2, dim=-1)
    assert _rel(out, (torch.nn.functional.silu(gate) * up) @ w.double().T) < 1e-6


@pytest.mark.parametrize(("path", "split_k", "with_residual"), [
    (SkinnyPath.FMA, 1, True), (SkinnyPath.FMA, 4, False),
    (SkinnyPath.DOT, 2, True), (SkinnyPath.DOT_SWAP, 1, False),
])
def test_rms_norm_prologue(path: SkinnyPath, split_k: int, with_residual: bool,
                           rng: random.Random) -> None:
    # y = rms_norm(x + residual) @ W^T + b, and the new residual x + residual; the norm
    # spans the whole row even when K is split (K=1040: slices of 512, 512 and 16).
    m, n, k, eps = 5, 130, 1040, 1e-5
    x, w, b = _inputs(rng, m, n, k)
    gen = torch.Generator().manual_seed(rng.randrange(1 << 31))
    residual = torch.randn(m, k, generator=gen) * 3 if with_residual else None
    g = torch.rand(k, generator=gen) + 0.5
    config = SkinnyConfig(path, block_n=64, block_k=256, split_k=split_k)
    out, new_res = skinny_gemm_rms_norm(x, g, eps, w, b, residual, config=config)
    h = x.double() + (residual.double() if with_residual else 0)
    assert _rel(new_res, h) < 1e-7
    assert _rel(out, _ref(_norm64(h, g, eps), w, b)) < 1e-5, (path, split_k)


def test_k_slices() -> None:
    # K=1040 in 256-wide tiles split 4 ways: ceil(260 / 256) = 2 tiles = 512 per slice, so
    # 3 slices (512, 512, 16), not 4.
    config = SkinnyConfig(SkinnyPath.FMA, block_n=32, block_k=256, split_k=4)
    assert config.k_per_split(1040) == 512 and config.num_splits(1040) == 3
    assert config.num_splits(72) == 1


def test_shape_class() -> None:
    assert shape_class(1, 151936, 1024) == (1, 17, 10)  # LM head, clamped to 2**17
    assert shape_class(3, 4096, 3072) == (4, 12, 12)
    assert shape_class(16, 1000, 72) == (16, 10, 10)  # small shapes clamp up
    assert shape_class(9, 6144, 12288) == (16, 13, 14)


def test_default_config_fills_the_grid() -> None:
    # On the interpreter's stand-in 8 SMs: FMA aims at 4 programs per SM = 32. N=1024 in
    # 8-row tiles is 128 programs already; N=64 is 8, so K is split 4 ways.
    assert default_config(1, 1024, 1024).split_k == 1
    small = default_config(1, 64, 4096)
    assert small.path == SkinnyPath.FMA and small.split_k == 4
    assert default_config(16, 1024, 1024).path == SkinnyPath.DOT


def test_dispatcher_leaves_cpu_to_torch(rng: random.Random) -> None:
    x, w, _ = _inputs(rng, 2, 33, 20)
    assert linear_mod.skinny_config(x, w) is None


@pytest.fixture
def skinny_on_cpu(monkeypatch: pytest.MonkeyPatch) -> list[SkinnyConfig]:
    """Let the layers take the skinny path on CPU (interpreter), as CUDA does at decode sizes;
    returns the list of configs the dispatcher handed out."""
    config = SkinnyConfig(SkinnyPath.FMA, block_n=64, block_k=256, split_k=2)
    handed: list[SkinnyConfig] = []

    def fake_config(x: torch.Tensor, w: torch.Tensor) -> SkinnyConfig:
        handed.append(config)
        return config

    monkeypatch.setattr(linear_mod, "skinny_config", fake_config)
    return handed


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("with_residual", [False, True])
def test_mlp_with_fused_prologues(fused: bool, with_residual: bool, rng: random.Random,
                                  request: pytest.FixtureRequest) -> None:
    # norm -> gate_up -> silu_and_mul -> down through the layer methods, fused (kernel
    # prologues) and unfused (the modules), both against float64.
    handed = request.getfixturevalue("skinny_on_cpu") if fused else []
    m, hidden, inter, eps = 3, 72, 40, 1e-6
    gen = torch.Generator().manual_seed(rng.randrange(1 << 31))
    gate_up = MergedColumnParallelLinear(hidden, [inter, inter])
    down = RowParallelLinear(inter, hidden)
    norm = RMSNorm(hidden, eps)
    for p in (gate_up.weight, down.weight):
        p.data.copy_(torch.randn(p.shape, generator=gen) / p.shape[1] ** 0.5)
    norm.weight.data.copy_(torch.rand(hidden, generator=gen) + 0.5)
    x = torch.randn(m, hidden, generator=gen)
    residual = torch.randn(m, hidden, generator=gen) if with_residual else None
    y, new_res = gate_up.forward_after_norm(x, residual, norm)
    out = down.forward_after_silu_mul(y, SiluAndMul())
    assert len(handed) == (2 if fused else 0)
    h = x.double() + (residual.double() if with_residual else 0)
    y_ref = _norm64(h, norm.weight, eps) @ gate_up.weight.double().T
    gate, up = y.double().chunk(2, dim=-1)
    assert _rel(new_res, h) < 1e-7
    assert _rel(y, y_ref) < 1e-5
    assert _rel(out, (torch.nn.functional.silu(gate) * up) @ down.weight.double().T) < 1e-5


def test_linear_routes_to_the_kernel(skinny_on_cpu: list[SkinnyConfig],
                                     rng: random.Random) -> None:
    x, w, b = _inputs(rng, 2, 33, 20)
    assert _rel(linear(x, w, b), _ref(x, w, b)) < 1e-6
    assert len(skinny_on_cpu) == 1


# Compiles the kernel for Hopper (sm_90) without a GPU: the interpreter checks the arithmetic,
# this checks that Triton lowers every path, and that it lowers it as designed (16-byte W
# loads on CUDA cores, mma.sync for DOT, wgmma for DOT_SWAP). Runs in a fresh interpreter:
# under TRITON_INTERPRET the kernels are not compilable JIT functions.
_HOPPER_COMPILE = r"""
import re, sys
try:
    from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
except ImportError:
    sys.exit(77)
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from tachyon.layers.kernels import skinny_gemm as sg

kernel = sg._skinny_gemm_kernel
ptr_dtypes = {"x_ptr": "*bf16", "w_ptr": "*bf16", "b_ptr": "*bf16", "out_ptr": "*bf16",
              "ws_ptr": "*fp32", "res_ptr": "*bf16", "res_out_ptr": "*bf16", "g_ptr": "*bf16",
              "ss_ptr": "*fp32"}
ints = ["M", "N", "K", "k_per_split", "stride_xm", "stride_wn", "stride_om"]
signature = {a: ptr_dtypes.get(a, "i32" if a in ints else "constexpr") for a in kernel.arg_names}
signature["eps"] = "fp32"
# The JIT's specialization on real shapes: 16-aligned pointers, sizes and strides (not M).
aligned = [a for a in kernel.arg_names if a in ptr_dtypes or (a in ints and a != "M")]
attrs = {(kernel.arg_names.index(a),): [["tt.divisibility", 16]] for a in aligned}
cases = [  # path, prologue, residual, split, block_m, block_n, block_k, warps, stages, expect
    (0, 0, False, False, 1, 8, 1024, 4, 1, r"ld\.global(\.nc)?\.v4"),
    (0, 1, False, True, 8, 4, 512, 2, 1, r"ld\.global(\.nc)?\.v4"),
    (1, 0, False, True, 16, 64, 128, 4, 4, r"mma\.sync"),
    (2, 2, True, True, 16, 64, 256, 4, 3, r"wgmma"),
    (1, 2, False, False, 16, 32, 256, 4, 3, r"mma\.sync"),
]
for path, pro, res, split, bm, bn, bk, warps, stages, expect in cases:
    constexprs = dict(PATH=path, PROLOGUE=pro, HAS_RES=res, SPLIT=split, HAS_BIAS=True,
                      BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, DOT_PRECISION="tf32")
    compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs),
                              target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": warps, "num_stages": stages})
    if not re.search(expect, compiled.asm["ptx"]):
        sys.exit(f"path {path} prologue {pro}: no {expect!r} in the PTX")
"""


def test_compiles_for_hopper() -> None:
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    src = str(Path(__file__).resolve().parents[2] / "src")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [src, env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, "-c", _HOPPER_COMPILE], env=env,
                          capture_output=True, text=True, timeout=600)
    if proc.returncode == 77:
        pytest.skip("this triton has no NVIDIA backend")
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_tuned_table_is_well_formed() -> None:
    # The table is pasted from a benchmark run: every entry must name a launchable config.
    from tachyon.layers.kernels.skinny_gemm_table import TUNED_CONFIGS

    for (m_bucket, n_log2, k_log2), entry in TUNED_CONFIGS.items():
        assert m_bucket in (1, 2, 4, 8, 16) and 10 <= n_log2 <= 17 and 10 <= k_log2 <= 14
        if entry is None:
            continue
        cfg = SkinnyConfig.from_tuple(entry)
        for tile in (cfg.block_n, cfg.block_k, cfg.num_warps):  # tl.arange needs powers of 2
            assert tile > 0 and tile & (tile - 1) == 0, entry
        assert cfg.split_k >= 1 and cfg.num_stages >= 1, entry
