"""Prefix caching through the engine: shared full blocks are not recomputed, and reusing
them changes nothing in the output."""

from __future__ import annotations

import random

import pytest

from tachyon import LLM, SamplingParams
from tachyon.step import SchedulerOutput
from tachyon_testing import TINY_VOCAB

MAX_TOKENS = 8


def computed_tokens_per_request(llm: LLM) -> dict[str, int]:
    """Wrap ``scheduler.schedule``: request id -> tokens it was scheduled to compute."""
    sched = llm.engine.scheduler
    counts: dict[str, int] = {}
    schedule = sched.schedule

    def counting() -> SchedulerOutput:
        out = schedule()
        assert out.total_num_tokens == sum(len(r.new_token_ids) for r in out.requests)
        for r in out.requests:
            counts[r.request_id] = counts.get(r.request_id, 0) + len(r.new_token_ids)
        return out

    sched.schedule = counting
    return counts


@pytest.mark.parametrize("block_size", [4, 16])
def test_shared_three_block_prefix_computes_only_the_rest(tiny_llama: str, block_size: int,
                                                          rng: random.Random) -> None:
    prefix = [rng.randrange(TINY_VOCAB) for _ in range(3 * block_size)]
    first = prefix + [rng.randrange(TINY_VOCAB) for _ in range(rng.randint(1, 2 * block_size))]
    suffix_len = rng.randint(1, 2 * block_size)
    second = prefix + [rng.randrange(TINY_VOCAB) for _ in range(suffix_len)]
    second[3 * block_size] = (first[3 * block_size] + 1) % TINY_VOCAB  # diverge right there
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)

    llm = LLM(model=tiny_llama, device="cpu", block_size=block_size, max_model_len=128)
    counts = computed_tokens_per_request(llm)
    llm.generate([first], params, use_tqdm=False)
    out = llm.generate([second], params, use_tqdm=False)[0]

    # Prefill of the suffix only, then one token per decode step (the last sampled token is
    # never fed back).
    assert out.num_cached_tokens == 3 * block_size
    assert counts[out.request_id] == suffix_len + MAX_TOKENS - 1
    assert llm.engine.kv.prefix_hits == 3 * block_size

    uncached = LLM(model=tiny_llama, device="cpu", block_size=block_size, max_model_len=128,
                   enable_prefix_caching=False)
    ref_counts = computed_tokens_per_request(uncached)
    ref = uncached.generate([second], params, use_tqdm=False)[0]
    assert ref.num_cached_tokens == 0
    assert ref_counts[ref.request_id] == len(second) + MAX_TOKENS - 1
    assert out.outputs[0].token_ids == ref.outputs[0].token_ids


def test_identical_prompt_recomputes_at_least_its_last_token(tiny_llama: str,
                                                            rng: random.Random) -> None:
    """A prompt of exactly three full blocks, sent twice: the last token is never served from
    the cache (its logits are needed), so the hit stops one block short."""
    bs = 4
    prompt = [rng.randrange(TINY_VOCAB) for _ in range(3 * bs)]
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    llm = LLM(model=tiny_llama, device="cpu", block_size=bs, max_model_len=128)
    counts = computed_tokens_per_request(llm)
    a = llm.generate([prompt], params, use_tqdm=False)[0]
    b = llm.generate([prompt], params, use_tqdm=False)[0]
    assert b.num_cached_tokens == 2 * bs
    assert counts[b.request_id] == bs + MAX_TOKENS - 1
    assert a.outputs[0].token_ids == b.outputs[0].token_ids


