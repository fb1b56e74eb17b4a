"""Structured-output overhead, for issue 16: decode tok/s with and without a ``json_schema``
constraint at batch sizes 1 and 64 (offline ``LLM``, greedy), and the grammar compile time of
each schema (cold, then cached). Writes JSON, a PNG and a Markdown table; exits non-zero when
a constrained answer that ended is not valid for its schema (checked with ``jsonschema``).

    python scripts/gpu_structured_bench.py --model Qwen/Qwen3-0.6B      # files under $OUT
    python scripts/gpu_structured_bench.py --device cpu --batches 1 2 --max-tokens 8  # smoke

A constrained request stops when its JSON is complete, so the constrained batch runs first
and the unconstrained one then generates exactly as many tokens per request (``ignore_eos``):
both runs do the same work, and the ratio of their tok/s is the constraint's overhead.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from tachyon.bench.common import (
    BenchError,
    check_can_plot,
    device_name,
    run_bench,
    save_figure,
    short_model_name,
    wrapped_title,
    write_json,
)

SCHEMAS: dict[str, dict[str, Any]] = {
    "person": {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 130}},
        "required": ["name", "age"], "additionalProperties": False},
    "order": {"type": "object", "properties": {
        "items": {"type": "array", "maxItems": 8, "items": {"type": "object", "properties": {
            "sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
            "quantity": {"type": "integer", "minimum": 1, "maximum": 99},
            "price": {"type": "number", "minimum": 0}},
            "required": ["sku", "quantity", "price"], "additionalProperties": False}},
        "status": {"enum": ["open", "paid", "shipped"]}},
        "required": ["items", "status"], "additionalProperties": False},
    "free_text": {"type": "object", "properties": {
        "summary": {"type": "string"}, "keywords": {"type": "array",
                                                    "items": {"type": "string"}}},
        "required": ["summary", "keywords"], "additionalProperties": False},
}
BENCH_SCHEMA = "order"  # the one the throughput runs are constrained by
PROMPT = "Write a JSON object describing a customer order with several items."


def compile_times(llm: Any) -> dict[str, dict[str, float]]:
    """Per schema: a cold compile (a fresh compiler, no cache) and a cached lookup, in ms."""
    from tachyon.structured_output.compiler import GrammarCompiler
    from tachyon.structured_output.params import StructuredOutputsParams

    compiler = GrammarCompiler(llm.get_tokenizer(), llm.engine.vocab_size)
    out = {}
    for name, schema in SCHEMAS.items():
        spec = StructuredOutputsParams(json=json.dumps(schema, sort_keys=True))
        t0 = time.perf_counter()
        compiler.compile(spec)
        t1 = time.perf_counter()
        compiler.compile(spec)
        out[name] = {"cold_ms": 1e3 * (t1 - t0), "cached_ms": 1e3 * (time.perf_counter() - t1)}
    return out


def timed(llm: Any, prompts: list[list[int]], params: list[Any]) -> tuple[list[Any], float]:
    llm.generate(prompts[:1], params[:1], use_tqdm=False)  # warm: graphs, grammar compiled
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    return outs, time.perf_counter() - t0


def run_pair(llm: Any, batch: int, max_tokens: int) -> list[dict[str, Any]]:
    """The constrained run, then the unconstrained one with the same token counts."""
    import jsonschema

    from tachyon import SamplingParams
    from tachyon.entrypoints.llm import apply_chat_template
    from tachyon.structured_output.params import StructuredOutputsParams

    schema = SCHEMAS[BENCH_SCHEMA]
    prompt = apply_chat_template(llm.get_tokenizer(), [{"role": "user", "content": PROMPT}])
    prompts = [prompt] * batch
    spec = StructuredOutputsParams(json=json.dumps(schema))
    cons = SamplingParams(temperature=0.0, max_tokens=max_tokens, structured_outputs=spec)
    outs, wall = timed(llm, prompts, [cons] * batch)
    lengths = [len(o.outputs[0].token_ids) for o in outs]
    ended = [o.outputs[0] for o in outs if o.outputs[0].finish_reason == "stop"]
    invalid = []
    for o in ended:
        try:
            jsonschema.validate(json.loads(o.text), schema)
        except (json.JSONDecodeError, jsonschema.ValidationError) as e:
            invalid.append(f"{o.text!r}: {str(e).splitlines()[0]}")
    if invalid:
        raise BenchError(f"B={batch}: {len(invalid)} constrained answers are not valid for "
                         f"the schema, e.g. {invalid[0]}")
    constrained = {"batch": batch, "constrained": True, "tokens": sum(lengths),
                   "seconds": wall, "tok_per_s": sum(lengths) / wall,
                   "ended": len(ended), "truncated": batch - len(ended)}
    free = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in lengths]
    outs, wall = timed(llm, prompts, free)
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    if tokens != sum(lengths):
        raise BenchError(f"B={batch}: the unconstrained run made {tokens} tokens, "
                         f"not {sum(lengths)}")
    return [{"batch": batch, "constrained": False, "tokens": tokens, "seconds": wall,
             "tok_per_s": tokens / wall}, constrained]


def table(result: dict[str, Any]) -> str:
    lines = ["| B | tok/s free | tok/s json_schema | overhead | tokens | ended / truncated |",
             "|---:|---:|---:|---:|---:|---|"]
    for b in result["batches"]:
        free, cons = (next(r for r in result["runs"] if r["batch"] == b
                           and r["constrained"] is c) for c in (False, True))
        lines.append(f"| {b} | {free['tok_per_s']:.1f} | {cons['tok_per_s']:.1f} | "
                     f"{100 * result['overhead'][str(b)]:.1f}% | {cons['tokens']} | "
                     f"{cons['ended']} / {cons['truncated']} |")
    lines += ["", "| schema | compile cold (ms) | cached (ms) |", "|---|---:|---:|"]
    for name, t in result["compile"].items():
        lines.append(f"| {name} | {t['cold_ms']:.1f} | {t['cached_ms']:.3f} |")
    return "\n".join(lines)


def plot(result: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 4))
    batches = result["batches"]
    xs = range(len(batches))
    for off, constrained, label in ((-0.2, False, "free"), (0.2, True, "json_schema")):
        ys = [next(r["tok_per_s"] for r in result["runs"]
                   if r["batch"] == b and r["constrained"] is constrained) for b in batches]
        ax.bar([x + off for x in xs], ys, width=0.4, label=label)
    for x, b in zip(xs, batches, strict=True):
        ax.annotate(f"{100 * result['overhead'][str(b)]:+.1f}%", (x, 0), ha="center",
                    va="bottom")
    ax.set_xticks(list(xs), [f"B={b}" for b in batches])
    ax.set_ylabel("generated tok/s")
    ax.legend()
    ax.set_title(wrapped_title(f"{short_model_name(result['model'])} on {result['device']}: "
                               f"'{BENCH_SCHEMA}' schema overhead"))
    names = list(result["compile"])
    bx.bar(names, [result["compile"][n]["cold_ms"] for n in names])
    bx.set_ylabel("cold grammar compile (ms)")
    bx.set_title("compile time per schema")
    save_figure(fig, path)


def main() -> int:
    out_dir = os.environ.get("OUT", "bench_results")
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="model (default: the embedded one)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: the engine's)")
    p.add_argument("--dtype", default=None, help="model dtype (default: the engine's)")
    p.add_argument("--max-tokens", type=int, default=256, help="per request (default: 256)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 64],
                   help="batch sizes (default: 1 64)")
    p.add_argument("--json", default=f"{out_dir}/structured_bench.json", metavar="PATH",
                   help="results (default: %(default)s; the table goes next to it as .md)")
    p.add_argument("--plot", default=f"{out_dir}/structured_bench.png", metavar="PATH",
                   help="PNG of the results (default: %(default)s)")
    args = p.parse_args()
    if args.max_tokens < 1 or min(args.batches) < 1:
        p.error("--max-tokens and --batches must be >= 1")

    def body() -> None:
        from tachyon import LLM

        check_can_plot(args.plot)
        engine = {k: v for k, v in (("device", args.device), ("dtype", args.dtype))
                  if v is not None}
        llm = LLM(model=args.model, max_num_seqs=max(args.batches), **engine)
        try:
            result: dict[str, Any] = {
                "model": args.model, "device": device_name(llm.engine.config.device),
                "max_tokens": args.max_tokens, "batches": args.batches,
                "bench_schema": BENCH_SCHEMA, "compile": compile_times(llm), "runs": []}
            for batch in args.batches:
                result["runs"] += run_pair(llm, batch, args.max_tokens)
        finally:
            llm.shutdown()
        result["overhead"] = {}
        for b in args.batches:
            free, cons = (next(r for r in result["runs"] if r["batch"] == b
                               and r["constrained"] is c) for c in (False, True))
            result["overhead"][str(b)] = 1 - cons["tok_per_s"] / free["tok_per_s"]
        text = table(result)
        print(text)
        write_json(args.json, result)
        Path(args.json).with_suffix(".md").write_text(text + "\n")
        plot(result, args.plot)
        print(f"wrote {args.json}, {Path(args.json).with_suffix('.md')}, {args.plot}")

    return run_bench("gpu_structured_bench", body)


if __name__ == "__main__":
    sys.exit(main())
