"""Hermes / Qwen: each call is ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``."""

from __future__ import annotations

import json
import re

from tachyon.entrypoints.openai.tool_parsers.base import ToolCall, ToolParser, call_from_object

START, END = "<tool_call>", "</tool_call>"
_BLOCK = re.compile(re.escape(START) + r"(.*?)" + re.escape(END), re.DOTALL)


def _partial_prefix(text: str, marker: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``marker``."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0


class HermesToolParser(ToolParser):
    def start(self, text: str) -> int | None:
        i = text.find(START)
        return None if i < 0 else i

    def held(self, text: str) -> int:
        return _partial_prefix(text, START)

    def calls(self, tool_text: str, final: bool) -> list[ToolCall]:
        bodies = [m.group(1) for m in _BLOCK.finditer(tool_text)]
        if final:  # a model that stopped (EOS) before closing its last block
            tail = tool_text[tool_text.rfind(END) + len(END):] if END in tool_text \
                else tool_text
            if START in tail:
                bodies.append(tail.split(START, 1)[1])
        out = []
        for body in bodies:
            try:
                call = call_from_object(json.loads(body))
            except json.JSONDecodeError:
                call = None
            if call is not None:
                out.append(call)
        return out
