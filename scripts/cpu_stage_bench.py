"""Host cost of the model runner's per-step staging and sampling inputs (issue 12: host work
on the hot path). Builds the real ModelRunner on the CPU over a tiny random Llama
(``tests/tachyon_testing.write_tiny_model``) and the real Scheduler, prefills B requests,
then runs B-request decode steps through ``ModelRunner.execute`` and times, per step, the
runner's host-side parts as the step calls them:

* ``stage``: ``_stage`` (request states, token/position/slot/block-table staging),
* ``sampling``: ``_sampling_metadata`` (parameters, penalty token histories),
* ``finish``: ``finish`` (sampled ids and logprobs read back into Python lists),

and, apart, ``sampler`` (the sampler's math, which is device work on a GPU). The forward
itself is not counted. Three workloads: plain (temperature 0.8), penalties (repetition,
frequency and presence), logprobs (5 per token).

    python scripts/cpu_stage_bench.py --batch 256 --steps 100
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from tachyon.config import EngineArgs
from tachyon.engine.kv_cache_manager import KVCacheManager
from tachyon.engine.request import Request
from tachyon.engine.scheduler import Scheduler
from tachyon.sampling_params import SamplingParams
from tachyon.worker.model_runner import ModelRunner
from tachyon_testing import write_tiny_model

WORKLOADS: dict[str, dict[str, Any]] = {
    "plain": {},
    "penalties": {"repetition_penalty": 1.2, "frequency_penalty": 0.3,
                  "presence_penalty": 0.2},
    "logprobs": {"logprobs": 5},
}


def _timed(fn: Callable[..., Any], into: list[float]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        result = fn(*args, **kwargs)
        into.append(time.perf_counter() - start)
        return result
    return wrapper


def run(model: str, workload: str, batch: int, steps: int, prompt_len: int) -> dict[str, float]:
    cfg = EngineArgs(model=model, device="cpu", dtype="float32", max_num_seqs=batch,
                     max_model_len=prompt_len + steps + 64, enforce_eager=True,
                     num_gpu_blocks_override=batch * ((prompt_len + steps + 64) // 16 + 2),
                     ).create_config()
    runner = ModelRunner(cfg, torch.device("cpu"))
    runner.allocate_kv_cache(cfg.cache.num_gpu_blocks_override)
    runner.init_graphs()
    times: dict[str, list[float]] = defaultdict(list)
    runner._stage = _timed(runner._stage, times["stage"])
    runner._sampling_metadata = _timed(runner._sampling_metadata, times["sampling"])
    runner.finish = _timed(runner.finish, times["finish"])
    runner.sampler.forward = _timed(runner.sampler.forward, times["sampler"])
    kv = KVCacheManager(runner.num_blocks, cfg.cache.block_size, False)
    sched = Scheduler(cfg.scheduler, kv, cfg.model.max_model_len, 0)
    params = SamplingParams(max_tokens=steps + 8, ignore_eos=True, temperature=0.8, seed=None,
                            **WORKLOADS[workload])
    gen = torch.Generator().manual_seed(0)
    for i in range(batch):
        prompt = torch.randint(3, 500, (prompt_len,), generator=gen).tolist()
        sched.add_request(Request(str(i), prompt, params, frozenset({2}), 0.0))

    def step() -> int:
        out = sched.schedule()
        res = runner.execute(out)
        sched.update(out, dict(zip(res.request_ids, res.sampled_token_ids, strict=True)))
        return len(out.requests)

    while sched.num_waiting or any(r.num_computed_tokens < r.num_prompt_tokens
                                   for r in sched.running):  # prefill everything
        step()
    for v in times.values():
        v.clear()
    for _ in range(steps):
        assert step() == batch, "every request decodes in every timed step"
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ns = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        model = str(write_tiny_model(Path(tmp), "llama"))
        for workload in ns.workloads.split(","):
            best: dict[str, float] = {}
            for _ in range(ns.repeats):
                for k, v in run(model, workload, ns.batch, ns.steps, ns.prompt_len).items():
                    best[k] = min(best.get(k, float("inf")), v)
            host = best["stage"] + best["sampling"] + best["finish"]
            parts = "  ".join(f"{k} {1e6 * v:.0f}" for k, v in best.items())
            print(f"B={ns.batch} {workload:9s}: host {1e6 * host:.0f} us/step  ({parts}; "
                  f"median per step, best of {ns.repeats})", flush=True)


if __name__ == "__main__":
    main()
