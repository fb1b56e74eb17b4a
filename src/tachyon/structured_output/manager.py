"""The model runner's side of structured outputs: one xgrammar matcher per constrained
request, advanced by every token it samples, and the step's token bitmask.

The bitmask is filled on the host while the device runs the forward (the runner calls
``bitmask`` after queueing it) and applied by the sampler on the device, so it works in
every CUDA graph mode: the sampler runs outside the graphs. Rows of unconstrained requests
allow every token, so requests with and without constraints share a batch.

A matcher must see each sampled token before the next bitmask: the engine core runs steps
of constrained requests synchronously (no asynchronous scheduling), and refuses them with
speculative decoding (a verify step would need a mask per draft position).
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
    def __init__(self, tokenizer_path: str | None, vocab_size: int,
                 device: torch.device) -> None:
        self.tokenizer_path = tokenizer_path
        self.vocab_size = vocab_size
        self.device = device
        self._matchers: dict[str, Any] = {}

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

        mask = xgr.allocate_token_bitmask(len(request_ids), self.vocab_size)  # all -1
        for i, rid, spec in rows:
            matcher = self._matchers.get(rid)
            if matcher is None:
                matcher = xgr.GrammarMatcher(self._compiler().compile(spec))
                self._matchers[rid] = matcher
            matcher.fill_next_token_bitmask(mask, i)
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
