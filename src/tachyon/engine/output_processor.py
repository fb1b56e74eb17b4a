"""The API process's side of every step: token ids in, text per choice out.

Each core request is one sample (``n`` is fanned out by ``AsyncLLM``) and has a ``_Sample``
here: its incremental detokenizer (stop strings included) and the ``RequestCollector`` of the
API request it belongs to. ``process`` walks one ``StepOutputs``, appends each token's text
to its choice's pending delta and returns the samples that hit a stop string, which the
caller tells the core to stop. A consumer slower than the core finds several tokens merged
in one ``ChoiceDelta``; it never makes the core wait.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tachyon.engine.detokenizer import IncrementalDetokenizer
from tachyon.engine.llm_engine import prompt_logprobs_of, prompt_token_ranks_of
from tachyon.engine.messages import StepOutputs
from tachyon.outputs import PromptLogprobs, PromptTokenRanks
from tachyon.sampling_params import SamplingParams


@dataclass
class ChoiceDelta:
    """What one choice produced since its consumer last looked (usually one token)."""

    index: int  # choice index: prompt_index * n + sample index
    token_ids: list[int] = field(default_factory=list)
    text: str = ""  # held back while it might begin a stop string
    logprobs: list[dict[int, float]] | None = None  # per token: sampled first, then top-k
    finish_reason: str | None = None  # set on the choice's last delta only
    # What ended it with "stop": the stop string, or the stop token id (None for EOS).
    stop_reason: int | str | None = None
    # With the choice's first token, if asked: RequestOutput.prompt_logprobs' shape.
    prompt_logprobs: PromptLogprobs | None = None
    prompt_token_ranks: PromptTokenRanks | None = None  # with prompt_logprobs


@dataclass
class IterationStats:
    """Per core step, for metrics: latencies in seconds, one finish reason per prompt."""

    time_to_first_token: list[float] = field(default_factory=list)
    inter_token_latency: list[float] = field(default_factory=list)
    e2e_latency: list[float] = field(default_factory=list)
    finish_reasons: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.time_to_first_token or self.inter_token_latency
                    or self.finish_reasons)


StatListener = Callable[[IterationStats], None]


class RequestCollector:
    """Deltas of one API request, merged per choice until its consumer takes them."""

    def __init__(self, num_choices: int) -> None:
        self._pending: dict[int, ChoiceDelta] = {}
        self._ready = asyncio.Event()
        self._error: BaseException | None = None
        self.unfinished = num_choices

    def put(self, index: int, token_id: int, text: str, logprobs: dict[int, float] | None,
            finish_reason: str | None, stop_reason: int | str | None = None,
            prompt_logprobs: PromptLogprobs | None = None,
            prompt_token_ranks: PromptTokenRanks | None = None) -> None:
        d = self._pending.get(index)
        if d is None:
            d = self._pending[index] = ChoiceDelta(index)
        if prompt_logprobs is not None:
            d.prompt_logprobs, d.prompt_token_ranks = prompt_logprobs, prompt_token_ranks
        d.token_ids.append(token_id)
        d.text += text
        if logprobs is not None:
            if d.logprobs is None:
                d.logprobs = []
            d.logprobs.append(logprobs)
        if finish_reason is not None:
            d.finish_reason = finish_reason
            d.stop_reason = stop_reason
            self.unfinished -= 1
        self._ready.set()

    def fail(self, exc: BaseException) -> None:
        self._error = exc
        self._ready.set()

    async def get(self) -> list[ChoiceDelta]:
        """The next deltas (one per choice that moved); raises the request's error."""
        await self._ready.wait()
        out = list(self._pending.values())
        self._pending = {}
        if self._error is None:
            self._ready.clear()
        elif not out:  # what came before the error was handed out first
            raise self._error
        return out

    @property
    def done(self) -> bool:
        return self.unfinished == 0 and not self._pending


@dataclass
class _Prompt:
    """The samples of one prompt, for per-prompt metrics (e2e latency, finish reason)."""

    arrival: float
    remaining: int
    reasons: list[str] = field(default_factory=list)


