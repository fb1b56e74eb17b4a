"""Incremental detokenization and stop strings.

Text is produced from a sliding window of token ids: decode ``[prefix, read)`` and
``[prefix, end)``; the difference is the new text. A window whose decoding ends in U+FFFD is
an unfinished multi-byte character, so nothing is emitted until the next token completes it.
"""

from __future__ import annotations

from typing import Any

from tachyon.engine.request import RequestStatus
from tachyon.sampling_params import SamplingParams

# Prompt tokens kept as left context so the first output token decodes with the right spacing.
PROMPT_CONTEXT_TOKENS = 5
REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, prompt_token_ids: list[int], params: SamplingParams) -> None:
        self.tokenizer = tokenizer
        self.skip_special = params.skip_special_tokens
        self.stop_strings = params.stop_strings
        self.include_stop = params.include_stop_str_in_output
        self.tokens: list[int] = list(prompt_token_ids[-PROMPT_CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.tokens)
        self.text = ""
        self.stop_reason: str | None = None
        # While streaming, hold back enough characters that a stop string split across
        # tokens is never half-emitted.
        self.holdback = max((len(s) for s in self.stop_strings), default=1) - 1
        self.emitted = 0

    def _decode(self, ids: list[int]) -> str:
        # A fast tokenizer's Rust backend is what ``decode`` calls without clean-up; calling
        # it directly saves the Python wrapper twice per token (the server's hot path).
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is not None:
            return backend.decode(ids, skip_special_tokens=self.skip_special)
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special,
                                     clean_up_tokenization_spaces=False)

    def add_token(self, token_id: int) -> bool:
        """Append one token. Returns True if a stop string was hit (text is cut there)."""
        self.tokens.append(token_id)
        prefix = self._decode(self.tokens[self.prefix_offset:self.read_offset])
        full = self._decode(self.tokens[self.prefix_offset:])
        if len(full) <= len(prefix) or full.endswith(REPLACEMENT_CHAR):
            return False
        new = full[len(prefix):]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.tokens)
        start = max(0, len(self.text) - self.holdback)
        self.text += new
        return self._check_stop(start)

    def on_token(self, token_id: int, engine_finish: str | None) -> bool:
        """Apply one sampled token, given how the engine ended the request with it (``"stop"``:
        an EOS or stop token, ``"length"``, or ``None``). As in vLLM, the EOS or stop token
        that ended a request adds no text unless ``include_stop_str_in_output``; at the end,
        an unfinished trailing character is emitted as it stands. Returns True if a stop
        string ended the text here."""
        if engine_finish == "stop" and not self.include_stop:
            self.flush()
            return False
        hit = self.add_token(token_id)
        if engine_finish is not None and not hit:
            self.flush()
        return hit

    def _check_stop(self, search_from: int) -> bool:
        for stop in self.stop_strings:
            i = self.text.find(stop, search_from)
            if i >= 0:
                self.text = self.text[: i + len(stop) if self.include_stop else i]
                self.stop_reason = stop
                return True
        return False

    def flush(self) -> None:
        """At the end, emit an unfinished trailing character as it stands."""
        if self.read_offset < len(self.tokens):
            prefix = self._decode(self.tokens[self.prefix_offset:self.read_offset])
            full = self._decode(self.tokens[self.prefix_offset:])
            if len(full) > len(prefix):
                self.text += full[len(prefix):]
            self.read_offset = len(self.tokens)

    def take_delta(self, finished: bool) -> str:
        """Text not yet handed out; while running, keep back what might begin a stop string."""
        end = len(self.text) if finished or not self.stop_strings else max(
            self.emitted, len(self.text) - self.holdback)
        delta = self.text[self.emitted:end]
        self.emitted = end
        return delta


def finish_reason_of(status: RequestStatus) -> str | None:
    """The OpenAI finish reason of a request in ``status`` (None while it runs)."""
    if status is RequestStatus.FINISHED_LENGTH:
        return "length"
    if status is RequestStatus.FINISHED_STOPPED:
        return "stop"
    return "abort" if status is RequestStatus.FINISHED_ABORTED else None
