"""Token sampler: penalties, logprobs, greedy / temperature sampling with top-k, top-p, min-p.

Pipeline for one step, per row of ``logits [B, V]`` (all math in float32):

1. Penalties (``apply_penalties``): repetition (HF/CTRL, over prompt + output tokens), then
   frequency and presence (OpenAI, over output tokens only). This is vLLM's order.
2. Logprobs, if asked for: ``log_softmax`` of the *penalised, untempered, unfiltered*
   logits. vLLM's default "raw" mode is before penalties; we report the distribution the
   penalties actually produced, but before temperature and truncation so that the numbers
   stay comparable across requests with different sampling settings.
3. Greedy: ``argmax`` of the penalised logits, used for rows with temperature ~0.
4. Temperature scaling, then min-p, top-k, top-p masking (masked logits become ``-inf``).
   top-p is applied to the distribution left after top-k and min-p (renormalised), as in
   HF's warper chain and vLLM.
5. Sampling by the exponential race: ``argmax(probs / E)`` with ``E ~ Exp(1)`` i.i.d.,
   which picks token ``i`` with probability ``probs[i]``. Rows with a per-request seed draw
   their noise from their own ``torch.Generator``, so their tokens do not depend on what
   else is in the batch; the other rows share one draw from the default generator.

No host synchronisation happens here: every per-row decision is a tensor op, and only the
Python fields of ``SamplingMetadata`` (``all_greedy``, ``generators``, ``max_num_logprobs``,
``max_top_k``, which tensors are ``None``) steer control flow. The input logits are never
modified in place.

Conventions the engine relies on:

* Token-id tensors for penalties are ``int64`` and padded with ``vocab_size`` (the value
  lands in an extra scratch column that is dropped).
* ``top_k`` values ``<= 0`` or ``>= vocab_size`` disable top-k for that row; ties with the
  k-th largest logit are all kept. ``top_p >= 1`` disables top-p; ``min_p <= 0`` disables
  min-p.
* Rows with ``temperature < GREEDY_TEMPERATURE`` (canonically ``0.0``) are greedy.
* Generators in ``generators`` must live on the logits' device.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

# Temperatures below this are treated as greedy: dividing by them would overflow float32.
GREEDY_TEMPERATURE = 1e-5


@dataclass
class SamplingMetadata:
    """Per-step sampling parameters for a batch of ``B`` rows (one row per sampled token)."""

    temperature: torch.Tensor  # [B] float32; 0.0 means greedy for that row
    all_greedy: bool  # every row greedy: skip all random work
    top_k: torch.Tensor | None  # [B] int32; 0 (or >= vocab) = disabled; None = none in batch
    top_p: torch.Tensor | None  # [B] float32 in (0, 1]; 1.0 = disabled
    min_p: torch.Tensor | None  # [B] float32 in [0, 1]; 0 = disabled
    generators: dict[int, torch.Generator]  # row index -> generator for seeded rows
    presence_penalty: torch.Tensor | None  # [B] float32 (OpenAI semantics, output tokens)
    frequency_penalty: torch.Tensor | None  # [B] float32 (OpenAI semantics, output tokens)
    repetition_penalty: torch.Tensor | None  # [B] float32 (HF/CTRL, prompt + output tokens)
    prompt_token_ids: torch.Tensor | None  # [B, Lp] int64 padded with vocab_size
    output_token_ids: torch.Tensor | None  # [B, Lo] int64 padded with vocab_size
    max_num_logprobs: int | None  # None: no logprobs; k >= 0: sampled token + top-k
    # Optional host-side upper bound on the enabled top_k values of the batch. When set and
    # top_p is None, top-k uses torch.topk(max_top_k) instead of a full vocabulary sort. It
    # must be >= every enabled top_k (smaller values would keep too few tokens).
    max_top_k: int | None = field(default=None)
    # Structured outputs: [B, ceil(V / 32)] int32, bit j of word w allows token 32 w + j
    # (xgrammar's layout); None when no row is constrained.
    grammar_bitmask: torch.Tensor | None = field(default=None)


@dataclass
class SamplerOutput:
    sampled_token_ids: torch.Tensor  # [B] int64
    logprob_token_ids: torch.Tensor | None  # [B, k+1] int64: col 0 sampled, then top-k ids
    logprobs: torch.Tensor | None  # [B, k+1] float32, matching logprob_token_ids
    sampled_token_ranks: torch.Tensor | None  # [B] int64, 1 = most likely


# --------------------------------------------------------------------------- penalties


def _token_counts(token_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[B, V] float32 occurrence counts. Padding ids (== V) land in a dropped extra column."""
    counts = torch.zeros(
        token_ids.shape[0], vocab_size + 1, dtype=torch.float32, device=token_ids.device
    )
    counts.scatter_add_(1, token_ids, torch.ones_like(token_ids, dtype=torch.float32))
    return counts[:, :vocab_size]


