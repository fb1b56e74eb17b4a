"""Qwen3: the Llama decoder with RMSNorm on each query and key head before rotary."""

from __future__ import annotations

from typing import ClassVar

from tachyon.models.llama import LlamaForCausalLM


class Qwen3ForCausalLM(LlamaForCausalLM):
    qk_norm: ClassVar[bool] = True
