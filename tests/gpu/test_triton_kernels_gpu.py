"""Triton attention kernels on a CUDA GPU: bf16, realistic shapes, CUDA-graph replay."""

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
pytest.importorskip("triton")

from tachyon.attention.kernels.decode import (  # noqa: E402
    choose_num_splits,
    decode_attention,
    decode_workspace,
)
from tachyon.attention.kernels.store_kv import store_kv_cache  # noqa: E402
from tachyon.attention.kernels.unified import unified_attention  # noqa: E402

NUM_HEADS = 32
NUM_KV_HEADS = 8
HEAD_DIM = 128
BLOCK_SIZE = 16
MAX_CONTEXT = 4096
MAX_BLOCKS = MAX_CONTEXT // BLOCK_SIZE + 1  # one spare column, as the engine allocates
DTYPE = torch.bfloat16
SCALE = HEAD_DIM**-0.5


class PagedBatch:
    """Persistent buffers for a batch over a random-filled paged cache.

    ``fill`` rewrites their contents in place (same addresses), which is what a CUDA graph
    replay sees. Cached context is whatever random data the cache holds; the new tokens'
    K/V are written by ``store_kv_cache``.
    """

    def __init__(self, max_reqs: int, max_tokens: int, seed: int) -> None:
        self.gen = torch.Generator(device="cuda").manual_seed(seed)
        num_blocks = max_reqs * MAX_BLOCKS + 8
        shape = (num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
        self.k_cache = torch.randn(shape, generator=self.gen, device="cuda").to(DTYPE)
        self.v_cache = torch.randn(shape, generator=self.gen, device="cuda").to(DTYPE)
        self.query = torch.empty(max_tokens, NUM_HEADS, HEAD_DIM, dtype=DTYPE, device="cuda")
        self.key = torch.empty(max_tokens, NUM_KV_HEADS, HEAD_DIM, dtype=DTYPE, device="cuda")
        self.value = torch.empty_like(self.key)
        self.slot_mapping = torch.empty(max_tokens, dtype=torch.int64, device="cuda")
        self.query_start_loc = torch.empty(max_reqs + 1, dtype=torch.int32, device="cuda")
        self.seq_lens = torch.empty(max_reqs, dtype=torch.int32, device="cuda")
        self.block_table = torch.empty(max_reqs, MAX_BLOCKS, dtype=torch.int32, device="cuda")

    def fill(self, q_lens: list[int], seq_lens: list[int]) -> None:
        num_reqs, num_tokens = len(q_lens), self.query.shape[0]
        for buf in (self.query, self.key, self.value):
            buf.copy_(torch.randn(buf.shape, generator=self.gen, device="cuda"))
        # Every request gets a random disjoint set of blocks.
        perm = torch.randperm(self.k_cache.shape[0], generator=self.gen, device="cuda")
        self.block_table[:num_reqs] = perm[: num_reqs * MAX_BLOCKS].view(num_reqs, MAX_BLOCKS)
        self.seq_lens[:num_reqs] = torch.tensor(seq_lens, dtype=torch.int32)
        qsl = [0, *torch.tensor(q_lens).cumsum(0).tolist()]
        self.query_start_loc[: num_reqs + 1] = torch.tensor(qsl, dtype=torch.int32)
        slots = torch.full((num_tokens,), -1, dtype=torch.int64)
        table = self.block_table.cpu().long()
        for r, (q_len, seq_len) in enumerate(zip(q_lens, seq_lens, strict=True)):
            pos = torch.arange(seq_len - q_len, seq_len)
            slots[qsl[r] : qsl[r + 1]] = table[r, pos // BLOCK_SIZE] * BLOCK_SIZE + pos % BLOCK_SIZE
        self.slot_mapping.copy_(slots)
        self.q_lens, self.seq_lens_list = q_lens, seq_lens

    def reference(self) -> torch.Tensor:
        """float64 causal attention per request, K/V gathered through the block table."""
        out = torch.zeros(self.query.shape, dtype=torch.float64, device="cuda")
        groups = NUM_HEADS // NUM_KV_HEADS
        start = 0
        for r, (q_len, seq_len) in enumerate(zip(self.q_lens, self.seq_lens_list, strict=True)):
            pos = torch.arange(seq_len, device="cuda")
            blocks = self.block_table[r, pos // BLOCK_SIZE].long()
            k = self.k_cache[blocks, pos % BLOCK_SIZE].double().repeat_interleave(groups, 1)
            v = self.v_cache[blocks, pos % BLOCK_SIZE].double().repeat_interleave(groups, 1)
            q = self.query[start : start + q_len].double()
            scores = torch.einsum("qhd,khd->hqk", q, k) * SCALE
            q_pos = seq_len - q_len + torch.arange(q_len, device="cuda")
            scores.masked_fill_(pos[None, :] > q_pos[:, None], float("-inf"))
            out[start : start + q_len] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)
            start += q_len
        return out


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref).norm() / ref.norm()).item()


def _random_lens(gen: torch.Generator, num_reqs: int, max_q: int) -> tuple[list[int], list[int]]:
    q_lens = torch.randint(1, max_q + 1, (num_reqs,), generator=gen).tolist()
    ctx = torch.randint(0, MAX_CONTEXT - max_q, (num_reqs,), generator=gen).tolist()
    return q_lens, [q + c for q, c in zip(q_lens, ctx, strict=True)]


