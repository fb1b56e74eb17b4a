"""The per-step state the attention layers read: set and cleared in one place.

The model's ``forward(input_ids, positions)`` signature stays free of attention metadata (so
it can be traced by torch.compile and captured by CUDA graphs unchanged); the model runner
wraps each forward in ``set_forward_context`` and the attention op reads it back.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from tachyon.attention.base import AttentionBackend


@dataclass
class ForwardContext:
    backend: AttentionBackend
    attn_metadata: Any  # None during the memory-profiling run: attention writes zeros
    kv_caches: list[tuple[torch.Tensor, torch.Tensor]]
    # Set only while a breakable (PIECEWISE) graph is being captured: attention calls it to
    # end the current graph segment (see tachyon.cudagraph.breakable).
    breaker: Any = None
    # Whether some token of the batch has an adapter slot: LoRA layers skip their shrink and
    # expand kernels (and take the base model's fused paths) when False. A plain Python
    # branch, so a graph captured with False holds none of them (``BatchDescriptor.has_lora``).
    has_lora: bool = False


_CONTEXT: ForwardContext | None = None


@contextmanager
def set_forward_context(ctx: ForwardContext) -> Iterator[None]:
    global _CONTEXT
    prev, _CONTEXT = _CONTEXT, ctx
    try:
        yield
    finally:
        _CONTEXT = prev


def get_forward_context() -> ForwardContext:
    if _CONTEXT is None:
        raise RuntimeError(
            "attention ran outside set_forward_context(); call the model via ModelRunner")
    return _CONTEXT
