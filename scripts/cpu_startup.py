"""CPU start-up figures of docs/performance.md ("CPU start-up").

    python scripts/cpu_startup.py [--runs 5] [--before OLD_TREE/src]

1. seconds from process start to the first byte of ``--help`` output (three commands);
2. warm time to first token of ``tachyon generate`` with the default model: process start to
   the first byte on stdout with ``--max-tokens 1`` (the answer streams, so the first byte is
   the first token);
3. the start-up profile: cProfile's cumulative seconds of each phase of one such generate.

Each figure is the minimum and median of ``--runs``, alternating the trees when ``--before``
names a second source tree (``git archive REV | tar -x -C DIR`` makes one), and the CPU time
of the process. Run it on a machine as quiet as you can get: it reports the load average.
"""

from __future__ import annotations

import argparse
import os
import pstats
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

PROMPT = "What is the capital of France?"
HELP_COMMANDS = [["--help"], ["generate", "--help"], ["bench", "latency", "--help"]]
GENERATE = ["generate", PROMPT, "--max-tokens", "1"]
# Phase -> the function whose cumulative time it is; indented phases are part of the one above.
PHASES = [
    ("import torch", r"torch/__init__\.py:1\(<module>\)"),
    ("resolve the model: transformers, config", r"resolve\.py:\d+\(resolve_model\)"),
    ("  import LlamaConfig (torch.distributed, accelerate)",
     r"configuration_llama\.py:1\(<module>\)"),
    ("load the tokenizer", r"\(load_tokenizer\)"),
    ("load the model: build + weights", r"loader\.py:\d+\(load_model\)"),
    ("  rotary cos/sin tables", r"rotary\.py:\d+\(__init__\)"),
    ("  copy the weights", r"llama\.py:\d+\(load_weights\)"),
    ("allocate the KV cache", r"\(allocate_kv_cache\)"),
    ("first step: prefill + sample", r"llm_engine\.py:\d+\(step\)"),
    ("  import torch._dynamo (first custom-op call)", r"torch/_dynamo/__init__\.py:1\(<module>\)"),
]
WHOLE = r"<built-in method builtins\.exec>"


def _env(tree: str | None) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("OMP_WAIT_POLICY", None)  # the CLI's own choice is part of what is measured
    if tree:
        env["PYTHONPATH"] = tree
    return env


def first_byte(tree: str | None, args: list[str]) -> tuple[float, float]:
    """(seconds to the first byte on stdout, CPU seconds of the whole process)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "tachyon.entrypoints.cli", *args],
                            env=_env(tree), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    proc.stdout.read(1)
    seconds = time.perf_counter() - start
    proc.stdout.read()
    if proc.wait() != 0:
        raise SystemExit(f"tachyon {' '.join(args)} failed")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    return seconds, cpu


def profile(tree: str | None) -> dict[str, float]:
    fd, out = tempfile.mkstemp(suffix=".prof")
    os.close(fd)
    try:
        subprocess.run([sys.executable, "-m", "cProfile", "-o", out, "-m",
                        "tachyon.entrypoints.cli", *GENERATE], env=_env(tree), check=True,
                       capture_output=True)
        stats = pstats.Stats(out).stats  # (file, line, name) -> (..., cumulative, callers)
    finally:
        os.unlink(out)
    names = {f"{f}:{line}({name})": v[3] for (f, line, name), v in stats.items()}
    found = {label: max((t for n, t in names.items() if re.search(rx, n)), default=0.0)
             for label, rx in [*PHASES, ("whole process", WHOLE)]}
    top = sum(t for label, t in found.items()
              if not label.startswith(" ") and label != "whole process")
    found["other: tachyon's imports, exit"] = found["whole process"] - top
    return found


def _alternate(trees: dict[str, str | None], runs: int, fn: Any) -> dict[str, list[Any]]:
    """``fn(tree)`` ``runs`` times per tree, the trees taking turns (the load drifts)."""
    out: dict[str, list[Any]] = {k: [] for k in trees}
    for _ in range(runs):
        for k, tree in trees.items():
            out[k].append(fn(tree))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--before", default=None, help="a second source tree to compare with")
    ns = p.parse_args()
    trees = {"before": ns.before, "after": None} if ns.before else {"now": None}
    for args in [*HELP_COMMANDS, GENERATE]:
        runs = _alternate(trees, ns.runs, lambda t, a=args: first_byte(t, a))
        cells = [f"{k} {min(s for s, _ in r):.2f} / {statistics.median(s for s, _ in r):.2f} s"
                 f" (cpu {min(c for _, c in r):.2f} s)" for k, r in runs.items()]
        print(f"tachyon {' '.join(args)[:40]:<42} " + " | ".join(cells), flush=True)
    profiles = _alternate(trees, ns.runs, profile)
    print("\n| phase (cProfile, cumulative s, min of runs) | " + " | ".join(trees) + " |")
    print("|---|" + "---|" * len(trees))
    for label in profiles[next(iter(trees))][0]:
        cells = [min(r[label] for r in rs) for rs in profiles.values()]
        print(f"| {label.strip() if not label.startswith(' ') else '- ' + label.strip()} | "
              + " | ".join(f"{c:.2f}" if c else "-" for c in cells) + " |")
    print("load average:", " ".join(f"{x:.1f}" for x in os.getloadavg()))


if __name__ == "__main__":
    main()
