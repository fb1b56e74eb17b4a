"""CUDA graph contracts on CPU: mode resolution, capture sizes, dispatch, padding, and an
emulated capture/replay that catches backends reading stale metadata."""

from __future__ import annotations

import random
from typing import ClassVar

import pytest

from graph_testing import PersistentTorchBackend
from tachyon.attention.torch_backend import TorchAttentionBackend
from tachyon.config import EngineArgs
from tachyon.cudagraph.dispatcher import MIXED, BatchDescriptor, CudagraphDispatcher
from tachyon.cudagraph.modes import CGSupport, CUDAGraphMode, RuntimeMode, resolve_cudagraph_mode
from tachyon_testing import TINY_VOCAB

M = CUDAGraphMode
S = CGSupport

# (requested mode, support) -> resolved mode, or None for "fails with advice".
EXPECTED = {
    (M.NONE, S.NEVER): M.NONE,
    (M.PIECEWISE, S.NEVER): M.PIECEWISE,
    (M.FULL, S.NEVER): None,
    (M.FULL_DECODE_ONLY, S.NEVER): None,
    (M.FULL_AND_PIECEWISE, S.NEVER): M.PIECEWISE,
    (M.FULL, S.UNIFORM_DECODE): M.FULL_AND_PIECEWISE,
    (M.FULL, S.UNIFORM_BATCH): M.FULL_AND_PIECEWISE,
    (M.FULL, S.ALWAYS): M.FULL,
    (M.FULL_DECODE_ONLY, S.UNIFORM_DECODE): M.FULL_DECODE_ONLY,
    (M.FULL_AND_PIECEWISE, S.UNIFORM_DECODE): M.FULL_AND_PIECEWISE,
}


@pytest.mark.parametrize("mode", list(M))
@pytest.mark.parametrize("support", list(S))
def test_resolution_matrix(mode, support):
    expected = EXPECTED.get((mode, support), mode)  # unlisted: served as asked
    if expected is None:
        with pytest.raises(ValueError, match="use --cudagraph-mode PIECEWISE"):
            resolve_cudagraph_mode(mode, "torch", support, on_cuda=True)
        return
    res = resolve_cudagraph_mode(mode, "b", support, on_cuda=True)
    assert res.mode is expected
    # A downgrade says so once, naming both modes; no downgrade, no warning.
    if expected is mode:
        assert res.warning is None
    else:
        assert mode.value in res.warning and expected.value in res.warning


@pytest.mark.parametrize("mode", list(M))
def test_cpu_resolves_to_none(mode):
    res = resolve_cudagraph_mode(mode, "torch", S.NEVER, on_cuda=False)
    assert res.mode is M.NONE
    assert (res.warning is None) == (mode is M.NONE)


def test_unknown_mode_string():
    with pytest.raises(ValueError, match="FULL_AND_PIECEWISE"):
        CUDAGraphMode.parse("SOMETIMES")
    assert CUDAGraphMode.parse("full_decode_only") is M.FULL_DECODE_ONLY


def _compilation(**raw):
    return EngineArgs(compilation_config=raw)._compilation_config()


@pytest.mark.parametrize("max_num_seqs", [1, 3, 7, 8, 16, 17, 100, 256, 511, 512, 1000])
def test_default_capture_sizes_cover_max_num_seqs(max_num_seqs):
    sizes = _compilation().capture_sizes(max_num_seqs)
    assert list(sizes) == sorted(set(sizes))
    assert sizes[-1] == min(max_num_seqs, 512)
    ladder = {1, 2, 4, 8} | set(range(16, 513, 16))
    assert set(sizes[:-1]) <= ladder
    d = CudagraphDispatcher(M.FULL_AND_PIECEWISE, sizes)
    for n in range(1, max_num_seqs + 1):  # never a gap, never an exception
        mode, padded = d.dispatch(n, True)
        if n <= sizes[-1]:
            assert mode is RuntimeMode.FULL and padded >= n and padded in sizes
            assert padded == min(s for s in sizes if s >= n)
        else:
            assert (mode, padded) == (RuntimeMode.NONE, n)


