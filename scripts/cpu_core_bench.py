"""Host cost of the engine core per running request and step, the model runner left out
(issue 11: the served core was host-bound on the H200). The real ``EngineCore`` (scheduler,
KV manager, ``_process``) and the core process's output message (``CoreLoop._outputs`` +
msgpack encode) around an executor that samples instantly, with asynchronous scheduling as
on CUDA; B decoding requests, median over the timed steps.

    python scripts/cpu_core_bench.py --batch 256 --steps 300
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from typing import Any

import msgspec

import tachyon.engine.core as core_mod
from tachyon.config import EngineArgs
from tachyon.engine.core import EngineCore
from tachyon.engine.core_proc import CoreLoop
from tachyon.engine.request import Request
from tachyon.sampling_params import SamplingParams
from tachyon.step import ModelRunnerOutput, SchedulerOutput


class _Done:
    def __init__(self, out: ModelRunnerOutput) -> None:
        self.out = out

    def result(self) -> ModelRunnerOutput:
        return self.out


class InstantExecutor:
    """Samples token 7 for every request that samples; no model."""

    num_blocks = 200_000

    def _run(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        ids = [s.request_id for s in sched.requests if s.sample]
        return ModelRunnerOutput(ids, [7] * len(ids))

    def execute_model(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        return self._run(sched)

    def execute_model_async(self, sched: SchedulerOutput) -> _Done:
        return _Done(self._run(sched))

    def shutdown(self) -> None:
        pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ns = ap.parse_args()
    core_mod._make_executor = lambda config: InstantExecutor()
    cfg = EngineArgs(model="qwen3-0.6b", load_format="dummy", device="cpu",
                     max_num_seqs=ns.batch, async_scheduling=True,
                     max_model_len=4096).create_config()
    enc = msgspec.msgpack.Encoder()
    rng = random.Random(0)
    best: dict[str, float] = {}
    for _ in range(ns.repeats):
        core = EngineCore(cfg)
        loop: Any = CoreLoop.__new__(CoreLoop)  # only its output builder is used
        loop.core, loop.step_seconds, loop.loop_seconds, loop.send_seconds = core, 0.0, 0.0, 0.0
        loop._lora_updates = []
        params = SamplingParams(max_tokens=ns.steps + ns.batch + 50, ignore_eos=True)
        for i in range(ns.batch):
            core.add_request(Request(str(i), [rng.randrange(1, 30000)
                                              for _ in range(ns.prompt_len)],
                                     params, frozenset({0}), 0.0))
        while core.scheduler.num_waiting or any(
                r.num_computed_tokens < r.num_prompt_tokens for r in core.scheduler.running):
            core.step()
        step_t, out_t = [], []
        for _ in range(ns.steps):
            t0 = time.perf_counter()
            events = core.step()
            t1 = time.perf_counter()
            enc.encode(loop._outputs(events, {}))
            t2 = time.perf_counter()
            assert len(events) == ns.batch, "every request decodes in every timed step"
            step_t.append(t1 - t0)
            out_t.append(t2 - t1)
        for name, ts in (("step", step_t), ("outputs", out_t)):
            best[name] = min(best.get(name, 1e9), statistics.median(ts))
        core.shutdown()
    total = best["step"] + best["outputs"]
    print(f"B={ns.batch}: core.step {1e3 * best['step']:.3f} ms + outputs "
          f"{1e3 * best['outputs']:.3f} ms = {1e3 * total:.3f} ms/step "
          f"({1e6 * total / ns.batch:.2f} us per request)")


if __name__ == "__main__":
    main()
