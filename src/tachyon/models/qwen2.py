"""Qwen2: the Llama decoder with a bias on the q/k/v projections (none on o_proj)."""

from __future__ import annotations

from typing import ClassVar

from tachyon.models.llama import LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    qkv_bias: ClassVar[bool | None] = True
