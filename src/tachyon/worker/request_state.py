"""What the runner remembers of each request between steps, and which block-table row holds
whose block ids."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from tachyon.sampling_params import SamplingParams
from tachyon.step import ScheduledRequest


@dataclass
class RequestState:
    """What the runner remembers of a request between steps."""

    prompt_len: int
    params: SamplingParams
    token_ids: list[int]  # tokens whose K/V is computed or being computed
    block_ids: list[int]
    generator: torch.Generator | None
    placeholder: int | None = None  # index in token_ids still awaiting its sampled value
    row: int = -1  # block-table row it occupied last step
    row_blocks: int = 0  # how many of its block ids that row already holds
    min_tokens_stop_ids: tuple[int, ...] = ()  # masked until params.min_tokens outputs
    lora_id: int = 0  # its LoRA adapter (0: none)
    # With params.prompt_logprobs, until the chunk that samples is staged: the prompt, for
    # the targets past a chunk's end (token_ids holds only what has been scheduled).
    prompt_ids: list[int] | None = None
    # Bumped whenever token_ids changes other than by appending (a truncation, a placeholder
    # filled): cached copies of it (sampling_inputs.PenaltyRows) are then rewritten.
    version: int = 0


def update_state(states: dict[str, RequestState], s: ScheduledRequest,
                 device: torch.device) -> RequestState:
    """The request's state after this step's scheduling (created on its first step): its
    block ids, and its tokens up to those this step computes (a pending input as -1)."""
    st = states.get(s.request_id)
    if st is None:
        params = s.params
        gen = None
        if params.seed is not None:
            gen = torch.Generator(device=device)
            gen.manual_seed(params.seed)
        # Start from the whole prompt: a prefix-cache hit skips computing its head, but
        # penalties still count those tokens.
        st = RequestState(len(s.prompt_token_ids), params, list(s.prompt_token_ids), [],
                          gen, min_tokens_stop_ids=s.min_tokens_stop_ids,
                          lora_id=s.lora_int_id)
        if params.prompt_logprobs is not None:
            st.prompt_ids = list(s.prompt_token_ids)
        states[s.request_id] = st
    if s.full_block_ids:
        st.block_ids = list(s.block_ids)
        st.row = -1  # block list replaced (resumed after preemption): rewrite its row
    else:
        st.block_ids.extend(s.block_ids)
    if len(st.token_ids) > s.num_computed_tokens:
        del st.token_ids[s.num_computed_tokens:]
        st.version += 1
    st.token_ids.extend(s.new_token_ids)
    if s.num_pending_inputs:
        st.placeholder = len(st.token_ids)
        st.token_ids.append(-1)
    return st


class BlockRows:
    """The host block table's rows and the request each one holds, so a request that keeps
    its row only has its new block ids written."""

    def __init__(self, block_table: np.ndarray, max_num_seqs: int) -> None:
        self.table = block_table
        self.owners: list[RequestState | None] = [None] * max_num_seqs

    def write(self, row: int, st: RequestState) -> None:
        """Rows are rewritten only when a request moved rows; otherwise only new blocks go in.
        (Stale ids beyond a request's blocks are never read: lengths bound every access.)"""
        if self.owners[row] is not st or st.row != row or st.row_blocks > len(st.block_ids):
            st.row, st.row_blocks = row, 0
            self.owners[row] = st
        if st.row_blocks < len(st.block_ids):
            self.table[row, st.row_blocks:len(st.block_ids)] = st.block_ids[st.row_blocks:]
            st.row_blocks = len(st.block_ids)

    def forget(self, start: int, stop: int) -> None:
        """Rows ``[start, stop)`` were overwritten (padding, a dummy batch): no owner."""
        self.owners[start:stop] = [None] * (stop - start)
