"""The driver's side of spawned ranks on one machine: start them (fork while that is
safe, else spawn), send them steps through the ring, read rank 0's replies, watch every
rank, and stop them (the worker's side: spawned_worker.py)."""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import shutil
import signal
import sys
import tempfile
import textwrap
import time
import weakref
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any

from tachyon.config import EngineConfig
from tachyon.distributed.shm_broadcast import RingSpec, ShmBroadcastWriter
from tachyon.executor.rank_worker import STOP, check_gpus
from tachyon.executor.spawned_worker import WORKER_NAME, RemoteError, worker_main
from tachyon.executor.stderr_relay import StderrRelay
from tachyon.step import ModelRunnerOutput

# A clean shutdown gets this long (NCCL teardown included) before the workers are killed.
SHUTDOWN_GRACE_S = 10.0
# After a first failure, how long to wait for the other ranks' reports, to name every cause.
FAILURE_SETTLE_S = 0.5
# The ring's directory also takes the side files of steps over a slot (weight updates
# included): a container's default 64 MiB /dev/shm is too small for those.
_MIN_TMPFS_BYTES = 8 << 30


class SpawnedRanks:
    """N worker processes on this machine: the ring to all of them, a pipe from each.

    Messages, worker to driver: ("ready", (num_blocks, report, graph stats)) once from each
    rank; ("result", ModelRunnerOutput) from rank 0 per step (a ``CallReply`` per
    ``RankCall``), in step order; ("error", RemoteError) from a rank that fails, which then
    exits. Driver to every rank, through the ring: pickled steps and calls, ``STOP`` at the
    end.
    """

    def __init__(self, config: EngineConfig, world: int) -> None:
        _check_not_in_a_worker()
        check_gpus(config, world)
        ctx = mp.get_context(_start_method(config.device))
        # Where the ranks meet and the ring lives: a tmpfs, so the ring is memory, not disk.
        self.store_dir = tempfile.mkdtemp(prefix="tachyon-tp-", dir=_tmpfs_dir())
        self.procs: list[mp.process.BaseProcess] = []
        self.conns: list[Connection] = []
        self.ring = RingSpec.create(ctx, self.store_dir, num_readers=world)
        self.writer = ShmBroadcastWriter(self.ring)
        self._workers = _Workers(self.procs, self.conns, self.store_dir, self.writer)
        self._finalizer = weakref.finalize(self, self._workers.shut_down)
        self.failure: str | None = None
        self._ended: set[int] = set()  # ranks whose error or death was reported
        self._sent = self._received = 0  # steps sent to the ranks, replies read
        self._unclaimed: dict[int, ModelRunnerOutput] = {}
        self._stderr: list[StderrRelay] = []
        try:
            self._start_workers(ctx, config, world)
            self.num_blocks, self.startup_report, self.graph_stats = self._await_ready()
            self._workers.serving = True
        except BaseException:
            self.close()
            raise

    def _start_workers(self, ctx: Any, config: EngineConfig, world: int) -> None:
        level = logging.getLogger().getEffectiveLevel()
        try:
            for rank in range(world):
                ours, theirs = ctx.Pipe(duplex=False)  # replies and errors only
                p = ctx.Process(target=worker_main, name=f"{WORKER_NAME}{rank}", daemon=True,
                                args=(config, rank, world, self.store_dir, self.ring, theirs,
                                      level))
                self._stderr.append(StderrRelay(p))
                theirs.close()
                self.procs.append(p)
                self.conns.append(ours)
        finally:
            # Relay threads only after the last fork: a child would inherit any lock one of
            # them held at the moment (fork copies memory, not threads).
            for relay in self._stderr:
                relay.start()

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def submit(self, payload: bytes) -> _RemotePending:
        """Publish a step to every rank. Replies come back in the order the steps went out."""
        if self.failure is not None:
            raise RuntimeError(f"{self.failure} (the tensor-parallel workers are gone; "
                               f"start a new engine)")
        if self._workers.any_dead() or not self.writer.write(payload, self._workers.any_dead):
            self._fail([])
        self._sent += 1
        return _RemotePending(self, self._sent - 1)

    def result(self, seq: int) -> ModelRunnerOutput:
        """Rank 0's reply to step ``seq``; replies to earlier steps are kept for their
        owners (or dropped with this object if a caller gave up on them, e.g. Ctrl-C)."""
        if seq in self._unclaimed:
            return self._unclaimed.pop(seq)
        while True:
            out = self._await_result()
            self._received += 1
            if self._received - 1 == seq:
                return out
            self._unclaimed[self._received - 1] = out

    def close(self) -> None:
        self.failure = self.failure or "the engine was shut down"
        self._finalizer()

    # -- waiting on the workers ----------------------------------------------------------------
    def _await_ready(self) -> tuple[int, str, dict[str, Any]]:
        first: tuple[int, str, dict[str, Any]] | None = None
        waiting = set(range(len(self.procs)))
        while waiting:
            rank, kind, body = self._next_event()
            if kind != "ready":
                self._fail([(rank, kind, body)], starting=True)
            waiting.discard(rank)
            if rank == 0:
                first = body
        assert first is not None
        return first

    def _await_result(self) -> ModelRunnerOutput:
        rank, kind, body = self._next_event()
        if kind != "result":
            self._fail([(rank, kind, body)])
        return body

    def _next_event(self, timeout: float | None = None) -> tuple[int, str, Any]:
        """The next message from a rank, (rank, "died", exit code) for a rank that ended
        without one, or (-1, "timeout", None) after ``timeout`` seconds or with no rank left.
        A rank's end (its error or its death) is reported once."""
        live = [r for r in range(len(self.procs)) if r not in self._ended]
        while live:
            for r in live:
                if self.conns[r].poll():  # messages first: a failing rank reports, then exits
                    try:
                        kind, body = self.conns[r].recv()
                    except (EOFError, OSError):
                        self._ended.add(r)
                        self.procs[r].join(FAILURE_SETTLE_S)  # pipe closed: it is ending
                        return r, "died", self.procs[r].exitcode
                    if kind == "error":
                        self._ended.add(r)
                    return r, kind, body
            for r in live:
                if not self.procs[r].is_alive():
                    self._ended.add(r)
                    return r, "died", self.procs[r].exitcode
            ready = wait([self.conns[r] for r in live] + [self.procs[r].sentinel for r in live],
                         timeout)
            if not ready:
                break
        return -1, "timeout", None

    def _fail(self, events: list[tuple[int, str, Any]], starting: bool = False) -> None:
        """Gather the other ranks' reports for a moment, stop every worker, and raise one
        error naming each failed rank, deaths first (peers' errors usually follow from them).
        """
        deadline = time.monotonic() + FAILURE_SETTLE_S
        while (left := deadline - time.monotonic()) > 0:
            rank, kind, body = self._next_event(timeout=left)
            if kind == "timeout":
                break
            events.append((rank, kind, body))
        self._workers.serving = False  # no clean stop: ranks may be stuck in a collective
        self._finalizer()
        deaths = sorted((r, code) for r, kind, code in events if kind == "died")
        # Earliest raised first: that is the cause; peers stuck in a collective with the
        # failed rank raise only after it has gone.
        errors: list[tuple[int, RemoteError]] = sorted(
            ((r, err) for r, kind, err in events if kind == "error"), key=lambda e: e[1].raised_at)
        if starting and errors and errors[0][1].bad_input:
            # e.g. heads not divisible by the TP size: the ValueError a user can act on
            raise ValueError(f"{errors[0][1].message} (tensor-parallel rank {errors[0][0]})")
        parts = [f"tensor-parallel worker rank {r} died ({_describe_exit(code)})"
                 for r, code in deaths]
        parts += [f"tensor-parallel worker rank {r} failed: {e.type_name}: {e.message}"
                  for r, e in errors]
        self.failure = "; ".join(parts) or "tensor-parallel workers stopped"
        # A death is the cause and peers' errors its echo; otherwise the first error is.
        if deaths:
            detail = self._stderr_tails([r for r, _ in deaths])
        elif errors:
            detail = f"\n\nrank {errors[0][0]} {errors[0][1].traceback}"
        else:
            detail = ""
        raise RuntimeError(self.failure + detail)

    def _stderr_tails(self, ranks: list[int]) -> str:
        """What dead ranks wrote last: for one that died without reporting (a crash, or a
        spawned worker failing to import the main module) the only trace of the cause. A
        tail several ranks share is shown once."""
        text, shown = "", None
        for r in ranks:
            tail = self._stderr[r].tail(FAILURE_SETTLE_S)
            if not tail:
                text += f"\n\nrank {r} wrote nothing to stderr"
            elif tail == shown:
                text += f"\n\nrank {r} wrote the same last lines"
            else:
                text += f"\n\nrank {r}'s last stderr lines:\n" + textwrap.indent(tail, "    ")
                shown = tail
        return text


