"""Attention backends by name, and the default per device."""

from __future__ import annotations

import importlib
import os

import torch

from tachyon.attention.base import AttentionBackend

_BACKENDS = {
    "torch": "tachyon.attention.torch_backend:TorchAttentionBackend",
    "triton": "tachyon.attention.triton_backend:TritonAttentionBackend",
    "flex": "tachyon.attention.flex_backend:FlexAttentionBackend",
}


def backend_names() -> list[str]:
    return list(_BACKENDS)


def default_backend(device: torch.device) -> str:
    return "triton" if device.type == "cuda" else "torch"


def get_backend_class(name: str | None, device: torch.device,
                      dtype: torch.dtype) -> type[AttentionBackend]:
    name = name or default_backend(device)
    if name not in _BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; use one of: {', '.join(_BACKENDS)}")
    _check_interpreted_dtype(name, dtype)
    module, cls_name = _BACKENDS[name].split(":")
    try:
        cls = getattr(importlib.import_module(module), cls_name)
    except ImportError as e:
        raise ValueError(f"attention backend {name!r} is not available here: {e}") from e
    cls.check_available(device)
    return cls


def _check_interpreted_dtype(name: str, dtype: torch.dtype) -> None:
    """The Triton interpreter (``TRITON_INTERPRET=1``, how the CPU runs Triton) holds
    bfloat16 as raw uint16 bits, and its ``tl.dot`` multiplies those bits as integers
    (triton-lang/triton#11584, "not supported yet"): the attention kernels would return
    garbage. Refuse rather than generate nonsense. float16 and float32 are exact there."""
    if name == "triton" and dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1":
        raise ValueError(
            "the 'triton' attention backend cannot run bfloat16 under TRITON_INTERPRET=1 (the "
            "Triton interpreter computes bfloat16 dot products on raw bits); use --dtype "
            "float32 or float16, or --attention-backend torch"
        )
