"""The reference backend: plain torch over the paged cache. Runs anywhere, captures never.

It plans on the host (reads ``seq_lens`` and ``query_start_loc`` as Python ints), so it can
not sit inside a CUDA graph: support level NEVER.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from tachyon.attention.base import AttentionBackend, CommonAttentionMetadata
from tachyon.cudagraph.modes import CGSupport


@dataclass
class TorchAttentionMetadata:
    common: CommonAttentionMetadata
    # Per real request: (row in block_table, token start, token end, context length).
    spans: list[tuple[int, int, int, int]]


def write_kv(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor,
             v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Scatter new K/V into their slots; slot -1 (padding) writes nothing."""
    valid = slot_mapping >= 0
    slots = slot_mapping[valid]
    flat_k = k_cache.view(-1, *k_cache.shape[2:])
    flat_v = v_cache.view(-1, *v_cache.shape[2:])
    flat_k[slots] = key[valid].to(k_cache.dtype)
    flat_v[slots] = value[valid].to(v_cache.dtype)


class TorchAttentionBackend(AttentionBackend):
    name: ClassVar[str] = "torch"
    cudagraph_support: ClassVar[CGSupport] = CGSupport.NEVER

    def build_metadata(self, common: CommonAttentionMetadata) -> TorchAttentionMetadata:
        qsl = common.query_start_loc_cpu.tolist()
        lens = common.seq_lens_cpu.tolist()
        spans = [(r, qsl[r], qsl[r + 1], lens[r]) for r in range(common.num_reqs)
                 if lens[r] > 0 and qsl[r + 1] > qsl[r]]
        return TorchAttentionMetadata(common, spans)

    def forward(self, query, key, value, k_cache, v_cache, metadata, output) -> None:
        common = metadata.common
        n = common.num_actual_tokens
        write_kv(key[:n], value[:n], k_cache, v_cache, common.slot_mapping[:n])
        if common.num_tokens > n:
            output[n:].zero_()  # padded tokens belong to no request
        block_size = k_cache.shape[1]
        for r, start, end, ctx_len in metadata.spans:
            q_len = end - start
            nblocks = -(-ctx_len // block_size)
            blocks = common.block_table[r, :nblocks]
            k = k_cache[blocks].flatten(0, 1)[:ctx_len].transpose(0, 1)  # [Hk, ctx, D]
            v = v_cache[blocks].flatten(0, 1)[:ctx_len].transpose(0, 1)
            q = query[start:end].transpose(0, 1)  # [Hq, q_len, D]
            k, v = k.to(q.dtype), v.to(q.dtype)
            if q_len == 1 or q_len == ctx_len:
                # One query sees everything; a whole prompt is plainly causal.
                out = F.scaled_dot_product_attention(
                    q, k, v, is_causal=q_len > 1, scale=self.spec.scale, enable_gqa=True)
            else:
                # Query i sits at position ctx_len - q_len + i and sees keys up to there.
                qpos = torch.arange(ctx_len - q_len, ctx_len, device=q.device).unsqueeze(1)
                mask = torch.arange(ctx_len, device=q.device).unsqueeze(0) <= qpos
                out = F.scaled_dot_product_attention(
                    q, k, v, attn_mask=mask, scale=self.spec.scale, enable_gqa=True)
            output[start:end] = out.transpose(0, 1)
