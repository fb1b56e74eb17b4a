"""Ranks started by a launcher (``torchrun``): this process is one rank; rank 0 drives
in-process and broadcasts each step over the gloo control plane, every other rank serves
and then leaves the program (see docs/multi_node.md)."""

from __future__ import annotations

import logging
import os
import weakref

from tachyon.config import EngineConfig
from tachyon.distributed.parallel_state import LaunchEnv
from tachyon.executor.rank_worker import STOP, CallReply, TPWorker, check_gpus
from tachyon.worker.pending import PendingOutput

logger = logging.getLogger(__name__)


class LaunchedRank0:
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


def join_launched_world(config: EngineConfig, world: int, launch: LaunchEnv) -> LaunchedRank0:
    if launch.world_size != world:
        raise ValueError(
            f"the launcher started {launch.world_size} processes (WORLD_SIZE) but "
            f"tensor_parallel_size is {world}; they must be equal"
        )
    check_gpus(config, launch.local_rank + 1)
    worker = TPWorker(config, launch.rank, world, launch.local_rank, init_method=None)
    if launch.rank == 0:
        return LaunchedRank0(worker)
    logger.info("tensor-parallel rank %d of %d serves rank 0", launch.rank, world)
    worker.serve(lambda: worker.control.broadcast_bytes(None))
    worker.close()
    raise SystemExit(0)  # this rank's program is rank 0's: nothing of the caller's runs here


def _stop_launched(worker: TPWorker) -> None:
    """Rank 0 under a launcher: tell the other ranks to stop (once), then leave the world."""
    if worker.runner is not None:
        worker.control.broadcast_bytes(STOP)
    worker.close()

