"""ModelRunner: turns a ``SchedulerOutput`` into sampled tokens on one device (one TP rank).

Per step: stage inputs on the host (numpy into pinned buffers), one copy to the device, ask
the graph runner how to run the batch (eager, piecewise or full graph, and padded to what
size), compute logits for the requests that sample, sample, one copy back.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from tachyon.attention.base import AttentionSpec, CommonAttentionMetadata
from tachyon.attention.registry import get_backend_class
from tachyon.config import DEFAULT_CPU_KV_CACHE_BYTES, EngineConfig
from tachyon.cudagraph.dispatcher import MIXED, BatchDescriptor
from tachyon.cudagraph.modes import CUDAGraphMode, RuntimeMode, resolve_cudagraph_mode
from tachyon.cudagraph.runner import CUDAGraphRunner
from tachyon.forward_context import ForwardContext, set_forward_context
from tachyon.layers.sampler import Sampler, SamplingMetadata, gather_logprobs
from tachyon.loader.loader import load_model
from tachyon.loader.update import NamedTensors, WeightUpdateReport, update_model_weights
from tachyon.lora.manager import NO_SLOT, LoRAManager
from tachyon.lora.request import LoRARequest
from tachyon.sampling_params import SamplingParams
from tachyon.spec_decode.rejection import NO_DRAFT, num_accepted, rejection_sample
from tachyon.step import ModelRunnerOutput, ScheduledRequest, SchedulerOutput
from tachyon.structured_output.manager import StructuredOutputManager
from tachyon.worker.input_buffers import (
    InputBuffers,
    SamplingBuffers,
    StagingFence,
    VerifyBuffers,
)
from tachyon.worker.sleep import (
    MemoryReport,
    count_unset_params,
    device_free_bytes,
    kv_cache_bytes,
    release_weights,
    restore_weights,
    return_memory,
    weights_released,
)

if TYPE_CHECKING:
    from tachyon.cudagraph.compiled import CompiledPiecewiseModel

logger = logging.getLogger(__name__)

ENV_EMULATE_GRAPHS = "TACHYON_EMULATE_CUDAGRAPHS"


@dataclass
class RequestState:
    """What the runner remembers of a request between steps."""

    prompt_len: int
    params: SamplingParams
    token_ids: list[int]  # tokens whose K/V is computed or being computed
    block_ids: list[int]
    generator: torch.Generator | None
    placeholder: int | None = None  # index in token_ids still awaiting its sampled value
    row: int = -1  # block-table row it occupied last step
    row_blocks: int = 0  # how many of its block ids that row already holds
    min_tokens_stop_ids: tuple[int, ...] = ()  # masked until params.min_tokens outputs
    lora_id: int = 0  # its LoRA adapter (0: none)
    # With params.prompt_logprobs, until the chunk that samples is staged: the prompt, for
    # the targets past a chunk's end (token_ids holds only what has been scheduled).
    prompt_ids: list[int] | None = None


@dataclass(frozen=True)
class PromptLogprobSpan:
    """One request's prompt positions scored in a step: logits rows ``[row, row + num)``
    are its positions ``[position, position + num)``, each scored against the next token."""

    request_id: str
    row: int  # first row of the step's prompt-logits tensor
    position: int  # first prompt position
    num: int
    num_logprobs: int  # the request's prompt_logprobs (top-k after the prompt token)


class PendingPromptLogprobs:
    """A step's prompt logprobs on their way to the host: one float64 tensor per step,
    ``[R, 2 (k + 1)]`` holding the token ids (exact in float64) then their logprobs."""

    def __init__(self, host: torch.Tensor, spans: list[PromptLogprobSpan]) -> None:
        self.host, self.spans = host, spans

    def result(self) -> dict[str, tuple[int, list[list[tuple[int, float]]]]]:
        width = self.host.shape[1] // 2
        ids = self.host[:, :width].long().tolist()
        vals = self.host[:, width:].tolist()
        return {sp.request_id: (sp.position, [
            list(zip(ids[j][:sp.num_logprobs + 1], vals[j][:sp.num_logprobs + 1], strict=True))
            for j in range(sp.row, sp.row + sp.num)]) for sp in self.spans}


class PendingOutput:
    """A queued step's sampled tokens, on their way to the host."""

    def __init__(self, runner: ModelRunner | None, request_ids: list[str],
                 host_ids: torch.Tensor | None, event: torch.cuda.Event | None,
                 sampler_output: object, spec_starts: list[int] | None = None,
                 prompt: PendingPromptLogprobs | None = None) -> None:
        self.runner, self.request_ids = runner, request_ids
        self.host_ids, self.event, self.sampler_output = host_ids, event, sampler_output
        self.spec_starts = spec_starts  # a verify step: each request's first logits row
        self.prompt = prompt
        self._result: ModelRunnerOutput | None = None

    @classmethod
    def empty(cls) -> PendingOutput:
        pending = cls(None, [], None, None, None)
        pending._result = ModelRunnerOutput([], [])
        return pending

    def result(self) -> ModelRunnerOutput:
        if self._result is None:
            self._result = self.runner._finish(self)
        return self._result


