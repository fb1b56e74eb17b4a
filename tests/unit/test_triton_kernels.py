"""Triton attention kernels vs a float64 torch reference, on CPU through the Triton interpreter.

Shapes are kept small: the interpreter runs every program in numpy.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first triton import

import math

import pytest
import torch

pytest.importorskip("triton")
import triton
import triton.language as tl

from tachyon.attention.kernels.decode import choose_num_splits, decode_attention, decode_workspace
from tachyon.attention.kernels.store_kv import store_kv_cache
from tachyon.attention.kernels.unified import unified_attention

HEAD_DIM = 64
NUM_HEADS = 4
NUM_KV_HEADS = 2


def _make_batch(
    q_lens: list[int],
    seq_lens: list[int],
    *,
    block_size: int,
    num_heads: int = NUM_HEADS,
    num_kv_heads: int = NUM_KV_HEADS,
    pad_tokens: int = 0,
    seed: int = 0,
) -> dict:
    """A paged batch: the context before this step is already in the cache, the new tokens'
    K/V are returned separately (to go through ``store_kv_cache``), the rest of the cache is
    random garbage, and blocks are handed out in a random order."""
    gen = torch.Generator().manual_seed(seed)
    num_reqs = len(q_lens)
    max_blocks = max(math.ceil(s / block_size) for s in seq_lens) + 1
    blocks_needed = [math.ceil(s / block_size) for s in seq_lens]
    num_blocks = sum(blocks_needed) + 3  # a few blocks nobody owns
    perm = torch.randperm(num_blocks, generator=gen)
    # Unused table entries hold stale (valid) block ids, as a real block table would.
    block_table = torch.randint(0, num_blocks, (num_reqs, max_blocks), generator=gen)
    start = 0
    for r, n in enumerate(blocks_needed):
        block_table[r, :n] = perm[start : start + n]
        start += n
    block_table = block_table.to(torch.int32)

    shape = (num_blocks, block_size, num_kv_heads, HEAD_DIM)
    k_cache = torch.randn(shape, generator=gen)
    v_cache = torch.randn(shape, generator=gen)
    num_tokens = sum(q_lens) + pad_tokens
    query = torch.randn(num_tokens, num_heads, HEAD_DIM, generator=gen)
    # Non-contiguous token stride, like K/V sliced out of a fused QKV projection.
    kv_new = torch.randn(num_tokens, 2, num_kv_heads, HEAD_DIM, generator=gen)
    key, value = kv_new[:, 0], kv_new[:, 1]
    slot_mapping = torch.full((num_tokens,), -1, dtype=torch.int64)

    token = 0
    for r, (q_len, seq_len) in enumerate(zip(q_lens, seq_lens, strict=True)):
        for pos in range(seq_len):
            blk, off = int(block_table[r, pos // block_size]), pos % block_size
            if pos < seq_len - q_len:  # earlier context: already cached
                k_cache[blk, off] = torch.randn(num_kv_heads, HEAD_DIM, generator=gen)
                v_cache[blk, off] = torch.randn(num_kv_heads, HEAD_DIM, generator=gen)
            else:
                slot_mapping[token] = blk * block_size + off
                token += 1
        token += max(q_len - seq_len, 0)  # padding request with queries but no context
    query_start_loc = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    return dict(
        query=query,
        key=key,
        value=value,
        k_cache=k_cache,
        v_cache=v_cache,
        slot_mapping=slot_mapping,
        query_start_loc=query_start_loc,
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        block_table=block_table,
    )


def _reference(b: dict, scale: float) -> torch.Tensor:
    """float64 causal attention, gathering each request's K/V through its block table.
    Rows of tokens with no visible key (padding) are left NaN and never compared."""
    query, k_cache, v_cache = b["query"], b["k_cache"], b["v_cache"]
    block_size = k_cache.shape[1]
    groups = query.shape[1] // k_cache.shape[2]
    out = torch.full(query.shape, float("nan"), dtype=torch.float64)
    qsl = b["query_start_loc"].tolist()
    for r, seq_len in enumerate(b["seq_lens"].tolist()):
        q_len = qsl[r + 1] - qsl[r]
        if q_len == 0 or seq_len == 0:
            continue
        pos = torch.arange(seq_len)
        blocks = b["block_table"][r, pos // block_size].long()
        k = k_cache[blocks, pos % block_size].double().repeat_interleave(groups, dim=1)
        v = v_cache[blocks, pos % block_size].double().repeat_interleave(groups, dim=1)
        q = query[qsl[r] : qsl[r + 1]].double()  # [q_len, H, D]
        scores = torch.einsum("qhd,khd->hqk", q, k) * scale
        q_pos = seq_len - q_len + torch.arange(q_len)
        scores.masked_fill_(pos[None, :] > q_pos[:, None], float("-inf"))
        out[qsl[r] : qsl[r + 1]] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)
    return out


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref).norm() / ref.norm()).item()


def _real_rows(b: dict) -> torch.Tensor:
    """Mask of tokens that belong to a request with a non-empty context."""
    mask = torch.zeros(b["query"].shape[0], dtype=torch.bool)
    qsl = b["query_start_loc"].tolist()
    for r, seq_len in enumerate(b["seq_lens"].tolist()):
        if seq_len > 0:
            mask[qsl[r] : qsl[r + 1]] = True
    return mask


def test_store_kv_cache_writes_mapped_slots_only() -> None:
    b = _make_batch([3, 9, 0], [3, 21, 0], block_size=16, pad_tokens=4, seed=1)
    k_before, v_before = b["k_cache"].clone(), b["v_cache"].clone()
    store_kv_cache(b["key"], b["value"], b["k_cache"], b["v_cache"], b["slot_mapping"])

    slots = b["slot_mapping"]
    real = slots >= 0
    assert (~real).sum() == 4  # the padded tokens
    flat_k = b["k_cache"].flatten(0, 1)
    flat_v = b["v_cache"].flatten(0, 1)
    assert torch.equal(flat_k[slots[real]], b["key"][real])
    assert torch.equal(flat_v[slots[real]], b["value"][real])
    untouched = torch.ones(flat_k.shape[0], dtype=torch.bool)
    untouched[slots[real]] = False
    assert torch.equal(flat_k[untouched], k_before.flatten(0, 1)[untouched])
    assert torch.equal(flat_v[untouched], v_before.flatten(0, 1)[untouched])


def test_store_kv_cache_in_bfloat16() -> None:
    """The store moves bits without arithmetic, so it is exact in bfloat16 under the
    interpreter too (the attention kernels are not: see the next test)."""
    b = _make_batch([5, 2], [5, 30], block_size=16, seed=2)
    bf16 = {name: b[name].to(torch.bfloat16) for name in ("key", "value", "k_cache", "v_cache")}
    store_kv_cache(bf16["key"], bf16["value"], bf16["k_cache"], bf16["v_cache"],
                   b["slot_mapping"])
    slots = b["slot_mapping"]
    assert torch.equal(bf16["k_cache"].flatten(0, 1)[slots], bf16["key"])
    assert torch.equal(bf16["v_cache"].flatten(0, 1)[slots], bf16["value"])


@triton.jit
def _dot_kernel(a_ptr, b_ptr, c_ptr, N: tl.constexpr):
    r = tl.arange(0, N)
    tile = r[:, None] * N + r[None, :]
    tl.store(c_ptr + tile, tl.dot(tl.load(a_ptr + tile), tl.load(b_ptr + tile)))


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="interpreter only")
def test_interpreter_bf16_dot_is_still_wrong() -> None:
    """Why the triton backend refuses bfloat16 under TRITON_INTERPRET=1
    (``attention.registry``): the interpreter keeps bfloat16 as uint16 and its ``tl.dot``
    multiplies those bit patterns (triton-lang/triton#11584). If this fails, a Triton
    upgrade fixed it: lift the refusal and run the attention tests above in bfloat16."""
    gen = torch.Generator().manual_seed(3)
    a, b = (torch.randn(16, 16, generator=gen).to(torch.bfloat16) for _ in range(2))
    c = torch.zeros(16, 16)
    _dot_kernel[(1,)](a, b, c, N=16)
    assert _rel_err(c, a.double() @ b.double()) > 1e3


@pytest.mark.parametrize(
    ("block_size", "num_heads", "block_m", "block_n"),
    [
        (16, 4, None, None),  # default tiles, GQA 2 query heads per KV head
        (16, 4, 16, 16),  # decode-sized tiles: a request spans many query tiles
        (8, 4, None, None),  # KV tile spans several pages
        (32, 6, None, 16),  # KV tile is part of a page; 3 query heads per KV head
    ],
)
def test_unified_attention_matches_reference(
    block_size: int, num_heads: int, block_m: int | None, block_n: int | None
) -> None:
    # Pure prefill, decode with context, chunked prefill over a prefix, a prefix-cache hit
    # (all cached but the last token), then a padded request and padded tokens.
    q_lens = [5, 1, 37, 16, 1, 0]
    seq_lens = [5, 40, 57, 49, 70, 0]
    b = _make_batch(
        q_lens, seq_lens, block_size=block_size, num_heads=num_heads, pad_tokens=3, seed=2
    )
    scale = HEAD_DIM**-0.5
    store_kv_cache(b["key"], b["value"], b["k_cache"], b["v_cache"], b["slot_mapping"])
    out = torch.full_like(b["query"], float("nan"))  # poison: every real row must be written
    unified_attention(
        b["query"],
        b["k_cache"],
        b["v_cache"],
        out,
        b["query_start_loc"],
        b["seq_lens"],
        b["block_table"],
        scale,
        len(q_lens),
        block_m=block_m,
        block_n=block_n,
    )
    ref = _reference(b, scale)
    real = _real_rows(b)
    assert real.sum() == sum(q_lens)
    assert torch.isfinite(out[real]).all()
    assert _rel_err(out[real], ref[real]) < 1e-3


@pytest.mark.parametrize("seed", range(4))
def test_unified_attention_random_batches(seed: int) -> None:
    # Many requests (exercises the tile -> request binary search), MHA to 4:1 GQA, all page
    # sizes, random tile sizes.
    gen = torch.Generator().manual_seed(100 + seed)

    def pick(options: list) -> object:
        return options[int(torch.randint(len(options), (1,), generator=gen))]

    num_reqs = int(torch.randint(1, 13, (1,), generator=gen))
    q_lens = torch.randint(1, 21, (num_reqs,), generator=gen)
    seq_lens = q_lens + torch.randint(0, 50, (num_reqs,), generator=gen)
    num_heads, num_kv_heads = pick([(2, 2), (4, 2), (8, 2)])
    b = _make_batch(
        q_lens.tolist(),
        seq_lens.tolist(),
        block_size=pick([8, 16, 32]),
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        pad_tokens=int(torch.randint(0, 5, (1,), generator=gen)),
        seed=seed,
    )
    scale = 0.3
    store_kv_cache(b["key"], b["value"], b["k_cache"], b["v_cache"], b["slot_mapping"])
    out = torch.full_like(b["query"], float("nan"))
    unified_attention(
        b["query"],
        b["k_cache"],
        b["v_cache"],
        out,
        b["query_start_loc"],
        b["seq_lens"],
        b["block_table"],
        scale,
        num_reqs,
        block_m=pick([None, 16, 32]),
        block_n=pick([None, 16, 32]),
    )
    real = slice(0, int(q_lens.sum()))
    assert torch.isfinite(out[real]).all()
    assert _rel_err(out[real], _reference(b, scale)[real]) < 1e-3


def test_unified_attention_padded_request_with_query_is_finite() -> None:
    # CUDA-graph padding may give a request a query token but no context (seq_len 0).
    b = _make_batch([4, 1, 1], [9, 0, 0], block_size=16, seed=3)
    store_kv_cache(b["key"], b["value"], b["k_cache"], b["v_cache"], b["slot_mapping"])
    out = torch.full_like(b["query"], float("nan"))
    scale = HEAD_DIM**-0.5
    unified_attention(
        b["query"],
        b["k_cache"],
        b["v_cache"],
        out,
        b["query_start_loc"],
        b["seq_lens"],
        b["block_table"],
        scale,
        3,
    )
    assert torch.isfinite(out).all()
    assert _rel_err(out[:4], _reference(b, scale)[:4]) < 1e-3


@pytest.mark.parametrize("num_splits", [1, 2, 4])
def test_decode_attention_matches_reference(num_splits: int) -> None:
    seq_lens = [1, 45, 100, 17, 64, 0]  # last one is a padded request
    b = _make_batch([1] * len(seq_lens), seq_lens, block_size=16, seed=4 + num_splits)
    store_kv_cache(b["key"], b["value"], b["k_cache"], b["v_cache"], b["slot_mapping"])
    # Persistent buffers larger than this batch needs, as the engine allocates them.
    workspace = decode_workspace(8, NUM_HEADS, HEAD_DIM, 4, torch.device("cpu"))
    for buf in workspace:
        buf.fill_(float("nan"))
    out = torch.full_like(b["query"], float("nan"))
    scale = HEAD_DIM**-0.5
    decode_attention(
        b["query"],
        b["k_cache"],
        b["v_cache"],
        out,
        b["seq_lens"],
        b["block_table"],
        scale,
        num_splits,
        workspace,
        block_n=16,
    )
    ref = _reference(b, scale)
    real = _real_rows(b)
    assert torch.isfinite(out).all()  # the padded request included
    assert _rel_err(out[real], ref[real]) < 1e-3


def test_decode_attention_odd_groups_small_pages_three_splits() -> None:
    # 3 query heads per KV head, 8-position pages, a split count that is not a power of two.
    seq_lens = [33, 7, 80, 2]
    b = _make_batch([1] * 4, seq_lens, block_size=8, num_heads=6, num_kv_heads=2, seed=9)
    store_kv_cache(b["key"], b["value"], b["k_cache"], b["v_cache"], b["slot_mapping"])
    workspace = decode_workspace(4, 6, HEAD_DIM, 3, torch.device("cpu"))
    out = torch.full_like(b["query"], float("nan"))
    decode_attention(
        b["query"],
        b["k_cache"],
        b["v_cache"],
        out,
        b["seq_lens"],
        b["block_table"],
        0.2,
        3,
        workspace,
    )
    assert _rel_err(out, _reference(b, 0.2)) < 1e-3


def test_choose_num_splits_worked_example() -> None:
    """Off-GPU the device counts as 8 SMs, so the target is 4 programs x 8 SMs = 32; a batch
    splits into the largest power of two <= 32 // (num_reqs * num_kv_heads), and not at all
    once twice its unsplit programs exceed 32."""
    cpu = torch.device("cpu")
    # 2 KV heads: 32 // 2n = 16, 8, 5, 4, 3, 2, 2, 2 for n = 1..8; n = 9: 36 > 32.
    assert [choose_num_splits(n, 2, cpu) for n in range(1, 11)] == [16, 8, 4, 4, 2, 2, 2, 2, 1, 1]
    # 8 KV heads: 32 // 8 = 4, 32 // 16 = 2; n = 3: 48 > 32.
    assert [choose_num_splits(n, 8, cpu) for n in range(1, 5)] == [4, 2, 1, 1]


@pytest.mark.parametrize(("max_reqs", "max_splits", "kv_heads", "rows"), [
    # Splits capped at 4 (from the example above, 2 KV heads): [4, 4, 4, 4, 2, 2, 2] for
    # n = 1..7, so n * splits = 4, 8, 12, 16, 10, 12, 14: 16 rows (not 7 * 4 = 28).
    (7, 4, 2, 16),
    (3, 4, 2, 12),  # 4, 8, 12: the largest batch decides
    (64, 4, 8, 4),  # [4, 2, 1, ...]: 1 * 4 = 2 * 2 = 4, then single-split batches
    (16, 64, 32, 1),  # 32 KV heads never split: one row (unused) keeps the buffers valid
])
def test_decode_workspace_rows_by_hand(max_reqs: int, max_splits: int, kv_heads: int,
                                       rows: int) -> None:
    acc, stat_max, stat_sum = decode_workspace(max_reqs, 6, HEAD_DIM, max_splits,
                                               torch.device("cpu"), num_kv_heads=kv_heads)
    assert acc.shape == (rows, 6, HEAD_DIM) and stat_max.shape == stat_sum.shape == (rows, 6)
    # Without the KV head count: every request may take every split.
    assert decode_workspace(max_reqs, 6, HEAD_DIM, max_splits, torch.device("cpu"))[0].shape[0] \
        == max_reqs * max_splits