def _tmpfs_dir() -> str | None:
    """``/dev/shm`` where it is a writable directory with room (Linux), else the default temp
    dir (still page cache, so the ring runs at memory speed there too)."""
    shm = "/dev/shm"
    if not (os.path.isdir(shm) and os.access(shm, os.W_OK)):
        return None
    st = os.statvfs(shm)
    return shm if st.f_bavail * st.f_frsize >= _MIN_TMPFS_BYTES else None


def _start_method(device: str) -> str:
    """``fork`` where it is safe, else ``spawn``.

    A forked worker starts from this process's memory: no re-import of torch (seconds per
    rank) and no re-run of the main module, which a script without a ``__main__`` guard
    needs. A forked child cannot use CUDA once its parent has initialised the CUDA driver
    (any CUDA call does, ``torch.cuda.is_available()`` included), and macOS system libraries
    are not fork-safe: spawn there.
    """
    if sys.platform != "linux" or (device == "cuda" and _cuda_driver_loaded()):
        return "spawn"
    return "fork"


def _cuda_driver_loaded() -> bool:
    # The CUDA runtime loads libcuda at its first call and initialises it (cuInit) then;
    # torch.cuda.is_initialized() only knows of torch's own, later, initialisation.
    with open("/proc/self/maps") as maps:
        return "libcuda.so" in maps.read()


