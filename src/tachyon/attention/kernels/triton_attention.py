"""Triton attention over the paged KV cache: the KV store, a varlen kernel and split-KV decode.

Cache layout (see ``tachyon.attention.base``): ``k_cache`` / ``v_cache`` are
``[num_blocks, block_size, num_kv_heads, head_dim]``; position ``p`` of request ``r`` lives in
block ``block_table[r, p // block_size]`` at offset ``p % block_size``.

CUDA-graph contract: every launch grid and every constexpr/scalar argument below depends only
on tensor *shapes* (``num_tokens``, ``num_reqs``, head counts, ``head_dim``, block size) and
fixed configuration, never on tensor *contents*. Query lengths, sequence lengths and the
causal limits are loaded inside the kernels, so one captured graph replays correctly with any
batch of the same shape. Nothing here reads device memory from the host.

Precision: scores and the online softmax are fp32; the softmax runs in base 2 with
``log2(e)`` folded into the scale (``exp2`` is the hardware's native exponential).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl


def _patch_interpreter_scalar_index() -> None:
    """Let the Triton interpreter use data-dependent loop bounds under numpy >= 2.4.

    The interpreter holds scalars as 1-element arrays and implements ``range(tensor)`` through
    ``int(array)``, which numpy 2.4 turned into a TypeError; ``.item()`` works on every numpy.
    Only the CPU interpreter (``TRITON_INTERPRET=1``, how CI runs these kernels) is touched.
    """
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor

    def patch_lang_tensor(tensor, scope) -> None:
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    if getattr(original, "__name__", "") != patch_lang_tensor.__name__:
        interpreter._patch_lang_tensor = patch_lang_tensor


if os.environ.get("TRITON_INTERPRET") == "1":
    _patch_interpreter_scalar_index()

LOG2E = 1.4426950408889634

# tl.dot needs every dimension >= 16, so query-row tiles and KV tiles are at least this big.
MIN_DOT_DIM = 16
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
# A batch averaging at most this many query tokens per request is "decode-like": the varlen
# kernel then uses short query tiles so single-token requests waste less of the tile.
_DECODE_LIKE_TOKENS_PER_REQ = 4
# Default tiles, picked from an H200 sweep (bf16, head_dim 128, 2 query heads per KV head):
# prefill (block_m, block_n, num_warps, num_stages) = (128, 32, 8, 2) ran at 250 TFLOP/s,
# (64, 64, 4, 2) at 223; decode with 64-position KV tiles, 2 warps and 3 stages reached 0.98
# of device-copy bandwidth on 256 x 1k contexts (4 warps: 0.95) and was best on small batches.
_PREFILL_TILES = (128, 32, 8, 2)
_DECODE_TILES = (MIN_DOT_DIM, 64, 2, 3)


# ----------------------------------------------------------------------------------------------
# KV store
# ----------------------------------------------------------------------------------------------


@triton.jit
def _store_kv_cache_kernel(
    key_ptr,
    value_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_mapping_ptr,
    stride_key_t,
    stride_key_h,
    stride_value_t,
    stride_value_h,
    stride_kc_blk,
    stride_kc_off,
    stride_kc_head,
    stride_vc_blk,
    stride_vc_off,
    stride_vc_head,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    # One program per token: all its KV heads in one [BLOCK_H, HEAD_DIM] tile.
    token = tl.program_id(0)
    slot = tl.load(slot_mapping_ptr + token)  # int64
    if slot < 0:  # padded token: writes nothing
        return
    blk = slot // BLOCK_SIZE
    off = slot % BLOCK_SIZE
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, HEAD_DIM)
    mask = (offs_h < NUM_KV_HEADS)[:, None]

    k = tl.load(
        key_ptr + token * stride_key_t + offs_h[:, None] * stride_key_h + offs_d[None, :],
        mask=mask,
    )
    v = tl.load(
        value_ptr + token * stride_value_t + offs_h[:, None] * stride_value_h + offs_d[None, :],
        mask=mask,
    )
    k_dst = k_cache_ptr + blk * stride_kc_blk + off * stride_kc_off
    v_dst = v_cache_ptr + blk * stride_vc_blk + off * stride_vc_off
    tl.store(
        k_dst + offs_h[:, None] * stride_kc_head + offs_d[None, :],
        k.to(k_cache_ptr.dtype.element_ty),
        mask=mask,
    )
    tl.store(
        v_dst + offs_h[:, None] * stride_vc_head + offs_d[None, :],
        v.to(v_cache_ptr.dtype.element_ty),
        mask=mask,
    )


def store_kv_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Write ``key``/``value`` ``[num_tokens, num_kv_heads, head_dim]`` to their cache slots.

    ``slot_mapping`` (int64 ``[num_tokens]``) holds ``block_id * block_size + offset`` per
    token; ``-1`` writes nothing (padded tokens). One launch, one program per token.
    """
    num_tokens, num_kv_heads, head_dim = key.shape
    _check_cache(k_cache, v_cache, num_kv_heads, head_dim)
    assert value.shape == key.shape, (value.shape, key.shape)
    assert key.stride(-1) == 1 and value.stride(-1) == 1, "head_dim must be contiguous"
    assert slot_mapping.dtype == torch.int64 and slot_mapping.shape[0] >= num_tokens
    if num_tokens == 0:
        return
    _store_kv_cache_kernel[(num_tokens,)](
        key,
        value,
        k_cache,
        v_cache,
        slot_mapping,
        key.stride(0),
        key.stride(1),
        value.stride(0),
        value.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        NUM_KV_HEADS=num_kv_heads,
        HEAD_DIM=head_dim,
        BLOCK_H=triton.next_power_of_2(num_kv_heads),
        BLOCK_SIZE=k_cache.shape[1],
    )


