"""A request as the scheduler sees it: one sequence of tokens being extended."""

from __future__ import annotations

import enum
import time

from tachyon.lora.request import LoRARequest
from tachyon.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return self in _FINISHED


_FINISHED = {RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH,
             RequestStatus.FINISHED_ABORTED}


class Request:
    """One sequence's state in the engine core.

    ``num_computed_tokens`` counts the positions whose K/V is in this request's blocks or is
    being written by a step in flight (the scheduler advances it when it schedules). It runs
    ahead of ``num_tokens`` by ``num_pending`` (a token still being sampled, asynchronous
    scheduling) and, while a verify step is in flight, by its drafts, until ``update_spec``
    rolls the rejected ones back."""

    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                 eos_token_ids: frozenset[int], arrival_time: float | None = None,
                 lora_request: LoRARequest | None = None) -> None:
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.params = params
        self.eos_token_ids = frozenset() if params.ignore_eos else eos_token_ids
        self.stop_token_ids = frozenset(params.stop_token_ids or ())
        self.arrival_time = arrival_time if arrival_time is not None else time.monotonic()
        self.all_token_ids: list[int] = list(prompt_token_ids)
        self.num_computed_tokens = 0
        # Tokens being sampled by a step in flight (asynchronous scheduling): counted as
        # computed inputs of the next step before their values are known. 0 or 1.
        self.num_pending = 0
        self.num_cached_tokens = -1  # prefix-cache hit at first schedule; -1 until then
        self.num_preemptions = 0
        self.status = RequestStatus.WAITING
        self.stop_reason: int | str | None = None
        self.block_hashes: list[int] = []  # hash chain over full blocks, grown lazily
        self.lora_request = lora_request  # the adapter it runs with (tachyon.lora), or None

    @property
    def lora_int_id(self) -> int:
        return self.lora_request.lora_int_id if self.lora_request is not None else 0

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.all_token_ids) - len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.all_token_ids[len(self.prompt_token_ids):]

    def append_token(self, token_id: int) -> None:
        self.all_token_ids.append(token_id)
