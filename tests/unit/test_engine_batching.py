"""Continuous batching is invisible in the output: a prompt's greedy tokens do not depend on
what else runs next to it, on chunked prefill, or on being preempted and recomputed."""

from __future__ import annotations

import random

from tachyon import LLM, SamplingParams
from tachyon.step import SchedulerOutput
from tachyon_testing import TINY_VOCAB

BLOCK_SIZE = 4
MAX_TOKENS = 10
MAX_MODEL_LEN = 160


def kv_bytes_per_block(path: str) -> int:
    """K and V, every layer, float32: what one block of the paged cache costs."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(path)
    return 2 * cfg.num_hidden_layers * BLOCK_SIZE * cfg.num_key_value_heads * cfg.head_dim * 4


def record_schedules(llm: LLM) -> list[SchedulerOutput]:
    """Wrap the scheduler so every step's ``SchedulerOutput`` is kept for inspection."""
    sched = llm.engine.scheduler
    outs: list[SchedulerOutput] = []
    schedule = sched.schedule

    def recording() -> SchedulerOutput:
        out = schedule()
        outs.append(out)
        return out

    sched.schedule = recording
    return outs


def solo_outputs(path: str, prompts: list[list[int]], params: SamplingParams) -> list[list[int]]:
    """Each prompt alone in a roomy engine without prefix caching: the reference."""
    llm = LLM(model=path, device="cpu", block_size=16, max_model_len=MAX_MODEL_LEN,
              enable_prefix_caching=False)
    return [llm.generate([p], params, use_tqdm=False)[0].outputs[0].token_ids for p in prompts]


def test_batched_chunked_preempted_equals_solo(tiny_llama: str, rng: random.Random) -> None:
    lengths = [rng.randint(5, 120) for _ in range(30)]
    lengths[rng.randrange(30)] = 120  # always include the longest prompt
    prompts = [[rng.randrange(TINY_VOCAB) for _ in range(n)] for n in lengths]
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)

    per_block = kv_bytes_per_block(tiny_llama)
    # Room for about two of the longest requests: eight seats will not fit, so the
    # scheduler has to preempt.
    num_blocks = 2 * -(-(120 + MAX_TOKENS) // BLOCK_SIZE) + 4
    llm = LLM(model=tiny_llama, device="cpu", block_size=BLOCK_SIZE, max_model_len=MAX_MODEL_LEN,
              max_num_batched_tokens=64, max_num_seqs=8,
              kv_cache_memory=num_blocks * per_block)
    assert llm.engine.kv.pool.num_blocks == num_blocks
    schedules = record_schedules(llm)
    batched = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]

    assert llm.engine.stats["preemptions"] > 0
    assert max(len(s.requests) for s in schedules) > 1
    assert max(s.total_num_tokens for s in schedules) <= 64
    # Chunked prefill: some step computed part of a prompt without sampling from it.
    assert any(not r.sample and r.num_computed_tokens + len(r.new_token_ids) < len(p)
               for s in schedules for r in s.requests
               for p in [prompts[int(r.request_id.split("-")[1])]])
    # Mixed steps: prefill chunks and decodes in one batch.
    assert any(len({len(r.new_token_ids) > 1 for r in s.requests}) == 2 for s in schedules)
    assert llm.engine.num_free_blocks() == num_blocks

    assert batched == solo_outputs(tiny_llama, prompts, params)


def test_shared_prefixes_batched_equal_solo(tiny_llama: str, rng: random.Random) -> None:
    """Prompts that share prefixes, submitted together: later ones hit blocks that earlier
    ones registered in the same or an earlier step."""
    stems = [[rng.randrange(TINY_VOCAB) for _ in range(rng.randint(4, 40))] for _ in range(3)]
    prompts = [rng.choice(stems)[: rng.randint(1, 40)] +
               [rng.randrange(TINY_VOCAB) for _ in range(rng.randint(1, 10))] for _ in range(16)]
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    llm = LLM(model=tiny_llama, device="cpu", block_size=BLOCK_SIZE, max_model_len=MAX_MODEL_LEN,
              max_num_batched_tokens=32, max_num_seqs=6, num_gpu_blocks_override=48)
    batched = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert llm.engine.kv.prefix_hits > 0
    assert llm.engine.num_free_blocks() == 48
    assert batched == solo_outputs(tiny_llama, prompts, params)


def test_seeded_sampling_is_batch_invariant(tiny_llama: str, rng: random.Random) -> None:
    """A seeded random request draws the same tokens alone and inside a busy batch, even
    when it is preempted and recomputed."""
    prompts = [[rng.randrange(TINY_VOCAB) for _ in range(rng.randint(40, 60))] for _ in range(6)]
    params = [SamplingParams(temperature=1.0, top_k=50, seed=rng.randrange(1 << 30),
                             max_tokens=MAX_TOKENS, ignore_eos=True) for _ in prompts]
    llm = LLM(model=tiny_llama, device="cpu", block_size=BLOCK_SIZE, max_model_len=MAX_MODEL_LEN,
              max_num_batched_tokens=24, max_num_seqs=4, num_gpu_blocks_override=40)
    batched = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert llm.engine.stats["preemptions"] > 0  # four seats of >= 13 blocks in 40 blocks
    solo = [llm.generate([p], sp, use_tqdm=False)[0].outputs[0].token_ids
            for p, sp in zip(prompts, params, strict=True)]
    assert batched == solo


def test_aborts_free_blocks_and_leave_the_rest_untouched(tiny_llama: str,
                                                         rng: random.Random) -> None:
    """Abort one running and one waiting request mid-flight (and an unknown id): the others
    finish exactly as they would alone, nothing is returned for the aborted ones, and every
    block is free at the end."""
    prompts = [[rng.randrange(TINY_VOCAB) for _ in range(rng.randint(5, 40))] for _ in range(6)]
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    llm = LLM(model=tiny_llama, device="cpu", block_size=BLOCK_SIZE, max_model_len=MAX_MODEL_LEN,
              max_num_batched_tokens=32, max_num_seqs=3)
    engine = llm.engine
    ids = [engine.add_request(f"r{i}", p, params) for i, p in enumerate(prompts)]
    for _ in range(3):
        engine.step()
    running = {r.request_id for r in engine.scheduler.running}
    waiting = {r.request_id for r in engine.scheduler.waiting}
    victims = [sorted(running)[0], sorted(waiting)[0]]
    engine.abort_request([*victims, "no-such-request"])
    assert engine.kv.block_ids(victims[0]) == []
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            assert out.request_id not in victims
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
    assert engine.num_free_blocks() == engine.kv.pool.num_blocks
    survivors = [i for i in ids if i not in victims]
    assert sorted(done) == sorted(survivors)
    solo = solo_outputs(tiny_llama, [prompts[ids.index(i)] for i in survivors], params)
    assert [done[i] for i in survivors] == solo
