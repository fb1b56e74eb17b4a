"""The attention backend protocol.

A backend owns two things: how the per-step metadata is laid out (``build_metadata``)
and how attention is computed over the paged KV cache (``forward``). It also declares,
through ``cudagraph_support``, how far a CUDA graph may capture it. The model and the
graph machinery only ever talk to a backend through this interface.

Paged KV cache layout, per layer: ``k_cache`` and ``v_cache`` are
``[num_blocks, block_size, num_kv_heads, head_dim]``. Token ``t`` of a request lives in
block ``block_table[req, t // block_size]`` at offset ``t % block_size``; its flat
*slot* is ``block_id * block_size + offset``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from tachyon.cudagraph.modes import CGSupport


@dataclass(frozen=True)
class AttentionSpec:
    """Static shape of the attention a backend serves, fixed for the engine's lifetime."""

    num_heads: int  # query heads on this rank
    num_kv_heads: int  # KV heads on this rank
    head_dim: int
    scale: float
    block_size: int
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    dtype: torch.dtype
    device: torch.device

    @property
    def max_blocks_per_seq(self) -> int:
        # One spare column: a request at exactly max_model_len must not run off the table.
        return -(-self.max_model_len // self.block_size) + 1


@dataclass
class CommonAttentionMetadata:
    """The batch as every backend sees it. Device tensors are prefix views of persistent buffers.

    For a batch of ``num_reqs`` requests (padding included) and ``num_tokens`` tokens:
      * ``query_start_loc[num_reqs + 1]`` (int32): request r's new tokens are
        ``[query_start_loc[r], query_start_loc[r + 1])`` in the flattened token dimension;
      * ``seq_lens[num_reqs]`` (int32): context length after this step (cached + new tokens);
        padded requests have length 0;
      * ``block_table[num_reqs, max_blocks_per_seq]`` (int32);
      * ``slot_mapping[num_tokens]`` (int64): where each new token's K/V is written; -1 = nowhere.
    Host copies (``*_cpu``) exist for backends that must plan on the host (the torch reference).

    ``HOST_ONLY`` fields describe the live batch's contents (real token count, longest query
    and sequence): eager host code may use them, a kernel inside a FULL graph must not, since
    the graph keeps the value it saw at capture (``tachyon.cudagraph.contract`` checks this).
    """

    HOST_ONLY: ClassVar[frozenset[str]] = frozenset({
        "num_actual_tokens", "max_query_len", "max_seq_len", "query_start_loc_cpu",
        "seq_lens_cpu",
    })

    num_reqs: int
    num_tokens: int  # padded token count (what the tensors are sized to)
    num_actual_tokens: int  # real tokens, <= num_tokens
    max_query_len: int
    max_seq_len: int
    uniform_decode: bool
    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    block_table: torch.Tensor
    slot_mapping: torch.Tensor
    query_start_loc_cpu: torch.Tensor
    seq_lens_cpu: torch.Tensor


class AttentionBackend(ABC):
    """One instance per engine, shared by every layer (metadata is built once per step)."""

    name: ClassVar[str]
    cudagraph_support: ClassVar[CGSupport]

    def __init__(self, spec: AttentionSpec) -> None:
        self.spec = spec

    @classmethod
    def check_available(cls, device: torch.device) -> None:
        """Raise ``ValueError`` with advice if this backend cannot run on ``device``."""
        return None

    @abstractmethod
    def build_metadata(self, common: CommonAttentionMetadata) -> Any:
        """Build this backend's metadata for one step. Runs outside any CUDA graph.

        Whatever tensors the result holds must be persistent (same address at capture and
        replay) if the backend claims any ``cudagraph_support`` above NEVER.
        """

    @abstractmethod
    def forward(
        self,
        query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        metadata: Any,
        output: torch.Tensor,  # [num_tokens, num_heads, head_dim], written in place
    ) -> None:
        """Write the new K/V into the cache at ``slot_mapping`` then attend, causally."""
