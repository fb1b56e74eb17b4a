"""Speculative decoding in the runner: the logits rows a verifying request stages (each
draft and the bonus row), and the accepted tokens read back from a verify step."""

from __future__ import annotations

import numpy as np

from tachyon.spec_decode.rejection import NO_DRAFT, num_accepted
from tachyon.step import ModelRunnerOutput, ScheduledRequest
from tachyon.worker.input_buffers import VerifyBuffers
from tachyon.worker.pending import PendingOutput, logprob_rows
from tachyon.worker.request_state import RequestState
from tachyon.worker.step_plan import StepPlan


def stage_verify(b: VerifyBuffers, plan: StepPlan, s: ScheduledRequest, end: int) -> None:
    """Logits rows of a sampled request in a speculative engine: one per draft (checked
    against it) and the bonus row, at the last ``1 + d`` positions of its query."""
    d, row0 = s.num_draft_tokens, plan.num_logits
    if d:
        b.np_logits_indices[row0:row0 + d + 1] = np.arange(end - 1 - d, end)
        b.np_draft_ids[row0:row0 + d] = s.new_token_ids[-d:]
    else:
        b.np_logits_indices[row0] = end - 1
    b.np_draft_ids[row0 + d] = NO_DRAFT
    plan.spec_starts.append(row0)
    plan.logit_ids += [s.request_id] * (d + 1)
    plan.num_logits = row0 + d + 1


def finish_spec(pending: PendingOutput, states: dict[str, RequestState]) -> ModelRunnerOutput:
    """Each request's accepted drafts and the token after them, with logprobs."""
    rows = pending.host_ids.numpy()
    r = len(rows) // 2
    starts = np.asarray(pending.spec_starts)
    counts = num_accepted(rows[r:].astype(bool), starts) + 1
    ids = rows[:r].tolist()
    spans = [(int(a), int(a + n)) for a, n in zip(starts, counts, strict=True)]
    tokens = [ids[a:e] for a, e in spans]
    logprobs = None
    if pending.logprobs is not None:
        lp_ids, lp_vals = logprob_rows(pending.logprobs)
        logprobs = []
        for rid, (a, e) in zip(pending.request_ids, spans, strict=True):
            st = states.get(rid)
            want = st.params.logprobs if st is not None else None
            logprobs.append([[] if want is None else
                             list(zip(lp_ids[j][:want + 1], lp_vals[j][:want + 1],
                                      strict=True)) for j in range(a, e)])
    drafts = None
    if pending.drafts is not None:
        host, valid = pending.drafts
        drafts = [row[:n] for row, n in zip(host.tolist(), valid, strict=True)]
    return ModelRunnerOutput(pending.request_ids, [t[0] for t in tokens],
                             [lp[0] for lp in logprobs] if logprobs is not None else None,
                             tokens, logprobs, draft_token_ids=drafts)
