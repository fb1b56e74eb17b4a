"""AsyncLLM: the engine loop in a background thread, requests from asyncio.

One thread owns the ``LLMEngine``: it drains a command queue (add, abort, shutdown), runs
``step()`` and hands each request's new tokens to the event loop with
``call_soon_threadsafe``. Nothing else touches the engine, so the engine needs no locks, and
the event loop never waits on the model: it only enqueues commands and awaits queues.

A step that raises kills the engine: every waiter gets an ``EngineDeadError`` (never a hang)
and later requests are refused at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from tachyon.config import EngineArgs
from tachyon.engine.llm_engine import LLMEngine
from tachyon.outputs import CompletionOutput, RequestOutput
from tachyon.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

# How long shutdown waits for the loop to finish the step it is in.
SHUTDOWN_JOIN_SECONDS = 30.0


class EngineDeadError(RuntimeError):
    """The engine loop has stopped (a step raised, or shutdown); no request can be served."""


@dataclass(frozen=True)
class TokenDelta:
    """One new token of sample ``index`` (``0..n-1``) of one prompt."""

    index: int
    token_id: int
    text: str  # text this token adds; held back while it might begin a stop string
    logprobs: dict[int, float] | None  # sampled token first, then the top-k
    finish_reason: str | None  # set on the sample's last token only


@dataclass(frozen=True)
class StreamItem:
    """What one step produced for one prompt of a request: at most one token per sample."""

    prompt_index: int
    deltas: list[TokenDelta]
    finished: bool  # every sample of this prompt is done


@dataclass
class IterationStats:
    """Per loop iteration, for metrics: latencies in seconds, one finish reason per prompt."""

    time_to_first_token: list[float] = field(default_factory=list)
    inter_token_latency: list[float] = field(default_factory=list)
    e2e_latency: list[float] = field(default_factory=list)
    finish_reasons: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.time_to_first_token or self.inter_token_latency
                    or self.finish_reasons)


@dataclass(frozen=True)
class EngineStats:
    """A snapshot taken by the loop thread after every iteration (safe to read anywhere)."""

    num_running: int
    num_waiting: int
    num_free_blocks: int
    num_blocks: int
    prefix_cache_queries: int
    prefix_cache_hits: int
    prompt_tokens: int
    generation_tokens: int
    num_preemptions: int
    num_steps: int

    @property
    def kv_cache_usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks


StatListener = Callable[[IterationStats], None]


# -- commands from the event loop to the engine thread -------------------------------------
@dataclass(frozen=True)
class _Add:
    request_id: str
    prompts: list[list[int]]
    params: SamplingParams
    arrival: float


@dataclass(frozen=True)
class _Abort:
    request_id: str


class _Shutdown:
    pass


_Command = _Add | _Abort | _Shutdown


class _Accepted:
    """First item of a request's queue when the engine took it."""


_ACCEPTED = _Accepted()


# -- per-sample bookkeeping in the engine thread --------------------------------------------
@dataclass
class _Cursor:
    """How much of one sample has been handed out."""

    num_tokens: int = 0
    num_chars: int = 0
    last_token_time: float | None = None


@dataclass
class _Tracked:
    request_id: str
    prompt_index: int
    arrival: float
    holdback: int  # characters kept back while running: longest stop string - 1
    cursors: list[_Cursor]


class RequestStream:
    """Outputs of one accepted request. Iterate it; ``close()`` (or leaving ``async with``)
    before the end aborts the request and frees its KV blocks."""

    def __init__(self, llm: AsyncLLM, request_id: str, num_prompts: int,
                 queue_: asyncio.Queue[object]) -> None:
        self.request_id = request_id
        self._llm = llm
        self._queue = queue_
        self._pending = num_prompts
        self._closed = False

    @property
    def finished(self) -> bool:
        return self._pending == 0

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> StreamItem:
        if self._pending == 0 or self._closed:
            raise StopAsyncIteration
        item = await self._queue.get()
        if isinstance(item, BaseException):
            self.close()
            raise item
        assert isinstance(item, StreamItem)
        self._pending -= item.finished
        if self._pending == 0:
            self.close()
        return item

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._llm._release(self.request_id, abort=self._pending > 0)

    async def __aenter__(self) -> RequestStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


