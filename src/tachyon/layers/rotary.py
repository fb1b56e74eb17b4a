"""Rotary position embedding (NeoX layout: the two halves of each head rotate together, as
in HF Llama/Qwen), with the Llama 3 frequency scaling."""

from __future__ import annotations

import math
import weakref
from typing import Any

import torch
from torch import nn

from tachyon.layers.fused import norm_rope, rope_ref, use_triton


def rope_parameters(hf_config: Any) -> dict[str, Any]:
    """Read rope settings from transformers 5 (``rope_parameters``) or 4 (``rope_theta``...)."""
    params = dict(getattr(hf_config, "rope_parameters", None) or {})
    scaling = getattr(hf_config, "rope_scaling", None) or {}
    for k, v in scaling.items():
        params.setdefault(k, v)
    params.setdefault("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
    params.setdefault("rope_type", params.get("type", "default"))
    return params


def _llama3_inv_freq(inv_freq: torch.Tensor, p: dict[str, Any]) -> torch.Tensor:
    factor, low, high = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
    old_len = p["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths are slowed by `factor`, short ones kept, the band between interpolated.
    smooth = (old_len / wavelen - low) / (high - low)
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    mid = (wavelen <= old_len / low) & (wavelen >= old_len / high)
    return torch.where(mid, (1 - smooth) * inv_freq / factor + smooth * inv_freq, scaled)


# One cos/sin table per distinct (shape, rope settings, device), shared by every layer that
# asks for it: building it in float64 takes ~50 ms on a CPU, once per layer before this.
# Weak values: the table lives as long as a model holds it.
_CACHES: weakref.WeakValueDictionary[tuple, torch.Tensor] = weakref.WeakValueDictionary()


def _cos_sin_cache(head_dim: int, max_position: int, params: dict[str, Any]) -> torch.Tensor:
    key = (head_dim, max_position, repr(sorted(params.items())), str(torch.get_default_device()))
    cache = _CACHES.get(key)
    if cache is not None:
        return cache
    base = float(params["rope_theta"])
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    rope_type = params.get("rope_type", "default")
    if rope_type == "llama3":
        inv_freq = _llama3_inv_freq(inv_freq, params)
    elif rope_type not in ("default", None):
        raise ValueError(f"rope_type {rope_type!r} is not supported (default, llama3)")
    t = torch.arange(max_position, dtype=torch.float64)
    freqs = torch.outer(t, inv_freq)
    # [max_position, head_dim]: cos in the first half, sin in the second.
    cache = torch.cat([freqs.cos(), freqs.sin()], dim=-1).float()
    _CACHES[key] = cache
    return cache


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, max_position: int, params: dict[str, Any]) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.register_buffer("cos_sin_cache", _cos_sin_cache(head_dim, max_position, params),
                             persistent=False)

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
        q_norm: nn.Module | None = None, k_norm: nn.Module | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """q: [T, Hq, D], k: [T, Hk, D] -> rotated copies, after the optional per-head
        RMSNorms (Qwen3), fused into one kernel per tensor on CUDA."""
        if use_triton(q):
            qw, kw = (q_norm.weight, k_norm.weight) if q_norm is not None else (None, None)
            eps = q_norm.eps if q_norm is not None else 0.0
            return norm_rope(positions, q, k, self.cos_sin_cache, qw, kw, eps)
        if q_norm is not None:
            q, k = q_norm(q), k_norm(k)
        return rope_ref(positions, q, k, self.cos_sin_cache)
