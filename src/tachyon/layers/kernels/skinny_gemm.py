"""Skinny GEMM for decode: ``y = x W^T (+ b)`` for at most 16 rows of activations.

At decode a linear layer multiplies a few rows of activations by a weight ``W`` ``[N, K]``
(row-major, as ``nn.Linear`` holds it) that is read exactly once: the GEMM is a stream of the
weight, and its speed is the bandwidth at which it reads W. cuBLAS picks tiles made for large
M and streams at ~1.3 TB/s of the H200's 4.26 at M=1. Here every program owns ``block_n``
output features and one slice of K, reads its ``[block_n, K / split_k]`` slab of W once along
the rows (contiguous in K, so loads are wide and coalesced) and keeps fp32 accumulators.

Three ways to do the multiply-adds (``SkinnyPath``), chosen per shape by the config table:

- ``FMA``: CUDA-core multiply and a reduction along K, row by row of x. No padding, no shared
  memory; best while the rows are few (at 16 rows the FMAs would outrun the loads).
- ``DOT``: ``tl.dot(x, W^T)`` with the rows padded to 16 (the smallest MMA tile).
- ``DOT_SWAP``: ``tl.dot(W, x^T)``: output features are the MMA's M dimension, so a
  ``block_n`` of 64 or more can use Hopper's wgmma while x is the narrow N side.

Split-K: with few output features there are too few programs to keep 132 SMs streaming, so
K is cut into ``split_k`` slices; each writes an fp32 partial ``[split, M, N]`` and a second
small kernel sums them in a fixed order (deterministic, no atomics, no zero-fill), adds the
bias and rounds to the output dtype.

Prologues (``Prologue``) fold the small op before a projection into its load of x, one
launch fewer each:

- ``SILU_MUL`` reads the packed gate_up output ``[M, 2K]`` and feeds ``silu(gate) * up``,
  rounded as ``tachyon.layers.fused.silu_and_mul`` rounds it (down projection).
- ``RMS_NORM`` (``skinny_gemm_rms_norm``) adds the residual, writes the new residual from the
  first N tile's programs, feeds ``h * g`` (g the norm's weight) and accumulates each row's
  sum of squares on the way; every program reads all of its K range anyway, so 1/rms is known
  at the end and scales the accumulator (with split-K, the reduction sums the partial sums of
  squares first). qkv and gate_up projections.

CUDA-graph contract: the grid, every constexpr and the workspace size are functions of
(M, N, K, dtype) and the config table only; nothing is read back to the host, so a captured
launch replays correctly with any activations of the same shape.
"""

from __future__ import annotations

import enum
import functools
import os
from dataclasses import dataclass

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is optional on CPU
    triton = None

from tachyon.layers.kernels.skinny_gemm_table import TUNED_CONFIGS

if triton is not None:
    from tachyon.attention.kernels._interpreter import patch_if_interpreted

    patch_if_interpreted()  # the K loop has runtime bounds

# Rows of activations the kernel takes: decode batches up to this size. The DOT paths pad the
# rows to this (the smallest MMA tile), and at more rows cuBLAS's tiles are the right ones.
MAX_SKINNY_M = 16
# ``TACHYON_SKINNY_GEMM=0`` sends every linear layer to cuBLAS (for A/B measurements).
SKINNY_GEMM_ENABLED = os.environ.get("TACHYON_SKINNY_GEMM", "1") != "0"
_SKINNY_DTYPES = (torch.bfloat16, torch.float16)
# Split-K reduction tile: 2 warps x 32 lanes x 4 fp32 (16-byte loads).
_REDUCE_BLOCK = 256
_REDUCE_WARPS = 2
# Table key ranges (log2 of N and K, rounded up): shapes outside are clamped to the nearest
# class. 2**10..2**17 spans a 1024-wide projection to a ~150k-vocabulary LM head;
# 2**10..2**14 spans hidden 1024 to an intermediate of 12288.
_N_LOG2_RANGE = (10, 17)
_K_LOG2_RANGE = (10, 14)
# Heuristic defaults (used where the table has no entry), from first principles for an H200:
# programs that read straight into registers (FMA) need several resident per SM to keep
# enough loads in flight; DOT programs pipeline through shared memory, one or two per SM.
_FMA_PROGRAMS_PER_SM = 4
_DOT_PROGRAMS_PER_SM = 2
# Rows up to this run on CUDA cores by default: at 4.26 TB/s of bf16 weights, 4 FMAs per
# element are 17 TFLOP/s, a quarter of the H200's fp32 rate (leaving room for the bf16->fp32
# conversions and the reductions); 8 rows would need half of it.
_FMA_MAX_M = 4
# Default split-K cap: a 1024-wide layer at M=1 in 8-row FMA tiles reaches 4 programs per SM
# on 132 SMs at split 4; beyond 16 the fp32 partials (split x M x N) start to cost real bytes.
_MAX_SPLIT_K = 16
# Stand-in SM count off-GPU (CPU interpreter): shapes the default split only.
_FALLBACK_NUM_SMS = 8


