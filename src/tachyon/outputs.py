"""Results handed back to users, shaped like vLLM's ``RequestOutput``."""

from __future__ import annotations

from dataclasses import dataclass, field

# One generated position: token id -> logprob (sampled token first, then the top-k).
Logprobs = list[dict[int, float]]
# One entry per prompt token: None for the first (nothing predicts it), then token id ->
# logprob (the prompt token first, then the top-k), as vLLM's ``prompt_logprobs``.
PromptLogprobs = list[dict[int, float] | None]
# One entry per prompt token, aligned with PromptLogprobs: None for the first, then the
# token's rank, 1 + the number of vocabulary entries with a strictly greater logprob (vLLM's
# ``Logprob.rank``), exact wherever the token falls.
PromptTokenRanks = list[int | None]


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "abort" | None while running
    stop_reason: int | str | None = None  # the stop string or token id that ended it
    logprobs: Logprobs | None = None
    cumulative_logprob: float | None = None

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0
    prompt_logprobs: PromptLogprobs | None = None  # with SamplingParams.prompt_logprobs
    metrics: dict[str, float] = field(default_factory=dict)
    prompt_token_ranks: PromptTokenRanks | None = None  # with prompt_logprobs
