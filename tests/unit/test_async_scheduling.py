"""Asynchronous scheduling (step N+1 scheduled while step N runs) changes no token: greedy
outputs equal the synchronous engine under chunked prefill, preemption, stop tokens, max
lengths, n > 1 and aborts, and every block is free at the end."""

from __future__ import annotations

import random

import pytest

from tachyon import LLM, SamplingParams
from tachyon_testing import TINY_VOCAB


def _engine(model: str, async_scheduling: bool, kv_bytes: int) -> LLM:
    return LLM(model, device="cpu", max_num_seqs=8, max_num_batched_tokens=32, block_size=4,
               max_model_len=128, kv_cache_memory=kv_bytes, async_scheduling=async_scheduling)


# Roomy, then tight. 400 kB is 195 blocks of 4 tokens: 8 seats x 18 blocks (60 prompt + 12
# output tokens at most) always fit. 100 kB is 48 blocks, where 8 seats need ~80 on average.
@pytest.mark.parametrize(("kv_bytes", "preempts"), [(400_000, False), (100_000, True)])
def test_async_equals_sync(tiny_llama, kv_bytes: int, preempts: bool, rng: random.Random):
    prompts = [[rng.randrange(TINY_VOCAB) for _ in range(rng.randint(3, 60))] for _ in range(30)]
    params = [SamplingParams(temperature=0, max_tokens=rng.randint(1, 12),
                             stop_token_ids=[rng.randrange(TINY_VOCAB)], n=rng.choice([1, 1, 2]))
              for _ in prompts]
    sync, asyn = _engine(tiny_llama, False, kv_bytes), _engine(tiny_llama, True, kv_bytes)
    assert asyn.engine.async_scheduling and not sync.engine.async_scheduling
    ref = [[c.token_ids for c in o.outputs] for o in sync.generate(prompts, params)]
    got = [[c.token_ids for c in o.outputs] for o in asyn.generate(prompts, params)]
    assert got == ref
    assert (asyn.engine.scheduler.num_preemptions > 0) == preempts
    kv = asyn.engine.kv
    assert kv.num_free_blocks == kv.pool.num_blocks


def test_async_abort_frees_blocks(tiny_llama):
    llm = _engine(tiny_llama, True, 400_000)
    eng = llm.engine
    for i in range(6):
        eng.add_request(str(i), list(range(1, 20 + i)),
                        SamplingParams(temperature=0, max_tokens=50, ignore_eos=True))
    for _ in range(5):
        eng.step()
    eng.abort_request([str(i) for i in range(0, 6, 2)])
    while eng.has_unfinished_requests():
        for out in eng.step():
            assert int(out.request_id) % 2 == 1
    assert eng.kv.num_free_blocks == eng.kv.pool.num_blocks
