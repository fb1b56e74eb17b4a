"""Triton kernels for batched LoRA: shrink ``h = x @ A[slot]^T`` and expand
``y += h @ B[slot]^T``, each token with its own adapter slot.

Segmented by slot on the grid: one program per (token block, output block, slot). A program
loads the block's slot ids, and if any token there uses its slot it multiplies those rows
(the others masked to zero) with that slot's weights on the tensor cores and writes only
them. A token block of one adapter (the common case) costs one dense tile; blocks mixing
adapters cost one tile per adapter present; programs whose slot is absent exit after one
load. The grid depends only on shapes, never on which slots are in use, so a captured CUDA
graph serves any mix of adapters. The reduction length (hidden size, rank) is a compile-time
constant: a handful of values per model, and loops of known trip count. The shrink splits
its reduction (``K_SPLIT``) over programs and leaves float32 partials that the expand sums.
Slot -1 (no adapter) matches no program: those rows are never written nor read, and ``y``
keeps its base value.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Tokens per program: tl.dot's smallest tile side. Decode batches are small, and a larger
# block would mix more adapters into one tile (one pass per adapter present).
BLOCK_T = 16
# Output columns per expand program; shrink's output (the packed ranks, 16-64 wide) gets a
# tile of its own width.
BLOCK_N = 64
# Reduction tile of the shrink (the hidden size: thousands), and the reduction length one
# shrink program covers. A decode batch has a handful of token blocks, so a shrink that
# walked the whole hidden size in one program ran a few programs serially for ~K/64 steps:
# split-K gives each program K_SPLIT and writes one float32 partial per split, which the
# expand sums (fixed order: deterministic) before rounding to the model's dtype as PEFT does.
BLOCK_K = 64
K_SPLIT = 256


@triton.jit
def _shrink_kernel(x_ptr, a_ptr, slots_ptr, p_ptr, num_tokens, n, k: tl.constexpr,
                   num_splits: tl.constexpr,
                   stride_xt, stride_xk, stride_al, stride_an, stride_ak,
                   stride_ps, stride_pt, stride_pn,
                   BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   K_SPLIT: tl.constexpr):
    pid_t, pid_n, pid_ls = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    slot, split = pid_ls // num_splits, pid_ls % num_splits
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    tok_slot = tl.load(slots_ptr + offs_t, mask=offs_t < num_tokens, other=-1)
    mine = tok_slot == slot
    if tl.sum(mine.to(tl.int32), axis=0) > 0:
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K_SPLIT, BLOCK_K):  # constant trip count: this split's piece
            offs_k = split * K_SPLIT + k0 + tl.arange(0, BLOCK_K)
            in_k = offs_k < k
            xt = tl.load(x_ptr + offs_t[:, None] * stride_xt + offs_k[None, :] * stride_xk,
                         mask=mine[:, None] & in_k[None, :], other=0.0)
            at = tl.load(a_ptr + slot * stride_al + offs_n[None, :] * stride_an
                         + offs_k[:, None] * stride_ak,
                         mask=(offs_n < n)[None, :] & in_k[:, None], other=0.0)
            acc += tl.dot(xt, at)
        tl.store(p_ptr + split * stride_ps + offs_t[:, None] * stride_pt
                 + offs_n[None, :] * stride_pn,
                 acc, mask=mine[:, None] & (offs_n < n)[None, :])


@triton.jit
def _expand_kernel(p_ptr, b_ptr, slots_ptr, y_ptr, num_tokens, m, r: tl.constexpr,
                   num_splits: tl.constexpr,
                   stride_ps, stride_pt, stride_pr, stride_bl, stride_bm, stride_br,
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
            h = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
            for s in range(num_splits):  # the shrink's partial sums, in a fixed order
                h += tl.load(p_ptr + s * stride_ps + offs_t[:, None] * stride_pt
                             + offs_r[None, :] * stride_pr,
                             mask=mine[:, None] & in_r[None, :], other=0.0)
            ht = h.to(b_ptr.dtype.element_ty)  # h in the model's dtype, as PEFT rounds it
            bt = tl.load(b_ptr + slot * stride_bl + offs_m[None, :] * stride_bm
                         + offs_r[:, None] * stride_br,
                         mask=in_m[None, :] & in_r[:, None], other=0.0)
            acc += tl.dot(ht, bt)
        y_ptrs = y_ptr + offs_t[:, None] * stride_yt + offs_m[None, :] * stride_ym
        out_mask = mine[:, None] & in_m[None, :]
        y = tl.load(y_ptrs, mask=out_mask, other=0.0)
        tl.store(y_ptrs, (y.to(tl.float32) + acc).to(y_ptr.dtype.element_ty), mask=out_mask)


def lora_shrink(x: torch.Tensor, a: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """``x[t] @ a[slots[t]]^T`` as float32 partial sums over ``K_SPLIT``-long pieces of the
    reduction: x [T, K], a [L, N, K], slots [T] -> [S, T, N], which ``lora_expand`` sums and
    rounds to x's dtype (slice the last dimension for one packed matrix). Rows of slot -1
    are left unset: ``lora_expand`` skips them."""
    num_tokens, k = x.shape
    num_slots, n, _ = a.shape
    splits = triton.cdiv(k, K_SPLIT)
    partials = torch.empty(splits, num_tokens, n, dtype=torch.float32, device=x.device)
    block_n = min(BLOCK_N, max(16, triton.next_power_of_2(n)))
    grid = (triton.cdiv(num_tokens, BLOCK_T), triton.cdiv(n, block_n), num_slots * splits)
    _shrink_kernel[grid](x, a, slots, partials, num_tokens, n, k, splits,
                         x.stride(0), x.stride(1), a.stride(0), a.stride(1), a.stride(2),
                         partials.stride(0), partials.stride(1), partials.stride(2),
                         BLOCK_T=BLOCK_T, BLOCK_N=block_n, BLOCK_K=BLOCK_K, K_SPLIT=K_SPLIT)
    return partials


def lora_expand(h: torch.Tensor, b: torch.Tensor, slots: torch.Tensor, y: torch.Tensor) -> None:
    """``y[t] += h[t] @ b[slots[t]]^T`` in place: h the shrink's partials [S, T, R] (a slice
    of their last dimension), b [L, M, R], y [T, M] (views with any strides: one packed
    slice of a layer's output)."""
    splits, num_tokens, r = h.shape
    num_slots, m, _ = b.shape
    block_r = max(16, triton.next_power_of_2(min(r, BLOCK_K)))  # tl.dot needs >= 16
    grid = (triton.cdiv(num_tokens, BLOCK_T), triton.cdiv(m, BLOCK_N), num_slots)
    _expand_kernel[grid](h, b, slots, y, num_tokens, m, r, splits,
                         h.stride(0), h.stride(1), h.stride(2),
                         b.stride(0), b.stride(1), b.stride(2), y.stride(0), y.stride(1),
                         BLOCK_T=BLOCK_T, BLOCK_N=BLOCK_N, BLOCK_R=block_r)
