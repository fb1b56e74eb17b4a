"""The model runner's side of structured outputs: one xgrammar matcher per constrained
request, advanced by every token it samples, and the step's token bitmask.

The bitmask is filled on the host while the device runs the forward (the runner calls
``bitmask`` after queueing it) and applied by the sampler on the device, so it works in
every CUDA graph mode: the sampler runs outside the graphs. Rows of unconstrained requests
allow every token, so requests with and without constraints share a batch.

A matcher must see each sampled token before the next bitmask. Under asynchronous
scheduling step N+1 is queued before the host has step N's tokens, so the runner, once it has
queued step N+1's forward and before filling its bitmask, waits for step N's tokens and
advances the matchers with them (``ModelRunner._sample``): the device keeps running N+1's
forward while the host waits and fills. Speculative decoding refuses constrained requests (a
verify step would need a mask per draft position).

The bitmask is filled into one of two persistent (pinned, on CUDA) host buffers, alternately:
the copy of step N's mask has finished by the time step N+2 fills the same buffer, because
the engine reads step N's results before it queues step N+2.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from tachyon.sampling_params import SamplingParams
from tachyon.structured_output.compiler import GrammarCompiler, compiler_for

logger = logging.getLogger(__name__)

# A bitmask word holds the allowed-bits of 32 consecutive token ids; -1 allows them all.
ALL_ALLOWED = -1


class StructuredOutputManager:
    def __init__(self, tokenizer_path: str | None, vocab_size: int, device: torch.device,
                 max_rows: int) -> None:
        self.tokenizer_path = tokenizer_path
        self.vocab_size = vocab_size
        self.device = device
        self.max_rows = max_rows
        self._matchers: dict[str, Any] = {}
        self._host_masks: list[torch.Tensor] = []  # two, allocated with the first mask
        self._flip = 0

    def constrains(self, params: list[SamplingParams]) -> bool:
        """Whether any of a step's requests has a grammar."""
        return any(p.structured_outputs is not None for p in params)

    def _compiler(self) -> GrammarCompiler:
        if self.tokenizer_path is None:
            raise ValueError("structured outputs need the model's tokenizer")
        return compiler_for(self.tokenizer_path, self.vocab_size)

    def bitmask(self, request_ids: list[str], params: list[SamplingParams]
                ) -> torch.Tensor | None:
        """[B, ceil(V / 32)] int32 on the device, row ``i`` for ``request_ids[i]``; None when
        no request of the step is constrained (the sampler then does nothing extra)."""
        rows = [(i, rid, p.structured_outputs) for i, (rid, p)
                in enumerate(zip(request_ids, params, strict=True))
                if p.structured_outputs is not None]
        if not rows:
            return None
        import xgrammar as xgr

        if not self._host_masks:
            words = -(-self.vocab_size // 32)
            pin = self.device.type == "cuda"
            self._host_masks = [torch.empty(self.max_rows, words, dtype=torch.int32,
                                            pin_memory=pin) for _ in range(2)]
        self._flip ^= 1
        buf = self._host_masks[self._flip]
        mask = buf[:len(request_ids)]
        mask.fill_(ALL_ALLOWED)
        for i, rid, spec in rows:
            matcher = self._matchers.get(rid)
            if matcher is None:
                matcher = xgr.GrammarMatcher(self._compiler().compile(spec))
                self._matchers[rid] = matcher
            if not matcher.is_terminated():  # ended with the step in flight: row unused
                matcher.fill_next_token_bitmask(buf, i)
        return mask.to(self.device, non_blocking=True)

    def accept(self, request_ids: list[str], token_ids: list[int]) -> None:
        """Advance the constrained requests' matchers by their sampled tokens."""
        if not self._matchers:
            return
        for rid, token in zip(request_ids, token_ids, strict=True):
            matcher = self._matchers.get(rid)
            if matcher is not None and not matcher.is_terminated() \
                    and not matcher.accept_token(token):
                # The mask forbade it, so only a bug gets here; the request goes on unconstrained
                # rather than failing the whole step.
                logger.error("request %s sampled token %d outside its grammar", rid, token)

    def remove(self, request_id: str) -> None:
        self._matchers.pop(request_id, None)
