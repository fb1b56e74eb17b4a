"""The sampler's per-row inputs for one step: parameters staged in pinned buffers, the
penalties' token histories, and the min_tokens mask."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch

from tachyon.layers.sampler import SamplingMetadata
from tachyon.worker.input_buffers import SamplingBuffers, to_device
from tachyon.worker.request_state import RequestState


def sampling_metadata(states: list[RequestState], sb: SamplingBuffers,
                      penalties: PenaltyRows, device: torch.device) -> SamplingMetadata:
    """Stage the step's sampling parameters, one row per logits row (``states``: the
    request of each); their copies are queued before the forward."""
    k = len(states)
    sb.stage([st.params for st in states])
    flags = sb.flags[:, :k]
    any_top_k = bool(sb.np_k[:k].any())
    any_top_p = bool(flags[sb.TOP_P].any())
    gens = {i: st.generator for i, st in enumerate(states) if st.generator is not None}
    pen = bool(flags[sb.PENALTY].any())
    max_logprobs = int(sb.num_logprobs[:k].max())
    prompt_ids, output_ids = penalties.stage(states, device) if pen else (None, None)
    return SamplingMetadata(
        temperature=sb.field("temperature", k),
        all_greedy=bool(flags[sb.GREEDY].all()),
        top_k=sb.top_k(k) if any_top_k else None,
        top_p=sb.field("top_p", k) if any_top_p else None,
        min_p=sb.field("min_p", k) if flags[sb.MIN_P].any() else None,
        generators=gens,
        presence_penalty=sb.field("presence_penalty", k) if pen else None,
        frequency_penalty=sb.field("frequency_penalty", k) if pen else None,
        repetition_penalty=sb.field("repetition_penalty", k) if pen else None,
        prompt_token_ids=prompt_ids,
        output_token_ids=output_ids,
        max_num_logprobs=max_logprobs if max_logprobs >= 0 else None,
        max_top_k=int(sb.np_k[:k].max()) if any_top_k and not any_top_p else None,
    )


def padded_token_ids(rows: list[list[int]], vocab_size: int,
                     device: torch.device) -> torch.Tensor:
    """``rows`` as one ``[len(rows), longest]`` tensor on ``device``, padded with
    ``vocab_size`` (an id no token has: the penalties' counts drop it). The reference that
    ``PenaltyRows`` must match."""
    width = max(1, max(len(r) for r in rows))
    arr = np.full((len(rows), width), vocab_size, dtype=np.int64)
    for i, r in enumerate(rows):
        arr[i, : len(r)] = r
    return to_device(torch.from_numpy(arr), device)


class PenaltyRows:
    """The penalties' token histories, one row per logits row, kept on the host between
    steps: ``[rows, capacity]`` int64 arrays of prompt and output token ids, padded with
    ``vocab_size`` (an id no token has: the penalties' counts drop it).

    A row that holds the same request as last step, whose ``token_ids`` only grew since
    (``RequestState.version`` unchanged), gets only its new output tokens written; any
    other row is rewritten whole. A step hands the sampler ``[k, longest]`` views, the same
    values and shapes as ``padded_token_ids`` of every row; on a GPU they are first packed
    into pinned staging and sent with one copy each (refilled every step: the runner's
    ``StagingFence`` covers them)."""

    def __init__(self, max_rows: int, vocab_size: int, device: torch.device,
                 pack: bool | None = None) -> None:
        self.max_rows, self.pad = max_rows, vocab_size
        # pack: stage through pinned buffers and a device copy (a GPU); a test may ask for it
        # on the CPU.
        self.pack = device.type == "cuda" if pack is None else pack
        self.pin = device.type == "cuda"
        self.owners: list[RequestState | None] = [None] * max_rows
        self.versions = [0] * max_rows
        self.num_prompt = [0] * max_rows  # prompt ids written in each row
        self.num_out = [0] * max_rows  # output ids written in each row
        self.prompt = np.full((max_rows, 16), vocab_size, dtype=np.int64)
        self.output = np.full((max_rows, 16), vocab_size, dtype=np.int64)
        # pack: flat pinned staging and device buffers for each history (prompt, output).
        self._staging: list[torch.Tensor | None] = [None, None]
        self._dev: list[torch.Tensor | None] = [None, None]

    @staticmethod
    def _grown(arr: np.ndarray, width: int, pad: int) -> np.ndarray:
        cap = arr.shape[1]
        while cap < width:
            cap *= 2
        if cap == arr.shape[1]:
            return arr
        grown = np.full((arr.shape[0], cap), pad, dtype=arr.dtype)
        grown[:, :arr.shape[1]] = arr
        return grown

    def stage(self, states: list[RequestState],
              device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Bring the rows up to date with ``states`` (one per logits row) and return the
        prompt and output histories, ``[k, longest]`` each, on ``device``."""
        owners, versions, pad = self.owners, self.versions, self.pad
        num_prompt, num_out = self.num_prompt, self.num_out
        # Rows that grew by one token (a decode step: almost all of them) are written
        # together after the loop, in one numpy assignment.
        one_rows: list[int] = []
        one_cols: list[int] = []
        one_ids: list[int] = []
        wp = wo = 1
        for i, st in enumerate(states):
            toks = st.token_ids
            n, p = len(toks), st.prompt_len
            if n < p:
                p = n
            o, w = n - p, num_out[i]
            if owners[i] is st and versions[i] == st.version and num_prompt[i] == p \
                    and o >= w:
                if o == w + 1:
                    one_rows.append(i)
                    one_cols.append(w)
                    one_ids.append(toks[-1])
                elif o > w:
                    if o > self.output.shape[1]:
                        self.output = self._grown(self.output, o, pad)
                    self.output[i, w:o] = toks[p + w:]
            else:  # another request, or its tokens changed: the whole row
                if p > self.prompt.shape[1]:
                    self.prompt = self._grown(self.prompt, p, pad)
                if o > self.output.shape[1]:
                    self.output = self._grown(self.output, o, pad)
                self.prompt[i, :p] = toks[:p]
                self.prompt[i, p:] = pad
                self.output[i, :o] = toks[p:]
                self.output[i, o:] = pad
                owners[i], versions[i], num_prompt[i] = st, st.version, p
            num_out[i] = o
            if p > wp:
                wp = p
            if o > wo:
                wo = o
        if one_rows:
            if wo > self.output.shape[1]:
                self.output = self._grown(self.output, wo, pad)
            self.output[one_rows, one_cols] = one_ids
        k = len(states)
        return (self._send(0, self.prompt[:k, :wp], device),
                self._send(1, self.output[:k, :wo], device))

    def _send(self, which: int, rows: np.ndarray, device: torch.device) -> torch.Tensor:
        if not self.pack:
            return torch.from_numpy(rows)
        n = rows.size
        staging, dev = self._staging[which], self._dev[which]
        if staging is None or staging.numel() < n:
            size = max(n, 2 * staging.numel()) if staging is not None else n
            staging = torch.empty(size, dtype=torch.int64, pin_memory=self.pin)
            dev = torch.empty(size, dtype=torch.int64, device=device)
            self._staging[which], self._dev[which] = staging, dev
        host = staging[:n].view(rows.shape)
        np.copyto(host.numpy(), rows)
        out = dev[:n].view(rows.shape)
        out.copy_(host, non_blocking=True)
        return out


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
        idx = to_device(torch.tensor([rows, cols], dtype=torch.int64), device)
        logits[idx[0], idx[1]] = float("-inf")