def test_custom_sizes_and_cap():
    cc = _compilation(cudagraph_capture_sizes=[4, 1, 2], max_cudagraph_capture_size=64)
    assert cc.capture_sizes(7) == (1, 2, 4, 7)  # extended so 5..7 find a graph
    assert cc.capture_sizes(3) == (1, 2, 3)
    cc = _compilation(max_cudagraph_capture_size=40)
    assert cc.capture_sizes(256) == (1, 2, 4, 8, 16, 32, 40)


@pytest.mark.parametrize("bad", ['{"cudagraph_mode": 3', '[1, 2]', '{"bogus": 1}',
                                 '{"cudagraph_capture_sizes": [0]}',
                                 '{"piecewise_backend": "magic"}'])
def test_bad_compilation_config(bad):
    with pytest.raises(ValueError):
        EngineArgs(compilation_config=bad)._compilation_config()


@pytest.mark.parametrize("key", ["level", "mode"])
def test_vllm_compile_level_is_refused_not_ignored(key):
    with pytest.raises(ValueError, match=f"key '{key}' .*'piecewise_backend'"):
        _compilation(**{key: 3})


def test_dispatch_priority_per_mode():
    sizes = (1, 2, 4, 8)
    cases = {
        M.NONE: (RuntimeMode.NONE, RuntimeMode.NONE),
        M.PIECEWISE: (RuntimeMode.PIECEWISE, RuntimeMode.PIECEWISE),
        M.FULL: (RuntimeMode.FULL, RuntimeMode.FULL),
        M.FULL_DECODE_ONLY: (RuntimeMode.FULL, RuntimeMode.NONE),
        M.FULL_AND_PIECEWISE: (RuntimeMode.FULL, RuntimeMode.PIECEWISE),
    }
    for mode, (dec, mixed) in cases.items():
        d = CudagraphDispatcher(mode, sizes)
        assert d.dispatch(3, True) == (dec, 4 if dec is not RuntimeMode.NONE else 3)
        assert d.dispatch(5, False) == (mixed, 8 if mixed is not RuntimeMode.NONE else 5)
        assert d.dispatch(9, True) == (RuntimeMode.NONE, 9)  # above the largest: eager
    keys = CudagraphDispatcher(M.FULL_AND_PIECEWISE, sizes).graph_keys()
    assert keys[0][1].num_tokens == 8  # largest first
    assert (RuntimeMode.FULL, BatchDescriptor(2, True)) in keys
    assert (RuntimeMode.PIECEWISE, BatchDescriptor(2, False)) in keys
    assert (RuntimeMode.FULL, BatchDescriptor(2, False)) not in keys


# -- emulated capture/replay -----------------------------------------------------------------


class StaleTorchBackend(TorchAttentionBackend):
    """Breaks the contract on purpose: plans on the host in build_metadata, so a replayed
    graph keeps using the plan of the batch it was captured with."""

    name: ClassVar[str] = "torch-stale"
    cudagraph_support: ClassVar[CGSupport] = CGSupport.ALWAYS


def _generate(model_dir, monkeypatch, backend_cls, mode):
    from tachyon import LLM, SamplingParams
    from tachyon.worker import model_runner

    monkeypatch.setenv("TACHYON_EMULATE_CUDAGRAPHS", "1")
    if backend_cls is not None:
        monkeypatch.setattr(model_runner, "get_backend_class",
                            lambda name, dev, dtype: backend_cls)
    llm = LLM(model_dir, device="cpu", max_num_seqs=8, max_num_batched_tokens=64,
              block_size=4, cudagraph_mode=mode,
              compilation_config={"cudagraph_capture_sizes": [1, 2, 4, 8]})
    rng = random.Random(5)
    prompts = [[rng.randrange(TINY_VOCAB) for _ in range(rng.randint(2, 30))] for _ in range(7)]
    out = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=6), use_tqdm=False)
    runner = llm.engine.executor.runner
    return [o.outputs[0].token_ids for o in out], runner


def test_emulated_full_graphs_match_eager(tiny_llama, monkeypatch):
    ref, _ = _generate(tiny_llama, monkeypatch, None, "NONE")
    got, runner = _generate(tiny_llama, monkeypatch, PersistentTorchBackend, "FULL")
    assert runner.graph_stats["cudagraph_mode"] == "FULL"
    assert runner.graph_stats["graphs"] == 8  # 4 sizes x (decode, mixed)
    assert got == ref


