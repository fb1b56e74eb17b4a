"""The attention layer the models use, and the custom op that graph splitting cuts at.

``tachyon::attention`` is opaque to torch.compile: the compiled-piecewise backend splits
the FX graph at it, and the breakable-graph runner ends a graph segment around it.
"""

from __future__ import annotations

import torch
from torch import nn

from tachyon.forward_context import get_forward_context

ATTENTION_OP_NAME = "tachyon::attention"


def _attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, output: torch.Tensor,
    layer_idx: int,
) -> None:
    ctx = get_forward_context()
    if ctx.attn_metadata is None:  # profiling run: no KV cache exists yet
        output.zero_()
        return
    if ctx.breaker is not None:
        ctx.breaker.split(query, key, value, output, layer_idx)
        return
    k_cache, v_cache = ctx.kv_caches[layer_idx]
    ctx.backend.forward(query, key, value, k_cache, v_cache, ctx.attn_metadata, output)


attention_op = torch.library.custom_op(ATTENTION_OP_NAME, mutates_args=("output",))(_attention)


@attention_op.register_fake
def _(query, key, value, output, layer_idx) -> None:
    return None


class Attention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, layer_idx: int) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.layer_idx = layer_idx

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q: [T, Hq*D], k/v: [T, Hk*D] -> [T, Hq*D]."""
        t = q.shape[0]
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        # Only torch.compile needs the op (to split the graph there). Eager calls skip the
        # op's dispatch, whose first call imports torch._dynamo: 0.5-1.2 s of a 2-core
        # CPU's start-up, and a few microseconds per layer on every step.
        if torch.compiler.is_compiling():
            out = torch.empty_like(q)
            attention_op(q, k, v, out, self.layer_idx)
        else:
            breaker = get_forward_context().breaker  # a breakable capture may share outputs
            out = torch.empty_like(q) if breaker is None else breaker.output_like(q)
            _attention(q, k, v, out, self.layer_idx)
        return out.view(t, self.num_heads * self.head_dim)
