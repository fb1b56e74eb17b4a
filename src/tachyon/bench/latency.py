"""``tachyon bench latency``: decode step time per CUDA graph mode and batch size.

For each mode, a fresh process builds the engine (so start-up, capture seconds and pool
memory are measured too), prefills B requests of ``--context`` tokens, then times decode
steps and keeps the median: CUDA events on a GPU, the wall clock on a CPU (where every mode
runs eagerly). Prints a table with speed-ups against NONE and writes ``--json`` and
``--plot``. Exits non-zero with a one-line reason if any mode fails (the JSON and PNG still
hold the modes that ran).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
from typing import Any

from tachyon.bench.common import (
    BENCH_ENGINE_DEFAULTS,
    BENCH_ENGINE_NOTES,
    BenchError,
    add_output_args,
    bench_engine_args,
    check_can_plot,
    device_name,
    run_bench,
    save_figure,
    short_model_name,
    step_timer,
    timestamp,
    wrapped_title,
    write_json,
)
from tachyon.entrypoints.args import Parser, add_engine_args, parse_args

NAME = "tachyon bench latency"
# name -> (cudagraph mode, piecewise backend)
MODES = {
    "NONE": ("NONE", "breakable"),
    "PIECEWISE-breakable": ("PIECEWISE", "breakable"),
    "PIECEWISE-compile": ("PIECEWISE", "compile"),
    "FULL": ("FULL", "breakable"),
    "FULL_AND_PIECEWISE": ("FULL_AND_PIECEWISE", "breakable"),
}
DEFAULT_MODES = ["NONE", "PIECEWISE-breakable", "PIECEWISE-compile", "FULL"]
# Untimed decode steps after prefill (the first decode of a new batch shape pays one-off
# costs), and the output-token slack that keeps every request running through the timing.
WARMUP_STEPS = 3
SPARE_TOKENS = 8
PROMPT_ID_CAP = 10000  # random prompt ids, as in the standard workload (BENCHMARKS.md)


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog=NAME, description=__doc__)
    p.add_argument("--modes", nargs="+", default=DEFAULT_MODES, choices=list(MODES),
                   help="graph modes to time, one process each (default: %(default)s)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 64, 256], metavar="B",
                   help="requests decoding together (default: %(default)s)")
    p.add_argument("--context", type=int, default=512, metavar="N",
                   help="prompt tokens per request (default: %(default)s)")
    p.add_argument("--steps", type=int, default=30, metavar="N",
                   help="timed decode steps per batch size (default: %(default)s)")
    add_output_args(p, "latency")
    p.add_argument("--one-mode", default=None, help=argparse.SUPPRESS)  # child process
    add_engine_args(p, defaults=BENCH_ENGINE_DEFAULTS, notes=BENCH_ENGINE_NOTES)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ns = parse_args(build_parser(), argv)
    if ns.one_mode:
        code = run_bench(f"{NAME} ({ns.one_mode})", lambda: _child(ns))
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)  # results are written; skip interpreter teardown of the device state
    return run_bench(NAME, lambda: _parent(ns, argv))


def _parent(ns: argparse.Namespace, argv: list[str]) -> None:
    check_can_plot(ns.plot)
    for b in ns.batch_sizes:
        if b < 1:
            raise ValueError(f"--batch-sizes must be >= 1, got {b}")
    if ns.context < 1 or ns.steps < 1:
        raise ValueError("--context and --steps must be >= 1")
    results: dict[str, dict[str, Any]] = {}
    failed: dict[str, str] = {}
    for name in ns.modes:
        try:
            results[name] = _run_child(name, argv)
            print(f"{name}: {_summary(results[name])}", flush=True)
        except BenchError as e:
            failed[name] = str(e)
            print(f"{name}: FAILED: {e}", flush=True)
    if not results:
        raise BenchError("every mode failed; " + "; ".join(f"{k}: {v}" for k, v in failed.items()))
    first = next(iter(results.values()))
    report = {"bench": "latency", "time": timestamp(), "device": first["device"],
              "model": ns.model, "load_format": first["load_format"], "context": ns.context,
              "batch_sizes": ns.batch_sizes, "timer": first["timer"], "modes": results,
              "failed": failed}
    _print_table(report)
    write_json(ns.json, report)
    if ns.plot:
        _plot(report, ns.plot)
    if failed:
        raise BenchError(f"{len(failed)} of {len(ns.modes)} modes failed; "
                         + "; ".join(f"{k}: {v}" for k, v in failed.items()))


def _run_child(name: str, argv: list[str]) -> dict[str, Any]:
    """Run one mode in a fresh process; its JSON, or BenchError with its one-line reason."""
    fd, out = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    # Later flags win in argparse: the child's --json overrides the parent's.
    cmd = [sys.executable, "-m", "tachyon.bench.latency", *argv, "--one-mode", name,
           "--json", out, "--no-plot"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0 or not os.path.getsize(out):
            lines = [ln for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
            reason = lines[-1] if lines else f"exit status {proc.returncode}"
            raise BenchError(reason.removeprefix(f"{NAME} ({name}): error: "))
        with open(out) as fh:
            return json.load(fh)
    finally:
        os.unlink(out)


def _child(ns: argparse.Namespace) -> None:
    import time

    from tachyon.engine.core import spec_delta
    from tachyon.engine.llm_engine import LLMEngine
    from tachyon.sampling_params import SamplingParams

    mode, piecewise = MODES[ns.one_mode]
    args = bench_engine_args(ns)
    args.cudagraph_mode = mode
    args.compilation_config = {"piecewise_backend": piecewise}
    args.max_num_seqs = max(ns.batch_sizes)
    t0 = time.perf_counter()
    engine = LLMEngine.from_engine_args(args)
    startup = time.perf_counter() - t0
    max_tokens = ns.steps + WARMUP_STEPS + SPARE_TOKENS
    _check_fits(engine, max(ns.batch_sizes), ns.context + max_tokens)
    timer = step_timer(engine.config.device)
    params = SamplingParams(temperature=0, ignore_eos=True, max_tokens=max_tokens)
    rng = random.Random(0)
    id_cap = min(PROMPT_ID_CAP, engine.vocab_size)  # a tiny test model has a tiny vocabulary
    per_batch = {}
    for b in ns.batch_sizes:
        ids = [engine.add_request(f"lat-{b}-{i}", [rng.randrange(id_cap)
                                                  for _ in range(ns.context)], params)
               for i in range(b)]
        _prefill(engine, set(ids))
        for _ in range(WARMUP_STEPS):
            engine.step()
        spec_before = dict(engine.scheduler.spec_counts)
        times = [timer(engine.step) for _ in range(ns.steps)]
        engine.abort_request(ids)
        per_batch[str(b)] = {"median_ms": statistics.median(times), "min_ms": min(times)}
        if engine.config.speculative is not None:
            # A step emits several tokens per request when drafts are accepted.
            per_batch[str(b)].update(spec_delta(spec_before, engine.scheduler.spec_counts))
    data = {"mode": mode, "piecewise_backend": piecewise, "startup_s": startup,
            "device": device_name(engine.config.device), "load_format":
            engine.config.model.load_format, "timer": "cuda events"
            if engine.config.device == "cuda" else "wall clock",
            "engine": dict(engine.executor.graph_stats), "steps": per_batch}
    write_json(ns.json, data)
    engine.shutdown()


def _check_fits(engine: Any, batch: int, tokens_per_request: int) -> None:
    """Every request of the largest batch must hold its KV at once, or the timed steps would
    measure preemption (or wait forever)."""
    bs = engine.config.cache.block_size
    need = batch * -(-tokens_per_request // bs)
    have = engine.executor.num_blocks
    if need > have:
        raise BenchError(
            f"batch {batch} x {tokens_per_request} tokens needs {need} KV blocks, the cache "
            f"holds {have}; lower --batch-sizes or --context, or raise --kv-cache-memory")


def _prefill(engine: Any, ids: set[str]) -> None:
    """Step until every request has its first token (its prompt is in the KV cache)."""
    started: set[str] = set()
    while started != ids:
        if not engine.has_unfinished_requests():
            raise BenchError("requests finished before decoding started")
        started.update(o.request_id for o in engine.step() if o.outputs[0].token_ids)


def _summary(r: dict[str, Any]) -> str:
    steps = ", ".join(f"B={b}: {v['median_ms']:.3f} ms" for b, v in r["steps"].items())
    return f"startup {r['startup_s']:.1f} s, {steps}"


def _print_table(report: dict[str, Any]) -> None:
    bs = [str(b) for b in report["batch_sizes"]]
    base = report["modes"].get("NONE", {}).get("steps", {})
    print(f"decode step, median ms ({report['timer']}), speed-up against NONE")
    print(f"{'mode':<22}" + "".join(f"{'B=' + b:>18}" for b in bs) + f"{'capture s':>11}"
          + "  ran as")
    for name, r in report["modes"].items():
        cells = []
        for b in bs:
            ms = r["steps"][b]["median_ms"]
            speed = f" ({base[b]['median_ms'] / ms:.2f}x)" if b in base else ""
            cells.append(f"{ms:.3f}{speed}")
        cap = r["engine"].get("capture_s", 0)
        # A mode the device or backend cannot run is downgraded (CPU: always NONE).
        ran = r["engine"].get("cudagraph_mode", "?")
        print(f"{name:<22}" + "".join(f"{c:>18}" for c in cells) + f"{cap:>11}  {ran}")
        if "spec_acceptance_rate" in r["steps"][bs[0]]:  # speculation: tokens per step vary
            cells = [f"{r['steps'][b]['spec_acceptance_rate']:.2f} / "
                     f"{r['steps'][b]['spec_mean_accepted_length']:.2f}" for b in bs]
            print(f"{'  accepted / length':<22}" + "".join(f"{c:>18}" for c in cells))
    for name, reason in report["failed"].items():
        print(f"{name:<22} FAILED: {reason}")


def _plot(report: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    bs = report["batch_sizes"]
    for name, r in report["modes"].items():
        ran = r["engine"].get("cudagraph_mode")
        label = name if ran in (None, r["mode"]) else f"{name} (ran {ran})"
        ax.plot(bs, [r["steps"][str(b)]["median_ms"] for b in bs], marker="o", label=label)
    if len(bs) > 1:
        ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size")
    ax.set_ylabel(f"decode step, ms (median, {report['timer']})")
    ax.set_title(wrapped_title(f"{short_model_name(report['model'])}, context "
                               f"{report['context']}, {report['device']}"))
    ax.legend()
    save_figure(fig, path)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
