"""RL weight sync and memory lending on a GPU: ``update_weights``, ``sleep`` and ``wake_up``
for the qwen3-0.6b and qwen3-8b dummy presets (bf16).

    OUT=./out python scripts/gpu_rl_bench.py                 # both presets, ~3-5 min (H200)
    OUT=./out python scripts/gpu_rl_bench.py --models qwen3-0.6b --repeats 3

Per model, on one engine (default graph mode, so wake-up re-captures real CUDA graphs):

* ``update_weights`` of a full HF-named state dict, a trainer's: bf16 on the GPU (the common
  case, target <= 0.1 s for 0.6b; TRL reports ~0.18 s per sync for Qwen3-0.6B with vLLM on an
  H100), fp32 on the GPU (dtype conversion), bf16 in host memory. Median of ``--repeats``
  after a warm-up; parameter addresses are checked unchanged.
* ``sleep(1)`` / ``wake_up()``: bytes released and regained (KV cache, and the device's
  free memory, which includes the graphs' pool), the time of each, and of the re-capture.
* ``sleep(2)`` / ``wake_up()`` + ``update_weights``: the same with the weights.
* Greedy outputs before and after each cycle must be equal (same weights pushed back).

Writes $OUT/rl_bench.json (default ./out) and prints a table.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch

from tachyon import LLM, SamplingParams
from tachyon.loader.weights import iterate_dummy

MODELS = ("qwen3-0.6b", "qwen3-8b")
# Leave room next to the engine for the trainer's state dicts (8b: 16 GB bf16 + 32 GB fp32).
GPU_MEMORY_UTILIZATION = 0.55
PROMPTS = [[1000 + 17 * i + j for j in range(24)] for i in range(4)]
GREEDY = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
GIB = 2**30


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=list(MODELS))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--max-model-len", type=int, default=4096)
    return p.parse_args()


def state_dict(llm: LLM, dtype: torch.dtype) -> list[tuple[str, torch.Tensor]]:
    """A trainer's HF-named full tensors on the GPU: the engine's own dummy weights (same
    seed, same device's generator), so a push changes nothing and outputs can be compared
    across the cycles (fp32 rounds to the same bf16 values)."""
    mc = llm.engine.config.model
    return list(iterate_dummy(mc.hf_config, mc.seed, llm.engine.executor.runner.device, dtype))


def greedy(llm: LLM) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]


def time_updates(llm: LLM, tensors: list[tuple[str, torch.Tensor]], repeats: int) -> dict:
    llm.update_weights(tensors)  # warm-up
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        llm.update_weights(tensors)
        seconds.append(time.perf_counter() - start)
    nbytes = sum(t.nbytes for _, t in tensors)
    med = statistics.median(seconds)
    return {"median_s": med, "min_s": min(seconds), "bytes": nbytes,
            "gb_per_s": nbytes / med / 1e9}


def addresses(llm: LLM) -> dict[str, int]:
    return {n: p.data_ptr() for n, p in llm.engine.executor.runner.model.named_parameters()}


def sleep_cycle(llm: LLM, level: int, tensors: list[tuple[str, torch.Tensor]]) -> dict:
    free_awake = torch.cuda.mem_get_info()[0]
    slept = llm.sleep(level)
    free_asleep = torch.cuda.mem_get_info()[0]
    start = time.perf_counter()
    woke = llm.wake_up()
    wake_s = time.perf_counter() - start
    out: dict[str, Any] = {"sleep": dataclasses.asdict(slept), "wake_up": dataclasses.asdict(woke),
                           "wake_up_s": wake_s,
                           "free_gib_awake": free_awake / GIB, "free_gib_asleep": free_asleep / GIB}
    if level == 2:
        start = time.perf_counter()
        llm.update_weights(tensors)
        out["update_after_wake_s"] = time.perf_counter() - start
    return out


def bench_model(name: str, args: argparse.Namespace) -> dict:
    start = time.perf_counter()
    llm = LLM(name, load_format="dummy", dtype="bfloat16", max_model_len=args.max_model_len,
              gpu_memory_utilization=GPU_MEMORY_UTILIZATION)
    result: dict[str, Any] = {"model": name, "startup_s": time.perf_counter() - start,
                              "graph_stats": dict(llm.engine.executor.runner.graph_stats)}
    want = greedy(llm)
    where = addresses(llm)
    bf16 = state_dict(llm, torch.bfloat16)
    result["update_gpu_bf16"] = time_updates(llm, bf16, args.repeats)
    fp32 = state_dict(llm, torch.float32)
    result["update_gpu_fp32"] = time_updates(llm, fp32, args.repeats)
    del fp32
    host = [(n, t.cpu()) for n, t in bf16]
    result["update_host_bf16"] = time_updates(llm, host, max(1, args.repeats // 2))
    del host
    gc.collect()
    torch.cuda.empty_cache()
    result["addresses_unchanged"] = addresses(llm) == where
    result["same_output_after_updates"] = greedy(llm) == want
    result["sleep1"] = sleep_cycle(llm, 1, bf16)
    result["same_output_after_sleep1"] = greedy(llm) == want
    result["sleep2"] = sleep_cycle(llm, 2, bf16)
    result["same_output_after_sleep2"] = greedy(llm) == want
    llm.shutdown()
    del llm, bf16
    gc.collect()
    torch.cuda.empty_cache()
    return result


def print_table(results: list[dict]) -> None:
    rows = [
        ("update_weights bf16 GPU (s)", lambda r: f"{r['update_gpu_bf16']['median_s']:.4f}"),
        ("  GB/s", lambda r: f"{r['update_gpu_bf16']['gb_per_s']:.0f}"),
        ("update_weights fp32 GPU (s)", lambda r: f"{r['update_gpu_fp32']['median_s']:.4f}"),
        ("update_weights bf16 host (s)", lambda r: f"{r['update_host_bf16']['median_s']:.3f}"),
        ("addresses unchanged", lambda r: str(r["addresses_unchanged"])),
        ("sleep(1) KV GiB", lambda r: f"{r['sleep1']['sleep']['kv_cache_bytes'] / GIB:.2f}"),
        ("sleep(1) device GiB freed", lambda r: _gib(r["sleep1"]["sleep"]["device_bytes"])),
        ("sleep(1) s", lambda r: f"{r['sleep1']['sleep']['seconds']:.3f}"),
        ("wake_up after 1 (s)", lambda r: f"{r['sleep1']['wake_up_s']:.3f}"),
        ("  of which capture (s)",
         lambda r: f"{r['sleep1']['wake_up']['graph_capture_seconds']:.3f}"),
        ("sleep(2) weights GiB", lambda r: f"{r['sleep2']['sleep']['weight_bytes'] / GIB:.2f}"),
        ("sleep(2) device GiB freed", lambda r: _gib(r["sleep2"]["sleep"]["device_bytes"])),
        ("wake_up after 2 (s)", lambda r: f"{r['sleep2']['wake_up_s']:.3f}"),
        ("  + update_weights (s)", lambda r: f"{r['sleep2']['update_after_wake_s']:.3f}"),
        ("device GiB taken back (2)", lambda r: _gib(r["sleep2"]["wake_up"]["device_bytes"])),
        ("same greedy output (all)", lambda r: str(all(
            r[k] for k in ("same_output_after_updates", "same_output_after_sleep1",
                           "same_output_after_sleep2")))),
    ]
    width = max(len(label) for label, _ in rows)
    print(f"{'':{width}}  " + "  ".join(f"{r['model']:>12}" for r in results))
    for label, cell in rows:
        print(f"{label:{width}}  " + "  ".join(f"{cell(r):>12}" for r in results))


def _gib(nbytes: int | None) -> str:
    return "n/a" if nbytes is None else f"{nbytes / GIB:.2f}"


def main() -> int:
    args = parse_args()
    if not torch.cuda.is_available():
        print("gpu_rl_bench needs a CUDA GPU", file=sys.stderr)
        return 1
    out_dir = Path(os.environ.get("OUT", "./out"))
    out_dir.mkdir(parents=True, exist_ok=True)
    results = [bench_model(name, args) for name in args.models]
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    (out_dir / "rl_bench.json").write_text(json.dumps({"meta": meta, "results": results},
                                                      indent=2))
    print_table(results)
    print(f"wrote {out_dir / 'rl_bench.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
