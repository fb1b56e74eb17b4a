"""The in-process executor: one rank, the model runner lives in this process."""

from __future__ import annotations

import atexit
import logging
import weakref

import torch

from tachyon.config import EngineConfig
from tachyon.loader.update import NamedTensors, WeightUpdateReport
from tachyon.lora.request import LoRARequest
from tachyon.step import ModelRunnerOutput, PendingResult, SchedulerOutput
from tachyon.worker.model_runner import ModelRunner
from tachyon.worker.sleep import MemoryReport

logger = logging.getLogger(__name__)


class UniProcExecutor:
    def __init__(self, config: EngineConfig) -> None:
        device = torch.device(config.device)
        if device.type == "cuda":
            torch.cuda.set_device(0)
        # As on every TP rank: requests without a seed of their own sample reproducibly
        # from the engine's --seed.
        torch.manual_seed(config.model.seed)
        self.runner = ModelRunner(config, device)
        self.num_blocks = self.runner.determine_num_blocks()
        self.runner.allocate_kv_cache(self.num_blocks)
        self.startup_report = self.runner.init_graphs()
        self.graph_stats = self.runner.graph_stats
        # Graphs must go before the CUDA allocator is torn down at interpreter exit.
        atexit.register(_shutdown_ref, weakref.ref(self))

    def execute_model(self, out: SchedulerOutput) -> ModelRunnerOutput:
        return self.runner.execute(out)

    def execute_model_async(self, out: SchedulerOutput) -> PendingResult:
        return self.runner.execute_async(out)

    def update_weights(self, named_tensors: NamedTensors,
                       count_unset: bool = False) -> WeightUpdateReport:
        return self.runner.update_weights(named_tensors, count_unset)

    def add_lora(self, lora_request: LoRARequest,
                 tensors: dict[str, torch.Tensor] | None = None) -> None:
        self.runner.add_lora(lora_request, tensors)

    def remove_lora(self, lora_int_id: int) -> bool:
        return self.runner.remove_lora(lora_int_id)

    def sleep(self, level: int) -> MemoryReport:
        return self.runner.sleep(level)

    def wake_up(self) -> MemoryReport:
        return self.runner.wake_up()

    def shutdown(self) -> None:
        """Drop the model, KV cache and graphs so their device memory can be reused."""
        if self.runner is None:
            return
        if self.runner.graph_runner is not None:
            self.runner.graph_runner.release()
            self.runner.graph_runner = None
        self.runner = None
        import gc

        import torch._dynamo

        torch._dynamo.reset()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _shutdown_ref(ref: weakref.ref) -> None:
    executor = ref()
    if executor is not None:
        executor.shutdown()
