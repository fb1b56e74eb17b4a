"""AsyncLLM: the API process's engine, with the engine core in its own process.

The API process owns text: tokenization (on a worker thread, never on the event loop),
validation, ``n`` fan-out (one core request per sample, seed + i), incremental detokenization
and stop strings (``OutputProcessor``). The core owns scheduling, the KV cache and the model
and sends one message per step. The event loop only sends messages and reads them, so it
never waits on the model, and the core never waits on the event loop.

A request the core refuses fails alone. If the core dies, every request in flight gets an
``EngineDeadError`` (never a hang), later requests are refused at once, and the ``on_dead``
callbacks run (the server exits non-zero on it, for a supervisor to restart).
"""

from __future__ import annotations

import asyncio
import copy
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from tachyon.config import EngineArgs
from tachyon.engine.core import check_params, check_prompt_ids
from tachyon.engine.core_client import CoreClient, EngineDeadError
from tachyon.engine.llm_engine import child_params, load_tokenizer
from tachyon.engine.messages import (
    AbortRequests,
    AddRequest,
    CoreReady,
    CoreStats,
    LoadLoRA,
    StepOutputs,
    UnloadLoRA,
)
from tachyon.engine.output_processor import (
    ChoiceDelta,
    OutputProcessor,
    RequestCollector,
    StatListener,
)
from tachyon.lora.request import LoRARequest
from tachyon.sampling_params import SamplingParams

__all__ = ["AsyncLLM", "ChoiceDelta", "EngineDeadError", "RequestRejected", "RequestStream"]

T = TypeVar("T")


class RequestRejected(ValueError):
    """The engine core refused one request (a check the API process did not make)."""


class RequestStream:
    """Outputs of one request: ``async for deltas in stream`` yields, per step the consumer
    sees, one ``ChoiceDelta`` per choice that moved. ``close()`` (or leaving ``async with``)
    before the end aborts the request and frees its KV blocks."""

    def __init__(self, llm: AsyncLLM, request_id: str, collector: RequestCollector,
                 core_ids: list[str]) -> None:
        self.request_id = request_id
        self.core_ids = core_ids
        self._llm = llm
        self._collector = collector
        self._closed = False

    @property
    def finished(self) -> bool:
        return self._collector.done

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> list[ChoiceDelta]:
        if self._closed or self._collector.done:
            raise StopAsyncIteration
        try:
            deltas = await self._collector.get()
        except BaseException:
            self.close()
            raise
        if self._collector.done:
            self.close()
        return deltas

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._llm._release(self)

    async def __aenter__(self) -> RequestStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


