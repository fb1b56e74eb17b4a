"""A tensor-parallel decode step split into compute, communication and control.

    python scripts/gpu_tp_step_split.py --model qwen3-8b -tp 2 --batch 1 64 256 \
        --allreduce out/allreduce_tp2.json --json out/split.json

For each ``--batch`` size, in one engine: that many requests of ``--context`` random prompt
tokens (dummy weights) are prefilled, then ``--steps`` decode steps are timed on the driver,
then the requests are aborted. Measured per step:

* ``step_us``: the driver's ``engine.step()``, median;
* ``driver_control_us``: pickling the ``SchedulerOutput`` and writing it to the ring (the
  executor's ``execute_model_async``), mean; zero meaning at TP=1, where that call launches the
  step itself;
* ``rank_wait_us``: per rank, time spent waiting for its next step on the ring, mean (under
  asynchronous scheduling mostly overlapped with the previous step's device work).

Estimated from ``--allreduce`` (scripts/gpu_allreduce_bench.py at this TP size):
``comm_us`` = 2 all-reduces per layer x that message size's latency (graph replay, or eager
with ``--enforce-eager``); ``compute_us`` = what is left of the step. The LM head's gather
is not counted in ``comm_us``.
"""

from __future__ import annotations

import argparse
import bisect
import json
import random
import statistics
import time
from pathlib import Path
from typing import Any

from tachyon import LLM, SamplingParams


def _allreduce_us(table: dict[str, Any] | None, nbytes: int, graph: bool) -> float | None:
    """Latency of an all-reduce of ``nbytes``: the table's next size up (sizes double)."""
    if table is None:
        return None
    rows = table["sizes"]
    i = min(bisect.bisect_left([r["bytes"] for r in rows], nbytes), len(rows) - 1)
    return rows[i]["graph_us" if graph else "eager_us"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="qwen3-8b")
    p.add_argument("-tp", "--tensor-parallel-size", type=int, default=2)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 64, 256])
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--allreduce", default=None, metavar="JSON")
    p.add_argument("--json", default=None, metavar="PATH")
    ns = p.parse_args()
    llm = LLM(ns.model, load_format="dummy", tensor_parallel_size=ns.tensor_parallel_size,
              max_model_len=ns.context + ns.steps + 64, max_num_seqs=max(ns.batch),
              async_scheduling=ns.async_scheduling, enforce_eager=ns.enforce_eager)
    table = json.loads(Path(ns.allreduce).read_text()) if ns.allreduce else None
    control = [0.0]
    ex = llm.engine.executor
    submit = ex.execute_model_async

    def timed_submit(out: Any) -> Any:
        start = time.perf_counter()
        pending = submit(out)
        control[0] += time.perf_counter() - start
        return pending

    ex.execute_model_async = timed_submit  # the engine looks it up at each step
    reports = [_split(llm, ns, batch, table, control) for batch in ns.batch]
    print(json.dumps(reports, indent=1))
    if ns.json:
        Path(ns.json).write_text(json.dumps(reports, indent=1))
    llm.shutdown()


def _split(llm: LLM, ns: argparse.Namespace, batch: int, table: dict[str, Any] | None,
           control: list[float]) -> dict[str, Any]:
    eng, ex, tp = llm.engine, llm.engine.executor, ns.tensor_parallel_size
    rng = random.Random(batch)
    params = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=ns.steps + 32)
    ids = [f"b{batch}-{i}" for i in range(batch)]
    tokens0 = eng.stats["generation_tokens"]
    for rid in ids:
        eng.add_request(rid, [rng.randrange(eng.vocab_size) for _ in range(ns.context)], params)
    while eng.stats["generation_tokens"] - tokens0 < batch:  # every request past its prefill
        eng.step()
    for _ in range(5):
        eng.step()
    waits0, control[0] = _rank_waits(ex), 0.0
    step_s = []
    for _ in range(ns.steps):
        start = time.perf_counter()
        eng.step()
        step_s.append(time.perf_counter() - start)
    waits1 = _rank_waits(ex)
    eng.abort_request(ids)
    while eng.has_unfinished_requests():
        eng.step()
    hf = eng.core.config.model.hf_config
    nbytes = batch * hf.hidden_size * 2  # bfloat16 hidden states
    ar_us = _allreduce_us(table, nbytes, graph=not ns.enforce_eager) if tp > 1 else 0.0
    step_us = statistics.median(step_s) * 1e6
    comm_us = None if ar_us is None else 2 * hf.num_hidden_layers * ar_us
    driver_us = control[0] / ns.steps * 1e6 if tp > 1 else 0.0
    return {
        "model": ns.model, "tp": tp, "batch": batch, "context": ns.context,
        "async_scheduling": ns.async_scheduling, "enforce_eager": ns.enforce_eager,
        "step_us": step_us, "tok_per_s": batch / (step_us * 1e-6),
        "driver_control_us": driver_us,
        "rank_wait_us": None if waits0 is None else
        [(b - a) / ns.steps * 1e6 for a, b in zip(waits0, waits1, strict=True)],
        "allreduce_bytes": nbytes, "allreduce_us": ar_us, "comm_us": comm_us,
        "compute_us": None if comm_us is None else step_us - comm_us - driver_us,
    }


def _rank_waits(ex: Any) -> list[float] | None:
    return ex.rank_wait_s() if hasattr(ex, "rank_wait_s") else None


if __name__ == "__main__":
    main()
