"""The CUDA graph mode a runner uses, decided once at start-up."""

from __future__ import annotations

import logging
import os

import torch

from tachyon.attention.base import AttentionBackend
from tachyon.config import CompilationConfig
from tachyon.cudagraph.modes import CUDAGraphMode, resolve_cudagraph_mode

logger = logging.getLogger(__name__)

ENV_EMULATE_GRAPHS = "TACHYON_EMULATE_CUDAGRAPHS"


def emulate_graphs(device: torch.device) -> bool:
    """Graph replay emulated on a CPU (tests): see tachyon.cudagraph.graph_impl."""
    return device.type != "cuda" and os.environ.get(ENV_EMULATE_GRAPHS) == "1"


def resolve_graph_mode(compilation: CompilationConfig, backend: AttentionBackend,
                       on_cuda: bool) -> CUDAGraphMode:
    """Meet the requested mode (by default FULL_AND_PIECEWISE where graphs run, real or
    emulated, else NONE) with the backend's support level, at start-up: a request no
    downgrade can serve fails here, before any memory is spent."""
    requested = compilation.cudagraph_mode or (
        CUDAGraphMode.FULL_AND_PIECEWISE if on_cuda else CUDAGraphMode.NONE)
    res = resolve_cudagraph_mode(requested, backend.name, backend.cudagraph_support, on_cuda)
    if res.warning:
        logger.warning(res.warning)
    return res.mode
