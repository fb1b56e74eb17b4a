"""Split-KV decode ("flash decoding"): one query token per request, each context split
across several programs whose partial softmaxes a second kernel merges.

CUDA-graph contract (every kernel of this package): every launch grid and every
constexpr/scalar argument depends only on tensor *shapes* (``num_tokens``, ``num_reqs``, head
counts, ``head_dim``, block size) and fixed configuration, never on tensor *contents*. Query
lengths, sequence lengths and the causal limits are loaded inside the kernels, so one
captured graph replays correctly with any batch of the same shape. Nothing here reads device
memory from the host. The number of splits comes from shapes and the device only
(``choose_num_splits``), and the split partials live in a workspace allocated once
(``decode_workspace``).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from tachyon.attention.kernels._interpreter import patch_if_interpreted
from tachyon.attention.kernels._tile import (
    DECODE_TILES,
    LOG2E,
    MIN_DOT_DIM,
    attend_kv_tile,
    check_cache,
    dot_precision,
)

patch_if_interpreted()  # each split's KV loop bounds are computed from seq_lens

# Upper bound on decode splits: a single request with 8 KV heads needs 64 to fill 132 SMs,
# and a 16k context split 64 ways still leaves 256 positions per split.
MAX_DECODE_SPLITS = 64
# Programs per SM the split-KV decode aims for. Decode is memory bound; several resident
# programs per SM keep enough loads in flight. Measured on an H200 (132 SMs, bf16, 8 KV
# heads): ~4 per SM was best for 1, 4 and 32 requests; 2 or 8 per SM were 10-40% slower.
DECODE_PROGRAMS_PER_SM = 4
# Stand-in SM count for devices without one (CPU under TRITON_INTERPRET): only shapes the
# choice of splits, never correctness.
_FALLBACK_NUM_SMS = 8


@triton.jit
def _decode_split_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    out_ptr,
    ws_acc_ptr,
    ws_max_ptr,
    ws_sum_ptr,
    seq_lens_ptr,
    block_table_ptr,
    scale_log2,
    stride_q_t,
    stride_q_h,
    stride_o_t,
    stride_o_h,
    stride_kc_blk,
    stride_kc_off,
    stride_kc_head,
    stride_vc_blk,
    stride_vc_off,
    stride_vc_head,
    stride_bt,
    stride_wacc_row,
    stride_wacc_h,
    stride_wstat_row,
    QUERIES_PER_KV: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # Program = (request, KV head, split); rows = the query heads sharing this KV head.
    req = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + req)
    # Each split covers ceil(seq_len / NUM_SPLITS) positions rounded up to whole KV tiles.
    split_len = tl.cdiv(tl.cdiv(seq_len, NUM_SPLITS), BLOCK_N) * BLOCK_N
    kv_start = split * split_len
    kv_end = tl.minimum(kv_start + split_len, seq_len)

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, HEAD_DIM)
    head = kv_head * QUERIES_PER_KV + offs_g
    g_valid = offs_g < QUERIES_PER_KV
    q = tl.load(
        q_ptr + req * stride_q_t + head[:, None] * stride_q_h + offs_d[None, :],
        mask=g_valid[:, None],
        other=0.0,
    )

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, HEAD_DIM], tl.float32)
    block_table_row_ptr = block_table_ptr + req.to(tl.int64) * stride_bt
    for start_n in range(kv_start, kv_end, BLOCK_N):
        m_i, l_i, acc = attend_kv_tile(
            q,
            m_i,
            l_i,
            acc,
            k_cache_ptr,
            v_cache_ptr,
            block_table_row_ptr,
            kv_head,
            start_n,
            kv_end,
            m_i,  # q_pos: unused without CAUSAL (the single query sees the whole context)
            scale_log2,
            stride_kc_blk,
            stride_kc_off,
            stride_kc_head,
            stride_vc_blk,
            stride_vc_off,
            stride_vc_head,
            HEAD_DIM,
            BLOCK_SIZE,
            BLOCK_N,
            False,
            DOT_PRECISION,
        )

    if NUM_SPLITS == 1:
        # No reduction needed: normalise and write the output directly.
        l_i = tl.where(l_i == 0.0, 1.0, l_i)  # seq_len 0 (padding) outputs 0
        out = acc / l_i[:, None]
        tl.store(
            out_ptr + req * stride_o_t + head[:, None] * stride_o_h + offs_d[None, :],
            out.to(out_ptr.dtype.element_ty),
            mask=g_valid[:, None],
        )
    else:
        # Workspace row of (request, split); empty splits store m = -inf, l = 0, acc = 0.
        row = req * NUM_SPLITS + split
        tl.store(
            ws_acc_ptr + row * stride_wacc_row + head[:, None] * stride_wacc_h + offs_d[None, :],
            acc,
            mask=g_valid[:, None],
        )
        tl.store(ws_max_ptr + row * stride_wstat_row + head, m_i, mask=g_valid)
        tl.store(ws_sum_ptr + row * stride_wstat_row + head, l_i, mask=g_valid)


@triton.jit
def _decode_reduce_kernel(
    out_ptr,
    ws_acc_ptr,
    ws_max_ptr,
    ws_sum_ptr,
    stride_o_t,
    stride_o_h,
    stride_wacc_row,
    stride_wacc_h,
    stride_wstat_row,
    HEAD_DIM: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    # Program = (request, query head): merge the splits' partial softmaxes.
    req = tl.program_id(0)
    head = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, HEAD_DIM)
    s_valid = offs_s < NUM_SPLITS
    rows = req * NUM_SPLITS + offs_s
    m_s = tl.load(ws_max_ptr + rows * stride_wstat_row + head, mask=s_valid, other=float("-inf"))
    l_s = tl.load(ws_sum_ptr + rows * stride_wstat_row + head, mask=s_valid, other=0.0)
    acc_s = tl.load(
        ws_acc_ptr + rows[:, None] * stride_wacc_row + head * stride_wacc_h + offs_d[None, :],
        mask=s_valid[:, None],
        other=0.0,
    )
    m = tl.max(m_s, 0)
    m = tl.where(m == float("-inf"), 0.0, m)  # every split empty (seq_len 0): weights 0
    w = tl.exp2(m_s - m)  # rescale each split to the common max
    total = tl.sum(w * l_s, 0)
    total = tl.where(total == 0.0, 1.0, total)
    out = tl.sum(w[:, None] * acc_s, 0) / total
    tl.store(
        out_ptr + req * stride_o_t + head * stride_o_h + offs_d,
        out.to(out_ptr.dtype.element_ty),
    )


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return _FALLBACK_NUM_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


def choose_num_splits(num_reqs: int, num_kv_heads: int, device: torch.device) -> int:
    """Splits per request for ``decode_attention``: a function of shapes and the device only.

    Without splitting the grid has ``num_reqs * num_kv_heads`` programs; small batches would
    leave most SMs idle, so split each context until there are about
    ``DECODE_PROGRAMS_PER_SM`` programs per SM (rounding down: overshooting was measured to
    cost more than undershooting). Powers of two only (fewer kernel variants to compile);
    non-increasing in ``num_reqs``, so ``choose_num_splits(1, ...)`` is the maximum.
    """
    base = max(num_reqs, 1) * num_kv_heads  # programs without splitting
    target = DECODE_PROGRAMS_PER_SM * _num_sms(torch.device(device))
    if 2 * base > target:
        return 1
    largest_pow2 = 1 << ((target // base).bit_length() - 1)  # largest 2**k <= target // base
    return min(largest_pow2, MAX_DECODE_SPLITS)


def decode_workspace(
    max_num_reqs: int,
    num_heads: int,
    head_dim: int,
    max_splits: int,
    device: torch.device,
    *,
    num_kv_heads: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Persistent fp32 buffers for the split partials: ``(acc, max, sumexp)``.

    ``acc`` is ``[rows, num_heads, head_dim]``, ``max``/``sumexp`` are ``[rows, num_heads]``;
    a launch with ``num_reqs`` requests and ``num_splits`` splits uses the first
    ``num_reqs * num_splits`` rows. By default ``rows = max_num_reqs * max_splits``. Passing
    ``num_kv_heads`` sizes the buffers for what ``choose_num_splits`` can actually ask for
    (large batches use one split, which needs no workspace), usually far fewer rows.
    Allocate once at engine start so CUDA graphs see the same addresses on every replay.
    """
    rows = max_num_reqs * max_splits
    if num_kv_heads is not None:
        rows = 1  # single-split launches never touch the workspace
        for n in range(1, max_num_reqs + 1):
            splits = min(choose_num_splits(n, num_kv_heads, device), max_splits)
            if splits > 1:
                rows = max(rows, n * splits)
    acc = torch.empty(rows, num_heads, head_dim, dtype=torch.float32, device=device)
    stat_max = torch.empty(rows, num_heads, dtype=torch.float32, device=device)
    stat_sum = torch.empty(rows, num_heads, dtype=torch.float32, device=device)
    return acc, stat_max, stat_sum


