"""Attention backends by name, and the default per device."""

from __future__ import annotations

import importlib

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


def get_backend_class(name: str | None, device: torch.device) -> type[AttentionBackend]:
    name = name or default_backend(device)
    if name not in _BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; use one of: {', '.join(_BACKENDS)}")
    module, cls_name = _BACKENDS[name].split(":")
    try:
        cls = getattr(importlib.import_module(module), cls_name)
    except ImportError as e:
        raise ValueError(f"attention backend {name!r} is not available here: {e}") from e
    cls.check_available(device)
    return cls