class AsyncLLM:
    """Drive an ``LLMEngine`` from asyncio. Create it inside a running event loop (or call
    ``start()`` from one); ``shutdown()`` stops the loop thread and the executor."""

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        engine.emit_unfinished = True  # streams need an output per new token
        self._commands: queue.SimpleQueue[_Command] = queue.SimpleQueue()
        self._streams: dict[str, asyncio.Queue[object]] = {}  # event-loop side only
        self._tracked: dict[str, _Tracked] = {}  # engine-thread side only: engine id -> state
        self._listeners: list[StatListener] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._dead: BaseException | None = None
        self.stats = self._snapshot()

    @classmethod
    def from_engine_args(cls, args: EngineArgs) -> AsyncLLM:
        return cls(LLMEngine.from_engine_args(args))

    @property
    def tokenizer(self) -> object:
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.config.model.max_model_len

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self._dead is None

    def add_stat_listener(self, listener: StatListener) -> None:
        """``listener`` is called from the engine thread after each iteration with news."""
        self._listeners.append(listener)

    def start(self) -> None:
        if self._thread is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="tachyon-engine", daemon=True)
        self._thread.start()

    def shutdown(self) -> None:
        """Stop the loop thread (after the step it is in), fail waiters, free the executor."""
        if self._thread is not None:
            self._commands.put(_Shutdown())
            self._thread.join(SHUTDOWN_JOIN_SECONDS)
        self._fail_all(EngineDeadError("the engine was shut down"))
        self.engine.shutdown()

    # -- event-loop side --------------------------------------------------------------------
    async def add_request(self, request_id: str, prompts: list[list[int]],
                          params: SamplingParams) -> RequestStream:
        """Queue ``prompts`` (each sampled ``params.n`` times) as one request. Raises
        ``ValueError`` if the engine rejects any of them (then none is queued)."""
        self.start()
        if self._dead is not None:
            raise EngineDeadError(f"the engine is dead: {self._dead}")
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        q: asyncio.Queue[object] = asyncio.Queue()
        self._streams[request_id] = q
        self._commands.put(_Add(request_id, prompts, params, time.monotonic()))
        try:
            first = await q.get()
        except BaseException:
            self._release(request_id, abort=True)
            raise
        if isinstance(first, BaseException):
            self._streams.pop(request_id, None)
            raise first
        return RequestStream(self, request_id, len(prompts), q)

    async def generate(self, request_id: str, prompt: list[int],
                       params: SamplingParams) -> AsyncIterator[StreamItem]:
        """One prompt, as an async generator; closing it early aborts the request."""
        async with await self.add_request(request_id, [prompt], params) as stream:
            async for item in stream:
                yield item

    def abort(self, request_id: str) -> None:
        self._release(request_id, abort=True)

    def _release(self, request_id: str, abort: bool) -> None:
        self._streams.pop(request_id, None)
        if abort:
            self._commands.put(_Abort(request_id))

    def _deliver(self, items: list[tuple[str, object]]) -> None:
        for request_id, item in items:
            q = self._streams.get(request_id)
            if q is not None:
                q.put_nowait(item)

    def _fail_all(self, exc: BaseException) -> None:
        self._dead = self._dead or exc
        err = exc if isinstance(exc, EngineDeadError) else EngineDeadError(
            f"the engine loop failed: {exc!r}")
        for q in self._streams.values():
            q.put_nowait(err)
        self._streams.clear()

    def _post(self, fn: Callable[..., None], *args: object) -> None:
        assert self._loop is not None
        with contextlib.suppress(RuntimeError):  # a closed event loop: nobody is waiting
            self._loop.call_soon_threadsafe(fn, *args)

    # -- engine-thread side -----------------------------------------------------------------
    def _run(self) -> None:
        try:
            while self._iterate():
                pass
        except BaseException as e:  # a dead engine must wake every waiter, not hang them
            logger.exception("engine loop failed")
            self._dead = e
            self._post(self._fail_all, e)

    def _iterate(self) -> bool:
        """One loop iteration: apply commands, run one step if there is work. False: stop."""
        block = not self.engine.has_unfinished_requests()
        stats = IterationStats()
        for cmd in self._take_commands(block):
            if isinstance(cmd, _Shutdown):
                return False
            if isinstance(cmd, _Add):
                self._apply_add(cmd)
            else:
                self._apply_abort(cmd.request_id, stats)
        if self.engine.has_unfinished_requests():
            self._step(stats)
        self.stats = self._snapshot()
        if stats:
            for listener in self._listeners:
                listener(stats)
        return True

    def _take_commands(self, block: bool) -> list[_Command]:
        cmds = [self._commands.get()] if block else []
        while True:
            try:
                cmds.append(self._commands.get_nowait())
            except queue.Empty:
                return cmds

    def _apply_add(self, cmd: _Add) -> None:
        ids = [_engine_id(cmd.request_id, k) for k in range(len(cmd.prompts))]
        holdback = max((len(s) for s in cmd.params.stop_strings), default=1) - 1
        try:
            for k, (rid, prompt) in enumerate(zip(ids, cmd.prompts, strict=True)):
                self.engine.add_request(rid, prompt, cmd.params, cmd.arrival)
                cursors = [_Cursor() for _ in range(cmd.params.n)]
                self._tracked[rid] = _Tracked(cmd.request_id, k, cmd.arrival, holdback, cursors)
        except Exception as e:  # rejected: nothing of this request stays queued
            self.engine.abort_request(ids)
            for rid in ids:
                self._tracked.pop(rid, None)
            self._post(self._deliver, [(cmd.request_id, e)])
            return
        self._post(self._deliver, [(cmd.request_id, _ACCEPTED)])

    def _apply_abort(self, request_id: str, stats: IterationStats) -> None:
        ids = [rid for rid, t in self._tracked.items() if t.request_id == request_id]
        self.engine.abort_request(ids)
        for rid in ids:
            del self._tracked[rid]
            stats.finish_reasons.append("abort")

    def _step(self, stats: IterationStats) -> None:
        outputs = self.engine.step()
        now = time.monotonic()
        items: list[tuple[str, object]] = []
        for out in outputs:
            tracked = self._tracked.get(out.request_id)
            if tracked is None:
                continue
            deltas = [d for seq in out.outputs
                      for d in _take_deltas(seq, tracked, now, stats)]
            if out.finished:
                del self._tracked[out.request_id]
                stats.e2e_latency.append(now - tracked.arrival)
                stats.finish_reasons.append(_finish_reason(out))
            items.append((tracked.request_id, StreamItem(tracked.prompt_index, deltas,
                                                         out.finished)))
        if items:
            self._post(self._deliver, items)

    def _snapshot(self) -> EngineStats:
        e = self.engine
        return EngineStats(
            num_running=e.scheduler.num_running, num_waiting=e.scheduler.num_waiting,
            num_free_blocks=e.kv.num_free_blocks, num_blocks=e.kv.pool.num_blocks,
            prefix_cache_queries=e.kv.prefix_queries, prefix_cache_hits=e.kv.prefix_hits,
            prompt_tokens=e.stats["prompt_tokens"],
            generation_tokens=e.stats["generation_tokens"],
            num_preemptions=e.stats["preemptions"], num_steps=e.stats["steps"],
        )


