"""One process per tensor-parallel rank (``tensor_parallel_size > 1``).

Every rank runs a ``TPWorker``: a ``ModelRunner`` that holds this rank's shard of the weights
and of the KV heads. Each ``SchedulerOutput`` is pickled once by the driver and reaches every
rank through one shared-memory ring (``distributed/shm_broadcast.py``); every rank runs the
step from the same bytes, and the ranks meet in the forward's all-reduces. Rank 0 returns the
sampled tokens. Every rank samples from the same gathered logits with the same seeds; only
rank 0's tokens leave, but every rank holds the same ones on its device, which is what
asynchronous scheduling needs (step N+1 is queued, its inputs filled on the device from step
N's samples, before step N's tokens reach the host).

How the ranks start:

* **spawned** (one machine; the default). The engine's process is the driver and holds no
  process group. It starts N daemon workers (rank r on ``cuda:r``) that meet through a
  ``file://`` store in a fresh temp dir: no port, so engines never collide. Workers are
  forked while that is safe (CUDA not initialised in the driver), so a script without an
  ``if __name__ == "__main__":`` guard works; otherwise they are spawned, which re-imports
  the main module in every worker. The driver writes steps to the ring, reads rank 0's
  replies from a pipe and watches every worker: a rank that dies or raises becomes a
  ``RuntimeError`` in the driver at once, never a hang, carrying the rank's exception, or
  for a rank that died without one (a crash, a failure while a spawned worker imports the
  main module) the last lines of its stderr, which the driver relays. Workers leave when the
  driver shuts down, drops the executor or exits (a finalizer), or dies (a parent watchdog).
* **torchrun** (any number of machines). RANK, WORLD_SIZE, LOCAL_RANK and MASTER_ADDR are
  set, so nothing is spawned: this process is rank RANK on ``cuda:LOCAL_RANK``. Rank 0 drives
  in-process and broadcasts each step over the gloo control plane (the ranks may be on other
  machines, out of the ring's reach); every other rank serves inside this constructor and,
  when rank 0 shuts down, leaves the program (``SystemExit(0)``). See docs/multi_node.md.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import multiprocessing as mp
import os
import pickle
import queue
import shutil
import signal
import sys
import tempfile
import textwrap
import threading
import time
import traceback
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any

import torch

from tachyon.config import EngineConfig
from tachyon.distributed.parallel_state import (
    LaunchEnv,
    default_backend,
    destroy_distributed,
    init_distributed,
)
from tachyon.distributed.shm_broadcast import RingSpec, ShmBroadcastReader, ShmBroadcastWriter
from tachyon.executor.stderr_relay import StderrRelay
from tachyon.loader.update import NamedTensors, WeightUpdateReport, named_tensor_list
from tachyon.lora.request import LoRARequest
from tachyon.step import ModelRunnerOutput, PendingResult, SchedulerOutput
from tachyon.worker.model_runner import ModelRunner
from tachyon.worker.pending import PendingOutput
from tachyon.worker.sleep import MemoryReport

logger = logging.getLogger(__name__)

_STOP = pickle.dumps(None)  # the step that ends the serve loops
# A clean shutdown gets this long (NCCL teardown included) before the workers are killed.
SHUTDOWN_GRACE_S = 10.0
# After a first failure, how long to wait for the other ranks' reports, to name every cause.
FAILURE_SETTLE_S = 0.5
# The ring's directory also takes the side files of steps over a slot (weight updates
# included): a container's default 64 MiB /dev/shm is too small for those.
_MIN_TMPFS_BYTES = 8 << 30
# Worker processes are named this plus their rank; the name reaches a spawned worker before
# it re-imports the main module (multiprocessing sets it first).
_WORKER_NAME = "tachyon-tp"


class TPWorker:
    """One rank: its runner, and the control plane to the other ranks."""

    def __init__(self, config: EngineConfig, rank: int, world_size: int, local_rank: int,
                 init_method: str | None) -> None:
        device = torch.device("cuda", local_rank) if config.device == "cuda" \
            else torch.device("cpu")
        backend = config.parallel.distributed_backend or default_backend(device)
        self.rank = rank
        self.control = init_distributed(rank, world_size, device, backend, init_method)
        # One default generator state everywhere: unseeded sampling draws the same tokens.
        torch.manual_seed(config.model.seed)
        self.runner: ModelRunner | None = ModelRunner(config, device)
        self.num_blocks = self.control.min_int(self.runner.determine_num_blocks())
        self.runner.allocate_kv_cache(self.num_blocks)
        self.startup_report = f"{self.runner.init_graphs()} tp={world_size}"
        self.graph_stats = {**self.runner.graph_stats, "tp": world_size}

    def execute_async(self, payload: bytes) -> PendingOutput | CallReply:
        """Queue a pickled step here, or run a ``RankCall`` at once."""
        msg = pickle.loads(payload)
        if isinstance(msg, RankCall):
            return msg.run(self.runner)
        return self.runner.execute_async(msg)

    def serve(self, next_payload: Callable[[], bytes]) -> None:
        """Ranks > 0: run the steps ``next_payload`` returns until the stop. Each step is
        queued before the previous one is finished, as on rank 0 (asynchronous scheduling
        fills a step's inputs on the device from the previous step's samples)."""
        prev: PendingOutput | None = None
        while (payload := next_payload()) != _STOP:
            msg = pickle.loads(payload)
            if isinstance(msg, RankCall):
                if prev is not None:
                    prev.result()
                    prev = None
                msg.run(self.runner)  # rank 0 reports the outcome, the same on every rank
                continue
            pending = self.runner.execute_async(msg)
            if prev is not None:
                prev.result()
            prev = pending

    def close(self) -> None:
        """Leave the world (the ranks were told to stop, or are being stopped)."""
        if self.runner is None:
            return
        # Graphs and KV cache go before the communicator their collectives use.
        if self.runner.graph_runner is not None:
            self.runner.graph_runner.release()
        self.runner = None
        gc.collect()
        destroy_distributed()


class MultiprocExecutor:
    """The executor the engine uses for ``tensor_parallel_size > 1`` (interface of
    ``UniProcExecutor``)."""

    def __init__(self, config: EngineConfig) -> None:
        world = config.parallel.tensor_parallel_size
        launch = LaunchEnv.from_environ()
        if launch is None:
            self._ranks: _SpawnedRanks | _LaunchedRank0 = _SpawnedRanks(config, world)
        else:
            self._ranks = _join_launched_world(config, world, launch)
        self.num_blocks = self._ranks.num_blocks
        self.startup_report = self._ranks.startup_report
        self.graph_stats = self._ranks.graph_stats  # rank 0's

    @property
    def worker_pids(self) -> list[int]:
        """Process ids of the ranks, rank 0 first."""
        return self._ranks.pids

    def rank_wait_s(self) -> list[float] | None:
        """Per rank, the seconds it has spent waiting for steps from the ring so far (the
        control part of a step-time split); None under a launcher (no ring)."""
        if isinstance(self._ranks, _LaunchedRank0):
            return None
        return [self._ranks.writer.reader_wait_s(r) for r in range(len(self._ranks.procs))]

    def execute_model(self, out: SchedulerOutput) -> ModelRunnerOutput:
        return self.execute_model_async(out).result()

    def execute_model_async(self, out: SchedulerOutput) -> PendingResult:
        """Queue a step on every rank; ``result()`` waits for rank 0's sampled tokens."""
        return self._ranks.submit(pickle.dumps(out, protocol=pickle.HIGHEST_PROTOCOL))

    def update_weights(self, named_tensors: NamedTensors,
                       count_unset: bool = False) -> WeightUpdateReport:
        """Every rank gets the full tensors (through host memory, pickled) and shards them
        itself, as when loading."""
        host = [(name, t.cpu()) for name, t in named_tensor_list(named_tensors)]
        return self._call(RankCall("update_weights", (host, count_unset)))

    def add_lora(self, lora_request: LoRARequest,
                 tensors: dict[str, torch.Tensor] | None = None) -> None:
        """Every rank reads the adapter (or gets the tensors through host memory) and
        shards it itself."""
        host = None if tensors is None else {k: t.detach().cpu() for k, t in tensors.items()}
        self._call(RankCall("add_lora", (lora_request, host)))

    def remove_lora(self, lora_int_id: int) -> bool:
        return self._call(RankCall("remove_lora", (lora_int_id,)))

    def sleep(self, level: int) -> MemoryReport:
        return self._call(RankCall("sleep", (level,)))

    def wake_up(self) -> MemoryReport:
        return self._call(RankCall("wake_up"))

    def _call(self, call: RankCall) -> Any:
        """Run a runner method on every rank, in order with the steps; rank 0's result."""
        reply = self._ranks.submit(pickle.dumps(call, protocol=pickle.HIGHEST_PROTOCOL)).result()
        if reply.error is not None:
            raise ValueError(reply.error)
        return reply.value

    def shutdown(self) -> None:
        self._ranks.close()