class SkinnyPath(enum.IntEnum):
    FMA = 0
    DOT = 1
    DOT_SWAP = 2


class Prologue(enum.IntEnum):
    NONE = 0
    SILU_MUL = 1
    RMS_NORM = 2


@dataclass(frozen=True)
class SkinnyConfig:
    """One launch configuration. Any config is correct for any shape; it only sets speed.

    ``split_k`` is an upper bound: K is cut into slices of whole ``block_k`` tiles, so a
    short K may use fewer.
    """

    path: SkinnyPath
    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 2

    def block_m(self, m: int) -> int:
        rows = triton.next_power_of_2(m)
        return rows if self.path == SkinnyPath.FMA else max(rows, MAX_SKINNY_M)

    def k_per_split(self, k: int) -> int:
        """K elements per slice: a whole number of tiles, so no tile straddles two slices."""
        tiles = triton.cdiv(triton.cdiv(k, self.split_k), self.block_k)
        return tiles * self.block_k

    def num_splits(self, k: int) -> int:
        return triton.cdiv(k, self.k_per_split(k))

    @classmethod
    def from_tuple(cls, t: tuple[str, int, int, int, int, int]) -> SkinnyConfig:
        """The table's form: ``(path name, block_n, block_k, split_k, num_warps, num_stages)``."""
        return cls(SkinnyPath[t[0]], *t[1:])

    def to_tuple(self) -> tuple[str, int, int, int, int, int]:
        return (self.path.name, self.block_n, self.block_k, self.split_k, self.num_warps,
                self.num_stages)


# -- config selection -------------------------------------------------------------------------


def shape_class(m: int, n: int, k: int) -> tuple[int, int, int]:
    """Table key: rows rounded up to a power of two, and ceil(log2) of N and K (clamped)."""

    def log2_class(v: int, lo_hi: tuple[int, int]) -> int:
        return min(max((v - 1).bit_length(), lo_hi[0]), lo_hi[1])

    m_bucket = 1 << (m - 1).bit_length()
    return m_bucket, log2_class(n, _N_LOG2_RANGE), log2_class(k, _K_LOG2_RANGE)


@functools.cache
def _num_sms() -> int:
    if not torch.cuda.is_available():
        return _FALLBACK_NUM_SMS
    return torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count


