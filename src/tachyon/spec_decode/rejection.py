"""Rejection sampling of drafted tokens: the emitted tokens follow the target's distribution
exactly, whatever the drafts were.

A verify step scores ``d + 1`` positions of a request with ``d`` drafts: row ``j < d`` holds
the target's logits after draft ``j - 1`` (the first after the last known token) and is
checked against draft ``j``; row ``d`` is the bonus row. Walking the rows in order, a draft is
accepted or the walk stops at a token drawn from that row; if every draft is accepted the
bonus row draws one more. So a step emits between 1 and ``d + 1`` tokens.

For a deterministic proposer (n-gram: the draft has probability 1 under the proposer) draft
``t`` is accepted with probability ``p(t)``; on rejection the token comes from the residual,
``p`` with ``t`` removed and renormalised. Then ``P(emit x) = p(t) [x = t] + (1 - p(t)) p(x)
[x != t] / (1 - p(t)) = p(x)``. Greedy rows accept iff the draft is the argmax and otherwise
emit the argmax: the longest matching prefix, then the target's own token.

Everything here is tensor ops over all rows at once, with the sampler's penalties,
temperature, truncation, seeds and logprobs (``layers/sampler.py``); no host sync.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from tachyon.layers.sampler import (
    GREEDY_TEMPERATURE,
    SamplingMetadata,
    apply_penalties,
    gather_logprobs,
    race,
    target_probs,
)

# Marks a row without a draft to check (the bonus row of a request).
NO_DRAFT = -1


@dataclass
class RejectionOutput:
    token_ids: torch.Tensor  # [R] int64: what each row emits if the walk reaches it
    accepted: torch.Tensor  # [R] bool: the row's draft is accepted (False on bonus rows)
    logprob_token_ids: torch.Tensor | None  # [R, k+1]: col 0 the row's token, then top-k
    logprobs: torch.Tensor | None  # [R, k+1] float32


def _uniform(num_rows: int, generators: dict[int, torch.Generator],
             device: torch.device) -> torch.Tensor:
    """U[0, 1) per row; seeded rows draw from their request's generator."""
    u = torch.rand(num_rows, device=device)
    for row, gen in generators.items():
        u[row] = torch.rand((), device=device, generator=gen)
    return u


def rejection_sample(logits: torch.Tensor, draft_token_ids: torch.Tensor,
                     meta: SamplingMetadata) -> RejectionOutput:
    """``logits [R, V]`` with ``meta`` per row; ``draft_token_ids [R]`` int64 (``NO_DRAFT``
    on bonus rows). See the module docstring."""
    logits = apply_penalties(logits, meta)
    has_draft = draft_token_ids != NO_DRAFT
    draft = draft_token_ids.clamp_min(0).unsqueeze(1)
    greedy = logits.argmax(dim=-1)
    greedy_accept = has_draft & (greedy == draft_token_ids)
    if meta.all_greedy:
        accepted = greedy_accept
        tokens = torch.where(accepted, draft_token_ids, greedy)
    else:
        probs = target_probs(logits, meta)
        u = _uniform(len(probs), meta.generators, probs.device)
        random_accept = has_draft & (u < probs.gather(1, draft).squeeze(1))
        # The residual: the target without the rejected draft (the race renormalises it).
        residual = torch.where(has_draft.unsqueeze(1), probs.scatter(1, draft, 0.0), probs)
        drawn = race(residual, meta.generators)
        is_greedy = meta.temperature < GREEDY_TEMPERATURE
        accepted = torch.where(is_greedy, greedy_accept, random_accept)
        tokens = torch.where(accepted, draft_token_ids, torch.where(is_greedy, greedy, drawn))
    if meta.max_num_logprobs is None:
        return RejectionOutput(tokens, accepted, None, None)
    ids, vals, _ = gather_logprobs(logits.log_softmax(dim=-1), tokens, meta.max_num_logprobs)
    return RejectionOutput(tokens, accepted, ids, vals)


def num_accepted(accepted: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Per request, how many leading drafts were accepted, from the rows' ``accepted`` flags
    on the host: a request's rows start at ``starts[i]`` and end with its bonus row (never
    accepted), so the count is the distance to the first row not accepted."""
    stops = np.flatnonzero(~accepted)
    return stops[np.searchsorted(stops, starts)] - starts