# ----------------------------------------------------------------------------------------------
# Shared pieces
# ----------------------------------------------------------------------------------------------


@triton.jit
def _attend_kv_tile(
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
    q_pos,
    scale_log2,
    stride_kc_blk,
    stride_kc_off,
    stride_kc_head,
    stride_vc_blk,
    stride_vc_off,
    stride_vc_head,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One online-softmax step over key positions ``[start_n, start_n + BLOCK_N) ∩ [0, kv_end)``.

    ``m_i`` is the running row max (log2 domain), ``l_i`` the running sum of exponentials,
    ``acc`` the unnormalised output. With ``CAUSAL``, row ``i`` only sees positions
    ``<= q_pos[i]``. Rows that have seen no key keep ``m_i = -inf``, ``l_i = 0``, ``acc = 0``.
    """
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    n_valid = offs_n < kv_end
    # Physical block of each position (a tile may span several pages, or part of one).
    blk = tl.load(block_table_row_ptr + offs_n // BLOCK_SIZE, mask=n_valid, other=0).to(tl.int64)
    off = offs_n % BLOCK_SIZE

    # K loaded transposed, [HEAD_DIM, BLOCK_N]; head_dim is contiguous (16-byte vector loads).
    k = tl.load(
        k_cache_ptr
        + blk[None, :] * stride_kc_blk
        + off[None, :] * stride_kc_off
        + kv_head * stride_kc_head
        + offs_d[:, None],
        mask=n_valid[None, :],
        other=0.0,
    )
    # Scale in fp32 after the dot: pre-scaling a bf16 q would add a rounding of every score.
    s = tl.dot(q, k, input_precision=DOT_PRECISION) * scale_log2  # [ROWS, BLOCK_N]
    if CAUSAL:
        visible = n_valid[None, :] & (offs_n[None, :] <= q_pos[:, None])
    else:
        visible = n_valid[None, :]
    s = tl.where(visible, s, float("-inf"))

    m_new = tl.maximum(m_i, tl.max(s, 1))
    # Rows with nothing visible so far have m_new = -inf; subtracting 0 instead keeps
    # exp2(-inf - -inf) = NaN out (their p and alpha become exp2(-inf) = 0).
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)

    v = tl.load(
        v_cache_ptr
        + blk[:, None] * stride_vc_blk
        + off[:, None] * stride_vc_off
        + kv_head * stride_vc_head
        + offs_d[None, :],
        mask=n_valid[:, None],
        other=0.0,
    )
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return m_new, l_i, acc


def _check_cache(
    k_cache: torch.Tensor, v_cache: torch.Tensor, num_kv_heads: int, head_dim: int
) -> None:
    assert k_cache.dim() == 4 and k_cache.shape == v_cache.shape, (k_cache.shape, v_cache.shape)
    assert k_cache.shape[2:] == (num_kv_heads, head_dim), (k_cache.shape, num_kv_heads, head_dim)
    assert k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1, "head_dim must be contiguous"
    assert head_dim >= MIN_DOT_DIM and head_dim & (head_dim - 1) == 0, (
        f"head_dim must be a power of two >= {MIN_DOT_DIM}, got {head_dim}"
    )


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs would otherwise go through tf32 on GPU (~3e-4 error); half types are exact.
    return "ieee" if dtype == torch.float32 else "tf32"


# ----------------------------------------------------------------------------------------------
# Varlen ("unified") attention: prefill, chunked prefill, prefix hits and decode in one launch
# ----------------------------------------------------------------------------------------------


@triton.jit
def _find_request(query_start_loc_ptr, tile, num_reqs, BLOCK_Q: tl.constexpr):
    """The request owning query tile ``tile``: request r's tiles are numbered from
    ``query_start_loc[r] // BLOCK_Q + r``, a non-decreasing sequence, so binary search."""
    lo: tl.int32 = 0
    hi = num_reqs
    while lo < hi:
        mid = (lo + hi) // 2
        first_tile = tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid
        if first_tile <= tile:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit(do_not_specialize=["num_reqs"])
def _unified_attention_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    out_ptr,
    query_start_loc_ptr,
    seq_lens_ptr,
    block_table_ptr,
    scale_log2,
    num_reqs,
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
    QUERIES_PER_KV: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # Program = (query tile, KV head). A tile is BLOCK_Q consecutive query tokens of one
    # request times the QUERIES_PER_KV query heads sharing this KV head: BLOCK_M rows.
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    req = _find_request(query_start_loc_ptr, tile, num_reqs, BLOCK_Q)
    q_start = tl.load(query_start_loc_ptr + req)
    q_len = tl.load(query_start_loc_ptr + req + 1) - q_start
    tile_in_req = tile - (q_start // BLOCK_Q + req)
    if tile_in_req * BLOCK_Q >= q_len:  # spare program of the upper-bound grid
        return
    seq_len = tl.load(seq_lens_ptr + req)
    context_len = seq_len - q_len  # positions cached before this step's tokens

    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    q_idx = tile_in_req * BLOCK_Q + offs_m // QUERIES_PER_KV  # token index within the request
    head = kv_head * QUERIES_PER_KV + offs_m % QUERIES_PER_KV
    # BLOCK_M may exceed BLOCK_Q * QUERIES_PER_KV when QUERIES_PER_KV is not a power of two.
    row_valid = (offs_m < BLOCK_Q * QUERIES_PER_KV) & (q_idx < q_len)
    q_pos = context_len + q_idx  # absolute position: sees cache positions 0..q_pos

    q_off = (q_start + q_idx)[:, None] * stride_q_t + head[:, None] * stride_q_h
    q = tl.load(q_ptr + q_off + offs_d[None, :], mask=row_valid[:, None], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    # One past the last position any row of this tile sees (the tile's last valid token).
    kv_end = context_len + tl.minimum((tile_in_req + 1) * BLOCK_Q, q_len)
    block_table_row_ptr = block_table_ptr + req.to(tl.int64) * stride_bt
    for start_n in range(0, kv_end, BLOCK_N):
        m_i, l_i, acc = _attend_kv_tile(
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
            q_pos,
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
            True,
            DOT_PRECISION,
        )

    l_i = tl.where(l_i == 0.0, 1.0, l_i)  # rows that saw nothing (padding) output 0, not NaN
    out = acc / l_i[:, None]
    o_off = (q_start + q_idx)[:, None] * stride_o_t + head[:, None] * stride_o_h
    tl.store(
        out_ptr + o_off + offs_d[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=row_valid[:, None],
    )


def unified_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    output: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_table: torch.Tensor,
    scale: float,
    num_reqs: int,
    *,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> None:
    """Causal varlen attention of ``query`` over the paged cache, written into ``output``.

    ``query``/``output``: ``[num_tokens, num_heads, head_dim]``; ``query_start_loc``: int32
    ``[num_reqs + 1]``; ``seq_lens``: int32 ``[num_reqs]``, context length including this
    step's tokens (already in the cache); ``block_table``: int32 ``[num_reqs, max_blocks]``.
    Token ``i`` of request ``r`` sits at position ``seq_lens[r] - q_len_r + i`` and attends to
    positions ``0..`` that one. Tokens past ``query_start_loc[num_reqs]`` are not written;
    rows of requests that see no key (``seq_len`` 0 padding) are written as 0.

    The grid is an upper bound on the number of query tiles computed from shapes only, so the
    launch is CUDA-graph safe; ``block_m``/``block_n``/``num_warps``/``num_stages`` are
    tuning overrides (``block_m`` rows = query tokens x query heads per KV head).
    """
    num_tokens, num_heads, head_dim = query.shape
    num_kv_heads = k_cache.shape[2]
    _check_cache(k_cache, v_cache, num_kv_heads, head_dim)
    assert output.shape == query.shape, (output.shape, query.shape)
    assert query.stride(-1) == 1 and output.stride(-1) == 1, "head_dim must be contiguous"
    assert num_heads % num_kv_heads == 0, (num_heads, num_kv_heads)
    assert query_start_loc.dtype == torch.int32 and seq_lens.dtype == torch.int32
    assert block_table.dtype == torch.int32 and block_table.stride(-1) == 1
    if num_tokens == 0 or num_reqs == 0:
        return
    queries_per_kv = num_heads // num_kv_heads
    decode_like = num_tokens <= _DECODE_LIKE_TOKENS_PER_REQ * num_reqs
    tiles = _DECODE_TILES if decode_like else _PREFILL_TILES
    block_m = block_m or max(tiles[0], triton.next_power_of_2(queries_per_kv))
    block_n = block_n or tiles[1]
    num_warps = num_warps or tiles[2]
    num_stages = num_stages or tiles[3]
    assert block_m >= max(MIN_DOT_DIM, queries_per_kv) and block_n >= MIN_DOT_DIM
    block_q = block_m // queries_per_kv  # query tokens per tile
    # Request r's tiles start at query_start_loc[r] // block_q + r: that numbering never
    # overlaps and stays below num_tokens // block_q + num_reqs, whatever the query lengths.
    grid = (num_tokens // block_q + num_reqs, num_kv_heads)
    _unified_attention_kernel[grid](
        query,
        k_cache,
        v_cache,
        output,
        query_start_loc,
        seq_lens,
        block_table,
        scale * LOG2E,
        num_reqs,
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
        QUERIES_PER_KV=queries_per_kv,
        HEAD_DIM=head_dim,
        BLOCK_SIZE=k_cache.shape[1],
        BLOCK_M=block_m,
        BLOCK_Q=block_q,
        BLOCK_N=block_n,
        DOT_PRECISION=_dot_precision(query.dtype),
        num_warps=num_warps,
        num_stages=num_stages,
    )


# ----------------------------------------------------------------------------------------------
# Split-KV decode ("flash decoding"): one query token per request
# ----------------------------------------------------------------------------------------------


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
        m_i, l_i, acc = _attend_kv_tile(
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
    _check_cache(k_cache, v_cache, num_kv_heads, head_dim)
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
    block_n = block_n or max(block_size, _DECODE_TILES[1])
    num_warps = num_warps or _DECODE_TILES[2]
    num_stages = num_stages or _DECODE_TILES[3]
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
        DOT_PRECISION=_dot_precision(query.dtype),
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
