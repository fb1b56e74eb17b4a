"""POST /v1/chat/completions."""

from __future__ import annotations

from typing import Any

from tachyon.engine.async_llm import ChoiceDelta
from tachyon.entrypoints.openai.chat_tools import ToolDeltas, finish_reason, whole
from tachyon.entrypoints.openai.chat_utils import ChatPrompt, render_chat
from tachyon.entrypoints.openai.protocol import OpenAIError, parse_chat, sampling_params
from tachyon.entrypoints.openai.serving_engine import (
    Choice,
    EventStream,
    Job,
    OpenAIServing,
    finite,
    new_request_id,
    prompt_logprobs_json,
    top_logprobs,
)
from tachyon.entrypoints.openai.structured import check_structured, parse_structured
from tachyon.entrypoints.openai.tool_parsers import TOOL_PARSERS, ToolParser
from tachyon.entrypoints.openai.tools import ToolRequest, parse_tools

ROLE = "assistant"


class ChatFormatter:
    """Chat: a message per choice; the first streamed delta of a choice carries the role."""

    object = "chat.completion"
    chunk_object = "chat.completion.chunk"

    def __init__(self, serving: OpenAIServing, num_logprobs: int | None,
                 tools: ToolRequest | None = None, parser: ToolParser | None = None,
                 num_prompt_logprobs: int | None = None) -> None:
        self.serving = serving
        self.k = num_logprobs
        self.num_prompt_logprobs = num_prompt_logprobs
        self.tools = tools
        self.parser = parser
        self._tool_deltas: dict[int, ToolDeltas] = {}

    def chunk_choice(self, choice: Choice, delta: ChoiceDelta) -> dict[str, Any]:
        message: dict[str, Any] = {"role": ROLE} if choice.num_tokens == 0 else {}
        reason = delta.finish_reason
        if self.tools is None:
            message["content"] = delta.text
        else:
            td = self._tool_deltas.setdefault(choice.index,
                                              ToolDeltas(self.tools, self.parser))
            content, calls = td.feed(delta.text, reason is not None)
            if content is not None:
                message["content"] = content
            if calls:
                message["tool_calls"] = calls
            reason = finish_reason(reason, td.num_calls > 0, self.tools)
        lps = None
        if self.k is not None and delta.logprobs is not None:
            lps = {"content": [self._entry(t, p)
                               for t, p in zip(delta.token_ids, delta.logprobs, strict=True)]}
        return {"index": choice.index, "delta": message, "logprobs": lps,
                "finish_reason": reason, "stop_reason": delta.stop_reason}

    def full_choice(self, choice: Choice) -> dict[str, Any]:
        lps = None
        if self.k is not None:
            lps = {"content": [self._entry(t, p)
                               for t, p in zip(choice.token_ids, choice.logprobs, strict=True)]}
        message: dict[str, Any] = {"role": ROLE, "content": choice.text}
        reason = choice.finish_reason
        if self.tools is not None:
            content, calls = whole(self.tools, self.parser, choice.text)
            message = {"role": ROLE, "content": content,
                       "tool_calls": [c.to_dict() for c in calls]}
            reason = finish_reason(reason, bool(calls), self.tools)
        return {"index": choice.index, "message": message, "logprobs": lps,
                "finish_reason": reason, "stop_reason": choice.stop_reason}

    def response_fields(self, choices: list[Choice]) -> dict[str, Any]:
        """As vLLM: the one prompt's logprobs at the top level of the response."""
        if self.num_prompt_logprobs is None:
            return {}
        return {"prompt_logprobs": prompt_logprobs_json(
            self.serving, choices[0], self.num_prompt_logprobs)}

    def _entry(self, token: int, lps: dict[int, float]) -> dict[str, Any]:
        assert self.k is not None
        top = [self._token(t, lp) for t, lp in top_logprobs(lps, self.k)]
        return {**self._token(token, finite(lps[token])), "top_logprobs": top}

    def _token(self, token: int, logprob: float) -> dict[str, Any]:
        s = self.serving.token_text(token)
        return {"token": s, "logprob": logprob, "bytes": list(s.encode())}


class OpenAIServingChat(OpenAIServing):
    async def create(self, body: dict[str, Any]) -> dict[str, Any] | EventStream:
        req = parse_chat(body)
        lora = self.check_model(req.model)
        self.check_text_size("".join(_texts(req.messages)), "messages")
        tools = parse_tools(req.fields, self.settings.enable_auto_tool_choice)
        spec, param = parse_structured(req.fields)
        forced = tools.constraint() if tools is not None else None
        if forced is not None:
            if spec is not None:
                raise OpenAIError(f"'{param}' cannot be combined with a required or named "
                                  f"tool_choice (that constrains the output itself)", param)
            spec, param = forced, "tools"
        if spec is not None:
            assert param is not None
            await check_structured(spec, param)
        chat = ChatPrompt(req.messages, req.add_generation_prompt, req.continue_final_message,
                          tools.tools if tools is not None else None)
        # Tokenizes: on the tokenizer thread.
        prompt = await self.llm.run_in_tokenizer_thread(render_chat, chat,
                                                        self.settings.chat_template)
        max_tokens = self.max_tokens_for(len(prompt), req.max_tokens, None, "messages")
        params = sampling_params(req.fields, max_tokens, req.logprobs, self.max_n, spec,
                                 req.prompt_logprobs)
        job = Job(new_request_id("chatcmpl"), req.model or self.model_name, [prompt], params,
                  req.stream, lora_request=lora)
        parser = None
        if tools is not None and tools.choice == "auto":
            assert self.settings.tool_call_parser is not None
            parser = TOOL_PARSERS[self.settings.tool_call_parser]()
        return await self.run(job, ChatFormatter(self, req.logprobs, tools, parser,
                                                 req.prompt_logprobs))


def _texts(messages: list[dict[str, Any]]) -> list[str]:
    """Every piece of message text (``parse_chat`` checked the shapes)."""
    out = []
    for m in messages:
        content = m.get("content")
        if content is not None:
            out.extend([content] if isinstance(content, str) else [p["text"] for p in content])
    return out
