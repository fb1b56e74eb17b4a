"""Prompt logprobs (``SamplingParams.prompt_logprobs``) against HF transformers in float64.

Every prompt position after the first must carry the log-softmax HF gives for that prompt
token, and HF's top-k, within 1e-4, and the token's exact rank (1 + the number of vocabulary
entries with a greater HF logprob; random prompt tokens fall far outside the top-k): for a
prompt longer than the token budget (its prefill is chunked over several steps, and scored
in slices of max_num_seqs rows), batched with requests that want none or another k; with
asynchronous scheduling, speculative decoding and emulated FULL CUDA graphs (a 2-token
prefill alone replays a mixed FULL graph) too; under preemption; and through
``LLM.generate``.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
import torch

from graph_testing import PersistentTorchBackend
from tachyon.config import EngineArgs
from tachyon.engine.llm_engine import LLMEngine
from tachyon.outputs import RequestOutput
from tachyon.sampling_params import SamplingParams
from tachyon.worker import model_runner
from tachyon_testing import TINY_VOCAB, load_hf

ABS_TOL = 1e-4
TOKEN_BUDGET = 12  # below the long prompt's length: its prefill takes several steps
ENGINE_VARIANTS = {
    "sync": {},
    "async": {"async_scheduling": True},
    "ngram": {"speculative_config": {"method": "ngram", "num_speculative_tokens": 2,
                                     "prompt_lookup_min": 1}},
    "graphs": {"cudagraph_mode": "FULL",
               "compilation_config": {"cudagraph_capture_sizes": [1, 2, 4, 8]}},
}


@pytest.fixture(scope="module")
def hf_llama(tiny_models: dict[str, Path]) -> Any:
    return load_hf(tiny_models["llama"])


def hf_log_softmax(model: Any, prompt: list[int]) -> torch.Tensor:
    """[len(prompt) - 1, V] float64: row i scores prompt token i + 1."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt])).logits[0]
    return logits[:-1].log_softmax(dim=-1)


def check_against_hf(model: Any, prompt: list[int], out: RequestOutput, k: int) -> None:
    got, ranks = out.prompt_logprobs, out.prompt_token_ranks
    assert len(got) == len(prompt) and got[0] is None
    assert len(ranks) == len(prompt) and ranks[0] is None
    ref = hf_log_softmax(model, prompt)
    top = ref.topk(k, dim=-1)
    for i, row in enumerate(got[1:]):
        token = prompt[i + 1]
        assert abs(row[token] - float(ref[i, token])) < ABS_TOL, f"position {i + 1}"
        # The exact rank, up to entries within the tolerance of the token's logprob (float32
        # against float64 may order those either way).
        lp = ref[i, token]
        lowest, highest = (1 + int((ref[i] > lp + d).sum()) for d in (ABS_TOL, -ABS_TOL))
        assert lowest <= ranks[i + 1] <= highest, f"position {i + 1}: rank {ranks[i + 1]}"
        expected = {int(t): float(v) for t, v in zip(top.indices[i], top.values[i],
                                                     strict=True)}
        expected[token] = float(ref[i, token])
        assert row.keys() == expected.keys(), f"position {i + 1}"
        for t, v in expected.items():
            assert abs(row[t] - v) < ABS_TOL, f"position {i + 1}, token {t}"


def run(engine: LLMEngine, requests: dict[str, tuple[list[int], SamplingParams]]
        ) -> dict[str, RequestOutput]:
    for rid, (prompt, params) in requests.items():
        engine.add_request(rid, prompt, params)
    done: dict[str, RequestOutput] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    return done


