"""OpenAI request bodies: parsed and checked by hand, no pydantic models.

Every field is read through ``Fields``, which checks its JSON type and range and raises an
``OpenAIError`` naming the field, so a bad request always becomes a 400 with an OpenAI-shaped
body. Unknown fields are ignored, as the OpenAI API and vLLM do.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from tachyon.sampling_params import MAX_LOGPROBS, SamplingParams
from tachyon.structured_output.params import StructuredOutputsParams

# OpenAI's default for /v1/completions when max_tokens is left out.
DEFAULT_COMPLETION_MAX_TOKENS = 16
# Seeds seed an int64 generator on the device.
SEED_RANGE = (0, 2**63 - 1)


class OpenAIError(Exception):
    """An error the client caused (or a server fault), in the OpenAI error shape."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 type_: str = "invalid_request_error", code: str | None = None) -> None:
        super().__init__(message)
        self.message, self.param, self.status, self.type, self.code = (
            message, param, status, type_, code)

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def model_not_found(name: str) -> OpenAIError:
    return OpenAIError(f"The model `{name}` does not exist.", "model", 404,
                       code="model_not_found")


def parse_json_body(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise OpenAIError(f"the request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise OpenAIError("the request body must be a JSON object")
    for name, value in body.items():
        if not _valid_text(value):
            raise OpenAIError(f"'{name}' contains invalid text: a lone UTF-16 surrogate "
                              f"(e.g. \\ud800) that no encoding can represent", name)
    return body


def _valid_text(v: Any) -> bool:
    """No lone surrogates anywhere in ``v`` (JSON allows ``"\\ud800"``; UTF-8 does not)."""
    if isinstance(v, str):
        if v.isascii():
            return True
        try:
            v.encode("utf-8")
        except UnicodeEncodeError:
            return False
        return True
    if isinstance(v, list):
        return all(_valid_text(x) for x in v)
    if isinstance(v, dict):
        return all(_valid_text(k) and _valid_text(x) for k, x in v.items())
    return True


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


class Fields:
    """Typed access to a JSON object's fields; ``null`` counts as absent."""

    def __init__(self, body: dict[str, Any]) -> None:
        self.body = body

    def get(self, name: str) -> Any:
        return self.body.get(name)

    def integer(self, name: str, default: int | None = None, lo: int | None = None,
                hi: int | None = None) -> int | None:
        v = self.body.get(name)
        if v is None:
            return default
        if not _is_int(v):
            raise OpenAIError(f"'{name}' must be an integer, got {json.dumps(v)}", name)
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            bounds = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
            raise OpenAIError(f"'{name}' must be {bounds}, got {v}", name)
        return v

    def number(self, name: str, default: float) -> float:
        v = self.body.get(name)
        if v is None:
            return default
        if not _is_number(v):
            raise OpenAIError(f"'{name}' must be a number, got {json.dumps(v)}", name)
        return float(v)

    def boolean(self, name: str, default: bool = False) -> bool:
        v = self.body.get(name)
        if v is None:
            return default
        if not isinstance(v, bool):
            raise OpenAIError(f"'{name}' must be true or false, got {json.dumps(v)}", name)
        return v

    def string(self, name: str) -> str | None:
        v = self.body.get(name)
        if v is not None and not isinstance(v, str):
            raise OpenAIError(f"'{name}' must be a string, got {json.dumps(v)}", name)
        return v

    def stop(self) -> list[str] | None:
        v = self.body.get("stop")
        if v is None:
            return None
        stops = [v] if isinstance(v, str) else v
        if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
            raise OpenAIError("'stop' must be a non-empty string or a list of them", "stop")
        return stops

    def int_list(self, name: str) -> list[int] | None:
        v = self.body.get(name)
        if v is None:
            return None
        if not isinstance(v, list) or not all(_is_int(t) and t >= 0 for t in v):
            raise OpenAIError(f"'{name}' must be a list of non-negative integers", name)
        return v


@dataclass(frozen=True)
class StreamOptions:
    stream: bool
    include_usage: bool


def parse_stream(f: Fields) -> StreamOptions:
    stream = f.boolean("stream")
    opts = f.get("stream_options")
    if opts is None:
        return StreamOptions(stream, False)
    if not stream:
        raise OpenAIError("'stream_options' can only be set when 'stream' is true",
                          "stream_options")
    if not isinstance(opts, dict):
        raise OpenAIError("'stream_options' must be an object", "stream_options")
    usage = opts.get("include_usage", False)
    if not isinstance(usage, bool):
        raise OpenAIError("'stream_options.include_usage' must be true or false",
                          "stream_options")
    return StreamOptions(stream, usage)


def parse_max_tokens(f: Fields, lo: int = 1) -> int | None:
    """``max_completion_tokens`` (the current name) wins over ``max_tokens``."""
    newer = f.integer("max_completion_tokens", lo=lo)
    older = f.integer("max_tokens", lo=lo)
    return newer if newer is not None else older


def sampling_params(f: Fields, max_tokens: int | None, logprobs: int | None,
                    max_n: int, structured: StructuredOutputsParams | None = None,
                    prompt_logprobs: int | None = None) -> SamplingParams:
    """Everything but the token budget and logprobs is read here; ranges are the engine's,
    but for ``n`` (the server's ``--max-n``) and the seed (sample i of n uses seed + i)."""
    n = f.integer("n", 1, lo=1, hi=max_n)
    assert n is not None
    lo, hi = SEED_RANGE
    kwargs: dict[str, Any] = dict(
        n=n,
        temperature=f.number("temperature", 1.0),
        top_p=f.number("top_p", 1.0),
        top_k=f.integer("top_k", 0, lo=-1),
        min_p=f.number("min_p", 0.0),
        seed=f.integer("seed", lo=lo, hi=hi - (n - 1)),
        presence_penalty=f.number("presence_penalty", 0.0),
        frequency_penalty=f.number("frequency_penalty", 0.0),
        repetition_penalty=f.number("repetition_penalty", 1.0),
        max_tokens=max_tokens,
        min_tokens=f.integer("min_tokens", 0, lo=0),
        stop=f.stop(),
        stop_token_ids=f.int_list("stop_token_ids"),
        ignore_eos=f.boolean("ignore_eos"),
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
        skip_special_tokens=f.boolean("skip_special_tokens", True),
        include_stop_str_in_output=f.boolean("include_stop_str_in_output"),
        structured_outputs=structured,
    )
    try:
        return SamplingParams(**kwargs)
    except ValueError as e:  # the engine's range checks; its messages start with the field
        name = str(e).split(" ", 1)[0]
        raise OpenAIError(str(e), name if name in kwargs else None) from None


Prompt = str | list[int]


@dataclass(frozen=True)
class CompletionRequest:
    model: str | None
    prompts: list[Prompt]
    max_tokens: int | None  # 0 only with echo: the prompt comes back, nothing is generated
    echo: bool
    logprobs: int | None
    prompt_logprobs: int | None  # vLLM's extra parameter: returned in each choice
    stream: StreamOptions
    fields: Fields

    @property
    def engine_prompt_logprobs(self) -> int | None:
        """The top-k the engine scores the prompt with: echo with logprobs lists the
        prompt's tokens too."""
        ks = [k for k in (self.prompt_logprobs, self.logprobs if self.echo else None)
              if k is not None]
        return max(ks) if ks else None


def parse_completion(body: dict[str, Any]) -> CompletionRequest:
    f = Fields(body)
    best_of = f.integer("best_of", lo=1)
    if best_of is not None and best_of != f.integer("n", 1):
        raise OpenAIError("'best_of' is not supported (only best_of = n)", "best_of")
    if f.string("suffix"):
        raise OpenAIError("'suffix' is not supported", "suffix")
    logprobs = f.integer("logprobs", lo=0, hi=MAX_LOGPROBS)
    echo = f.boolean("echo")
    max_tokens = parse_max_tokens(f, lo=0)
    if max_tokens == 0 and not echo:  # as vLLM: nothing to return
        raise OpenAIError("'max_tokens' can be 0 only with 'echo': true (the prompt is "
                          "returned and nothing is generated); otherwise it must be >= 1",
                          "max_tokens")
    stream = parse_stream(f)
    return CompletionRequest(f.string("model"), _prompts(body.get("prompt")),
                             max_tokens, echo, logprobs,
                             parse_prompt_logprobs(f, stream), stream, f)


def _prompts(v: Any) -> list[Prompt]:
    """A string, a list of strings, a list of token ids, or a list of token-id lists."""
    def bad() -> OpenAIError:
        return OpenAIError("'prompt' must be a string, a list of strings, a list of token ids "
                           "or a list of token-id lists", "prompt")

    if isinstance(v, str):
        return [v]
    if not isinstance(v, list) or not v:
        raise bad()
    if all(_is_int(t) for t in v):
        return [v]
    if all(isinstance(p, str) for p in v):
        return list(v)
    if all(isinstance(p, list) and p and all(_is_int(t) for t in p) for p in v):
        return list(v)
    raise bad()


def parse_prompt_logprobs(f: Fields, stream: StreamOptions) -> int | None:
    k = f.integer("prompt_logprobs", lo=0, hi=MAX_LOGPROBS)
    if k is not None and stream.stream:  # as vLLM: they come with the whole response only
        raise OpenAIError("'prompt_logprobs' is not available with 'stream': true",
                          "prompt_logprobs")
    return k


@dataclass(frozen=True)
class ChatRequest:
    model: str | None
    messages: list[dict[str, Any]]
    max_tokens: int | None
    logprobs: int | None  # top_logprobs when logprobs is true, else None
    prompt_logprobs: int | None  # vLLM's extra parameter: returned in the response
    add_generation_prompt: bool
    continue_final_message: bool  # the last (assistant) message is extended, not closed
    stream: StreamOptions
    fields: Fields


def parse_chat(body: dict[str, Any]) -> ChatRequest:
    f = Fields(body)
    want = f.boolean("logprobs")
    top = f.integer("top_logprobs", lo=0, hi=MAX_LOGPROBS)
    if top is not None and not want:
        raise OpenAIError("'top_logprobs' needs 'logprobs' set to true", "top_logprobs")
    stream = parse_stream(f)
    messages = _messages(body.get("messages"))
    cont = f.boolean("continue_final_message")
    # Continuing a message and opening a new one exclude each other; continuing alone
    # switches the generation prompt off unless the client asked for both.
    gen = f.boolean("add_generation_prompt", not cont)
    if cont and gen:
        raise OpenAIError("'continue_final_message' and 'add_generation_prompt' cannot both "
                          "be true", "continue_final_message")
    if cont and messages[-1]["role"] != "assistant":
        raise OpenAIError("'continue_final_message' needs the last message to be the "
                          "assistant's", "continue_final_message")
    return ChatRequest(f.string("model"), messages, parse_max_tokens(f),
                       (top or 0) if want else None, parse_prompt_logprobs(f, stream), gen,
                       cont, stream, f)


def _messages(v: Any) -> list[dict[str, Any]]:
    if not isinstance(v, list) or not v:
        raise OpenAIError("'messages' must be a non-empty list of messages", "messages")
    for m in v:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise OpenAIError("each message must be an object with a string 'role'", "messages")
        content = m.get("content")
        if content is None and (m.get("tool_calls") or m["role"] == "tool"):
            continue  # an assistant turn that only called tools
        if isinstance(content, list):
            if not all(isinstance(p, dict) and p.get("type", "text") == "text"
                       and isinstance(p.get("text"), str) for p in content):
                raise OpenAIError("message content parts must be text parts: "
                                  '{"type": "text", "text": "..."}', "messages")
        elif not isinstance(content, str):
            raise OpenAIError("message 'content' must be a string or a list of text parts",
                              "messages")
    return v
