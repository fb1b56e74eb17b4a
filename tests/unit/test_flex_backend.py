"""The flex attention backend on CPU (eager FlexAttention) against the torch reference.

Besides end-to-end outputs, the block mask itself is checked: the CPU eager path of
FlexAttention evaluates ``mask_mod`` densely and ignores ``kv_indices``, so a block-sparse
emulation (attend only to the pages the mask lists for each query block) verifies that the
block-level structure a GPU kernel walks is complete and free of duplicates.
"""

from __future__ import annotations

import math

import pytest
import torch

from tachyon.attention import flex_backend
from tachyon.attention.base import AttentionSpec, CommonAttentionMetadata
from tachyon.attention.flex_backend import Q_BLOCK, FlexAttentionBackend
from tachyon.attention.torch_backend import TorchAttentionBackend

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

NUM_BLOCKS = 48


def make_spec(num_heads=8, num_kv_heads=2, head_dim=32, block_size=16, max_num_seqs=16,
              max_tokens=128, max_model_len=256) -> AttentionSpec:
    return AttentionSpec(
        num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
        scale=head_dim**-0.5, block_size=block_size, max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_tokens, max_model_len=max_model_len, dtype=torch.float32,
        device=torch.device("cpu"),
    )


class Batch:
    """Persistent step buffers (like the runner's) over a random paged cache."""

    def __init__(self, spec: AttentionSpec, num_blocks: int = NUM_BLOCKS, seed: int = 0):
        self.spec, self.num_blocks = spec, num_blocks
        self.gen = torch.Generator().manual_seed(seed)
        s, t, m = spec.max_num_seqs, spec.max_num_batched_tokens, spec.max_blocks_per_seq
        shape = (num_blocks, spec.block_size, spec.num_kv_heads, spec.head_dim)
        self.k_cache = torch.randn(shape, generator=self.gen)
        self.v_cache = torch.randn(shape, generator=self.gen)
        self.qsl = torch.zeros(s + 1, dtype=torch.int32)
        self.seq_lens = torch.zeros(s, dtype=torch.int32)
        self.block_table = torch.zeros(s, m, dtype=torch.int32)
        self.slot_mapping = torch.zeros(t, dtype=torch.int64)
        self.query = torch.zeros(t, spec.num_heads, spec.head_dim)
        self.key = torch.zeros(t, spec.num_kv_heads, spec.head_dim)
        self.value = torch.zeros_like(self.key)

    def fill(self, reqs: list[tuple[int, int]], pad_tokens: int = 0, pad_reqs: int = 0,
             shared_prefix_blocks: int = 0) -> CommonAttentionMetadata:
        """``reqs``: (query length, sequence length after the step) per real request.
        ``pad_tokens``: padding tokens past the last request (slot -1, no request).
        ``pad_reqs``: padded requests of one token each with sequence length 0 (the FULL
        uniform-decode padding). ``shared_prefix_blocks``: leading pages shared by all."""
        bs, m = self.spec.block_size, self.spec.max_blocks_per_seq
        g = self.gen
        perm = torch.randperm(self.num_blocks, generator=g).tolist()
        shared, perm = perm[:shared_prefix_blocks], perm[shared_prefix_blocks:]
        # Garbage in the whole table: only entries below a request's length are meaningful.
        self.block_table.copy_(torch.randint(0, self.num_blocks, self.block_table.shape,
                                             generator=g, dtype=torch.int32))
        pos, slots = 0, []
        self.qsl[0] = 0
        for r, (q_len, seq_len) in enumerate(reqs):
            assert 0 < q_len <= seq_len
            nblk = -(-seq_len // bs)
            # Shared pages hold cached context only: nobody writes into them.
            own = min(shared_prefix_blocks, (seq_len - q_len) // bs)
            pages = shared[:own] + [perm.pop() for _ in range(nblk - own)]
            self.block_table[r, :nblk] = torch.tensor(pages, dtype=torch.int32)
            for p in range(seq_len - q_len, seq_len):
                slots.append(pages[p // bs] * bs + p % bs)
            pos += q_len
            self.qsl[r + 1] = pos
            self.seq_lens[r] = seq_len
        num_reqs = len(reqs)
        for i in range(pad_reqs):
            self.qsl[num_reqs + i + 1] = pos + i + 1
            self.seq_lens[num_reqs + i] = 0
            self.block_table[num_reqs + i] = 0
        num_actual = pos
        num_tokens = pos + pad_reqs + pad_tokens
        self.slot_mapping[:num_tokens] = torch.tensor(slots + [-1] * (num_tokens - pos))
        for buf in (self.query, self.key, self.value):
            buf.copy_(torch.randn(buf.shape, generator=g))
        r = num_reqs + pad_reqs
        q_lens = [q for q, _ in reqs] + [1] * pad_reqs
        return CommonAttentionMetadata(
            num_reqs=r, num_tokens=num_tokens, num_actual_tokens=num_actual,
            max_query_len=max(q_lens), max_seq_len=max(s for _, s in reqs),
            uniform_decode=all(q == 1 for q in q_lens),
            query_start_loc=self.qsl[:r + 1], seq_lens=self.seq_lens[:r],
            block_table=self.block_table[:r, :m], slot_mapping=self.slot_mapping[:num_tokens],
            query_start_loc_cpu=self.qsl[:r + 1].clone(), seq_lens_cpu=self.seq_lens[:r].clone(),
        )


def run_backend(backend, batch: Batch, common, caches=None, metadata=None):
    """Run one layer's attention; returns (output, k_cache, v_cache)."""
    t = common.num_tokens
    k_cache, v_cache = caches or (batch.k_cache.clone(), batch.v_cache.clone())
    md = metadata if metadata is not None else backend.build_metadata(common)
    out = torch.full((t, batch.spec.num_heads, batch.spec.head_dim), float("nan"))
    backend.forward(batch.query[:t], batch.key[:t], batch.value[:t], k_cache, v_cache, md, out)
    return out, k_cache, v_cache


def assert_close_rel(out: torch.Tensor, ref: torch.Tensor, tol: float) -> None:
    assert torch.isfinite(out).all()
    err = (out.double() - ref.double()).norm() / ref.double().norm().clamp(min=1e-12)
    assert err < tol, f"relative error {err:.2e}"


def check_against_reference(spec, batch, common, flex=None):
    flex = flex or FlexAttentionBackend(spec)
    ref_out, ref_k, ref_v = run_backend(TorchAttentionBackend(spec), batch, common)
    out, k, v = run_backend(flex, batch, common)
    assert torch.equal(k, ref_k) and torch.equal(v, ref_v)
    assert_close_rel(out, ref_out, 1e-3)
    n = common.num_actual_tokens
    assert torch.all(out[n:] == 0), "padded rows must be zero"
    return flex


CASES = {
    "prefill_ragged": dict(reqs=[(5, 5), (17, 17), (1, 1), (33, 33)]),
    "prefix_context": dict(reqs=[(3, 40), (20, 37), (16, 16), (1, 70)]),
    "decode": dict(reqs=[(1, 9), (1, 33), (1, 16), (1, 17), (1, 64), (1, 1), (1, 100)]),
    "padded_tokens": dict(reqs=[(7, 30), (9, 9), (2, 50)], pad_tokens=14),
    "padded_requests": dict(reqs=[(1, 20), (1, 35), (1, 3)], pad_reqs=5),
    "shared_prefix": dict(reqs=[(1, 40), (4, 50), (1, 33), (12, 60)], shared_prefix_blocks=2),
    "shared_prefix_decode": dict(reqs=[(1, 40)] * 6 + [(1, 64)] * 4, shared_prefix_blocks=2,
                                 pad_reqs=2),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_torch_backend(case):
    spec = make_spec()
    kw = dict(CASES[case])
    batch = Batch(spec, seed=len(case))
    check_against_reference(spec, batch, batch.fill(**kw))


@pytest.mark.parametrize("heads", [(4, 4), (8, 1), (6, 2)])
@pytest.mark.parametrize("block_size", [16, 32])
def test_shapes_and_gqa(heads, block_size):
    spec = make_spec(num_heads=heads[0], num_kv_heads=heads[1], head_dim=16,
                     block_size=block_size)
    batch = Batch(spec, num_blocks=40, seed=block_size + heads[0])
    check_against_reference(spec, batch, batch.fill(
        [(3, 70), (1, 31), (24, 24), (1, 2), (2, 100)], pad_tokens=3))


def test_random_batches_reuse_one_backend():
    """Many random steps through one backend instance: stale persistent state would show."""
    spec = make_spec()
    gen = torch.Generator().manual_seed(3)
    flex = FlexAttentionBackend(spec)
    batch = Batch(spec, num_blocks=160, seed=11)
    for step in range(6):
        n = int(torch.randint(1, 12, (), generator=gen))
        reqs = []
        for _ in range(n):
            q = int(torch.randint(1, 20, (), generator=gen)) if step % 2 else 1
            reqs.append((q, q + int(torch.randint(0, 90, (), generator=gen))))
        common = batch.fill(reqs, pad_tokens=int(torch.randint(0, 8, (), generator=gen)),
                            shared_prefix_blocks=step % 3)
        check_against_reference(spec, batch, common, flex)


def test_replay_reads_refilled_buffers():
    """CUDA-graph replay emulated: metadata built for batch A is handed to forward after
    build_metadata refilled the buffers for batch B of the same padded shape. Everything the
    kernel reads must come from persistent buffers, so the result must be batch B's."""
    spec = make_spec()
    flex = FlexAttentionBackend(spec)
    batch = Batch(spec, seed=5)
    common_a = batch.fill([(1, 30), (1, 64), (1, 5)], pad_reqs=5)
    md_a = flex.build_metadata(common_a)
    run_backend(flex, batch, common_a, metadata=md_a)
    common_b = batch.fill([(1, 90), (1, 2), (1, 17), (1, 40), (1, 33), (1, 1)], pad_reqs=2,
                          shared_prefix_blocks=1)
    assert common_b.num_tokens == common_a.num_tokens
    md_b = flex.build_metadata(common_b)
    assert md_b.block_mask is md_a.block_mask  # one BlockMask object per padded size
    ref_out, ref_k, ref_v = run_backend(TorchAttentionBackend(spec), batch, common_b)
    out, k, v = run_backend(flex, batch, common_b, metadata=md_a)  # the "captured" metadata
    assert torch.equal(k, ref_k) and torch.equal(v, ref_v)
    assert_close_rel(out, ref_out, 1e-3)


def test_kv_write_skips_padding_and_is_graph_safe():
    spec = make_spec()
    flex = FlexAttentionBackend(spec)
    batch = Batch(spec, seed=9)
    common = batch.fill([(3, 10), (2, 2)], pad_tokens=11)
    _, k, v = run_backend(flex, batch, common)
    written = torch.zeros(NUM_BLOCKS * spec.block_size, dtype=torch.bool)
    slots = common.slot_mapping[common.slot_mapping >= 0]
    written[slots] = True
    flat = lambda c: c.view(-1, spec.num_kv_heads, spec.head_dim)  # noqa: E731
    assert torch.equal(flat(k)[~written], flat(batch.k_cache)[~written])
    assert torch.equal(flat(v)[~written], flat(batch.v_cache)[~written])
    assert torch.equal(flat(k)[slots], batch.key[:5])
    # A batch of nothing but padding writes nothing at all.
    common = batch.fill([(1, 1)], pad_tokens=15)
    batch.slot_mapping[:16] = -1
    _, k, v = run_backend(flex, batch, common)
    assert torch.equal(k, batch.k_cache) and torch.equal(v, batch.v_cache)


def _block_sparse_emulation(flex, md, batch, common, k_cache, v_cache):
    """Attend each query block only to the pages its block-mask row lists (float64)."""
    spec, bs = batch.spec, batch.spec.block_size
    bm = md.block_mask
    kv_num = bm.kv_num_blocks[0, 0]
    kv_idx = bm.kv_indices[0, 0]
    t = common.num_tokens
    group = spec.num_heads // spec.num_kv_heads
    q = batch.query[:t].double()
    out = torch.zeros(t, spec.num_heads, spec.head_dim, dtype=torch.float64)
    for i in range(kv_num.shape[0]):
        pages = kv_idx[i, : int(kv_num[i])].long()
        assert pages.unique().numel() == pages.numel(), "duplicate page in a block-mask row"
        rows = torch.arange(i * Q_BLOCK, min((i + 1) * Q_BLOCK, t))
        if pages.numel() == 0:
            continue
        kv = (pages[:, None] * bs + torch.arange(bs)).flatten()
        allowed = bm.mask_mod(None, None, rows[:, None], kv[None, :])  # [rows, kv]
        k = k_cache.view(-1, spec.num_kv_heads, spec.head_dim)[kv].double()
        v = v_cache.view(-1, spec.num_kv_heads, spec.head_dim)[kv].double()
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
        s = torch.einsum("qhd,khd->hqk", q[rows], k) * spec.scale
        s = s.masked_fill(~allowed, -math.inf)
        p = torch.softmax(s, dim=-1).nan_to_num(0.0)
        out[rows] = torch.einsum("hqk,khd->qhd", p, v)
    return out


@pytest.mark.parametrize("case", sorted(CASES))
def test_block_mask_is_complete(case):
    """The listed pages cover every allowed (query, key) pair, without duplicates."""
    spec = make_spec()
    batch = Batch(spec, seed=100 + len(case))
    common = batch.fill(**CASES[case])
    flex = FlexAttentionBackend(spec)
    _, k, v = run_backend(flex, batch, common)  # binds the cache, writes the new K/V
    md = flex.build_metadata(common)
    ref_out, _, _ = run_backend(TorchAttentionBackend(spec), batch, common)
    emu = _block_sparse_emulation(flex, md, batch, common, k, v)
    assert_close_rel(emu, ref_out, 1e-5)
    # And the dense view: every allowed pair lies in a listed page.
    t, kv_len = common.num_tokens, NUM_BLOCKS * spec.block_size
    allowed = md.block_mask.mask_mod(None, None, torch.arange(t)[:, None],
                                     torch.arange(kv_len)[None, :])
    listed = torch.zeros(t, NUM_BLOCKS, dtype=torch.bool)
    bm = md.block_mask
    for i in range(bm.kv_num_blocks.shape[-1]):
        rows = slice(i * Q_BLOCK, min((i + 1) * Q_BLOCK, t))
        listed[rows, bm.kv_indices[0, 0, i, : int(bm.kv_num_blocks[0, 0, i])].long()] = True
    need = allowed.view(t, NUM_BLOCKS, spec.block_size).any(-1)
    assert not (need & ~listed).any()


def test_eager_chunks_long_batches(monkeypatch):
    """The eager path splits a long query into chunks to bound the dense scores."""
    monkeypatch.setattr(flex_backend, "_EAGER_CHUNK_BYTES", 1)  # one query block per call
    spec = make_spec()
    batch = Batch(spec, seed=21)
    flex = check_against_reference(spec, batch, batch.fill(
        [(20, 50), (1, 7), (30, 30), (9, 90)], pad_tokens=6))
    assert flex._eager_chunk == Q_BLOCK


@pytest.mark.slow
def test_compiled_flex_on_cpu():
    """torch.compile'd flex (Inductor's CPU template walks kv_indices, unlike eager):
    several padded sizes through one backend, dynamic-shape recompiles included."""
    spec = make_spec()
    flex = FlexAttentionBackend(spec, use_compile=True)
    batch = Batch(spec, num_blocks=NUM_BLOCKS, seed=31)
    for case in ("prefix_context", "shared_prefix_decode", "padded_tokens"):
        check_against_reference(spec, batch, batch.fill(**CASES[case]), flex)


def _generate(model: str, backend: str, rounds: list[list[list[int]]], device: str = "cpu",
              **engine_args) -> list[list[int]]:
    from tachyon import LLM, SamplingParams

    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    llm = LLM(model=model, device=device, attention_backend=backend, max_model_len=128,
              max_num_seqs=4, max_num_batched_tokens=32, kv_cache_memory="1MiB",
              **engine_args)
    try:
        ids = []
        for prompts in rounds:
            outs = llm.generate(prompts, params, use_tqdm=False)
            ids += [list(o.outputs[0].token_ids) for o in outs]
        return ids
    finally:
        llm.engine.shutdown()


LONG = list(range(10, 60))
ROUNDS = [
    # Ragged prompts, one longer than the token budget (chunked prefill), then decode.
    [[5, 17, 42, 99, 3, 250, 7], LONG, [400, 1, 2], [9] * 21],
    # Prompts extending earlier ones (prefix-cache hits: cached context), three requests in
    # four seats (padded requests in FULL uniform-decode graphs).
    [[*LONG, 7, 8, 9], [*LONG[:40], 300], [5, 17, 42, 99, 3, 250, 7, 1]],
]


@pytest.fixture(scope="module")
def torch_greedy(tiny_llama):
    return _generate(tiny_llama, "torch", ROUNDS)


@pytest.mark.parametrize("mode", ["NONE", "FULL"])
def test_greedy_generation_matches_torch_backend(tiny_llama, torch_greedy, mode, monkeypatch):
    """Eager, and FULL graphs emulated on CPU: replay re-runs the capture-time closure with
    the capture-time metadata object, so only persistent buffers carry the new batch."""
    monkeypatch.setenv("TACHYON_EMULATE_CUDAGRAPHS", "1")
    flex_ids = _generate(tiny_llama, "flex", ROUNDS, cudagraph_mode=mode,
                         compilation_config={"cudagraph_capture_sizes": [1, 4]})
    assert all(len(r) == 16 for r in flex_ids)
    assert flex_ids == torch_greedy