@dataclass(frozen=True)
class RankCall:
    """A ``ModelRunner`` method every rank runs between steps (``update_weights``, ``sleep``,
    ``wake_up``). It travels the steps' path, so it runs after the steps sent before it."""

    method: str
    args: tuple[Any, ...] = ()

    def run(self, runner: ModelRunner) -> CallReply:
        try:
            return CallReply(getattr(runner, self.method)(*self.args))
        except ValueError as e:
            # Bad input (an unknown weight name, a wrong shape): every rank sees the same
            # input and rejects it alike, before changing anything, and the engine goes on.
            # Any other exception ends the rank, which the driver reports.
            return CallReply(None, str(e))


@dataclass(frozen=True)
class CallReply:
    """A ``RankCall``'s outcome; finished when made (the twin of a step's pending output)."""

    value: Any
    error: str | None = None  # a ValueError's message, re-raised in the driver
    event: None = None  # nothing on the device to wait for (rank 0's _drive asks)

    def result(self) -> CallReply:
        return self


# -- torchrun ----------------------------------------------------------------------------------
class _LaunchedRank0:
    """Rank 0 under a launcher: its worker lives in the driver's own process."""

    def __init__(self, worker: TPWorker) -> None:
        self.worker = worker
        self.num_blocks, self.startup_report = worker.num_blocks, worker.startup_report
        self.graph_stats = worker.graph_stats
        self.pids = [os.getpid()]
        # At exit too: the other ranks must hear the stop, or they wait out their timeout.
        self._finalizer = weakref.finalize(self, _stop_launched, worker)

    def submit(self, payload: bytes) -> PendingOutput | CallReply:
        self.worker.control.broadcast_bytes(payload)
        return self.worker.execute_async(payload)

    def close(self) -> None:
        self._finalizer()