def _engine_id(request_id: str, prompt_index: int) -> str:
    return f"{request_id}-{prompt_index}"


def _take_deltas(seq: CompletionOutput, tracked: _Tracked, now: float,
                 stats: IterationStats) -> list[TokenDelta]:
    """The tokens of ``seq`` not handed out yet (one per step), with their text. While the
    sample runs, the last ``holdback`` characters stay back: they may begin a stop string
    that the engine will cut off."""
    cur = tracked.cursors[seq.index]
    new = seq.token_ids[cur.num_tokens:]
    if not new:
        return []
    end = len(seq.text) if seq.finish_reason is not None else max(
        cur.num_chars, len(seq.text) - tracked.holdback)
    text = seq.text[cur.num_chars:end]
    deltas = []
    for j, token in enumerate(new):
        last = j == len(new) - 1
        pos = cur.num_tokens + j
        lps = seq.logprobs[pos] if seq.logprobs is not None and pos < len(seq.logprobs) else None
        deltas.append(TokenDelta(seq.index, token, text if last else "", lps,
                                 seq.finish_reason if last else None))
    if cur.last_token_time is None:
        stats.time_to_first_token.append(now - tracked.arrival)
    else:
        stats.inter_token_latency.append(now - cur.last_token_time)
    cur.num_tokens += len(new)
    cur.num_chars = end
    cur.last_token_time = now
    return deltas


def _finish_reason(out: RequestOutput) -> str:
    reasons = [s.finish_reason for s in out.outputs]
    return "stop" if "stop" in reasons else reasons[0] or "stop"
