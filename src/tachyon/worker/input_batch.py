"""The staged batch in the input buffers, beyond the real requests' rows: the padding a graph
key asks for, the synthetic batch a capture runs, and the attention metadata both describe.
"""

from __future__ import annotations

import numpy as np

from tachyon.attention.base import CommonAttentionMetadata
from tachyon.cudagraph.dispatcher import MIXED, BatchDescriptor
from tachyon.cudagraph.modes import RuntimeMode
from tachyon.lora.manager import NO_SLOT
from tachyon.worker.input_buffers import InputBuffers
from tachyon.worker.request_state import BlockRows
from tachyon.worker.step_plan import StepPlan

DUMMY_SLOT = 0  # the adapter slot of a has_lora capture's tokens: every LoRA engine has one


def uniform_query_len(b: InputBuffers, num_reqs: int) -> int:
    """The query length every request of the staged batch shares, or MIXED."""
    lens = np.diff(b.np_query_start_loc[:num_reqs + 1])
    return int(lens[0]) if lens.min() == lens.max() else MIXED


def pad_batch(b: InputBuffers, rows: BlockRows, num_tokens: int, num_reqs: int,
              padded_tokens: int, padded_reqs: int, tokens_per_req: int = 1) -> None:
    """Padding contract: padded tokens write nowhere (slot -1); padded requests have no
    context (seq_len 0) and take ``tokens_per_req`` padded tokens each (1, or 1 + k in a
    verify graph) while any remain."""
    b.np_slot_mapping[num_tokens:padded_tokens] = -1
    b.np_lora_slots[num_tokens:padded_tokens] = NO_SLOT
    b.np_input_ids[num_tokens:padded_tokens] = 0
    b.np_positions[num_tokens:padded_tokens] = 0
    extra = padded_reqs - num_reqs
    if extra > 0:
        takes = np.minimum(np.arange(1, extra + 1) * tokens_per_req,
                           padded_tokens - num_tokens)
        b.np_query_start_loc[num_reqs + 1:padded_reqs + 1] = num_tokens + takes
        b.np_seq_lens[num_reqs:padded_reqs] = 0
        b.np_block_table[num_reqs:padded_reqs] = 0
        rows.forget(num_reqs, padded_reqs)


def stage_dummy(b: InputBuffers, rows: BlockRows, desc: BatchDescriptor, mode: RuntimeMode,
                max_num_seqs: int) -> CommonAttentionMetadata:
    """Stage a synthetic batch shaped like graph key ``desc`` (for warm-up and capture), send
    it to the device and return its attention metadata: every request takes the key's query
    length (1 when mixed), request 0 the surplus; no context, nothing written to the cache.
    A key with ``has_lora`` gives every token adapter slot 0, so the capture's warm-up runs
    the LoRA kernels on real rows (its output is discarded)."""
    num_tokens, num_reqs = desc.num_tokens, desc.num_reqs(max_num_seqs)
    q = max(1, desc.uniform_query_len)
    lens = np.full(num_reqs, q, dtype=np.int64)
    lens[0] += num_tokens - q * num_reqs
    b.np_query_start_loc[0] = 0
    b.np_query_start_loc[1:num_reqs + 1] = np.cumsum(lens)
    b.np_seq_lens[:num_reqs] = lens
    b.np_block_table[:num_reqs] = 0
    rows.forget(0, num_reqs)
    b.np_input_ids[:num_tokens] = 0
    b.np_positions[:num_tokens] = 0
    b.np_slot_mapping[:num_tokens] = -1
    b.np_lora_slots[:num_tokens] = DUMMY_SLOT if desc.has_lora else NO_SLOT
    b.np_logits_indices[:num_reqs] = np.cumsum(lens) - 1
    plan = StepPlan(num_tokens, num_reqs, num_tokens, num_reqs, mode, desc.uniform_decode,
                    desc)
    b.copy_to_device(num_reqs)
    return common_metadata(b, plan)


def common_metadata(b: InputBuffers, plan: StepPlan) -> CommonAttentionMetadata:
    """The backend-neutral attention metadata of the staged (padded) batch."""
    r, t = plan.padded_reqs, plan.padded_tokens
    qsl = b.np_query_start_loc[: r + 1]
    lens = b.np_seq_lens[:r]
    return CommonAttentionMetadata(
        num_reqs=r, num_tokens=t, num_actual_tokens=plan.num_tokens,
        max_query_len=int(np.max(np.diff(qsl))) if r else 0,
        max_seq_len=int(lens.max()) if r else 0,
        uniform_decode=plan.uniform_decode,
        query_start_loc=b.query_start_loc[: r + 1], seq_lens=b.seq_lens[:r],
        block_table=b.block_table[:r], slot_mapping=b.slot_mapping[:t],
        query_start_loc_cpu=b.host_query_start_loc[: r + 1],
        seq_lens_cpu=b.host_seq_lens[:r],
    )
