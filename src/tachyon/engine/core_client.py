"""The API process's end of the engine core: spawn it, talk to it, notice when it dies.

``CoreClient.start()`` binds two ipc sockets, spawns ``run_engine_core`` and waits for
``CoreReady`` (or the reason it failed); ``listen`` then starts a reader task that hands every
``StepOutputs`` to ``on_output``. ``send`` never blocks (no high-water mark). The process's sentinel
is watched by the event loop: when the core dies unasked, ``on_dead`` runs once with why.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import tempfile
from collections.abc import Callable

import msgspec
import zmq
import zmq.asyncio

from tachyon.config import EngineArgs
from tachyon.engine.core_proc import run_engine_core
from tachyon.engine.messages import (
    CoreFailed,
    CoreInput,
    CoreOutput,
    CoreReady,
    Shutdown,
    StepOutputs,
)

logger = logging.getLogger(__name__)

# How long shutdown waits for the core to finish its step and exit before terminating it.
SHUTDOWN_JOIN_SECONDS = 10.0


class EngineDeadError(RuntimeError):
    """The engine core is gone (it failed, was killed, or shut down): nothing is served."""


class CoreClient:
    def __init__(self, args: EngineArgs) -> None:
        self.args = args
        self._on_output: Callable[[StepOutputs], None] = _ignore
        self._on_dead: Callable[[str], None] = _ignore
        self._dir = tempfile.TemporaryDirectory(prefix="tachyon-core-")
        self._ctx = zmq.asyncio.Context()
        self._enc = msgspec.msgpack.Encoder()
        self._dec = msgspec.msgpack.Decoder(CoreOutput)
        self._inp = self._ctx.socket(zmq.PUSH)  # to the core
        self._inp.setsockopt(zmq.SNDHWM, 0)
        self._inp.setsockopt(zmq.LINGER, 0)
        self._out = self._ctx.socket(zmq.PULL)  # from the core
        self._out.setsockopt(zmq.RCVHWM, 0)
        self._proc: multiprocessing.process.BaseProcess | None = None
        self._reader: asyncio.Task[None] | None = None
        self.dead: str | None = None

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    async def start(self) -> CoreReady:
        """Spawn the core and wait until its model is loaded. Raises ``ValueError`` with the
        core's own message if it cannot start."""
        in_addr = f"ipc://{os.path.join(self._dir.name, 'in')}"
        out_addr = f"ipc://{os.path.join(self._dir.name, 'out')}"
        self._inp.bind(in_addr)
        self._out.bind(out_addr)
        # spawn, not fork: the core owns torch and maybe CUDA, and forking a process that
        # runs an event loop and threads is unsafe. Not a daemon: TP ranks are its children.
        ctx = multiprocessing.get_context("spawn")
        level = logging.getLevelName(logging.getLogger("tachyon").getEffectiveLevel())
        self._proc = ctx.Process(target=run_engine_core, name="tachyon-engine-core",
                                 args=(self.args, in_addr, out_addr, os.getpid(), level))
        self._proc.start()
        loop = asyncio.get_running_loop()
        died: asyncio.Future[None] = loop.create_future()
        loop.add_reader(self._proc.sentinel, _set_once, died)
        first = asyncio.ensure_future(self._out.recv())
        try:
            await asyncio.wait({first, died}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            loop.remove_reader(self._proc.sentinel)
        if not first.done():
            first.cancel()
            raise ValueError(f"the engine core exited while starting (exit code "
                             f"{self._exitcode()})")
        msg = self._dec.decode(first.result())
        if isinstance(msg, CoreFailed):
            self._proc.join(SHUTDOWN_JOIN_SECONDS)
            raise ValueError(msg.message)
        assert isinstance(msg, CoreReady), msg
        return msg

    def listen(self, on_output: Callable[[StepOutputs], None],
               on_dead: Callable[[str], None]) -> None:
        """After ``start``: hand every step to ``on_output``; ``on_dead(reason)`` once if the
        core dies unasked (a death since ``start`` is reported at once)."""
        assert self._proc is not None
        self._on_output, self._on_dead = on_output, on_dead
        asyncio.get_running_loop().add_reader(self._proc.sentinel, self._sentinel_fired)
        self._reader = asyncio.create_task(self._read(), name="tachyon-core-reader")

    def send(self, msg: CoreInput) -> None:
        if self.dead is None:
            self._inp.send(self._enc.encode(msg), zmq.NOBLOCK, copy=False)

    async def _read(self) -> None:
        while True:
            raw = await self._out.recv(copy=False)
            msg = self._dec.decode(raw.buffer)
            if isinstance(msg, StepOutputs):
                self._on_output(msg)
            elif isinstance(msg, CoreFailed):
                self._die(msg.message)
                return

    def _sentinel_fired(self) -> None:
        self._die(f"the engine core process died (exit code {self._exitcode()})")

    def _exitcode(self) -> int | None:
        assert self._proc is not None
        self._proc.join(0)
        return self._proc.exitcode

    def _die(self, reason: str, unexpected: bool = True) -> None:
        if self.dead is not None:
            return
        self.dead = reason
        if self._proc is not None:
            with contextlib.suppress(ValueError, OSError):  # loop closed or fd gone
                asyncio.get_running_loop().remove_reader(self._proc.sentinel)
        if unexpected:
            logger.error("%s", reason)
            self._on_dead(reason)

    async def shutdown(self) -> None:
        """Ask the core to stop after its step, wait for it, then make sure it is gone."""
        if self._reader is not None:
            self._reader.cancel()
        self._die("the engine core was shut down", unexpected=False)
        proc = self._proc
        if proc is not None and proc.is_alive():
            self._inp.send(self._enc.encode(Shutdown()), zmq.NOBLOCK)
            await asyncio.to_thread(proc.join, SHUTDOWN_JOIN_SECONDS)
            if proc.is_alive():
                proc.terminate()
                await asyncio.to_thread(proc.join, SHUTDOWN_JOIN_SECONDS)
            if proc.is_alive():
                proc.kill()
        self._inp.close(0)
        self._out.close(0)
        self._dir.cleanup()

    def kill(self) -> None:
        """Synchronous last resort (interpreter exit): the core must not outlive us."""
        if self._proc is not None and self._proc.is_alive():
            self._proc.kill()


def _ignore(_: object) -> None:
    pass


def _set_once(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)
