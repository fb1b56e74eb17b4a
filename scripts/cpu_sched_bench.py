"""Host cost of the scheduler per running request and step (issue 11: the served core was
host-bound at 8-10 ms a step with ~170-256 running on the H200). Builds the real Scheduler and
KV manager, admits B decoding requests, then times ``schedule()`` + ``update()`` with a fake
sampled token per request (no model), as the engine core calls them each step.

    python scripts/cpu_sched_bench.py --batch 256 --steps 400
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

from tachyon.config import EngineArgs
from tachyon.engine.kv_cache_manager import KVCacheManager
from tachyon.engine.request import Request
from tachyon.engine.scheduler import Scheduler
from tachyon.sampling_params import SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=5)
    ns = ap.parse_args()
    cfg = EngineArgs(model="qwen3-0.6b", load_format="dummy", device="cpu",
                     max_num_seqs=ns.batch).create_config()
    rng = random.Random(0)
    results = []
    for _ in range(ns.repeats):
        kv = KVCacheManager(200_000, 16, True)
        sched = Scheduler(cfg.scheduler, kv, 1 << 20, 0)
        params = SamplingParams(max_tokens=ns.steps + ns.batch, ignore_eos=True)
        for i in range(ns.batch):
            sched.add_request(Request(str(i), [rng.randrange(1, 30000)
                                               for _ in range(ns.prompt_len)],
                                      params, frozenset({0}), 0.0))
        while sched.num_waiting or any(r.num_computed_tokens < r.num_prompt_tokens
                                       for r in sched.running):  # prefill everything
            out = sched.schedule()
            sched.update(out, {s.request_id: 7 for s in out.requests if s.sample})
        times = []
        for _ in range(ns.steps):
            start = time.perf_counter()
            out = sched.schedule()
            sched.update(out, {s.request_id: 7 for s in out.requests if s.sample})
            times.append(time.perf_counter() - start)
            assert len(out.requests) == ns.batch, "every request decodes in every timed step"
        results.append(statistics.median(times))
    best = min(results)
    runs = [round(1e3 * r, 3) for r in results]
    print(f"B={ns.batch}: schedule+update {1e3 * best:.3f} ms/step "
          f"({1e6 * best / ns.batch:.2f} us per request), repeats {runs}")


if __name__ == "__main__":
    main()
