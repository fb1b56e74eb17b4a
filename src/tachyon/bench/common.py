"""Shared pieces of the benchmarks: the standard workload, hardware ceilings, output files."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any

import torch

# BENCHMARKS.md: 256 prompts of 100..1024 random ids (< 10000), outputs of 100..1024 tokens.
STANDARD_NUM_PROMPTS = 256
STANDARD_LEN_RANGE = (100, 1024)
STANDARD_VOCAB_CAP = 10000


def standard_workload(num_prompts: int = STANDARD_NUM_PROMPTS,
                      input_len: tuple[int, int] = STANDARD_LEN_RANGE,
                      output_len: tuple[int, int] = STANDARD_LEN_RANGE,
                      seed: int = 0) -> tuple[list[list[int]], list[int]]:
    """Exactly the nano-vllm workload with the defaults (prompts drawn first, then lengths)."""
    random.seed(seed)
    prompts = [[random.randint(0, STANDARD_VOCAB_CAP) for _ in range(random.randint(*input_len))]
               for _ in range(num_prompts)]
    max_tokens = [random.randint(*output_len) for _ in range(num_prompts)]
    return prompts, max_tokens


def measure_copy_bandwidth(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus written."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).uniform_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    reps = 20
    start.record()
    for _ in range(reps):
        dst.copy_(src)
    end.record()
    torch.cuda.synchronize()
    return 2 * nbytes * reps / (start.elapsed_time(end) / 1e3)


def measure_matmul_flops(device: torch.device, n: int = 8192) -> float:
    """bf16 matmul rate in FLOP/s on random data."""
    a = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    b = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    reps = 10
    start.record()
    for _ in range(reps):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return 2 * n**3 * reps / (start.elapsed_time(end) / 1e3)


def model_bytes_and_kv(hf_config: Any, dtype_bytes: int = 2) -> tuple[int, int, int]:
    """(weight bytes, KV bytes per token, parameter count) of a Llama-family config."""
    c = hf_config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    q = c.num_attention_heads * head_dim
    kv = c.num_key_value_heads * head_dim
    per_layer = c.hidden_size * (q + 2 * kv) + q * c.hidden_size \
        + 3 * c.hidden_size * c.intermediate_size
    params = c.num_hidden_layers * per_layer + c.vocab_size * c.hidden_size * (
        1 if getattr(c, "tie_word_embeddings", False) else 2)
    kv_per_token = c.num_hidden_layers * 2 * kv * dtype_bytes
    return params * dtype_bytes, kv_per_token, params


def throughput_floor_seconds(hf_config: Any, prompts: list[list[int]], max_tokens: list[int],
                             bandwidth: float, flops: float, tp: int = 1) -> dict[str, float]:
    """What the hardware cannot beat: each decode token reads its whole context's KV once,
    each decode step reads the weights once, prefill is compute."""
    weight_bytes, kv_tok, params = model_bytes_and_kv(hf_config)
    kv_bytes = sum(sum(len(p) + i for i in range(m)) for p, m in zip(prompts, max_tokens,
                                                                       strict=True)) * kv_tok
    steps = max(max_tokens)
    prefill_flops = 2 * params * sum(len(p) for p in prompts)
    t_kv = kv_bytes / (bandwidth * tp)
    t_w = weight_bytes * steps / (bandwidth * tp)
    t_pf = prefill_flops / (flops * tp)
    return {"kv_read_s": t_kv, "weight_read_s": t_w, "prefill_compute_s": t_pf,
            "floor_s": t_kv + t_w + t_pf, "kv_bytes": kv_bytes}


def write_json(path: str | None, data: dict[str, Any]) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(data, indent=2, default=str))


def timestamp() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S")


def device_name() -> str:
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
