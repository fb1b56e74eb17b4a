"""Batched LoRA shrink/expand in plain torch: the CPU path and the kernels' reference.

Shape-static and free of data-dependent control flow, so CUDA graphs (and their CPU
emulation) capture it as is: every slot is computed and a one-hot mask of each token's slot
keeps its own (slot -1 matches none: no delta). The extra work is ``max_loras`` times a
rank-wide GEMM, small next to the base layer.
"""

from __future__ import annotations

import torch


def _slot_mask(slots: torch.Tensor, num_slots: int, dtype: torch.dtype) -> torch.Tensor:
    """[T, L]: 1 where token t uses slot l."""
    ids = torch.arange(num_slots, device=slots.device)
    return (slots[:, None] == ids[None, :]).to(dtype)


def shrink_ref(x: torch.Tensor, a: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """``h[t] = x[t] @ a[slots[t]]^T``; x [T, K], a [L, N, K] -> h [T, N] (0 for slot -1)."""
    num_slots, n, k = a.shape
    h_all = (x @ a.reshape(num_slots * n, k).T).view(x.shape[0], num_slots, n)
    return (h_all * _slot_mask(slots, num_slots, x.dtype)[:, :, None]).sum(dim=1)


def expand_ref(h: torch.Tensor, b: torch.Tensor, slots: torch.Tensor, y: torch.Tensor) -> None:
    """``y[t] += h[t] @ b[slots[t]]^T`` in place; h [T, R], b [L, M, R], y [T, M]."""
    num_slots, m, r = b.shape
    masked = h[:, None, :] * _slot_mask(slots, num_slots, h.dtype)[:, :, None]  # [T, L, R]
    y += masked.reshape(h.shape[0], num_slots * r) @ b.permute(0, 2, 1).reshape(num_slots * r, m)
