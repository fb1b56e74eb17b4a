"""What /v1/completions and /v1/chat/completions share.

Both boil down to a ``Job`` (token-id prompts, one ``SamplingParams``, streaming options) and a
``Formatter`` that renders choices in the endpoint's shape. ``OpenAIServing.run`` submits the
job and returns either the whole response or an async iterator of SSE events: one event per
choice per step the stream sees (one token, or the tokens of several steps if the client
reads slower than the engine runs), ``finish_reason`` on each choice's last event only, an
optional usage event, then ``data: [DONE]``.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import msgspec

from tachyon import __version__
from tachyon.engine.async_llm import (
    AsyncLLM,
    ChoiceDelta,
    EngineDeadError,
    RequestRejected,
    RequestStream,
)
from tachyon.entrypoints.openai.cli_args import ServerSettings
from tachyon.entrypoints.openai.protocol import OpenAIError, StreamOptions, model_not_found
from tachyon.lora.request import LoRARequest
from tachyon.outputs import PromptLogprobs, PromptTokenRanks
from tachyon.sampling_params import SamplingParams

SSE_DONE = b"data: [DONE]\n\n"
# JSON has no -inf: a token masked out (top-k, min-p) reports this instead, as in vLLM.
MIN_LOGPROB = -9999.0
# A cheap bound checked before tokenizing, so a huge text never reaches the tokenizer: a
# prompt that fits the context has at most this many characters per token. Real tokens are
# far shorter (about 4 characters of English); whitespace runs in code reach a few dozen.
MAX_CHARS_PER_TOKEN = 32
# OpenAI's "system_fingerprint" names the backend configuration; ours, the engine version.
SYSTEM_FINGERPRINT = f"fp_tachyon_{__version__}"


_json = msgspec.json.Encoder()


def sse(obj: dict[str, Any]) -> bytes:
    """One server-sent event; msgspec's encoder is several times faster than ``json`` and
    writes the same compact UTF-8 JSON (logprobs are made finite before they get here)."""
    return b"data: " + _json.encode(obj) + b"\n\n"


@dataclass
class Choice:
    """One output choice (prompt ``prompt_index``, sample ``index % n``) as it accumulates."""

    index: int
    prompt_index: int
    prefix: str = ""  # text shown before the output (the prompt, with echo)
    texts: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, float]] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None  # the stop string or token id that ended it
    text_offset: int = 0  # characters of token strings so far (completions logprobs)
    prompt_logprobs: PromptLogprobs | None = None  # with the first delta, if asked
    prompt_token_ranks: PromptTokenRanks | None = None  # with prompt_logprobs

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def text(self) -> str:
        return self.prefix + "".join(self.texts)

    def add(self, delta: ChoiceDelta) -> None:
        self.texts.append(delta.text)
        self.token_ids.extend(delta.token_ids)
        if delta.logprobs is not None:
            self.logprobs.extend(delta.logprobs)
        if delta.prompt_logprobs is not None:
            self.prompt_logprobs = delta.prompt_logprobs
            self.prompt_token_ranks = delta.prompt_token_ranks
        self.finish_reason = delta.finish_reason
        self.stop_reason = delta.stop_reason


@dataclass(frozen=True)
class Job:
    request_id: str
    model: str
    prompts: list[list[int]]
    params: SamplingParams
    stream: StreamOptions
    prefixes: list[str] | None = None  # per prompt, with echo
    lora_request: LoRARequest | None = None
    echo_only: bool = False  # completions' echo with max_tokens 0: no generated token shown
    created: int = field(default_factory=lambda: int(time.time()))

    def shown(self, delta: ChoiceDelta) -> ChoiceDelta:
        """What the client sees of ``delta``: with ``echo_only``, none of its tokens (the
        one the engine generated only ends the request); the rest (prompt logprobs, finish
        reason) as it is."""
        if not self.echo_only:
            return delta
        return replace(delta, token_ids=[], text="",
                       logprobs=None if delta.logprobs is None else [])

    def new_choices(self) -> list[Choice]:
        n = self.params.n
        return [Choice(i, i // n, self.prefixes[i // n] if self.prefixes else "")
                for i in range(len(self.prompts) * n)]

    def usage(self, choices: list[Choice]) -> dict[str, int]:
        prompt = sum(len(p) for p in self.prompts)
        completion = sum(c.num_tokens for c in choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion,
                "total_tokens": prompt + completion}


class Formatter(Protocol):
    """Renders choices in one endpoint's shape."""

    object: str  # of the full response
    chunk_object: str  # of a streamed chunk

    def chunk_choice(self, choice: Choice, delta: ChoiceDelta) -> dict[str, Any]:
        """The choice object of the chunk carrying ``delta``; ``choice`` is not updated yet."""
        ...

    def full_choice(self, choice: Choice) -> dict[str, Any]: ...

    def response_fields(self, choices: list[Choice]) -> dict[str, Any]:
        """Endpoint-specific top-level fields of the whole response."""
        ...


