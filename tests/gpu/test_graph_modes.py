"""Greedy tokens are identical in every CUDA graph mode (GPU only).

float32 keeps rounding differences between padded and unpadded batches (different matmul
shapes) far below the logit gaps of the random models, so the comparison can be exact.
Batch sizes are odd on purpose (padding), prompts share prefixes (prefix-cache hits) and the
token budget is small (chunked prefill).
"""

from __future__ import annotations

import random

import pytest
import torch

from tachyon import LLM, SamplingParams

pytestmark = pytest.mark.gpu

BATCH_SIZES = [1, 7, 25, 45, 123, 200]
MODES = [
    ("NONE", "breakable"),
    ("PIECEWISE", "breakable"),
    ("PIECEWISE", "compile"),
    ("FULL", "breakable"),
    ("FULL_DECODE_ONLY", "breakable"),
    ("FULL_AND_PIECEWISE", "breakable"),
]


def _prompts(vocab: int, n: int = 200) -> list[list[int]]:
    rng = random.Random(1234)
    prefixes = [[rng.randrange(vocab) for _ in range(48)] for _ in range(3)]
    return [prefixes[i % 3] + [rng.randrange(vocab) for _ in range(rng.randint(1, 64))]
            for i in range(n)]


def _run(model: str, load_format: str, mode: str, pw: str, backend: str,
         prompts: list[list[int]]) -> dict[int, list[list[int]]]:
    llm = LLM(model, load_format=load_format, dtype="float32", max_model_len=512,
              max_num_seqs=256, max_num_batched_tokens=1024, gpu_memory_utilization=0.5,
              attention_backend=backend, cudagraph_mode=mode,
              compilation_config={"piecewise_backend": pw})
    try:
        sp = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
        out = {}
        for b in BATCH_SIZES:
            res = llm.generate(prompts[:b], sp, use_tqdm=False)
            out[b] = [r.outputs[0].token_ids for r in res]
        assert llm.engine.kv.num_free_blocks == llm.engine.kv.pool.num_blocks
        return out
    finally:
        llm.shutdown()


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=2, head_dim=32,
                      vocab_size=2048, max_position_embeddings=1024)
    d = tmp_path_factory.mktemp("tiny_llama")
    LlamaForCausalLM(cfg).save_pretrained(d, safe_serialization=True)
    return str(d)


@pytest.mark.parametrize("backend", ["triton", "flex"])
def test_modes_identical_qwen3(backend):
    """Every mode of every full-graph backend gives the triton backend's eager tokens."""
    prompts = _prompts(10000)
    ref = _run("qwen3-0.6b", "dummy", "NONE", "breakable", "triton", prompts)
    for mode, pw in MODES if backend != "triton" else MODES[1:]:
        got = _run("qwen3-0.6b", "dummy", mode, pw, backend, prompts)
        for b in BATCH_SIZES:
            assert got[b] == ref[b], f"{backend} {mode}/{pw} differs from triton NONE at B={b}"


def test_modes_identical_tiny_llama(tiny_llama_dir):
    prompts = _prompts(2048)
    ref = _run(tiny_llama_dir, "auto", "NONE", "breakable", "torch", prompts)
    for mode, pw in MODES[1:]:
        got = _run(tiny_llama_dir, "auto", mode, pw, "triton", prompts)
        for b in BATCH_SIZES:
            assert got[b] == ref[b], f"{mode}/{pw} (triton) differs from torch/NONE at B={b}"
