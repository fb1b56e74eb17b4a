"""The flex attention backend on a CUDA GPU: compiled FlexAttention, bf16/fp16 at realistic
shapes against a float32 reference, and CUDA-graph capture/replay of ``forward`` with the
metadata refilled for a different batch (the persistent-buffer contract behind ALWAYS)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tachyon.attention.base import AttentionSpec, CommonAttentionMetadata
from tachyon.attention.flex_backend import FlexAttentionBackend
from tachyon.attention.torch_backend import TorchAttentionBackend
from tachyon.cudagraph.modes import CGSupport

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 32, 8, 128, 16
MAX_MODEL_LEN, MAX_SEQS, MAX_TOKENS = 4096, 64, 2048


def make_spec(dtype: torch.dtype) -> AttentionSpec:
    return AttentionSpec(
        num_heads=NUM_HEADS, num_kv_heads=NUM_KV_HEADS, head_dim=HEAD_DIM,
        scale=HEAD_DIM**-0.5, block_size=BLOCK_SIZE, max_num_seqs=MAX_SEQS,
        max_num_batched_tokens=MAX_TOKENS, max_model_len=MAX_MODEL_LEN, dtype=dtype,
        device=torch.device("cuda"),
    )


class Batch:
    """Persistent step buffers on the GPU over a random paged cache; ``fill`` rewrites them in
    place (same addresses), as the model runner does between a capture and its replays."""

    def __init__(self, spec: AttentionSpec, seed: int) -> None:
        self.spec = spec
        self.gen = torch.Generator().manual_seed(seed)
        m = spec.max_blocks_per_seq
        self.num_blocks = MAX_SEQS * m + 8
        shape = (self.num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
        self.k_cache = torch.randn(shape, device="cuda").to(spec.dtype)
        self.v_cache = torch.randn(shape, device="cuda").to(spec.dtype)
        self.qsl = torch.zeros(MAX_SEQS + 1, dtype=torch.int32, device="cuda")
        self.seq_lens = torch.zeros(MAX_SEQS, dtype=torch.int32, device="cuda")
        self.block_table = torch.zeros(MAX_SEQS, m, dtype=torch.int32, device="cuda")
        self.slot_mapping = torch.zeros(MAX_TOKENS, dtype=torch.int64, device="cuda")
        self.query = torch.zeros(MAX_TOKENS, NUM_HEADS, HEAD_DIM, dtype=spec.dtype,
                                 device="cuda")
        self.key = torch.zeros(MAX_TOKENS, NUM_KV_HEADS, HEAD_DIM, dtype=spec.dtype,
                               device="cuda")
        self.value = torch.zeros_like(self.key)
        self.output = torch.zeros_like(self.query)

    def fill(self, reqs: list[tuple[int, int]], pad_tokens: int = 0, pad_reqs: int = 0,
             shared_prefix_blocks: int = 0) -> CommonAttentionMetadata:
        bs, m, g = BLOCK_SIZE, self.spec.max_blocks_per_seq, self.gen
        perm = torch.randperm(self.num_blocks, generator=g).tolist()
        shared, perm = perm[:shared_prefix_blocks], perm[shared_prefix_blocks:]
        table = torch.randint(0, self.num_blocks, (MAX_SEQS, m), generator=g,
                              dtype=torch.int32)  # garbage past each request's length
        qsl, lens, slots, pos = [0], [], [], 0
        for r, (q_len, seq_len) in enumerate(reqs):
            nblk = -(-seq_len // bs)
            own = min(shared_prefix_blocks, (seq_len - q_len) // bs)
            pages = shared[:own] + [perm.pop() for _ in range(nblk - own)]
            table[r, :nblk] = torch.tensor(pages, dtype=torch.int32)
            slots += [pages[p // bs] * bs + p % bs for p in range(seq_len - q_len, seq_len)]
            pos += q_len
            qsl.append(pos)
            lens.append(seq_len)
        n = len(reqs)
        table[n:n + pad_reqs] = 0
        qsl += [pos + i + 1 for i in range(pad_reqs)]
        lens += [0] * pad_reqs
        r, t = n + pad_reqs, pos + pad_reqs + pad_tokens
        self.block_table.copy_(table)
        self.qsl[:r + 1].copy_(torch.tensor(qsl, dtype=torch.int32))
        self.seq_lens[:r].copy_(torch.tensor(lens, dtype=torch.int32))
        self.slot_mapping[:t].copy_(torch.tensor(slots + [-1] * (t - pos)))
        for buf in (self.query, self.key, self.value):
            buf.copy_(torch.randn(buf.shape, generator=g).to(buf.dtype))
        q_lens = [q for q, _ in reqs] + [1] * pad_reqs
        return CommonAttentionMetadata(
            num_reqs=r, num_tokens=t, num_actual_tokens=pos, max_query_len=max(q_lens),
            max_seq_len=max(lens), uniform_decode=all(q == 1 for q in q_lens),
            query_start_loc=self.qsl[:r + 1], seq_lens=self.seq_lens[:r],
            block_table=self.block_table[:r], slot_mapping=self.slot_mapping[:t],
            query_start_loc_cpu=torch.tensor(qsl, dtype=torch.int32),
            seq_lens_cpu=torch.tensor(lens, dtype=torch.int32),
        )

    def reference(self, common: CommonAttentionMetadata):
        """Float32 torch-backend attention over a float32 copy of the current caches."""
        t = common.num_tokens
        ref = TorchAttentionBackend(dataclasses.replace(self.spec, dtype=torch.float32))
        k, v = self.k_cache.float(), self.v_cache.float()
        out = torch.empty(t, NUM_HEADS, HEAD_DIM, device="cuda")
        ref.forward(self.query[:t].float(), self.key[:t].float(), self.value[:t].float(), k, v,
                    ref.build_metadata(common), out)
        return out, k, v

    def run(self, backend: FlexAttentionBackend, md) -> torch.Tensor:
        t = md.num_tokens
        backend.forward(self.query[:t], self.key[:t], self.value[:t], self.k_cache,
                        self.v_cache, md, self.output[:t])
        return self.output[:t]


def check(batch: Batch, common, out, ref, tol: float) -> None:
    ref_out, ref_k, ref_v = ref
    n = common.num_actual_tokens
    assert torch.equal(batch.k_cache.float(), ref_k)
    assert torch.equal(batch.v_cache.float(), ref_v)
    out = out.float()
    assert torch.isfinite(out).all()
    err = (out[:n] - ref_out[:n]).norm() / ref_out[:n].norm()
    assert err <= tol, f"relative error {err:.2e}"
    assert torch.all(out[n:] == 0)


@pytest.fixture(scope="module")
def bf16():
    """One backend and one set of buffers for the bf16 tests (the compiled kernel is shared)."""
    spec = make_spec(torch.bfloat16)
    return FlexAttentionBackend(spec), Batch(spec, seed=0)


CASES = {
    "mixed": dict(reqs=[(300, 2000), (1, 4000), (128, 128), (1, 1), (57, 3000), (1, 2500),
                        (16, 700)], pad_tokens=19),
    "decode64": dict(reqs=[(1, 1 + (i * 997) % 4000) for i in range(64)],
                     shared_prefix_blocks=3),
    "decode_padded": dict(reqs=[(1, 50 + i * 150) for i in range(23)], pad_reqs=9),
}


@pytest.mark.parametrize("case", list(CASES))
@torch.inference_mode()
def test_bf16_matches_reference(bf16, case):
    backend, batch = bf16
    assert backend.compiled and backend.cudagraph_support is CGSupport.ALWAYS
    common = batch.fill(**CASES[case])
    md = backend.build_metadata(common)
    batch.output.fill_(float("nan"))
    ref = batch.reference(common)  # from the caches before this step's write
    out = batch.run(backend, md)
    torch.cuda.synchronize()
    check(batch, common, out, ref, 1e-2)


def _capture(backend, batch, md) -> torch.cuda.CUDAGraph:
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up: compiles for this size outside the capture
        for _ in range(2):
            batch.run(backend, md)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        batch.run(backend, md)
    torch.cuda.synchronize()
    return graph


GRAPH_CASES = {
    # FULL uniform decode: 64 seats, padded requests of one token and seq_len 0.
    "uniform_decode": (dict(reqs=[(1, 30 + i * 77) for i in range(40)], pad_reqs=24),
                       dict(reqs=[(1, 4000 - i * 61) for i in range(57)], pad_reqs=7,
                            shared_prefix_blocks=2)),
    # ALWAYS: a mixed prefill/decode batch, replayed with another mix and another num_reqs.
    "mixed": (dict(reqs=[(100, 1000), (1, 50), (60, 60), (1, 3000), (80, 2000)],
                   pad_tokens=14),
              dict(reqs=[(1, 10 + i) for i in range(20)] + [(200, 700), (3, 3000)],
                   pad_tokens=33)),
}


@pytest.mark.parametrize("case", list(GRAPH_CASES))
@torch.inference_mode()
def test_cuda_graph_replay_reads_refilled_metadata(bf16, case):
    backend, batch = bf16
    first, second = GRAPH_CASES[case]
    common = batch.fill(**first)
    graph = _capture(backend, batch, backend.build_metadata(common))
    # Another batch of the same padded size: only build_metadata runs before the replay.
    common2 = batch.fill(**second)
    assert common2.num_tokens == common.num_tokens
    backend.build_metadata(common2)
    ref = batch.reference(common2)
    batch.output.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    check(batch, common2, batch.output[:common2.num_tokens], ref, 1e-2)


@torch.inference_mode()
def test_fp16():
    spec = make_spec(torch.float16)
    backend, batch = FlexAttentionBackend(spec), Batch(spec, seed=1)
    common = batch.fill([(40, 900), (1, 3500), (1, 17), (33, 33)], pad_tokens=6)
    md = backend.build_metadata(common)
    ref = batch.reference(common)
    out = batch.run(backend, md)
    torch.cuda.synchronize()
    check(batch, common, out, ref, 1e-2)


def _engine_greedy(model: str, backend: str, mode: str) -> list[list[int]]:
    from tachyon import LLM, SamplingParams

    long = list(range(10, 60))
    rounds = [[[5, 17, 42, 99, 3, 250, 7], long, [400, 1, 2], [9] * 21, [3] * 5],
              [[*long, 7, 8, 9], [*long[:40], 300], [5, 17, 42, 99, 3, 250, 7, 1]]]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    llm = LLM(model=model, device="cuda", dtype="float32", attention_backend=backend,
              cudagraph_mode=mode, max_model_len=128, max_num_seqs=8,
              max_num_batched_tokens=32, kv_cache_memory="4MiB",
              compilation_config={"cudagraph_capture_sizes": [1, 2, 4, 8]})
    try:
        ids = []
        for prompts in rounds:
            ids += [list(o.outputs[0].token_ids)
                    for o in llm.generate(prompts, params, use_tqdm=False)]
        return ids
    finally:
        llm.engine.shutdown()


def test_engine_greedy_every_mode(tiny_llama):
    """Greedy tokens of the flex backend equal the torch backend's under every graph mode."""
    ref = _engine_greedy(tiny_llama, "torch", "NONE")
    results = {}
    for mode in ("NONE", "FULL", "FULL_AND_PIECEWISE", "PIECEWISE", "FULL_DECODE_ONLY"):
        try:
            results[mode] = "ok" if _engine_greedy(tiny_llama, "flex", mode) == ref else "diff"
        except Exception as e:  # report every mode, not just the first failure
            results[mode] = f"{type(e).__name__}: {e}"[:300]
    assert all(v == "ok" for v in results.values()), results
