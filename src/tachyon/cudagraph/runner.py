"""Capture every graph the resolved mode needs, then replay the right one each step.

FULL graphs hold the whole decoder stack, attention included: replay reads the persistent
input buffers and whatever the backend's ``build_metadata`` just wrote into its own
persistent buffers. PIECEWISE graphs hold everything but attention, which runs eagerly
between graph segments on the live metadata; the segments come either from the breakable
capture (no compiler) or from torch.compile's split graph (``compiled.py``).

With LoRA on, each graph is captured with and without the LoRA kernels
(``BatchDescriptor.has_lora``), except with the compiled PIECEWISE backend, whose traced
model always includes them (``layers.linear.lora_active``).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import nn

from tachyon.attention.base import AttentionBackend, CommonAttentionMetadata
from tachyon.config import CompilationConfig
from tachyon.cudagraph.breakable import (
    BreakableCapture,
    BreakableGraph,
    SharedAttentionIO,
    _AttentionCall,
)
from tachyon.cudagraph.contract import ENV_DEBUG_GRAPHS, Signature, check_replay, signature
from tachyon.cudagraph.dispatcher import MIXED, BatchDescriptor, CudagraphDispatcher
from tachyon.cudagraph.graph_impl import CapturedGraph, CudaGraphs, EmulatedGraphs, frozen_gc
from tachyon.cudagraph.modes import CGSupport, CUDAGraphMode, RuntimeMode
from tachyon.forward_context import ForwardContext, set_forward_context

logger = logging.getLogger(__name__)


class GraphInputs(Protocol):
    """The model's persistent inputs, allocated once at their largest size: a graph reads the
    first ``num_tokens`` of each, so their addresses never change."""

    input_ids: torch.Tensor
    positions: torch.Tensor


# Stages a synthetic batch shaped like a graph key into the persistent buffers (for warm-up
# and capture) and returns its attention metadata.
StageDummy = Callable[[BatchDescriptor, RuntimeMode], CommonAttentionMetadata]


class CUDAGraphRunner:
    """Captures the graphs of one mode and replays them.

    It is handed what it runs (the model, its persistent inputs, the attention backend, the
    KV caches and a ``stage_dummy``), never the model runner: it stays valid until the KV
    caches are re-allocated, and the model runner makes a new one then.
    """

    def __init__(self, model: nn.Module, inputs: GraphInputs, backend: AttentionBackend,
                 kv_caches: list[tuple[torch.Tensor, torch.Tensor]], stage_dummy: StageDummy,
                 mode: CUDAGraphMode, compilation: CompilationConfig, max_num_seqs: int,
                 max_num_tokens: int, num_speculative_tokens: int = 0, emulate: bool = False,
                 compiled: Any = None, lora: bool = False) -> None:
        """``lora``: the model has adapter slots (LoRA on)."""
        self.model, self.inputs, self.backend = model, inputs, backend
        self.kv_caches, self.stage_dummy = kv_caches, stage_dummy
        self.mode = mode
        cfg = compilation
        self.sizes = cfg.capture_sizes(max_num_seqs)
        # Verify batches (1 + k tokens per request) get FULL graphs of their own where the
        # backend can capture uniform batches; else they run as mixed batches.
        verify_len = num_speculative_tokens + 1 if num_speculative_tokens and \
            backend.cudagraph_support >= CGSupport.UNIFORM_BATCH else 0
        # Mixed-only sizes above the decode sizes: breakable PIECEWISE (their attention I/O
        # shared, see breakable.py) or FULL mixed graphs; not with the compiled backend,
        # whose pieces would hold static buffers per size.
        piecewise_compiled = mode.has_piecewise() and cfg.piecewise_backend == "compile"
        self.mixed_sizes = () if piecewise_compiled else cfg.mixed_capture_sizes(
            max_num_seqs, max_num_tokens)
        # LoRA: graphs without the LoRA kernels for batches without adapters, and with them;
        # the compiled backend's traced model cannot leave them out, so only with.
        lora_variants = ((True,) if piecewise_compiled else (False, True)) if lora else (False,)
        self.dispatcher = CudagraphDispatcher(mode, self.sizes, verify_len, max_num_tokens,
                                              self.mixed_sizes, lora_variants)
        self.shared_io = SharedAttentionIO(self.mixed_sizes[-1]) if self.mixed_sizes else None
        self.emulate = emulate
        self.impl = EmulatedGraphs() if emulate else CudaGraphs()
        self.full: dict[BatchDescriptor, CapturedGraph] = {}
        # What each FULL graph's attention metadata was at capture (see contract.py); checked
        # on every replay under emulation and in the GPU debug mode.
        self.full_signatures: dict[BatchDescriptor, Signature] = {}
        self.check_contract = emulate or os.environ.get(ENV_DEBUG_GRAPHS) == "1"
        # Breakable graphs by (size, has_lora): ``_piecewise_key``.
        self.piecewise: dict[BatchDescriptor, BreakableGraph] = {}
        self.compiled = compiled
        if self.compiled is not None:
            self.compiled.impl = self.impl  # captures of the reused model go to this pool
        if self.compiled is None and mode.has_piecewise() and cfg.piecewise_backend == "compile":
            from tachyon.cudagraph.compiled import CompiledPiecewiseModel

            self.compiled = CompiledPiecewiseModel(
                model, inputs, self.impl, cfg.cache_dir, cfg.compile_sizes)
        self._live: ForwardContext | None = None

    # -- dispatch and run ----------------------------------------------------------------
    def dispatch(self, num_tokens: int, uniform_query_len: int,
                 has_lora: bool = False) -> tuple[RuntimeMode, BatchDescriptor]:
        mode, desc = self.dispatcher.descriptor(num_tokens, uniform_query_len, has_lora)
        if mode is RuntimeMode.PIECEWISE and self.emulate and self.compiled is None:
            # Breakable segments need a real GPU.
            return RuntimeMode.NONE, BatchDescriptor(num_tokens, desc.uniform_query_len,
                                                     has_lora)
        return mode, desc

    def run(self, mode: RuntimeMode, desc: BatchDescriptor, ctx: ForwardContext) -> torch.Tensor:
        """Replay the graph of key ``desc`` (as ``dispatch`` chose it) on the staged batch."""
        n = desc.num_tokens
        if mode is RuntimeMode.FULL:
            if self.check_contract:
                check_replay(f"FULL graph {desc} ({ctx.backend.name})",
                             self.full_signatures[desc], signature(ctx.attn_metadata))
            return self.full[desc].replay()
        if self.compiled is not None:
            with set_forward_context(ctx):
                return self.compiled.run(n, RuntimeMode.PIECEWISE)
        self._live = ctx
        try:
            return self.piecewise[_piecewise_key(desc)].replay(self._attend_live)
        finally:
            self._live = None

    def _attend_live(self, call: _AttentionCall) -> None:
        ctx = self._live
        k_cache, v_cache = ctx.kv_caches[call.layer_idx]
        ctx.backend.forward(call.query, call.key, call.value, k_cache, v_cache,
                            ctx.attn_metadata, call.output)

    # -- capture -------------------------------------------------------------------------
    def capture_all(self) -> tuple[int, float, float]:
        """Capture largest first into one pool. Returns (graphs, seconds, pool MiB)."""
        on_cuda = not self.emulate
        if on_cuda:
            torch.cuda.synchronize()
            free_before = torch.cuda.mem_get_info()[0]
        start = time.perf_counter()
        keys = self.dispatcher.graph_keys()
        if self.compiled is not None:
            self._warm_compiled()
        with frozen_gc():
            for mode, desc in _progress(keys):
                if mode is RuntimeMode.FULL:
                    self.full[desc] = self._capture_full(desc)
                elif self.compiled is not None:
                    self._capture_compiled(desc)
                elif not self.emulate:
                    key = _piecewise_key(desc)
                    self.piecewise[key] = self._capture_breakable(key)
        seconds = time.perf_counter() - start
        pool_mib = 0.0
        if on_cuda:
            torch.cuda.synchronize()
            pool_mib = (free_before - torch.cuda.mem_get_info()[0]) / 2**20
        n = len(self.full) + len(self.piecewise) + (
            self.compiled.num_graphs() if self.compiled is not None else 0)
        return n, seconds, pool_mib

    def release(self) -> Any:
        """Drop every captured graph (their pool memory returns to the allocator); returns the
        compiled model, if any, for reuse."""
        self.full.clear()
        self.full_signatures.clear()
        self.piecewise.clear()
        if self.compiled is not None:
            for piece in self.compiled.pieces:
                piece.graphs.clear()
        return self.compiled

    def _context(self, desc: BatchDescriptor, mode: RuntimeMode) -> ForwardContext:
        # Dummy requests have no context beyond their own queries: a capture batch never
        # claims more context than the cache holds, even the one-block cache of the trial.
        meta = self.backend.build_metadata(self.stage_dummy(desc, mode))
        return ForwardContext(self.backend, meta, self.kv_caches, has_lora=desc.has_lora)

    def _forward(self, n: int, ctx: ForwardContext) -> torch.Tensor:
        b = self.inputs
        with set_forward_context(ctx):
            if self.compiled is not None:
                return self.compiled.run(n, RuntimeMode.FULL)
            return self.model(b.input_ids[:n], b.positions[:n])

    def _capture_full(self, desc: BatchDescriptor) -> CapturedGraph:
        ctx = self._context(desc, RuntimeMode.FULL)
        n = desc.num_tokens
        self._forward(n, ctx)  # warm-up: lazy init, autotuning and compilation happen here
        graph = self.impl.capture(lambda: self._forward(n, ctx))
        self.full_signatures[desc] = signature(ctx.attn_metadata)
        return graph

    def _capture_breakable(self, key: BatchDescriptor) -> BreakableGraph:
        n = key.num_tokens
        ctx = self._context(key, RuntimeMode.PIECEWISE)
        self._forward(n, ctx)  # warm-up
        b = self.inputs
        impl: Any = self.impl
        self._live = ctx
        shared = self.shared_io if n > self.sizes[-1] else None
        capture = BreakableCapture(impl.pool, self._attend_live, shared)
        torch.cuda.synchronize()
        try:
            with torch.cuda.stream(impl.stream):
                capture.begin()
                breaking = ForwardContext(ctx.backend, ctx.attn_metadata, ctx.kv_caches,
                                          breaker=capture, has_lora=ctx.has_lora)
                with set_forward_context(breaking):
                    out = self.model(b.input_ids[:n], b.positions[:n])
                graph = capture.finish(out)
            torch.cuda.current_stream().wait_stream(impl.stream)
        finally:
            self._live = None
        return graph

    def _warm_compiled(self) -> None:
        """Trace and compile once (dynamic batch size) before any capture."""
        lora = self.dispatcher.lora_variants[-1]
        ctx = self._context(BatchDescriptor(self.sizes[-1], MIXED, lora), RuntimeMode.PIECEWISE)
        with set_forward_context(ctx):
            self.compiled.run(self.sizes[-1], RuntimeMode.NONE)

    def _capture_compiled(self, desc: BatchDescriptor) -> None:
        """One graph per size (and piece): the compiled backend has a single LoRA variant."""
        ctx = self._context(_piecewise_key(desc), RuntimeMode.PIECEWISE)
        with set_forward_context(ctx):
            self.compiled.capture(desc.num_tokens)


def _piecewise_key(desc: BatchDescriptor) -> BatchDescriptor:
    """A PIECEWISE graph holds no attention: one per (size, has_lora) serves decode and mixed
    batches alike."""
    return BatchDescriptor(desc.num_tokens, MIXED, desc.has_lora)


def _progress(keys: list[Any]) -> Any:
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return keys
    return tqdm(keys, desc="Capturing CUDA graphs", leave=False, dynamic_ncols=True)