def test_generated_tokens_are_cached_too(tiny_llama: str, rng: random.Random) -> None:
    """Blocks filled by generated tokens are hashed as well: a follow-up prompt that extends
    a previous prompt + completion (a chat turn) hits them."""
    bs = 4
    prompt = [rng.randrange(TINY_VOCAB) for _ in range(2 * bs + 1)]
    params = SamplingParams(temperature=0.0, max_tokens=3 * bs, ignore_eos=True)
    llm = LLM(model=tiny_llama, device="cpu", block_size=bs, max_model_len=128)
    first = llm.generate([prompt], params, use_tqdm=False)[0]
    follow = prompt + first.outputs[0].token_ids + [rng.randrange(TINY_VOCAB) for _ in range(3)]
    out = llm.generate([follow], params, use_tqdm=False)[0]
    # Every full block of prompt + completion whose K/V was computed: the last sampled token
    # was never fed back, so it is not in the cache.
    computed = len(prompt) + len(first.outputs[0].token_ids) - 1
    assert out.num_cached_tokens == computed // bs * bs
    uncached = LLM(model=tiny_llama, device="cpu", block_size=bs, max_model_len=128,
                   enable_prefix_caching=False)
    ref = uncached.generate([follow], params, use_tqdm=False)[0]
    assert out.outputs[0].token_ids == ref.outputs[0].token_ids


def test_penalties_see_the_whole_history_after_a_prefix_hit(tiny_llama: str,
                                                            rng: random.Random) -> None:
    """Repetition / frequency / presence penalties count prompt and output tokens; tokens
    served from the prefix cache must count like computed ones. Logprobs are taken after
    the penalties, so their normalisation shows the penalised set exactly."""
    bs = 4
    prefix = [rng.randrange(TINY_VOCAB) for _ in range(3 * bs)]
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, logprobs=0,
                            repetition_penalty=1.8, frequency_penalty=0.7,
                            presence_penalty=0.4)
    prompts = [prefix + [rng.randrange(TINY_VOCAB) for _ in range(3)] for _ in range(2)]
    cached = LLM(model=tiny_llama, device="cpu", block_size=bs, max_model_len=128)
    uncached = LLM(model=tiny_llama, device="cpu", block_size=bs, max_model_len=128,
                   enable_prefix_caching=False)
    for p in prompts:
        out = cached.generate([p], params, use_tqdm=False)[0].outputs[0]
        ref = uncached.generate([p], params, use_tqdm=False)[0].outputs[0]
        assert out.token_ids == ref.token_ids
        got = [lp[t] for lp, t in zip(out.logprobs, out.token_ids, strict=True)]
        want = [lp[t] for lp, t in zip(ref.logprobs, ref.token_ids, strict=True)]
        assert got == pytest.approx(want, abs=1e-5)
    assert cached.engine.kv.prefix_hits == 3 * bs


def test_reset_prefix_cache_forgets_free_blocks_then_the_cache_fills_again(
        tiny_llama: str, rng: random.Random) -> None:
    """14 prompt tokens in blocks of 4: three full blocks (12 tokens) can be served from the
    cache. After ``reset_prefix_cache`` no block holds a hash and every block is free, so the
    same prompt misses once (all 14 computed), then hits again; a request still running keeps
    its blocks (only blocks not in use are forgotten)."""
    bs, hit = 4, 12
    prompt = [rng.randrange(TINY_VOCAB) for _ in range(hit + 2)]
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    llm = LLM(model=tiny_llama, device="cpu", block_size=bs, max_model_len=128)
    kv, counts = llm.engine.kv, computed_tokens_per_request(llm)

    def run() -> tuple[int, int, list[int]]:
        out = llm.generate([prompt], params, use_tqdm=False)[0]
        return out.num_cached_tokens, counts[out.request_id], out.outputs[0].token_ids

    full = len(prompt) + MAX_TOKENS - 1  # prefill, then one token per decode step
    first = run()
    assert first[:2] == (0, full)
    assert run() == (hit, full - hit, first[2])
    assert kv.pool.cached  # the finished requests' full blocks stay cached
    llm.reset_prefix_cache()
    assert not kv.pool.cached
    assert all(b.block_hash is None for b in kv.pool.blocks)
    assert kv.num_free_blocks == kv.pool.num_blocks
    assert run() == (0, full, first[2])
    assert run() == (hit, full - hit, first[2])

    # A running request's blocks are in use: they keep their hashes through a reset.
    eng = llm.engine
    eng.add_request("running", prompt, params)
    eng.step()  # its prefill (a prefix hit) and first token
    in_use = {b.block_id for b in kv.req_blocks["running"]}
    llm.reset_prefix_cache()
    assert set(kv.pool.cached.values()) <= in_use
    assert len(kv.pool.cached) == hit // bs
    while eng.has_unfinished_requests():
        eng.step()