def default_config(m: int, n: int, k: int) -> SkinnyConfig:
    """First-principles config: wide tiles along K, and split K until the grid has about
    ``*_PROGRAMS_PER_SM`` programs per SM (powers of two: fewer variants to compile)."""
    if m <= _FMA_MAX_M:
        # 8 rows x 1024 columns over 128 threads: 8 16-byte loads per thread in flight, and
        # 1024 = 8 x 32 x 4 columns lets x load straight into the layout of W's columns.
        path, block_n, block_k, warps, stages = SkinnyPath.FMA, 8, 1024, 4, 1
        target = _FMA_PROGRAMS_PER_SM * _num_sms()
    else:
        # A 64 x 128 bf16 tile is 16 KB a stage; 4 stages keep 64 KB in flight per program.
        path, block_n, block_k, warps, stages = SkinnyPath.DOT, 64, 128, 4, 4
        target = _DOT_PROGRAMS_PER_SM * _num_sms()
    programs = triton.cdiv(n, block_n)
    split = 1
    while (split * 2 * programs <= target and split * 2 <= _MAX_SPLIT_K
           and k // (split * 2) >= block_k):
        split *= 2
    return SkinnyConfig(path, block_n, block_k, split, warps, stages)


@functools.cache
def select_config(m: int, n: int, k: int) -> SkinnyConfig | None:
    """The measured config of this shape class, else the default; ``None`` where the table
    says cuBLAS is faster."""
    key = shape_class(m, n, k)
    if key in TUNED_CONFIGS:
        entry = TUNED_CONFIGS[key]
        return None if entry is None else SkinnyConfig.from_tuple(entry)
    return default_config(m, n, k)


def skinny_config(x: torch.Tensor, weight: torch.Tensor) -> SkinnyConfig | None:
    """The decision of the linear layers: a config to run ``x W^T`` with, or ``None`` for
    ``F.linear``. Skinny on CUDA for 1..16 rows of bf16/fp16 with unit-stride rows, outside
    torch.compile tracing (Inductor then owns the matmul), unless ``TACHYON_SKINNY_GEMM=0``."""
    # Tracing first: Dynamo then adds no guards on the checks below.
    if torch.compiler.is_compiling() or not (SKINNY_GEMM_ENABLED and triton is not None
                                             and x.is_cuda):
        return None
    m = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if not 1 <= m <= MAX_SKINNY_M or x.dtype not in _SKINNY_DTYPES or weight.dtype != x.dtype:
        return None
    if x.stride(-1) != 1 or weight.stride(-1) != 1:
        return None
    return select_config(m, weight.shape[0], weight.shape[1])


# -- kernels ----------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _norm_weight(g_ptr, offs_k, k_mask, PROLOGUE: tl.constexpr, BLOCK_K: tl.constexpr):
        # RMS_NORM: this K tile of the norm's weight in fp32 (other prologues ignore it).
        if PROLOGUE == 2:
            g = tl.load(g_ptr + offs_k, mask=k_mask, other=0.0).to(tl.float32)
        else:
            g = tl.zeros([BLOCK_K], dtype=tl.float32)
        return g

    @triton.jit
    def _load_act(x_ptr, res_ptr, offs, mask, g, K, PROLOGUE: tl.constexpr,
                  HAS_RES: tl.constexpr):
        # The GEMM operand at element offsets ``offs`` (in x's dtype), and (RMS_NORM) the
        # activation before the norm in fp32, for the row's sum of squares and the residual.
        # Arithmetic runs in fp32 with explicit roundings to x's dtype where the eager ops
        # round: the same values as bf16 arithmetic on the GPU, and right under the
        # interpreter, whose bf16 arithmetic is not (triton-lang/triton#11584).
        # SILU_MUL: silu(gate) * up from the packed [.., 2K] row (gate at k, up at K + k),
        #   silu rounded before the product, as silu_and_mul.
        # RMS_NORM: a = x (+ residual), rounded as the eager add; operand a * g (the norm's
        #   weight), rounded; the row's 1/rms scales the accumulator at the end.
        dtype = x_ptr.dtype.element_ty
        if PROLOGUE == 1:
            gate = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            up = tl.load(x_ptr + offs + K, mask=mask, other=0.0).to(tl.float32)
            silu = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
            act = (silu * up).to(dtype)
            raw = gate
        elif PROLOGUE == 2:
            raw = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            if HAS_RES:
                res = tl.load(res_ptr + offs, mask=mask, other=0.0).to(tl.float32)
                raw = (raw + res).to(dtype).to(tl.float32)
            act = (raw * g).to(dtype)
        else:
            act = tl.load(x_ptr + offs, mask=mask, other=0.0)
            raw = act.to(tl.float32)
        return act, raw

    @triton.jit
    def _store_residual(res_out_ptr, offs, raw, mask, pid_n, PROLOGUE: tl.constexpr,
                        HAS_RES: tl.constexpr):
        # x + residual, written once: by the programs of the first N tile.
        if PROLOGUE == 2 and HAS_RES:
            tl.store(res_out_ptr + offs, raw.to(res_out_ptr.dtype.element_ty),
                     mask=mask & (pid_n == 0))

    @triton.jit(do_not_specialize=["M"])
    def _skinny_gemm_kernel(
        x_ptr, w_ptr, b_ptr, out_ptr, ws_ptr, res_ptr, res_out_ptr, g_ptr, ss_ptr,
        M, N, K, k_per_split, stride_xm, stride_wn, stride_om, eps,
        PATH: tl.constexpr, PROLOGUE: tl.constexpr, HAS_RES: tl.constexpr,
        SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ):
        # Grid (N tiles, K slices). Program (pid_n, pid_k) computes the [BLOCK_N, BLOCK_M]
        # block (output features x rows) over K range [k_start, k_end).
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        k_start = pid_k * k_per_split
        k_end = tl.minimum(K, k_start + k_per_split)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_m = tl.arange(0, BLOCK_M)
        n_mask = offs_n < N
        m_mask = offs_m < M
        # int64 row offsets: an LM head's N * K can pass 2**31 elements.
        w_rows = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn
        ss = tl.zeros([BLOCK_M], dtype=tl.float32)  # RMS_NORM: sum of squares per row
        if PATH == 0:
            acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
            for k0 in range(k_start, k_end, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                k_mask = offs_k < k_end
                w = tl.load(w_rows + offs_k[None, :], mask=n_mask[:, None] & k_mask[None, :],
                            other=0.0).to(tl.float32)
                g = _norm_weight(g_ptr, offs_k, k_mask, PROLOGUE, BLOCK_K)
                for m in tl.static_range(BLOCK_M):
                    row_mask = k_mask & (m < M)
                    xm, raw = _load_act(x_ptr, res_ptr, m * stride_xm + offs_k, row_mask, g, K,
                                        PROLOGUE, HAS_RES)
                    part = tl.sum(w * xm.to(tl.float32)[None, :], axis=1)
                    acc = tl.where(offs_m[None, :] == m, acc + part[:, None], acc)
                    if PROLOGUE == 2:
                        ss = tl.where(offs_m == m, ss + tl.sum(raw * raw, axis=0), ss)
                    _store_residual(res_out_ptr, m * stride_xm + offs_k, raw, row_mask, pid_n,
                                    PROLOGUE, HAS_RES)
        else:
            acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
            acc_t = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for k0 in range(k_start, k_end, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                k_mask = offs_k < k_end
                w = tl.load(w_rows + offs_k[None, :], mask=n_mask[:, None] & k_mask[None, :],
                            other=0.0)
                g = _norm_weight(g_ptr, offs_k, k_mask, PROLOGUE, BLOCK_K)
                offs_x = offs_m[:, None] * stride_xm + offs_k[None, :]
                x_mask = m_mask[:, None] & k_mask[None, :]
                x, raw = _load_act(x_ptr, res_ptr, offs_x, x_mask, g[None, :], K, PROLOGUE,
                                   HAS_RES)
                if PROLOGUE == 2:
                    ss += tl.sum(raw * raw, axis=1)
                _store_residual(res_out_ptr, offs_x, raw, x_mask, pid_n, PROLOGUE, HAS_RES)
                if PATH == 1:  # [rows, features]: the rows are the MMA's (padded) M
                    acc_t = tl.dot(x, tl.trans(w), acc_t, input_precision=DOT_PRECISION)
                else:  # [features, rows]: features are the MMA's M, rows its N
                    acc = tl.dot(w, tl.trans(x), acc, input_precision=DOT_PRECISION)
            if PATH == 1:
                acc = tl.trans(acc_t)
        mask = n_mask[:, None] & m_mask[None, :]
        if SPLIT:
            # Partial [split, M, N] in fp32 (and the rows' partial sums of squares);
            # norm scale, bias and rounding wait for the reduction.
            tl.store(ws_ptr + (pid_k * M + offs_m[None, :]) * N + offs_n[:, None], acc,
                     mask=mask)
            if PROLOGUE == 2:
                tl.store(ss_ptr + pid_k * M + offs_m, ss, mask=m_mask & (pid_n == 0))
        else:
            if PROLOGUE == 2:
                acc = acc * tl.rsqrt(ss / K + eps)[None, :]
            if HAS_BIAS:
                acc += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[:, None]
            tl.store(out_ptr + offs_m[None, :] * stride_om + offs_n[:, None],
                     acc.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit(do_not_specialize=["M"])
    def _split_k_reduce_kernel(ws_ptr, ss_ptr, b_ptr, out_ptr, M, N, K, stride_om, eps,
                               SPLIT_K: tl.constexpr, NORM: tl.constexpr,
                               HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
        # Grid (N tiles, rows): sum the SPLIT_K partials of one row in slice order.
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = tl.program_id(1)
        mask = offs < N
        acc = tl.load(ws_ptr + m * N + offs, mask=mask, other=0.0)
        for s in tl.static_range(1, SPLIT_K):
            acc += tl.load(ws_ptr + (s * M + m) * N + offs, mask=mask, other=0.0)
        if NORM:
            ss = tl.load(ss_ptr + m)
            for s in tl.static_range(1, SPLIT_K):
                ss += tl.load(ss_ptr + s * M + m)
            acc = acc * tl.rsqrt(ss / K + eps)
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + m * stride_om + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def skinny_gemm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                config: SkinnyConfig | None = None,
                prologue: Prologue = Prologue.NONE) -> torch.Tensor:
    """``x [..., K] @ weight[N, K]^T (+ bias)`` -> ``[..., N]`` in x's dtype, fp32 accumulation.

    With ``prologue=SILU_MUL`` x is ``[..., 2K]`` (gate | up) and the product is
    ``silu(gate) * up @ weight^T``. At most ``MAX_SKINNY_M`` rows; x's last dim and the
    weight's rows must have unit stride. ``config`` defaults to ``select_config`` (or
    ``default_config`` where the table prefers cuBLAS).
    """
    if prologue == Prologue.RMS_NORM:
        raise ValueError("use skinny_gemm_rms_norm for the RMSNorm prologue")
    return _run(x, weight, bias, config, prologue, warmup=False)[0]


def skinny_gemm_rms_norm(x: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                         weight: torch.Tensor, bias: torch.Tensor | None = None,
                         residual: torch.Tensor | None = None, *,
                         config: SkinnyConfig | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """``RMSNorm`` then the linear layer, in one launch (two with split-K).

    Returns ``(rms_norm(h) @ weight^T (+ bias), h)`` with ``h = x + residual``, or ``h = x``
    without a residual, i.e. what ``RMSNorm(x, residual)`` followed by the layer computes.
    The norm's 1/rms multiplies the fp32 accumulator instead of the input, so the rounding
    differs from the unfused pair by about one bf16 ulp of the operands.
    """
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"residual {tuple(residual.shape)} does not match x {tuple(x.shape)}")
    if norm_weight.shape != (weight.shape[1],):
        raise ValueError(f"norm weight {tuple(norm_weight.shape)} does not match K "
                         f"({weight.shape[1]})")
    out, new_res = _run(x.contiguous(), weight, bias, config, Prologue.RMS_NORM,
                        warmup=False, residual=residual, norm_weight=norm_weight, eps=eps)
    return out, x if new_res is None else new_res


def compile_skinny_gemm(x: torch.Tensor, weight: torch.Tensor,
                        bias: torch.Tensor | None = None, *, config: SkinnyConfig,
                        prologue: Prologue = Prologue.NONE) -> None:
    """Compile what ``skinny_gemm`` would launch for these arguments, launching nothing.
    Inside ``triton.AsyncCompileMode`` the compiles run in its thread pool (benchmarks)."""
    _run(x, weight, bias, config, prologue, warmup=True)


def _run(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
         config: SkinnyConfig | None, prologue: Prologue, warmup: bool,
         residual: torch.Tensor | None = None, norm_weight: torch.Tensor | None = None,
         eps: float = 0.0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Launch (or with ``warmup`` only compile); returns (out, new residual or None)."""
    n, k = weight.shape
    k_in = 2 * k if prologue == Prologue.SILU_MUL else k
    if x.shape[-1] != k_in:
        raise ValueError(f"x has {x.shape[-1]} features, the weight [{n}, {k}] needs {k_in}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k_in)
    m = x2.shape[0]
    if m > MAX_SKINNY_M:
        raise ValueError(f"skinny_gemm takes at most {MAX_SKINNY_M} rows, got {m}")
    if x2.stride(-1) != 1 or weight.stride(-1) != 1:
        raise ValueError("x and weight need unit stride along K")
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    has_res = residual is not None
    # The norm's residual shares x's (contiguous) row layout: one stride serves both.
    res = residual.reshape(-1, k).contiguous() if has_res else x2
    res_out = torch.empty_like(x2) if has_res else x2
    new_res = res_out.view(*lead, k) if has_res else None
    if m == 0:
        return out.view(*lead, n), new_res
    cfg = config or select_config(m, n, k) or default_config(m, n, k)
    k_per_split = cfg.k_per_split(k)
    splits = cfg.num_splits(k)
    ws = torch.empty((splits, m, n), dtype=torch.float32, device=x.device) if splits > 1 else out
    norm = prologue == Prologue.RMS_NORM
    ss = torch.empty((splits, m), dtype=torch.float32, device=x.device) if norm else ws
    g = norm_weight if norm else x2
    has_bias = bias is not None
    b = bias if has_bias else out
    _skinny_gemm_kernel.run(
        x2, weight, b, out, ws, res, res_out, g, ss, m, n, k, k_per_split, x2.stride(0),
        weight.stride(0), out.stride(0), eps, PATH=int(cfg.path), PROLOGUE=int(prologue),
        HAS_RES=has_res, SPLIT=splits > 1, HAS_BIAS=has_bias, BLOCK_M=cfg.block_m(m),
        BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        # fp32 inputs (tests) multiply exactly; bf16/fp16 ignore the setting.
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        grid=(triton.cdiv(n, cfg.block_n), splits), warmup=warmup)
    if splits > 1:
        _split_k_reduce_kernel.run(
            ws, ss, b, out, m, n, k, out.stride(0), eps, SPLIT_K=splits, NORM=norm,
            HAS_BIAS=has_bias, BLOCK=_REDUCE_BLOCK, num_warps=_REDUCE_WARPS,
            grid=(triton.cdiv(n, _REDUCE_BLOCK), m), warmup=warmup)
    return out.view(*lead, n), new_res
