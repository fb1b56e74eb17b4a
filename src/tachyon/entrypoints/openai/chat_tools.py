"""Tool calls in chat responses: a choice's text to ``content`` + ``tool_calls``, whole or
as streamed deltas in the OpenAI shape.

Streaming: with ``"auto"`` the text before a call streams as content and each call is sent
in one delta once complete (its name and all its arguments); a named function streams its
arguments as they are generated; ``"required"`` sends its calls when the output ends (the
JSON array is only known to be whole then).
"""

from __future__ import annotations

from typing import Any

from tachyon.entrypoints.openai.tool_parsers import ToolCall, ToolParser, ToolStream
from tachyon.entrypoints.openai.tools import ToolRequest


def finish_reason(reason: str | None, calls: bool, tools: ToolRequest) -> str | None:
    """OpenAI: "tool_calls" when the model chose to call (a forced named call is "stop");
    a cut-short output stays "length"."""
    if reason == "stop" and calls and tools.choice != "named":
        return "tool_calls"
    return reason


def whole(tools: ToolRequest, parser: ToolParser | None, text: str
          ) -> tuple[str | None, list[ToolCall]]:
    if tools.choice == "auto":
        assert parser is not None
        return parser.extract(text)
    return None, tools.forced_calls(text)


class ToolDeltas:
    """One streamed choice's tool-call deltas."""

    def __init__(self, tools: ToolRequest, parser: ToolParser | None) -> None:
        self.tools = tools
        self.stream = ToolStream(parser) if parser is not None else None
        self.text = ""
        self.num_calls = 0
        self.named_call: ToolCall | None = None

    def feed(self, text: str, final: bool) -> tuple[str | None, list[dict[str, Any]]]:
        """Content to send (None: none at all) and tool-call deltas."""
        if self.tools.choice == "auto":
            assert self.stream is not None
            content, calls = self.stream.feed(text, final)
            return content, self._deltas(calls)
        if self.tools.choice == "named":
            if self.named_call is None:
                assert self.tools.named is not None
                self.named_call = ToolCall(self.tools.named, text)
                self.num_calls = 1
                return None, [self.named_call.to_delta(0)]
            return None, [{"index": 0, "function": {"arguments": text}}] if text else []
        self.text += text
        return None, self._deltas(self.tools.forced_calls(self.text)) if final else []

    def _deltas(self, calls: list[ToolCall]) -> list[dict[str, Any]]:
        out = [c.to_delta(self.num_calls + i) for i, c in enumerate(calls)]
        self.num_calls += len(calls)
        return out