class AsyncLLM:
    """Create with ``await AsyncLLM.create(args)`` inside a running event loop; ``await
    shutdown()`` stops the core process."""

    def __init__(self, client: CoreClient, ready: CoreReady, tokenizer: Any) -> None:
        self.client = client
        self.tokenizer = tokenizer  # the event loop's copy: detokenization, echo, logprobs
        # Tokenizing runs on one worker thread with its own copy: HF fast tokenizers must
        # not be used from two threads at once.
        self._encoder = copy.deepcopy(tokenizer)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="tachyon-tokenize")
        self.max_model_len = ready.max_model_len
        self.vocab_size = ready.vocab_size
        self.num_blocks = ready.num_blocks
        self.startup_report = ready.startup_report
        eos = set(ready.eos_token_ids)  # the model config's; the tokenizer's join them
        if tokenizer is not None and tokenizer.eos_token_id is not None:
            eos.add(int(tokenizer.eos_token_id))
        self.eos_token_ids = sorted(eos)
        self.processor = OutputProcessor(tokenizer)
        self.core_stats = CoreStats(num_free_blocks=ready.num_blocks, num_blocks=ready.num_blocks)
        self.prompt_tokens = 0  # since start, times n
        self._streams: dict[str, RequestStream] = {}
        self._dead_callbacks: list[Callable[[str], None]] = []
        self.loras: list[LoRARequest] = list(ready.loras)  # as of the core's last answer
        self._lora_waiters: dict[int, asyncio.Future[str | None]] = {}
        self._lora_seq = 0

    @classmethod
    async def create(cls, args: EngineArgs) -> AsyncLLM:
        """Start the core and load the tokenizer. Raises ``ValueError`` if either fails."""
        client = CoreClient(args)
        try:
            ready = await client.start()
            tokenizer = None
            if ready.tokenizer_path is not None:
                tokenizer = await asyncio.to_thread(load_tokenizer, ready.tokenizer_path)
        except BaseException:
            await client.shutdown()
            raise
        llm = cls(client, ready, tokenizer)
        client.listen(llm._on_output, llm._on_dead)
        return llm

    @property
    def is_running(self) -> bool:
        return self.client.dead is None

    @property
    def dead_reason(self) -> str | None:
        return self.client.dead

    def add_stat_listener(self, listener: StatListener) -> None:
        """``listener`` runs on the event loop after each core step that had news."""
        self.processor.listeners.append(listener)

    def on_dead(self, callback: Callable[[str], None]) -> None:
        """``callback(reason)`` runs once if the core dies unasked."""
        self._dead_callbacks.append(callback)

    async def run_in_tokenizer_thread(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(encoder_tokenizer, *args)`` on the tokenizer thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, fn, self._encoder, *args)

    async def encode(self, text: str) -> list[int]:
        return await self.run_in_tokenizer_thread(_encode, text)

    # -- requests ----------------------------------------------------------------------------
    def add_request(self, request_id: str, prompts: list[list[int]],
                    params: SamplingParams,
                    lora_request: LoRARequest | None = None) -> RequestStream:
        """Queue ``prompts`` (each sampled ``params.n`` times) as one request. Raises
        ``ValueError`` for a request the core would refuse (then nothing is queued)."""
        if self.client.dead is not None:
            raise EngineDeadError(f"the engine is dead: {self.client.dead}")
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        check_params(params, self.vocab_size)
        for prompt in prompts:
            check_prompt_ids(prompt, self.vocab_size, self.max_model_len)
        n = params.n
        collector = RequestCollector(len(prompts) * n)
        now = time.monotonic()
        core_ids = []
        for k, prompt in enumerate(prompts):
            samples = [(f"{request_id}-{k}-{i}", k * n + i) for i in range(n)]
            self.processor.add(collector, prompt, params, samples, now)
            for i, (rid, _) in enumerate(samples):
                sp = child_params(params, i) if n > 1 else params
                self.client.send(AddRequest(rid, prompt, sp, self.eos_token_ids, now,
                                            lora_request))
                core_ids.append(rid)
            self.prompt_tokens += len(prompt) * n
        stream = RequestStream(self, request_id, collector, core_ids)
        self._streams[request_id] = stream
        return stream

    async def generate(self, request_id: str, prompt: list[int],
                       params: SamplingParams) -> AsyncIterator[list[ChoiceDelta]]:
        """One prompt, as an async generator; closing it early aborts the request."""
        async with self.add_request(request_id, [prompt], params) as stream:
            async for deltas in stream:
                yield deltas

    def abort(self, request_id: str) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            stream.close()

    def _release(self, stream: RequestStream) -> None:
        self._streams.pop(stream.request_id, None)
        running = self.processor.remove(stream.core_ids)
        if running:
            self.client.send(AbortRequests(running))

    # -- LoRA adapters -----------------------------------------------------------------------
    async def add_lora(self, lora: LoRARequest) -> None:
        """Load (or replace) an adapter in the core; ``ValueError`` with the core's reason."""
        await self._change_lora(lambda seq: LoadLoRA(seq, lora))

    async def remove_lora(self, lora_int_id: int) -> None:
        await self._change_lora(lambda seq: UnloadLoRA(seq, lora_int_id))

    async def _change_lora(self, make: Callable[[int], LoadLoRA | UnloadLoRA]) -> None:
        if self.client.dead is not None:
            raise EngineDeadError(f"the engine is dead: {self.client.dead}")
        self._lora_seq += 1
        fut = asyncio.get_running_loop().create_future()
        self._lora_waiters[self._lora_seq] = fut
        self.client.send(make(self._lora_seq))
        error = await fut
        if error is not None:
            raise ValueError(error)

    # -- from the core -----------------------------------------------------------------------
    def _on_output(self, out: StepOutputs) -> None:
        self.core_stats = out.stats
        for update in out.lora_updates:
            self.loras = update.loras
            waiter = self._lora_waiters.pop(update.seq, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(update.error)
        for rid, why in out.rejected.items():
            self.processor.fail([rid], RequestRejected(why))
        stopped = self.processor.process(out)
        if stopped:
            self.client.send(AbortRequests(stopped, stopped=True))

    def _on_dead(self, reason: str) -> None:
        self.processor.fail_all(EngineDeadError(reason))
        for waiter in self._lora_waiters.values():
            if not waiter.done():
                waiter.set_exception(EngineDeadError(reason))
        self._lora_waiters.clear()
        for callback in self._dead_callbacks:
            callback(reason)

    async def shutdown(self) -> None:
        """Stop the core (after the step it is in), fail waiters, stop the tokenizer thread."""
        self.processor.fail_all(EngineDeadError("the engine was shut down"))
        await self.client.shutdown()
        self._pool.shutdown(wait=False, cancel_futures=True)


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer.encode(text))