@dataclass
class StepPlan:
    """A staged batch: how many tokens/requests are real and what the graph runner sees."""

    num_tokens: int
    num_reqs: int
    padded_tokens: int
    padded_reqs: int
    mode: RuntimeMode
    uniform_decode: bool
    desc: BatchDescriptor | None = None  # the graph key (set once dispatched)
    sample_rows: list[int] = field(default_factory=list)  # batch rows that sample
    sample_ids: list[str] = field(default_factory=list)
    # Logits rows: one per sampled request, or 1 + d for one verifying d drafts.
    num_logits: int = 0
    logit_ids: list[str] = field(default_factory=list)  # request per row (speculation only)
    spec_starts: list[int] = field(default_factory=list)  # first row per sampled request
    # (token position, row in the previous step's sampled ids) for inputs sampled last step
    from_previous: list[tuple[int, int]] = field(default_factory=list)
    # Prompt positions scored this step: per request a span; per row its batch index and
    # the prompt token it scores.
    prompt_spans: list[PromptLogprobSpan] = field(default_factory=list)
    prompt_index: list[int] = field(default_factory=list)
    prompt_targets: list[int] = field(default_factory=list)


class ModelRunner:
    def __init__(self, config: EngineConfig, device: torch.device) -> None:
        self.config = config
        self.device = device
        mc, sc = config.model, config.scheduler
        self.block_size = config.cache.block_size
        self.max_num_tokens = sc.max_num_batched_tokens
        self.max_num_seqs = sc.max_num_seqs
        self.speculative = config.speculative
        # Logits rows per step: a verify step scores 1 + k positions of each request.
        self.max_num_logits = self.max_num_seqs if self.speculative is None else min(
            self.max_num_tokens, self.max_num_seqs * (self.speculative.num_speculative_tokens + 1))
        self.model = load_model(mc, device)
        num_layers, heads, kv_heads, head_dim = self.model.attention_shape
        self.num_layers = num_layers
        self.attn_spec = AttentionSpec(
            num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim, scale=head_dim**-0.5,
            block_size=self.block_size, max_num_seqs=sc.max_num_seqs,
            max_num_batched_tokens=sc.max_num_batched_tokens, max_model_len=mc.max_model_len,
            dtype=mc.dtype, device=device,
        )
        self.backend = get_backend_class(config.attention_backend, device,
                                         mc.dtype)(self.attn_spec)

        self.buffers = InputBuffers(self.max_num_tokens, self.max_num_seqs,
                                    self.attn_spec.max_blocks_per_seq, device)
        self.verify_buffers = VerifyBuffers(self.max_num_logits, device) \
            if self.speculative is not None else None
        self.lora_manager = None if config.lora is None else LoRAManager(
            self.model, config.lora, self.buffers.lora_slots, mc.dtype, device)
        self.sampler = Sampler()
        self.sampling_buffers = SamplingBuffers(self.max_num_logits, device)
        # Pinned staging buffers above are refilled every step: see StagingFence.
        self.staging_fence = StagingFence(device)
        self._row_owners: list[RequestState | None] = [None] * self.max_num_seqs
        pin = device.type == "cuda"
        # Verify steps send back each row's token and whether its draft was accepted.
        host_len = self.max_num_seqs if self.speculative is None else 2 * self.max_num_logits
        self._host_ids = [torch.zeros(host_len, dtype=torch.int64, pin_memory=pin)
                          for _ in range(2)]
        self._host_ids_flip = 0
        self._prev_sampled = torch.zeros(self.max_num_seqs, dtype=torch.int64, device=device)
        self._prev_rows: dict[str, int] = {}
        self.kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.states: dict[str, RequestState] = {}
        self.vocab_size = int(mc.hf_config.vocab_size)
        self.structured = StructuredOutputManager(mc.tokenizer_path, self.vocab_size, device)
        # Set by init_graphs after the KV cache; dropped by sleep.
        self.graph_runner: CUDAGraphRunner | None = None
        # The torch.compile'd model, kept from the trial capture for the real one.
        self._compiled_model: CompiledPiecewiseModel | None = None
        self.cudagraph_mode = self._resolve_graph_mode()

    # -- memory --------------------------------------------------------------------------
    @property
    def kv_bytes_per_block(self) -> int:
        s = self.attn_spec
        elem = torch.empty((), dtype=s.dtype).element_size()
        return 2 * self.num_layers * self.block_size * s.num_kv_heads * s.head_dim * elem

    def determine_num_blocks(self) -> int:
        cc = self.config.cache
        max_useful = self.max_num_seqs * self.attn_spec.max_blocks_per_seq
        if cc.num_gpu_blocks_override:
            return cc.num_gpu_blocks_override
        if self.device.type != "cuda":
            budget = cc.kv_cache_memory or DEFAULT_CPU_KV_CACHE_BYTES
            return max(1, min(budget // self.kv_bytes_per_block, max_useful))
        if cc.kv_cache_memory:
            return max(1, cc.kv_cache_memory // self.kv_bytes_per_block)
        return self._profile_gpu_blocks()

    def _profile_gpu_blocks(self) -> int:
        """Run one forward at the token budget and give the KV cache what is left under
        ``gpu_memory_utilization`` after weights, activations and graph reserve."""
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        self.profile_run()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        free, total = torch.cuda.mem_get_info()
        # Memory used by others (other processes, CUDA context) counts against the budget.
        used_elsewhere = total - free - torch.cuda.memory_reserved()
        budget = total * self.config.cache.gpu_memory_utilization - used_elsewhere - peak
        budget -= self._measure_graph_memory()
        blocks = int(budget // self.kv_bytes_per_block)
        if blocks < 1:
            raise ValueError(
                f"no GPU memory left for the KV cache (peak {peak / 2**30:.2f} GiB); raise "
                f"--gpu-memory-utilization or lower --max-num-batched-tokens"
            )
        return blocks

    def _measure_graph_memory(self) -> int:
        """Capture every graph once against a one-block KV cache and measure the pool, so the
        real KV cache is sized with the graphs' memory already taken out. The compiled model
        (if any) is kept for the real capture; the trial graphs are dropped."""
        if self.cudagraph_mode is CUDAGraphMode.NONE or self.device.type != "cuda":
            return 0
        self.allocate_kv_cache(1)
        trial = self._graph_runner(self.cudagraph_mode, emulate=False, compiled=None)
        torch.cuda.synchronize()
        before = torch.cuda.mem_get_info()[0]
        trial.capture_all()
        torch.cuda.synchronize()
        used = max(0, before - torch.cuda.mem_get_info()[0])
        self._compiled_model = trial.release()
        self.kv_caches = []
        gc.collect()
        torch.cuda.empty_cache()
        logger.info("CUDA graphs need %.0f MiB (measured by a trial capture)", used / 2**20)
        return used

    @torch.inference_mode()
    def profile_run(self) -> None:
        n = self.max_num_tokens
        ids = torch.zeros(n, dtype=torch.long, device=self.device)
        with set_forward_context(ForwardContext(self.backend, None, [])):
            hidden = self.model(ids, ids)
        self.model.compute_logits(hidden[: self.max_num_seqs])
        del hidden
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def allocate_kv_cache(self, num_blocks: int) -> None:
        s = self.attn_spec
        shape = (num_blocks, self.block_size, s.num_kv_heads, s.head_dim)
        # Zeroed, not empty: kernels may read (then mask) slots no token has written, and NaN
        # garbage times a zero probability is still NaN.
        self.kv_caches = [
            (torch.zeros(shape, dtype=s.dtype, device=self.device),
             torch.zeros(shape, dtype=s.dtype, device=self.device))
            for _ in range(self.num_layers)
        ]
        self.num_blocks = num_blocks

    # -- one step ------------------------------------------------------------------------
    def execute(self, out: SchedulerOutput) -> ModelRunnerOutput:
        """Run one step and wait for its sampled tokens."""
        return self.execute_async(out).result()

    @torch.inference_mode()
    def execute_async(self, out: SchedulerOutput) -> PendingOutput:
        """Queue one step on the device; the sampled ids come back through ``result()``.

        Inputs whose value is still being sampled by the previous step (asynchronous
        scheduling) are filled on the device from that step's sampled ids.
        """
        for rid in out.finished_request_ids:
            self.states.pop(rid, None)
            self.structured.remove(rid)
        if out.is_empty:
            return PendingOutput.empty()
        self.staging_fence.wait()  # the previous step's copies have read the staging buffers
        plan = self._stage(out)
        self.buffers.copy_to_device(plan.padded_reqs)
        if self.verify_buffers is not None:
            self.verify_buffers.copy_to_device(plan.num_logits)
        self._fill_from_previous(plan)
        common = self._common_metadata(plan)
        metadata = self.backend.build_metadata(common)
        sampling = self._sampling_metadata(plan) if plan.sample_rows else None
        self.staging_fence.record()  # after the step's last copy out of pinned staging
        hidden = self._run_model(plan, metadata)
        prompt = self._prompt_logprobs(plan, hidden) if plan.prompt_spans else None
        if sampling is None:
            return PendingOutput.empty() if prompt is None else \
                PendingOutput(self, [], None, self._record_event(), None, prompt=prompt)
        if self.speculative is not None:
            return self._sample_spec(plan, hidden, sampling, prompt)
        return self._sample(plan, hidden, sampling, prompt)

    def _prompt_logprobs(self, plan: StepPlan, hidden: torch.Tensor) -> PendingPromptLogprobs:
        """Float32 log-softmax at the scored prompt positions (raw logits: no penalties or
        temperature apply to a prompt), the next prompt token's logprob and the top-k, all on
        the device; one copy back is queued."""
        idx = torch.tensor([plan.prompt_index, plan.prompt_targets], dtype=torch.int64)
        idx = idx.to(self.device, non_blocking=True)
        k = max(sp.num_logprobs for sp in plan.prompt_spans)
        # In slices of max_num_logits rows: the [rows, V] temporaries then stay the size the
        # profile run measured for the sampled logits, however long the chunk.
        parts = []
        for rows, tokens in zip(idx[0].split(self.max_num_logits),
                                idx[1].split(self.max_num_logits), strict=True):
            logprobs = self.model.compute_logits(hidden[rows]).float().log_softmax(dim=-1)
            ids, vals, _ = gather_logprobs(logprobs, tokens, k)
            parts.append(torch.cat([ids.double(), vals.double()], dim=1))
        packed = torch.cat(parts)
        host = torch.empty(packed.shape, dtype=torch.float64,
                           pin_memory=self.device.type == "cuda")
        host.copy_(packed, non_blocking=True)
        return PendingPromptLogprobs(host, plan.prompt_spans)

    def _record_event(self) -> torch.cuda.Event | None:
        """An event after the copies queued so far (None on a CPU: they are done)."""
        if self.device.type != "cuda":
            return None
        event = torch.cuda.Event()
        event.record()
        return event

    def _fill_from_previous(self, plan: StepPlan) -> None:
        if not plan.from_previous:
            return
        pos, rows = zip(*plan.from_previous, strict=True)
        idx = torch.tensor([pos, rows], dtype=torch.int64)
        if self.device.type == "cuda":
            idx = idx.pin_memory()
        idx = idx.to(self.device, non_blocking=True)
        self.buffers.input_ids[idx[0]] = self._prev_sampled[idx[1]]

    def _run_model(self, plan: StepPlan, metadata: object) -> torch.Tensor:
        b = self.buffers
        n = plan.padded_tokens
        ctx = ForwardContext(self.backend, metadata, self.kv_caches)
        if self.graph_runner is not None and plan.mode is not RuntimeMode.NONE:
            return self.graph_runner.run(plan.mode, plan.desc, ctx)
        with set_forward_context(ctx):
            return self.model(b.input_ids[:n], b.positions[:n])

    def _dispatch(self, num_tokens: int,
                  uniform_query_len: int) -> tuple[RuntimeMode, BatchDescriptor]:
        if self.graph_runner is None:
            return RuntimeMode.NONE, BatchDescriptor(num_tokens, uniform_query_len)
        return self.graph_runner.dispatch(num_tokens, uniform_query_len)

    def _uniform_query_len(self, num_reqs: int) -> int:
        """The query length every request of the staged batch shares, or MIXED. Only a
        speculative engine has uniform batches of more than one token (verify batches)."""
        if self.speculative is None:
            return MIXED
        lens = np.diff(self.buffers.np_query_start_loc[:num_reqs + 1])
        return int(lens[0]) if lens.min() == lens.max() else MIXED

    def _stage(self, out: SchedulerOutput) -> StepPlan:
        """Update request states and write the step's inputs into the host buffers."""
        b, bs = self.buffers, self.block_size
        num_reqs, num_tokens = len(out.requests), out.total_num_tokens
        plan = StepPlan(num_tokens, num_reqs, num_tokens, num_reqs, RuntimeMode.NONE,
                        out.uniform_decode)
        pos = 0
        b.np_query_start_loc[0] = 0
        ids, positions, slots = b.np_input_ids, b.np_positions, b.np_slot_mapping
        lora_spans: list[tuple[int, int, int]] = []  # (first token, tokens, adapter id)
        for row, s in enumerate(out.requests):
            st = self._update_state(s)
            n = len(s.new_token_ids) + s.num_pending_inputs
            lora_spans.append((pos, n, st.lora_id))
            start = s.num_computed_tokens
            if s.num_pending_inputs:  # the last input is being sampled by the previous step
                plan.from_previous.append((pos + n - 1, self._prev_rows[s.request_id]))
            if n == 1:  # decode: scalar writes, no temporary arrays
                ids[pos] = s.new_token_ids[0] if s.new_token_ids else 0
                positions[pos] = start
                slots[pos] = st.block_ids[start // bs] * bs + start % bs
            else:
                ids[pos:pos + n] = s.new_token_ids
                p = np.arange(start, start + n)
                positions[pos:pos + n] = p
                slots[pos:pos + n] = np.asarray(st.block_ids, dtype=np.int64)[p // bs] * bs \
                    + p % bs
            self._write_block_row(row, st)
            b.np_seq_lens[row] = start + n
            if st.prompt_ids is not None:
                self._stage_prompt_logprobs(plan, s, st, pos)
            pos += n
            b.np_query_start_loc[row + 1] = pos
            if s.sample:
                if self.speculative is not None:
                    self._stage_verify(plan, s, pos)
                else:
                    b.np_logits_indices[plan.num_logits] = pos - 1
                    plan.num_logits += 1
                plan.sample_rows.append(row)
                plan.sample_ids.append(s.request_id)
        q = 1 if out.uniform_decode else self._uniform_query_len(num_reqs)
        plan.mode, plan.desc = self._dispatch(num_tokens, q)
        plan.padded_tokens = plan.desc.num_tokens
        # A full graph is shaped by its request count too: pad requests to a fixed count.
        if plan.mode is RuntimeMode.FULL:
            plan.padded_reqs = plan.desc.num_reqs(self.max_num_seqs)
        self._pad(num_tokens, num_reqs, plan.padded_tokens, plan.padded_reqs,
                  max(1, plan.desc.uniform_query_len))
        if self.lora_manager is not None:
            self._stage_lora(lora_spans)
        return plan

    def _stage_prompt_logprobs(self, plan: StepPlan, s: ScheduledRequest, st: RequestState,
                               batch_index: int) -> None:
        """Score the chunk's prompt positions that have a next prompt token: the logits at
        position p give the logprob of prompt token p + 1. The chunk that samples ends the
        prompt: it is then all scored, and a recompute after preemption is not scored again
        (the engine core keeps what it was handed)."""
        start = s.num_computed_tokens
        num = min(start + len(s.new_token_ids), st.prompt_len - 1) - start
        if num > 0:
            span = PromptLogprobSpan(s.request_id, len(plan.prompt_index), start, num,
                                     st.params.prompt_logprobs)
            plan.prompt_spans.append(span)
            plan.prompt_index += range(batch_index, batch_index + num)
            plan.prompt_targets += st.prompt_ids[start + 1:start + 1 + num]
        if s.sample:
            st.prompt_ids = None

    def _stage_lora(self, spans: list[tuple[int, int, int]]) -> None:
        """Each token's adapter slot; adapters not resident are copied in now (queued
        before this step's forward), never evicting one this step needs."""
        lora = self.lora_manager
        lora.begin_step({lora_id for _, _, lora_id in spans})
        for pos, n, lora_id in spans:
            self.buffers.np_lora_slots[pos:pos + n] = lora.slot_of(lora_id)

    def _stage_verify(self, plan: StepPlan, s: ScheduledRequest, end: int) -> None:
        """Logits rows of a sampled request in a speculative engine: one per draft (checked
        against it) and the bonus row, at the last ``1 + d`` positions of its query."""
        b, d, row0 = self.verify_buffers, s.num_draft_tokens, plan.num_logits
        if d:
            b.np_logits_indices[row0:row0 + d + 1] = np.arange(end - 1 - d, end)
            b.np_draft_ids[row0:row0 + d] = s.new_token_ids[-d:]
        else:
            b.np_logits_indices[row0] = end - 1
        b.np_draft_ids[row0 + d] = NO_DRAFT
        plan.spec_starts.append(row0)
        plan.logit_ids += [s.request_id] * (d + 1)
        plan.num_logits = row0 + d + 1

    def _write_block_row(self, row: int, st: RequestState) -> None:
        """Rows are rewritten only when a request moved rows; otherwise only new blocks go in.
        (Stale ids beyond a request's blocks are never read: lengths bound every access.)"""
        table = self.buffers.np_block_table
        if self._row_owners[row] is not st or st.row != row or st.row_blocks > len(st.block_ids):
            st.row, st.row_blocks = row, 0
            self._row_owners[row] = st
        if st.row_blocks < len(st.block_ids):
            table[row, st.row_blocks:len(st.block_ids)] = st.block_ids[st.row_blocks:]
            st.row_blocks = len(st.block_ids)

    def _pad(self, num_tokens: int, num_reqs: int, padded_tokens: int, padded_reqs: int,
             tokens_per_req: int = 1) -> None:
        """Padding contract: padded tokens write nowhere (slot -1); padded requests have no
        context (seq_len 0) and take ``tokens_per_req`` padded tokens each (1, or 1 + k in a
        verify graph) while any remain."""
        b = self.buffers
        b.np_slot_mapping[num_tokens:padded_tokens] = -1
        b.np_lora_slots[num_tokens:padded_tokens] = NO_SLOT
        b.np_input_ids[num_tokens:padded_tokens] = 0
        b.np_positions[num_tokens:padded_tokens] = 0
        extra = padded_reqs - num_reqs
        if extra > 0:
            takes = np.minimum(np.arange(1, extra + 1) * tokens_per_req,
                               padded_tokens - num_tokens)
            b.np_query_start_loc[num_reqs + 1:padded_reqs + 1] = num_tokens + takes
            b.np_seq_lens[num_reqs:padded_reqs] = 0
            b.np_block_table[num_reqs:padded_reqs] = 0
            self._row_owners[num_reqs:padded_reqs] = [None] * extra

    def stage_dummy(self, desc: BatchDescriptor, mode: RuntimeMode) -> CommonAttentionMetadata:
        """Stage a synthetic batch shaped like graph key ``desc`` (for warm-up and capture)
        and return its attention metadata: every request takes the key's query length (1 when
        mixed), request 0 the surplus; no context, nothing written to the cache."""
        b = self.buffers
        num_tokens, num_reqs = desc.num_tokens, desc.num_reqs(self.max_num_seqs)
        q = max(1, desc.uniform_query_len)
        lens = np.full(num_reqs, q, dtype=np.int64)
        lens[0] += num_tokens - q * num_reqs
        b.np_query_start_loc[0] = 0
        b.np_query_start_loc[1:num_reqs + 1] = np.cumsum(lens)
        b.np_seq_lens[:num_reqs] = lens
        b.np_block_table[:num_reqs] = 0
        self._row_owners[:num_reqs] = [None] * num_reqs
        b.np_input_ids[:num_tokens] = 0
        b.np_positions[:num_tokens] = 0
        b.np_slot_mapping[:num_tokens] = -1
        b.np_lora_slots[:num_tokens] = NO_SLOT
        b.np_logits_indices[:num_reqs] = np.cumsum(lens) - 1
        plan = StepPlan(num_tokens, num_reqs, num_tokens, num_reqs, mode, desc.uniform_decode,
                        desc)
        self.buffers.copy_to_device(num_reqs)
        return self._common_metadata(plan)

    def _update_state(self, s: ScheduledRequest) -> RequestState:
        st = self.states.get(s.request_id)
        if st is None:
            params = s.params
            gen = None
            if params.seed is not None:
                gen = torch.Generator(device=self.device)
                gen.manual_seed(params.seed)
            # Start from the whole prompt: a prefix-cache hit skips computing its head, but
            # penalties still count those tokens.
            st = RequestState(len(s.prompt_token_ids), params, list(s.prompt_token_ids), [],
                              gen, min_tokens_stop_ids=s.min_tokens_stop_ids,
                              lora_id=s.lora_int_id)
            if params.prompt_logprobs is not None:
                st.prompt_ids = list(s.prompt_token_ids)
            self.states[s.request_id] = st
        if s.full_block_ids:
            st.block_ids = list(s.block_ids)
            st.row = -1  # block list replaced (resumed after preemption): rewrite its row
        else:
            st.block_ids.extend(s.block_ids)
        del st.token_ids[s.num_computed_tokens:]
        st.token_ids.extend(s.new_token_ids)
        if s.num_pending_inputs:
            st.placeholder = len(st.token_ids)
            st.token_ids.append(-1)
        return st

    def _common_metadata(self, plan: StepPlan) -> CommonAttentionMetadata:
        b = self.buffers
        r, t = plan.padded_reqs, plan.padded_tokens
        qsl = b.np_query_start_loc[: r + 1]
        lens = b.np_seq_lens[:r]
        return CommonAttentionMetadata(
            num_reqs=r, num_tokens=t, num_actual_tokens=plan.num_tokens,
            max_query_len=int(np.max(np.diff(qsl))) if r else 0,
            max_seq_len=int(lens.max()) if r else 0,
            uniform_decode=plan.uniform_decode,
            query_start_loc=b.query_start_loc[: r + 1], seq_lens=b.seq_lens[:r],
            block_table=b.block_table[:r], slot_mapping=b.slot_mapping[:t],
            query_start_loc_cpu=b.host_query_start_loc[: r + 1],
            seq_lens_cpu=b.host_seq_lens[:r],
        )

    # -- sampling ------------------------------------------------------------------------
    def _sample(self, plan: StepPlan, hidden: torch.Tensor, meta: SamplingMetadata,
                prompt: PendingPromptLogprobs | None) -> PendingOutput:
        k = len(plan.sample_rows)
        logits = self.model.compute_logits(hidden[self.buffers.logits_indices[:k]]).float()
        self._mask_min_tokens(logits, plan, range(k))
        # Filled on the host while the device still runs the forward queued above.
        meta.grammar_bitmask = self.structured.bitmask(
            plan.sample_ids, [self.states[rid].params for rid in plan.sample_ids])
        res = self.sampler(logits, meta)
        self._prev_sampled = res.sampled_token_ids
        self._prev_rows = {rid: i for i, rid in enumerate(plan.sample_ids)}
        # Start the one device->host copy of the step; result() waits for it.
        self._host_ids_flip ^= 1  # two buffers: the next step's copy must not clobber this one
        host = self._host_ids[self._host_ids_flip][:k]
        host.copy_(res.sampled_token_ids, non_blocking=True)
        return PendingOutput(self, plan.sample_ids, host, self._record_event(), res,
                             prompt=prompt)

    def _mask_min_tokens(self, logits: torch.Tensor, plan: StepPlan,
                         first_rows: Iterable[int]) -> None:
        """Below ``min_tokens`` outputs, EOS and stop tokens cannot be drawn (as in vLLM).
        Such a request has one logits row (the scheduler drafts nothing for it):
        ``first_rows`` holds each sampled request's."""
        rows: list[int] = []
        cols: list[int] = []
        for i, rid in zip(first_rows, plan.sample_ids, strict=True):
            st = self.states[rid]
            # token_ids holds the prompt and the outputs so far (a pending one included).
            if st.min_tokens_stop_ids and len(st.token_ids) - st.prompt_len < st.params.min_tokens:
                rows += [i] * len(st.min_tokens_stop_ids)
                cols += st.min_tokens_stop_ids
        if rows:
            idx = torch.tensor([rows, cols], dtype=torch.int64).to(self.device, non_blocking=True)
            logits[idx[0], idx[1]] = float("-inf")

    def _sample_spec(self, plan: StepPlan, hidden: torch.Tensor, meta: SamplingMetadata,
                     prompt: PendingPromptLogprobs | None) -> PendingOutput:
        """Score every logits row (drafts and bonus), rejection-sample, one copy back."""
        r = plan.num_logits
        b = self.verify_buffers
        logits = self.model.compute_logits(hidden[b.logits_indices[:r]]).float()
        self._mask_min_tokens(logits, plan, plan.spec_starts)
        res = rejection_sample(logits, b.draft_ids[:r], meta)
        self._host_ids_flip ^= 1
        host = self._host_ids[self._host_ids_flip][:2 * r]
        host[:r].copy_(res.token_ids, non_blocking=True)
        host[r:].copy_(res.accepted, non_blocking=True)
        return PendingOutput(self, plan.sample_ids, host, self._record_event(), res,
                             plan.spec_starts, prompt)

    def _finish_spec(self, pending: PendingOutput) -> ModelRunnerOutput:
        """Each request's accepted drafts and the token after them, with logprobs."""
        rows = pending.host_ids.numpy()
        r = len(rows) // 2
        starts = np.asarray(pending.spec_starts)
        counts = num_accepted(rows[r:].astype(bool), starts) + 1
        ids = rows[:r].tolist()
        spans = [(int(a), int(a + n)) for a, n in zip(starts, counts, strict=True)]
        tokens = [ids[a:e] for a, e in spans]
        res = pending.sampler_output
        logprobs = None
        if res.logprobs is not None:
            lp_ids, lp_vals = res.logprob_token_ids.tolist(), res.logprobs.tolist()
            logprobs = []
            for rid, (a, e) in zip(pending.request_ids, spans, strict=True):
                st = self.states.get(rid)
                want = st.params.logprobs if st is not None else None
                logprobs.append([[] if want is None else
                                 list(zip(lp_ids[j][:want + 1], lp_vals[j][:want + 1],
                                          strict=True)) for j in range(a, e)])
        return ModelRunnerOutput(pending.request_ids, [t[0] for t in tokens],
                                 [lp[0] for lp in logprobs] if logprobs is not None else None,
                                 tokens, logprobs)

    def _finish(self, pending: PendingOutput) -> ModelRunnerOutput:
        if pending.event is not None:
            pending.event.synchronize()
        if pending.host_ids is None:  # only prompt positions were scored
            out = ModelRunnerOutput([], [])
        elif pending.spec_starts is not None:
            out = self._finish_spec(pending)
        else:
            out = self._finish_sampled(pending)
        if pending.prompt is not None:
            out.prompt_logprobs = pending.prompt.result()
        return out

    def _finish_sampled(self, pending: PendingOutput) -> ModelRunnerOutput:
        ids = pending.host_ids.tolist()
        self.structured.accept(pending.request_ids, ids)
        for rid, tok in zip(pending.request_ids, ids, strict=True):
            st = self.states.get(rid)
            if st is not None and st.placeholder is not None:
                st.token_ids[st.placeholder] = tok  # the input a later step took on the device
                st.placeholder = None
        res = pending.sampler_output
        logprobs = None
        if res.logprobs is not None:
            lp_ids, lp_vals = res.logprob_token_ids.tolist(), res.logprobs.tolist()
            logprobs = []
            for i, rid in enumerate(pending.request_ids):
                st = self.states.get(rid)
                want = st.params.logprobs if st is not None else None
                logprobs.append([] if want is None else
                                list(zip(lp_ids[i][:want + 1], lp_vals[i][:want + 1],
                                         strict=True)))
        return ModelRunnerOutput(pending.request_ids, ids, logprobs)

    def _sampling_metadata(self, plan: StepPlan) -> SamplingMetadata:
        """Stage the step's sampling parameters; their copies are queued before the forward."""
        # One row per logits row: a verifying request's parameters repeat over its rows, and
        # its seeded generator serves them in order.
        states = [self.states[rid] for rid in plan.logit_ids or plan.sample_ids]
        ps = [st.params for st in states]
        k = len(ps)
        rows = {name: [getattr(p, name) for p in ps] for name in SamplingBuffers.FLOAT_FIELDS}
        top_ks = [p.top_k for p in ps]
        self.sampling_buffers.stage(rows, top_ks)
        sb = self.sampling_buffers
        any_top_p = any(v < 1.0 for v in rows["top_p"])
        gens = {i: st.generator for i, st in enumerate(states) if st.generator is not None}
        pen = any(p.presence_penalty or p.frequency_penalty or p.repetition_penalty != 1.0
                  for p in ps)
        wants = [p.logprobs for p in ps if p.logprobs is not None]
        return SamplingMetadata(
            temperature=sb.field("temperature", k),
            all_greedy=all(t == 0.0 for t in rows["temperature"]),
            top_k=sb.top_k(k) if any(top_ks) else None,
            top_p=sb.field("top_p", k) if any_top_p else None,
            min_p=sb.field("min_p", k) if any(v > 0.0 for v in rows["min_p"]) else None,
            generators=gens,
            presence_penalty=sb.field("presence_penalty", k) if pen else None,
            frequency_penalty=sb.field("frequency_penalty", k) if pen else None,
            repetition_penalty=sb.field("repetition_penalty", k) if pen else None,
            prompt_token_ids=self._padded([st.token_ids[: st.prompt_len] for st in states])
            if pen else None,
            output_token_ids=self._padded([st.token_ids[st.prompt_len:] for st in states])
            if pen else None,
            max_num_logprobs=max(wants) if wants else None,
            max_top_k=max(top_ks) if any(top_ks) and not any_top_p else None,
        )

    def _padded(self, rows: list[list[int]]) -> torch.Tensor:
        width = max(1, max(len(r) for r in rows))
        arr = np.full((len(rows), width), self.vocab_size, dtype=np.int64)
        for i, r in enumerate(rows):
            arr[i, : len(r)] = r
        host = torch.from_numpy(arr)
        if self.device.type == "cuda":
            host = host.pin_memory()  # an asynchronous copy needs pinned memory
        return host.to(self.device, non_blocking=True)

    # -- graphs --------------------------------------------------------------------------
    def _resolve_graph_mode(self) -> CUDAGraphMode:
        """Meet the requested mode with the backend's support level, at start-up: a request
        no downgrade can serve fails here, before any memory is spent."""
        # Graph replay can be emulated on a CPU (tests): see tachyon.cudagraph.graph_impl.
        self._emulate_graphs = (self.device.type != "cuda"
                                and os.environ.get(ENV_EMULATE_GRAPHS) == "1")
        on_cuda = self.device.type == "cuda" or self._emulate_graphs
        requested = self.config.compilation.cudagraph_mode or (
            CUDAGraphMode.FULL_AND_PIECEWISE if on_cuda else CUDAGraphMode.NONE)
        res = resolve_cudagraph_mode(requested, self.backend.name,
                                     self.backend.cudagraph_support, on_cuda)
        if res.warning:
            logger.warning(res.warning)
        return res.mode

    def _graph_runner(self, mode: CUDAGraphMode, emulate: bool,
                      compiled: CompiledPiecewiseModel | None) -> CUDAGraphRunner:
        """A graph runner over this runner's model, buffers, backend and current KV caches."""
        spec = self.speculative
        return CUDAGraphRunner(
            self.model, self.buffers, self.backend, self.kv_caches, self.stage_dummy, mode,
            self.config.compilation, self.max_num_seqs, self.max_num_tokens,
            spec.num_speculative_tokens if spec is not None else 0, emulate, compiled)

    @torch.inference_mode()  # as at run time: dynamo guards on the grad mode
    def init_graphs(self) -> str:
        """Resolve the CUDA graph mode against the backend, capture, and return the start-up
        report line."""
        num_graphs, seconds, pool_mib = 0, 0.0, 0.0
        mode = self.cudagraph_mode
        if mode is not CUDAGraphMode.NONE:
            self.graph_runner = self._graph_runner(mode, self._emulate_graphs,
                                                   self._compiled_model)
            num_graphs, seconds, pool_mib = self.graph_runner.capture_all()
        self.graph_stats = {
            "cudagraph_mode": mode.value, "backend": self.backend.name,
            "piecewise_backend": self.config.compilation.piecewise_backend,
            "graphs": num_graphs, "capture_s": round(seconds, 3),
            "pool_mib": round(pool_mib, 1), "kv_blocks": self.num_blocks,
            "block_size": self.block_size,
        }
        spec = self.speculative
        if spec is not None:
            verify = [k for k in self.graph_runner.full if k.uniform_query_len > 1] \
                if self.graph_runner is not None else []
            self.graph_stats["speculative"] = f"{spec.method}:k={spec.num_speculative_tokens}"
            self.graph_stats["verify_graphs"] = len(verify)
        return " ".join(f"{k}={v}" for k, v in self.graph_stats.items())

    # -- RL: new weights, and the device lent to a trainer (loader/update.py, sleep.py) ----
    # The engine core decides when these may run (idle, awake, ...); the runner only acts.
    def update_weights(self, named_tensors: NamedTensors,
                       count_unset: bool = False) -> WeightUpdateReport:
        """Copy HF-named tensors into the weights in place (graphs stay valid). With
        ``count_unset`` (after a level-2 sleep), also count parameters never pushed since."""
        if weights_released(self.model):
            raise ValueError("the weights were discarded by sleep(level=2): call wake_up() "
                             "first, then update_weights()")
        report = update_model_weights(self.model, named_tensors)
        if count_unset:
            report = dataclasses.replace(report, params_unset=count_unset_params(self.model))
        return report

    # -- LoRA adapters (tachyon.lora.manager); the engine core keeps the registry ----------
    def add_lora(self, req: LoRARequest,
                 tensors: dict[str, torch.Tensor] | None = None) -> None:
        """Load (or replace) an adapter; ``tensors``: PEFT-named weights instead of the
        directory's file. ``ValueError`` for a bad adapter or LoRA off."""
        if self.lora_manager is None:
            raise ValueError("LoRA is off: start the engine with enable_lora=True "
                             "(--enable-lora)")
        self.lora_manager.add(req, tensors)

    def remove_lora(self, lora_id: int) -> bool:
        return self.lora_manager is not None and self.lora_manager.remove(lora_id)

    def sleep(self, level: int) -> MemoryReport:
        """Free the CUDA graphs and the KV cache; at level 2 the weights too."""
        start, free_before = time.perf_counter(), device_free_bytes(self.device)
        if self.graph_runner is not None:
            self._compiled_model = self.graph_runner.release()  # kept for the re-capture
            self.graph_runner = None
        kv_bytes = kv_cache_bytes(self.kv_caches)
        self.kv_caches = []
        weight_bytes = release_weights(self.model) if level == 2 else 0
        return_memory(self.device)
        free_after = device_free_bytes(self.device)
        return MemoryReport(kv_bytes, weight_bytes, _delta(free_after, free_before),
                            time.perf_counter() - start)

    def wake_up(self) -> MemoryReport:
        """Re-allocate what sleep freed (the KV cache at its old size; discarded weights as
        NaN until pushed) and capture the graphs again, on the new addresses."""
        start, free_before = time.perf_counter(), device_free_bytes(self.device)
        weight_bytes = restore_weights(self.model) if weights_released(self.model) else 0
        self.allocate_kv_cache(self.num_blocks)
        capture_start = time.perf_counter()
        self.init_graphs()
        capture_s = time.perf_counter() - capture_start
        free_after = device_free_bytes(self.device)
        return MemoryReport(kv_cache_bytes(self.kv_caches), weight_bytes,
                            _delta(free_before, free_after), time.perf_counter() - start,
                            capture_s)


def _delta(larger: int | None, smaller: int | None) -> int | None:
    return None if larger is None or smaller is None else larger - smaller
