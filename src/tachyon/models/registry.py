"""Model classes keyed by the ``architectures`` entry of an HF ``config.json``."""

from __future__ import annotations

from typing import Any

from torch import nn

from tachyon.models.llama import LlamaForCausalLM
from tachyon.models.qwen2 import Qwen2ForCausalLM
from tachyon.models.qwen3 import Qwen3ForCausalLM

MODEL_REGISTRY: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
}


def get_model_class(hf_config: Any) -> type[nn.Module]:
    for arch in getattr(hf_config, "architectures", None) or []:
        if arch in MODEL_REGISTRY:
            return MODEL_REGISTRY[arch]
    raise ValueError(
        f"unsupported architecture {getattr(hf_config, 'architectures', None)}; "
        f"supported: {', '.join(MODEL_REGISTRY)}"
    )
