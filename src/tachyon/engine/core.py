"""EngineCore: scheduler, KV cache and executor; token ids in, token ids out.

The core knows nothing of text: no tokenizer, no stop strings, no ``n`` (each sample is its
own ``Request``). ``step()`` runs one scheduling step and reports every request that got a
token as a ``TokenEvent``. ``LLMEngine`` drives it in-process; ``core_proc.run_engine_core``
drives it in its own process for the server.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tachyon.config import EngineConfig
from tachyon.engine.kv_cache_manager import KVCacheManager
from tachyon.engine.request import Request, RequestStatus
from tachyon.engine.scheduler import Scheduler
from tachyon.lora.request import LoRARequest
from tachyon.sampling_params import SamplingParams
from tachyon.step import ModelRunnerOutput, PendingResult, PromptLogprobRow, SchedulerOutput

if TYPE_CHECKING:
    from tachyon.loader.update import NamedTensors, WeightUpdateReport
    from tachyon.worker.sleep import MemoryReport

# Seeds are int64 on the device (torch.Generator.manual_seed); anything else kills a step.
MAX_SEED = 2**63 - 1
# 1: free the KV cache and the CUDA graphs; 2: the weights too (worker/sleep.py).
SLEEP_LEVELS = (1, 2)


@dataclass(slots=True)  # not frozen: a frozen init costs 3x, per request and step
class TokenEvent:
    """One sampled token of one request, with the request's state right after it."""

    request: Request
    token_id: int
    status: RequestStatus  # FINISHED_* if this token ended the request
    stop_reason: int | None  # the stop token id that ended it, if one did
    logprobs: list[tuple[int, float]] | None  # sampled token first, then the top-k
    # With the request's first token, if it asked for them: prompt positions 1.. in order,
    # each (rank, [(prompt token, logprob), top-k ...]).
    prompt_logprobs: list[PromptLogprobRow] | None = None


