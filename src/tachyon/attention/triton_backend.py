"""The default CUDA backend: tachyon's own Triton kernels over the paged cache.

Mixed and prefill batches use the varlen kernel, uniform decode batches the split-KV decode
kernel. Every launch is shaped by tensor shapes only and all metadata lives in persistent
buffers (the model runner's input buffers and a decode workspace allocated once here), so a
full CUDA graph can capture any batch: support level ALWAYS.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import ClassVar

import torch

from tachyon.attention.base import AttentionBackend, AttentionSpec, CommonAttentionMetadata
from tachyon.cudagraph.modes import CGSupport


@dataclass
class TritonAttentionMetadata:
    common: CommonAttentionMetadata
    num_splits: int  # decode splits; 0 when the batch is not uniform decode


class TritonAttentionBackend(AttentionBackend):
    name: ClassVar[str] = "triton"
    cudagraph_support: ClassVar[CGSupport] = CGSupport.ALWAYS

    def __init__(self, spec: AttentionSpec) -> None:
        super().__init__(spec)
        # Imported here: the triton package is optional (check_available says so).
        from tachyon.attention.kernels import decode, store_kv, unified

        self.decode, self.store_kv, self.unified = decode, store_kv, unified
        max_splits = decode.choose_num_splits(1, spec.num_kv_heads, spec.device)
        self.workspace = decode.decode_workspace(
            spec.max_num_seqs, spec.num_heads, spec.head_dim, max_splits, spec.device,
            num_kv_heads=spec.num_kv_heads)

    @classmethod
    def check_available(cls, device: torch.device) -> None:
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(
                "the 'triton' attention backend needs a CUDA GPU; on a CPU it runs only under "
                "TRITON_INTERPRET=1 (slow, for tests). Use --attention-backend torch here"
            )
        try:
            import triton  # noqa: F401
        except ImportError as e:
            raise ValueError("the 'triton' attention backend needs the triton package") from e

    def build_metadata(self, common: CommonAttentionMetadata) -> TritonAttentionMetadata:
        splits = 0
        if common.uniform_decode:
            splits = self.decode.choose_num_splits(
                common.num_reqs, self.spec.num_kv_heads, self.spec.device)
        return TritonAttentionMetadata(common, splits)

    def forward(self, query, key, value, k_cache, v_cache, metadata, output) -> None:
        c = metadata.common
        n = c.num_tokens
        self.store_kv.store_kv_cache(key[:n], value[:n], k_cache, v_cache, c.slot_mapping[:n])
        if metadata.num_splits:
            # Uniform decode: token r is request r's only query.
            r = c.num_reqs
            self.decode.decode_attention(
                query[:r], k_cache, v_cache, output[:r], c.seq_lens, c.block_table,
                self.spec.scale, metadata.num_splits, self.workspace)
        else:
            self.unified.unified_attention(
                query, k_cache, v_cache, output, c.query_start_loc, c.seq_lens, c.block_table,
                self.spec.scale, c.num_reqs)
