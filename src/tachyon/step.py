"""The data of one step, as the engine, the executor and the worker exchange it (no torch).

``Scheduler.schedule()`` makes a ``SchedulerOutput``; an executor hands it to every rank's
model runner, which answers with a ``ModelRunnerOutput`` at once (``execute_model``) or with
a ``PendingResult`` to redeem later (``execute_model_async``, asynchronous scheduling). These
types live below everyone who exchanges them, so the arrows point down only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from tachyon.sampling_params import SamplingParams


@dataclass(slots=True)  # not frozen: a frozen init costs 3x, per request and step
class ScheduledRequest:
    """One request's share of a step (never changed once scheduled).

    The runner computes ``new_token_ids`` at positions ``[num_computed_tokens, ... + n)``.
    ``block_ids`` is the request's whole block list when ``full_block_ids`` is set (first
    schedule, or resumption after preemption), otherwise only the blocks added this step.
    ``sample`` says whether this step reaches the end of the known tokens (so a token is drawn).
    """

    request_id: str
    new_token_ids: list[int]
    num_computed_tokens: int
    block_ids: list[int]
    full_block_ids: bool
    sample: bool
    # Inputs after ``new_token_ids`` whose values the previous step is still sampling
    # (asynchronous scheduling): the runner takes them from that step's output on the device.
    num_pending_inputs: int = 0
    # The last ``num_draft_tokens`` of ``new_token_ids`` are drafts to verify (speculation).
    num_draft_tokens: int = 0
    prompt_token_ids: list[int] | None = None  # with the first schedule only
    params: SamplingParams | None = None  # with the first schedule only
    # With the first schedule only: EOS and stop token ids the sampler must not draw while
    # the request has fewer than ``params.min_tokens`` outputs.
    min_tokens_stop_ids: tuple[int, ...] = ()
    lora_int_id: int = 0  # with the first schedule only: the request's adapter (0: none)


@dataclass(frozen=True)
class SchedulerOutput:
    """Who runs this step. ``total_num_tokens`` is the sum over ``requests`` of
    ``len(new_token_ids) + num_pending_inputs`` and never exceeds ``max_num_batched_tokens``;
    ``len(requests)`` never exceeds ``max_num_seqs``."""

    requests: list[ScheduledRequest]
    total_num_tokens: int
    finished_request_ids: list[str] = field(default_factory=list)  # runner may drop their state

    @property
    def uniform_decode(self) -> bool:
        """Every request computes exactly one token (what FULL decode graphs are made for)."""
        return bool(self.requests) and self.total_num_tokens == len(self.requests)

    @property
    def is_empty(self) -> bool:
        return not self.requests


# One scored prompt position: (the prompt token's rank, [(prompt token, logprob), top-k ...]).
# The rank is vLLM's: 1 + the number of vocabulary entries with a strictly greater logprob,
# exact even when the token is far outside the top-k.
PromptLogprobRow = tuple[int, list[tuple[int, float]]]


@dataclass
class ModelRunnerOutput:
    """What a step sampled, on the host: one entry per request whose ``sample`` was set,
    in the order the ``SchedulerOutput`` listed them."""

    request_ids: list[str]  # requests that sampled this step, in order
    sampled_token_ids: list[int]
    # Per sampled request: [(token id, logprob), ...] sampled token first, then top-k.
    logprobs: list[list[tuple[int, float]]] | None = None
    # With speculative decoding: per sampled request, every token it emits this step (its
    # accepted drafts, then the target's own token), and their logprobs likewise; the
    # fields above then hold the first of them.
    spec_token_ids: list[list[int]] | None = None
    spec_logprobs: list[list[list[tuple[int, float]]]] | None = None
    # With a draft model: per sampled request, the drafts it proposed for the request's next
    # step (after the tokens above), which the scheduler sends back to be verified.
    draft_token_ids: list[list[int]] | None = None
    # Requests with ``params.prompt_logprobs`` whose chunk covered prompt positions this
    # step: request id -> (first prompt position scored, one row per position p from it,
    # scoring prompt token p + 1 from the logits at position p).
    prompt_logprobs: dict[str, tuple[int, list[PromptLogprobRow]]] | None = None


class PendingResult(Protocol):
    """A step whose sampled tokens are still on their way to the host.

    ``result()`` blocks until they arrive; calling it again returns the same object.
    """

    def result(self) -> ModelRunnerOutput: ...
