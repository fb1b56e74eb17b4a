"""The sampler's per-row inputs for one step: parameters staged in pinned buffers, the
penalties' token histories, and the min_tokens mask."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch

from tachyon.layers.sampler import SamplingMetadata
from tachyon.worker.input_buffers import SamplingBuffers
from tachyon.worker.request_state import RequestState


def sampling_metadata(states: list[RequestState], sb: SamplingBuffers, vocab_size: int,
                      device: torch.device) -> SamplingMetadata:
    """Stage the step's sampling parameters, one row per logits row (``states``: the
    request of each); their copies are queued before the forward."""
    ps = [st.params for st in states]
    k = len(ps)
    rows = {name: [getattr(p, name) for p in ps] for name in SamplingBuffers.FLOAT_FIELDS}
    top_ks = [p.top_k for p in ps]
    sb.stage(rows, top_ks)
    any_top_p = any(v < 1.0 for v in rows["top_p"])
    gens = {i: st.generator for i, st in enumerate(states) if st.generator is not None}
    pen = any(p.presence_penalty or p.frequency_penalty or p.repetition_penalty != 1.0
              for p in ps)
    wants = [p.logprobs for p in ps if p.logprobs is not None]
    return SamplingMetadata(
        temperature=sb.field("temperature", k),
        all_greedy=all(t == 0.0 for t in rows["temperature"]),
        top_k=sb.top_k(k) if any(top_ks) else None,
        top_p=sb.field("top_p", k) if any_top_p else None,
        min_p=sb.field("min_p", k) if any(v > 0.0 for v in rows["min_p"]) else None,
        generators=gens,
        presence_penalty=sb.field("presence_penalty", k) if pen else None,
        frequency_penalty=sb.field("frequency_penalty", k) if pen else None,
        repetition_penalty=sb.field("repetition_penalty", k) if pen else None,
        prompt_token_ids=padded_token_ids(
            [st.token_ids[: st.prompt_len] for st in states], vocab_size, device)
        if pen else None,
        output_token_ids=padded_token_ids(
            [st.token_ids[st.prompt_len:] for st in states], vocab_size, device)
        if pen else None,
        max_num_logprobs=max(wants) if wants else None,
        max_top_k=max(top_ks) if any(top_ks) and not any_top_p else None,
    )


def padded_token_ids(rows: list[list[int]], vocab_size: int,
                     device: torch.device) -> torch.Tensor:
    """``rows`` as one ``[len(rows), longest]`` tensor on ``device``, padded with
    ``vocab_size`` (an id no token has: the penalties' counts drop it)."""
    width = max(1, max(len(r) for r in rows))
    arr = np.full((len(rows), width), vocab_size, dtype=np.int64)
    for i, r in enumerate(rows):
        arr[i, : len(r)] = r
    host = torch.from_numpy(arr)
    if device.type == "cuda":
        host = host.pin_memory()  # an asynchronous copy needs pinned memory
    return host.to(device, non_blocking=True)


def mask_min_tokens(logits: torch.Tensor, states: dict[str, RequestState],
                    sample_ids: list[str], first_rows: Iterable[int],
                    device: torch.device) -> None:
    """Below ``min_tokens`` outputs, EOS and stop tokens cannot be drawn (as in vLLM).
    Such a request has one logits row (the scheduler drafts nothing for it):
    ``first_rows`` holds each sampled request's."""
    rows: list[int] = []
    cols: list[int] = []
    for i, rid in zip(first_rows, sample_ids, strict=True):
        st = states[rid]
        # token_ids holds the prompt and the outputs so far (a pending one included).
        if st.min_tokens_stop_ids and len(st.token_ids) - st.prompt_len < st.params.min_tokens:
            rows += [i] * len(st.min_tokens_stop_ids)
            cols += st.min_tokens_stop_ids
    if rows:
        idx = torch.tensor([rows, cols], dtype=torch.int64).to(device, non_blocking=True)
        logits[idx[0], idx[1]] = float("-inf")
