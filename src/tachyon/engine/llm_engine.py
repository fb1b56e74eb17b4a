"""LLMEngine: requests in, outputs out, one ``step()`` at a time.

``add_request`` validates, tokenizes, fans ``n`` out into one core request per sample and
queues them; ``step`` runs one ``EngineCore`` step and turns its tokens into text (stop strings
included); ``abort_request`` frees a request's blocks at once. The server runs the same
``EngineCore`` in its own process instead (``AsyncLLM``).
"""

from __future__ import annotations

import copy
import itertools
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tachyon.config import EngineArgs, EngineConfig
from tachyon.engine.core import EngineCore, TokenEvent, check_params, check_prompt_ids
from tachyon.engine.detokenizer import IncrementalDetokenizer, finish_reason_of
from tachyon.engine.request import Request, RequestStatus
from tachyon.loader.tokenizer import load_tokenizer
from tachyon.lora.request import LoRARequest
from tachyon.outputs import CompletionOutput, PromptLogprobs, PromptTokenRanks, RequestOutput
from tachyon.sampling_params import SamplingParams
from tachyon.step import PromptLogprobRow

if TYPE_CHECKING:
    from tachyon.loader.update import NamedTensors, WeightUpdateReport
    from tachyon.worker.sleep import MemoryReport

logger = logging.getLogger(__name__)

Prompt = str | list[int] | dict[str, Any]


@dataclass
class _Sequence:
    """One of a request's ``n`` samples."""

    index: int
    request: Request
    detok: IncrementalDetokenizer | None
    output: CompletionOutput
    first_token_time: float | None = None