def _token_mask(token_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[B, V] bool: which tokens occur in the row. Padding (== V) goes to a dropped column."""
    mask = torch.zeros(
        token_ids.shape[0], vocab_size + 1, dtype=torch.bool, device=token_ids.device
    )
    mask.scatter_(1, token_ids, True)
    return mask[:, :vocab_size]


def apply_penalties(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    """Return penalised float32 logits (out of place). A ``None`` penalty is skipped.

    repetition (prompt + output): ``l > 0 -> l / r`` else ``l * r``;
    then ``l -= frequency * count_out`` and ``l -= presence * (count_out > 0)``.
    """
    logits = logits.float()
    vocab_size = logits.shape[-1]
    out_ids = meta.output_token_ids
    if meta.repetition_penalty is not None:
        seen = None
        for ids in (meta.prompt_token_ids, out_ids):
            if ids is not None:
                mask = _token_mask(ids, vocab_size)
                seen = mask if seen is None else seen | mask
        if seen is not None:
            r = meta.repetition_penalty.to(torch.float32).unsqueeze(1)
            penalised = torch.where(logits > 0, logits / r, logits * r)
            logits = torch.where(seen, penalised, logits)
    has_additive = meta.frequency_penalty is not None or meta.presence_penalty is not None
    if has_additive and out_ids is not None:
        counts = _token_counts(out_ids, vocab_size)
        if meta.frequency_penalty is not None:
            logits = logits - meta.frequency_penalty.to(torch.float32).unsqueeze(1) * counts
        if meta.presence_penalty is not None:
            present = (counts > 0).to(torch.float32)
            logits = logits - meta.presence_penalty.to(torch.float32).unsqueeze(1) * present
    return logits


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """Tokens whose bit is 0 get ``-inf`` (out of place). Unpacked with shifts on the
    device: no host round trip, and the same code in every graph mode."""
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    bits = (bitmask.unsqueeze(-1) >> shifts) & 1  # [B, W, 32]: arithmetic shift, low bit kept
    allowed = bits.flatten(1)[:, : logits.shape[-1]].bool()
    return logits.masked_fill(~allowed, float("-inf"))


# --------------------------------------------------------------------------- truncation


def _min_p_mask(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Mask tokens with ``p < min_p * p_max``.

    Done in log space (``l < l_max + log(min_p)``) so no softmax is needed; min_p = 0 gives
    ``log 0 = -inf`` and masks nothing.
    """
    max_logit = logits.amax(dim=-1, keepdim=True)
    cutoff = max_logit + torch.log(min_p.to(torch.float32)).unsqueeze(1)
    return logits.masked_fill(logits < cutoff, float("-inf"))


def _effective_top_k(top_k: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[B] int64 number of tokens top-k keeps; disabled rows (k <= 0 or k >= V) keep V."""
    k = top_k.to(torch.long)
    disabled = (k <= 0) | (k >= vocab_size)
    return torch.where(disabled, vocab_size, k)


def _top_k_threshold_topk(
    logits: torch.Tensor, top_k: torch.Tensor, max_top_k: int
) -> torch.Tensor:
    """[B, 1] smallest kept logit for top-k alone, using topk(max_top_k) instead of a sort."""
    vocab_size = logits.shape[-1]
    kk = max(1, min(max_top_k, vocab_size))
    top_vals = logits.topk(kk, dim=-1).values  # descending
    k = _effective_top_k(top_k, vocab_size)
    idx = (k.clamp(max=kk) - 1).unsqueeze(1)
    threshold = top_vals.gather(1, idx)
    # Disabled rows keep everything.
    return threshold.masked_fill((k >= vocab_size).unsqueeze(1), float("-inf"))


def _top_k_top_p_threshold_sort(
    logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None
) -> torch.Tensor:
    """[B, 1] smallest kept logit for top-k then top-p, from one descending sort.

    Both filters keep a prefix of the sorted row, so only the prefix length per row is
    needed; comparing against the value at its end avoids scattering back to vocab order.
    """
    vocab_size = logits.shape[-1]
    sorted_logits = logits.sort(dim=-1, descending=True).values
    positions = torch.arange(vocab_size, device=logits.device)
    keep = torch.full((logits.shape[0],), vocab_size, dtype=torch.long, device=logits.device)
    if top_k is not None:
        keep = _effective_top_k(top_k, vocab_size)
        if top_p is not None:
            # top-p sees the renormalised top-k distribution.
            beyond_k = positions.unsqueeze(0) >= keep.unsqueeze(1)
            sorted_logits = sorted_logits.masked_fill(beyond_k, float("-inf"))
    if top_p is not None:
        p = top_p.to(torch.float32).unsqueeze(1)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # Token j is kept iff the mass strictly before it, cum[j - 1], is < p. The cumsum is
        # monotone, so this count is a prefix length (always >= 1).
        keep_p = 1 + (cum[:, :-1] < p).sum(dim=-1)
        # p >= 1 is "disabled"; rounding of cum near 1.0 must not drop tail tokens.
        keep_p = torch.where(p.squeeze(1) >= 1.0, vocab_size, keep_p)
        keep = torch.minimum(keep, keep_p)
    return sorted_logits.gather(1, (keep - 1).unsqueeze(1))


def apply_top_k_top_p_min_p(
    logits: torch.Tensor,
    top_k: torch.Tensor | None,
    top_p: torch.Tensor | None,
    min_p: torch.Tensor | None,
    max_top_k: int | None = None,
) -> torch.Tensor:
    """Return logits with tokens outside min-p, then top-k, then top-p set to ``-inf``.

    Out of place. The most likely token always survives. Ties with the boundary logit are
    kept (so a row may keep more than k tokens when logits tie). ``max_top_k``: see
    ``SamplingMetadata.max_top_k``.
    """
    if min_p is not None:
        logits = _min_p_mask(logits, min_p)
    if top_k is None and top_p is None:
        return logits
    if top_p is None and max_top_k is not None:
        threshold = _top_k_threshold_topk(logits, top_k, max_top_k)
    else:
        threshold = _top_k_top_p_threshold_sort(logits, top_k, top_p)
    return logits.masked_fill(logits < threshold, float("-inf"))


# --------------------------------------------------------------------------- sampling


def _exponential_noise(like: torch.Tensor, generators: dict[int, torch.Generator]) -> torch.Tensor:
    """Exp(1) noise shaped like ``like``: one default-generator draw, seeded rows redrawn."""
    noise = torch.empty_like(like, dtype=torch.float32)
    noise.exponential_()
    for row, gen in generators.items():
        noise[row].exponential_(generator=gen)
    # Guard against an exact 0 draw: 0 / 0 = NaN would win argmax for a masked token.
    return noise.clamp_min_(torch.finfo(torch.float32).tiny)


def target_probs(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    """[B, V] float32: the distribution a row samples from (temperature, then truncation).
    Greedy rows get temperature 1 here only to stay finite; callers discard their result."""
    temperature = meta.temperature.to(torch.float32)
    temperature = torch.where(temperature < GREEDY_TEMPERATURE, 1.0, temperature)
    logits = logits / temperature.unsqueeze(1)
    logits = apply_top_k_top_p_min_p(
        logits, meta.top_k, meta.top_p, meta.min_p, max_top_k=meta.max_top_k
    )
    return logits.softmax(dim=-1)


def race(probs: torch.Tensor, generators: dict[int, torch.Generator]) -> torch.Tensor:
    """[B] int64: token ``i`` of each row with probability ``probs[i] / sum(probs)`` (the
    exponential race, so the rows need not be normalised). ``probs`` is overwritten."""
    return probs.div_(_exponential_noise(probs, generators)).argmax(dim=-1)


def _random_sample(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    """Temperature, truncation and exponential-race sampling for every row ([B] int64)."""
    return race(target_probs(logits, meta), meta.generators)


def gather_logprobs(
    logprobs: torch.Tensor, token_ids: torch.Tensor, num_logprobs: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sampled-token logprob + top-k, and the sampled token's rank (1 + #strictly better)."""
    token_ids = token_ids.unsqueeze(1)
    token_logprobs = logprobs.gather(1, token_ids)
    ranks = (logprobs > token_logprobs).sum(dim=-1) + 1
    k = min(num_logprobs, logprobs.shape[-1])
    if k == 0:
        return token_ids, token_logprobs, ranks
    top_vals, top_ids = logprobs.topk(k, dim=-1)
    ids = torch.cat([token_ids, top_ids], dim=1)
    vals = torch.cat([token_logprobs, top_vals], dim=1)
    return ids, vals, ranks


class Sampler(torch.nn.Module):
    """Turns final-position logits ``[B, V]`` into one token per row. See module docstring."""

    def forward(self, logits: torch.Tensor, meta: SamplingMetadata) -> SamplerOutput:
        logits = apply_penalties(logits, meta)
        if meta.grammar_bitmask is not None:
            logits = apply_token_bitmask(logits, meta.grammar_bitmask)
        logprobs = None
        if meta.max_num_logprobs is not None:
            logprobs = logits.log_softmax(dim=-1)

        greedy = logits.argmax(dim=-1)
        if meta.all_greedy:
            sampled = greedy
        else:
            is_greedy = meta.temperature < GREEDY_TEMPERATURE
            sampled = torch.where(is_greedy, greedy, _random_sample(logits, meta))

        if logprobs is None:
            return SamplerOutput(sampled, None, None, None)
        ids, vals, ranks = gather_logprobs(logprobs, sampled, meta.max_num_logprobs)
        return SamplerOutput(sampled, ids, vals, ranks)
