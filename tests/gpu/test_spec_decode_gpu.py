"""n-gram speculative decoding gives plain greedy's tokens in every CUDA graph mode (GPU only).

Batch sizes are odd on purpose (padding of verify graphs: padded requests take 1 + k tokens);
prompts repeat phrases so drafts are proposed and accepted, share prefixes (prefix-cache
hits), and the token budget is small (chunked prefill next to verify batches). float32 keeps
rounding between padded and unpadded shapes far below the random models' logit gaps.
"""

from __future__ import annotations

import random

import pytest

from tachyon import LLM, SamplingParams
from tachyon_testing import write_tiny_model

pytestmark = pytest.mark.gpu

BATCH_SIZES = [1, 7, 25, 45, 123]
KS = [1, 3, 5]
MODES = [
    ("NONE", "breakable"),
    ("PIECEWISE", "breakable"),
    ("PIECEWISE", "compile"),
    ("FULL", "breakable"),
    ("FULL_DECODE_ONLY", "breakable"),
    ("FULL_AND_PIECEWISE", "breakable"),
]
VOCAB = 128


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return str(write_tiny_model(tmp_path_factory.mktemp("spec_gpu"), "llama", seed=3,
                                vocab_size=VOCAB, hidden_size=256, intermediate_size=512,
                                num_hidden_layers=4, num_attention_heads=8,
                                num_key_value_heads=2, head_dim=32,
                                max_position_embeddings=1024))


def _prompts(n: int = max(BATCH_SIZES)) -> list[list[int]]:
    rng = random.Random(14)
    prefixes = [[rng.randrange(VOCAB) for _ in range(40)] for _ in range(3)]
    out = []
    for i in range(n):
        phrase = [rng.randrange(VOCAB) for _ in range(rng.randint(2, 8))]
        out.append(prefixes[i % 3] + (phrase * 20)[:rng.randint(8, 80)])
    return out


def _run(model: str, mode: str, pw: str, k: int | None,
         prompts: list[list[int]]) -> tuple[dict[int, list[list[int]]], dict]:
    spec = None if k is None else {"method": "ngram", "num_speculative_tokens": k,
                                   "prompt_lookup_min": 1}
    llm = LLM(model, dtype="float32", max_model_len=512, max_num_seqs=128,
              max_num_batched_tokens=768, gpu_memory_utilization=0.5,
              attention_backend="triton", cudagraph_mode=mode,
              compilation_config={"piecewise_backend": pw}, speculative_config=spec)
    try:
        sp = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
        out = {b: [r.outputs[0].token_ids for r in llm.generate(prompts[:b], sp,
                                                                 use_tqdm=False)]
               for b in BATCH_SIZES}
        assert llm.engine.kv.num_free_blocks == llm.engine.kv.pool.num_blocks
        return out, {**llm.engine.stats, **llm.engine.executor.graph_stats}
    finally:
        llm.shutdown()


@pytest.mark.parametrize("k", KS)
def test_ngram_greedy_identical_in_every_mode(model_dir, k):
    prompts = _prompts()
    ref, _ = _run(model_dir, "NONE", "breakable", None, prompts)
    for mode, pw in MODES:
        got, stats = _run(model_dir, mode, pw, k, prompts)
        for b in BATCH_SIZES:
            assert got[b] == ref[b], f"k={k} {mode}/{pw} differs from plain greedy at B={b}"
        assert stats["spec_acceptance_rate"] > 0, f"k={k} {mode}: no draft accepted"
        if mode in ("FULL", "FULL_DECODE_ONLY", "FULL_AND_PIECEWISE"):
            assert stats["verify_graphs"] > 0, f"k={k} {mode}: no verify graph captured"