def decode_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    output: torch.Tensor,
    seq_lens: torch.Tensor,
    block_table: torch.Tensor,
    scale: float,
    num_splits: int,
    workspace: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
    *,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> None:
    """Split-KV attention for batches of one query token per request (token r = request r).

    ``query``/``output``: ``[num_reqs, num_heads, head_dim]``; ``seq_lens`` (int32) and
    ``block_table`` (int32) as in ``unified_attention`` (only the first ``num_reqs`` rows are
    read). Grid ``(num_reqs, num_kv_heads, num_splits)``; with ``num_splits > 1`` the partials
    go to ``workspace`` (from ``decode_workspace``) and a second kernel merges them. Requests
    with ``seq_len`` 0 output 0. ``num_splits`` must come from shapes (``choose_num_splits``).
    """
    num_reqs, num_heads, head_dim = query.shape
    num_kv_heads = k_cache.shape[2]
    check_cache(k_cache, v_cache, num_kv_heads, head_dim)
    assert output.shape == query.shape, (output.shape, query.shape)
    assert query.stride(-1) == 1 and output.stride(-1) == 1, "head_dim must be contiguous"
    assert num_heads % num_kv_heads == 0, (num_heads, num_kv_heads)
    assert seq_lens.dtype == torch.int32 and seq_lens.shape[0] >= num_reqs
    assert block_table.dtype == torch.int32 and block_table.stride(-1) == 1
    assert num_splits >= 1, num_splits
    if num_reqs == 0:
        return
    queries_per_kv = num_heads // num_kv_heads
    block_size = k_cache.shape[1]
    block_n = block_n or max(block_size, DECODE_TILES[1])
    num_warps = num_warps or DECODE_TILES[2]
    num_stages = num_stages or DECODE_TILES[3]
    assert block_n >= MIN_DOT_DIM, block_n
    if num_splits > 1:
        assert workspace is not None, "num_splits > 1 needs decode_workspace buffers"
        ws_acc, ws_max, ws_sum = workspace
        assert ws_acc.shape[0] >= num_reqs * num_splits, "workspace too small for this batch"
        assert ws_acc.shape[1:] == (num_heads, head_dim) and ws_acc.stride(-1) == 1
        assert ws_max.stride() == ws_sum.stride() and ws_max.stride(-1) == 1
    else:
        # Never touched by the single-split path; any tensor keeps the signature uniform.
        ws_acc = ws_max = ws_sum = output
    _decode_split_kernel[(num_reqs, num_kv_heads, num_splits)](
        query,
        k_cache,
        v_cache,
        output,
        ws_acc,
        ws_max,
        ws_sum,
        seq_lens,
        block_table,
        scale * LOG2E,
        query.stride(0),
        query.stride(1),
        output.stride(0),
        output.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        block_table.stride(0),
        ws_acc.stride(0),
        ws_acc.stride(1),
        ws_max.stride(0),
        QUERIES_PER_KV=queries_per_kv,
        HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size,
        BLOCK_G=max(MIN_DOT_DIM, triton.next_power_of_2(queries_per_kv)),
        BLOCK_N=block_n,
        NUM_SPLITS=num_splits,
        DOT_PRECISION=dot_precision(query.dtype),
        num_warps=num_warps,
        num_stages=num_stages,
    )
    if num_splits > 1:
        _decode_reduce_kernel[(num_reqs, num_heads)](
            output,
            ws_acc,
            ws_max,
            ws_sum,
            output.stride(0),
            output.stride(1),
            ws_acc.stride(0),
            ws_acc.stride(1),
            ws_max.stride(0),
            HEAD_DIM=head_dim,
            NUM_SPLITS=num_splits,
            BLOCK_S=triton.next_power_of_2(num_splits),
        )
