"""The plan of one staged step: what the runner wrote into the input buffers, and what the
graph runner, the sampler and the prompt scorer read back from it."""

from __future__ import annotations

from dataclasses import dataclass, field

from tachyon.cudagraph.dispatcher import BatchDescriptor
from tachyon.cudagraph.modes import RuntimeMode


@dataclass(frozen=True)
class PromptLogprobSpan:
    """One request's prompt positions scored in a step: logits rows ``[row, row + num)``
    are its positions ``[position, position + num)``, each scored against the next token."""

    request_id: str
    row: int  # first row of the step's prompt-logits tensor
    position: int  # first prompt position
    num: int
    num_logprobs: int  # the request's prompt_logprobs (top-k after the prompt token)


@dataclass
class StepPlan:
    """A staged batch: how many tokens/requests are real and what the graph runner sees."""

    num_tokens: int
    num_reqs: int
    padded_tokens: int
    padded_reqs: int
    mode: RuntimeMode
    uniform_decode: bool
    desc: BatchDescriptor | None = None  # the graph key (set once dispatched)
    sample_rows: list[int] = field(default_factory=list)  # batch rows that sample
    sample_ids: list[str] = field(default_factory=list)
    # Logits rows: one per sampled request, or 1 + d for one verifying d drafts.
    num_logits: int = 0
    logit_ids: list[str] = field(default_factory=list)  # request per row (speculation only)
    spec_starts: list[int] = field(default_factory=list)  # first row per sampled request
    # (token position, row in the previous step's sampled ids) for inputs sampled last step
    from_previous: list[tuple[int, int]] = field(default_factory=list)
    # Prompt positions scored this step: per request a span; per row its batch index and
    # the prompt token it scores.
    prompt_spans: list[PromptLogprobSpan] = field(default_factory=list)
    prompt_index: list[int] = field(default_factory=list)
    prompt_targets: list[int] = field(default_factory=list)
