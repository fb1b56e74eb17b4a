"""tachyon: a fast LLM inference and serving engine.

The public names load on first use (``from tachyon import LLM`` works as usual), so that
importing a light submodule such as ``tachyon.config`` or the CLI does not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tachyon.entrypoints.llm import LLM
    from tachyon.lora.request import LoRARequest
    from tachyon.outputs import CompletionOutput, RequestOutput
    from tachyon.sampling_params import SamplingParams

_EXPORTS = {
    "LLM": "tachyon.entrypoints.llm",
    "LoRARequest": "tachyon.lora.request",
    "CompletionOutput": "tachyon.outputs",
    "RequestOutput": "tachyon.outputs",
    "SamplingParams": "tachyon.sampling_params",
}
__all__ = ["LLM", "CompletionOutput", "LoRARequest", "RequestOutput", "SamplingParams"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'tachyon' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
