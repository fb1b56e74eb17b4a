"""Batched LoRA shrink (``h = x @ A[slot]^T``) and expand (``y += h @ B[slot]^T``) per token:
Triton on CUDA (``triton_shrink_expand``), torch everywhere (``reference``)."""

from __future__ import annotations

from collections.abc import Callable

import torch

Shrink = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
Expand = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]


def kernels_for(device: torch.device) -> tuple[Shrink, Expand]:
    """The Triton kernels on CUDA, the torch reference elsewhere."""
    if device.type == "cuda":
        from tachyon.lora.kernels.triton_shrink_expand import lora_expand, lora_shrink

        return lora_shrink, lora_expand
    from tachyon.lora.kernels.reference import expand_ref, shrink_ref

    return shrink_ref, expand_ref
