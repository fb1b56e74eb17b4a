"""The one place that decides how a batch runs: ``(num_tokens, uniform_query_len) -> (mode,
graph key)``.

Priority FULL > PIECEWISE > NONE. A batch above the largest captured size runs eagerly.
Mixed batches may also replay graphs of ``mixed_sizes``, above the decode sizes (a decode
batch never exceeds ``max_num_seqs`` tokens; a step with a prompt chunk often does). A
*uniform batch* has the same number of query tokens in every request: decode (1 each) and,
with speculative decoding, verify batches (1 + k each). Decode batches follow the mode's
decode half; verify batches too, in FULL graphs of their own, where the attention backend
can capture uniform batches (support ``UNIFORM_BATCH`` and above); otherwise they run as
mixed batches.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

from tachyon.cudagraph.modes import CUDAGraphMode, RuntimeMode

MIXED = 0  # uniform_query_len of a batch whose requests differ in query length


@dataclass(frozen=True)
class BatchDescriptor:
    """What a captured graph is keyed by.

    ``uniform_query_len``: ``MIXED`` (0), or the query tokens of every request (1: decode,
    1 + k: verify). Invariant: ``num_tokens`` is a capture size, times ``uniform_query_len``
    for a verify key (its capture sizes count requests).
    """

    num_tokens: int
    uniform_query_len: int = MIXED

    @property
    def uniform_decode(self) -> bool:
        return self.uniform_query_len == 1

    def num_reqs(self, max_num_seqs: int) -> int:
        """Requests a FULL graph of this key is shaped for (padding included): whole
        requests of a uniform batch; otherwise one per token up to the seat limit."""
        if self.uniform_query_len > 1:
            return self.num_tokens // self.uniform_query_len
        return min(self.num_tokens, max_num_seqs)


class CudagraphDispatcher:
    def __init__(self, mode: CUDAGraphMode, capture_sizes: tuple[int, ...],
                 verify_query_len: int = 0, max_num_tokens: int | None = None,
                 mixed_sizes: tuple[int, ...] = ()) -> None:
        """``verify_query_len``: 1 + k when speculative verify batches get FULL graphs of
        their own (the backend can capture uniform batches), else 0. Their capture sizes
        are the request counts whose tokens fit ``max_num_tokens``."""
        if not capture_sizes or list(capture_sizes) != sorted(set(capture_sizes)):
            raise ValueError(f"capture sizes must be ascending and distinct: {capture_sizes}")
        if mixed_sizes and (list(mixed_sizes) != sorted(set(mixed_sizes))
                            or mixed_sizes[0] <= capture_sizes[-1]):
            raise ValueError(f"mixed sizes must be ascending, distinct and above the capture "
                             f"sizes: {mixed_sizes}")
        self.mode = mode
        self.sizes = capture_sizes
        # Every size a mixed batch can replay (only where the mode's mixed half has graphs).
        self.mixed_sizes = mixed_sizes if mode.mixed_mode is not RuntimeMode.NONE else ()
        self._all_mixed = capture_sizes + self.mixed_sizes
        full_verify = verify_query_len > 1 and mode.decode_mode is RuntimeMode.FULL
        self.verify_len = verify_query_len if full_verify else 0
        limit = max_num_tokens if max_num_tokens is not None else capture_sizes[-1]
        self.verify_sizes = tuple(s for s in capture_sizes if s * self.verify_len <= limit) \
            if self.verify_len else ()

    def padded_size(self, num_tokens: int) -> int | None:
        """Smallest capture size >= num_tokens, or None above the largest."""
        return _ceil_in(self.sizes, num_tokens)

    def descriptor(self, num_tokens: int,
                   uniform_query_len: int) -> tuple[RuntimeMode, BatchDescriptor]:
        """How a batch of ``num_tokens`` runs, and the key of the graph it replays (for NONE:
        the batch itself, unpadded)."""
        q = int(uniform_query_len)
        if q > 1:
            if q == self.verify_len:
                reqs = _ceil_in(self.verify_sizes, num_tokens // q)
                if reqs is not None:
                    return RuntimeMode.FULL, BatchDescriptor(reqs * q, q)
            q = MIXED  # no verify graph for it: served like any mixed batch
        wanted = self.mode.decode_mode if q == 1 else self.mode.mixed_mode
        padded = self.padded_size(num_tokens) if q == 1 else _ceil_in(self._all_mixed,
                                                                       num_tokens)
        if wanted is RuntimeMode.NONE or padded is None:
            return RuntimeMode.NONE, BatchDescriptor(num_tokens, q)
        return wanted, BatchDescriptor(padded, q)

    def dispatch(self, num_tokens: int, uniform_query_len: int) -> tuple[RuntimeMode, int]:
        """``descriptor`` reduced to (mode, padded token count)."""
        mode, desc = self.descriptor(num_tokens, uniform_query_len)
        return mode, desc.num_tokens

    def graph_keys(self) -> list[tuple[RuntimeMode, BatchDescriptor]]:
        """Every graph to capture, largest first (later, smaller captures reuse the pool).

        FULL graphs are keyed by (size, uniform query length): decode graphs may use a
        decode-only attention kernel, verify graphs are shaped for whole requests of 1 + k
        tokens. PIECEWISE graphs hold no attention, so one per size serves every batch.
        """
        keys = []
        halves = (self.mode.decode_mode, self.mode.mixed_mode)
        for size in reversed(self.sizes):
            if size in self.verify_sizes:
                keys.append((RuntimeMode.FULL,
                             BatchDescriptor(size * self.verify_len, self.verify_len)))
            if self.mode.decode_mode is RuntimeMode.FULL:
                keys.append((RuntimeMode.FULL, BatchDescriptor(size, 1)))
            if self.mode.mixed_mode is RuntimeMode.FULL:
                keys.append((RuntimeMode.FULL, BatchDescriptor(size, MIXED)))
            if RuntimeMode.PIECEWISE in halves:
                keys.append((RuntimeMode.PIECEWISE, BatchDescriptor(size, MIXED)))
        for size in self.mixed_sizes:
            keys.append((self.mode.mixed_mode, BatchDescriptor(size, MIXED)))
        keys.sort(key=lambda key: -key[1].num_tokens)  # stable: verify keys can be larger
        return keys


def _ceil_in(sizes: tuple[int, ...], n: int) -> int | None:
    i = bisect.bisect_left(sizes, n)
    return sizes[i] if i < len(sizes) else None