class EngineCore:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.executor = _make_executor(config)
        _check_kv_capacity(config, self.executor.num_blocks)
        self.kv = KVCacheManager(self.executor.num_blocks, config.cache.block_size,
                                 config.cache.enable_prefix_caching)
        self.scheduler = Scheduler(config.scheduler, self.kv, config.model.max_model_len,
                                   config.lora.max_loras if config.lora is not None else 0)
        # LoRA adapters the engine knows, by id (their weights live on the workers).
        self.loras: dict[int, LoRARequest] = {}
        self.vocab_size = int(config.model.hf_config.vocab_size)
        self.async_scheduling = config.scheduler.async_scheduling and hasattr(
            self.executor, "execute_model_async")
        self._inflight: tuple[SchedulerOutput, PendingResult] | None = None
        self._penalty_requests: set[str] = set()
        # Prompt logprobs gathered over a prompt's chunks until its first token hands them on.
        self._prompt_logprobs: dict[str, list[PromptLogprobRow]] = {}
        self.stats = {"generation_tokens": 0, "steps": 0, "preemptions": 0}
        # Wall time spent blocked on a step's results (the device still running it): the
        # rest of a step's time is host work (scheduling, staging, launching, bookkeeping).
        self.wait_seconds = 0.0
        if config.speculative is not None:
            self.scheduler.enable_speculation(config.speculative)
            self.stats.update(spec_stats(self.scheduler.spec_counts))
        self.sleep_level = 0  # 0: awake; else the level of the last sleep()
        # After a level-2 sleep the weights are re-allocated unset (NaN) until pushed.
        self.weights_unset = False

    # -- requests ------------------------------------------------------------------------
    def check_request(self, req: Request) -> None:
        """What the device would choke on, checked before the request can reach a step."""
        self.check_ready()
        check_params(req.params, self.vocab_size)
        check_prompt_ids(req.prompt_token_ids, self.vocab_size, self.config.model.max_model_len)
        if req.params.n != 1:
            raise ValueError("the engine core runs one sample per request (n = 1)")
        if req.params.structured_outputs is not None and self.config.speculative is not None:
            # A verify step would need a bitmask per draft position and a matcher rollback.
            raise ValueError("structured outputs are not supported with speculative decoding "
                             "yet; serve without --speculative-config for them")
        self.ensure_lora(req.lora_request)

    def add_request(self, req: Request) -> None:
        self.scheduler.add_request(req)
        p = req.params
        # Penalties read every token sampled so far when sampling: the synchronous path.
        # (Grammars need only the last step's tokens, which the runner waits for itself.)
        if p.has_penalties:
            self._penalty_requests.add(req.request_id)
        if p.prompt_logprobs is not None:
            self._prompt_logprobs[req.request_id] = []

    def finish_requests(self, request_ids: Iterable[str], status: RequestStatus) -> None:
        """Abort, or stop (a stop string found by the caller); unknown ids are ignored."""
        ids = list(request_ids)
        self.scheduler.finish_requests(ids, status)
        self._penalty_requests.difference_update(ids)
        for rid in ids:
            self._prompt_logprobs.pop(rid, None)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    # -- the loop ------------------------------------------------------------------------
    def step(self) -> list[TokenEvent]:
        """One scheduling step. With asynchronous scheduling the step is queued on the device
        and the tokens returned are those of the previous step: the host schedules and
        stages step N+1 while the device still runs step N."""
        if not self._use_async():
            events = self._drain()
            sched = self.scheduler.schedule()
            if sched.is_empty and not sched.finished_request_ids:
                return events
            return events + self._process(sched, self.executor.execute_model(sched))
        sched = self.scheduler.schedule()
        prev, self._inflight = self._inflight, None
        if not (sched.is_empty and not sched.finished_request_ids):
            self._inflight = (sched, self.executor.execute_model_async(sched))
        return self._process(prev[0], self._result(prev[1])) if prev is not None else []

    def _result(self, pending: PendingResult) -> ModelRunnerOutput:
        start = time.perf_counter()
        result = pending.result()
        self.wait_seconds += time.perf_counter() - start
        return result

    def _use_async(self) -> bool:
        # Penalties read every earlier token at sampling time, so they need the sync path.
        return self.async_scheduling and not self._penalty_requests

    def _drain(self) -> list[TokenEvent]:
        if self._inflight is None:
            return []
        (sched, pending), self._inflight = self._inflight, None
        return self._process(sched, self._result(pending))

    def _process(self, sched: SchedulerOutput, result: ModelRunnerOutput) -> list[TokenEvent]:
        self.stats["steps"] += 1
        self.stats["preemptions"] = self.scheduler.num_preemptions
        if result.prompt_logprobs is not None:
            self._gather_prompt_logprobs(result.prompt_logprobs)
        if result.spec_token_ids is not None:
            return self._process_spec(sched, result)
        sampled = dict(zip(result.request_ids, result.sampled_token_ids, strict=True))
        logprobs = dict(zip(result.request_ids, result.logprobs, strict=True)) \
            if result.logprobs is not None else {}
        events = []
        for req in self.scheduler.update(sched, sampled):
            rid = req.request_id
            if req.status.finished:
                self._penalty_requests.discard(rid)
            stop = req.stop_reason if isinstance(req.stop_reason, int) else None
            events.append(TokenEvent(req, sampled[rid], req.status, stop, logprobs.get(rid),
                                     self._take_prompt_logprobs(rid)))
        self.stats["generation_tokens"] += len(events)
        return events

    def _process_spec(self, sched: SchedulerOutput,
                      result: ModelRunnerOutput) -> list[TokenEvent]:
        """A speculative step: one event per token kept, several per request; only a
        request's last event carries its finish."""
        emitted = dict(zip(result.request_ids, result.spec_token_ids, strict=True))
        logprobs = dict(zip(result.request_ids, result.spec_logprobs, strict=True)) \
            if result.spec_logprobs is not None else {}
        events = []
        drafts = dict(zip(result.request_ids, result.draft_token_ids, strict=True)) \
            if result.draft_token_ids is not None else None
        for req, tokens in self.scheduler.update_spec(sched, emitted, drafts):
            rid = req.request_id
            if req.status.finished:
                self._penalty_requests.discard(rid)
            stop = req.stop_reason if isinstance(req.stop_reason, int) else None
            lps = logprobs.get(rid)
            last = len(tokens) - 1
            for j, token in enumerate(tokens):
                events.append(TokenEvent(
                    req, token, req.status if j == last else RequestStatus.RUNNING,
                    stop if j == last else None, lps[j] if lps else None,
                    self._take_prompt_logprobs(rid) if j == 0 else None))
        self.stats["generation_tokens"] += len(events)
        self.stats.update(spec_stats(self.scheduler.spec_counts))
        return events

    def _gather_prompt_logprobs(
            self, chunks: dict[str, tuple[int, list[PromptLogprobRow]]]) -> None:
        """Place each chunk at its positions: a prefill recomputed after preemption
        overwrites what it scored before, and one after the first token is ignored."""
        for rid, (position, rows) in chunks.items():
            gathered = self._prompt_logprobs.get(rid)
            if gathered is not None:
                del gathered[position:]
                gathered.extend(rows)

    def _take_prompt_logprobs(self, rid: str) -> list[PromptLogprobRow] | None:
        return self._prompt_logprobs.pop(rid, None) if self._prompt_logprobs else None

    def reset_prefix_cache(self) -> None:
        """Forget every cached block not in use (e.g. between benchmark runs)."""
        self.kv.reset_prefix_cache()

    # -- new weights, and the device lent to a trainer (RL) -------------------------------
    def check_ready(self) -> None:
        """Requests can run: the engine is awake and its weights are set."""
        if self.sleep_level:
            raise RuntimeError(f"the engine is asleep (sleep(level={self.sleep_level})); "
                               f"call wake_up() before generating")
        if self.weights_unset:
            raise RuntimeError("the weights were discarded by sleep(level=2) and not all pushed "
                               "since: call update_weights() with the full state dict first")

    def update_weights(self, named_tensors: NamedTensors) -> WeightUpdateReport:
        """Copy HF-named tensors into the loaded weights in place, then forget the prefix
        cache (its K/V came from the old weights). Awake or asleep at level 1."""
        from tachyon.loader.update import named_tensor_list  # torch: not at import

        tensors = named_tensor_list(named_tensors)  # bad forms fail here, before any rank
        self._check_idle("update_weights")
        report = self.executor.update_weights(tensors, self.weights_unset)
        self.kv.reset_prefix_cache()
        self.weights_unset = report.params_unset > 0
        return report

    def sleep(self, level: int = 1) -> MemoryReport:
        """Free the KV cache and the CUDA graphs (level 2: the weights too) until wake_up."""
        if level not in SLEEP_LEVELS:
            raise ValueError(f"sleep level must be one of {SLEEP_LEVELS}, got {level!r}")
        if self.sleep_level:
            raise RuntimeError(f"the engine is already asleep (level {self.sleep_level})")
        self._check_idle("sleep")
        report = self.executor.sleep(level)
        self.kv.reset_prefix_cache()  # the cached K/V goes with the cache
        self.sleep_level = level
        return report

    def wake_up(self) -> MemoryReport:
        """Re-allocate what sleep freed, at the same size, and re-capture the CUDA graphs."""
        if not self.sleep_level:
            raise RuntimeError("the engine is awake; wake_up() follows a sleep()")
        report = self.executor.wake_up()
        self.weights_unset = self.sleep_level == 2
        self.sleep_level = 0
        return report

    # -- LoRA adapters ------------------------------------------------------------------
    def ensure_lora(self, lora_request: LoRARequest | None) -> None:
        """Make a request's adapter known, loading it on first use (or when its id comes
        back with another path). ``ValueError`` for a bad adapter or LoRA off."""
        if lora_request is None:
            return
        if not isinstance(lora_request, LoRARequest):
            raise ValueError(f"lora_request must be a tachyon.LoRARequest, got "
                             f"{type(lora_request).__name__}")
        known = self.loras.get(lora_request.lora_int_id)
        if known is None or known.lora_path != lora_request.lora_path:
            self.add_lora(lora_request)

    def add_lora(self, lora_request: LoRARequest,
                 tensors: dict[str, Any] | None = None) -> None:
        """Load an adapter on every worker (``tensors``: PEFT-named weights to use instead of
        the directory's file). The same id again replaces its weights in place, in its GPU
        slot too: requests running with it see the new weights from the next step on, and
        the prefix cache is reset (its K/V came from the old ones)."""
        if self.config.lora is None:
            raise ValueError("LoRA is off: start the engine with enable_lora=True "
                             "(--enable-lora)")
        replacing = lora_request.lora_int_id in self.loras
        self.executor.add_lora(lora_request, tensors)
        self.loras[lora_request.lora_int_id] = lora_request
        if replacing:
            self.kv.reset_prefix_cache()

    def remove_lora(self, lora_int_id: int) -> bool:
        """Forget an adapter (False if unknown); refused while a request uses it."""
        if lora_int_id not in self.loras:
            return False
        users = [r.request_id for r in self.scheduler.requests.values()
                 if r.lora_int_id == lora_int_id]
        if users:
            raise ValueError(f"LoRA adapter {self.loras[lora_int_id].lora_name!r} is in use "
                             f"by {len(users)} unfinished requests")
        self.executor.remove_lora(lora_int_id)
        del self.loras[lora_int_id]
        return True

    def list_loras(self) -> list[LoRARequest]:
        return list(self.loras.values())

    def _check_idle(self, what: str) -> None:
        """Requests in flight would read freed or changing memory: refuse, don't wait (a
        caller that waited inside ``step()`` would never return)."""
        if self.has_unfinished_requests():
            n = len(self.scheduler.running) + len(self.scheduler.waiting)
            raise RuntimeError(f"{what}() needs an idle engine, and {n} requests are "
                               f"unfinished: let them finish or abort them first")
        self._drain()  # an asynchronous step still queued (of aborted requests) ends first

    def shutdown(self) -> None:
        self.executor.shutdown()


