"""Structured-output overhead on the GPU, for issue 16: decode tok/s with and without a
``json_schema`` constraint at batch sizes 1 and 64 (offline ``LLM``, greedy, a fixed number
of tokens per request), and the grammar compile time of each schema (cold, then cached).

    python scripts/gpu_structured_bench.py --model Qwen/Qwen3-0.6B   # JSON under $OUT

A constrained request stops when its JSON is complete, so both runs count generated tokens
and divide by wall time; ``ignore_eos`` keeps the unconstrained run at full length.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

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
PROMPT = "Write a JSON object describing a customer order with several items."


def compile_times(llm: Any) -> dict[str, dict[str, float]]:
    from tachyon.structured_output.compiler import GrammarCompiler
    from tachyon.structured_output.params import StructuredOutputsParams

    compiler = GrammarCompiler(llm.get_tokenizer(), llm.engine.core.vocab_size)
    out = {}
    for name, schema in SCHEMAS.items():
        spec = StructuredOutputsParams(json=json.dumps(schema, sort_keys=True))
        t0 = time.perf_counter()
        compiler.compile(spec)
        t1 = time.perf_counter()
        compiler.compile(spec)
        out[name] = {"cold_ms": 1e3 * (t1 - t0), "cached_ms": 1e3 * (time.perf_counter() - t1)}
    return out


def run(llm: Any, batch: int, max_tokens: int, schema: dict[str, Any] | None) -> dict[str, Any]:
    from tachyon import SamplingParams
    from tachyon.structured_output.params import StructuredOutputsParams

    spec = None if schema is None else StructuredOutputsParams(json=json.dumps(schema))
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=spec is None,
                            structured_outputs=spec)
    prompts = [[{"role": "user", "content": PROMPT}]] * batch
    llm.chat(prompts[:1], params, use_tqdm=False)  # warm: graphs, and the grammar compiled
    t0 = time.perf_counter()
    outs = llm.chat(prompts, params, use_tqdm=False)
    wall = time.perf_counter() - t0
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    valid = sum(_is_json(o.outputs[0].text) for o in outs) if spec is not None else None
    return {"batch": batch, "constrained": spec is not None, "tokens": tokens,
            "seconds": wall, "tok_per_s": tokens / wall, "valid_json": valid}


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except json.JSONDecodeError:
        return False
    return True


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="model (default: the embedded one)")
    p.add_argument("--max-tokens", type=int, default=256, help="per request (default: 256)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 64],
                   help="batch sizes (default: 1 64)")
    p.add_argument("--out", default=os.environ.get("OUT", "."),
                   help="folder for structured_bench.json (default: $OUT, else .)")
    args = p.parse_args()
    from tachyon import LLM

    llm = LLM(model=args.model, max_num_seqs=max(args.batches))
    result: dict[str, Any] = {"model": args.model, "compile": compile_times(llm), "runs": []}
    for batch in args.batches:
        for schema in (None, SCHEMAS["order"]):
            r = run(llm, batch, args.max_tokens, schema)
            result["runs"].append(r)
            print(json.dumps(r), flush=True)
    for batch in args.batches:
        free, cons = (next(r for r in result["runs"] if r["batch"] == batch
                           and r["constrained"] is c) for c in (False, True))
        result[f"overhead_b{batch}"] = 1 - cons["tok_per_s"] / free["tok_per_s"]
    path = Path(args.out) / "structured_bench.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