@dataclass
class _Sample:
    collector: RequestCollector
    index: int
    prompt: _Prompt
    detok: IncrementalDetokenizer | None
    last_token_time: float | None = None


class OutputProcessor:
    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._samples: dict[str, _Sample] = {}
        self.listeners: list[StatListener] = []

    def add(self, collector: RequestCollector, prompt_ids: list[int], params: SamplingParams,
            samples: list[tuple[str, int]], arrival: float) -> None:
        """One prompt: core request ids with their choice indices, all of ``params``."""
        group = _Prompt(arrival, len(samples))
        for rid, index in samples:
            detok = (IncrementalDetokenizer(self.tokenizer, prompt_ids, params)
                     if self.tokenizer is not None else None)
            self._samples[rid] = _Sample(collector, index, group, detok)

    def remove(self, request_ids: list[str]) -> list[str]:
        """Forget samples (client gone); returns those that were still running."""
        stats = IterationStats()
        gone = []
        for rid in request_ids:
            s = self._samples.pop(rid, None)
            if s is not None:
                gone.append(rid)
                self._end(s, "abort", time.monotonic(), stats)
        self._notify(stats)
        return gone

    def fail(self, request_ids: list[str], exc: BaseException) -> None:
        for rid in request_ids:
            s = self._samples.pop(rid, None)
            if s is not None:
                s.collector.fail(exc)

    def fail_all(self, exc: BaseException) -> None:
        self.fail(list(self._samples), exc)

    def process(self, out: StepOutputs) -> list[str]:
        """Hand one step's tokens to their choices. Returns the core request ids that hit a
        stop string while the core still runs them."""
        now = time.monotonic()
        stats = IterationStats()
        finished = {f.event: f for f in out.finished}
        logprobs, prompt_logprobs = out.logprobs, out.prompt_logprobs
        stopped = []
        for i, (rid, token) in enumerate(zip(out.request_ids, out.token_ids, strict=True)):
            s = self._samples.get(rid)
            if s is None:
                continue  # aborted, or stopped by a stop string, while the step ran
            fin = finished.get(i)
            engine_finish = fin.reason if fin is not None else None
            reason, text = engine_finish, ""
            stop_reason: int | str | None = fin.stop_token if fin is not None else None
            if s.detok is not None:
                if s.detok.on_token(token, engine_finish):
                    if engine_finish is None:
                        stopped.append(rid)
                    reason, stop_reason = "stop", s.detok.stop_reason
                text = s.detok.take_delta(reason is not None)
            lps = dict(logprobs[i]) if logprobs and logprobs[i] is not None else None
            rows = prompt_logprobs[i] if prompt_logprobs else None
            prompt_lps = prompt_logprobs_of(rows) if rows is not None else None
            ranks = prompt_token_ranks_of(rows) if rows is not None else None
            s.collector.put(s.index, token, text, lps, reason, stop_reason, prompt_lps, ranks)
            if s.last_token_time is None:
                stats.time_to_first_token.append(now - s.prompt.arrival)
            else:
                stats.inter_token_latency.append(now - s.last_token_time)
            s.last_token_time = now
            if reason is not None:
                del self._samples[rid]
                self._end(s, reason, now, stats)
        self._notify(stats)
        return stopped

    def _end(self, s: _Sample, reason: str, now: float, stats: IterationStats) -> None:
        p = s.prompt
        p.reasons.append(reason)
        p.remaining -= 1
        if p.remaining:
            return
        if "abort" in p.reasons:
            stats.finish_reasons.append("abort")
            return
        stats.e2e_latency.append(now - p.arrival)
        stats.finish_reasons.append("stop" if "stop" in p.reasons else p.reasons[0])

    def _notify(self, stats: IterationStats) -> None:
        if stats:
            for listener in self.listeners:
                listener(stats)

    def __len__(self) -> int:
        return len(self._samples)
