"""Scheduler: hand-worked steps (budget, seats, chunking, mixing, preemption order), and a
hypothesis state machine with a fake model: random arrivals with overlapping prompts (prefix
hits), aborts (also while a step runs), EOS and length finishes, synchronous and asynchronous
(step N+1 scheduled before step N's tokens are known). A fake K/V store, written through the
block ids the runner is sent, proves every request reads its own history."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from tachyon.config import SchedulerConfig
from tachyon.engine.kv_cache_manager import KVCacheManager
from tachyon.engine.request import Request, RequestStatus
from tachyon.engine.scheduler import Scheduler
from tachyon.sampling_params import SamplingParams
from tachyon.step import SchedulerOutput
from tachyon_testing import FakeKVContent, check_kv_invariants

EOS = 0


def make_scheduler(num_blocks: int = 64, block_size: int = 4, max_num_seqs: int = 4,
                   budget: int = 16, chunked: bool = True, prefix: bool = True,
                   max_model_len: int = 64) -> Scheduler:
    kv = KVCacheManager(num_blocks, block_size, prefix)
    return Scheduler(SchedulerConfig(max_num_seqs, budget, chunked), kv, max_model_len)


def make_request(rid: str, tokens: list[int], max_tokens: int = 8, **kw: object) -> Request:
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, **kw)
    return Request(rid, tokens, params, frozenset({EOS}))


def shares(out: SchedulerOutput) -> dict[str, int]:
    return {r.request_id: len(r.new_token_ids) for r in out.requests}


def sample_all(out: SchedulerOutput, token: int = 5) -> dict[str, int]:
    return {r.request_id: token for r in out.requests if r.sample}


# --------------------------------------------------------------------------- hand-worked


def test_chunked_prefill_mixes_with_decode_under_one_budget() -> None:
    s = make_scheduler(budget=10)
    s.add_request(make_request("a", list(range(1, 5))))  # 4 tokens
    s.add_request(make_request("b", list(range(101, 125))))  # 24 tokens
    out = s.schedule()
    assert shares(out) == {"a": 4, "b": 6} and out.total_num_tokens == 10
    assert [r.sample for r in out.requests] == [True, False]
    s.update(out, sample_all(out))
    out = s.schedule()  # a decodes (1), b continues its prefill with the other 9
    assert shares(out) == {"a": 1, "b": 9}
    assert not out.uniform_decode
    s.update(out, sample_all(out))
    out = s.schedule()  # 6 + 9 + 9 = 24: b's prompt ends with this chunk, so it samples
    assert shares(out) == {"a": 1, "b": 9}
    assert [r.sample for r in out.requests] == [True, True]
    s.update(out, sample_all(out))
    out = s.schedule()
    assert shares(out) == {"a": 1, "b": 1} and out.uniform_decode


def test_seat_limit_and_budget() -> None:
    s = make_scheduler(max_num_seqs=2, budget=6)
    for i in range(4):
        s.add_request(make_request(f"r{i}", [1, 2, 3]))
    out = s.schedule()
    assert shares(out) == {"r0": 3, "r1": 3}
    s.update(out, sample_all(out))
    out = s.schedule()
    assert shares(out) == {"r0": 1, "r1": 1} and out.uniform_decode
    assert s.num_waiting == 2


def test_without_chunked_prefill_a_prompt_waits_for_a_whole_budget() -> None:
    s = make_scheduler(budget=8, chunked=False)
    s.add_request(make_request("a", [1] * 5))
    s.add_request(make_request("b", [2] * 5))
    out = s.schedule()
    assert shares(out) == {"a": 5}  # b does not fit the 3 tokens left and is not chunked
    s.update(out, sample_all(out))
    out = s.schedule()
    assert shares(out) == {"a": 1, "b": 5}


def test_preemption_frees_the_newest_and_requeues_it_first() -> None:
    # 5 blocks of 4: a and b (7 tokens) take 2 each, c (3 tokens) the last one.
    s = make_scheduler(num_blocks=5, budget=32, max_num_seqs=4)
    a = make_request("a", [1] * 7, max_tokens=20)
    b = make_request("b", [2] * 7, max_tokens=20)
    c = make_request("c", [3] * 3, max_tokens=20)
    for r in (a, b, c):
        s.add_request(r)
    out = s.schedule()
    assert shares(out) == {"a": 7, "b": 7, "c": 3}  # 2 + 2 + 1 blocks
    s.update(out, sample_all(out))
    out = s.schedule()
    # a's 8th token fits block 2; b's too; c's 4th fits its block: nobody preempted yet.
    assert shares(out) == {"a": 1, "b": 1, "c": 1}
    s.update(out, sample_all(out))
    out = s.schedule()
    # a's 9th token needs a 3rd block: c (newest) is preempted to make room. b's needs one
    # too and nobody newer is left, so b preempts itself. Both go back to the queue front.
    assert shares(out) == {"a": 1}
    for r in (b, c):
        assert r.status is RequestStatus.PREEMPTED and r.num_computed_tokens == 0
        assert r.num_preemptions == 1
    assert s.num_preemptions == 2 and list(s.waiting) == [b, c]
    check_kv_invariants(s.kv)
    s.update(out, sample_all(out))
    s.finish_requests(["a"], RequestStatus.FINISHED_ABORTED)
    out = s.schedule()
    # b's two full blocks (prompt, then prompt + its first token) are still cached: only its
    # 9th token is recomputed. c's block was reused for a, so c recomputes all 5 tokens.
    assert shares(out) == {"b": 1, "c": 5}
    rb, rc = out.requests
    assert rb.num_computed_tokens == 8 and rb.full_block_ids and rb.prompt_token_ids is None
    assert rc.num_computed_tokens == 0 and rc.full_block_ids and len(rc.block_ids) == 2
    assert out.finished_request_ids == ["a"]
    check_kv_invariants(s.kv)


def test_prefix_hit_is_taken_before_budgeting() -> None:
    s = make_scheduler(budget=6)
    s.add_request(make_request("a", list(range(1, 14))))  # 13 tokens, 3 chunks of <= 6
    for _ in range(3):
        out = s.schedule()
        s.update(out, sample_all(out))
    s.add_request(make_request("b", [*range(1, 13), 40, 41]))  # shares 3 blocks
    out = s.schedule()
    assert shares(out) == {"a": 1, "b": 2}
    (b,) = [r for r in out.requests if r.request_id == "b"]
    assert b.num_computed_tokens == 12 and b.new_token_ids == [40, 41] and b.sample


def test_token_stops() -> None:
    s = make_scheduler()
    s.add_request(make_request("eos", [1, 2]))
    s.add_request(make_request("stop", [1, 2], stop_token_ids=[9]))
    s.add_request(make_request("min", [1, 2], min_tokens=2))
    s.add_request(make_request("len", [1, 2], max_tokens=1))
    out = s.schedule()
    done = s.update(out, {"eos": EOS, "stop": 9, "min": EOS, "len": 4})
    status = {r.request_id: (r.status, r.stop_reason) for r in done}
    assert status == {
        "eos": (RequestStatus.FINISHED_STOPPED, None),
        "stop": (RequestStatus.FINISHED_STOPPED, 9),
        "min": (RequestStatus.RUNNING, None),
        "len": (RequestStatus.FINISHED_LENGTH, None),
    }
    out = s.schedule()
    assert shares(out) == {"min": 1}
    assert sorted(out.finished_request_ids) == ["eos", "len", "stop"]
    s.update(out, {"min": EOS})
    assert not s.has_unfinished()
    assert s.kv.num_free_blocks == s.kv.pool.num_blocks


def test_max_model_len_ends_generation() -> None:
    s = make_scheduler(max_model_len=6)
    s.add_request(make_request("a", [1, 2, 3, 4], max_tokens=50))
    for _ in range(2):
        out = s.schedule()
        s.update(out, sample_all(out))
    assert not s.has_unfinished()


def test_abort_while_step_runs_drops_the_result() -> None:
    s = make_scheduler()
    a = make_request("a", [1, 2, 3])
    s.add_request(a)
    out = s.schedule()
    s.finish_requests(["a"], RequestStatus.FINISHED_ABORTED)
    assert s.update(out, sample_all(out)) == []
    assert a.output_token_ids == [] and s.kv.num_free_blocks == s.kv.pool.num_blocks
    assert s.schedule().finished_request_ids == ["a"]


def test_duplicate_request_id_is_rejected() -> None:
    s = make_scheduler()
    s.add_request(make_request("a", [1]))
    with pytest.raises(ValueError, match="already in use"):
        s.add_request(make_request("a", [2]))


# --------------------------------------------------------------------------- state machine

BLOCK_SIZE = 4
MAX_MODEL_LEN = 40
NUM_BLOCKS = MAX_MODEL_LEN // BLOCK_SIZE + 4  # one request at max length always fits
STEMS = [[7, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [7, 1, 2, 3, 4, 5, 20, 21], [9] * 12]


class SchedulerMachine(RuleBasedStateMachine):
    """Drives the scheduler like ``LLMEngine.step`` does, synchronously (schedule, run,
    update) or asynchronously (schedule and launch step N+1, then update with step N's
    tokens). The fake runner rebuilds each request's block list and tokens from what it is
    sent, taking pending inputs from the previous step's samples as the device does."""

    def __init__(self) -> None:
        super().__init__()
        self.config: SchedulerConfig | None = None
        self.count = 0

    def _setup(self, seats: int, budget: int, prefix: bool, async_mode: bool) -> None:
        kv = KVCacheManager(NUM_BLOCKS, BLOCK_SIZE, prefix)
        self.config = SchedulerConfig(seats, budget, True)
        self.async_mode = async_mode
        self.s = Scheduler(self.config, kv, MAX_MODEL_LEN)
        self.content = FakeKVContent(NUM_BLOCKS, BLOCK_SIZE)
        self.runner: dict[str, tuple[list[int], list[int]]] = {}  # id -> (blocks, tokens)
        self.device_sampled: dict[str, int] = {}  # last token each request sampled
        self.inflight: tuple[SchedulerOutput, dict[str, int]] | None = None
        self.finished: set[str] = set()

    @precondition(lambda self: self.config is None)
    @rule(seats=st.integers(1, 5), budget=st.integers(5, 24), prefix=st.booleans(),
          async_mode=st.booleans())
    def configure(self, seats: int, budget: int, prefix: bool, async_mode: bool) -> None:
        self._setup(seats, max(budget, seats), prefix, async_mode)

    @precondition(lambda self: self.config is not None)
    @rule(stem=st.sampled_from(STEMS), cut=st.integers(0, 12),
          tail=st.lists(st.integers(1, 3), max_size=12), max_tokens=st.integers(1, 12),
          min_tokens=st.integers(0, 3), ignore_eos=st.booleans())
    def arrive(self, stem: list[int], cut: int, tail: list[int], max_tokens: int,
               min_tokens: int, ignore_eos: bool) -> None:
        tokens = (stem[:cut] + tail)[: MAX_MODEL_LEN - 1] or [1]
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens,
                                min_tokens=min(min_tokens, max_tokens), ignore_eos=ignore_eos)
        self.s.add_request(Request(f"r{self.count}", tokens, params, frozenset({EOS})))
        self.count += 1

    @precondition(lambda self: self.config is not None and self.s.requests)
    @rule(data=st.data())
    def abort(self, data: st.DataObject) -> None:
        self._abort_one(data)

    def _abort_one(self, data: st.DataObject) -> None:
        rid = data.draw(st.sampled_from(sorted(self.s.requests)))
        self.s.finish_requests([rid], RequestStatus.FINISHED_ABORTED)
        self.finished.add(rid)

    @precondition(lambda self: self.config is not None)
    @rule(data=st.data(), abort_mid_step=st.booleans())
    def step(self, data: st.DataObject, abort_mid_step: bool) -> None:
        def draw(out: SchedulerOutput) -> dict[str, int]:
            return {r.request_id: data.draw(st.integers(0, 3)) for r in out.requests
                    if r.sample}

        if not self.async_mode:
            out = self.s.schedule()
            self._run(out, draw(out))
            if abort_mid_step and self.s.requests:
                self._abort_one(data)
            self._update(out, self.device_sampled)
            return
        out = self.s.schedule()
        prev, self.inflight = self.inflight, None
        if out.requests or out.finished_request_ids:
            self.inflight = (out, self._run(out, draw(out)))
        if abort_mid_step and self.s.requests:
            self._abort_one(data)
        if prev is not None:
            self._update(*prev)

    def _update(self, out: SchedulerOutput, sampled: dict[str, int]) -> None:
        before = {rid: req.num_tokens for rid, req in self.s.requests.items()}
        got = {r.request_id: sampled[r.request_id] for r in out.requests if r.sample}
        for req in self.s.update(out, got):
            assert req.num_tokens == before[req.request_id] + 1
            assert req.all_token_ids[-1] == got[req.request_id]
            if req.status.finished:
                self.finished.add(req.request_id)
                assert req.request_id not in self.s.requests

    def _run(self, out: SchedulerOutput, sampled: dict[str, int]) -> dict[str, int]:
        """Check the step, then play the runner: write K/V, read it back, sample."""
        cfg, s = self.config, self.s
        assert out.total_num_tokens == sum(len(r.new_token_ids) + r.num_pending_inputs
                                           for r in out.requests)
        assert out.total_num_tokens <= cfg.max_num_batched_tokens
        assert len(out.requests) <= cfg.max_num_seqs
        ids = [r.request_id for r in out.requests]
        assert len(set(ids)) == len(ids)
        if s.has_unfinished() and self.inflight is None and not self.async_mode:
            assert out.requests, "requests wait but nothing was scheduled: the engine would hang"
        for rid in out.finished_request_ids:
            assert rid in self.finished
            self.runner.pop(rid, None)
        for r in out.requests:
            req = s.requests[r.request_id]
            assert req.status is RequestStatus.RUNNING
            n = len(r.new_token_ids) + r.num_pending_inputs
            assert n >= 1 and r.num_pending_inputs in (0, 1)
            end = r.num_computed_tokens + n
            assert req.num_computed_tokens == end
            assert r.new_token_ids == req.all_token_ids[r.num_computed_tokens:][
                :len(r.new_token_ids)]
            # Known tokens + those in flight, counting the one this step starts sampling.
            assert r.sample == (end == req.num_tokens + req.num_pending - r.sample)
            if r.request_id not in self.runner:
                assert r.prompt_token_ids == req.prompt_token_ids and r.full_block_ids
                self.runner[r.request_id] = ([], list(r.prompt_token_ids))
            blocks, tokens = self.runner[r.request_id]
            if r.full_block_ids:
                blocks[:] = r.block_ids
            else:
                blocks.extend(r.block_ids)
            assert r.num_computed_tokens <= len(tokens)
            del tokens[r.num_computed_tokens:]
            tokens.extend(r.new_token_ids)
            if r.num_pending_inputs:
                tokens.append(self.device_sampled[r.request_id])
            assert blocks == s.kv.block_ids(r.request_id)
            assert len(blocks) * BLOCK_SIZE >= end, "blocks do not cover the computed tokens"
            assert len(blocks) <= -(-MAX_MODEL_LEN // BLOCK_SIZE) + 1  # fits the block table
            self.content.write(blocks, tokens, r.num_computed_tokens, n)
        # Reads happen after this step's writes (per layer, every backend stores K/V first).
        for r in out.requests:
            blocks, tokens = self.runner[r.request_id]
            self.content.verify(blocks, tokens, len(tokens), r.request_id)
        self.device_sampled.update(sampled)
        return sampled

    @invariant()
    def accounting(self) -> None:
        if self.config is None:
            return
        s = self.s
        check_kv_invariants(s.kv)
        assert len(s.running) <= self.config.max_num_seqs
        assert set(s.kv.req_blocks) <= {r.request_id for r in s.running}
        for req in s.running:
            assert req.status is RequestStatus.RUNNING
            assert len(s.kv.block_ids(req.request_id)) * BLOCK_SIZE >= req.num_computed_tokens
        for req in s.waiting:
            assert req.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED)
            assert req.num_computed_tokens == 0 and not s.kv.block_ids(req.request_id)
        assert set(s.requests) == {r.request_id for r in [*s.running, *s.waiting]}

    def teardown(self) -> None:
        if self.config is None:
            return
        # Run what is left to completion (bounded: no livelock), then all blocks are free
        # and the runner has been told about every finished request.
        for _ in range(2000):
            if not self.s.has_unfinished() and self.inflight is None:
                break
            self.step(_FixedData(), False)
        assert not self.s.has_unfinished() and self.inflight is None
        self._run(self.s.schedule(), {})
        assert self.runner == {}
        check_kv_invariants(self.s.kv)
        assert self.s.kv.num_free_blocks == NUM_BLOCKS


class _FixedData:
    """Stands in for ``st.data()`` after the test body: every draw is token 1 (never EOS)."""

    def draw(self, strategy: object) -> int:
        return 1


SchedulerMachine.TestCase.settings = settings(
    max_examples=100, stateful_step_count=50, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
test_scheduler_state_machine = SchedulerMachine.TestCase
