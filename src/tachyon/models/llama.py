"""Llama-family decoder (Llama 2/3, SmolLM2). Qwen2 and Qwen3 are small variations of it.

Layout follows HF names so checkpoints map one to one, except the packed projections:
``q_proj``/``k_proj``/``v_proj`` load into ``qkv_proj`` and ``gate_proj``/``up_proj`` into
``gate_up_proj``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import torch
from torch import nn

from tachyon.attention.layer import Attention
from tachyon.layers.activation import SiluAndMul
from tachyon.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from tachyon.layers.linear import (
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
    default_weight_loader,
)
from tachyon.layers.norm import RMSNorm
from tachyon.layers.rotary import RotaryEmbedding, rope_parameters

# Copies a full HF tensor into (this rank's part of) a parameter: (parameter, tensor) -> None.
WeightLoader = Callable[[torch.Tensor, torch.Tensor], None]

# HF checkpoint name piece -> (our packed parameter, shard id)
PACKED = {
    "q_proj": ("qkv_proj", "q"),
    "k_proj": ("qkv_proj", "k"),
    "v_proj": ("qkv_proj", "v"),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}


class LlamaAttention(nn.Module):
    def __init__(self, cfg: Any, layer_idx: int, qkv_bias: bool, o_bias: bool, qk_norm: bool,
                 max_position: int) -> None:
        super().__init__()
        hidden = cfg.hidden_size
        heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        head_dim = getattr(cfg, "head_dim", None) or hidden // heads
        self.qkv_proj = QKVParallelLinear(hidden, head_dim, heads, kv_heads, qkv_bias)
        self.o_proj = RowParallelLinear(heads * head_dim, hidden, o_bias)
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.head_dim = head_dim
        self.q_size, self.kv_size = self.num_heads * head_dim, self.num_kv_heads * head_dim
        self.rotary_emb = RotaryEmbedding(head_dim, max_position, rope_parameters(cfg))
        self.q_norm = RMSNorm(head_dim, cfg.rms_norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(head_dim, cfg.rms_norm_eps) if qk_norm else None
        self.attn = Attention(self.num_heads, self.num_kv_heads, head_dim, layer_idx)

    def forward(self, positions: torch.Tensor, qkv: torch.Tensor) -> torch.Tensor:
        """Attention from the projected ``qkv`` (the decoder layer runs ``qkv_proj``, so the
        input norm can ride in its prologue)."""
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        t = qkv.shape[0]
        q = q.reshape(t, self.num_heads, self.head_dim)
        k = k.reshape(t, self.num_kv_heads, self.head_dim)
        q, k = self.rotary_emb(positions, q, k, self.q_norm, self.k_norm)
        out = self.attn(q.reshape(t, self.q_size), k.reshape(t, self.kv_size), v)
        return self.o_proj(out)


class LlamaMLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int, bias: bool) -> None:
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(hidden, [intermediate] * 2, bias)
        self.down_proj = RowParallelLinear(intermediate, hidden, bias)
        self.act_fn = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: Any, layer_idx: int, variant: type[LlamaForCausalLM],
                 max_position: int) -> None:
        super().__init__()
        attn_bias = bool(getattr(cfg, "attention_bias", False))
        self.self_attn = LlamaAttention(
            cfg, layer_idx,
            qkv_bias=variant.qkv_bias if variant.qkv_bias is not None else attn_bias,
            o_bias=attn_bias and variant.qkv_bias is None,
            qk_norm=variant.qk_norm,
            max_position=max_position,
        )
        self.mlp = LlamaMLP(cfg.hidden_size, cfg.intermediate_size,
                            bool(getattr(cfg, "mlp_bias", False)))
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor,
                residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        # At decode sizes each norm (with the residual add) runs in the prologue of the GEMM
        # that follows it, and SiLU-and-mul in the down projection's: see layers/linear.py.
        attn, mlp = self.self_attn, self.mlp
        qkv, residual = attn.qkv_proj.forward_after_norm(hidden, residual, self.input_layernorm)
        hidden = attn(positions, qkv)
        gate_up, residual = mlp.gate_up_proj.forward_after_norm(
            hidden, residual, self.post_attention_layernorm)
        return mlp.down_proj.forward_after_silu_mul(gate_up, mlp.act_fn), residual


class LlamaModel(nn.Module):
    def __init__(self, cfg: Any, variant: type[LlamaForCausalLM], max_position: int) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(cfg, i, variant, max_position) for i in range(cfg.num_hidden_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden, residual = self.embed_tokens(input_ids), None
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class LlamaForCausalLM(nn.Module):
    # Variant knobs for subclasses. qkv_bias None: follow config.attention_bias (Llama).
    qkv_bias: ClassVar[bool | None] = None
    qk_norm: ClassVar[bool] = False

    def __init__(self, cfg: Any, max_position: int) -> None:
        super().__init__()
        self.config = cfg
        self.model = LlamaModel(cfg, type(self), max_position)
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size)
        self.tie_word_embeddings = bool(getattr(cfg, "tie_word_embeddings", False))
        if self.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @property
    def attention_shape(self) -> tuple[int, int, int, int]:
        """(num_layers, heads per rank, KV heads per rank, head_dim)."""
        a = self.model.layers[0].self_attn
        return len(self.model.layers), a.num_heads, a.num_kv_heads, a.head_dim

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, positions)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head.compute_logits(hidden)

    def weight_loader_for(self, name: str) -> tuple[str, WeightLoader] | None:
        """Where the HF-named tensor ``name`` goes: (our parameter's name, a function that
        copies a full HF tensor into this rank's part of that parameter, checking its shape).
        None for tensors with no place by design (rotary tables, a tied LM head); a
        ``ValueError`` naming the tensor for anything else. Loading and ``update_weights``
        both go through here, so names, packing and TP sharding are decided in one place."""
        if "rotary_emb.inv_freq" in name:
            return None
        if name == "lm_head.weight" and self.tie_word_embeddings:
            return None
        target, shard = self.packed_name(name)
        try:
            self.get_parameter(target)
            owner = self.get_submodule(target.rsplit(".", 1)[0])
        except AttributeError:
            raise ValueError(
                f"checkpoint tensor {name!r} has no place in {type(self).__name__}") from None
        loader = getattr(owner, "weight_loader", None)
        if loader is None:
            return target, default_weight_loader  # checks the shape: copy_ broadcasts
        if shard is None:
            return target, loader
        return target, lambda param, tensor: loader(param, tensor, shard)

    @staticmethod
    def packed_name(name: str) -> tuple[str, str | int | None]:
        """HF tensor name -> (our parameter's name, its shard id in a packed parameter or
        None): ``...q_proj.weight`` -> (``...qkv_proj.weight``, "q"). LoRA places adapter
        matrices by the same rule."""
        for piece, (packed, shard_id) in PACKED.items():
            if f".{piece}." in name:
                return name.replace(piece, packed), shard_id
        return name, None

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Load HF-named tensors; returns the names of the parameters that were filled."""
        loaded: set[str] = set()
        for name, tensor in weights:
            where = self.weight_loader_for(name)
            if where is None:
                continue
            target, load = where
            load(self.get_parameter(target), tensor)
            loaded.add(target)
        if self.tie_word_embeddings:
            loaded.add("lm_head.weight")
        missing = set(dict(self.named_parameters())) - loaded
        if missing:
            raise ValueError(f"checkpoint lacks {len(missing)} tensors, e.g. {sorted(missing)[:3]}")
        return loaded
