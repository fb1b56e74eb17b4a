"""Chat messages to prompt token ids through a Jinja chat template.

The template is the tokenizer's own unless ``--chat-template`` gave another (a file or the
template text itself). OpenAI messages are normalized for templates first: text parts
joined, ``content: null`` (an assistant turn that only called tools) as ``""``, and tool-call
``arguments`` given to the template as objects, which is what the Hermes, Qwen and Llama 3
templates iterate over (they would render a JSON string twice-quoted).
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from typing import Any

from tachyon.entrypoints.openai.protocol import OpenAIError


def load_chat_template(value: str | None) -> str | None:
    """``--chat-template``: a path to a Jinja file, or the template text itself."""
    if value is None:
        return None
    if os.path.isfile(value):
        with open(value, encoding="utf-8") as fh:
            return fh.read()
    if "{{" in value or "{%" in value:
        return value
    raise ValueError(f"--chat-template: {value!r} is neither a file nor a Jinja template")


@dataclass(frozen=True)
class ChatPrompt:
    messages: list[dict[str, Any]]
    add_generation_prompt: bool
    continue_final_message: bool
    tools: list[dict[str, Any]] | None  # OpenAI tool objects, for the template's `tools`


def _arguments(call: dict[str, Any]) -> dict[str, Any]:
    fn = dict(call.get("function") or {})
    args = fn.get("arguments")
    if isinstance(args, str):
        # Not JSON: a template that prints it prints the text as sent.
        with contextlib.suppress(json.JSONDecodeError):
            fn["arguments"] = json.loads(args)
    # Some templates read call.name, others call.function.name.
    return {**call, "function": fn, **fn}


def normalize(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for m in messages:
        content = m.get("content")
        if isinstance(content, list):
            content = "".join(p["text"] for p in content)
        msg = {**m, "content": content if content is not None else ""}
        if m.get("tool_calls"):
            msg["tool_calls"] = [_arguments(c) for c in m["tool_calls"]]
        out.append(msg)
    return out


def render_chat(tokenizer: Any, prompt: ChatPrompt, template: str | None) -> list[int]:
    """Token ids of the rendered prompt (run on the tokenizer thread)."""
    if tokenizer is None:
        raise OpenAIError("this model has no tokenizer, so it has no chat template", "messages")
    if template is None and not getattr(tokenizer, "chat_template", None):
        raise OpenAIError("the tokenizer has no chat template: start the server with "
                          "--chat-template", "messages")
    try:
        ids = tokenizer.apply_chat_template(
            normalize(prompt.messages), tools=prompt.tools, chat_template=template,
            add_generation_prompt=prompt.add_generation_prompt,
            continue_final_message=prompt.continue_final_message, tokenize=True)
    except Exception as e:  # jinja's errors, and transformers' ValueErrors
        raise OpenAIError(f"cannot apply the chat template: {e}", "messages") from None
    if not isinstance(ids, list):  # transformers 5 returns a BatchEncoding
        ids = ids["input_ids"]
    return list(ids)
