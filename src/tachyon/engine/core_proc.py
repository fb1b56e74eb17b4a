"""The engine core in its own process: a loop of ``apply inputs -> step -> send outputs``.

Two zmq PUSH/PULL sockets that the API process binds: inputs (add, abort, shutdown) come in,
one ``StepOutputs`` per iteration goes out. The output socket has no high-water mark, so a
slow API process never makes the core wait: it only queues memory. A request the core
refuses (a check in ``EngineCore.check_request``) fails alone, in ``rejected``; an exception
in a step ends the process (after a ``CoreFailed`` saying why), and the API process fails
every request in flight. The core also exits when its parent is gone.

A request with structured outputs waits for its grammar, compiled on a thread of its own
while the loop goes on stepping the others, and is scheduled once it is ready (its model
runner then finds it in the process's grammar cache); a grammar that fails to compile
rejects its request alone.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor

import msgspec
import zmq

from tachyon.config import EngineArgs
from tachyon.engine.core import EngineCore, TokenEvent
from tachyon.engine.detokenizer import finish_reason_of
from tachyon.engine.llm_engine import eos_token_ids
from tachyon.engine.messages import (
    AbortRequests,
    AddRequest,
    CoreFailed,
    CoreInput,
    CoreReady,
    CoreStats,
    Finished,
    LoadLoRA,
    LoRAUpdate,
    Shutdown,
    StepOutputs,
    UnloadLoRA,
)
from tachyon.engine.request import Request, RequestStatus
from tachyon.profiling import maybe_profile

logger = logging.getLogger(__name__)

# While idle, how often the core wakes to check that its parent still lives.
IDLE_POLL_MS = 1000
# While idle but for grammars being compiled, how often it looks whether one is ready.
COMPILE_POLL_MS = 2


def run_engine_core(args: EngineArgs, input_addr: str, output_addr: str, parent_pid: int,
                    log_level: str) -> None:
    """Process entry point: load the model, say ready (or why not), serve until told."""
    logging.basicConfig(level=log_level, format="%(levelname)s %(name)s: %(message)s")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the API process's to handle
    ctx = zmq.Context()
    out = ctx.socket(zmq.PUSH)
    out.setsockopt(zmq.SNDHWM, 0)
    out.setsockopt(zmq.LINGER, 1000)
    out.connect(output_addr)
    inp = ctx.socket(zmq.PULL)
    inp.setsockopt(zmq.RCVHWM, 0)
    inp.connect(input_addr)
    enc = msgspec.msgpack.Encoder()
    try:
        config = dataclasses.replace(args, skip_tokenizer_init=True).create_config()
        core = EngineCore(config)
    except Exception as e:  # bad flags, missing model, out of memory: say so, then exit
        out.send(enc.encode(CoreFailed(str(e) or repr(e))))
        out.close()
        sys.exit(1)
    tokenizer = None if args.skip_tokenizer_init else config.model.tokenizer_path
    out.send(enc.encode(CoreReady(
        config.model.max_model_len, core.vocab_size,
        sorted(eos_token_ids(config.model.hf_config, None)), tokenizer,
        core.executor.num_blocks, str(core.executor.startup_report), core.list_loras())))
    loop = CoreLoop(core, inp, out, parent_pid)
    try:
        with maybe_profile("core"):
            loop.run()
    except Exception as e:
        logger.exception("the engine core failed")
        out.send(enc.encode(CoreFailed(f"the engine core failed: {e!r}")))
        out.close()
        sys.exit(1)
    finally:
        core.shutdown()


class CoreLoop:
    def __init__(self, core: EngineCore, inp: zmq.Socket, out: zmq.Socket,
                 parent_pid: int) -> None:
        self.core = core
        self.inp = inp
        self.out = out
        self.parent_pid = parent_pid
        self.enc = msgspec.msgpack.Encoder()
        self.dec = msgspec.msgpack.Decoder(CoreInput)
        self.step_seconds = 0.0  # inside core.step(): what the loop adds is the rest
        # Iterations that had work, whole, and of them building, encoding and sending the
        # outputs; a stats message holds its own iteration's loop time but not its send.
        self.loop_seconds = 0.0
        self.send_seconds = 0.0
        self._compiler_pool = ThreadPoolExecutor(1, thread_name_prefix="tachyon-grammar")
        self._compiling: dict[str, tuple[Request, Future[object]]] = {}
        self._lora_updates: list[LoRAUpdate] = []

    def run(self) -> None:
        core = self.core
        while True:
            if os.getppid() != self.parent_pid:  # one cheap syscall per step
                logger.warning("the API process is gone; the engine core exits")
                return
            rejected: dict[str, str] = {}
            compiled = self._admit_compiled(rejected)
            wait = COMPILE_POLL_MS if self._compiling else IDLE_POLL_MS
            if not compiled and not core.has_unfinished_requests() and not self.inp.poll(wait):
                continue
            begin = time.perf_counter()
            if not self._apply_inputs(rejected):
                return
            events = []
            if core.has_unfinished_requests():
                start = time.perf_counter()
                events = core.step()
                self.step_seconds += time.perf_counter() - start
            start = time.perf_counter()
            self.loop_seconds += start - begin  # before the stats are taken: they add up
            self.out.send(self.enc.encode(self._outputs(events, rejected)), copy=False)
            sent = time.perf_counter() - start
            self.send_seconds += sent
            self.loop_seconds += sent

    def _apply_inputs(self, rejected: dict[str, str]) -> bool:
        """Everything queued, without waiting. False: shut down."""
        while True:
            try:
                raw = self.inp.recv(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return True
            msg = self.dec.decode(raw.buffer)
            if isinstance(msg, AddRequest):
                self._add(msg, rejected)
            elif isinstance(msg, AbortRequests):
                status = (RequestStatus.FINISHED_STOPPED if msg.stopped
                          else RequestStatus.FINISHED_ABORTED)
                self.core.finish_requests(msg.request_ids, status)
                for rid in msg.request_ids:
                    self._compiling.pop(rid, None)
            elif isinstance(msg, LoadLoRA | UnloadLoRA):
                self._lora_updates.append(self._change_lora(msg))
            elif isinstance(msg, Shutdown):
                return False

    def _add(self, msg: AddRequest, rejected: dict[str, str]) -> None:
        try:
            req = Request(msg.request_id, msg.prompt_token_ids, msg.params,
                          frozenset(msg.eos_token_ids), msg.arrival_time, msg.lora_request)
            self.core.check_request(req)
            if req.params.structured_outputs is not None:
                fut = self._compiler_pool.submit(self._compile, req)
                self._compiling[req.request_id] = (req, fut)
                return
            self.core.add_request(req)
        except Exception as e:  # this request's fault: it fails alone
            rejected[msg.request_id] = str(e) or repr(e)

    def _change_lora(self, msg: LoadLoRA | UnloadLoRA) -> LoRAUpdate:
        try:
            if isinstance(msg, LoadLoRA):
                self.core.add_lora(msg.lora)
            elif not self.core.remove_lora(msg.lora_int_id):
                raise ValueError(f"no LoRA adapter has id {msg.lora_int_id}")
        except Exception as e:  # a bad adapter directory, LoRA off, an adapter in use
            return LoRAUpdate(msg.seq, self.core.list_loras(), str(e) or repr(e))
        return LoRAUpdate(msg.seq, self.core.list_loras())

    def _compile(self, req: Request) -> object:
        from tachyon.structured_output.compiler import compiler_for

        path = self.core.config.model.tokenizer_path
        if path is None:
            raise ValueError("structured outputs need the model's tokenizer")
        assert req.params.structured_outputs is not None
        return compiler_for(path, self.core.vocab_size).compile(req.params.structured_outputs)

    def _admit_compiled(self, rejected: dict[str, str]) -> bool:
        """Schedule the requests whose grammar is ready; True if any finished compiling."""
        done = [rid for rid, (_, fut) in self._compiling.items() if fut.done()]
        for rid in done:
            req, fut = self._compiling.pop(rid)
            error = fut.exception()
            if error is not None:
                rejected[rid] = str(error) or repr(error)
            else:
                self.core.add_request(req)
        return bool(done)

    def _outputs(self, events: list[TokenEvent], rejected: dict[str, str]) -> StepOutputs:
        ids, tokens, finished, logprobs, prompt_logprobs = [], [], [], [], []
        any_logprobs = any_prompt_logprobs = False
        for i, ev in enumerate(events):
            ids.append(ev.request.request_id)
            tokens.append(ev.token_id)
            logprobs.append(ev.logprobs)
            prompt_logprobs.append(ev.prompt_logprobs)
            any_logprobs = any_logprobs or ev.logprobs is not None
            any_prompt_logprobs = any_prompt_logprobs or ev.prompt_logprobs is not None
            reason = finish_reason_of(ev.status)
            if reason is not None:
                finished.append(Finished(i, reason, ev.stop_reason))
        updates, self._lora_updates = self._lora_updates, []
        return StepOutputs(ids, tokens, finished, logprobs if any_logprobs else [], rejected,
                           self._stats(), updates,
                           prompt_logprobs if any_prompt_logprobs else [])

    def _stats(self) -> CoreStats:
        core = self.core
        kv, sched = core.kv, core.scheduler
        spec = sched.spec_counts
        return CoreStats(sched.num_running, sched.num_waiting, kv.num_free_blocks,
                         kv.pool.num_blocks, kv.prefix_queries, kv.prefix_hits,
                         core.stats["generation_tokens"], core.stats["preemptions"],
                         core.stats["steps"], self.step_seconds, core.wait_seconds,
                         self.loop_seconds, self.send_seconds, spec["draft_tokens"],
                         spec["accepted_tokens"], spec["verifies"])
