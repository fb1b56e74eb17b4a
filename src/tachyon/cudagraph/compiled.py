"""PIECEWISE graphs through torch.compile: split the FX graph at the attention op.

Dynamo traces the model once with a dynamic token dimension. Our backend cuts the FX graph
at every ``tachyon::attention`` call, compiles each piece in between with Inductor (which
fuses the norms, rotary and activations), and wraps each piece so that, per batch size, it
captures and replays its own CUDA graph. Attention pieces stay eager and read the live
metadata. Inductor's on-disk caches (under ``cache_dir``) let a second start skip
compilation.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.fx.passes.split_module import split_module
from torch.utils import _pytree as pytree

from tachyon.config import cache_root
from tachyon.cudagraph.modes import RuntimeMode

logger = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    return cache_root() / "compile"


def _is_attention(node: torch.fx.Node) -> bool:
    return node.op == "call_function" and node.target in (
        torch.ops.tachyon.attention.default, torch.ops.tachyon.attention)


class Piece(nn.Module):
    """One compiled piece between attention calls, with its per-size CUDA graphs."""

    def __init__(self, owner: CompiledPiecewiseModel, graph: torch.fx.GraphModule,
                 compiled: Callable[..., Any], out_spec: pytree.TreeSpec) -> None:
        super().__init__()
        self.owner = owner
        self.graph_module = graph
        self.compiled = compiled
        # Inductor rewrites a graph that returns a non-tuple (a piece with one output) to
        # return the flat tuple of its outputs, in place, and unflattens only what that first
        # compilation returns: a per-size compilation of the same graph module must unflatten
        # its own results with the structure the graph had before.
        self.out_spec = out_spec
        self.by_size: dict[int, Callable[..., Any]] = {}  # static-shape compilations
        self.graphs: dict[int, Any] = {}

    def _fn(self, n: int, args: tuple[Any, ...]) -> Callable[..., Any]:
        if n in self.owner.compile_sizes and n not in self.by_size:
            from torch._inductor.compile_fx import compile_fx

            fn, spec = compile_fx(self.graph_module, list(args)), self.out_spec
            self.by_size[n] = lambda *a: pytree.tree_unflatten(list(fn(*a)), spec)
        return self.by_size.get(n, self.compiled)

    def forward(self, *args: Any) -> Any:
        owner = self.owner
        n = owner.num_tokens
        if owner.capturing:
            fn = self._fn(n, args)
            fn(*args)  # warm-up, outside the graph
            self.graphs[n] = owner.impl.capture(lambda: fn(*args))
            return self.graphs[n].output
        if owner.runtime_mode is RuntimeMode.PIECEWISE and n in self.graphs:
            return self.graphs[n].replay()
        return self._fn(n, args)(*args)


class CompiledPiecewiseModel:
    def __init__(self, model: nn.Module, buffers: Any, impl: Any, cache_dir: str | None,
                 compile_sizes: tuple[int, ...]) -> None:
        self.model = model
        self.buffers = buffers  # the model runner's persistent inputs: same tensors always
        self.impl = impl
        self.compile_sizes = set(compile_sizes)
        self.pieces: list[Piece] = []
        self.num_tokens = 0
        self.runtime_mode = RuntimeMode.NONE
        self.capturing = False
        _use_cache_dir(Path(cache_dir) if cache_dir else default_cache_dir())
        self._compiled = torch.compile(self._forward, backend=self._backend, fullgraph=True)

    def _forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, positions)

    def run(self, n: int, mode: RuntimeMode) -> torch.Tensor:
        """Run the model on the first ``n`` staged tokens (buffers of the model runner)."""
        b = self.buffers
        ids, pos = b.input_ids[:n], b.positions[:n]
        # One trace for every size >= 2 (size 1 is specialised by dynamo and traced once more).
        torch._dynamo.mark_dynamic(ids, 0)
        torch._dynamo.mark_dynamic(pos, 0)
        self.num_tokens, self.runtime_mode = n, mode
        return self._compiled(ids, pos)

    def capture(self, n: int) -> None:
        self.capturing = True
        try:
            self.run(n, RuntimeMode.PIECEWISE)
        finally:
            self.capturing = False

    def num_graphs(self) -> int:
        return sum(len(p.graphs) for p in self.pieces)

    # -- the torch.compile backend --------------------------------------------------------
    def _backend(self, gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
        part, current = {}, 0
        for node in gm.graph.nodes:
            if _is_attention(node):
                current += 1
                part[node] = current  # attention alone in its own partition
                current += 1
            else:
                part[node] = current
        split = split_module(gm, None, lambda n: part[n], keep_original_order=True)
        attention_parts = {f"submod_{part[n]}" for n in gm.graph.nodes if _is_attention(n)}
        _PieceCompiler(split, attention_parts, self).run_fake(example_inputs)
        logger.info("torch.compile split the model into %d compiled pieces", len(self.pieces))
        return split


class _PieceCompiler(torch.fx.Interpreter):
    """Walk the split graph on fake inputs, compiling each non-attention piece with Inductor
    on the (symbolic-shaped) inputs it actually receives."""

    def __init__(self, split: torch.fx.GraphModule, attention_parts: set[str],
                 owner: CompiledPiecewiseModel) -> None:
        super().__init__(split)
        self.split, self.attention_parts, self.owner = split, attention_parts, owner

    def run_fake(self, example_inputs: list[Any]) -> Any:
        """Run on fake tensors. ``from_tensor`` returns dynamo's memoised fake for each real
        example input, so the dynamic token dimension stays symbolic."""
        from torch._guards import detect_fake_mode

        fake_mode = detect_fake_mode(example_inputs)
        args = [fake_mode.from_tensor(a) if isinstance(a, torch.Tensor) else a
                for a in example_inputs]
        with fake_mode:
            return super().run(*args)

    def call_module(self, target: str, args: Any, kwargs: Any) -> Any:
        submod = self.fetch_attr(target)
        out = submod(*args, **kwargs)
        if target not in self.attention_parts and isinstance(submod, torch.fx.GraphModule):
            from torch._inductor.compile_fx import compile_fx

            (outputs,) = submod.graph.output_node().args  # before compile_fx rewrites it
            spec = pytree.tree_flatten(outputs)[1]
            compiled = compile_fx(submod, list(args))
            piece = Piece(self.owner, submod, compiled, spec)
            self.owner.pieces.append(piece)
            setattr(self.split, target, piece)
        return out


def _use_cache_dir(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(path / "inductor"))
    os.environ.setdefault("TRITON_CACHE_DIR", str(path / "triton"))
    import torch._inductor.config as inductor_config

    inductor_config.fx_graph_cache = True
