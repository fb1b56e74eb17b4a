"""Llama 3.x JSON tool calls: the reply is ``{"name": ..., "parameters": {...}}`` (several
joined by ``;``), optionally after ``<|python_tag|>`` (which is gone when special tokens are
skipped). Only a reply that *starts* with one is a call, as Llama 3's template instructs."""

from __future__ import annotations

import json

from tachyon.entrypoints.openai.tool_parsers.base import ToolCall, ToolParser, call_from_object

PYTHON_TAG = "<|python_tag|>"


class Llama3JsonToolParser(ToolParser):
    def start(self, text: str) -> int | None:
        body = text.lstrip()
        if body.startswith(PYTHON_TAG) or body.startswith("{"):
            return len(text) - len(body)
        return None

    def held(self, text: str) -> int:
        body = text.lstrip()
        if not body or PYTHON_TAG.startswith(body):  # may still become a call
            return len(text)
        return 0

    def calls(self, tool_text: str, final: bool) -> list[ToolCall]:
        if not final:  # the JSON is only known to be whole at the end
            return []
        text = tool_text.strip().removeprefix(PYTHON_TAG).strip()
        decoder, out, i = json.JSONDecoder(), [], 0
        while i < len(text):
            try:
                obj, i = decoder.raw_decode(text, i)
            except json.JSONDecodeError:
                return []
            call = call_from_object(obj)
            if call is None:
                return []
            out.append(call)
            while i < len(text) and text[i] in " \n\t;":
                i += 1
        return out
