"""A draft model on the worker: a smaller model of the target's vocabulary that proposes
``k`` tokens per decoding request by greedy decoding (``method: draft_model``).

It sits next to the target in the model runner, with K/V caches of its own shaped by its own
attention but with the target's block count and block size, so it uses the target's block
tables and slot mapping: the drafter's K/V of position ``p`` lives in the same slot id as
the target's, and one block accounting (the scheduler's) serves both.

Per step: ``run_batch`` runs the drafter on the target's staged batch (same tokens,
positions, slots and attention metadata), so its cache follows the target's through prefill
chunks, verifies and preemptions; after rejection sampling, ``propose`` runs ``k`` greedy
single-token forwards for every sampled request at once, the first on the last emitted
token at its position. Those forwards write K/V at the positions the next step computes
again (with the same tokens where the drafts are accepted; rejected ones are overwritten
when recomputed, as for the target).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from tachyon.attention.base import AttentionBackend, AttentionSpec, CommonAttentionMetadata
from tachyon.config import ModelConfig
from tachyon.forward_context import ForwardContext, set_forward_context
from tachyon.loader.loader import load_model
from tachyon.worker.input_buffers import to_device
from tachyon.worker.kv_sizing import KVCaches, allocate_kv_caches, kv_bytes_per_block


class DraftModel:
    """The drafter's weights, attention backend and K/V caches, and its two forwards."""

    def __init__(self, cfg: ModelConfig, num_speculative_tokens: int,
                 target_spec: AttentionSpec, backend_cls: type[AttentionBackend],
                 device: torch.device) -> None:
        self.k = num_speculative_tokens
        self.device = device
        self.model = load_model(cfg, device)
        self.num_layers, heads, kv_heads, head_dim = self.model.attention_shape
        self.attn_spec = dataclasses.replace(target_spec, num_heads=heads,
                                             num_kv_heads=kv_heads, head_dim=head_dim,
                                             scale=head_dim**-0.5)
        self.backend = backend_cls(self.attn_spec)
        self.kv_caches: KVCaches = []
        self.max_model_len = target_spec.max_model_len
        pin = device.type == "cuda"
        n = target_spec.max_num_seqs
        self._arange = torch.arange(n + 1, dtype=torch.int32)
        self._arange_dev = self._arange.to(device)
        self._host_drafts = torch.zeros(n, self.k, dtype=torch.int64, pin_memory=pin)

    # -- memory --------------------------------------------------------------------------
    @property
    def kv_bytes_per_block(self) -> int:
        return kv_bytes_per_block(self.attn_spec, self.num_layers)

    def allocate_kv_cache(self, num_blocks: int) -> None:
        self.kv_caches = allocate_kv_caches(self.attn_spec, self.num_layers, num_blocks)

    def profile_run(self, ids: torch.Tensor) -> None:
        """A forward at the token budget (activations) for the KV sizing's profile."""
        with set_forward_context(ForwardContext(self.backend, None, [])):
            hidden = self.model(ids, ids)
        self.model.compute_logits(hidden[: self.attn_spec.max_num_seqs])

    # -- one step ------------------------------------------------------------------------
    def run_batch(self, common: CommonAttentionMetadata, input_ids: torch.Tensor,
                  positions: torch.Tensor) -> None:
        """The target's staged batch through the drafter: only its K/V writes matter."""
        ctx = ForwardContext(self.backend, self.backend.build_metadata(common), self.kv_caches)
        with set_forward_context(ctx):
            self.model(input_ids, positions)

    def propose(self, last_ids: torch.Tensor, last_pos: np.ndarray, caps: np.ndarray,
                block_table: np.ndarray, block_table_dev: torch.Tensor,
                block_size: int) -> tuple[torch.Tensor, np.ndarray]:
        """``k`` greedy tokens for each of ``B`` requests whose last emitted token
        ``last_ids[i]`` (device) sits at position ``last_pos[i]``; request ``i`` may write
        K/V below position ``caps[i]`` (its blocks, ``max_model_len``). ``block_table``
        ``[B, m]`` (host) and ``block_table_dev`` (its device copy) are the requests' rows.
        Returns the drafts ``[B, k]`` on the host (once the copy queued here is done) and
        how many of each row are valid (a forward whose position has no slot stops it)."""
        b, k = len(last_pos), self.k
        pos = last_pos[:, None] + np.arange(k)  # [B, k]: forward j writes position pos[:, j]
        valid = pos < caps[:, None]
        # Past its cap a row still runs (vectorised) at an in-range position, writing nowhere.
        pos = np.minimum(pos, caps[:, None] - 1)
        blocks = np.take_along_axis(block_table, pos // block_size, axis=1)
        slots = np.where(valid, blocks.astype(np.int64) * block_size + pos % block_size, -1)
        host = torch.from_numpy(np.concatenate([pos.T.ravel(), slots.T.ravel()]))
        dev = to_device(host, self.device)
        dev_pos, dev_slots = dev[:b * k].view(k, b), dev[b * k:].view(k, b)
        seq_lens = torch.from_numpy((pos + 1).astype(np.int32).T.copy())  # [k, B]
        dev_lens = to_device(seq_lens, self.device)
        ids = last_ids
        out = torch.empty(k, b, dtype=torch.int64, device=self.device)
        for j in range(k):
            common = CommonAttentionMetadata(
                num_reqs=b, num_tokens=b, num_actual_tokens=b, max_query_len=1,
                max_seq_len=int(seq_lens[j].max()), uniform_decode=True,
                query_start_loc=self._arange_dev[:b + 1], seq_lens=dev_lens[j],
                block_table=block_table_dev, slot_mapping=dev_slots[j],
                query_start_loc_cpu=self._arange[:b + 1], seq_lens_cpu=seq_lens[j])
            ctx = ForwardContext(self.backend, self.backend.build_metadata(common),
                                 self.kv_caches)
            with set_forward_context(ctx):
                hidden = self.model(ids, dev_pos[j])
            ids = self.model.compute_logits(hidden).argmax(dim=-1)
            out[j] = ids
        drafts = self._host_drafts[:b]
        drafts.copy_(out.T, non_blocking=True)
        return drafts, valid.sum(axis=1)
