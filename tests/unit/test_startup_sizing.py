"""Start-up on the CPU: the KV cache sized with the CUDA graphs' memory taken out (the
measurement path, under a fake CUDA memory API: a trial capture against a one-block KV cache
whose graphs each take a known number of bytes), and the start-up report's fields.

The expectations are computed here from the tiny model's shape and the config, not with the
implementation's formulas: a K/V block of the tiny Llama holds 2 (K, V) x 2 layers x
``block_size`` tokens x 2 KV heads x 16 dims x 4 bytes (float32)."""

from __future__ import annotations

import logging
import re
from typing import Any

import pytest
import torch

from graph_testing import PersistentTorchBackend

SIZES = [1, 2, 4, 8]
NUM_GRAPHS = 2 * len(SIZES)  # FULL: a decode and a mixed graph per size
BLOCK_SIZE = 4
BLOCK_BYTES = 2 * 2 * BLOCK_SIZE * 2 * 16 * 4  # the tiny Llama's K/V block, float32


@pytest.fixture
def emulated_full(monkeypatch: pytest.MonkeyPatch) -> None:
    from tachyon.worker import model_runner

    monkeypatch.setenv("TACHYON_EMULATE_CUDAGRAPHS", "1")
    monkeypatch.setattr(model_runner, "get_backend_class",
                        lambda name, dev, dtype: PersistentTorchBackend)


class FakeCudaMemory:
    """``torch.cuda``'s memory queries over a made-up device: ``total`` bytes, ``other``
    used by someone else, ``reserved`` by this process's allocator, a profile peak of
    ``peak``; each captured graph takes ``per_graph`` bytes of free memory."""

    def __init__(self, total: int, other: int, reserved: int, peak: int,
                 per_graph: int) -> None:
        self.total, self.other, self.reserved, self.peak = total, other, reserved, peak
        self.per_graph, self.graph_bytes = per_graph, 0

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from tachyon.cudagraph import graph_impl, runner

        cuda = torch.cuda
        for name, fn in {
            "synchronize": lambda *a: None, "empty_cache": lambda: None,
            "reset_peak_memory_stats": lambda *a: None,
            "max_memory_allocated": lambda *a: self.peak,
            "memory_reserved": lambda *a: self.reserved,
            "mem_get_info": lambda *a: (self.total - self.other - self.reserved
                                        - self.graph_bytes, self.total),
        }.items():
            monkeypatch.setattr(cuda, name, fn)
        fake = self

        class CountingGraphs(graph_impl.EmulatedGraphs):  # "real" graphs, with a pool
            def capture(self, fn: Any) -> Any:
                fake.graph_bytes += fake.per_graph
                return super().capture(fn)

        monkeypatch.setattr(runner, "CudaGraphs", CountingGraphs)


def _runner(model: str, **overrides: Any) -> Any:
    from tachyon.config import EngineArgs
    from tachyon.worker.model_runner import ModelRunner

    args = {"model": model, "device": "cpu", "max_num_seqs": 8, "block_size": BLOCK_SIZE,
            "max_model_len": 128, "cudagraph_mode": "FULL",
            "compilation_config": {"cudagraph_capture_sizes": SIZES}, **overrides}
    cfg = EngineArgs(**args).create_config()
    return ModelRunner(cfg, torch.device("cpu"))


def test_kv_cache_is_sized_after_a_trial_capture(tiny_llama: str, emulated_full: None,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    gib = 2**30
    mem = FakeCudaMemory(total=8 * gib, other=gib // 2, reserved=gib, peak=gib // 4,
                         per_graph=3 * 2**20)
    runner = _runner(tiny_llama, gpu_memory_utilization=0.5)
    mem.install(monkeypatch)
    runner.device = torch.device("cuda")  # the sizing path of a GPU (nothing is placed)
    monkeypatch.setattr(runner, "profile_run", lambda: None)

    blocks = runner.determine_num_blocks()

    graphs = NUM_GRAPHS * mem.per_graph
    assert mem.graph_bytes == graphs, "every graph of the mode was captured once, on trial"
    budget = 0.5 * mem.total - mem.other - mem.peak - graphs
    assert blocks == int(budget // BLOCK_BYTES)
    # The trial leaves nothing behind: no KV cache, no graphs; the real start follows.
    assert runner.kv_caches == [] and runner.graph_runner is None
    runner.device = torch.device("cpu")
    runner.allocate_kv_cache(7)
    report = runner.init_graphs()
    assert "graphs=8" in report and "kv_blocks=7" in report


def test_no_graph_memory_is_taken_without_graphs(tiny_llama: str, emulated_full: None,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    mem = FakeCudaMemory(total=2**30, other=0, reserved=0, peak=0, per_graph=2**20)
    runner = _runner(tiny_llama, cudagraph_mode="NONE")
    mem.install(monkeypatch)
    runner.device = torch.device("cuda")
    monkeypatch.setattr(runner, "profile_run", lambda: None)
    assert runner.determine_num_blocks() == int(0.9 * 2**30 // BLOCK_BYTES)
    assert mem.graph_bytes == 0


def _report(line: str) -> dict[str, str]:
    return dict(kv.split("=", 1) for kv in line.split())


@pytest.mark.parametrize("mode", ["NONE", "FULL"])
def test_startup_report_fields(tiny_llama: str, emulated_full: None, mode: str,
                               caplog: pytest.LogCaptureFixture) -> None:
    from tachyon import LLM

    kv_bytes = 40 * BLOCK_BYTES  # the CPU takes exactly the budget it is given
    with caplog.at_level(logging.INFO, logger="tachyon.engine.llm_engine"):
        llm = LLM(tiny_llama, device="cpu", max_num_seqs=8, block_size=BLOCK_SIZE,
                  max_model_len=128, kv_cache_memory=kv_bytes, cudagraph_mode=mode,
                  compilation_config={"cudagraph_capture_sizes": SIZES})
    line = llm.engine.executor.startup_report
    got = _report(line)
    assert list(got) == ["cudagraph_mode", "backend", "piecewise_backend", "graphs",
                         "capture_s", "pool_mib", "kv_blocks", "block_size"]
    assert got["cudagraph_mode"] == mode
    assert got["backend"] == "torch-persistent"
    assert got["piecewise_backend"] == "breakable"
    assert got["graphs"] == str(NUM_GRAPHS if mode == "FULL" else 0)
    assert got["kv_blocks"] == "40" == str(llm.engine.kv.pool.num_blocks)
    assert got["block_size"] == str(BLOCK_SIZE)
    assert got["pool_mib"] == "0.0"  # emulated graphs have no pool
    capture_s = float(got["capture_s"])
    assert capture_s > 0 if mode == "FULL" else capture_s == 0.0
    ready = [r.getMessage() for r in caplog.records if "tachyon ready in" in r.getMessage()]
    assert len(ready) == 1 and re.search(r"ready in [0-9.]+ s: " + re.escape(line), ready[0])
