"""``tachyon bench throughput``: the standard offline workload, output tokens per second.

One warm-up ``generate``, then one timed ``generate`` of the whole workload (prefill
included). A model path (HF directory or .gguf file) runs its real weights; a preset runs
random ones. On a GPU it also measures copy bandwidth and matmul rate on the spot and prints
the floor (BENCHMARKS.md) and the fraction of it reached. Prints a table, writes ``--json``
and ``--plot``; exits non-zero with a one-line reason when it cannot.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from tachyon.bench.common import (
    BENCH_ENGINE_DEFAULTS,
    BENCH_ENGINE_NOTES,
    BenchError,
    add_output_args,
    bench_engine_args,
    check_can_plot,
    device_name,
    measure_copy_bandwidth,
    measure_matmul_flops,
    run_bench,
    save_figure,
    short_model_name,
    standard_workload,
    throughput_floor_seconds,
    timestamp,
    wrapped_title,
    write_json,
)
from tachyon.entrypoints.args import Parser, add_engine_args, parse_args

NAME = "tachyon bench throughput"
WARMUP_PROMPTS, WARMUP_TOKENS = 8, 16


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog=NAME, description=__doc__)
    p.add_argument("--num-prompts", type=int, default=256, metavar="N",
                   help="prompts in the workload (default: %(default)s)")
    p.add_argument("--input-len", type=int, nargs=2, default=[100, 1024], metavar=("MIN", "MAX"),
                   help="range of prompt lengths in tokens (default: 100 1024)")
    p.add_argument("--output-len", type=int, nargs=2, default=[100, 1024],
                   metavar=("MIN", "MAX"),
                   help="range of output lengths in tokens (default: 100 1024)")
    p.add_argument("--temperature", type=float, default=0.6, metavar="X",
                   help="sampling temperature (default: %(default)s)")
    p.add_argument("--workload-seed", type=int, default=0, metavar="N",
                   help="seed of the random prompts and lengths (default: %(default)s)")
    add_output_args(p, "throughput")
    add_engine_args(p, defaults=BENCH_ENGINE_DEFAULTS, notes=BENCH_ENGINE_NOTES)
    return p


def main(argv: list[str] | None = None) -> int:
    ns = parse_args(build_parser(), argv)
    return run_bench(NAME, lambda: _run(ns, argv))


def _run(ns: argparse.Namespace, argv: list[str] | None) -> None:
    check_can_plot(ns.plot)
    if ns.num_prompts < 1 or min(ns.input_len + ns.output_len) < 1:
        raise ValueError("--num-prompts, --input-len and --output-len must be >= 1")
    from tachyon import LLM, SamplingParams
    from tachyon.engine.core import spec_delta

    t0 = time.perf_counter()
    llm = LLM.from_engine_args(bench_engine_args(ns))
    startup_s = time.perf_counter() - t0
    engine = llm.engine
    prompts, max_tokens = standard_workload(ns.num_prompts, tuple(ns.input_len),
                                            tuple(ns.output_len), ns.workload_seed,
                                            engine.vocab_size)
    params = [SamplingParams(temperature=ns.temperature, ignore_eos=True, max_tokens=m)
              for m in max_tokens]
    llm.generate(prompts[:WARMUP_PROMPTS], SamplingParams(max_tokens=WARMUP_TOKENS,
                                                          ignore_eos=True), use_tqdm=False)
    spec_before = dict(engine.scheduler.spec_counts)
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=sys.stderr.isatty())
    seconds = time.perf_counter() - start
    out_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    if out_tokens == 0:
        raise BenchError("the workload generated no tokens")
    result: dict[str, Any] = {
        "bench": "throughput", "time": timestamp(), "device": device_name(engine.config.device),
        "model": ns.model, "load_format": engine.config.model.load_format,
        "engine": dict(engine.executor.graph_stats),
        "num_prompts": len(prompts), "prompt_tokens": sum(len(p) for p in prompts),
        "output_tokens": out_tokens, "seconds": seconds, "tok_per_s": out_tokens / seconds,
        "startup_s": startup_s, "preemptions": engine.stats.get("preemptions"),
        "argv": argv,
    }
    if engine.config.speculative is not None:
        result["speculative"] = spec_delta(spec_before, engine.scheduler.spec_counts)
    if engine.config.device == "cuda":
        result.update(_floor(engine, prompts, max_tokens, out_tokens, seconds,
                             ns.tensor_parallel_size))
    _print_table(result)
    write_json(ns.json, result)
    if ns.plot:
        _plot(result, ns.plot)
    llm.shutdown()


def _floor(engine: Any, prompts: list[list[int]], max_tokens: list[int], out_tokens: int,
           seconds: float, tp: int) -> dict[str, float]:
    import torch

    cuda = torch.device("cuda")
    bw, flops = measure_copy_bandwidth(cuda), measure_matmul_flops(cuda)
    floor = throughput_floor_seconds(engine.config.model.hf_config, prompts, max_tokens,
                                     bw, flops, tp)
    return {"copy_bandwidth_gbs": bw / 1e9, "matmul_tflops": flops / 1e12, **floor,
            "floor_tok_per_s": out_tokens / floor["floor_s"],
            "fraction_of_floor": floor["floor_s"] / seconds}


def _print_table(r: dict[str, Any]) -> None:
    rows = [("device", r["device"]), ("model", r["model"]), ("weights", r["load_format"]),
            ("output tokens", r["output_tokens"]), ("prompt tokens", r["prompt_tokens"]),
            ("seconds", f"{r['seconds']:.2f}"), ("tok/s", f"{r['tok_per_s']:.0f}")]
    if "speculative" in r:
        spec = r["speculative"]
        rows += [("speculative", r["engine"]["speculative"]),
                 ("acceptance rate", f"{spec['spec_acceptance_rate']:.3f}"),
                 ("mean accepted length", f"{spec['spec_mean_accepted_length']:.2f}")]
    if "floor_tok_per_s" in r:
        rows += [("copy bandwidth GB/s", f"{r['copy_bandwidth_gbs']:.0f}"),
                 ("floor tok/s", f"{r['floor_tok_per_s']:.0f}"),
                 ("fraction of floor", f"{r['fraction_of_floor']:.3f}")]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


def _plot(r: dict[str, Any], path: str) -> None:
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
    ax.set_title(wrapped_title(f"{short_model_name(r['model'])} ({r['load_format']} weights) "
                               f"on {r['device']}"))
    save_figure(fig, path)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