def spec_stats(counts: dict[str, int]) -> dict[str, float]:
    """Speculation counters since start, and what they mean: the share of drafts accepted,
    and the tokens a verify pass yields on average (its accepted drafts plus one)."""
    drafts, accepted, verifies = (counts["draft_tokens"], counts["accepted_tokens"],
                                  counts["verifies"])
    return {"spec_draft_tokens": drafts, "spec_accepted_tokens": accepted,
            "spec_verifies": verifies,
            "spec_acceptance_rate": accepted / drafts if drafts else 0.0,
            "spec_mean_accepted_length": 1 + accepted / verifies if verifies else 0.0}


def spec_delta(before: dict[str, int], after: dict[str, int]) -> dict[str, float]:
    """``spec_stats`` of what happened between two snapshots of the counters."""
    return spec_stats({k: after[k] - before[k] for k in after})


def check_params(params: SamplingParams, vocab_size: int) -> None:
    """Ranges, stop token ids inside the vocabulary, and seeds the device can take (sample
    ``i`` of ``n`` uses ``seed + i``). Raises ``ValueError`` naming the field."""
    if not isinstance(params, SamplingParams):
        raise ValueError("params must be a tachyon.SamplingParams")
    params.validate()
    outside = [t for t in params.stop_token_ids or () if t >= vocab_size]
    if outside:
        raise ValueError(f"stop token id {outside[0]} is outside the vocabulary "
                         f"[0, {vocab_size})")
    seed, n = params.seed, params.n
    if seed is not None and not 0 <= seed <= MAX_SEED - (n - 1):
        top = "2**63" if n == 1 else f"2**63 - {n - 1}"
        raise ValueError(f"seed must be in [0, {top}) (sample i of n uses seed + i), got {seed}")