@pytest.mark.parametrize("variant", list(ENGINE_VARIANTS))
def test_prompt_logprobs_match_hf_chunked_and_batched(variant: str,
                                                      tiny_models: dict[str, Path],
                                                      hf_llama: Any,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    if variant == "graphs":  # replay on a CPU needs the emulation and a capturable backend
        monkeypatch.setenv("TACHYON_EMULATE_CUDAGRAPHS", "1")
        monkeypatch.setattr(model_runner, "get_backend_class",
                            lambda name, dev, dtype: PersistentTorchBackend)
    rng = random.Random("prompt-logprobs")
    long_prompt = [rng.randrange(TINY_VOCAB) for _ in range(3 * TOKEN_BUDGET + 5)]
    short_prompt = [rng.randrange(TINY_VOCAB) for _ in range(7)]
    plain_prompt = [rng.randrange(TINY_VOCAB) for _ in range(9)]
    engine = LLMEngine.from_engine_args(EngineArgs(
        model=str(tiny_models["llama"]), device="cpu", dtype="float32", max_model_len=128,
        max_num_seqs=4, block_size=4, max_num_batched_tokens=TOKEN_BUDGET,
        enable_prefix_caching=True, **ENGINE_VARIANTS[variant]))
    greedy = dict(temperature=0.0, max_tokens=3, ignore_eos=True)
    done = run(engine, {
        "long": (long_prompt, SamplingParams(prompt_logprobs=3, **greedy)),
        "plain": (plain_prompt, SamplingParams(**greedy)),
        "short": (short_prompt, SamplingParams(prompt_logprobs=0, logprobs=1, **greedy)),
    })
    check_against_hf(hf_llama, long_prompt, done["long"], 3)
    check_against_hf(hf_llama, short_prompt, done["short"], 0)
    # Random tokens of a random model: most prompt tokens rank far below the top-k.
    assert sum(r > 4 for r in done["long"].prompt_token_ranks[1:]) > len(long_prompt) // 2
    assert done["plain"].prompt_logprobs is None
    assert len(done["short"].outputs[0].logprobs) == 3  # sampled logprobs still come

    # The same prompt again: its blocks are cached, but prompt logprobs skip the cache.
    again = run(engine, {"again": (long_prompt, SamplingParams(prompt_logprobs=3, **greedy))})
    assert again["again"].num_cached_tokens == 0
    check_against_hf(hf_llama, long_prompt, again["again"], 3)
    two = run(engine, {"two": (short_prompt[:2], SamplingParams(prompt_logprobs=2, **greedy))})
    check_against_hf(hf_llama, short_prompt[:2], two["two"], 2)


def test_prompt_logprobs_survive_preemption(tiny_models: dict[str, Path],
                                            hf_llama: Any) -> None:
    """16 blocks of 4 tokens hold one request of 30 + 20 tokens, not three: requests are
    preempted and recompute their prompts, which must not change their prompt logprobs."""
    rng = random.Random("preempt")
    prompts = [[rng.randrange(TINY_VOCAB) for _ in range(30)] for _ in range(3)]
    engine = LLMEngine.from_engine_args(EngineArgs(
        model=str(tiny_models["llama"]), device="cpu", dtype="float32", max_model_len=64,
        max_num_seqs=4, block_size=4, max_num_batched_tokens=TOKEN_BUDGET,
        num_gpu_blocks_override=16))
    params = SamplingParams(prompt_logprobs=1, temperature=0.0, max_tokens=20, ignore_eos=True)
    done = run(engine, {f"r{i}": (p, params) for i, p in enumerate(prompts)})
    assert engine.scheduler.num_preemptions > 0
    for i, prompt in enumerate(prompts):
        check_against_hf(hf_llama, prompt, done[f"r{i}"], 1)


def test_llm_generate_returns_prompt_logprobs(tiny_models: dict[str, Path],
                                             hf_llama: Any) -> None:
    from tachyon.entrypoints.llm import LLM

    rng = random.Random("llm-generate")
    prompts = [[rng.randrange(TINY_VOCAB) for _ in range(n)] for n in (6, 11)]
    llm = LLM(str(tiny_models["llama"]), device="cpu", dtype="float32", max_model_len=64)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(prompt_logprobs=2, max_tokens=2, n=2, seed=0))
    for prompt, out in zip(prompts, outs, strict=True):
        check_against_hf(hf_llama, prompt, out, 2)


def test_prompt_logprobs_out_of_range_is_refused() -> None:
    with pytest.raises(ValueError, match="prompt_logprobs must be an integer in"):
        SamplingParams(prompt_logprobs=21)
