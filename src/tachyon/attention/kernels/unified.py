"""Varlen ("unified") attention: prefill, chunked prefill, prefix hits and decode in one
launch over the paged KV cache.

CUDA-graph contract (every kernel of this package): every launch grid and every
constexpr/scalar argument depends only on tensor *shapes* (``num_tokens``, ``num_reqs``, head
counts, ``head_dim``, block size) and fixed configuration, never on tensor *contents*. Query
lengths, sequence lengths and the causal limits are loaded inside the kernels, so one
captured graph replays correctly with any batch of the same shape. Nothing here reads device
memory from the host.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tachyon.attention.kernels._interpreter import patch_if_interpreted
from tachyon.attention.kernels._tile import (
    DECODE_TILES,
    LOG2E,
    MIN_DOT_DIM,
    PREFILL_TILES,
    attend_kv_tile,
    check_cache,
    dot_precision,
)

patch_if_interpreted()  # the KV loop's bound is loaded from seq_lens

# A batch averaging at most this many query tokens per request is "decode-like": the varlen
# kernel then uses short query tiles so single-token requests waste less of the tile.
_DECODE_LIKE_TOKENS_PER_REQ = 4


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
    check_cache(k_cache, v_cache, num_kv_heads, head_dim)
    assert output.shape == query.shape, (output.shape, query.shape)
    assert query.stride(-1) == 1 and output.stride(-1) == 1, "head_dim must be contiguous"
    assert num_heads % num_kv_heads == 0, (num_heads, num_kv_heads)
    assert query_start_loc.dtype == torch.int32 and seq_lens.dtype == torch.int32
    assert block_table.dtype == torch.int32 and block_table.stride(-1) == 1
    if num_tokens == 0 or num_reqs == 0:
        return
    queries_per_kv = num_heads // num_kv_heads
    decode_like = num_tokens <= _DECODE_LIKE_TOKENS_PER_REQ * num_reqs
    tiles = DECODE_TILES if decode_like else PREFILL_TILES
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
        DOT_PRECISION=dot_precision(query.dtype),
        num_warps=num_warps,
        num_stages=num_stages,
    )
