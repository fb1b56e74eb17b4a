"""Logits parity with HF transformers, through the whole engine and the paged KV cache.

tachyon generates greedily (prefill, then 20 decode steps) while a hook records the logits
that reach the sampler; HF transformers then scores the same token sequences in one
cache-free forward (float64, eager attention), and every step's logits must agree within
1e-4 relative error. Batches mix prompt lengths, cross block boundaries (block size 4 and
16), chunk prefills under a small token budget and share prefixes through the prefix cache.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import pytest
import torch

from tachyon.config import EngineArgs
from tachyon.engine.llm_engine import LLMEngine
from tachyon.sampling_params import SamplingParams
from tachyon_testing import TINY_SPECS, TINY_VOCAB, load_hf

REL_TOL = 1e-4
GGUF_REL_TOL = 1e-3
NUM_DECODE_STEPS = 20


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def generate_with_logits(engine: LLMEngine, prompts: list[list[int]], max_tokens: int,
                         stagger: int = 0) -> list[tuple[list[int], torch.Tensor]]:
    """Greedy-generate ``prompts``; return per prompt (output ids, logits [max_tokens, V]).

    ``stagger``: add prompt i only after ``i * stagger`` engine steps, so later prompts find
    earlier ones' blocks in the prefix cache (or running next to them).
    """
    runner = engine.executor.runner
    captured: list[torch.Tensor] = []
    per_req: dict[str, list[torch.Tensor]] = {}
    sampler, execute = runner.sampler, runner.execute

    def capturing_sampler(logits: torch.Tensor, meta: Any) -> Any:
        captured.append(logits.detach().clone())
        return sampler(logits, meta)

    def capturing_execute(out: Any) -> Any:
        before = len(captured)
        result = execute(out)
        if len(captured) > before:
            rows = captured[-1]
            assert rows.shape[0] == len(result.request_ids)
            for rid, row in zip(result.request_ids, rows, strict=True):
                per_req.setdefault(rid, []).append(row)
        return result

    runner.sampler, runner.execute = capturing_sampler, capturing_execute
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    outputs: dict[str, list[int]] = {}
    pending = list(enumerate(prompts))
    steps = 0
    try:
        while pending or engine.has_unfinished_requests():
            while pending and pending[0][0] * stagger <= steps:
                i, prompt = pending.pop(0)
                engine.add_request(f"p{i}", prompt, params)
            for out in engine.step():
                if out.finished:
                    outputs[out.request_id] = out.outputs[0].token_ids
            steps += 1
    finally:
        runner.sampler, runner.execute = sampler, execute
    assert engine.num_free_blocks() == engine.kv.pool.num_blocks
    return [(outputs[f"p{i}"], torch.stack(per_req[f"p{i}"])) for i in range(len(prompts))]


def hf_reference(model: Any, prompt: list[int], output: list[int]) -> torch.Tensor:
    """HF logits predicting each output token: positions len(prompt)-1 .. end-1."""
    ids = torch.tensor([prompt + output[:-1]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0]
    return logits[len(prompt) - 1:]


def check_against_hf(hf_model: Any, prompts: list[list[int]],
                     results: list[tuple[list[int], torch.Tensor]]) -> None:
    for prompt, (output, logits) in zip(prompts, results, strict=True):
        assert len(output) == NUM_DECODE_STEPS + 1
        ref = hf_reference(hf_model, prompt, output)
        assert logits.shape == ref.shape
        errors = [rel_err(logits[i], ref[i]) for i in range(len(output))]
        assert max(errors) < REL_TOL, f"prompt len {len(prompt)}: per-step errors {errors}"
        # Greedy: each token is the reference argmax (unless the top two nearly tie).
        top2 = ref.topk(2, dim=-1)
        for i, tok in enumerate(output):
            if top2.values[i, 0] - top2.values[i, 1] > 1e-3:
                assert tok == int(top2.indices[i, 0]), f"step {i}"


def make_engine(path: str | Path, **kwargs: Any) -> LLMEngine:
    args = dict(model=str(path), device="cpu", dtype="float32", max_model_len=256,
                max_num_seqs=8)
    args.update(kwargs)
    return LLMEngine.from_engine_args(EngineArgs(**args))


def random_prompts(rng: random.Random, lengths: list[int]) -> list[list[int]]:
    return [[rng.randrange(TINY_VOCAB) for _ in range(n)] for n in lengths]


@pytest.fixture(scope="module")
def hf_models(tiny_models: dict[str, Path]) -> dict[str, Any]:
    return {name: load_hf(path) for name, path in tiny_models.items()}


@pytest.mark.parametrize("block_size", [16, 4])
@pytest.mark.parametrize("name", list(TINY_SPECS))
def test_prefill_and_decode_match_hf(name: str, block_size: int, tiny_models: dict[str, Path],
                                     hf_models: dict[str, Any]) -> None:
    """Three prompts batched together, whole prefills in one step, then 20 decode steps."""
    rng = random.Random(f"{name}-{block_size}")
    prompts = random_prompts(rng, [1, rng.randint(5, 15), rng.randint(30, 70)])
    engine = make_engine(tiny_models[name], block_size=block_size)
    results = generate_with_logits(engine, prompts, NUM_DECODE_STEPS + 1)
    check_against_hf(hf_models[name], prompts, results)


@pytest.mark.parametrize("name", list(TINY_SPECS))
def test_chunked_prefill_and_prefix_hits_match_hf(name: str, tiny_models: dict[str, Path],
                                                  hf_models: dict[str, Any]) -> None:
    """A token budget of 12 chunks every prefill and mixes it with decodes; prompts that
    share 8..20-token prefixes arrive staggered, so later ones start from cached blocks
    (some registered by a request that is still running)."""
    rng = random.Random(name)
    base = random_prompts(rng, [40])[0]
    prompts = [base[:n] + random_prompts(rng, [rng.randint(1, 9)])[0] for n in (20, 8, 13, 20)]
    prompts.append(random_prompts(rng, [33])[0])
    engine = make_engine(tiny_models[name], block_size=4, max_num_batched_tokens=12,
                         max_num_seqs=4)
    results = generate_with_logits(engine, prompts, NUM_DECODE_STEPS + 1, stagger=3)
    assert engine.kv.prefix_hits > 0, "the scenario should hit the prefix cache"
    check_against_hf(hf_models[name], prompts, results)


@pytest.mark.slow  # transformers dequantizes the GGUF itself: ~30 s on the 2-core machine
def test_gguf_default_model_matches_transformers_gguf(default_llm: Any, default_gguf: str,
                                                      smol_tokenizer: Any) -> None:
    """The embedded SmolLM2 Q4_1 GGUF: tachyon's dequantized weights (and undone Q/K
    permutation) give the logits of transformers' own GGUF load of the same file."""
    from transformers import AutoModelForCausalLM

    prompt = smol_tokenizer.encode("The quick brown fox jumps over the lazy dog because")
    engine = default_llm.engine
    (output, logits), = generate_with_logits(engine, [prompt], 4)
    hf = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(default_gguf), gguf_file=os.path.basename(default_gguf),
        dtype=torch.float32).eval()
    ref = hf_reference(hf, prompt, output)
    errors = [rel_err(logits[i], ref[i]) for i in range(len(output))]
    assert max(errors) < GGUF_REL_TOL, errors
    assert output == ref.argmax(dim=-1).tolist()