def _join_launched_world(config: EngineConfig, world: int, launch: LaunchEnv) -> _LaunchedRank0:
    if launch.world_size != world:
        raise ValueError(
            f"the launcher started {launch.world_size} processes (WORLD_SIZE) but "
            f"tensor_parallel_size is {world}; they must be equal"
        )
    _check_gpus(config, launch.local_rank + 1)
    worker = TPWorker(config, launch.rank, world, launch.local_rank, init_method=None)
    if launch.rank == 0:
        return _LaunchedRank0(worker)
    logger.info("tensor-parallel rank %d of %d serves rank 0", launch.rank, world)
    worker.serve(lambda: worker.control.broadcast_bytes(None))
    worker.close()
    raise SystemExit(0)  # this rank's program is rank 0's: nothing of the caller's runs here


def _stop_launched(worker: TPWorker) -> None:
    """Rank 0 under a launcher: tell the other ranks to stop (once), then leave the world."""
    if worker.runner is not None:
        worker.control.broadcast_bytes(_STOP)
    worker.close()


def _check_gpus(config: EngineConfig, needed: int) -> None:
    if config.device == "cuda" and torch.cuda.device_count() < needed:
        raise ValueError(
            f"tensor parallelism here needs {needed} GPUs, {torch.cuda.device_count()} visible; "
            f"lower --tensor-parallel-size or start ranks on more machines (docs/multi_node.md)"
        )


# -- spawned workers: the driver's side ----------------------------------------------------------
class _SpawnedRanks:
    """N worker processes on this machine: the ring to all of them, a pipe from each.

    Messages, worker to driver: ("ready", (num_blocks, report, graph stats)) once from each
    rank; ("result", ModelRunnerOutput) from rank 0 per step (a ``CallReply`` per
    ``RankCall``), in step order; ("error", _RemoteError) from a rank that fails, which then
    exits. Driver to every rank, through the ring: pickled steps and calls, ``_STOP`` at the
    end.
    """

    def __init__(self, config: EngineConfig, world: int) -> None:
        _check_not_in_a_worker()
        _check_gpus(config, world)
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
                p = ctx.Process(target=_worker_main, name=f"{_WORKER_NAME}{rank}", daemon=True,
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
        errors: list[tuple[int, _RemoteError]] = sorted(
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
    if mp.current_process().name.startswith(_WORKER_NAME):
        raise RuntimeError(
            "a tensor-parallel worker is re-running your main module, which builds an engine "
            "when imported. The workers were spawned (this process had initialised CUDA "
            "before the engine was created, or this is not Linux), and spawn imports the main "
            'module in every worker. Put the script\'s code under `if __name__ == "__main__":`'
        )


class _RemotePending:
    """A step on its way through the workers (the spawned twin of ``PendingOutput``)."""

    def __init__(self, ranks: _SpawnedRanks, seq: int) -> None:
        self.ranks, self.seq = ranks, seq
        self._result: ModelRunnerOutput | None = None

    def result(self) -> ModelRunnerOutput:
        if self._result is None:
            self._result = self.ranks.result(self.seq)
        return self._result


@dataclass(frozen=True)
class _RemoteError:
    """A worker's exception as text: the exception object itself may not unpickle here."""

    type_name: str
    message: str
    traceback: str
    bad_input: bool  # a ValueError: the driver re-raises it as one
    raised_at: float  # time.time() when caught: the ranks of one machine share its clock


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
            if self.writer.write(_STOP, lambda: self.any_dead() or time.monotonic() > give_up):
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


# -- spawned workers: the worker's side ----------------------------------------------------------
def _worker_main(config: EngineConfig, rank: int, world: int, store_dir: str, ring: RingSpec,
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
            _drive(worker, steps, conn)
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


def _drive(worker: TPWorker, steps: ShmBroadcastReader, conn: Connection) -> None:
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
        if payload == _STOP:
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
        self._last: object | None = None
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
    err = _RemoteError(type(e).__name__, str(e), traceback.format_exc(), isinstance(e, ValueError),
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