def _check_not_in_a_worker() -> None:
    """A worker never builds an engine: if one tries, it is a spawned worker re-running the
    caller's unguarded main module. Say what to change (the driver shows this rank's stderr).
    """
    if mp.current_process().name.startswith(WORKER_NAME):
        raise RuntimeError(
            "a tensor-parallel worker is re-running your main module, which builds an engine "
            "when imported. The workers were spawned (this process had initialised CUDA "
            "before the engine was created, or this is not Linux), and spawn imports the main "
            'module in every worker. Put the script\'s code under `if __name__ == "__main__":`'
        )


class _RemotePending:
    """A step on its way through the workers (the spawned twin of ``PendingOutput``)."""

    def __init__(self, ranks: SpawnedRanks, seq: int) -> None:
        self.ranks, self.seq = ranks, seq
        self._result: ModelRunnerOutput | None = None

    def result(self) -> ModelRunnerOutput:
        if self._result is None:
            self._result = self.ranks.result(self.seq)
        return self._result


@dataclass
class _Workers:
    """What the shutdown needs, apart from the executor (a finalizer must not hold it)."""

    procs: list[mp.process.BaseProcess]
    conns: list[Connection]
    store_dir: str
    writer: ShmBroadcastWriter
    serving: bool = False  # every rank started and none failed: a clean stop is possible

    def any_dead(self) -> bool:
        return not all(p.is_alive() for p in self.procs)

    def shut_down(self) -> None:
        """Tell the ranks to stop, give them a grace, kill what is left."""
        grace = 0.0
        if self.serving and not self.any_dead():
            # A full ring means a rank stopped reading: then there is no clean stop to wait for.
            give_up = time.monotonic() + SHUTDOWN_GRACE_S
            if self.writer.write(STOP, lambda: self.any_dead() or time.monotonic() > give_up):
                grace = SHUTDOWN_GRACE_S
        deadline = time.monotonic() + grace
        for p in self.procs:
            p.join(max(0.0, deadline - time.monotonic()))
        for p in self.procs:
            if p.is_alive():
                p.kill()
            p.join()
        for c in self.conns:
            c.close()
        self.writer.close()
        shutil.rmtree(self.store_dir, ignore_errors=True)


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "exit code unknown"
    if code < 0:
        try:
            return f"exit code {code}, {signal.Signals(-code).name}"
        except ValueError:
            pass
    return f"exit code {code}"

