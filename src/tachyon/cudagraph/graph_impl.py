"""Capture/replay behind a small interface, so the graph machinery also runs on a CPU.

A CUDA graph is, for our purposes, a closure over the tensors it saw at capture: replay
re-runs the same kernels on the same addresses with whatever those addresses hold now.
``EmulatedGraphs`` reproduces exactly that on any device by keeping the captured callable
(and so the capture-time metadata objects) and calling it again on replay. A backend that
builds fresh tensors per step instead of refilling persistent ones reads stale data under
both, which is what the CPU tests check.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any, Protocol

import torch
from torch.utils._pytree import tree_leaves, tree_map


class CapturedGraph(Protocol):
    output: Any  # a tensor, or a tuple/list of them (compiled pieces)

    def replay(self) -> Any: ...


class GraphImpl(Protocol):
    def capture(self, fn: Callable[[], torch.Tensor]) -> CapturedGraph: ...


class _CudaCaptured:
    def __init__(self, graph: torch.cuda.CUDAGraph, output: torch.Tensor) -> None:
        self.graph, self.output = graph, output

    def replay(self) -> torch.Tensor:
        self.graph.replay()
        return self.output


class CudaGraphs:
    """Real CUDA graphs sharing one memory pool."""

    def __init__(self) -> None:
        self.pool = torch.cuda.graph_pool_handle()
        self.stream = torch.cuda.Stream()

    def capture(self, fn: Callable[[], torch.Tensor]) -> _CudaCaptured:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool, stream=self.stream):
            output = fn()
        return _CudaCaptured(graph, output)


class _EmulatedCaptured:
    def __init__(self, fn: Callable[[], Any], output: Any) -> None:
        self.fn, self.output = fn, output

    def replay(self) -> Any:
        # Same closure, same capture-time objects; results land in the static outputs.
        for static, fresh in zip(tree_leaves(self.output), tree_leaves(self.fn()), strict=True):
            if isinstance(static, torch.Tensor):
                static.copy_(fresh)
        return self.output


class EmulatedGraphs:
    def capture(self, fn: Callable[[], Any]) -> _EmulatedCaptured:
        out = tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, fn())
        return _EmulatedCaptured(fn, out)


@contextmanager
def frozen_gc() -> Any:
    """Capture with the collector frozen: a collection mid-capture would free tensors whose
    memory the graph then reuses, and freezing makes each capture much faster."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
