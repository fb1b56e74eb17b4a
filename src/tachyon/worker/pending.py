"""A queued step's results on their way to the host: the sampled ids' copy, the event that
says it is done, and turning what arrived into a ``ModelRunnerOutput``."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from tachyon.layers.sampler import SamplerOutput
from tachyon.spec_decode.rejection import RejectionOutput
from tachyon.step import ModelRunnerOutput
from tachyon.structured_output.manager import StructuredOutputManager
from tachyon.worker.prompt_logprobs import PendingPromptLogprobs
from tachyon.worker.request_state import RequestState

if TYPE_CHECKING:
    from tachyon.worker.model_runner import ModelRunner


class PendingOutput:
    """A queued step's sampled tokens, on their way to the host."""

    def __init__(self, runner: ModelRunner | None, request_ids: list[str],
                 host_ids: torch.Tensor | None, event: torch.cuda.Event | None,
                 sampler_output: SamplerOutput | RejectionOutput | None,
                 spec_starts: list[int] | None = None,
                 prompt: PendingPromptLogprobs | None = None,
                 drafts: tuple[torch.Tensor, list[int]] | None = None) -> None:
        self.runner, self.request_ids = runner, request_ids
        self.host_ids, self.event, self.sampler_output = host_ids, event, sampler_output
        self.spec_starts = spec_starts  # a verify step: each request's first logits row
        self.prompt = prompt
        # A draft model's next drafts: [B, k] on the host once the event is done, and how
        # many of each row are valid.
        self.drafts = drafts
        self._result: ModelRunnerOutput | None = None

    @classmethod
    def empty(cls) -> PendingOutput:
        pending = cls(None, [], None, None, None)
        pending._result = ModelRunnerOutput([], [])
        return pending

    def result(self) -> ModelRunnerOutput:
        if self._result is None:
            self._result = self.runner.finish(self)
        return self._result


def record_event(device: torch.device) -> torch.cuda.Event | None:
    """An event after the copies queued so far (None on a CPU: they are done)."""
    if device.type != "cuda":
        return None
    event = torch.cuda.Event()
    event.record()
    return event


def finish_sampled(pending: PendingOutput, states: dict[str, RequestState],
                   structured: StructuredOutputManager) -> ModelRunnerOutput:
    """A sampled step's tokens (one per request), with logprobs; each fills the input a
    later step already took on the device."""
    ids = pending.host_ids.tolist()
    structured.accept(pending.request_ids, ids)
    for rid, tok in zip(pending.request_ids, ids, strict=True):
        st = states.get(rid)
        if st is not None and st.placeholder is not None:
            st.token_ids[st.placeholder] = tok  # the input a later step took on the device
            st.placeholder = None
    res = pending.sampler_output
    logprobs = None
    if res.logprobs is not None:
        lp_ids, lp_vals = res.logprob_token_ids.tolist(), res.logprobs.tolist()
        logprobs = []
        for i, rid in enumerate(pending.request_ids):
            st = states.get(rid)
            want = st.params.logprobs if st is not None else None
            logprobs.append([] if want is None else
                            list(zip(lp_ids[i][:want + 1], lp_vals[i][:want + 1],
                                     strict=True)))
    return ModelRunnerOutput(pending.request_ids, ids, logprobs)
