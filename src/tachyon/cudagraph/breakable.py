"""PIECEWISE graphs without a compiler (seed 004: "breakable" CUDA graphs).

While capturing, every attention call ends the current graph segment, runs attention
eagerly, and opens a new segment in the same pool. Replay walks the list:
``segment, attention, segment, attention, ..., segment``. Attention at replay reads the live
step metadata (it is eager), so only the non-attention work must be shape-static; the KV
write inside attention uses the persistent ``slot_mapping``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch


@dataclass
class _AttentionCall:
    """One attention call site, with the static tensors the graphs read and write."""

    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    output: torch.Tensor
    layer_idx: int


@dataclass
class BreakableGraph:
    segments: list[torch.cuda.CUDAGraph] = field(default_factory=list)
    calls: list[_AttentionCall] = field(default_factory=list)
    output: torch.Tensor | None = None

    def replay(self, attend: Callable[[_AttentionCall], None]) -> torch.Tensor:
        for i, seg in enumerate(self.segments):
            seg.replay()
            if i < len(self.calls):
                attend(self.calls[i])
        assert self.output is not None
        return self.output


class BreakableCapture:
    """The capture session; the attention op calls ``split`` while one is active."""

    def __init__(self, pool: object, attend: Callable[[_AttentionCall], None]) -> None:
        self.pool = pool
        self.attend = attend
        self.graph = BreakableGraph()
        self._current: torch.cuda.CUDAGraph | None = None

    def begin(self) -> None:
        self._current = torch.cuda.CUDAGraph()
        self._current.capture_begin(pool=self.pool)

    def split(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              output: torch.Tensor, layer_idx: int) -> None:
        """End the running segment at an attention call, run attention eagerly, start the next."""
        self._end_segment()
        call = _AttentionCall(query, key, value, output, layer_idx)
        self.graph.calls.append(call)
        self.attend(call)
        self.begin()

    def finish(self, output: torch.Tensor) -> BreakableGraph:
        self._end_segment()
        self.graph.output = output
        return self.graph

    def _end_segment(self) -> None:
        assert self._current is not None
        self._current.capture_end()
        self.graph.segments.append(self._current)
        self._current = None
