"""POST /tokenize and POST /detokenize, in vLLM's shapes.

/tokenize: ``{"prompt": str, "add_special_tokens"?}`` or ``{"messages": [...],
"add_generation_prompt"?, "continue_final_message"?, "tools"?}`` (through the chat template,
as /v1/chat/completions would render it) -> ``{"count", "max_model_len", "tokens"}``.
/detokenize: ``{"tokens": [int]}`` -> ``{"prompt": str}``.
"""

from __future__ import annotations

from typing import Any

from tachyon.entrypoints.openai.chat_utils import ChatPrompt, render_chat
from tachyon.entrypoints.openai.protocol import Fields, OpenAIError, parse_chat
from tachyon.entrypoints.openai.serving_engine import OpenAIServing


def _encode(tokenizer: Any, text: str, add_special_tokens: bool) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=add_special_tokens))


class OpenAIServingTokenization(OpenAIServing):
    def _need_tokenizer(self) -> None:
        if self.tokenizer is None:
            raise OpenAIError("this model has no tokenizer")

    async def tokenize(self, body: dict[str, Any]) -> dict[str, Any]:
        self._need_tokenizer()
        f = Fields(body)
        self.check_model(f.string("model"))
        if body.get("messages") is not None:
            req = parse_chat(body)
            tools = body.get("tools") if isinstance(body.get("tools"), list) else None
            chat = ChatPrompt(req.messages, req.add_generation_prompt,
                              req.continue_final_message, tools)
            ids = await self.llm.run_in_tokenizer_thread(render_chat, chat,
                                                         self.settings.chat_template)
        else:
            prompt = f.string("prompt")
            if prompt is None:
                raise OpenAIError("give 'prompt' (a string) or 'messages'", "prompt")
            self.check_text_size(prompt, "prompt")
            ids = await self.llm.run_in_tokenizer_thread(
                _encode, prompt, f.boolean("add_special_tokens", True))
        return {"count": len(ids), "max_model_len": self.max_model_len, "tokens": ids}

    async def detokenize(self, body: dict[str, Any]) -> dict[str, Any]:
        self._need_tokenizer()
        f = Fields(body)
        self.check_model(f.string("model"))
        ids = f.int_list("tokens")
        if ids is None:
            raise OpenAIError("'tokens' must be a list of token ids", "tokens")
        bad = [t for t in ids if t >= self.llm.vocab_size]
        if bad:
            raise OpenAIError(f"token id {bad[0]} is outside the vocabulary "
                              f"[0, {self.llm.vocab_size})", "tokens")
        return {"prompt": self.tokenizer.decode(ids)}
