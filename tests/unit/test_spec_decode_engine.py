"""Speculative decoding through the whole engine on CPU: greedy output identical to plain
decoding in NONE and emulated FULL graph modes (verify batches in FULL graphs of their own),
with chunked prefill and preemption forced; stops, logprobs and n > 1 inside accepted runs;
every KV block free at the end."""

from __future__ import annotations

import random
from typing import ClassVar

import pytest

from graph_testing import PersistentTorchBackend
from tachyon import LLM, SamplingParams
from tachyon.cudagraph.dispatcher import BatchDescriptor
from tachyon.cudagraph.modes import CGSupport, RuntimeMode
from tachyon_testing import TINY_VOCAB, check_kv_invariants

NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1}


class _UniformBatchOnly(PersistentTorchBackend):
    name: ClassVar[str] = "torch-uniform-batch"
    cudagraph_support: ClassVar[CGSupport] = CGSupport.UNIFORM_BATCH


def _llm(model_dir, monkeypatch, mode="NONE", backend=None, spec=None, **kw) -> LLM:
    from tachyon.worker import model_runner

    monkeypatch.setenv("TACHYON_EMULATE_CUDAGRAPHS", "1")
    if backend is not None:
        monkeypatch.setattr(model_runner, "get_backend_class", lambda *a, **k: backend)
    args = dict(device="cpu", dtype="float32", max_num_seqs=8, max_num_batched_tokens=32,
                block_size=4, cudagraph_mode=mode,
                compilation_config={"cudagraph_capture_sizes": [1, 2, 4, 8]})
    args.update(kw)
    return LLM(model_dir, speculative_config=spec, **args)


def _repetitive_prompts(seed: int, num: int = 7) -> list[list[int]]:
    """Prompts that repeat a short phrase (so n-gram drafts exist and some are accepted),
    one longer than the token budget (chunked prefill)."""
    rng = random.Random(seed)
    prompts = []
    for i in range(num):
        phrase = [rng.randrange(TINY_VOCAB) for _ in range(rng.randint(2, 6))]
        prompts.append((phrase * 12)[:rng.randint(6, 20) if i else 45])
    return prompts


def _greedy(llm: LLM, prompts: list[list[int]], max_tokens: int = 20) -> list[list[int]]:
    sp = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate(prompts, sp, use_tqdm=False)]


def _all_free(llm: LLM) -> None:
    kv = llm.engine.kv
    check_kv_invariants(kv)
    assert kv.num_free_blocks == kv.pool.num_blocks


@pytest.mark.parametrize("mode, backend", [("NONE", None), ("FULL", PersistentTorchBackend),
                                           ("FULL_AND_PIECEWISE", _UniformBatchOnly)])
def test_greedy_identity_with_chunked_prefill_and_preemption(tiny_llama, monkeypatch, mode,
                                                            backend):
    prompts = _repetitive_prompts(seed=14)
    # 40 blocks of 4 tokens for 7 requests of up to 65 tokens: preemption happens.
    small = dict(num_gpu_blocks_override=40, max_model_len=160)
    ref = _greedy(_llm(tiny_llama, monkeypatch, **small), prompts)
    llm = _llm(tiny_llama, monkeypatch, mode, backend, NGRAM, **small)
    got = _greedy(llm, prompts)
    assert got == ref
    stats = llm.engine.stats
    assert stats["spec_acceptance_rate"] > 0 and stats["spec_verifies"] > 0
    assert stats["preemptions"] > 0
    assert stats["spec_mean_accepted_length"] > 1
    _all_free(llm)
    if mode != "NONE":
        runner = llm.engine.executor.runner.graph_runner
        verify_keys = [k for k in runner.full if k.uniform_query_len == 4]
        assert BatchDescriptor(32, 4) in verify_keys and BatchDescriptor(4, 4) in verify_keys
        assert runner.check_contract  # every FULL replay, verify ones included, was checked


def test_a_verify_step_replays_its_graph_padded(tiny_llama, monkeypatch):
    """Three requests with three drafts each: the 4-request verify graph; the padded request
    takes 1 + k tokens with slot -1 and no context."""
    llm = _llm(tiny_llama, monkeypatch, "FULL", PersistentTorchBackend, NGRAM)
    eng = llm.engine
    runner = eng.executor.runner
    seen = []
    run = runner.graph_runner.run
    runner.graph_runner.run = lambda mode, desc, ctx: seen.append((mode, desc)) or run(
        mode, desc, ctx)
    for i in range(3):
        eng.add_request(str(i), [7 + i, 8, 9] * 4, SamplingParams(temperature=0, max_tokens=8,
                                                                  ignore_eos=True))
    eng.step()  # prefill
    eng.scheduler.proposer.propose = lambda rid, tokens, m: [5, 6, 7][:m]
    eng.step()
    assert seen[-1] == (RuntimeMode.FULL, BatchDescriptor(16, 4))
    b = runner.buffers
    assert b.query_start_loc[:5].tolist() == [0, 4, 8, 12, 16]
    assert b.slot_mapping[12:16].tolist() == [-1] * 4 and b.seq_lens[3].item() == 0
    while eng.has_unfinished_requests():
        eng.step()
    _all_free(llm)


def test_stops_inside_an_accepted_run_and_logprobs_per_token(tiny_llama, monkeypatch):
    prompts = _repetitive_prompts(seed=7, num=4)
    plain = _llm(tiny_llama, monkeypatch)
    spec = _llm(tiny_llama, monkeypatch, spec=NGRAM)
    ref = _greedy(plain, prompts, 30)
    # Stop on a token the first reference emits late, after a repetitive (well drafted)
    # run; the others are cut by max_tokens.
    stop_at = next(t for i, t in enumerate(ref[0]) if i >= 8 and t not in ref[0][:i])
    sp = SamplingParams(temperature=0, max_tokens=13, stop_token_ids=[stop_at], logprobs=2,
                        ignore_eos=True)
    want = plain.generate(prompts, sp, use_tqdm=False)
    got = spec.generate(prompts, sp, use_tqdm=False)
    for w, g in zip(want, got, strict=True):
        wo, go = w.outputs[0], g.outputs[0]
        assert go.token_ids == wo.token_ids and go.finish_reason == wo.finish_reason
        assert len(go.logprobs) == len(go.token_ids)
        for lw, lg in zip(wo.logprobs, go.logprobs, strict=True):
            assert lw.keys() == lg.keys()
            assert list(lg.values()) == pytest.approx(list(lw.values()), abs=1e-4)
    assert spec.engine.stats["spec_accepted_tokens"] > 0
    _all_free(spec)


def test_seeded_sampling_with_n_and_prefix_hits(tiny_llama, monkeypatch):
    """n > 1 samples of one prompt share its cached blocks; each is reproducible from its
    seed, and drafts never corrupt the shared prefix (a later greedy run still matches)."""
    spec = _llm(tiny_llama, monkeypatch, spec=NGRAM)
    prompt = _repetitive_prompts(seed=8, num=1)[0]
    sp = SamplingParams(temperature=0.7, top_k=20, n=3, seed=5, max_tokens=16,
                        ignore_eos=True)
    first = [c.token_ids for c in spec.generate([prompt], sp, use_tqdm=False)[0].outputs]
    again = [c.token_ids for c in spec.generate([prompt], sp, use_tqdm=False)[0].outputs]
    assert first == again and len({tuple(t) for t in first}) > 1
    assert _greedy(spec, [prompt]) == _greedy(_llm(tiny_llama, monkeypatch), [prompt])
    assert spec.engine.kv.prefix_hits > 0
    _all_free(spec)