def test_emulation_catches_stale_metadata(tiny_llama, monkeypatch):
    from tachyon.cudagraph.contract import GraphContractError

    # The host plan (spans) of the captured batch would be replayed: the contract check
    # names it before any wrong token comes out.
    with pytest.raises(GraphContractError, match=r"torch-stale.*spans\.0\."):
        _generate(tiny_llama, monkeypatch, StaleTorchBackend, "FULL")


def test_padding_contract(tiny_llama, monkeypatch):
    """After a padded FULL decode step: padded tokens have slot -1, padded requests have
    seq_len 0 and one token each."""
    from tachyon import LLM, SamplingParams
    from tachyon.worker import model_runner

    monkeypatch.setenv("TACHYON_EMULATE_CUDAGRAPHS", "1")
    monkeypatch.setattr(model_runner, "get_backend_class",
                        lambda name, dev, dtype: PersistentTorchBackend)
    llm = LLM(tiny_llama, device="cpu", max_num_seqs=8, block_size=4, cudagraph_mode="FULL",
              compilation_config={"cudagraph_capture_sizes": [1, 2, 4, 8]})
    eng = llm.engine
    for i in range(3):
        eng.add_request(str(i), [1 + i, 2, 3], SamplingParams(temperature=0, max_tokens=5))
    eng.step()  # prefill
    eng.step()  # a uniform decode step of 3 requests, padded to 4
    b = eng.executor.runner.buffers
    assert b.slot_mapping[3].item() == -1
    assert b.seq_lens[3].item() == 0
    assert b.query_start_loc[:5].tolist() == [0, 1, 2, 3, 4]
    assert all(v > 0 for v in b.seq_lens[:3].tolist())
    while eng.has_unfinished_requests():
        eng.step()
    assert eng.kv.num_free_blocks == eng.kv.pool.num_blocks


def test_mixed_capture_sizes_ladder():
    cc = _compilation()
    sizes = cc.mixed_capture_sizes(256, 8192)
    assert sizes[0] > 256 and sizes[-1] == 2048 and list(sizes) == sorted(set(sizes))
    assert all(s % 64 == 0 for s in sizes if s <= 1024)
    assert all(s % 256 == 0 for s in sizes if s > 1024)
    assert cc.mixed_capture_sizes(256, 300) == (300,)  # the budget itself tops the ladder
    assert cc.mixed_capture_sizes(256, 256) == ()
    assert _compilation(max_mixed_capture_size=0).mixed_capture_sizes(8, 8192) == ()
    assert _compilation(cudagraph_capture_sizes=[1, 2]).mixed_capture_sizes(8, 8192) == ()
    with pytest.raises(ValueError, match="max_mixed_capture_size"):
        _compilation(max_mixed_capture_size=-1)


@pytest.mark.parametrize("mode", list(M))
def test_mixed_sizes_serve_mixed_batches_only(mode):
    sizes, mixed = (1, 2, 4, 8), (64, 128, 200)
    d = CudagraphDispatcher(mode, sizes, mixed_sizes=mixed)
    keys = d.graph_keys()
    big = [(m, k) for m, k in keys if k.num_tokens > sizes[-1]]
    for n in range(1, 201):
        m, desc = d.descriptor(n, MIXED)
        if mode.mixed_mode is RuntimeMode.NONE:
            assert m is RuntimeMode.NONE
            continue
        want = min(s for s in sizes + mixed if s >= n)
        assert (m, desc.num_tokens) == (mode.mixed_mode, want)
        assert (m, desc) in keys  # every size a mixed batch pads to was captured
    # A decode batch never pads into a mixed-only size, and none is captured for decode.
    for n in range(1, 9):
        m, desc = d.descriptor(n, 1)
        assert desc.num_tokens in sizes or m is RuntimeMode.NONE
    assert all(k.uniform_query_len == MIXED and m is mode.mixed_mode for m, k in big)
    assert len(big) == (len(mixed) if mode.mixed_mode is not RuntimeMode.NONE else 0)
    assert [k.num_tokens for _, k in keys] == sorted((k.num_tokens for _, k in keys),
                                                     reverse=True)
    with pytest.raises(ValueError, match="above the capture sizes"):
        CudagraphDispatcher(mode, sizes, mixed_sizes=(8, 64))