def _run_unified(b: PagedBatch, num_reqs: int) -> None:
    n = b.query.shape[0]
    store_kv_cache(b.key, b.value, b.k_cache, b.v_cache, b.slot_mapping[:n])
    unified_attention(
        b.query,
        b.k_cache,
        b.v_cache,
        b.out,
        b.query_start_loc[: num_reqs + 1],
        b.seq_lens[:num_reqs],
        b.block_table[:num_reqs],
        SCALE,
        num_reqs,
    )


def test_unified_attention_bf16_mixed_batch() -> None:
    # Decodes, chunked prefills over long prefixes and a fresh prefill: ~400 tokens.
    q_lens = [*[1] * 8, 64, 200, 17, 100]
    seq_lens = [4096, 1, 2000, 333, 17, 3999, 64, 1025, 3000, 200, 4096, 1500]
    b = PagedBatch(len(q_lens), sum(q_lens) + 5, seed=0)  # 5 padded tokens
    b.fill(q_lens, seq_lens)
    b.out = torch.full_like(b.query, float("nan"))
    _run_unified(b, len(q_lens))
    torch.cuda.synchronize()
    real = slice(0, sum(q_lens))
    assert torch.isfinite(b.out[real]).all()
    assert _rel_err(b.out[real], b.reference()[real]) <= 1e-2


@pytest.mark.parametrize("num_splits", [None, 1, 4, 16])
def test_decode_attention_bf16(num_splits: int | None) -> None:
    num_reqs = 48
    b = PagedBatch(num_reqs, num_reqs, seed=1)
    gen = torch.Generator().manual_seed(1)
    seq_lens = torch.randint(1, MAX_CONTEXT + 1, (num_reqs,), generator=gen).tolist()
    b.fill([1] * num_reqs, seq_lens)
    splits = num_splits or choose_num_splits(num_reqs, NUM_KV_HEADS, b.query.device)
    workspace = decode_workspace(num_reqs, NUM_HEADS, HEAD_DIM, splits, b.query.device)
    out = torch.full_like(b.query, float("nan"))
    store_kv_cache(b.key, b.value, b.k_cache, b.v_cache, b.slot_mapping)
    decode_attention(
        b.query, b.k_cache, b.v_cache, out, b.seq_lens, b.block_table, SCALE, splits, workspace
    )
    torch.cuda.synchronize()
    assert torch.isfinite(out).all()
    assert _rel_err(out, b.reference()) <= 1e-2


def test_unified_attention_bf16_decode_batch() -> None:
    # One token per request: the varlen kernel's short-tile ("decode-like") configuration.
    num_reqs = 48
    b = PagedBatch(num_reqs, num_reqs, seed=4)
    gen = torch.Generator().manual_seed(4)
    b.fill([1] * num_reqs, torch.randint(1, MAX_CONTEXT + 1, (num_reqs,), generator=gen).tolist())
    b.out = torch.full_like(b.query, float("nan"))
    _run_unified(b, num_reqs)
    torch.cuda.synchronize()
    assert torch.isfinite(b.out).all()
    assert _rel_err(b.out, b.reference()) <= 1e-2


def test_unified_attention_cuda_graph_replays_new_contents() -> None:
    # Capture once with one batch, replay with different query and context lengths: the
    # grid and constexprs depend on shapes only, so the replay must match the reference.
    gen = torch.Generator().manual_seed(2)
    num_reqs, num_tokens = 6, 256
    b = PagedBatch(num_reqs, num_tokens, seed=2)
    b.out = torch.empty_like(b.query)
    b.fill(*_random_lens(gen, num_reqs, num_tokens // num_reqs))
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        _run_unified(b, num_reqs)  # warm-up: compiles outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        _run_unified(b, num_reqs)
    for _ in range(3):
        q_lens, seq_lens = _random_lens(gen, num_reqs, num_tokens // num_reqs)
        b.fill(q_lens, seq_lens)
        b.out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        real = slice(0, sum(q_lens))
        assert torch.isfinite(b.out[real]).all()
        assert _rel_err(b.out[real], b.reference()[real]) <= 1e-2


def test_decode_attention_cuda_graph_replays_new_contents() -> None:
    gen = torch.Generator().manual_seed(3)
    num_reqs = 4  # a small batch: several splits
    b = PagedBatch(num_reqs, num_reqs, seed=3)
    splits = choose_num_splits(num_reqs, NUM_KV_HEADS, b.query.device)
    assert splits > 1
    workspace = decode_workspace(num_reqs, NUM_HEADS, HEAD_DIM, splits, b.query.device)
    out = torch.empty_like(b.query)

    def step() -> None:
        store_kv_cache(b.key, b.value, b.k_cache, b.v_cache, b.slot_mapping)
        decode_attention(
            b.query,
            b.k_cache,
            b.v_cache,
            out,
            b.seq_lens,
            b.block_table,
            SCALE,
            splits,
            workspace,
        )

    b.fill([1] * num_reqs, [100] * num_reqs)
    step()  # warm-up
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for _ in range(3):
        seq_lens = torch.randint(1, MAX_CONTEXT + 1, (num_reqs,), generator=gen).tolist()
        b.fill([1] * num_reqs, seq_lens)
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.isfinite(out).all()
        assert _rel_err(out, b.reference()) <= 1e-2
