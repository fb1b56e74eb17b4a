"""LoRA overhead on a GPU: decode step time with adapters against the base model (bf16).

    OUT=./out python scripts/gpu_lora_bench.py                       # qwen3-0.6b and -8b
    OUT=./out python scripts/gpu_lora_bench.py --models qwen3-0.6b --steps 50

Per model (dummy weights) and batch size (1 and 64), the mean decode step over ``--steps``
steps after a warm-up, timed with CUDA events around ``engine.step()`` (default graph mode:
FULL_AND_PIECEWISE, so decode steps replay full graphs):

* ``base``: an engine without LoRA;
* ``lora0``: a LoRA engine (``max_loras=4``, rank 16), requests without an adapter;
* ``lora1`` / ``lora4``: the LoRA engine with 1 or 4 distinct rank-16 adapters on every
  projection, requests spread round-robin over them.

The issue's target: ``lora4`` at most 15% over ``base`` at B=64. Adapters are written as
PEFT directories (random A and B) under a temporary directory. ``lora0`` should match
``base``: batches without adapters replay graphs without the LoRA kernels. Also reported per
engine: its graph count, capture seconds and pool MiB (the LoRA engine captures every graph
twice). Writes $OUT/lora_bench.json (default ./out) and prints a table.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch

from tachyon import LLM, LoRARequest, SamplingParams

MODELS = ("qwen3-0.6b", "qwen3-8b")
BATCHES = (1, 64)
RANK, ALPHA, NUM_ADAPTERS = 16, 32, 4
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
WARMUP_STEPS = 8  # the prefill step, then decodes until graphs and kernels are warm
PROMPT_LEN = 32
# Adapter entries: small, so outputs stay finite over many dummy-weight layers.
ADAPTER_STD = 0.01


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=list(MODELS))
    p.add_argument("--steps", type=int, default=100, help="timed decode steps per case")
    p.add_argument("--max-model-len", type=int, default=1024)
    return p.parse_args()


def module_shapes(cfg: Any) -> dict[str, tuple[int, int]]:
    """HF module -> (out, in) features of a Llama-family layer."""
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    q, kv = cfg.num_attention_heads * head_dim, cfg.num_key_value_heads * head_dim
    h, i = cfg.hidden_size, cfg.intermediate_size
    return {"self_attn.q_proj": (q, h), "self_attn.k_proj": (kv, h),
            "self_attn.v_proj": (kv, h), "self_attn.o_proj": (h, q),
            "mlp.gate_proj": (i, h), "mlp.up_proj": (i, h), "mlp.down_proj": (h, i)}


def write_adapter(path: Path, cfg: Any, seed: int) -> Path:
    """A PEFT-format rank-16 adapter on every projection of every layer."""
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(cfg.num_hidden_layers):
        for module, (out_f, in_f) in module_shapes(cfg).items():
            key = f"base_model.model.model.layers.{layer}.{module}"
            tensors[f"{key}.lora_A.weight"] = (ADAPTER_STD * torch.randn(
                RANK, in_f, generator=gen)).bfloat16()
            tensors[f"{key}.lora_B.weight"] = (ADAPTER_STD * torch.randn(
                out_f, RANK, generator=gen)).bfloat16()
    path.mkdir(parents=True)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": RANK, "lora_alpha": ALPHA, "target_modules": list(TARGETS)}))
    return path


def decode_ms(llm: LLM, batch: int, loras: list[LoRARequest], steps: int) -> float:
    """Mean decode step (ms) of ``batch`` requests spread over ``loras`` (none if empty)."""
    engine = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=WARMUP_STEPS + steps + 4,
                            ignore_eos=True)
    ids = []
    for i in range(batch):
        prompt = [(17 * i + j) % 5000 + 100 for j in range(PROMPT_LEN)]
        lora = loras[i % len(loras)] if loras else None
        ids.append(engine.add_request(f"bench-{batch}-{len(loras)}-{i}", prompt, params,
                                      lora_request=lora))
    for _ in range(WARMUP_STEPS):
        engine.step()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(steps):
        engine.step()
    end.record()
    torch.cuda.synchronize()
    engine.abort_request(ids)
    while engine.has_unfinished_requests():
        engine.step()
    return start.elapsed_time(end) / steps


def graph_cost(llm: LLM) -> dict[str, Any]:
    """What the engine's graphs cost at start-up: with LoRA each is captured twice (with and
    without the LoRA kernels, docs/lora.md)."""
    stats = llm.engine.executor.graph_stats
    return {k: stats[k] for k in ("graphs", "capture_s", "pool_mib")}


def bench_model(model: str, args: argparse.Namespace,
                root: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    kw = dict(load_format="dummy", max_model_len=args.max_model_len, max_num_seqs=max(BATCHES),
              gpu_memory_utilization=0.5)
    rows = []
    llm = LLM(model, **kw)
    graphs = {"base": graph_cost(llm)}
    for b in BATCHES:
        rows.append({"model": model, "batch": b, "case": "base",
                     "step_ms": decode_ms(llm, b, [], args.steps)})
    cfg = llm.engine.config.model.hf_config
    llm.shutdown()
    del llm  # the base engine's KV cache must be gone before the LoRA engine sizes its own
    gc.collect()
    torch.cuda.empty_cache()
    adapters = [LoRARequest(f"bench{i}", i + 1,
                            str(write_adapter(root / f"{model}-{i}", cfg, seed=i)))
                for i in range(NUM_ADAPTERS)]
    llm = LLM(model, enable_lora=True, max_lora_rank=RANK, max_loras=NUM_ADAPTERS, **kw)
    graphs["lora"] = graph_cost(llm)
    for b in BATCHES:
        for case, loras in (("lora0", []), ("lora1", adapters[:1]), ("lora4", adapters)):
            rows.append({"model": model, "batch": b, "case": case,
                         "step_ms": decode_ms(llm, b, loras, args.steps)})
    llm.shutdown()
    base = {r["batch"]: r["step_ms"] for r in rows if r["case"] == "base"}
    for r in rows:
        r["overhead"] = r["step_ms"] / base[r["batch"]] - 1.0
    return rows, graphs


def main() -> None:
    args = parse_args()
    out = Path(os.environ.get("OUT", "./out"))
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    graphs: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models:
            model_rows, graphs[model] = bench_model(model, args, Path(tmp))
            rows += model_rows
    (out / "lora_bench.json").write_text(json.dumps(
        {"device": torch.cuda.get_device_name(), "rank": RANK, "steps": args.steps,
         "rows": rows, "graphs": graphs}, indent=2))
    print(f"{'model':12s} {'B':>4s} {'case':6s} {'step ms':>8s} {'vs base':>8s}")
    for r in rows:
        print(f"{r['model']:12s} {r['batch']:4d} {r['case']:6s} {r['step_ms']:8.3f} "
              f"{100 * r['overhead']:+7.1f}%")
    for model, cost in graphs.items():
        print(f"{model}: graphs " + ", ".join(f"{case} {c['graphs']} in {c['capture_s']} s, "
                                              f"{c['pool_mib']} MiB"
                                              for case, c in cost.items()))


if __name__ == "__main__":
    main()
