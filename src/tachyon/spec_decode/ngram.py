"""N-gram prompt lookup: draft the tokens that followed the last time the request's current
suffix appeared in its own tokens (prompt and output).

No weights and no device: the scheduler asks for drafts while it schedules a decode. Each
request's tokens are mirrored in a growing numpy buffer (synced lazily: only the tokens
appended since the last lookup are copied), and the match is one vectorised comparison over
the whole history, so a lookup costs no Python loop per token.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

# Never a token id: pads the front of the history so every position has a full window.
_NO_TOKEN = -1


def find_draft(tokens: np.ndarray, min_n: int, max_n: int, k: int) -> np.ndarray:
    """Up to ``k`` tokens that followed an earlier occurrence of the longest suffix of
    ``tokens`` (between ``min_n`` and ``max_n`` long): the latest one followed by ``k``
    tokens, else the earliest; empty when no suffix of ``min_n`` tokens occurred before."""
    num = len(tokens)
    max_n = min(max_n, num - 1)
    if k < 1 or max_n < min_n:
        return tokens[:0]
    suffix = tokens[num - max_n:]
    # Window e holds the max_n tokens ending at position e of the history (the last token
    # excluded, so at least one token follows every match).
    history = np.concatenate([np.full(max_n - 1, _NO_TOKEN, dtype=tokens.dtype),
                              tokens[:num - 1]])
    windows = sliding_window_view(history, max_n)
    # Matched length at e: how many tokens, counted back from e, equal the suffix's tail.
    matched = np.cumprod(windows[:, ::-1] == suffix[::-1], axis=1).sum(axis=1)
    best = int(matched.max())
    if best < min_n:
        return tokens[:0]
    ends = np.flatnonzero(matched == best)
    # The latest match with k tokens after it (recent text predicts best); else the
    # earliest, which has the most (in a run of one token the latest has only one).
    full = ends[ends <= num - 1 - k]
    end = int(full[-1]) if len(full) else int(ends[0])
    return tokens[end + 1:end + 1 + k]


class _History:
    """A request's tokens as a numpy array that grows by doubling."""

    def __init__(self) -> None:
        self.buf = np.empty(64, dtype=np.int64)
        self.len = 0

    def sync(self, token_ids: list[int]) -> np.ndarray:
        n = len(token_ids)
        if n > len(self.buf):
            grown = np.empty(max(n, 2 * len(self.buf)), dtype=np.int64)
            grown[:self.len] = self.buf[:self.len]
            self.buf = grown
        if n > self.len:
            self.buf[self.len:n] = token_ids[self.len:n]
        self.len = n
        return self.buf[:n]


class NgramProposer:
    def __init__(self, num_speculative_tokens: int, min_n: int, max_n: int) -> None:
        self.k, self.min_n, self.max_n = num_speculative_tokens, min_n, max_n
        self._histories: dict[str, _History] = {}

    def propose(self, request_id: str, token_ids: list[int], max_drafts: int) -> list[int]:
        """Drafts for the request whose tokens so far are ``token_ids`` (only ever appended
        to between calls), at most ``min(k, max_drafts)``."""
        hist = self._histories.get(request_id)
        if hist is None:
            hist = self._histories[request_id] = _History()
        tokens = hist.sync(token_ids)
        return find_draft(tokens, self.min_n, self.max_n, min(self.k, max_drafts)).tolist()

    def drop(self, request_id: str) -> None:
        self._histories.pop(request_id, None)
