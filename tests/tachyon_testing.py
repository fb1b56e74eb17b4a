"""Helpers shared by the engine-core tests (imported by ``conftest.py`` and test modules;
a plain module, because several ``conftest.py`` files exist and ``from conftest import``
would pick whichever pytest loaded last).

Tiny models are real ``save_pretrained`` safetensors directories, so tachyon loads them
exactly like a downloaded checkpoint and transformers can serve as the reference. Weights are
re-drawn with a larger spread than HF's default init (std 0.02) so attention is far from
uniform: with near-uniform attention a broken rotary or causal mask would go unnoticed.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import torch

TINY_VOCAB = 500  # not a multiple of the 64-row vocab padding on purpose
TINY_MAX_POS = 512
# Std of re-drawn weight matrices: q.k logits come out O(1), so attention is peaked.
TINY_WEIGHT_STD = 0.15

_COMMON = dict(
    vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16,
    max_position_embeddings=TINY_MAX_POS, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
)

# name -> (config class name, extra config kwargs)
TINY_SPECS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", {"tie_word_embeddings": False}),
    "llama-tied": ("LlamaConfig", {"tie_word_embeddings": True, "num_hidden_layers": 3,
                                   "num_key_value_heads": 1}),  # multi-query attention
    "llama3-rope": ("LlamaConfig", {
        "tie_word_embeddings": False, "attention_bias": True,
        "rope_parameters": {"rope_type": "llama3", "rope_theta": 50000.0, "factor": 8.0,
                            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                            "original_max_position_embeddings": 32}}),
    "qwen2": ("Qwen2Config", {"tie_word_embeddings": False, "num_hidden_layers": 3}),
    # Qwen3 sets head_dim apart from hidden_size / num_heads (here 32, not 16).
    "qwen3": ("Qwen3Config", {"tie_word_embeddings": True, "num_hidden_layers": 4,
                              "head_dim": 32}),
}


def _randomize(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.rand(p.shape, generator=gen) - 0.1)
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=gen))
            elif name.endswith("bias"):
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(TINY_WEIGHT_STD * torch.randn(p.shape, generator=gen))


def write_tiny_model(root: Path, name: str, seed: int = 0, **overrides: Any) -> Path:
    """Write a random tiny HF checkpoint (float32 safetensors) and return its directory."""
    import transformers

    cls_name, extra = TINY_SPECS[name]
    kwargs = {**_COMMON, **extra, **overrides}
    cfg = getattr(transformers, cls_name)(**kwargs)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    _randomize(model, seed)
    if cfg.tie_word_embeddings:
        model.tie_weights()
    path = root / name
    model.save_pretrained(path, safe_serialization=True)
    return path


def load_hf(path: str | Path) -> Any:
    """The HF reference: float64 weights, eager attention."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64,
                                                 attn_implementation="eager")
    return model.eval()


# --------------------------------------------------------------------- KV cache bookkeeping


def check_kv_invariants(kv: Any) -> None:
    """Block accounting of a ``KVCacheManager``: reference counts equal the number of
    requests holding a block, a block is in the free queue iff nobody holds it, nobody holds
    a block twice, and the prefix-cache index points at blocks carrying that hash."""
    pool = kv.pool
    holders: Counter[int] = Counter()
    for rid, blocks in kv.req_blocks.items():
        ids = [b.block_id for b in blocks]
        assert len(set(ids)) == len(ids), f"{rid} holds a block twice: {ids}"
        for b in blocks:
            assert pool.blocks[b.block_id] is b
        holders.update(ids)
    for b in pool.blocks:
        assert b.ref_cnt == holders[b.block_id], (b, holders[b.block_id])
        assert (b.block_id in pool.free_queue) == (b.ref_cnt == 0), b
    assert len(pool.free_queue) == sum(1 for b in pool.blocks if b.ref_cnt == 0)
    assert kv.num_free_blocks == len(pool.free_queue)
    for h, block_id in pool.cached.items():
        assert pool.blocks[block_id].block_hash == h


class FakeKVContent:
    """Stands in for the K/V tensors: the slot of position ``p`` holds a fingerprint of the
    tokens ``[0, p]`` (K/V depend on the whole prefix). Reading a request's context back
    proves its blocks hold its own history, whatever was shared, evicted or reused."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.block_size = block_size
        self.slots: list[int | None] = [None] * (num_blocks * block_size)

    def _slot(self, block_ids: list[int], pos: int) -> int:
        return block_ids[pos // self.block_size] * self.block_size + pos % self.block_size

    def write(self, block_ids: list[int], tokens: list[int], start: int, n: int) -> None:
        for p in range(start, start + n):
            self.slots[self._slot(block_ids, p)] = hash(tuple(tokens[: p + 1]))

    def verify(self, block_ids: list[int], tokens: list[int], upto: int, who: str) -> None:
        for p in range(upto):
            assert self.slots[self._slot(block_ids, p)] == hash(tuple(tokens[: p + 1])), (
                f"{who}: position {p} of {upto} reads K/V of another history"
            )