def check_prompt_ids(ids: list[int], vocab_size: int, max_model_len: int) -> None:
    if not ids:
        raise ValueError("the prompt is empty; give at least one token")
    if len(ids) > max_model_len:
        raise ValueError(f"the prompt has {len(ids)} tokens, more than max_model_len "
                         f"({max_model_len}); shorten it or raise --max-model-len")
    bad = [t for t in ids if not isinstance(t, int) or not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"token id {bad[0]!r} is outside the vocabulary [0, {vocab_size})")


def _check_kv_capacity(config: EngineConfig, num_blocks: int) -> None:
    """One request of ``max_model_len`` tokens must fit the pool, or it would wait forever."""
    bs, max_len = config.cache.block_size, config.model.max_model_len
    if num_blocks * bs < max_len:
        raise ValueError(
            f"the KV cache holds {num_blocks * bs} tokens ({num_blocks} blocks of {bs}), fewer "
            f"than max_model_len ({max_len}); lower --max-model-len to {num_blocks * bs} or "
            f"give the cache more memory (--kv-cache-memory, --gpu-memory-utilization)"
        )


def _make_executor(config: EngineConfig) -> Any:
    if config.parallel.tensor_parallel_size > 1:
        from tachyon.executor.multiproc import MultiprocExecutor

        return MultiprocExecutor(config)
    from tachyon.executor.uniproc import UniProcExecutor

    return UniProcExecutor(config)
