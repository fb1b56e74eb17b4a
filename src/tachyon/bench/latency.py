"""``tachyon bench latency``: decode step time per CUDA graph mode and batch size.

For each mode, a fresh process builds the engine (so start-up, capture seconds and pool
memory are measured too), prefills B requests of ``--context`` tokens, then times decode
steps with CUDA events and keeps the median. Prints a table with speed-ups against NONE,
writes ``--json`` and a PNG.
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
import time

from tachyon.bench.common import device_name, timestamp, write_json
from tachyon.entrypoints.cli import _Parser, add_engine_args, engine_args_from

# name -> (cudagraph mode, piecewise backend)
MODES = {
    "NONE": ("NONE", "breakable"),
    "PIECEWISE-breakable": ("PIECEWISE", "breakable"),
    "PIECEWISE-compile": ("PIECEWISE", "compile"),
    "FULL": ("FULL", "breakable"),
    "FULL_AND_PIECEWISE": ("FULL_AND_PIECEWISE", "breakable"),
}
DEFAULT_MODES = ["NONE", "PIECEWISE-breakable", "PIECEWISE-compile", "FULL"]


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="tachyon bench latency", description=__doc__)
    p.add_argument("--modes", nargs="+", default=DEFAULT_MODES, choices=list(MODES))
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 64, 256])
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--steps", type=int, default=30, help="timed decode steps per batch size")
    p.add_argument("--json", default=None)
    p.add_argument("--plot", default=None)
    p.add_argument("--one-mode", default=None, help=argparse.SUPPRESS)  # child process
    add_engine_args(p)
    p.set_defaults(model="qwen3-0.6b", load_format="dummy", max_model_len=4096)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ns = build_parser().parse_args(argv)
    if ns.one_mode:
        return _child(ns)
    results = {}
    for name in ns.modes:
        results[name] = _run_child(name, argv)
        print(f"{name}: {_summary(results[name])}", flush=True)
    report = {"bench": "latency", "time": timestamp(), "device": device_name(),
              "model": ns.model, "context": ns.context, "batch_sizes": ns.batch_sizes,
              "modes": results}
    _print_table(report)
    write_json(ns.json, report)
    if ns.plot:
        _plot(report, ns.plot)
    return 0


def _run_child(name: str, argv: list[str]) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    # Later flags win in argparse: the child's --json overrides the parent's.
    cmd = [sys.executable, "-m", "tachyon.bench.latency", *argv, "--one-mode", name,
           "--json", out]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 and not os.path.getsize(out):
        return {"error": (proc.stderr or proc.stdout)[-4000:],
                "wall_s": time.perf_counter() - start}
    with open(out) as fh:
        data = json.load(fh)
    os.unlink(out)
    return data


def _child(ns: argparse.Namespace) -> int:
    import torch

    from tachyon import LLM, SamplingParams

    mode, pw = MODES[ns.one_mode]
    args = engine_args_from(ns)
    args.cudagraph_mode = mode
    args.compilation_config = {"piecewise_backend": pw}
    args.max_num_seqs = max(ns.batch_sizes)
    t0 = time.perf_counter()
    llm = LLM.from_engine_args(args)
    startup = time.perf_counter() - t0
    engine = llm.engine
    rng = random.Random(0)
    per_batch = {}
    for b in ns.batch_sizes:
        ids = []
        for i in range(b):
            prompt = [rng.randint(0, 10000) for _ in range(ns.context)]
            ids.append(engine.add_request(f"lat-{b}-{i}", prompt, SamplingParams(
                temperature=0, ignore_eos=True, max_tokens=ns.steps + 8)))
        # Prefill (and a couple of decode steps) until every request decodes.
        while engine.scheduler.num_waiting or any(
                r.num_computed_tokens < r.num_prompt_tokens for r in engine.scheduler.running):
            engine.step()
        for _ in range(3):
            engine.step()
        times = []
        for _ in range(ns.steps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(
                enable_timing=True)
            start.record()
            engine.step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        engine.abort_request(ids)
        engine.step()
        per_batch[str(b)] = {"median_ms": statistics.median(times), "min_ms": min(times)}
    data = {"mode": mode, "piecewise_backend": pw, "startup_s": startup,
            "engine": getattr(engine.executor, "graph_stats", {}), "steps": per_batch}
    write_json(ns.json, data)
    llm.shutdown()
    sys.stdout.flush()
    os._exit(0)  # results are written; skip interpreter teardown of the device state


def _summary(r: dict) -> str:
    if "error" in r:
        return "FAILED: " + r["error"].strip().splitlines()[-1]
    steps = ", ".join(f"B={b}: {v['median_ms']:.3f} ms" for b, v in r["steps"].items())
    return f"startup {r['startup_s']:.1f} s, {steps}"


def _print_table(report: dict) -> None:
    bs = [str(b) for b in report["batch_sizes"]]
    base = report["modes"].get("NONE", {}).get("steps", {})
    head = f"{'mode':<22}" + "".join(f"{'B=' + b:>18}" for b in bs) + f"{'capture s':>11}"
    print(head)
    for name, r in report["modes"].items():
        if "error" in r:
            print(f"{name:<22} FAILED")
            continue
        cells = []
        for b in bs:
            ms = r["steps"][b]["median_ms"]
            speed = f" ({base[b]['median_ms'] / ms:.2f}x)" if b in base else ""
            cells.append(f"{ms:.3f}ms{speed}")
        cap = r.get("engine", {}).get("capture_s", 0)
        print(f"{name:<22}" + "".join(f"{c:>18}" for c in cells) + f"{cap:>11}")


def _plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    bs = report["batch_sizes"]
    for name, r in report["modes"].items():
        if "error" in r:
            continue
        ax.plot(bs, [r["steps"][str(b)]["median_ms"] for b in bs], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size")
    ax.set_ylabel("decode step, ms (median)")
    ax.set_title(f"{report['model']}, context {report['context']}, {report['device']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
