"""Tool-call parsers by ``--tool-call-parser`` name."""

from __future__ import annotations

from tachyon.entrypoints.openai.tool_parsers.base import ToolCall, ToolParser, ToolStream
from tachyon.entrypoints.openai.tool_parsers.hermes import HermesToolParser
from tachyon.entrypoints.openai.tool_parsers.llama3_json import Llama3JsonToolParser

TOOL_PARSERS: dict[str, type[ToolParser]] = {
    "hermes": HermesToolParser,
    "llama3_json": Llama3JsonToolParser,
}

__all__ = ["TOOL_PARSERS", "ToolCall", "ToolParser", "ToolStream"]
