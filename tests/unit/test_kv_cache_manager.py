"""BlockPool / KVCacheManager: hand-worked block accounting, and a hypothesis state machine
that drives the manager the way the scheduler does (prefix lookups, chunked growth, frees)
while a fake K/V store checks that every request always reads its own history."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    invariant,
    precondition,
    rule,
)

from tachyon.engine import kv_cache_manager as kvm
from tachyon.engine.kv_cache_manager import BlockPool, KVCacheManager
from tachyon.engine.request import Request
from tachyon.sampling_params import SamplingParams
from tachyon_testing import FakeKVContent, check_kv_invariants

PARAMS = SamplingParams(temperature=0.0, max_tokens=100)


def make_request(rid: str, tokens: list[int]) -> Request:
    return Request(rid, tokens, PARAMS, frozenset())


def admit(kv: KVCacheManager, req: Request, n: int | None = None) -> bool:
    """What the scheduler does for a waiting request: look up the prefix, then allocate."""
    hits = kv.get_computed_blocks(req)
    rest = req.num_tokens - len(hits) * kv.block_size
    if not kv.allocate_slots(req, rest if n is None else min(n, rest), hits):
        return False
    req.num_computed_tokens += len(hits) * kv.block_size
    return True


# --------------------------------------------------------------------------- hand-worked


def test_block_counts_follow_token_counts() -> None:
    kv = KVCacheManager(num_blocks=10, block_size=4, enable_prefix_caching=False)
    req = make_request("a", list(range(10)))
    assert kv.allocate_slots(req, 10)  # 10 tokens -> ceil(10 / 4) = 3 blocks
    assert len(kv.block_ids("a")) == 3 and kv.num_free_blocks == 7
    req.num_computed_tokens = 10
    req.append_token(99)
    assert kv.allocate_slots(req, 1)  # token 11 still fits block 3
    assert kv.num_free_blocks == 7
    req.num_computed_tokens = 11
    req.append_token(98)
    assert kv.allocate_slots(req, 1)  # token 12 fills block 3 exactly
    assert kv.num_free_blocks == 7
    req.num_computed_tokens = 12
    req.append_token(97)
    assert kv.allocate_slots(req, 1)  # token 13 opens block 4
    assert len(kv.block_ids("a")) == 4 and kv.num_free_blocks == 6
    kv.free(req)
    assert kv.num_free_blocks == 10
    check_kv_invariants(kv)


def test_allocation_is_all_or_nothing() -> None:
    kv = KVCacheManager(num_blocks=3, block_size=4, enable_prefix_caching=True)
    req = make_request("a", list(range(13)))  # needs 4 blocks
    assert not kv.allocate_slots(req, 13)
    assert kv.num_free_blocks == 3 and kv.block_ids("a") == []
    assert kv.allocate_slots(req, 12)  # a chunk that fits
    assert kv.num_free_blocks == 0
    check_kv_invariants(kv)


def test_prefix_hit_shares_blocks_and_counts_references() -> None:
    kv = KVCacheManager(num_blocks=10, block_size=4, enable_prefix_caching=True)
    a = make_request("a", list(range(9)))
    assert admit(kv, a)
    a.num_computed_tokens = 9
    b = make_request("b", [*range(8), 42, 43])
    hits = kv.get_computed_blocks(b)
    assert [h.block_id for h in hits] == kv.block_ids("a")[:2]
    assert admit(kv, b)
    assert b.num_computed_tokens == 8
    assert kv.block_ids("b")[:2] == kv.block_ids("a")[:2]
    assert kv.block_ids("b")[2] != kv.block_ids("a")[2]
    assert [kv.pool.blocks[i].ref_cnt for i in kv.block_ids("a")] == [2, 2, 1]
    assert kv.num_free_blocks == 10 - 4
    check_kv_invariants(kv)
    kv.free(a)
    assert [kv.pool.blocks[i].ref_cnt for i in kv.block_ids("b")] == [1, 1, 1]
    kv.free(b)
    assert kv.num_free_blocks == 10
    check_kv_invariants(kv)


def test_last_prompt_token_is_never_served_from_cache() -> None:
    kv = KVCacheManager(num_blocks=10, block_size=4, enable_prefix_caching=True)
    a = make_request("a", list(range(8)))
    assert admit(kv, a)
    same = make_request("b", list(range(8)))
    assert len(kv.get_computed_blocks(same)) == 1  # block 2 holds the last token
    longer = make_request("c", list(range(9)))
    assert len(kv.get_computed_blocks(longer)) == 2


def test_freed_blocks_stay_cached_and_are_evicted_lru_tail_first() -> None:
    kv = KVCacheManager(num_blocks=6, block_size=2, enable_prefix_caching=True)
    a = make_request("a", [1, 2, 3, 4, 5, 6, 7])  # blocks [1 2] [3 4] [5 6] [7]
    assert admit(kv, a)
    a_blocks = kv.block_ids("a")
    kv.free(a)
    # Still cached after the free: a new request with the same prefix hits all 3 full blocks.
    again = make_request("x", [1, 2, 3, 4, 5, 6, 9])
    assert [b.block_id for b in kv.get_computed_blocks(again)] == a_blocks[:3]
    # Two unrelated blocks come from the never-used blocks first, then from a's tail.
    other = make_request("o", [50, 51, 52, 53, 54, 55])
    assert kv.allocate_slots(other, 6)
    taken = kv.block_ids("o")
    assert set(a_blocks).isdisjoint(taken[:2])
    assert taken[2] == a_blocks[3]  # the partial block had no hash: evicted first
    assert [b.block_id for b in kv.get_computed_blocks(again)] == a_blocks[:3]
    kv.free(other)  # freed after a, so a's blocks go first now, tail first
    more = make_request("m", [60, 61, 62, 63])
    assert kv.allocate_slots(more, 4)
    assert kv.block_ids("m") == [a_blocks[2], a_blocks[1]]
    assert [b.block_id for b in kv.get_computed_blocks(again)] == a_blocks[:1]
    check_kv_invariants(kv)


def test_hash_collisions_never_serve_wrong_tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every block hashes alike: hits must still be verified against the stored tokens."""
    monkeypatch.setattr(kvm, "hash", lambda _: 7, raising=False)
    kv = KVCacheManager(num_blocks=10, block_size=2, enable_prefix_caching=True)
    a = make_request("a", [1, 2, 3, 4, 5])
    assert admit(kv, a)
    b = make_request("b", [9, 9, 3, 4, 5])
    assert kv.get_computed_blocks(b) == []
    c = make_request("c", [1, 2, 9, 9, 5])
    assert [x.block_id for x in kv.get_computed_blocks(c)] == kv.block_ids("a")[:1]


