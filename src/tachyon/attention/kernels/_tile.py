"""What the attention kernels share: the online-softmax step over one KV tile, the cache
checks, the dot precision and the default tiles.

Cache layout (see ``tachyon.attention.base``): ``k_cache`` / ``v_cache`` are
``[num_blocks, block_size, num_kv_heads, head_dim]``; position ``p`` of request ``r`` lives in
block ``block_table[r, p // block_size]`` at offset ``p % block_size``.

Precision: scores and the online softmax are fp32; the softmax runs in base 2 with
``log2(e)`` folded into the scale (``exp2`` is the hardware's native exponential).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634

# tl.dot needs every dimension >= 16, so query-row tiles and KV tiles are at least this big.
MIN_DOT_DIM = 16
# Default tiles, picked from an H200 sweep (bf16, head_dim 128, 2 query heads per KV head):
# prefill (block_m, block_n, num_warps, num_stages) = (128, 32, 8, 2) ran at 250 TFLOP/s,
# (64, 64, 4, 2) at 223; decode with 64-position KV tiles, 2 warps and 3 stages reached 0.98
# of device-copy bandwidth on 256 x 1k contexts (4 warps: 0.95) and was best on small batches.
PREFILL_TILES = (128, 32, 8, 2)
DECODE_TILES = (MIN_DOT_DIM, 64, 2, 3)


@triton.jit
def attend_kv_tile(
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


def check_cache(
    k_cache: torch.Tensor, v_cache: torch.Tensor, num_kv_heads: int, head_dim: int
) -> None:
    assert k_cache.dim() == 4 and k_cache.shape == v_cache.shape, (k_cache.shape, v_cache.shape)
    assert k_cache.shape[2:] == (num_kv_heads, head_dim), (k_cache.shape, num_kv_heads, head_dim)
    assert k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1, "head_dim must be contiguous"
    assert head_dim >= MIN_DOT_DIM and head_dim & (head_dim - 1) == 0, (
        f"head_dim must be a power of two >= {MIN_DOT_DIM}, got {head_dim}"
    )


def dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs would otherwise go through tf32 on GPU (~3e-4 error); half types are exact.
    return "ieee" if dtype == torch.float32 else "tf32"
