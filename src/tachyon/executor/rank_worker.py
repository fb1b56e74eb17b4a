"""One tensor-parallel rank: its ``ModelRunner`` and control plane, the loop that serves
the steps it is sent, and the calls that travel with the steps."""

from __future__ import annotations

import gc
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from tachyon.config import EngineConfig
from tachyon.distributed.parallel_state import (
    default_backend,
    destroy_distributed,
    init_distributed,
)
from tachyon.worker.model_runner import ModelRunner
from tachyon.worker.pending import PendingOutput

STOP = pickle.dumps(None)  # the step that ends the serve loops


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
        while (payload := next_payload()) != STOP:
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
    event: None = None  # nothing on the device to wait for (rank 0's drive asks)

    def result(self) -> CallReply:
        return self



def check_gpus(config: EngineConfig, needed: int) -> None:
    if config.device == "cuda" and torch.cuda.device_count() < needed:
        raise ValueError(
            f"tensor parallelism here needs {needed} GPUs, {torch.cuda.device_count()} visible; "
            f"lower --tensor-parallel-size or start ranks on more machines (docs/multi_node.md)"
        )