def test_double_free_is_caught() -> None:
    pool = BlockPool(4)
    (block,) = pool.take(1)
    pool.release([block])
    with pytest.raises(AssertionError, match="double free"):
        pool.release([block])


def test_prefix_caching_disabled_never_hits() -> None:
    kv = KVCacheManager(num_blocks=10, block_size=2, enable_prefix_caching=False)
    a = make_request("a", [1, 2, 3, 4, 5])
    assert admit(kv, a)
    assert kv.get_computed_blocks(make_request("b", [1, 2, 3, 4, 5])) == []
    assert kv.pool.cached == {}


def test_empty_pool_is_rejected() -> None:
    with pytest.raises(ValueError, match="no blocks"):
        BlockPool(0)


# --------------------------------------------------------------------------- state machine

NUM_BLOCKS = 24
BLOCK_SIZE = 4
STEMS = [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12], [1, 2, 3, 4, 20, 21, 22, 23, 24], [30] * 12]


class KVManagerMachine(RuleBasedStateMachine):
    """Requests are admitted with a prefix lookup, grow in chunks (prefill, then one token
    at a time with a fresh token appended), and are freed; the pool is small, so
    allocations fail and cached blocks get evicted."""

    requests = Bundle("requests")

    def __init__(self) -> None:
        super().__init__()
        self.kv = KVCacheManager(NUM_BLOCKS, BLOCK_SIZE, enable_prefix_caching=True)
        self.content = FakeKVContent(NUM_BLOCKS, BLOCK_SIZE)
        self.live: dict[str, Request] = {}
        self.count = 0

    @rule(target=requests, stem=st.sampled_from(STEMS), cut=st.integers(0, 12),
          tail=st.lists(st.integers(0, 3), max_size=10), chunk=st.integers(1, 24))
    def add(self, stem: list[int], cut: int, tail: list[int], chunk: int) -> str:
        tokens = stem[:cut] + tail or [0]
        rid = f"r{self.count}"
        self.count += 1
        req = make_request(rid, tokens)
        if admit(self.kv, req, chunk):
            self.live[rid] = req
            self._compute(req, min(chunk, req.num_tokens - req.num_computed_tokens))
        else:
            assert self.kv.block_ids(rid) == []
        return rid

    def _compute(self, req: Request, n: int) -> None:
        blocks = self.kv.block_ids(req.request_id)
        assert len(blocks) * BLOCK_SIZE >= req.num_computed_tokens + n
        self.content.write(blocks, req.all_token_ids, req.num_computed_tokens, n)
        req.num_computed_tokens += n
        self.content.verify(blocks, req.all_token_ids, req.num_computed_tokens,
                            req.request_id)

    @precondition(lambda self: self.live)
    @rule(data=st.data(), chunk=st.integers(1, 8), token=st.integers(0, 3))
    def grow(self, data: st.DataObject, chunk: int, token: int) -> None:
        rid = data.draw(st.sampled_from(sorted(self.live)))
        req = self.live[rid]
        if req.num_computed_tokens == req.num_tokens:
            req.append_token(token)
        n = min(chunk, req.num_tokens - req.num_computed_tokens)
        if self.kv.allocate_slots(req, n):
            self._compute(req, n)

    @rule(rid=consumes(requests))
    def free(self, rid: str) -> None:
        req = self.live.pop(rid, None)
        if req is not None:
            self.kv.free(req)
            assert self.kv.block_ids(rid) == []

    @invariant()
    def accounting(self) -> None:
        check_kv_invariants(self.kv)
        assert set(self.kv.req_blocks) == set(self.live)

    def teardown(self) -> None:
        for req in self.live.values():
            self.kv.free(req)
        check_kv_invariants(self.kv)
        assert self.kv.num_free_blocks == NUM_BLOCKS


KVManagerMachine.TestCase.settings = settings(
    max_examples=80, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
test_kv_manager_state_machine = KVManagerMachine.TestCase
