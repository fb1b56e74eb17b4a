"""Triton kernels for batched LoRA: shrink ``h = x @ A[slot]^T`` and expand
``y += h @ B[slot]^T``, each token with its own adapter slot.

Segmented by slot on the grid: one program per (token block, output block, slot). A program
loads the block's slot ids, and if any token there uses its slot it multiplies those rows
(the others masked to zero) with that slot's weights on the tensor cores and writes only
them. A token block of one adapter (the common case) costs one dense tile; blocks mixing
adapters cost one tile per adapter present; programs whose slot is absent exit after one
load. The grid depends only on shapes, never on which slots are in use, so a captured CUDA
graph serves any mix of adapters. The reduction length (hidden size, rank) is a compile-time
constant: a handful of values per model, and loops of known trip count. Slot -1 (no
adapter) matches no program: those rows of ``h`` are never written nor read, and ``y`` keeps
its base value.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Tokens per program: tl.dot's smallest tile side. Decode batches are small, and a larger
# block would mix more adapters into one tile (one pass per adapter present).
BLOCK_T = 16
# Output columns per program; the rank dimension (shrink's output, expand's reduction) is
# at most a few hundred, so one or two column blocks cover it.
BLOCK_N = 64
# Reduction tile of the shrink (the hidden size: thousands).
BLOCK_K = 64


@triton.jit
def _shrink_kernel(x_ptr, a_ptr, slots_ptr, h_ptr, num_tokens, n, k: tl.constexpr,
                   stride_xt, stride_xk, stride_al, stride_an, stride_ak,
                   stride_ht, stride_hn,
                   BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_t, pid_n, slot = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    tok_slot = tl.load(slots_ptr + offs_t, mask=offs_t < num_tokens, other=-1)
    mine = tok_slot == slot
    if tl.sum(mine.to(tl.int32), axis=0) > 0:
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, k, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            in_k = offs_k < k
            xt = tl.load(x_ptr + offs_t[:, None] * stride_xt + offs_k[None, :] * stride_xk,
                         mask=mine[:, None] & in_k[None, :], other=0.0)
            at = tl.load(a_ptr + slot * stride_al + offs_n[None, :] * stride_an
                         + offs_k[:, None] * stride_ak,
                         mask=(offs_n < n)[None, :] & in_k[:, None], other=0.0)
            acc += tl.dot(xt, at)
        tl.store(h_ptr + offs_t[:, None] * stride_ht + offs_n[None, :] * stride_hn,
                 acc.to(h_ptr.dtype.element_ty), mask=mine[:, None] & (offs_n < n)[None, :])


@triton.jit
def _expand_kernel(h_ptr, b_ptr, slots_ptr, y_ptr, num_tokens, m, r: tl.constexpr,
                   stride_ht, stride_hr, stride_bl, stride_bm, stride_br,
                   stride_yt, stride_ym,
                   BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    pid_t, pid_m, slot = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    tok_slot = tl.load(slots_ptr + offs_t, mask=offs_t < num_tokens, other=-1)
    mine = tok_slot == slot
    if tl.sum(mine.to(tl.int32), axis=0) > 0:
        offs_m = pid_m * BLOCK_N + tl.arange(0, BLOCK_N)
        in_m = offs_m < m
        acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
        for r0 in range(0, r, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            in_r = offs_r < r
            ht = tl.load(h_ptr + offs_t[:, None] * stride_ht + offs_r[None, :] * stride_hr,
                         mask=mine[:, None] & in_r[None, :], other=0.0)
            bt = tl.load(b_ptr + slot * stride_bl + offs_m[None, :] * stride_bm
                         + offs_r[:, None] * stride_br,
                         mask=in_m[None, :] & in_r[:, None], other=0.0)
            acc += tl.dot(ht, bt)
        y_ptrs = y_ptr + offs_t[:, None] * stride_yt + offs_m[None, :] * stride_ym
        out_mask = mine[:, None] & in_m[None, :]
        y = tl.load(y_ptrs, mask=out_mask, other=0.0)
        tl.store(y_ptrs, (y.to(tl.float32) + acc).to(y_ptr.dtype.element_ty), mask=out_mask)


def lora_shrink(x: torch.Tensor, a: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """``h[t] = x[t] @ a[slots[t]]^T``: x [T, K], a [L, N, K], slots [T] -> h [T, N] in x's
    dtype (as PEFT rounds it). Rows of slot -1 are left unset: ``lora_expand`` skips them."""
    num_tokens, k = x.shape
    num_slots, n, _ = a.shape
    h = torch.empty(num_tokens, n, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(num_tokens, BLOCK_T), triton.cdiv(n, BLOCK_N), num_slots)
    _shrink_kernel[grid](x, a, slots, h, num_tokens, n, k, x.stride(0), x.stride(1),
                         a.stride(0), a.stride(1), a.stride(2), h.stride(0), h.stride(1),
                         BLOCK_T=BLOCK_T, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)
    return h


def lora_expand(h: torch.Tensor, b: torch.Tensor, slots: torch.Tensor, y: torch.Tensor) -> None:
    """``y[t] += h[t] @ b[slots[t]]^T`` in place: h [T, R], b [L, M, R], y [T, M] (views
    with any strides: one packed slice of a layer's output)."""
    num_tokens, r = h.shape
    num_slots, m, _ = b.shape
    block_r = max(16, triton.next_power_of_2(min(r, BLOCK_K)))  # tl.dot needs >= 16
    grid = (triton.cdiv(num_tokens, BLOCK_T), triton.cdiv(m, BLOCK_N), num_slots)
    _expand_kernel[grid](h, b, slots, y, num_tokens, m, r, h.stride(0), h.stride(1),
                         b.stride(0), b.stride(1), b.stride(2), y.stride(0), y.stride(1),
                         BLOCK_T=BLOCK_T, BLOCK_N=BLOCK_N, BLOCK_R=block_r)
