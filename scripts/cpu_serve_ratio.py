"""Server TPOT over offline decode step time at the same batch, on CPU (issue 11's check).

1. Offline: ``LLMEngine`` decodes B requests of ``--input-len`` tokens; the mean step time of
   the steps where all B decode together.
2. Served: ``tachyon serve`` with the same engine flags, ``tachyon bench serve`` with
   ``--max-concurrency B`` (waves of B requests of the same lengths), mean TPOT.
3. Optionally (``--profile PATH``) a second served run with the API process under cProfile,
   summarised per engine step.

    python scripts/cpu_serve_ratio.py --batch 32 --input-len 64 --output-len 32 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import pstats
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ENGINE_FLAGS = ["--device", "cpu", "--kv-cache-memory", "1GiB"]
# As the CLI does for the server: idle OpenMP threads sleep rather than spin, which on a
# shared CPU would starve the threads doing the work (and make the offline figure 10x slower).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def offline_step_ms(ns: argparse.Namespace) -> tuple[float, float]:
    from tachyon.config import EngineArgs
    from tachyon.engine.llm_engine import LLMEngine
    from tachyon.sampling_params import SamplingParams

    engine = LLMEngine.from_engine_args(EngineArgs(model=ns.model, device="cpu",
                                                   kv_cache_memory="1GiB"))
    rng = random.Random(0)
    params = SamplingParams(max_tokens=ns.output_len, ignore_eos=True, temperature=0.0)
    for i in range(ns.batch):
        engine.add_request(str(i), [rng.randrange(10, 10000) for _ in range(ns.input_len)],
                           params)
    times = []
    while engine.has_unfinished_requests():
        start = time.perf_counter()
        engine.step()
        uniform = engine.scheduler.num_running == ns.batch and all(
            r.num_computed_tokens >= r.num_prompt_tokens for r in engine.scheduler.running)
        if uniform:
            times.append(time.perf_counter() - start)
    engine.shutdown()
    return 1000 * statistics.mean(times[1:]), 1000 * statistics.median(times[1:])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def served_tpot_ms(ns: argparse.Namespace, profile: str | None) -> dict:
    port = _free_port()
    cmd = [sys.executable]
    if profile:
        cmd += ["-m", "cProfile", "-o", profile]
    cmd += ["-m", "tachyon.entrypoints.cli", "serve", "--port", str(port), *ENGINE_FLAGS]
    if ns.model:
        cmd += ["--model", ns.model]
    server = subprocess.Popen(cmd, stderr=subprocess.DEVNULL)
    try:
        for _ in range(300):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                time.sleep(1)
        before = _cpu_seconds(server.pid), _steps(port)
        out = os.path.join(tempfile.mkdtemp(), "r.json")
        subprocess.run([sys.executable, "-m", "tachyon.entrypoints.cli", "bench", "serve",
                        "--port", str(port), "--dataset-name", "random",
                        "--random-input-len", str(ns.input_len),
                        "--random-output-len", str(ns.output_len),
                        "--num-prompts", str(ns.batch * ns.waves),
                        "--max-concurrency", str(ns.batch), "--ignore-eos",
                        "--save-result", "--result-dir", os.path.dirname(out),
                        "--result-filename", "r.json"], check=True)
        cpu = _cpu_seconds(server.pid) - before[0]
        steps, seconds = (a - b for a, b in zip(_steps(port), before[1], strict=True))
        with open(out) as f:
            result = json.load(f)
        result["api_cpu_ms_per_step"] = 1000 * cpu / steps
        result["core_step_ms"] = 1000 * seconds / steps
        result["steps"] = steps
        return result
    finally:
        # SIGINT: the CLI returns normally, so cProfile writes its file (uvicorn re-raises
        # SIGTERM with the default handler, which would kill it first).
        server.send_signal(signal.SIGINT)
        server.wait(60)


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of one process (the API process: the core is a child)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _counter(port: int, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
    line = next(x for x in text.decode().splitlines() if x.startswith(f"tachyon:{name} "))
    return float(line.split()[1])


def _steps(port: int) -> tuple[float, float]:
    """Engine steps, and seconds inside them, so far."""
    return (_counter(port, "engine_steps_total"),
            _counter(port, "engine_step_seconds_total"))


def summarize_profile(path: str) -> tuple[int, list[tuple[str, float]]]:
    """Step messages seen, and cumulative microseconds per step of the API process's hot
    spots (cProfile sees the main thread: the event loop)."""
    stats = pstats.Stats(path).stats
    num_steps = max(nc for (_, _, name), (_, nc, _, _, _) in stats.items()
                    if name == "_on_output")
    wanted = {"_on_output": "step message: route + detokenize + stop strings",
              "process": "OutputProcessor.process",
              "_events": "SSE: format chunks (generator)",
              "stream_response": "starlette: send SSE bodies",
              "_read": "zmq reader task",
              "encode": "tokenize (thread)"}
    rows = []
    for (_, _, name), (_, _, _, cum, _) in stats.items():
        if name in wanted:
            rows.append((f"{name}: {wanted[name]}", 1e6 * cum / num_steps))
    return num_steps, sorted(rows, key=lambda r: -r[1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--input-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--waves", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3,
                   help="offline and served runs alternate this many times; on a shared "
                        "machine the fastest of each is the least disturbed")
    p.add_argument("--profile", default=None, help="also profile the API process here")
    p.add_argument("--profile-only", action="store_true")
    ns = p.parse_args()
    if not ns.profile_only:
        steps, tpots, api = [], [], []
        for r in range(ns.repeats):
            step = offline_step_ms(ns)
            served = served_tpot_ms(ns, None)
            steps.append(step[1])
            tpots.append(served["median_tpot_ms"])
            api.append(served["api_cpu_ms_per_step"])
            print(f"run {r}: offline median step {step[1]:.1f} ms (mean {step[0]:.1f}); served "
                  f"TPOT median {served['median_tpot_ms']:.1f} ms (mean "
                  f"{served['mean_tpot_ms']:.1f}, p99 {served['p99_tpot_ms']:.1f}); the "
                  f"core's mean step in the server {served['core_step_ms']:.1f} ms (prefill "
                  f"steps included); API process CPU {served['api_cpu_ms_per_step']:.2f} ms "
                  f"per step", flush=True)
        ratios = [t / s for t, s in zip(tpots, steps, strict=True)]
        print(f"B={ns.batch}: fastest offline step {min(steps):.1f} ms, fastest served TPOT "
              f"{min(tpots):.1f} ms, ratio {min(tpots) / min(steps):.3f}; median of per-run "
              f"ratios {statistics.median(ratios):.3f}; API CPU per step "
              f"{min(api):.2f}-{max(api):.2f} ms")
    if ns.profile:
        profiled = served_tpot_ms(ns, ns.profile)
        steps_seen, rows = summarize_profile(ns.profile)
        print(f"profiled run: TPOT mean {profiled['mean_tpot_ms']:.2f} ms; API process, "
              f"per step message ({steps_seen} messages):")
        for name, us in rows:
            print(f"  {us:9.0f} us  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
