"""The FULL-graph contract on CPU: emulated replay checks every kernel-shaping value, and the
pinned staging buffers are fenced between steps (issue 18).

The fault behind issue 18 was the second: under asynchronous scheduling the host refilled the
pinned staging buffers for step N+1 before step N's host-to-device copies had run (a long
prefill chunk that samples nothing left the host nothing to wait on), so a step ran with the
next step's inputs. It only shows on a real GPU (tests/gpu/test_long_context_modes.py fails
on the old code); here the order of fence, copies and forward is checked directly.
"""

from __future__ import annotations

import random
from typing import ClassVar

import pytest

from graph_testing import PersistentTorchBackend
from tachyon.attention.torch_backend import TorchAttentionMetadata
from tachyon.cudagraph.contract import GraphContractError, check_replay, signature
from tachyon_testing import TINY_VOCAB


class _LongestSequenceInMetadata(PersistentTorchBackend):
    """Breaks the contract the way a kernel sized by the longest sequence would: a
    data-dependent scalar in the metadata a FULL graph captures."""

    name: ClassVar[str] = "torch-max-seq-len"

    def build_metadata(self, common):
        return TorchAttentionMetadata(common, [(common.max_seq_len,)])


def _llm(model_dir, monkeypatch, backend_cls, mode):
    from tachyon import LLM
    from tachyon.worker import model_runner

    monkeypatch.setenv("TACHYON_EMULATE_CUDAGRAPHS", "1")
    if backend_cls is not None:
        monkeypatch.setattr(model_runner, "get_backend_class",
                            lambda *args, **kwargs: backend_cls)
    return LLM(model_dir, device="cpu", dtype="float32", max_num_seqs=8,
               max_num_batched_tokens=32, block_size=4, cudagraph_mode=mode,
               compilation_config={"cudagraph_capture_sizes": [1, 2, 4, 8]})


def _long_and_short(seed: int) -> list[list[int]]:
    """A prompt longer than the token budget (chunked over steps) sharing a head with another
    (prefix hits), next to short ones, so small mixed batches carry earlier context."""
    rng = random.Random(seed)
    head = [rng.randrange(TINY_VOCAB) for _ in range(24)]
    return [head + [rng.randrange(TINY_VOCAB) for _ in range(30)],
            [rng.randrange(TINY_VOCAB) for _ in range(5)],
            head + [rng.randrange(TINY_VOCAB) for _ in range(3)],
            [rng.randrange(TINY_VOCAB) for _ in range(2)]]


def _greedy(llm, prompts):
    from tachyon import SamplingParams

    sp = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    together = [o.outputs[0].token_ids for o in llm.generate(prompts, sp, use_tqdm=False)]
    alone = [llm.generate([p], sp, use_tqdm=False)[0].outputs[0].token_ids for p in prompts]
    return together, alone


def test_full_graphs_with_earlier_context_match_eager(tiny_llama, monkeypatch):
    prompts = _long_and_short(seed=18)
    ref = _greedy(_llm(tiny_llama, monkeypatch, PersistentTorchBackend, "NONE"), prompts)
    llm = _llm(tiny_llama, monkeypatch, PersistentTorchBackend, "FULL")
    assert llm.engine.executor.runner.graph_runner.check_contract
    assert _greedy(llm, prompts) == ref
    assert ref[0] == ref[1], "the eager reference itself depends on the batch"


def test_a_data_dependent_scalar_in_metadata_fails_loudly(tiny_llama, monkeypatch):
    llm = _llm(tiny_llama, monkeypatch, _LongestSequenceInMetadata, "FULL")
    with pytest.raises(GraphContractError, match=r"spans\.0\.0: captured 1, replay \d+"):
        _greedy(llm, _long_and_short(seed=3))


def test_signature_sees_addresses_and_scalars():
    import torch

    from tachyon.attention.triton_backend import TritonAttentionMetadata

    buf = torch.zeros(64, dtype=torch.int32)
    a = TritonAttentionMetadata(_common_metadata(buf, num_reqs=4), num_splits=2)
    check_replay("same", signature(a), signature(
        TritonAttentionMetadata(_common_metadata(buf, num_reqs=4, max_seq_len=999), 2)))
    with pytest.raises(GraphContractError, match="num_splits: captured 2, replay 4"):
        check_replay("splits", signature(a), signature(
            TritonAttentionMetadata(_common_metadata(buf, num_reqs=4), 4)))
    with pytest.raises(GraphContractError, match="seq_lens"):
        check_replay("moved", signature(a), signature(
            TritonAttentionMetadata(_common_metadata(buf.clone(), num_reqs=4), 2)))


def _common_metadata(buf, num_reqs: int, max_seq_len: int = 7):
    """Metadata over views of one persistent buffer, as the model runner builds it."""
    from tachyon.attention.base import CommonAttentionMetadata

    r = num_reqs
    return CommonAttentionMetadata(
        num_reqs=r, num_tokens=8, num_actual_tokens=5, max_query_len=3,
        max_seq_len=max_seq_len, uniform_decode=False, query_start_loc=buf[: r + 1],
        seq_lens=buf[16:16 + r], block_table=buf[32:48].view(r, -1), slot_mapping=buf[48:56],
        query_start_loc_cpu=buf[: r + 1], seq_lens_cpu=buf[16:16 + r])


class _RecordingFence:
    def __init__(self, log: list[str]) -> None:
        self.log = log

    def wait(self) -> None:
        self.log.append("wait")

    def record(self) -> None:
        self.log.append("record")


def test_staging_buffers_are_fenced_on_every_step(tiny_llama, monkeypatch):
    """Each step waits for the previous step's copies before touching the staging buffers
    and records the fence after its own last copy, also on steps that sample nothing."""
    from tachyon import SamplingParams

    llm = _llm(tiny_llama, monkeypatch, None, "NONE")
    runner = llm.engine.executor.runner
    log: list[str] = []
    runner.staging_fence = _RecordingFence(log)
    for name in ("_stage", "_run_model"):
        orig = getattr(runner, name)

        def logged(*args, _orig=orig, _name=name, **kwargs):
            log.append(_name)
            return _orig(*args, **kwargs)

        monkeypatch.setattr(runner, name, logged)
    orig_stage = runner.sampling_buffers.stage
    monkeypatch.setattr(runner.sampling_buffers, "stage",
                        lambda *a: (log.append("sampling"), orig_stage(*a))[1])
    prompt = list(range(3, 3 + 70))  # > 2 chunks of 32: the first steps sample nothing
    llm.generate([prompt], SamplingParams(temperature=0, max_tokens=3), use_tqdm=False)
    steps = " ".join(log).replace("sampling record", "record").split("wait ")[1:]
    assert len(steps) == 3 + 2, log  # 3 prefill chunks, then 2 decode steps
    assert all(s.strip() == "_stage record _run_model" for s in steps), log
