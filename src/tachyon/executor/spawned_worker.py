"""A spawned rank's process: set-up, the rank-0 loop that replies to the driver, the
watcher of device work, and the report of a failure (the driver's side: supervisor.py)."""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import os
import queue
import shutil
import signal
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any

import torch

from tachyon.config import EngineConfig
from tachyon.distributed.shm_broadcast import RingSpec, ShmBroadcastReader
from tachyon.executor.rank_worker import STOP, CallReply, TPWorker
from tachyon.worker.pending import PendingOutput

# Worker processes are named this plus their rank; the name reaches a spawned worker before
# it re-imports the main module (multiprocessing sets it first).
WORKER_NAME = "tachyon-tp"


@dataclass(frozen=True)
class RemoteError:
    """A worker's exception as text: the exception object itself may not unpickle here."""

    type_name: str
    message: str
    traceback: str
    bad_input: bool  # a ValueError: the driver re-raises it as one
    raised_at: float  # time.time() when caught: the ranks of one machine share its clock



def worker_main(config: EngineConfig, rank: int, world: int, store_dir: str, ring: RingSpec,
                 conn: Connection, log_level: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the driver's to handle
    _exit_with_parent(store_dir)
    init_method = "file://" + os.path.join(store_dir, "store")
    # force: a forked worker inherits the driver's handlers, which would keep its format.
    logging.basicConfig(level=log_level if rank == 0 else max(log_level, logging.WARNING),
                        format=f"%(levelname)s [tp{rank}] %(name)s: %(message)s", force=True)
    if config.device == "cpu":  # ranks share the cores
        torch.set_num_threads(max(1, torch.get_num_threads() // world))
    try:
        steps = ShmBroadcastReader(ring, rank)
        worker = TPWorker(config, rank, world, rank, init_method)
        conn.send(("ready", (worker.num_blocks, worker.startup_report, worker.graph_stats)))
        if rank == 0:
            drive(worker, steps, conn)
        else:
            worker.serve(steps.read)
        worker.close()
        code = 0
    except BaseException as e:
        _report(conn, e)
        code = 1
    # Skip the interpreter's teardown: it holds nothing of ours, takes seconds (torch and
    # transformers unloading) and, after a failure, may wait on a collective that never ends.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def drive(worker: TPWorker, steps: ShmBroadcastReader, conn: Connection) -> None:
    """Rank 0's loop: steps from the ring until the stop, and a reply per step to the driver,
    in order.

    A step that arrives while the last one still runs on the device is queued before the
    last one is finished, so the device never waits for this loop's host work. Between the
    two the loop sleeps on its doorbell, which the driver rings with each step and a watcher
    thread rings when the oldest step's device work ends: no polling.
    """
    inflight: deque[PendingOutput | CallReply] = deque()
    watcher = _DeviceWatcher(steps.wake)
    while True:
        payload = steps.try_read()
        if payload == STOP:
            return
        if payload is not None:
            inflight.append(worker.execute_async(payload))
        elif inflight and _device_done(inflight[0]):
            conn.send(("result", inflight.popleft().result()))
        else:
            if inflight:
                watcher.watch(inflight[0])
            steps.wait()


def _device_done(pending: PendingOutput | CallReply) -> bool:
    return pending.event is None or pending.event.query()


class _DeviceWatcher:
    """A thread that calls ``wake`` when a watched step's device work has ended (a CUDA
    event cannot be waited on together with a semaphore, so the wait gets its own thread).
    Watching the same step twice is a no-op; a wake for a step already handled is harmless
    (the loop finds nothing new and sleeps again)."""

    def __init__(self, wake: Callable[[], None]) -> None:
        self._wake = wake
        self._events: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._last: PendingOutput | CallReply | None = None
        self._thread: threading.Thread | None = None

    def watch(self, pending: PendingOutput | CallReply) -> None:
        if pending is self._last:
            return
        self._last = pending
        if self._thread is None:  # lazily: a CPU rank never needs it
            self._thread = threading.Thread(target=self._run, name="tachyon-tp-watch",
                                            daemon=True)
            self._thread.start()
        self._events.put(pending.event)

    def _run(self) -> None:
        while True:
            self._events.get().synchronize()  # releases the GIL while the device works
            self._wake()


def _report(conn: Connection, e: BaseException) -> None:
    err = RemoteError(type(e).__name__, str(e), traceback.format_exc(), isinstance(e, ValueError),
                       time.time())
    with contextlib.suppress(OSError):  # the driver is gone: nobody to tell
        conn.send(("error", err))


def _exit_with_parent(store_dir: str) -> None:
    """Leave at once if the driver dies (even by SIGKILL, which runs no finalizer), removing
    the rendezvous directory the driver can no longer remove."""
    parent = mp.parent_process()
    if parent is None:
        return

    def watch() -> None:
        wait([parent.sentinel])
        shutil.rmtree(store_dir, ignore_errors=True)
        os._exit(1)

    threading.Thread(target=watch, name="tachyon-parent-watch", daemon=True).start()