def finite(logprob: float) -> float:
    return logprob if logprob > MIN_LOGPROB else MIN_LOGPROB  # NaN too


def top_logprobs(lps: dict[int, float], k: int) -> list[tuple[int, float]]:
    """The ``k`` most likely tokens of a position (the engine puts the sampled one first)."""
    return [(t, finite(lp)) for t, lp in sorted(lps.items(), key=lambda kv: -kv[1])[:k]]


def prompt_logprobs_json(serving: OpenAIServing, choice: Choice, k: int
                         ) -> list[dict[str, dict[str, Any]] | None]:
    """vLLM's ``prompt_logprobs``: per prompt token ``{token id: {logprob, rank,
    decoded_token}}`` (the prompt token and the top ``k``). The prompt token's rank is the
    engine's exact one wherever it falls; the top ``k`` are ranked by position, as vLLM
    (which only differs from the exact rank on ties)."""
    positions, exact = choice.prompt_logprobs, choice.prompt_token_ranks
    assert positions is not None and exact is not None
    out: list[dict[str, dict[str, Any]] | None] = []
    for lps, prompt_rank in zip(positions, exact, strict=True):
        if lps is None:
            out.append(None)
            continue
        top = top_logprobs(lps, k)
        ranks = {t: r for r, (t, _) in enumerate(top, start=1)}
        token, logprob = next(iter(lps.items()))  # the prompt token comes first
        ranks.setdefault(token, prompt_rank)
        entries = [(token, logprob), *top]
        out.append({str(t): {"logprob": finite(lp), "rank": ranks[t],
                             "decoded_token": serving.token_text(t)} for t, lp in entries})
    return out


def new_request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


class EventStream:
    """The SSE events of one streamed request. ``aclose()`` aborts the request even when the
    events were never iterated (a client gone before its first chunk), which closing a
    generator that never started would not do."""

    def __init__(self, events: AsyncGenerator[bytes, None], stream: RequestStream) -> None:
        self.events = events
        self.stream = stream

    def __aiter__(self) -> AsyncGenerator[bytes, None]:
        return self.events

    async def aclose(self) -> None:
        await self.events.aclose()
        self.stream.close()