# Every key of FULL_AND_PIECEWISE at sizes (1, 2, 4), mixed size 8, verify k = 1 (q = 2)
# without LoRA, written out by hand: largest first; per size verify, decode, PIECEWISE; the
# mixed-only size after the verify key of the same token count.
_KEYS_NO_LORA = [
    (RuntimeMode.FULL, BatchDescriptor(8, 2)),
    (RuntimeMode.PIECEWISE, BatchDescriptor(8, MIXED)),
    (RuntimeMode.FULL, BatchDescriptor(4, 1)),
    (RuntimeMode.PIECEWISE, BatchDescriptor(4, MIXED)),
    (RuntimeMode.FULL, BatchDescriptor(4, 2)),
    (RuntimeMode.FULL, BatchDescriptor(2, 1)),
    (RuntimeMode.PIECEWISE, BatchDescriptor(2, MIXED)),
    (RuntimeMode.FULL, BatchDescriptor(2, 2)),
    (RuntimeMode.FULL, BatchDescriptor(1, 1)),
    (RuntimeMode.PIECEWISE, BatchDescriptor(1, MIXED)),
]


def _dispatcher(lora_variants: tuple[bool, ...] = (False,)) -> CudagraphDispatcher:
    return CudagraphDispatcher(M.FULL_AND_PIECEWISE, (1, 2, 4), verify_query_len=2,
                               max_num_tokens=8, mixed_sizes=(8,), lora_variants=lora_variants)


def test_lora_variants_double_every_key_and_pick_by_has_lora():
    """Without LoRA the keys are exactly those of before (all has_lora False, a batch with
    has_lora set cannot reach a LoRA graph); with LoRA each key exists in both variants and
    the batch's flag picks one; eager batches keep their flag."""
    plain = _dispatcher()
    assert plain.graph_keys() == _KEYS_NO_LORA
    assert plain.descriptor(3, 1, has_lora=True) == (RuntimeMode.FULL, BatchDescriptor(4, 1))
    both = _dispatcher((False, True))
    keys = both.graph_keys()
    assert len(keys) == 2 * len(_KEYS_NO_LORA)
    assert {(m, BatchDescriptor(k.num_tokens, k.uniform_query_len)) for m, k in keys
            if k.has_lora} == set(_KEYS_NO_LORA)
    assert [(m, k) for m, k in keys if not k.has_lora] == _KEYS_NO_LORA
    assert [k.num_tokens for _, k in keys] == sorted((k.num_tokens for _, k in keys),
                                                     reverse=True)
    for q, n, want in ((1, 3, (RuntimeMode.FULL, 4, 1)), (MIXED, 5, (RuntimeMode.PIECEWISE, 8, 0)),
                       (2, 6, (RuntimeMode.FULL, 8, 2)), (MIXED, 3, (RuntimeMode.PIECEWISE, 4, 0))):
        for has_lora in (False, True):
            mode, desc = both.descriptor(n, q, has_lora)
            assert (mode, desc.num_tokens, desc.uniform_query_len) == want
            assert desc.has_lora is has_lora and (mode, desc) in keys
    assert both.descriptor(9, MIXED, True) == (RuntimeMode.NONE, BatchDescriptor(9, MIXED, True))
    # The compiled backend's graphs always hold LoRA: one variant, served to every batch.
    only = _dispatcher((True,))
    assert all(k.has_lora for _, k in only.graph_keys())
    assert len(only.graph_keys()) == len(_KEYS_NO_LORA)
    assert only.descriptor(3, 1, False) == (RuntimeMode.FULL, BatchDescriptor(4, 1, True))
    assert only.descriptor(9, MIXED, False)[1] == BatchDescriptor(9, MIXED, False)  # eager
    with pytest.raises(ValueError, match="lora variants"):
        _dispatcher((True, False))
