"""One process per tensor-parallel rank (``tensor_parallel_size > 1``).

Every rank runs a ``TPWorker``: a ``ModelRunner`` that holds this rank's shard of the weights
and of the KV heads. Rank 0 drives: it takes each ``SchedulerOutput`` as bytes (pickled once),
broadcasts them to the other ranks over the gloo control plane, runs the step and returns the
sampled tokens. The other ranks run the same step from the same bytes and meet rank 0 in the
forward's all-reduces. Every rank samples from the same gathered logits with the same seeds;
only rank 0's tokens leave, but every rank holds the same ones on its device, which is what
asynchronous scheduling needs (step N+1 is queued, its inputs filled on the device from step
N's samples, before step N's tokens reach the host).

How the ranks start:

* **spawned** (one machine; the default). The engine's process is the driver and holds no
  process group. It starts N daemon workers (rank r on ``cuda:r``) that meet through a
  ``file://`` store in a fresh temp dir: no port, so engines never collide. Workers are
  forked while that is safe (CUDA not initialised in the driver), so a script without an
  ``if __name__ == "__main__":`` guard works; otherwise they are spawned, which re-imports
  the main module in every worker. The driver talks to rank 0 over a pipe and watches every
  worker: a rank that dies or raises becomes a ``RuntimeError`` in the driver at once, never
  a hang, carrying the rank's exception, or for a rank that died without one (a crash, a
  failure while a spawned worker imports the main module) the last lines of its stderr,
  which the driver relays. Workers leave when the driver shuts down, drops the executor or
  exits (a finalizer), or dies (pipe EOF and a parent watchdog).
* **torchrun** (any number of machines). RANK, WORLD_SIZE, LOCAL_RANK and MASTER_ADDR are
  set, so nothing is spawned: this process is rank RANK on ``cuda:LOCAL_RANK``. Rank 0 drives
  in-process; every other rank serves inside this constructor and, when rank 0 shuts down,
  leaves the program (``SystemExit(0)``). See docs/multi_node.md.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import multiprocessing as mp
import os
import pickle
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
from tachyon.executor.stderr_relay import StderrRelay
from tachyon.loader.update import NamedTensors, WeightUpdateReport, named_tensor_list
from tachyon.lora.request import LoRARequest
from tachyon.step import ModelRunnerOutput, PendingResult, SchedulerOutput
from tachyon.worker.model_runner import ModelRunner, PendingOutput
from tachyon.worker.sleep import MemoryReport

logger = logging.getLogger(__name__)

_STOP = pickle.dumps(None)  # the step that ends the serve loops
# A clean shutdown gets this long (NCCL teardown included) before the workers are killed.
SHUTDOWN_GRACE_S = 10.0
# How often rank 0 looks for the driver's next step while the device finishes the last one:
# short against a step (milliseconds), long enough not to busy-spin a core.
_POLL_INTERVAL_S = 50e-6
# After a first failure, how long to wait for the other ranks' reports, to name every cause.
FAILURE_SETTLE_S = 0.5
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
        """Rank 0: ship the pickled step (or ``RankCall``) to the other ranks, then queue it
        here (a call runs at once)."""
        self.control.broadcast_bytes(payload)
        msg = pickle.loads(payload)
        if isinstance(msg, RankCall):
            return msg.run(self.runner)
        return self.runner.execute_async(msg)

    def serve(self) -> None:
        """Ranks > 0: run what rank 0 broadcasts until it broadcasts the stop. Each step is
        queued before the previous one is finished, as on rank 0 (asynchronous scheduling
        fills a step's inputs on the device from the previous step's samples)."""
        prev: PendingOutput | None = None
        while (out := pickle.loads(self.control.broadcast_bytes(None))) is not None:
            if isinstance(out, RankCall):
                if prev is not None:
                    prev.result()
                    prev = None
                out.run(self.runner)  # rank 0 reports the outcome, the same on every rank
                continue
            pending = self.runner.execute_async(out)
            if prev is not None:
                prev.result()
            prev = pending

    def close(self) -> None:
        """Rank 0 tells the others to stop first; then every rank leaves the world."""
        if self.runner is None:
            return
        if self.rank == 0:
            self.control.broadcast_bytes(_STOP)
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
        self._finalizer = weakref.finalize(self, worker.close)

    def submit(self, payload: bytes) -> PendingOutput | CallReply:
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
    worker.serve()
    worker.close()
    raise SystemExit(0)  # this rank's program is rank 0's: nothing of the caller's runs here


def _check_gpus(config: EngineConfig, needed: int) -> None:
    if config.device == "cuda" and torch.cuda.device_count() < needed:
        raise ValueError(
            f"tensor parallelism here needs {needed} GPUs, {torch.cuda.device_count()} visible; "
            f"lower --tensor-parallel-size or start ranks on more machines (docs/multi_node.md)"
        )


# -- spawned workers: the driver's side ----------------------------------------------------------
class _SpawnedRanks:
    """N worker processes on this machine, and the pipes to them.

    Messages, worker to driver: ("ready", (num_blocks, report, graph stats)) once from each
    rank; ("result", ModelRunnerOutput) from rank 0 per step (a ``CallReply`` per
    ``RankCall``), in step order; ("error", _RemoteError) from a rank that fails, which then
    exits. Driver to rank 0: pickled steps and calls, ``_STOP`` at the end.
    """

    def __init__(self, config: EngineConfig, world: int) -> None:
        _check_not_in_a_worker()
        _check_gpus(config, world)
        ctx = mp.get_context(_start_method(config.device))
        self.store_dir = tempfile.mkdtemp(prefix="tachyon-tp-")  # where the ranks meet
        self.procs: list[mp.process.BaseProcess] = []
        self.conns: list[Connection] = []
        self._workers = _Workers(self.procs, self.conns, self.store_dir)
        self._finalizer = weakref.finalize(self, self._workers.shut_down)
        self.failure: str | None = None
        self._ended: set[int] = set()  # ranks whose error or death was reported
        self._sent = self._received = 0  # steps sent to rank 0, replies read
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
                ours, theirs = ctx.Pipe()
                p = ctx.Process(target=_worker_main, name=f"{_WORKER_NAME}{rank}", daemon=True,
                                args=(config, rank, world, self.store_dir, theirs, level))
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
        """Send a step to rank 0. Replies come back in the order the steps went out."""
        if self.failure is not None:
            raise RuntimeError(f"{self.failure} (the tensor-parallel workers are gone; "
                               f"start a new engine)")
        if not all(p.is_alive() for p in self.procs):
            self._fail([])
        try:
            self.conns[0].send_bytes(payload)
        except OSError:  # rank 0 is gone
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
        errors: list[tuple[int, _RemoteError]] = sorted(
            ((r, err) for r, kind, err in events if kind == "error"), key=lambda e: e[0])
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


@dataclass
class _Workers:
    """What the shutdown needs, apart from the executor (a finalizer must not hold it)."""

    procs: list[mp.process.BaseProcess]
    conns: list[Connection]
    store_dir: str
    serving: bool = False  # every rank started and none failed: a clean stop is possible

    def shut_down(self) -> None:
        """Ask rank 0 to stop (it tells the others), give them a grace, kill what is left."""
        grace = 0.0
        if self.serving and all(p.is_alive() for p in self.procs):
            try:
                self.conns[0].send_bytes(_STOP)
                grace = SHUTDOWN_GRACE_S
            except OSError:
                pass
        deadline = time.monotonic() + grace
        for p in self.procs:
            p.join(max(0.0, deadline - time.monotonic()))
        for p in self.procs:
            if p.is_alive():
                p.kill()
            p.join()
        for c in self.conns:
            c.close()
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
def _worker_main(config: EngineConfig, rank: int, world: int, store_dir: str,
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
        worker = TPWorker(config, rank, world, rank, init_method)
        conn.send(("ready", (worker.num_blocks, worker.startup_report, worker.graph_stats)))
        if rank == 0:
            _drive(worker, conn)
        else:
            worker.serve()
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


def _drive(worker: TPWorker, conn: Connection) -> None:
    """Rank 0's loop: steps from the driver's pipe until the stop or the driver's end (EOF).

    A step that arrives while the last one still runs on the device is queued before the
    last one is finished, so the device never waits for this loop's host work.
    """
    inflight: deque[PendingOutput] = deque()
    while True:
        if inflight and not _next_step_first(conn, inflight[0]):
            conn.send(("result", inflight.popleft().result()))
            continue
        try:
            payload = conn.recv_bytes()
        except EOFError:
            return
        if payload == _STOP:
            return
        inflight.append(worker.execute_async(payload))


def _next_step_first(conn: Connection, pending: PendingOutput) -> bool:
    """Wait until the driver's next step arrives (True) or ``pending`` is done (False)."""
    event = pending.event
    while event is not None and not event.query():
        if conn.poll():
            return True
        time.sleep(_POLL_INTERVAL_S)
    return conn.poll()


def _report(conn: Connection, e: BaseException) -> None:
    err = _RemoteError(type(e).__name__, str(e), traceback.format_exc(), isinstance(e, ValueError))
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
