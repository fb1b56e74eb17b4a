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

With LoRA on, every graph exists twice, keyed by ``has_lora``: a batch in which no token
has an adapter replays the variant captured without the LoRA kernels, i.e. the base model's
graph; any other batch replays the variant with them (adapter slot ids are read from a
persistent buffer, so changing adapters never recaptures).
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

    ``has_lora``: whether the graph runs the LoRA shrink/expand kernels. Invariant: False
    for every key of an engine without LoRA; a key with False holds exactly the base model's
    kernels, so only a batch in which no token has an adapter slot may replay it.
    """

    num_tokens: int
    uniform_query_len: int = MIXED
    has_lora: bool = False

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
                 mixed_sizes: tuple[int, ...] = (),
                 lora_variants: tuple[bool, ...] = (False,)) -> None:
        """``verify_query_len``: 1 + k when speculative verify batches get FULL graphs of
        their own (the backend can capture uniform batches), else 0. Their capture sizes
        are the request counts whose tokens fit ``max_num_tokens``.

        ``lora_variants``: the ``has_lora`` values every graph is captured with: ``(False,)``
        without LoRA, ``(False, True)`` with it, ``(True,)`` where the graphs cannot leave
        the LoRA kernels out (the compiled PIECEWISE backend)."""
        if not capture_sizes or list(capture_sizes) != sorted(set(capture_sizes)):
            raise ValueError(f"capture sizes must be ascending and distinct: {capture_sizes}")
        if mixed_sizes and (list(mixed_sizes) != sorted(set(mixed_sizes))
                            or mixed_sizes[0] <= capture_sizes[-1]):
            raise ValueError(f"mixed sizes must be ascending, distinct and above the capture "
                             f"sizes: {mixed_sizes}")
        if lora_variants not in ((False,), (True,), (False, True)):
            raise ValueError(f"lora variants must be (False,), (True,) or (False, True): "
                             f"{lora_variants}")
        self.mode = mode
        self.sizes = capture_sizes
        self.lora_variants = lora_variants
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

    def descriptor(self, num_tokens: int, uniform_query_len: int,
                   has_lora: bool = False) -> tuple[RuntimeMode, BatchDescriptor]:
        """How a batch of ``num_tokens`` runs, and the key of the graph it replays (for NONE:
        the batch itself, unpadded). ``has_lora``: some token of the batch has an adapter
        slot; a graph key takes the variant that serves it (an eager batch keeps it as is)."""
        q = int(uniform_query_len)
        lora = self.lora_variants[-1] if has_lora else self.lora_variants[0]
        if q > 1:
            if q == self.verify_len:
                reqs = _ceil_in(self.verify_sizes, num_tokens // q)
                if reqs is not None:
                    return RuntimeMode.FULL, BatchDescriptor(reqs * q, q, lora)
            q = MIXED  # no verify graph for it: served like any mixed batch
        wanted = self.mode.decode_mode if q == 1 else self.mode.mixed_mode
        padded = self.padded_size(num_tokens) if q == 1 else _ceil_in(self._all_mixed,
                                                                       num_tokens)
        if wanted is RuntimeMode.NONE or padded is None:
            return RuntimeMode.NONE, BatchDescriptor(num_tokens, q, has_lora)
        return wanted, BatchDescriptor(padded, q, lora)

    def dispatch(self, num_tokens: int, uniform_query_len: int,
                 has_lora: bool = False) -> tuple[RuntimeMode, int]:
        """``descriptor`` reduced to (mode, padded token count)."""
        mode, desc = self.descriptor(num_tokens, uniform_query_len, has_lora)
        return mode, desc.num_tokens

    def graph_keys(self) -> list[tuple[RuntimeMode, BatchDescriptor]]:
        """Every graph to capture, largest first (later, smaller captures reuse the pool).

        FULL graphs are keyed by (size, uniform query length): decode graphs may use a
        decode-only attention kernel, verify graphs are shaped for whole requests of 1 + k
        tokens. PIECEWISE graphs hold no attention, so one per size serves every batch. Each
        key exists once per LoRA variant (``lora_variants``).
        """
        keys = []
        halves = (self.mode.decode_mode, self.mode.mixed_mode)
        for size in reversed(self.sizes):
            for lora in self.lora_variants:
                if size in self.verify_sizes:
                    keys.append((RuntimeMode.FULL, BatchDescriptor(
                        size * self.verify_len, self.verify_len, lora)))
                if self.mode.decode_mode is RuntimeMode.FULL:
                    keys.append((RuntimeMode.FULL, BatchDescriptor(size, 1, lora)))
                if self.mode.mixed_mode is RuntimeMode.FULL:
                    keys.append((RuntimeMode.FULL, BatchDescriptor(size, MIXED, lora)))
                if RuntimeMode.PIECEWISE in halves:
                    keys.append((RuntimeMode.PIECEWISE, BatchDescriptor(size, MIXED, lora)))
        for size in self.mixed_sizes:
            for lora in self.lora_variants:
                keys.append((self.mode.mixed_mode, BatchDescriptor(size, MIXED, lora)))
        keys.sort(key=lambda key: -key[1].num_tokens)  # stable: verify keys can be larger
        return keys


def _ceil_in(sizes: tuple[int, ...], n: int) -> int | None:
    i = bisect.bisect_left(sizes, n)
    return sizes[i] if i < len(sizes) else None
