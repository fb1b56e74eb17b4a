"""The one place that decides how a batch runs: ``(num_tokens, uniform_decode) -> (mode, size)``.

Priority FULL > PIECEWISE > NONE. A batch above the largest captured size runs eagerly.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

from tachyon.cudagraph.modes import CUDAGraphMode, RuntimeMode


@dataclass(frozen=True)
class BatchDescriptor:
    """What a captured graph is keyed by. Invariant: ``num_tokens`` is a capture size."""

    num_tokens: int
    uniform_decode: bool


class CudagraphDispatcher:
    def __init__(self, mode: CUDAGraphMode, capture_sizes: tuple[int, ...]) -> None:
        if not capture_sizes or list(capture_sizes) != sorted(set(capture_sizes)):
            raise ValueError(f"capture sizes must be ascending and distinct: {capture_sizes}")
        self.mode = mode
        self.sizes = capture_sizes

    def padded_size(self, num_tokens: int) -> int | None:
        """Smallest capture size >= num_tokens, or None above the largest."""
        i = bisect.bisect_left(self.sizes, num_tokens)
        return self.sizes[i] if i < len(self.sizes) else None

    def dispatch(self, num_tokens: int, uniform_decode: bool) -> tuple[RuntimeMode, int]:
        wanted = self.mode.decode_mode if uniform_decode else self.mode.mixed_mode
        padded = self.padded_size(num_tokens)
        if wanted is RuntimeMode.NONE or padded is None:
            return RuntimeMode.NONE, num_tokens
        return wanted, padded

    def graph_keys(self) -> list[tuple[RuntimeMode, BatchDescriptor]]:
        """Every graph to capture, largest first (later, smaller captures reuse the pool).

        FULL graphs are keyed by (size, uniform_decode): decode graphs may use a decode-only
        attention kernel. PIECEWISE graphs hold no attention, so one per size serves both.
        """
        keys = []
        halves = (self.mode.decode_mode, self.mode.mixed_mode)
        for size in reversed(self.sizes):
            if self.mode.decode_mode is RuntimeMode.FULL:
                keys.append((RuntimeMode.FULL, BatchDescriptor(size, True)))
            if self.mode.mixed_mode is RuntimeMode.FULL:
                keys.append((RuntimeMode.FULL, BatchDescriptor(size, False)))
            if RuntimeMode.PIECEWISE in halves:
                keys.append((RuntimeMode.PIECEWISE, BatchDescriptor(size, False)))
        return keys