class OpenAIServing:
    def __init__(self, llm: AsyncLLM, settings: ServerSettings) -> None:
        self.llm = llm
        self.settings = settings
        self.model_name = settings.model_name
        self.max_n = settings.max_n
        self.tokenizer = llm.tokenizer
        self.max_model_len = llm.max_model_len
        self._token_texts: dict[int, str] = {}

    def check_model(self, name: str | None) -> LoRARequest | None:
        """The adapter a request's ``model`` names (None: the base model); 404 if neither."""
        if name is None or name == self.model_name:
            return None
        lora = next((lora for lora in self.llm.loras if lora.lora_name == name), None)
        if lora is None:
            raise model_not_found(name)
        return lora

    def token_text(self, token_id: int) -> str:
        """A token as text for logprobs (``token_id:N`` without a tokenizer, as vLLM)."""
        text = self._token_texts.get(token_id)
        if text is None:
            text = (f"token_id:{token_id}" if self.tokenizer is None
                    else self.tokenizer.decode([token_id]))
            self._token_texts[token_id] = text
        return text

    def check_text_size(self, text: str, param: str) -> None:
        limit = self.max_model_len * MAX_CHARS_PER_TOKEN
        if len(text) > limit:
            raise OpenAIError(
                f"the prompt has {len(text)} characters; a prompt that fits this model's "
                f"context ({self.max_model_len} tokens) has at most {limit}", param,
                code="context_length_exceeded")

    async def encode(self, text: str, param: str) -> list[int]:
        """Size check first, then tokenize on the tokenizer thread (never on the loop)."""
        if self.tokenizer is None:
            raise OpenAIError("this model has no tokenizer; send the prompt as token ids", param)
        self.check_text_size(text, param)
        ids = await self.llm.encode(text)
        if not ids:
            raise OpenAIError("the prompt is empty", param)
        return ids

    def max_tokens_for(self, prompt_len: int, requested: int | None, default: int | None,
                       param: str) -> int:
        """The token budget of one prompt; ``None`` requested: ``default``, capped by what is
        left of the context (all of it without a default)."""
        room = self.max_model_len - prompt_len
        if room < 1:
            raise OpenAIError(
                f"This model's maximum context length is {self.max_model_len} tokens, but the "
                f"prompt has {prompt_len} tokens; shorten it.", param,
                code="context_length_exceeded")
        if requested is None:
            return room if default is None else min(default, room)
        if requested > room:
            raise OpenAIError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, "
                f"you requested {prompt_len + requested} tokens ({prompt_len} in the prompt, "
                f"{requested} for the completion); reduce the prompt or max_tokens.", param,
                code="context_length_exceeded")
        return requested

    async def run(self, job: Job, fmt: Formatter) -> dict[str, Any] | EventStream:
        try:
            stream = self.llm.add_request(job.request_id, job.prompts, job.params,
                                          job.lora_request)
        except EngineDeadError as e:
            raise OpenAIError(str(e), status=503, type_="server_error") from None
        except ValueError as e:  # a prompt or a value the engine would refuse
            raise OpenAIError(str(e), _param_of(str(e))) from None
        if job.stream.stream:
            return EventStream(self._events(job, fmt, stream), stream)
        async with stream:  # a cancelled waiter (client gone) aborts the request
            return await self._collect(job, fmt, stream)

    async def _collect(self, job: Job, fmt: Formatter, stream: RequestStream) -> dict[str, Any]:
        choices = job.new_choices()
        try:
            async for deltas in stream:
                for d in deltas:
                    choices[d.index].add(job.shown(d))
        except RequestRejected as e:
            raise OpenAIError(str(e)) from None
        except EngineDeadError as e:
            raise OpenAIError(str(e), status=500, type_="server_error") from None
        return {"id": job.request_id, "object": fmt.object, "created": job.created,
                "model": job.model, "system_fingerprint": SYSTEM_FINGERPRINT,
                "choices": [fmt.full_choice(c) for c in choices],
                "usage": job.usage(choices), **fmt.response_fields(choices)}

    async def _events(self, job: Job, fmt: Formatter, stream: RequestStream
                      ) -> AsyncGenerator[bytes, None]:
        choices = job.new_choices()
        head = {"id": job.request_id, "object": fmt.chunk_object, "created": job.created,
                "model": job.model, "system_fingerprint": SYSTEM_FINGERPRINT}
        tail = {"usage": None} if job.stream.include_usage else {}
        try:
            async with stream:
                async for deltas in stream:
                    for d in map(job.shown, deltas):
                        choice = choices[d.index]
                        yield sse({**head, "choices": [fmt.chunk_choice(choice, d)], **tail})
                        choice.add(d)
        except (EngineDeadError, RequestRejected) as e:
            status = 400 if isinstance(e, RequestRejected) else 500
            kind = "invalid_request_error" if status == 400 else "server_error"
            yield sse(OpenAIError(str(e), status=status, type_=kind).body())
            yield SSE_DONE
            return
        if job.stream.include_usage:
            yield sse({**head, "choices": [], "usage": job.usage(choices)})
        yield SSE_DONE


def _param_of(message: str) -> str:
    """The field an engine check names first (``"seed must be ..."``), else the prompt."""
    first = message.split(" ", 1)[0]
    return first if first in _SAMPLING_FIELDS else "prompt"


_SAMPLING_FIELDS = frozenset(("n", "temperature", "top_p", "top_k", "min_p", "seed",
                              "presence_penalty", "frequency_penalty", "repetition_penalty",
                              "max_tokens", "min_tokens", "stop", "logprobs",
                              "prompt_logprobs"))
