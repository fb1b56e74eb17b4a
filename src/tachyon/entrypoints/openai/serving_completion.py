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
    prompt_logprobs_json,
    top_logprobs,
)
from tachyon.entrypoints.openai.structured import check_structured, parse_structured
from tachyon.outputs import PromptLogprobs


class CompletionFormatter:
    """Legacy completions: ``text`` per choice; logprobs as parallel lists. With echo, the
    prompt's text leads the first chunk (and its tokens the logprobs, the first one
    ``null``: nothing predicts it)."""

    object = "text_completion"
    chunk_object = "text_completion"

    def __init__(self, serving: OpenAIServing, num_logprobs: int | None,
                 echo_prompts: list[list[int]] | None = None,
                 num_prompt_logprobs: int | None = None) -> None:
        self.serving = serving
        self.k = num_logprobs
        self.echo_prompts = echo_prompts  # token ids per prompt, with echo
        self.num_prompt_logprobs = num_prompt_logprobs

    def chunk_choice(self, choice: Choice, delta: ChoiceDelta) -> dict[str, Any]:
        first = choice.num_tokens == 0
        text = choice.prefix + delta.text if first else delta.text
        lps = None
        if self.k is not None and delta.logprobs is not None:
            lps = self._logprobs(choice, delta.token_ids, delta.logprobs, choice,
                                 delta.prompt_logprobs if first else None)
        return {"index": choice.index, "text": text, "logprobs": lps,
                "finish_reason": delta.finish_reason, "stop_reason": delta.stop_reason}

    def full_choice(self, choice: Choice) -> dict[str, Any]:
        lps = None
        if self.k is not None:
            lps = self._logprobs(choice, choice.token_ids, choice.logprobs,
                                 Choice(0, 0, choice.prefix), choice.prompt_logprobs)
        out = {"index": choice.index, "text": choice.text, "logprobs": lps,
               "finish_reason": choice.finish_reason, "stop_reason": choice.stop_reason}
        if self.num_prompt_logprobs is not None:
            out["prompt_logprobs"] = prompt_logprobs_json(
                self.serving, choice, self.num_prompt_logprobs)
        return out

    def response_fields(self, choices: list[Choice]) -> dict[str, Any]:
        return {}

    def _logprobs(self, choice: Choice, token_ids: list[int],
                  positions: list[dict[int, float]], cursor: Choice,
                  prompt: PromptLogprobs | None) -> dict[str, list[Any]]:
        """``cursor.text_offset`` advances over the generated token strings (the offsets'
        origin is the end of the prefix); echoed prompt tokens, given ``prompt``, come
        first with offsets from 0."""
        assert self.k is not None
        text = self.serving.token_text
        out: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": [],
                                     "text_offset": []}
        if self.echo_prompts is not None and prompt is not None:
            self._prompt_logprobs(out, self.echo_prompts[choice.prompt_index], prompt)
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

    def _prompt_logprobs(self, out: dict[str, list[Any]], prompt_ids: list[int],
                         positions: PromptLogprobs) -> None:
        assert self.k is not None
        text, offset = self.serving.token_text, 0
        for token, lps in zip(prompt_ids, positions, strict=True):
            s = text(token)
            out["tokens"].append(s)
            out["text_offset"].append(offset)
            offset += len(s)
            if lps is None:  # the first prompt token
                out["token_logprobs"].append(None)
                out["top_logprobs"].append(None)
                continue
            out["token_logprobs"].append(finite(lps[token]))
            top = {text(t): lp for t, lp in top_logprobs(lps, self.k)}
            top.setdefault(s, finite(lps[token]))
            out["top_logprobs"].append(top)


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
        # echo with max_tokens 0: as vLLM, one token is generated (the engine scores the
        # prompt in the same pass) and not shown.
        echo_only = req.max_tokens == 0
        max_tokens = min(self.max_tokens_for(len(p), 1 if echo_only else req.max_tokens,
                                             DEFAULT_COMPLETION_MAX_TOKENS, "prompt")
                         for p in prompts)
        params = sampling_params(req.fields, max_tokens, req.logprobs, self.max_n, spec,
                                 req.engine_prompt_logprobs)
        job = Job(new_request_id("cmpl"), req.model or self.model_name, prompts, params,
                  req.stream, self._echo_prefixes(req, prompts), lora_request=lora,
                  echo_only=echo_only)
        echo_prompts = prompts if req.echo and req.logprobs is not None else None
        return await self.run(job, CompletionFormatter(self, req.logprobs, echo_prompts,
                                                       req.prompt_logprobs))

    def _echo_prefixes(self, req: CompletionRequest, prompts: list[list[int]]
                       ) -> list[str] | None:
        if not req.echo:
            return None
        if self.tokenizer is None and not all(isinstance(p, str) for p in req.prompts):
            raise OpenAIError("'echo' of token ids needs a tokenizer", "echo")
        return [p if isinstance(p, str) else self.tokenizer.decode(ids)
                for p, ids in zip(req.prompts, prompts, strict=True)]
