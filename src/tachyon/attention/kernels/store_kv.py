"""The KV store: each token's key and value into its paged-cache slot (slot -1: nothing).

Cache layout (see ``tachyon.attention.base``): ``k_cache`` / ``v_cache`` are
``[num_blocks, block_size, num_kv_heads, head_dim]``; position ``p`` of request ``r`` lives in
block ``block_table[r, p // block_size]`` at offset ``p % block_size``.
One program per token; the grid is the token count, so a captured graph replays any batch
of that size.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tachyon.attention.kernels._tile import check_cache


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
    check_cache(k_cache, v_cache, num_kv_heads, head_dim)
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
