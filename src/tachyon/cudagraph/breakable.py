"""PIECEWISE graphs without a compiler (seed 004: "breakable" CUDA graphs).

While capturing, every attention call ends the current graph segment, runs attention
eagerly, and opens a new segment in the same pool. Replay walks the list:
``segment, attention, segment, attention, ..., segment``. Attention at replay reads the live
step metadata (it is eager), so only the non-attention work must be shape-static; the KV
write inside attention uses the persistent ``slot_mapping``.

Each graph keeps the tensors that cross its breaks (query, key, value, output of every
layer) alive, so they cannot be pooled with other graphs'. For the large mixed sizes
(``SharedAttentionIO``) every layer of every such graph uses one set of buffers instead:
the segment copies query/key/value into them before the break and the layer's output is
the shared output buffer. That is safe because segments, attention calls and graphs all run
in order on one stream; it costs three copies per layer, paid only by the large mixed
steps, and keeps their memory at one layer's I/O for the largest size.
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


class SharedAttentionIO:
    """Attention inputs and output shared by every layer of every graph that uses it,
    allocated at the first (largest) capture's shapes, ``max_tokens`` rows."""

    def __init__(self, max_tokens: int) -> None:
        self.max_tokens = max_tokens
        self.buffers: dict[str, torch.Tensor] = {}

    def view(self, name: str, like: torch.Tensor) -> torch.Tensor:
        n = like.shape[0]
        buf = self.buffers.get(name)
        if buf is None:
            buf = torch.empty((self.max_tokens, *like.shape[1:]), dtype=like.dtype,
                              device=like.device)
            self.buffers[name] = buf
        if n > self.max_tokens or buf.shape[1:] != like.shape[1:] or buf.dtype != like.dtype:
            raise RuntimeError(f"shared attention buffer {name!r} {tuple(buf.shape)} "
                               f"{buf.dtype} cannot hold {tuple(like.shape)} {like.dtype}")
        return buf[:n]


class BreakableCapture:
    """The capture session; the attention op calls ``split`` while one is active."""

    def __init__(self, pool: object, attend: Callable[[_AttentionCall], None],
                 shared: SharedAttentionIO | None = None) -> None:
        self.pool = pool
        self.attend = attend
        self.shared = shared
        self.graph = BreakableGraph()
        self._current: torch.cuda.CUDAGraph | None = None

    def output_like(self, query: torch.Tensor) -> torch.Tensor:
        """Where the attention layer lets attention write its output."""
        if self.shared is None:
            return torch.empty_like(query)
        return self.shared.view("output", query)

    def begin(self) -> None:
        self._current = torch.cuda.CUDAGraph()
        self._current.capture_begin(pool=self.pool)

    def split(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              output: torch.Tensor, layer_idx: int) -> None:
        """End the running segment at an attention call, run attention eagerly, start the next."""
        if self.shared is not None:
            shared = [self.shared.view(name, t)
                      for name, t in (("query", query), ("key", key), ("value", value))]
            for dst, src in zip(shared, (query, key, value), strict=True):
                dst.copy_(src)  # captured: the segment's last kernels
            query, key, value = shared
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
