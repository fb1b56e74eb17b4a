"""What a tool-call parser is: model text to (content, tool calls), whole or as it streams."""

from __future__ import annotations

import json
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # JSON text, as OpenAI sends it
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": self.arguments}}

    def to_delta(self, index: int) -> dict[str, Any]:
        return {"index": index, **self.to_dict()}


def call_from_object(obj: Any) -> ToolCall | None:
    """``{"name": ..., "arguments" | "parameters": {...}}`` to a call; None if not that."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):  # already JSON text
        return ToolCall(obj["name"], args)
    return ToolCall(obj["name"], json.dumps(args, ensure_ascii=False))


class ToolParser(ABC):
    """Splits a model's output into text for the user and the tool calls it contains.

    ``start(text)``: where tool calls begin in ``text`` (None: not yet, and maybe never);
    ``held(text)``: how many trailing characters might still turn out to be the start of a
    tool call (kept back while streaming); ``calls(tool_text, final)``: the calls that are
    complete in the text after the start (``final``: the output ended, take what is there).
    """

    @abstractmethod
    def start(self, text: str) -> int | None: ...

    @abstractmethod
    def held(self, text: str) -> int: ...

    @abstractmethod
    def calls(self, tool_text: str, final: bool) -> list[ToolCall]: ...

    def extract(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """The whole output: its content (None when only tools were called) and calls."""
        i = self.start(text)
        if i is None:
            return text, []
        calls = self.calls(text[i:], final=True)
        if not calls:  # it looked like a call but was not one: it is text
            return text, []
        content = text[:i].strip()
        return content or None, calls


class ToolStream:
    """One streamed choice: feed text deltas, get content to send and new tool calls."""

    def __init__(self, parser: ToolParser) -> None:
        self.parser = parser
        self.text = ""
        self.sent = 0  # characters of content sent
        self.tool_start: int | None = None
        self.num_calls = 0  # tool calls sent
        self.calls: list[ToolCall] = []

    def feed(self, delta: str, final: bool) -> tuple[str, list[ToolCall]]:
        self.text += delta
        if self.tool_start is None:
            self.tool_start = self.parser.start(self.text)
        if self.tool_start is None:
            end = len(self.text) if final else len(self.text) - self.parser.held(self.text)
            content, self.sent = self.text[self.sent:end], max(self.sent, end)
            return content, []
        content = self.text[self.sent:self.tool_start]
        self.sent = max(self.sent, self.tool_start)
        found = self.parser.calls(self.text[self.tool_start:], final)
        if final and not found and not self.calls:  # not a call after all: send it as text
            content += self.text[self.sent:]
            self.sent = len(self.text)
        new = found[self.num_calls:]
        self.num_calls = max(self.num_calls, len(found))
        self.calls.extend(new)
        return content, new
