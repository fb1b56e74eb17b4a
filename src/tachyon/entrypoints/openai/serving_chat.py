"""POST /v1/chat/completions."""

from __future__ import annotations

from typing import Any

from tachyon.engine.async_llm import ChoiceDelta
from tachyon.entrypoints.llm import apply_chat_template
from tachyon.entrypoints.openai.protocol import OpenAIError, parse_chat, sampling_params
from tachyon.entrypoints.openai.serving_engine import (
    Choice,
    EventStream,
    Job,
    OpenAIServing,
    finite,
    new_request_id,
    top_logprobs,
)

ROLE = "assistant"


class ChatFormatter:
    """Chat: a message per choice; the first streamed delta of a choice carries the role."""

    object = "chat.completion"
    chunk_object = "chat.completion.chunk"

    def __init__(self, serving: OpenAIServing, num_logprobs: int | None) -> None:
        self.serving = serving
        self.k = num_logprobs

    def chunk_choice(self, choice: Choice, delta: ChoiceDelta) -> dict[str, Any]:
        message = {"role": ROLE, "content": delta.text} if choice.num_tokens == 0 else {
            "content": delta.text}
        lps = None
        if self.k is not None and delta.logprobs is not None:
            lps = {"content": [self._entry(t, p)
                               for t, p in zip(delta.token_ids, delta.logprobs, strict=True)]}
        return {"index": choice.index, "delta": message, "logprobs": lps,
                "finish_reason": delta.finish_reason}

    def full_choice(self, choice: Choice) -> dict[str, Any]:
        lps = None
        if self.k is not None:
            lps = {"content": [self._entry(t, p)
                               for t, p in zip(choice.token_ids, choice.logprobs, strict=True)]}
        return {"index": choice.index, "message": {"role": ROLE, "content": choice.text},
                "logprobs": lps, "finish_reason": choice.finish_reason}

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
        self.check_model(req.model)
        self.check_text_size("".join(_texts(req.messages)), "messages")
        try:  # tokenizes: on the tokenizer thread
            prompt = await self.llm.run_in_tokenizer_thread(
                apply_chat_template, req.messages, req.add_generation_prompt)
        except Exception as e:  # template errors come as jinja or ValueError
            raise OpenAIError(f"cannot apply the chat template: {e}", "messages") from None
        max_tokens = self.max_tokens_for(len(prompt), req.max_tokens, None, "messages")
        params = sampling_params(req.fields, max_tokens, req.logprobs, self.max_n)
        job = Job(new_request_id("chatcmpl"), self.model_name, [prompt], params, req.stream)
        return await self.run(job, ChatFormatter(self, req.logprobs))


def _texts(messages: list[dict[str, Any]]) -> list[str]:
    """Every piece of message text (``parse_chat`` checked the shapes)."""
    out = []
    for m in messages:
        content = m["content"]
        out.extend([content] if isinstance(content, str) else [p["text"] for p in content])
    return out
