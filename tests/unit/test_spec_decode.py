"""Speculative decoding pieces on their own: the config, the n-gram proposer, the rejection
sampler (hand-worked and statistical), the verify-batch dispatch, the scheduler's drafts."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tachyon.config import EngineArgs, SchedulerConfig, SpeculativeConfig
from tachyon.cudagraph.dispatcher import BatchDescriptor, CudagraphDispatcher
from tachyon.cudagraph.modes import CUDAGraphMode, RuntimeMode
from tachyon.engine.kv_cache_manager import KVCacheManager
from tachyon.engine.request import Request
from tachyon.engine.scheduler import Scheduler
from tachyon.layers.sampler import SamplingMetadata
from tachyon.sampling_params import SamplingParams
from tachyon.spec_decode.ngram import NgramProposer, find_draft
from tachyon.spec_decode.rejection import NO_DRAFT, num_accepted, rejection_sample
from tachyon_testing import check_kv_invariants

# -- config -------------------------------------------------------------------------------


class _Vocab:
    vocab_size = 500


@pytest.mark.parametrize("raw, match", [
    ({"method": "ngram", "num_speculative_tokens": 0}, "num_speculative_tokens must be"),
    ({"method": "medusa", "num_speculative_tokens": 2}, "method must be one of"),
    ({"num_speculative_tokens": 2}, "method must be one of"),
    ({"method": "draft_model", "num_speculative_tokens": 2}, "needs 'model'"),
    ({"method": "eagle3", "num_speculative_tokens": 2}, "needs 'model'"),
    ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 4,
      "prompt_lookup_max": 3}, "prompt_lookup_max must be an integer >= 4"),
    ({"method": "ngram", "num_speculative_tokens": 2, "k": 1}, "unknown speculative_config"),
    ({"method": "ngram", "num_speculative_tokens": 2, "model": "x"}, "takes no model"),
    ('{"method": ', "not valid JSON"),
    ("[3]", "must be a JSON object"),
])
def test_bad_speculative_config(raw, match):
    with pytest.raises(ValueError, match=match):
        EngineArgs(speculative_config=raw)._speculative_config(_Vocab())


def test_drafter_vocabulary_and_unimplemented_methods(tiny_models):
    llama = str(tiny_models["llama"])
    with pytest.raises(ValueError, match=r"vocabulary \(500 tokens\) differs .* \(32000\)"):
        EngineArgs(speculative_config={"method": "draft_model", "num_speculative_tokens": 2,
                                       "model": llama})._speculative_config(
            type("Big", (), {"vocab_size": 32000})())
    for method in ("eagle", "eagle3"):
        with pytest.raises(ValueError, match=f"'{method}' is not implemented yet"):
            EngineArgs(speculative_config={"method": method, "num_speculative_tokens": 2,
                                           "model": llama})._speculative_config(_Vocab())


def test_ngram_config_defaults_and_cli_flag():
    from tachyon.entrypoints.args import Parser, add_engine_args, engine_args_from

    spec = EngineArgs(speculative_config='{"method": "ngram", "num_speculative_tokens": 3}'
                      )._speculative_config(_Vocab())
    assert spec == SpeculativeConfig("ngram", 3, 2, 5, None)
    parser = Parser()
    add_engine_args(parser)
    ns = parser.parse_args(["--speculative-config", '{"method": "ngram", '
                            '"num_speculative_tokens": 2, "prompt_lookup_max": 3}'])
    spec = engine_args_from(ns)._speculative_config(_Vocab())
    assert (spec.num_speculative_tokens, spec.prompt_lookup_max) == (2, 3)
    with pytest.raises(ValueError, match="drop --async-scheduling"):
        EngineArgs(speculative_config={"method": "ngram", "num_speculative_tokens": 2},
                   async_scheduling=True, device="cpu").create_config()


# -- n-gram proposer ----------------------------------------------------------------------


def _reference_draft(tokens: list[int], lo: int, hi: int, k: int) -> list[int]:
    """Plain loops: the longest suffix (hi down to lo) seen before; its latest occurrence
    with k tokens after it, else its earliest."""
    n = len(tokens)
    for size in range(min(hi, n - 1), lo - 1, -1):
        suffix = tokens[n - size:]
        starts = [i for i in range(n - size) if tokens[i:i + size] == suffix]
        if starts:
            full = [i for i in starts if i + size + k <= n]
            start = full[-1] if full else starts[0]
            return tokens[start + size:start + size + k]
    return []


def test_ngram_matches_a_plain_reference(rng):
    for _ in range(300):
        alphabet = rng.randint(2, 6)
        tokens = [rng.randrange(alphabet) for _ in range(rng.randint(1, 40))]
        lo = rng.randint(1, 3)
        hi, k = rng.randint(lo, 6), rng.randint(1, 5)
        got = find_draft(np.asarray(tokens, dtype=np.int64), lo, hi, k).tolist()
        assert got == _reference_draft(tokens, lo, hi, k), (tokens, lo, hi, k)


def test_ngram_hand_worked_and_incremental():
    # Suffix [1, 2, 3] last occurred at 5..7; what followed is drafted.
    tokens = [1, 2, 3, 4, 5, 1, 2, 3, 9, 9, 1, 2, 3]
    assert find_draft(np.array(tokens), 2, 5, 3).tolist() == [9, 9, 1]
    assert find_draft(np.array([5, 6, 7, 8]), 2, 5, 3).tolist() == []
    p = NgramProposer(4, 1, 3)
    history = [7, 8, 7]
    assert p.propose("a", history, 4) == [8, 7]
    history += [8] * 100  # the mirror grows past its first capacity
    assert p.propose("a", history, 2) == [8, 8]
    p.drop("a")
    assert p.propose("a", [1, 2], 4) == []


# -- rejection sampler --------------------------------------------------------------------


def _meta(temps: list[float], generators: dict[int, torch.Generator] | None = None,
          logprobs: int | None = None) -> SamplingMetadata:
    return SamplingMetadata(
        temperature=torch.tensor(temps), all_greedy=all(t == 0 for t in temps), top_k=None,
        top_p=None, min_p=None, generators=generators or {}, presence_penalty=None,
        frequency_penalty=None, repetition_penalty=None, prompt_token_ids=None,
        output_token_ids=None, max_num_logprobs=logprobs)


def test_greedy_hand_worked_example():
    # Request A: drafts [3, 5, 7]; the target's argmax per row is 3, 5, 2 | 9 (bonus row).
    # Request B: one draft 4, argmax 1 | 6. Request C: no draft, argmax 8.
    argmax = [3, 5, 2, 9, 1, 6, 8]
    drafts = [3, 5, 7, NO_DRAFT, 4, NO_DRAFT, NO_DRAFT]
    logits = torch.full((7, 10), -1.0)
    logits[torch.arange(7), torch.tensor(argmax)] = 2.0
    out = rejection_sample(logits, torch.tensor(drafts), _meta([0.0] * 7, logprobs=1))
    acc = out.accepted.numpy()
    assert acc.tolist() == [True, True, False, False, False, False, False]
    counts = num_accepted(acc, np.array([0, 4, 6]))
    assert counts.tolist() == [2, 0, 0]
    tokens = out.token_ids.tolist()
    # A emits 3, 5 (accepted) then the target's 2; B the target's 1; C its 8.
    assert [tokens[0:3], tokens[4:5], tokens[6:7]] == [[3, 5, 2], [1], [8]]
    # Logprobs are of the emitted token of each row: log softmax of that logit.
    lse = math.log(math.exp(2.0) + 9 * math.exp(-1.0))
    assert out.logprobs[:, 0] == pytest.approx(torch.full((7,), 2.0 - lse))


def test_sampling_hand_worked_extremes():
    # p(draft) = 1: always accepted; p(draft) = 0: never, and the residual never draws it.
    logits = torch.tensor([[0.0, -math.inf, -math.inf], [0.0, 0.0, -math.inf]] * 200)
    drafts = torch.tensor([0, 2] * 200)
    out = rejection_sample(logits, drafts, _meta([1.0] * 400))
    assert out.accepted[0::2].all() and not out.accepted[1::2].any()
    assert set(out.token_ids[1::2].tolist()) == {0, 1}


def _chi_square(counts: np.ndarray, probs: np.ndarray) -> float:
    expected = counts.sum() * probs
    return float(((counts - expected) ** 2 / expected).sum())


# chi-square critical value for 7 degrees of freedom at p = 0.001.
CHI2_7_P001 = 24.32


@pytest.mark.parametrize("which_draft", ["worst", "best", "middle"])
def test_first_token_follows_the_target_even_with_a_bad_draft(rng, which_draft):
    vocab, rows = 8, 40_000
    torch.manual_seed(rng.randrange(1 << 31))
    logits = torch.randn(vocab) * 1.5
    temperature = 0.8
    probs = torch.softmax(logits / temperature, dim=-1).double().numpy()
    draft = {"worst": int(probs.argmin()), "best": int(probs.argmax()),
             "middle": int(np.argsort(probs)[vocab // 2])}[which_draft]
    out = rejection_sample(logits.expand(rows, vocab).clone(),
                           torch.full((rows,), draft), _meta([temperature] * rows))
    counts = np.bincount(out.token_ids.numpy(), minlength=vocab)
    assert _chi_square(counts, probs) < CHI2_7_P001, (counts / rows, probs)
    # The draft is accepted with its target probability.
    assert out.accepted.double().mean().item() == pytest.approx(probs[draft], abs=0.01)


def test_seeded_rows_do_not_depend_on_the_batch():
    logits = torch.randn(3, 50)
    drafts = torch.tensor([4, 9, NO_DRAFT])

    def run(extra_rows: int) -> list[int]:
        gen = torch.Generator().manual_seed(11)
        full = torch.cat([logits, torch.randn(extra_rows, 50)])
        d = torch.cat([drafts, torch.full((extra_rows,), NO_DRAFT)])
        meta = _meta([1.0] * (3 + extra_rows), {0: gen, 1: gen, 2: gen})
        return rejection_sample(full, d, meta).token_ids[:3].tolist()

    assert run(0) == run(5)


# -- dispatch of verify batches -----------------------------------------------------------


def test_verify_batches_get_full_graphs_of_their_own():
    sizes = (1, 2, 4, 8)
    d = CudagraphDispatcher(CUDAGraphMode.FULL_AND_PIECEWISE, sizes, verify_query_len=4,
                            max_num_tokens=16)
    assert d.verify_sizes == (1, 2, 4)  # 8 requests x 4 tokens exceed the 16-token budget
    # 3 requests x 4 tokens: the 4-request verify graph, padded requests take 4 tokens each.
    assert d.descriptor(12, 4) == (RuntimeMode.FULL, BatchDescriptor(16, 4))
    assert BatchDescriptor(16, 4).num_reqs(max_num_seqs=8) == 4
    assert d.descriptor(3, 1) == (RuntimeMode.FULL, BatchDescriptor(4, 1))
    # Mixed batches (and uniform ones of another length) are mixed: piecewise here.
    assert d.descriptor(6, 2) == (RuntimeMode.PIECEWISE, BatchDescriptor(8, 0))
    assert d.descriptor(7, 0) == (RuntimeMode.PIECEWISE, BatchDescriptor(8, 0))
    keys = d.graph_keys()
    assert [k for m, k in keys if k.uniform_query_len == 4] == [
        BatchDescriptor(16, 4), BatchDescriptor(8, 4), BatchDescriptor(4, 4)]
    assert [k.num_tokens for _, k in keys] == sorted((k.num_tokens for _, k in keys),
                                                     reverse=True)
    # A backend that captures decode only (no verify_query_len): verify runs as mixed.
    d = CudagraphDispatcher(CUDAGraphMode.FULL_AND_PIECEWISE, sizes, 0, 16)
    assert d.descriptor(8, 4) == (RuntimeMode.PIECEWISE, BatchDescriptor(8, 0))
    # FULL_DECODE_ONLY: verify graphs are FULL, mixed batches eager.
    d = CudagraphDispatcher(CUDAGraphMode.FULL_DECODE_ONLY, sizes, 3, 64)
    assert d.descriptor(9, 3) == (RuntimeMode.FULL, BatchDescriptor(12, 3))
    assert d.descriptor(9, 0) == (RuntimeMode.NONE, BatchDescriptor(9, 0))
    # PIECEWISE has no FULL graphs at all: verify batches are piecewise like the rest.
    d = CudagraphDispatcher(CUDAGraphMode.PIECEWISE, sizes, 3, 64)
    assert d.descriptor(6, 3) == (RuntimeMode.PIECEWISE, BatchDescriptor(8, 0))


# -- scheduler ----------------------------------------------------------------------------


def _scheduler(num_blocks: int = 64, k: int = 4, budget: int = 64,
               max_model_len: int = 64) -> Scheduler:
    kv = KVCacheManager(num_blocks, 4, enable_prefix_caching=True)
    s = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=budget,
                                  enable_chunked_prefill=True), kv, max_model_len)
    s.enable_speculation(SpeculativeConfig("ngram", k, 1, 3, None))
    return s


def _request(rid: str, tokens: list[int], **kw: object) -> Request:
    return Request(rid, tokens, SamplingParams(temperature=0, **kw), frozenset({2}))


def test_drafts_rollback_and_truncation():
    s = _scheduler()
    s.add_request(_request("a", [5, 6, 7, 5, 6], max_tokens=6))
    out = s.schedule()  # prefill: no drafts while prefilling
    assert out.requests[0].num_draft_tokens == 0
    s.update_spec(out, {"a": [7]})
    out = s.schedule()  # [5, 6, 7] was seen: the drafts are what followed it
    (r,) = out.requests
    assert r.new_token_ids == [7, 5, 6, 7] and r.num_draft_tokens == 3
    assert out.total_num_tokens == 4
    req = s.requests["a"]
    # One draft accepted, then the target's own token 9: two computed positions kept.
    (_, kept), = s.update_spec(out, {"a": [5, 9]})
    assert kept == [5, 9] and req.all_token_ids == [5, 6, 7, 5, 6, 7, 5, 9]
    assert req.num_computed_tokens == req.num_tokens - 1 == 7
    assert s.spec_counts == {"draft_tokens": 3, "accepted_tokens": 1, "verifies": 1}
    # 3 outputs of max_tokens 6: at most 2 drafts (+1 bonus) fit.
    s.proposer = type("Fixed", (), {"propose": lambda self, rid, t, m: [1, 1, 1, 1][:m],
                                    "drop": lambda self, rid: None})()
    out = s.schedule()
    assert out.requests[0].num_draft_tokens == 2
    (_, kept), = s.update_spec(out, {"a": [1, 2, 3]})  # EOS (2) in the middle: truncated
    assert kept == [1, 2] and "a" not in s.requests
    assert s.kv.num_free_blocks == s.kv.pool.num_blocks
    check_kv_invariants(s.kv)


def _fixed_drafts(s: Scheduler) -> None:
    s.proposer = type("Fixed", (), {"propose": lambda self, rid, t, m: [1] * min(m, 4),
                                    "drop": lambda self, rid: None})()


def test_drafts_respect_budget_max_model_len_and_kv():
    s = _scheduler(budget=6, max_model_len=12)
    _fixed_drafts(s)
    s.add_request(req := _request("a", [3, 4, 5, 6, 7, 8], max_tokens=50))
    s.update_spec(s.schedule(), {"a": [9]})
    out = s.schedule()
    assert out.requests[0].num_draft_tokens == 4  # 7 tokens: 5 more fit max_model_len 12
    s.update_spec(out, {"a": [1, 1, 1, 1, 1]})
    assert req.num_tokens == 12 and "a" not in s.requests  # finished on length
    # The token budget: 1 + drafts fit in what is left of it.
    s = _scheduler(budget=3)
    _fixed_drafts(s)
    s.add_request(_request("b", [3, 4, 5], max_tokens=50))
    s.update_spec(s.schedule(), {"b": [9]})
    assert s.schedule().requests[0].num_draft_tokens == 2
    # A pool too small for the drafts' slots: plain decode instead of preempting.
    s = _scheduler(num_blocks=2)
    _fixed_drafts(s)
    s.add_request(_request("c", [3, 4, 5, 6, 7, 8, 9], max_tokens=50))
    s.update_spec(s.schedule(), {"c": [9]})
    out = s.schedule()
    assert out.requests[0].num_draft_tokens == 0 and s.num_preemptions == 0
    check_kv_invariants(s.kv)
