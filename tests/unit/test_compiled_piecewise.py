"""Compiled PIECEWISE (``piecewise_backend: compile``) on the CPU: torch.compile with
Inductor's CPU backend (C++ codegen) splits the tiny Llama at its attention calls, and the
pieces' graphs are captured and replayed under graph emulation
(``TACHYON_EMULATE_CUDAGRAPHS=1``: a replay re-runs the captured closure, see
``cudagraph/graph_impl.py``). What a CPU cannot show is a real CUDA graph's memory pool and
replay speed; everything else runs: the split points, the per-size compilations of
``compile_sizes``, replay of every captured size (padding included), and the on-disk compile
cache that lets a second start skip Inductor.

Marked slow (the first start compiles for ~30 s on the 2-core machine): ``pytest -m slow``.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from tachyon_testing import TINY_VOCAB

pytestmark = pytest.mark.slow

SIZES = [1, 2, 4]
COMPILE_SIZES = [2]
NUM_LAYERS = 2  # tachyon_testing's tiny Llama: two attention calls, so three pieces


def _engine(model: str, mode: str, cache_dir: Path) -> Any:
    from tachyon import LLM

    return LLM(model, device="cpu", max_num_seqs=4, max_num_batched_tokens=64, block_size=4,
               cudagraph_mode=mode, compilation_config={
                   "cudagraph_capture_sizes": SIZES, "compile_sizes": COMPILE_SIZES,
                   "piecewise_backend": "compile", "cache_dir": str(cache_dir)})


def _generate(llm: Any) -> list[list[int]]:
    """Batches of 1, 2 and 3 decoding requests: replays of sizes 1, 2 (its per-size
    compilation) and 4 (3 padded to 4)."""
    from tachyon import SamplingParams

    rng = random.Random(3)
    out = []
    for n in (1, 2, 3):
        prompts = [[rng.randrange(3, TINY_VOCAB) for _ in range(rng.randint(3, 12))]
                   for _ in range(n)]
        res = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=6),
                           use_tqdm=False)
        out += [o.outputs[0].token_ids for o in res]
    return out


def _cache_counts() -> tuple[int, int]:
    from torch._dynamo.utils import counters

    return counters["inductor"]["fxgraph_cache_hit"], counters["inductor"]["fxgraph_cache_miss"]


@pytest.fixture(scope="module")
def runs(tiny_llama: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    cache_dir = tmp_path_factory.mktemp("compile_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TACHYON_EMULATE_CUDAGRAPHS", "1")
        # The config's cache_dir must be the one used (the environment wins over it).
        mp.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
        mp.delenv("TRITON_CACHE_DIR", raising=False)
        torch._dynamo.reset()
        eager = _generate(_engine(tiny_llama, "NONE", cache_dir))
        hit0, miss0 = _cache_counts()
        cold = _engine(tiny_llama, "PIECEWISE", cache_dir)
        hit1, miss1 = _cache_counts()
        cold_tokens = _generate(cold)
        runner = cold.engine.executor.runner
        pieces = runner.graph_runner.compiled.pieces
        result = {"eager": eager, "cold": cold_tokens, "stats": dict(runner.graph_stats),
                  "pieces": pieces, "cold_cache": (hit1 - hit0, miss1 - miss0),
                  "cache_dir": cache_dir, "inductor_dir": os.environ.get(
                      "TORCHINDUCTOR_CACHE_DIR")}
        del cold, runner
        torch._dynamo.reset()  # a second start: a new process would trace again too
        warm = _engine(tiny_llama, "PIECEWISE", cache_dir)
        hit2, miss2 = _cache_counts()
        result["warm_cache"] = (hit2 - hit1, miss2 - miss1)
        result["warm"] = _generate(warm)
        yield result
        torch._dynamo.reset()


def test_compiled_piecewise_matches_eager(runs: dict[str, Any]) -> None:
    assert runs["stats"]["cudagraph_mode"] == "PIECEWISE"
    assert runs["stats"]["piecewise_backend"] == "compile"
    assert runs["cold"] == runs["eager"]
    assert runs["warm"] == runs["eager"]


def test_split_at_every_attention_call(runs: dict[str, Any]) -> None:
    """NUM_LAYERS attention calls cut each traced graph into NUM_LAYERS + 1 compiled pieces,
    none holding attention; dynamo traces twice (size 1 is specialised, every size >= 2 shares
    one dynamic trace), and each captured size has one graph per piece."""
    from tachyon.cudagraph.compiled import _is_attention

    pieces = runs["pieces"]
    assert len(pieces) == 2 * (NUM_LAYERS + 1)
    for p in pieces:
        assert not any(_is_attention(n) for n in p.graph_module.graph.nodes)
    assert runs["stats"]["graphs"] == len(SIZES) * (NUM_LAYERS + 1)
    assert sorted(n for p in pieces for n in p.graphs) == sorted(
        s for s in SIZES for _ in range(NUM_LAYERS + 1))


def test_compile_sizes_get_their_own_compilation(runs: dict[str, Any]) -> None:
    """Every piece of the dynamic trace holds a static-shape compilation for each size in
    ``compile_sizes`` and no other; the size-1 trace is static already."""
    dynamic = [p for p in runs["pieces"] if 1 not in p.graphs]
    assert len(dynamic) == NUM_LAYERS + 1
    for p in dynamic:
        assert sorted(p.by_size) == COMPILE_SIZES
    for p in runs["pieces"]:
        if 1 in p.graphs:
            assert not p.by_size


def test_second_start_hits_the_compile_cache(runs: dict[str, Any]) -> None:
    _, misses = runs["cold_cache"]
    assert misses > 0, "the first start compiles"
    warm_hits, warm_misses = runs["warm_cache"]
    assert warm_misses == 0, "a second start compiles nothing again"
    assert warm_hits >= misses, "every graph the first start compiled is loaded from disk"
    assert runs["inductor_dir"] == str(runs["cache_dir"] / "inductor")
    assert any(Path(runs["inductor_dir"]).iterdir())
