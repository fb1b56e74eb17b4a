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
                 drafts: tuple[torch.Tensor, list[int]] | None = None,
                 logprobs: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        self.runner, self.request_ids = runner, request_ids
        self.host_ids, self.event, self.sampler_output = host_ids, event, sampler_output
        self.spec_starts = spec_starts  # a verify step: each request's first logits row
        self.prompt = prompt
        # A draft model's next drafts: [B, k] on the host once the event is done, and how
        # many of each row are valid.
        self.drafts = drafts
        # The sampler's logprob ids and values, copied to the host with the sampled ids
        # (LogprobsHost); None: no logprobs this step.
        self.logprobs = logprobs
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


class LogprobsHost:
    """Pinned host buffers for a step's logprobs (token ids and values), so that they come
    back in one asynchronous copy each, queued with the sampled ids and read after the
    step's event, instead of a blocking ``.tolist()`` per tensor on the device. Two sets, used
    in turn: the next step's copy must not clobber the results not read yet (as the sampled
    ids' buffers). Grown when a step asks for more logprobs than any before it. On a CPU
    the sampler's tensors already are on the host and are used as they are."""

    def __init__(self, max_rows: int, device: torch.device) -> None:
        self.max_rows, self.device = max_rows, device
        self._bufs: list[tuple[torch.Tensor, torch.Tensor] | None] = [None, None]
        self._flip = 0

    def copy(self, ids: torch.Tensor, vals: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Queue the copies of ``ids`` [k, w] int64 and ``vals`` [k, w] float32; returns
        the host tensors they land in (valid once the step's event is done)."""
        if self.device.type != "cuda":
            return ids, vals
        self._flip ^= 1
        k, w = ids.shape
        buf = self._bufs[self._flip]
        if buf is None or buf[0].numel() < self.max_rows * w:
            n = self.max_rows * w
            buf = (torch.empty(n, dtype=ids.dtype, pin_memory=True),
                   torch.empty(n, dtype=vals.dtype, pin_memory=True))
            self._bufs[self._flip] = buf
        host_ids, host_vals = buf[0][:k * w].view(k, w), buf[1][:k * w].view(k, w)
        host_ids.copy_(ids, non_blocking=True)
        host_vals.copy_(vals, non_blocking=True)
        return host_ids, host_vals


def logprob_rows(logprobs: tuple[torch.Tensor, torch.Tensor],
                 ) -> tuple[list[list[int]], list[list[float]]]:
    """The host logprob tensors as lists of rows (ids, values)."""
    return logprobs[0].tolist(), logprobs[1].tolist()


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
            st.version += 1
    logprobs = None
    if pending.logprobs is not None:
        lp_ids, lp_vals = logprob_rows(pending.logprobs)
        width = pending.logprobs[0].shape[1]
        logprobs = []
        for rid, row_ids, row_vals in zip(pending.request_ids, lp_ids, lp_vals, strict=True):
            st = states.get(rid)
            want = st.params.logprobs if st is not None else None
            if want is None:
                logprobs.append([])
            elif want + 1 >= width:  # the widest request: its whole row, no slices
                logprobs.append(list(zip(row_ids, row_vals, strict=True)))
            else:
                logprobs.append(list(zip(row_ids[:want + 1], row_vals[:want + 1],
                                         strict=True)))
    return ModelRunnerOutput(pending.request_ids, ids, logprobs)
