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

Where the parts live: ``rank_worker`` (a rank's runner and serve loop, the calls that travel
with the steps), ``supervisor`` (the driver's side of spawned ranks: start, watch, stop),
``spawned_worker`` (a spawned rank's process and rank 0's reply loop), ``torchrun`` (ranks
started by a launcher).
"""

from __future__ import annotations

import pickle
from typing import Any

import torch

from tachyon.config import EngineConfig
from tachyon.distributed.parallel_state import LaunchEnv
from tachyon.executor.rank_worker import RankCall
from tachyon.executor.supervisor import SpawnedRanks
from tachyon.executor.torchrun import LaunchedRank0, join_launched_world
from tachyon.loader.update import NamedTensors, WeightUpdateReport, named_tensor_list
from tachyon.lora.request import LoRARequest
from tachyon.step import ModelRunnerOutput, PendingResult, SchedulerOutput
from tachyon.worker.sleep import MemoryReport


class MultiprocExecutor:
    """The executor the engine uses for ``tensor_parallel_size > 1`` (interface of
    ``UniProcExecutor``)."""

    def __init__(self, config: EngineConfig) -> None:
        world = config.parallel.tensor_parallel_size
        launch = LaunchEnv.from_environ()
        if launch is None:
            self._ranks: SpawnedRanks | LaunchedRank0 = SpawnedRanks(config, world)
        else:
            self._ranks = join_launched_world(config, world, launch)
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
        if isinstance(self._ranks, LaunchedRank0):
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

