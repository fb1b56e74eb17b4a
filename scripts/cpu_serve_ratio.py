"""Server TPOT over offline decode step time at the same batch, on CPU (issue 11's check).

1. Offline: ``LLMEngine`` decodes B requests of ``--input-len`` tokens; the mean step time of
   the steps where all B decode together.
2. Served: ``tachyon serve`` with the same engine flags, ``tachyon bench serve`` with
   ``--max-concurrency B`` (waves of B requests of the same lengths), mean TPOT.
3. Optionally (``--profile PATH``) a second served run with the API process under cProfile,
   summarised per engine step.

    python scripts/cpu_serve_ratio.py --batch 32 --input-len 128 --output-len 64
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

ENGINE_FLAGS = ["--device", "cpu", "--kv-cache-memory", "1GiB"]


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
        out = os.path.join(tempfile.mkdtemp(), "r.json")
        subprocess.run([sys.executable, "-m", "tachyon.entrypoints.cli", "bench", "serve",
                        "--port", str(port), "--dataset-name", "random",
                        "--random-input-len", str(ns.input_len),
                        "--random-output-len", str(ns.output_len),
                        "--num-prompts", str(ns.batch * ns.waves),
                        "--max-concurrency", str(ns.batch), "--ignore-eos",
                        "--save-result", "--result-dir", os.path.dirname(out),
                        "--result-filename", "r.json"], check=True)
        with open(out) as f:
            return json.load(f)
    finally:
        # SIGINT: the CLI returns normally, so cProfile writes its file (uvicorn re-raises
        # SIGTERM with the default handler, which would kill it first).
        server.send_signal(signal.SIGINT)
        server.wait(60)


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
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--waves", type=int, default=3)
    p.add_argument("--profile", default=None, help="also profile the API process here")
    p.add_argument("--profile-only", action="store_true")
    ns = p.parse_args()
    if not ns.profile_only:
        step = offline_step_ms(ns)
        served = served_tpot_ms(ns, None)
        print(f"offline decode step at B={ns.batch}: mean {step[0]:.2f} ms, median "
              f"{step[1]:.2f} ms")
        print(f"served TPOT mean {served['mean_tpot_ms']:.2f} ms, median "
              f"{served['median_tpot_ms']:.2f} ms, p99 {served['p99_tpot_ms']:.2f} ms")
        print(f"ratio: mean TPOT / mean step {served['mean_tpot_ms'] / step[0]:.3f}, "
              f"median / median {served['median_tpot_ms'] / step[1]:.3f}")
    if ns.profile:
        profiled = served_tpot_ms(ns, ns.profile)
        steps, rows = summarize_profile(ns.profile)
        print(f"profiled run: TPOT mean {profiled['mean_tpot_ms']:.2f} ms; API process, "
              f"per step message ({steps} messages):")
        for name, us in rows:
            print(f"  {us:9.0f} us  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
