"""Continuous batching: who runs this step, and how many tokens each computes.

One token budget (``max_num_batched_tokens``) and one seat limit (``max_num_seqs``). Running
requests go first (decodes and unfinished prefill chunks), then waiting ones in arrival
order, each after its prefix-cache lookup. A prompt longer than what is left of the budget is
chunked. When the KV pool runs dry the newest running request is preempted: its blocks are
freed and it goes back to the front of the queue to be recomputed (its own cached prefix
usually makes that cheap).

With speculative decoding a decoding request also carries drafts (spec_decode/): it computes
``1 + d`` tokens, and ``update_spec`` appends the accepted ones (several per step) and rolls
``num_computed_tokens`` back over the rejected ones. Their KV slots stay in the request's
blocks and are overwritten when the real tokens get there; blocks are only ever registered
in the prefix cache once full of known tokens, so a rejected draft never reaches it. A draft
model's drafts come back with a step's output (``DraftStore``), and a step that samples
allocates lookahead slots for the K/V the drafter writes after it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

from tachyon.config import SchedulerConfig, SpeculativeConfig
from tachyon.engine.kv_cache_manager import KVBlock, KVCacheManager
from tachyon.engine.request import Request, RequestStatus
from tachyon.spec_decode.drafts import DraftStore
from tachyon.spec_decode.ngram import NgramProposer
from tachyon.step import ScheduledRequest, SchedulerOutput


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager, max_model_len: int,
                 max_loras: int = 0) -> None:
        self.config = config
        # LoRA: distinct adapters among running requests stay within the GPU slots, so every
        # step's adapters are resident at once (0: LoRA off).
        self.max_loras = max_loras
        self.kv = kv
        self.max_model_len = max_model_len
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self._finished_ids: list[str] = []
        self._known_to_runner: set[str] = set()
        self._block_counts: dict[str, int] = {}  # blocks already sent to the runner
        self.num_preemptions = 0  # since start, for stats
        self.proposer: NgramProposer | DraftStore | None = None  # set by enable_speculation
        # Slots allocated past a sampling request's tokens (where the pool has them), for the
        # K/V a draft model writes while it drafts after the step (0: none needed).
        self.lookahead = 0
        # Since start, for stats: drafts scheduled, drafts accepted, verify passes (a request
        # with drafts in a step).
        self.spec_counts = {"draft_tokens": 0, "accepted_tokens": 0, "verifies": 0}

    def enable_speculation(self, spec: SpeculativeConfig) -> None:
        """Draft for decoding requests from now on (before the first request arrives)."""
        if spec.method == "draft_model":  # the worker's drafter proposes; we keep them
            self.proposer = DraftStore(spec.num_speculative_tokens)
            self.lookahead = spec.num_speculative_tokens
        else:
            self.proposer = NgramProposer(spec.num_speculative_tokens, spec.prompt_lookup_min,
                                          spec.prompt_lookup_max)

    # -- queue management -------------------------------------------------------------------
    def add_request(self, req: Request) -> None:
        if req.request_id in self.requests:
            raise ValueError(f"request id {req.request_id!r} is already in use")
        self.requests[req.request_id] = req
        self.waiting.append(req)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def finish_requests(self, request_ids: Iterable[str], status: RequestStatus) -> list[Request]:
        """Finish (abort, or stop on a stop string) requests wherever they are; unknown ids are
        ignored. Their blocks are freed at once."""
        done = []
        for rid in request_ids:
            req = self.requests.pop(rid, None)
            if req is None:
                continue
            if req.status is RequestStatus.RUNNING:
                self.running.remove(req)
            else:
                self.waiting.remove(req)
            self._release(req, status)
            done.append(req)
        return done

    def _release(self, req: Request, status: RequestStatus) -> None:
        req.status = status
        if self.proposer is not None:
            self.proposer.drop(req.request_id)
        self.kv.free(req)
        self._block_counts.pop(req.request_id, None)
        if req.request_id in self._known_to_runner:
            self._known_to_runner.discard(req.request_id)
            self._finished_ids.append(req.request_id)

    # -- one step -----------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        out: list[ScheduledRequest] = []
        preempted_any = False
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            remaining = req.num_tokens + req.num_pending - req.num_computed_tokens
            if remaining <= 0 or (req.num_pending and self._finishes_with_pending(req)):
                i += 1  # nothing to compute until the step in flight reports back
                continue
            if remaining == 1 and self.proposer is not None:
                drafts = self._drafts(req, budget)
                # No room for the drafts' slots: decode plainly (preempting only for that).
                if drafts and self._allocate(req, 1 + len(drafts), True):
                    out.append(self._scheduled(req, 1, drafts))
                    budget -= 1 + len(drafts)
                    i += 1
                    continue
            n = min(remaining, budget)
            while not self._allocate(req, n, n == remaining):
                victim = self.running.pop()
                self._preempt(victim)
                preempted_any = True
                if victim is req:
                    break
            else:
                out.append(self._scheduled(req, n))
                budget -= n
                i += 1
                continue
            break
        # Admit waiting requests unless this step had to preempt (the pool is tight).
        loras = {r.lora_int_id for r in self.running if r.lora_int_id} if self.max_loras \
            else set()
        lora_skipped: list[Request] = []  # wait for a slot; later requests may go first
        while (self.waiting and budget > 0 and not preempted_any
               and len(self.running) < self.config.max_num_seqs):
            req = self.waiting[0]
            if req.num_pending:  # preempted while its last token is still being sampled
                break
            if req.lora_int_id and req.lora_int_id not in loras \
                    and len(loras) >= self.max_loras:
                lora_skipped.append(self.waiting.popleft())
                continue
            hits = self.kv.get_computed_blocks(req) if req.num_computed_tokens == 0 else []
            num_cached = len(hits) * self.kv.block_size
            n = req.num_tokens - req.num_computed_tokens - num_cached
            if n > budget and not self.config.enable_chunked_prefill:
                break
            n = min(n, budget)
            if not self._allocate(req, n, n == req.num_tokens - req.num_computed_tokens
                                  - num_cached, hits):
                break
            self.waiting.popleft()
            self.kv.record_prefix_lookup(req.num_tokens, num_cached)
            if req.num_cached_tokens < 0:
                req.num_cached_tokens = num_cached
            req.num_computed_tokens += num_cached
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            if req.lora_int_id:
                loras.add(req.lora_int_id)
            out.append(self._scheduled(req, n))
            budget -= n
        self.waiting.extendleft(reversed(lora_skipped))
        finished, self._finished_ids = self._finished_ids, []
        total = self.config.max_num_batched_tokens - budget
        return SchedulerOutput(out, total, finished)

    def _allocate(self, req: Request, n: int, sample: bool,
                  hits: list[KVBlock] | None = None) -> bool:
        """Slots for ``n`` more tokens; for a step that samples, also ``lookahead`` slots
        after them (within ``max_model_len``) where the pool has them: a draft model writes
        its drafts' K/V there after the step. Never fails for the lookahead alone (the
        drafter then drafts only as far as the request's slots go)."""
        if self.lookahead and sample:
            cached = len(hits) * self.kv.block_size if hits else 0
            extra = min(self.lookahead,
                        self.max_model_len - req.num_computed_tokens - cached - n)
            if extra > 0 and self.kv.allocate_slots(req, n + extra, hits):
                return True
        return self.kv.allocate_slots(req, n, hits)

    def _drafts(self, req: Request, budget: int) -> list[int]:
        """Drafts for a decoding request, as many as the budget, ``max_model_len`` and
        ``max_tokens`` leave room for once every one is accepted and the bonus token added.
        None for requests whose logits at a draft position would need more than the
        sampler's per-row parameters (penalties count earlier tokens; min_tokens masks by
        output count)."""
        p = req.params
        if p.has_penalties or req.num_output_tokens < p.min_tokens:
            return []
        room = min(budget, self.max_model_len - req.num_tokens)
        if p.max_tokens is not None:
            room = min(room, p.max_tokens - req.num_output_tokens)
        if room < 2:
            return []
        return self.proposer.propose(req.request_id, req.all_token_ids, room - 1)

    def _scheduled(self, req: Request, n: int,
                   drafts: list[int] | None = None) -> ScheduledRequest:
        start = req.num_computed_tokens
        rid = req.request_id
        blocks = self.kv.req_blocks.get(rid, ())
        first = rid not in self._known_to_runner
        resumed = rid not in self._block_counts
        sent = 0 if resumed else self._block_counts[rid]
        self._block_counts[rid] = len(blocks)
        new_blocks = [b.block_id for b in blocks[sent:]] if sent < len(blocks) else []
        self._known_to_runner.add(rid)
        known = req.all_token_ids[start:start + n]
        sample = start + n == req.num_tokens + req.num_pending
        num_drafts = len(drafts) if drafts else 0
        if num_drafts:
            known += drafts
        scheduled = ScheduledRequest(
            request_id=rid,
            new_token_ids=known,
            num_computed_tokens=start,
            block_ids=new_blocks,
            full_block_ids=resumed,
            sample=sample,
            num_pending_inputs=n + num_drafts - len(known),
            num_draft_tokens=num_drafts,
            prompt_token_ids=req.prompt_token_ids if first else None,
            params=req.params if first else None,
            min_tokens_stop_ids=tuple(sorted(req.eos_token_ids | req.stop_token_ids))
            if first and req.params.min_tokens else (),
            lora_int_id=req.lora_int_id if first else 0,
        )
        # Counted as computed now, so the next step can be scheduled before this one ends.
        req.num_computed_tokens = start + n + num_drafts
        if sample:
            req.num_pending += 1
        return scheduled

    def _finishes_with_pending(self, req: Request) -> bool:
        """With a token in flight, will the request stop on length whatever that token is?
        Then scheduling another step for it would only be thrown away."""
        if not req.num_pending:
            return False
        p = req.params
        total = req.num_tokens + req.num_pending
        return (p.max_tokens is not None and req.num_output_tokens + req.num_pending
                >= p.max_tokens) or total >= self.max_model_len

    def _preempt(self, req: Request) -> None:
        self.kv.free(req)
        self._block_counts.pop(req.request_id, None)
        req.status = RequestStatus.PREEMPTED
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    # -- after the step -------------------------------------------------------------------
    def update(self, out: SchedulerOutput, sampled: dict[str, int]) -> list[Request]:
        """Append sampled tokens and apply token-level stops. Returns the requests that got a
        new token this step (finished ones included). A request preempted after this step
        was queued still gets its token (it is recomputed with it)."""
        progressed = []
        for s in out.requests:
            if not s.sample:
                continue
            req = self.requests.get(s.request_id)
            if req is None:
                continue  # finished or aborted while the step ran
            req.num_pending -= 1
            token = sampled[s.request_id]
            req.append_token(token)
            progressed.append(req)
            status = self._check_stop(req, token)
            if status is not None:
                self.finish_requests([req.request_id], status)
        return progressed

    def update_spec(self, out: SchedulerOutput, emitted: dict[str, list[int]],
                    drafts: dict[str, list[int]] | None = None,
                    ) -> list[tuple[Request, list[int]]]:
        """``update`` for a speculative engine: each sampled request emits its accepted
        drafts and one more token. Rejected drafts' positions are un-computed; tokens after
        a stop (EOS, stop token, max_tokens, max_model_len) are dropped. Returns each request
        that progressed with the tokens it kept. ``drafts``: a draft model's proposals for
        each request's next step, kept for requests still running."""
        progressed = []
        counts = self.spec_counts
        for s in out.requests:
            if not s.sample:
                continue
            req = self.requests.get(s.request_id)
            if req is None:
                continue  # finished or aborted while the step ran
            req.num_pending -= 1
            tokens = emitted[s.request_id]
            rejected = s.num_draft_tokens - (len(tokens) - 1)
            req.num_computed_tokens -= rejected
            if s.num_draft_tokens:
                counts["draft_tokens"] += s.num_draft_tokens
                counts["accepted_tokens"] += s.num_draft_tokens - rejected
                counts["verifies"] += 1
            kept = []
            for token in tokens:
                req.append_token(token)
                kept.append(token)
                status = self._check_stop(req, token)
                if status is not None:
                    self.finish_requests([req.request_id], status)
                    break
            if drafts is not None and not req.status.finished:
                assert isinstance(self.proposer, DraftStore)
                self.proposer.store(req.request_id, req.num_tokens, drafts[s.request_id])
            progressed.append((req, kept))
        return progressed

    def _check_stop(self, req: Request, token: int) -> RequestStatus | None:
        p = req.params
        if req.num_output_tokens >= p.min_tokens:
            if token in req.eos_token_ids:
                req.stop_reason = None
                return RequestStatus.FINISHED_STOPPED
            if token in req.stop_token_ids:
                req.stop_reason = token
                return RequestStatus.FINISHED_STOPPED
        if p.max_tokens is not None and req.num_output_tokens >= p.max_tokens:
            return RequestStatus.FINISHED_LENGTH
        if req.num_tokens >= self.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None