@dataclass
class _Parent:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    seqs: list[_Sequence]
    arrival: float
    metrics: dict[str, float] = field(default_factory=dict)
    prompt_logprobs: PromptLogprobs | None = None
    prompt_token_ranks: PromptTokenRanks | None = None

    @property
    def finished(self) -> bool:
        return all(s.output.finish_reason is not None for s in self.seqs)


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        start = time.perf_counter()
        self.tokenizer = (None if config.model.skip_tokenizer_init
                          else load_tokenizer(config.model.tokenizer_path))
        self.core = EngineCore(config)
        # Views of the core's parts (one owner each), for callers and tests.
        self.executor, self.kv, self.scheduler = (
            self.core.executor, self.core.kv, self.core.scheduler)
        self.eos_token_ids = eos_token_ids(config.model.hf_config, self.tokenizer)
        self.vocab_size = self.core.vocab_size
        self.async_scheduling = self.core.async_scheduling
        self._parents: dict[str, _Parent] = {}
        self._seq_owner: dict[str, tuple[_Parent, _Sequence]] = {}
        self._ids = itertools.count()
        # Streaming callers want an output per new token; batch callers only final ones.
        self.emit_unfinished = True
        self._counts = {"prompt_tokens": 0, "requests_finished": 0}
        self.startup_seconds = time.perf_counter() - start
        logger.info("tachyon ready in %.1f s: %s", self.startup_seconds,
                    self.executor.startup_report)

    @classmethod
    def from_engine_args(cls, args: EngineArgs) -> LLMEngine:
        return cls(args.create_config())

    @property
    def stats(self) -> dict[str, int]:
        """Tokens in and out, steps, preemptions, finished requests: counts since start."""
        return {**self.core.stats, **self._counts}

    # -- requests ------------------------------------------------------------------------
    def tokenize(self, prompt: Prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), list(prompt["prompt_token_ids"])
            prompt = prompt.get("prompt", "")
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("the prompt is empty; give at least one character or token")
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer (dummy preset?); pass token ids")
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, list | tuple):
            return None, list(prompt)
        raise ValueError(
            f"a prompt is a string or a list of token ids, got {type(prompt).__name__}")

    def add_request(self, request_id: str | None, prompt: Prompt,
                    params: SamplingParams | None = None,
                    arrival_time: float | None = None,
                    lora_request: LoRARequest | None = None) -> str:
        """Validate then queue. On error nothing is queued and nothing already queued changes
        (a new adapter may have been loaded: see ``EngineCore.ensure_lora``)."""
        self.core.check_ready()
        params = params or SamplingParams()
        self._check_params(params)
        text, ids = self.tokenize(prompt)
        self._check_prompt(ids)
        self.core.ensure_lora(lora_request)
        rid = request_id if request_id is not None else str(next(self._ids))
        if rid in self._parents:
            raise ValueError(f"request id {rid!r} is already in use")
        now = arrival_time if arrival_time is not None else time.monotonic()
        parent = _Parent(rid, text, ids, [], now)
        for i in range(params.n):
            # Each request owns its params: a caller who changes theirs after this call
            # changes neither this request nor the step's cached sampling rows.
            sp = child_params(params, i) if params.n > 1 else copy.copy(params)
            req = Request(rid if params.n == 1 else f"{rid}#{i}", ids, sp, self.eos_token_ids, now,
                          lora_request)
            detok = (IncrementalDetokenizer(self.tokenizer, ids, sp)
                     if self.tokenizer is not None else None)
            seq = _Sequence(i, req, detok, CompletionOutput(i, "", []))
            if sp.logprobs is not None:
                seq.output.logprobs, seq.output.cumulative_logprob = [], 0.0
            parent.seqs.append(seq)
        self._parents[rid] = parent
        for seq in parent.seqs:
            self._seq_owner[seq.request.request_id] = (parent, seq)
            self.core.add_request(seq.request)
        self._counts["prompt_tokens"] += len(ids) * params.n
        return rid

    def _check_params(self, params: SamplingParams) -> None:
        check_params(params, self.vocab_size)

    def _check_prompt(self, ids: list[int]) -> None:
        check_prompt_ids(ids, self.vocab_size, self.config.model.max_model_len)

    def abort_request(self, request_ids: str | list[str]) -> None:
        ids = [request_ids] if isinstance(request_ids, str) else list(request_ids)
        seq_ids = []
        for rid in ids:
            parent = self._parents.pop(rid, None)
            if parent is None:
                continue
            for seq in parent.seqs:
                seq_ids.append(seq.request.request_id)
                self._seq_owner.pop(seq.request.request_id, None)
        self.core.finish_requests(seq_ids, RequestStatus.FINISHED_ABORTED)

    def has_unfinished_requests(self) -> bool:
        return bool(self._parents)

    def get_tokenizer(self) -> Any:
        return self.tokenizer

    # -- the loop ------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One core step (with asynchronous scheduling, the tokens of the previous one),
        as one output per request that got a token."""
        events = self.core.step()
        now = time.monotonic()
        touched: dict[str, _Parent] = {}
        stopped: list[str] = []
        for ev in events:
            owner = self._seq_owner.get(ev.request.request_id)
            if owner is None:
                continue
            parent, seq = owner
            if seq.output.finish_reason is not None:
                continue  # a stop string ended it earlier in this step (speculation)
            if ev.prompt_logprobs is not None:
                parent.prompt_logprobs = prompt_logprobs_of(ev.prompt_logprobs)
                parent.prompt_token_ranks = prompt_token_ranks_of(ev.prompt_logprobs)
            self._on_token(seq, ev, now, stopped)
            touched[parent.request_id] = parent
        if stopped:  # stop strings: finish in the scheduler so the blocks are freed now
            self.core.finish_requests(stopped, RequestStatus.FINISHED_STOPPED)
        return [self._make_output(p, now) for p in touched.values()
                if self.emit_unfinished or p.finished]

    def _on_token(self, seq: _Sequence, ev: TokenEvent, now: float,
                  stopped: list[str]) -> None:
        out = seq.output
        out.token_ids.append(ev.token_id)
        if seq.first_token_time is None:
            seq.first_token_time = now
        if ev.logprobs and out.logprobs is not None:
            out.logprobs.append(dict(ev.logprobs))
            out.cumulative_logprob += ev.logprobs[0][1]
        engine_finish = finish_reason_of(ev.status)
        if seq.detok is not None and seq.detok.on_token(ev.token_id, engine_finish):
            # A stop string wins over a length limit reached by the same token.
            out.finish_reason, out.stop_reason = "stop", seq.detok.stop_reason
            if not ev.status.finished:
                stopped.append(ev.request.request_id)
        elif engine_finish is not None:
            out.finish_reason, out.stop_reason = engine_finish, ev.stop_reason
        if seq.detok is not None:
            out.text = seq.detok.text

    def _make_output(self, parent: _Parent, now: float) -> RequestOutput:
        finished = parent.finished
        if finished:
            self._parents.pop(parent.request_id, None)
            for seq in parent.seqs:
                self._seq_owner.pop(seq.request.request_id, None)
            self._counts["requests_finished"] += 1
        first = [s.first_token_time for s in parent.seqs if s.first_token_time is not None]
        metrics = {"arrival_time": parent.arrival, "now": now}
        if first:
            metrics["first_token_time"] = min(first)
        cached = max(0, parent.seqs[0].request.num_cached_tokens)
        return RequestOutput(parent.request_id, parent.prompt, parent.prompt_token_ids,
                             [s.output for s in parent.seqs], finished, cached,
                             parent.prompt_logprobs, metrics, parent.prompt_token_ranks)

    def take_text_delta(self, request_id: str, index: int, finished: bool) -> str:
        """For streaming: the text of sample ``index`` not yet handed out."""
        parent = self._parents.get(request_id)
        return "" if parent is None else parent.seqs[index].detok.take_delta(finished)

    def reset_prefix_cache(self) -> None:
        """Forget every cached block not in use (e.g. between benchmark runs)."""
        self.core.reset_prefix_cache()

    # -- new weights, and the device lent to a trainer (see EngineCore) -------------------
    def update_weights(self, named_tensors: NamedTensors) -> WeightUpdateReport:
        return self.core.update_weights(named_tensors)

    def sleep(self, level: int = 1) -> MemoryReport:
        return self.core.sleep(level)

    # -- LoRA adapters (see EngineCore) -----------------------------------------------------
    def add_lora(self, lora_request: LoRARequest) -> None:
        self.core.add_lora(lora_request)

    def update_lora(self, lora_request: LoRARequest, tensors: dict[str, Any]) -> None:
        self.core.add_lora(lora_request, tensors)

    def remove_lora(self, lora_int_id: int) -> bool:
        return self.core.remove_lora(lora_int_id)

    def list_loras(self) -> list[LoRARequest]:
        return self.core.list_loras()

    def wake_up(self) -> MemoryReport:
        return self.core.wake_up()

    # -- introspection -------------------------------------------------------------------
    def num_free_blocks(self) -> int:
        return self.kv.num_free_blocks

    def shutdown(self) -> None:
        self.core.shutdown()


def child_params(params: SamplingParams, i: int) -> SamplingParams:
    """Sample ``i`` of ``n``: one sample, and its own seed (``seed + i``) if one is set."""
    sp = copy.copy(params)
    sp.n = 1
    if params.seed is not None:
        sp.seed = params.seed + i
    return sp


def prompt_logprobs_of(rows: list[PromptLogprobRow]) -> PromptLogprobs:
    """The engine core's rows (prompt positions 1..) as ``RequestOutput.prompt_logprobs``."""
    return [None, *(dict(entries) for _, entries in rows)]


def prompt_token_ranks_of(rows: list[PromptLogprobRow]) -> PromptTokenRanks:
    """The rows' ranks as ``RequestOutput.prompt_token_ranks``."""
    return [None, *(rank for rank, _ in rows)]


def eos_token_ids(hf_config: Any, tokenizer: Any) -> frozenset[int]:
    """The model config's EOS ids and the tokenizer's."""
    ids: set[int] = set()
    eos = getattr(hf_config, "eos_token_id", None)
    if isinstance(eos, int):
        ids.add(eos)
    elif isinstance(eos, list | tuple):
        ids.update(int(e) for e in eos)
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return frozenset(ids)
