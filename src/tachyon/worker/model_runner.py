"""ModelRunner: turns a ``SchedulerOutput`` into sampled tokens on one device (one TP rank).

Per step: stage inputs on the host (numpy into pinned buffers), one copy to the device, ask
the graph runner how to run the batch (eager, piecewise or full graph, and padded to what
size), compute logits for the requests that sample, sample, one copy back.

The runner owns the step and composes the parts, each in its own module: request state
(``request_state``), the padded batch (``input_batch``), sampling inputs
(``sampling_inputs``), prompt logprobs (``prompt_logprobs``), speculative verify
(``spec_verify``), a draft model (``spec_decode.draft_model``), results on their way back
(``pending``), KV sizing (``kv_sizing``), the graph mode (``graph_mode``) and LoRA slots
(``lora_hooks``).
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import time
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from tachyon.attention.base import AttentionSpec, CommonAttentionMetadata
from tachyon.attention.registry import get_backend_class
from tachyon.config import EngineConfig
from tachyon.cudagraph.dispatcher import MIXED, BatchDescriptor
from tachyon.cudagraph.modes import CUDAGraphMode, RuntimeMode
from tachyon.cudagraph.runner import CUDAGraphRunner
from tachyon.forward_context import ForwardContext, set_forward_context
from tachyon.layers.sampler import Sampler, SamplerOutput, SamplingMetadata
from tachyon.loader.loader import load_model
from tachyon.loader.update import NamedTensors, WeightUpdateReport, update_model_weights
from tachyon.lora.manager import LoRAManager
from tachyon.lora.request import LoRARequest
from tachyon.spec_decode.draft_model import DraftModel
from tachyon.spec_decode.rejection import RejectionOutput, num_accepted, rejection_sample
from tachyon.step import ModelRunnerOutput, SchedulerOutput
from tachyon.structured_output.manager import StructuredOutputManager
from tachyon.worker.graph_mode import emulate_graphs, resolve_graph_mode
from tachyon.worker.input_batch import common_metadata, pad_batch, stage_dummy, uniform_query_len
from tachyon.worker.input_buffers import (
    InputBuffers,
    SamplingBuffers,
    StagingFence,
    VerifyBuffers,
    to_device,
)
from tachyon.worker.kv_sizing import (
    KVCaches,
    allocate_kv_caches,
    configured_num_blocks,
    kv_bytes_per_block,
    profiled_num_blocks,
)
from tachyon.worker.lora_hooks import LoRASpans, require_lora, stage_lora_slots
from tachyon.worker.pending import LogprobsHost, PendingOutput, finish_sampled, record_event
from tachyon.worker.prompt_logprobs import (
    PendingPromptLogprobs,
    score_prompt,
    stage_prompt_logprobs,
)
from tachyon.worker.request_state import BlockRows, RequestState, update_state
from tachyon.worker.sampling_inputs import PenaltyRows, mask_min_tokens, sampling_metadata
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
from tachyon.worker.spec_verify import finish_spec, stage_verify
from tachyon.worker.step_plan import StepPlan

if TYPE_CHECKING:
    from tachyon.cudagraph.compiled import CompiledPiecewiseModel

logger = logging.getLogger(__name__)


class ModelRunner:
    """One rank's model, KV cache, input buffers and graphs, and the step that uses them."""

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
        spec = self.speculative
        # The draft model (method draft_model): its own weights and K/V caches, the
        # target's block tables (spec_decode/draft_model.py).
        self.drafter = DraftModel(spec.draft, spec.num_speculative_tokens, self.attn_spec,
                                  type(self.backend), device) \
            if spec is not None and spec.draft is not None else None

        self.buffers = InputBuffers(self.max_num_tokens, self.max_num_seqs,
                                    self.attn_spec.max_blocks_per_seq, device)
        self.verify_buffers = VerifyBuffers(self.max_num_logits, device) \
            if self.speculative is not None else None
        self.lora_manager = None if config.lora is None else LoRAManager(
            self.model, config.lora, self.buffers.lora_slots, mc.dtype, device)
        self.sampler = Sampler()
        self.sampling_buffers = SamplingBuffers(self.max_num_logits, device)
        self.vocab_size = int(mc.hf_config.vocab_size)
        self.penalty_rows = PenaltyRows(self.max_num_logits, self.vocab_size, device)
        self.host_logprobs = LogprobsHost(self.max_num_logits, device)
        # Pinned staging buffers above are refilled every step: see StagingFence.
        self.staging_fence = StagingFence(device)
        self.block_rows = BlockRows(self.buffers.np_block_table, self.max_num_seqs)
        pin = device.type == "cuda"
        # Verify steps send back each row's token and whether its draft was accepted.
        host_len = self.max_num_seqs if self.speculative is None else 2 * self.max_num_logits
        self._host_ids = [torch.zeros(host_len, dtype=torch.int64, pin_memory=pin)
                          for _ in range(2)]
        self._host_ids_flip = 0
        # Async steps: (position, previous row) of each input the previous step samples;
        # refilled every step, so behind the StagingFence like the other staging buffers.
        self._prev_idx_host = torch.zeros(2 * self.max_num_seqs, dtype=torch.int64,
                                          pin_memory=pin)
        self._prev_idx_dev = torch.zeros_like(self._prev_idx_host, device=device)
        self._prev_sampled = torch.zeros(self.max_num_seqs, dtype=torch.int64, device=device)
        self._prev_rows: dict[str, int] = {}
        self.kv_caches: KVCaches = []
        self.num_blocks = 0  # set by allocate_kv_cache
        self.states: dict[str, RequestState] = {}
        self.structured = StructuredOutputManager(mc.tokenizer_path, self.vocab_size, device,
                                                  self.max_num_seqs)
        # The last sampled step: under asynchronous scheduling a step with grammars reads its
        # tokens before filling its own bitmask (see structured_output/manager.py).
        self._last_sampled: PendingOutput | None = None
        # Set by init_graphs after the KV cache; dropped by sleep.
        self.graph_runner: CUDAGraphRunner | None = None
        self.graph_stats: dict[str, Any] = {}  # the start-up report's fields (init_graphs)
        # The torch.compile'd model, kept from the trial capture for the real one.
        self._compiled_model: CompiledPiecewiseModel | None = None
        self._emulate_graphs = emulate_graphs(device)
        self.cudagraph_mode = resolve_graph_mode(config.compilation, self.backend,
                                                 device.type == "cuda" or self._emulate_graphs)

    # -- memory --------------------------------------------------------------------------
    @property
    def kv_bytes_per_block(self) -> int:
        """A block's bytes in every cache: the target's and, with a draft model, its own
        (both hold the block's tokens, so the budget is shared between them)."""
        drafter = self.drafter.kv_bytes_per_block if self.drafter is not None else 0
        return kv_bytes_per_block(self.attn_spec, self.num_layers) + drafter

    def determine_num_blocks(self) -> int:
        max_useful = self.max_num_seqs * self.attn_spec.max_blocks_per_seq
        blocks = configured_num_blocks(self.config.cache, self.device, self.kv_bytes_per_block,
                                       max_useful)
        if blocks is not None:
            return blocks
        return profiled_num_blocks(self.config.cache, self.kv_bytes_per_block,
                                   self.profile_run, self._measure_graph_memory)

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
        del trial  # its shared attention buffers too, before the pool goes back
        self._drop_kv_caches()
        gc.collect()
        torch.cuda.empty_cache()
        logger.info("CUDA graphs need %.0f MiB (measured by a trial capture)", used / 2**20)
        return used

    @torch.inference_mode()
    def profile_run(self) -> None:
        n = self.max_num_tokens
        ids = torch.zeros(n, dtype=torch.long, device=self.device)
        # With LoRA, the peak includes the adapters' intermediates.
        profile = ForwardContext(self.backend, None, [], has_lora=self.lora_manager is not None)
        with set_forward_context(profile):
            hidden = self.model(ids, ids)
        self.model.compute_logits(hidden[: self.max_num_seqs])
        del hidden
        if self.drafter is not None:
            self.drafter.profile_run(ids)
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def allocate_kv_cache(self, num_blocks: int) -> None:
        self.kv_caches = allocate_kv_caches(self.attn_spec, self.num_layers, num_blocks)
        if self.drafter is not None:
            self.drafter.allocate_kv_cache(num_blocks)
        self.num_blocks = num_blocks

    def _drop_kv_caches(self) -> None:
        self.kv_caches = []
        if self.drafter is not None:
            self.drafter.kv_caches = []

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
        common = common_metadata(self.buffers, plan)
        metadata = self.backend.build_metadata(common)
        sampling = self._sampling_metadata(plan) if plan.sample_rows else None
        self.staging_fence.record()  # after the step's last copy out of pinned staging
        hidden = self._run_model(plan, metadata)
        if self.drafter is not None:  # its K/V follows the target's, step by step
            n = plan.padded_tokens
            self.drafter.run_batch(common, self.buffers.input_ids[:n],
                                   self.buffers.positions[:n])
        prompt = score_prompt(self.model, plan, hidden, self.max_num_logits, self.device) \
            if plan.prompt_spans else None
        if sampling is None:
            return PendingOutput.empty() if prompt is None else \
                PendingOutput(self, [], None, record_event(self.device), None, prompt=prompt)
        if self.speculative is not None:
            return self._sample_spec(plan, hidden, sampling, prompt)
        return self._sample(plan, hidden, sampling, prompt)

    def _fill_from_previous(self, plan: StepPlan) -> None:
        if not plan.from_previous:
            return
        n = len(plan.from_previous)
        host = self._prev_idx_host[:2 * n]
        host.numpy().reshape(2, n)[:] = np.asarray(plan.from_previous, dtype=np.int64).T
        idx = host.view(2, n)
        if self.device.type == "cuda":
            idx = self._prev_idx_dev[:2 * n].view(2, n)
            idx.copy_(host.view(2, n), non_blocking=True)
        self.buffers.input_ids[idx[0]] = self._prev_sampled[idx[1]]

    def _run_model(self, plan: StepPlan, metadata: Any) -> torch.Tensor:
        """``metadata``: what the backend's ``build_metadata`` made of the step."""
        b = self.buffers
        n = plan.padded_tokens
        ctx = ForwardContext(self.backend, metadata, self.kv_caches, has_lora=plan.desc.has_lora)
        if self.graph_runner is not None and plan.mode is not RuntimeMode.NONE:
            return self.graph_runner.run(plan.mode, plan.desc, ctx)
        with set_forward_context(ctx):
            return self.model(b.input_ids[:n], b.positions[:n])

    def _dispatch(self, num_tokens: int, uniform_query_len: int,
                  has_lora: bool) -> tuple[RuntimeMode, BatchDescriptor]:
        if self.graph_runner is None:
            return RuntimeMode.NONE, BatchDescriptor(num_tokens, uniform_query_len, has_lora)
        return self.graph_runner.dispatch(num_tokens, uniform_query_len, has_lora)

    def _stage(self, out: SchedulerOutput) -> StepPlan:
        """Update request states and write the step's inputs into the host buffers."""
        b, bs = self.buffers, self.block_size
        num_reqs, num_tokens = len(out.requests), out.total_num_tokens
        plan = StepPlan(num_tokens, num_reqs, num_tokens, num_reqs, RuntimeMode.NONE,
                        out.uniform_decode)
        pos = 0
        b.np_query_start_loc[0] = 0
        ids, positions, slots = b.np_input_ids, b.np_positions, b.np_slot_mapping
        states, block_rows = self.states, self.block_rows
        lora_spans: LoRASpans = []
        for row, s in enumerate(out.requests):
            st = update_state(states, s, self.device)
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
            block_rows.write(row, st)
            b.np_seq_lens[row] = start + n
            if st.prompt_ids is not None:
                stage_prompt_logprobs(plan, s, st, pos)
            pos += n
            b.np_query_start_loc[row + 1] = pos
            if s.sample:
                if self.speculative is not None:
                    stage_verify(self.verify_buffers, plan, s, pos)
                else:
                    b.np_logits_indices[plan.num_logits] = pos - 1
                    plan.num_logits += 1
                plan.sample_rows.append(row)
                plan.sample_ids.append(s.request_id)
        # Only a speculative engine has uniform batches of more than one token (verify).
        q = 1 if out.uniform_decode else \
            MIXED if self.speculative is None else uniform_query_len(b, num_reqs)
        # A batch without adapters runs the base model's kernels (BatchDescriptor.has_lora).
        has_lora = self.lora_manager is not None and stage_lora_slots(
            self.lora_manager, b.np_lora_slots, lora_spans, num_tokens)
        plan.mode, plan.desc = self._dispatch(num_tokens, q, has_lora)
        plan.padded_tokens = plan.desc.num_tokens
        # A full graph is shaped by its request count too: pad requests to a fixed count.
        if plan.mode is RuntimeMode.FULL:
            plan.padded_reqs = plan.desc.num_reqs(self.max_num_seqs)
        pad_batch(b, block_rows, num_tokens, num_reqs, plan.padded_tokens, plan.padded_reqs,
                  max(1, plan.desc.uniform_query_len))
        return plan

    def stage_dummy(self, desc: BatchDescriptor, mode: RuntimeMode) -> CommonAttentionMetadata:
        """A synthetic batch shaped like graph key ``desc``, staged and sent (for warm-up and
        capture): see ``input_batch.stage_dummy``."""
        return stage_dummy(self.buffers, self.block_rows, desc, mode, self.max_num_seqs)

    # -- sampling ------------------------------------------------------------------------
    def _sample(self, plan: StepPlan, hidden: torch.Tensor, meta: SamplingMetadata,
                prompt: PendingPromptLogprobs | None) -> PendingOutput:
        k = len(plan.sample_rows)
        logits = self.model.compute_logits(hidden[self.buffers.logits_indices[:k]]).float()
        mask_min_tokens(logits, self.states, plan.sample_ids, range(k), self.device)
        # Filled on the host while the device still runs the forward queued above, once the
        # matchers have seen the previous step's tokens.
        params = [self.states[rid].params for rid in plan.sample_ids]
        if self._last_sampled is not None and self.structured.constrains(params):
            self._last_sampled.result()
        meta.grammar_bitmask = self.structured.bitmask(plan.sample_ids, params)
        res = self.sampler(logits, meta)
        self._prev_sampled = res.sampled_token_ids
        self._prev_rows = {rid: i for i, rid in enumerate(plan.sample_ids)}
        # Start the one device->host copy of the step; result() waits for it.
        self._host_ids_flip ^= 1  # two buffers: the next step's copy must not clobber this one
        host = self._host_ids[self._host_ids_flip][:k]
        host.copy_(res.sampled_token_ids, non_blocking=True)
        logprobs = self._logprobs_to_host(res)  # before the event: it covers this copy
        self._last_sampled = PendingOutput(self, plan.sample_ids, host,
                                           record_event(self.device), res, prompt=prompt,
                                           logprobs=logprobs)
        return self._last_sampled

    def _sample_spec(self, plan: StepPlan, hidden: torch.Tensor, meta: SamplingMetadata,
                     prompt: PendingPromptLogprobs | None) -> PendingOutput:
        """Score every logits row (drafts and bonus), rejection-sample, one copy back."""
        r = plan.num_logits
        b = self.verify_buffers
        logits = self.model.compute_logits(hidden[b.logits_indices[:r]]).float()
        mask_min_tokens(logits, self.states, plan.sample_ids, plan.spec_starts, self.device)
        res = rejection_sample(logits, b.draft_ids[:r], meta)
        self._host_ids_flip ^= 1
        host = self._host_ids[self._host_ids_flip][:2 * r]
        host[:r].copy_(res.token_ids, non_blocking=True)
        host[r:].copy_(res.accepted, non_blocking=True)
        drafts = self._propose_drafts(plan, res.token_ids, res.accepted) \
            if self.drafter is not None else None
        logprobs = self._logprobs_to_host(res)  # before the event: it covers this copy
        return PendingOutput(self, plan.sample_ids, host, record_event(self.device), res,
                             plan.spec_starts, prompt, drafts, logprobs)

    def _logprobs_to_host(self, res: SamplerOutput | RejectionOutput,
                          ) -> tuple[torch.Tensor, torch.Tensor] | None:
        if res.logprobs is None:
            return None
        return self.host_logprobs.copy(res.logprob_token_ids, res.logprobs)

    def _propose_drafts(self, plan: StepPlan, token_ids: torch.Tensor,
                        accepted: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        """The draft model's next drafts for every sampled request, from the token each
        emits last (after its accepted drafts) at the position after them."""
        b, bs = self.buffers, self.block_size
        starts = np.asarray(plan.spec_starts)
        # The drafter's positions need this step's acceptance on the host: one wait (the
        # step is synchronous anyway; the rows' copy back is already queued).
        counts = num_accepted(accepted.cpu().numpy(), starts)
        drafts_verified = np.diff(np.append(starts, plan.num_logits)) - 1
        rows = np.asarray(plan.sample_rows)
        # A request's query ends at seq_len: its real tokens, then its drafts.
        last_pos = b.np_seq_lens[rows].astype(np.int64) - drafts_verified + counts
        caps = np.minimum([len(self.states[rid].block_ids) * bs for rid in plan.sample_ids],
                          self.attn_spec.max_model_len)
        rows_dev = to_device(torch.from_numpy(rows), self.device)
        last_ids = token_ids[torch.from_numpy(starts + counts).to(self.device)]
        host, valid = self.drafter.propose(last_ids, last_pos, caps, b.np_block_table[rows],
                                           b.block_table[rows_dev], bs)
        return host, valid.tolist()

    def finish(self, pending: PendingOutput) -> ModelRunnerOutput:
        """Wait for a queued step's copies back and read its results (``result()`` asks)."""
        if pending.event is not None:
            pending.event.synchronize()
        if pending.host_ids is None:  # only prompt positions were scored
            out = ModelRunnerOutput([], [])
        elif pending.spec_starts is not None:
            out = finish_spec(pending, self.states)
        else:
            out = finish_sampled(pending, self.states, self.structured)
        if pending.prompt is not None:
            out.prompt_logprobs = pending.prompt.result()
        return out

    def _sampling_metadata(self, plan: StepPlan) -> SamplingMetadata:
        """Stage the step's sampling parameters; their copies are queued before the forward."""
        # One row per logits row: a verifying request's parameters repeat over its rows, and
        # its seeded generator serves them in order.
        states = [self.states[rid] for rid in plan.logit_ids or plan.sample_ids]
        return sampling_metadata(states, self.sampling_buffers, self.penalty_rows, self.device)

    # -- graphs --------------------------------------------------------------------------
    def _graph_runner(self, mode: CUDAGraphMode, emulate: bool,
                      compiled: CompiledPiecewiseModel | None) -> CUDAGraphRunner:
        """A graph runner over this runner's model, buffers, backend and current KV caches."""
        spec = self.speculative
        return CUDAGraphRunner(
            self.model, self.buffers, self.backend, self.kv_caches, self.stage_dummy, mode,
            self.config.compilation, self.max_num_seqs, self.max_num_tokens,
            spec.num_speculative_tokens if spec is not None else 0, emulate, compiled,
            lora=self.lora_manager is not None)

    @torch.inference_mode()  # as at run time: dynamo guards on the grad mode
    def init_graphs(self) -> str:
        """Capture the graphs of the mode resolved at start-up, and return the start-up
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
            if self.drafter is not None:  # its forwards run eagerly (docs/spec_decode.md)
                self.graph_stats["drafter"] = f"eager:{type(self.drafter.model).__name__}"
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
        require_lora(self.lora_manager).add(req, tensors)

    def remove_lora(self, lora_id: int) -> bool:
        return self.lora_manager is not None and self.lora_manager.remove(lora_id)

    def sleep(self, level: int) -> MemoryReport:
        """Free the CUDA graphs and the KV cache; at level 2 the weights too."""
        start, free_before = time.perf_counter(), device_free_bytes(self.device)
        if self.graph_runner is not None:
            self._compiled_model = self.graph_runner.release()  # kept for the re-capture
            self.graph_runner = None
        kv_bytes = kv_cache_bytes(self.kv_caches) + self._drafter_kv_bytes()
        self._drop_kv_caches()
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
        return MemoryReport(kv_cache_bytes(self.kv_caches) + self._drafter_kv_bytes(),
                            weight_bytes,
                            _delta(free_before, free_after), time.perf_counter() - start,
                            capture_s)


    def _drafter_kv_bytes(self) -> int:
        return kv_cache_bytes(self.drafter.kv_caches) if self.drafter is not None else 0


def _delta(larger: int | None, smaller: int | None) -> int | None:
    return None if larger is None or smaller is None else larger - smaller
