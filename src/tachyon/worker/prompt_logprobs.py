"""Prompt logprobs: which prompt positions a step scores (staged with the chunk), their
log-softmax on the device, and the one copy that brings them to the host."""

from __future__ import annotations

import torch
from torch import nn

from tachyon.layers.sampler import gather_logprobs
from tachyon.step import PromptLogprobRow, ScheduledRequest
from tachyon.worker.input_buffers import to_device
from tachyon.worker.request_state import RequestState
from tachyon.worker.step_plan import PromptLogprobSpan, StepPlan


class PendingPromptLogprobs:
    """A step's prompt logprobs on their way to the host: one float64 tensor per step,
    ``[R, 2 (k + 1) + 1]`` holding the token ids (exact in float64), their logprobs, then
    the prompt token's rank (exact too)."""

    def __init__(self, host: torch.Tensor, spans: list[PromptLogprobSpan]) -> None:
        self.host, self.spans = host, spans

    def result(self) -> dict[str, tuple[int, list[PromptLogprobRow]]]:
        width = self.host.shape[1] // 2
        ids = self.host[:, :width].long().tolist()
        vals = self.host[:, width:-1].tolist()
        ranks = self.host[:, -1].long().tolist()
        return {sp.request_id: (sp.position, [
            (ranks[j], list(zip(ids[j][:sp.num_logprobs + 1], vals[j][:sp.num_logprobs + 1],
                                strict=True)))
            for j in range(sp.row, sp.row + sp.num)]) for sp in self.spans}


def stage_prompt_logprobs(plan: StepPlan, s: ScheduledRequest, st: RequestState,
                          batch_index: int) -> None:
    """Score the chunk's prompt positions that have a next prompt token: the logits at
    position p give the logprob of prompt token p + 1. The chunk that samples ends the
    prompt: it is then all scored, and a recompute after preemption is not scored again
    (the engine core keeps what it was handed)."""
    start = s.num_computed_tokens
    num = min(start + len(s.new_token_ids), st.prompt_len - 1) - start
    if num > 0:
        span = PromptLogprobSpan(s.request_id, len(plan.prompt_index), start, num,
                                 st.params.prompt_logprobs)
        plan.prompt_spans.append(span)
        plan.prompt_index += range(batch_index, batch_index + num)
        plan.prompt_targets += st.prompt_ids[start + 1:start + 1 + num]
    if s.sample:
        st.prompt_ids = None


def score_prompt(model: nn.Module, plan: StepPlan, hidden: torch.Tensor, max_rows: int,
                 device: torch.device) -> PendingPromptLogprobs:
    """Float32 log-softmax at the scored prompt positions (raw logits: no penalties or
    temperature apply to a prompt), the next prompt token's logprob, its rank and the top-k,
    all on the device; one copy back is queued."""
    idx = to_device(torch.tensor([plan.prompt_index, plan.prompt_targets],
                                 dtype=torch.int64), device)
    k = max(sp.num_logprobs for sp in plan.prompt_spans)
    # In slices of max_rows (max_num_logits) rows: the [rows, V] temporaries then stay the
    # size the profile run measured for the sampled logits, however long the chunk.
    parts = []
    for rows, tokens in zip(idx[0].split(max_rows), idx[1].split(max_rows), strict=True):
        logprobs = model.compute_logits(hidden[rows]).float().log_softmax(dim=-1)
        ids, vals, ranks = gather_logprobs(logprobs, tokens, k)
        parts.append(torch.cat([ids.double(), vals.double(), ranks.double().unsqueeze(1)],
                               dim=1))
    packed = torch.cat(parts)
    host = torch.empty(packed.shape, dtype=torch.float64, pin_memory=device.type == "cuda")
    host.copy_(packed, non_blocking=True)
    return PendingPromptLogprobs(host, plan.prompt_spans)
