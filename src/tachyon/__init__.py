"""tachyon: a fast LLM inference and serving engine."""

from tachyon.entrypoints.llm import LLM
from tachyon.outputs import CompletionOutput, RequestOutput
from tachyon.sampling_params import SamplingParams

__all__ = ["LLM", "CompletionOutput", "RequestOutput", "SamplingParams"]
__version__ = "0.1.0"
