"""Vocabulary-parallel embedding and LM head: each rank holds a contiguous slice of the vocab."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tachyon.distributed.parallel_state import (
    get_tp_rank,
    get_tp_world_size,
    tensor_model_parallel_all_gather,
    tensor_model_parallel_all_reduce,
)
from tachyon.layers.linear import linear

# Pad the vocabulary so every rank's slice has the same, aligned size.
VOCAB_PAD_TO = 64


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        tp = get_tp_world_size()
        pad = VOCAB_PAD_TO * tp
        self.padded_vocab = -(-vocab_size // pad) * pad
        self.per_rank = self.padded_vocab // tp
        self.start = get_tp_rank() * self.per_rank
        self.tp_size = tp
        self.weight = nn.Parameter(torch.empty(self.per_rank, hidden_size), requires_grad=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.start
        outside = (local < 0) | (local >= self.per_rank)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out.masked_fill_(outside.unsqueeze(-1), 0)
        return tensor_model_parallel_all_reduce(out)

    def weight_loader(self, param: torch.Tensor, loaded: torch.Tensor) -> None:
        if tuple(loaded.shape) != (self.vocab_size, param.shape[1]):
            raise ValueError(f"embedding shape {tuple(loaded.shape)} does not match the config "
                             f"({self.vocab_size}, {param.shape[1]})")
        rows = max(0, min(self.per_rank, self.vocab_size - self.start))
        param.data.zero_()
        param.data[:rows].copy_(loaded[self.start : self.start + rows])


class ParallelLMHead(VocabParallelEmbedding):
    """Logits over the vocabulary; ranks compute their slice, then gather."""

    def __init__(self, vocab_size: int, hidden_size: int, bias: bool = False) -> None:
        super().__init__(vocab_size, hidden_size)
        if bias:
            raise ValueError("LM heads with a bias are not supported")

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = tensor_model_parallel_all_gather(linear(hidden, self.weight), dim=-1)
        return logits[..., : self.vocab_size]
