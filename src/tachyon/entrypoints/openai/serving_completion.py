"""POST /v1/completions."""

from __future__ import annotations

from typing import Any

from tachyon.engine.async_llm import ChoiceDelta
from tachyon.entrypoints.openai.protocol import (
    DEFAULT_COMPLETION_MAX_TOKENS,
    CompletionRequest,
    OpenAIError,
    parse_completion,
    sampling_params,
)
from tachyon.entrypoints.openai.serving_engine import (
    Choice,
    EventStream,
    Job,
    OpenAIServing,
    finite,
    new_request_id,
    top_logprobs,
)
from tachyon.entrypoints.openai.structured import check_structured, parse_structured


class CompletionFormatter:
    """Legacy completions: ``text`` per choice; logprobs as parallel lists."""

    object = "text_completion"
    chunk_object = "text_completion"

    def __init__(self, serving: OpenAIServing, num_logprobs: int | None) -> None:
        self.serving = serving
        self.k = num_logprobs

    def chunk_choice(self, choice: Choice, delta: ChoiceDelta) -> dict[str, Any]:
        text = choice.prefix + delta.text if choice.num_tokens == 0 else delta.text
        lps = None
        if self.k is not None and delta.logprobs is not None:
            lps = self._logprobs(delta.token_ids, delta.logprobs, choice)
        return {"index": choice.index, "text": text, "logprobs": lps,
                "finish_reason": delta.finish_reason, "stop_reason": delta.stop_reason}

    def full_choice(self, choice: Choice) -> dict[str, Any]:
        lps = None
        if self.k is not None:
            lps = self._logprobs(choice.token_ids, choice.logprobs, Choice(0, 0, choice.prefix))
        return {"index": choice.index, "text": choice.text, "logprobs": lps,
                "finish_reason": choice.finish_reason, "stop_reason": choice.stop_reason}

    def _logprobs(self, token_ids: list[int], positions: list[dict[int, float]],
                  cursor: Choice) -> dict[str, list[Any]]:
        """``cursor.text_offset`` advances over the token strings (the offsets' origin)."""
        assert self.k is not None
        text = self.serving.token_text
        out: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": [],
                                     "text_offset": []}
        for token, lps in zip(token_ids, positions, strict=True):
            s = text(token)
            out["tokens"].append(s)
            out["token_logprobs"].append(finite(lps[token]))
            # As vLLM: the sampled token is listed with the top-k.
            top = {text(t): lp for t, lp in top_logprobs(lps, self.k)}
            top.setdefault(s, finite(lps[token]))
            out["top_logprobs"].append(top)
            out["text_offset"].append(len(cursor.prefix) + cursor.text_offset)
            cursor.text_offset += len(s)
        return out


class OpenAIServingCompletion(OpenAIServing):
    async def create(self, body: dict[str, Any]) -> dict[str, Any] | EventStream:
        req = parse_completion(body)
        lora = self.check_model(req.model)
        spec, param = parse_structured(req.fields)
        if spec is not None:
            assert param is not None
            await check_structured(spec, param)
        for p in req.prompts:  # every size check before any tokenizing
            if isinstance(p, str):
                self.check_text_size(p, "prompt")
        prompts = [await self.encode(p, "prompt") if isinstance(p, str) else list(p)
                   for p in req.prompts]
        max_tokens = min(self.max_tokens_for(len(p), req.max_tokens,
                                             DEFAULT_COMPLETION_MAX_TOKENS, "prompt")
                         for p in prompts)
        params = sampling_params(req.fields, max_tokens, req.logprobs, self.max_n, spec)
        job = Job(new_request_id("cmpl"), req.model or self.model_name, prompts, params,
                  req.stream, self._echo_prefixes(req, prompts), lora_request=lora)
        return await self.run(job, CompletionFormatter(self, req.logprobs))

    def _echo_prefixes(self, req: CompletionRequest, prompts: list[list[int]]
                       ) -> list[str] | None:
        if not req.echo:
            return None
        if self.tokenizer is None and not all(isinstance(p, str) for p in req.prompts):
            raise OpenAIError("'echo' of token ids needs a tokenizer", "echo")
        return [p if isinstance(p, str) else self.tokenizer.decode(ids)
                for p, ids in zip(req.prompts, prompts, strict=True)]
