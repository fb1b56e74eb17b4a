"""Activations."""

from __future__ import annotations

import torch
from torch import nn

from tachyon.layers.fused import silu_and_mul, silu_and_mul_ref, use_triton


class SiluAndMul(nn.Module):
    """``silu(x[..., :d]) * x[..., d:]`` for the packed gate_up projection output."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return silu_and_mul(x) if use_triton(x) else silu_and_mul_ref(x)
