"""``tools``, ``tool_choice`` and ``parallel_tool_calls`` of a chat request.

``"auto"``: the model decides and a ``--tool-call-parser`` reads its calls out of the text.
``"required"`` and a named function are enforced through structured outputs, so the
arguments always parse: a named function's output *is* its arguments (constrained by its
``parameters`` schema); ``"required"`` constrains the output to a JSON array of
``{"name", "parameters"}`` objects, one per call (exactly one without parallel calls).
``"none"``: the tools are left out of the prompt and no call is parsed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from tachyon.entrypoints.openai.protocol import Fields, OpenAIError
from tachyon.entrypoints.openai.tool_parsers import ToolCall
from tachyon.structured_output.params import StructuredOutputsParams

# A function without a "parameters" schema takes any object.
ANY_OBJECT: dict[str, Any] = {"type": "object"}


@dataclass(frozen=True)
class ToolRequest:
    tools: list[dict[str, Any]]
    choice: str  # "auto" | "required" | "named"
    named: str | None  # the function of a named choice
    parallel: bool

    def schema_of(self, name: str) -> dict[str, Any]:
        fn = next(t["function"] for t in self.tools if t["function"]["name"] == name)
        return fn.get("parameters") or ANY_OBJECT

    def constraint(self) -> StructuredOutputsParams | None:
        if self.choice == "named":
            assert self.named is not None
            return StructuredOutputsParams(json=json.dumps(self.schema_of(self.named),
                                                           sort_keys=True))
        if self.choice != "required":
            return None
        one_call = {"anyOf": [
            {"type": "object", "properties": {"name": {"const": t["function"]["name"]},
                                              "parameters": self.schema_of(
                                                  t["function"]["name"])},
             "required": ["name", "parameters"], "additionalProperties": False}
            for t in self.tools]}
        array: dict[str, Any] = {"type": "array", "items": one_call, "minItems": 1}
        if not self.parallel:
            array["maxItems"] = 1
        return StructuredOutputsParams(json=json.dumps(array, sort_keys=True))

    def forced_calls(self, text: str) -> list[ToolCall]:
        """The calls of a constrained output ("required" or named)."""
        if self.choice == "named":
            assert self.named is not None
            return [ToolCall(self.named, text)]
        try:
            items = json.loads(text)
        except json.JSONDecodeError:  # cut short by max_tokens: no complete call
            return []
        return [ToolCall(c["name"], json.dumps(c["parameters"], ensure_ascii=False))
                for c in items]


def _check_tools(v: Any) -> list[dict[str, Any]]:
    if not isinstance(v, list) or not v:
        raise OpenAIError("'tools' must be a non-empty list of tools", "tools")
    for t in v:
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(t, dict) or t.get("type", "function") != "function" \
                or not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise OpenAIError('each tool must be {"type": "function", "function": {"name": '
                              '..., "parameters": {...}}}', "tools")
        if fn.get("parameters") is not None and not isinstance(fn["parameters"], dict):
            raise OpenAIError(f"the parameters of tool {fn['name']!r} must be a JSON schema",
                              "tools")
    return v


def parse_tools(f: Fields, auto_enabled: bool) -> ToolRequest | None:
    """None: no tools in play (none given, or ``tool_choice: "none"``)."""
    raw, choice = f.get("tools"), f.get("tool_choice")
    if raw is None:
        if choice not in (None, "none"):
            raise OpenAIError("'tool_choice' needs 'tools'", "tool_choice")
        return None
    tools = _check_tools(raw)
    parallel = f.boolean("parallel_tool_calls", True)
    names = {t["function"]["name"] for t in tools}
    if choice is None:
        choice = "auto"
    if choice == "none":
        return None
    if choice == "auto":
        if not auto_enabled:
            raise OpenAIError('"auto" tool choice needs the server started with '
                              '--enable-auto-tool-choice and --tool-call-parser; or send '
                              '"required" or a named function', "tool_choice")
        return ToolRequest(tools, "auto", None, parallel)
    if choice == "required":
        return ToolRequest(tools, "required", None, parallel)
    if isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        name = choice["function"].get("name")
        if name not in names:
            raise OpenAIError(f"'tool_choice' names function {name!r}, which is not in "
                              f"'tools'", "tool_choice")
        return ToolRequest(tools, "named", name, parallel)
    raise OpenAIError('\'tool_choice\' must be "none", "auto", "required" or '
                      '{"type": "function", "function": {"name": ...}}', "tool_choice")
