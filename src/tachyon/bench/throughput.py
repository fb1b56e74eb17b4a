"""``tachyon bench throughput``: the standard offline workload, output tokens per second.

One warm-up ``generate``, then one timed ``generate`` of the whole workload (prefill
included). On a GPU it also measures copy bandwidth and matmul rate on the spot and prints
the floor (BENCHMARKS.md) and the fraction of it reached.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from tachyon.bench.common import (
    device_name,
    measure_copy_bandwidth,
    measure_matmul_flops,
    standard_workload,
    throughput_floor_seconds,
    timestamp,
    write_json,
)
from tachyon.entrypoints.cli import _Parser, add_engine_args, engine_args_from


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="tachyon bench throughput", description=__doc__)
    p.add_argument("--num-prompts", type=int, default=256)
    p.add_argument("--input-len", type=int, nargs=2, default=[100, 1024], metavar=("MIN", "MAX"))
    p.add_argument("--output-len", type=int, nargs=2, default=[100, 1024], metavar=("MIN", "MAX"))
    p.add_argument("--temperature", type=float, default=0.6)
    p.add_argument("--workload-seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--plot", default=None, help="write a PNG here")
    add_engine_args(p)
    p.set_defaults(model="qwen3-0.6b", load_format="dummy", max_model_len=4096)
    return p


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    from tachyon import LLM, SamplingParams

    prompts, max_tokens = standard_workload(ns.num_prompts, tuple(ns.input_len),
                                            tuple(ns.output_len), ns.workload_seed)
    args = engine_args_from(ns)
    t0 = time.perf_counter()
    llm = LLM.from_engine_args(args)
    startup_s = time.perf_counter() - t0
    params = [SamplingParams(temperature=ns.temperature, ignore_eos=True, max_tokens=m)
              for m in max_tokens]
    llm.generate(prompts[:8], SamplingParams(max_tokens=16, ignore_eos=True),
                 use_tqdm=False)  # warm-up
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=True)
    seconds = time.perf_counter() - start
    out_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    result = {
        "bench": "throughput", "time": timestamp(), "device": device_name(),
        "model": ns.model, "load_format": ns.load_format,
        "engine": getattr(llm.engine.executor, "graph_stats", None)
        or llm.engine.executor.startup_report,
        "num_prompts": len(prompts), "prompt_tokens": sum(len(p) for p in prompts),
        "output_tokens": out_tokens, "seconds": seconds, "tok_per_s": out_tokens / seconds,
        "startup_s": startup_s,
        "preemptions": getattr(llm.engine.scheduler, "num_preemptions", None),
        "argv": argv,
    }
    if torch.cuda.is_available():
        bw, flops = measure_copy_bandwidth(torch.device("cuda")), measure_matmul_flops(
            torch.device("cuda"))
        floor = throughput_floor_seconds(llm.engine.config.model.hf_config, prompts, max_tokens,
                                         bw, flops, ns.tensor_parallel_size)
        result.update(copy_bandwidth_gbs=bw / 1e9, matmul_tflops=flops / 1e12, **floor,
                      floor_tok_per_s=out_tokens / floor["floor_s"],
                      fraction_of_floor=floor["floor_s"] / seconds)
    _print_table(result)
    write_json(ns.json, result)
    if ns.plot:
        _plot(result, ns.plot)
    return 0


def _print_table(r: dict) -> None:
    rows = [("device", r["device"]), ("model", r["model"]),
            ("output tokens", r["output_tokens"]), ("prompt tokens", r["prompt_tokens"]),
            ("seconds", f"{r['seconds']:.2f}"), ("tok/s", f"{r['tok_per_s']:.0f}")]
    if "floor_tok_per_s" in r:
        rows += [("copy bandwidth GB/s", f"{r['copy_bandwidth_gbs']:.0f}"),
                 ("floor tok/s", f"{r['floor_tok_per_s']:.0f}"),
                 ("fraction of floor", f"{r['fraction_of_floor']:.3f}")]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


def _plot(r: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, values = ["tachyon"], [r["tok_per_s"]]
    if "floor_tok_per_s" in r:
        labels.append("floor")
        values.append(r["floor_tok_per_s"])
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.bar(labels, values, color=["tab:blue", "tab:gray"][: len(values)])
    ax.set_ylabel("output tokens / s")
    ax.set_title(f"{r['model']} on {r['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
