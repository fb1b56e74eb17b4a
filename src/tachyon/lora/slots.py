"""One layer's adapter slots: every adapter's A and B stacked, allocated once.

``a [max_loras, S * R, in]`` holds, for each of the layer's S packed matrices (q, k, v or
gate, up; S = 1 otherwise), R rows of A; ``b [max_loras, out, R]`` holds B's rows at the
matrix's own output offset. Ranks below R are zero-padded, so a slot serves any rank up to
``max_lora_rank`` and every shape is fixed: loading an adapter is a copy into its slot,
and captured CUDA graphs read the new weights on their next replay.
"""

from __future__ import annotations

import torch
from torch import nn

from tachyon.layers.linear import OutputSlices
from tachyon.lora.kernels import kernels_for


class LoRASlots(nn.Module):
    def __init__(self, num_slots: int, max_rank: int, in_features: int, slices: OutputSlices,
                 token_slots: torch.Tensor, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.max_rank, self.slices = max_rank, slices
        out_features = sum(size for _, size in slices)
        self.register_buffer("a", torch.zeros(num_slots, len(slices) * max_rank, in_features,
                                              dtype=dtype, device=device), persistent=False)
        self.register_buffer("b", torch.zeros(num_slots, out_features, max_rank, dtype=dtype,
                                              device=device), persistent=False)
        # Each token's slot (-1: none), shared by every layer: the model runner's persistent
        # input buffer, so the slice a graph captured is refilled every step.
        self.register_buffer("token_slots", token_slots, persistent=False)
        self._shrink, self._expand = kernels_for(device)

    def add_delta(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """``y += B[slot](A[slot] x)`` per token, in place (the scale is folded into B)."""
        slots = self.token_slots[: x.shape[0]]
        h = self._shrink(x, self.a, slots)
        r = self.max_rank
        for i, (offset, size) in enumerate(self.slices):
            self._expand(h[..., i * r:(i + 1) * r], self.b[:, offset:offset + size],
                        slots, y[:, offset:offset + size])
