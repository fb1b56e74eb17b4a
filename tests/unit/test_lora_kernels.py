"""LoRA shrink/expand kernels (Triton under TRITON_INTERPRET=1, and the torch reference)
against a float64 loop over tokens.

Ragged on purpose: a token count that is not a multiple of the token block, slots mixed
within one block, tokens without an adapter (slot -1), ranks below the slot's width (the
padding must stay zero), and output views with the strides of one packed slice.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import random

import pytest
import torch

from tachyon.lora.kernels import Expand, Shrink
from tachyon.lora.kernels.reference import expand_ref, shrink_ref

NUM_SLOTS, MAX_RANK, HIDDEN, NUM_SLICES = 3, 16, 72, 2
SLICE_SIZES = (40, 24)  # output features of the two packed matrices (off the 64-wide tile)
# float32 kernels against float64: sums of ~100-600 products of O(1) values.
TOL = 1e-4


def _case(rng: random.Random, num_tokens: int,
          hidden: int = HIDDEN) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(rng.randrange(1 << 31))
    x = torch.randn(num_tokens, hidden, generator=gen)
    a = torch.zeros(NUM_SLOTS, NUM_SLICES * MAX_RANK, hidden)
    b = torch.zeros(NUM_SLOTS, sum(SLICE_SIZES), MAX_RANK)
    for slot, rank in enumerate((MAX_RANK, 5, 8)):  # zero-padded below the slot's width
        for i in range(NUM_SLICES):
            a[slot, i * MAX_RANK:i * MAX_RANK + rank] = torch.randn(rank, hidden, generator=gen)
        b[slot, :, :rank] = torch.randn(sum(SLICE_SIZES), rank, generator=gen)
    slots = torch.tensor([rng.choice([-1, 0, 1, 2]) for _ in range(num_tokens)])
    y = torch.randn(num_tokens, sum(SLICE_SIZES), generator=gen)
    return x, a, b, slots, y


def _expected(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, slots: torch.Tensor,
              y: torch.Tensor) -> torch.Tensor:
    """Token by token in float64: y + B_i (A_i x) for each packed slice i of its slot."""
    out = y.double().clone()
    offsets = [0, SLICE_SIZES[0]]
    for t, slot in enumerate(slots.tolist()):
        if slot < 0:
            continue
        for i, (off, size) in enumerate(zip(offsets, SLICE_SIZES, strict=True)):
            h = a[slot, i * MAX_RANK:(i + 1) * MAX_RANK].double() @ x[t].double()
            out[t, off:off + size] += b[slot, off:off + size].double() @ h
    return out


def _apply(shrink: Shrink, expand: Expand, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
           slots: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Shrink once over both slices, expand each into its own view of a copy of ``y``."""
    y = y.clone()
    h = shrink(x, a, slots)
    for i, off in enumerate((0, SLICE_SIZES[0])):
        size = SLICE_SIZES[i]
        expand(h[..., i * MAX_RANK:(i + 1) * MAX_RANK], b[:, off:off + size], slots,
               y[:, off:off + size])
    return y


# 600: three split-K partials of the shrink, the last one ragged (K_SPLIT = 256).
@pytest.mark.parametrize(("num_tokens", "hidden"), [(1, HIDDEN), (37, HIDDEN), (37, 600)])
def test_triton_shrink_expand_match_float64(num_tokens: int, hidden: int,
                                            rng: random.Random) -> None:
    from tachyon.lora.kernels.triton_shrink_expand import K_SPLIT, lora_expand, lora_shrink

    x, a, b, slots, y = _case(rng, num_tokens, hidden)
    assert lora_shrink(x, a, slots).shape[0] == -(-hidden // K_SPLIT)
    got = _apply(lora_shrink, lora_expand, x, a, b, slots, y)
    want = _expected(x, a, b, slots, y)
    torch.testing.assert_close(got.double(), want, rtol=TOL, atol=TOL)
    no_adapter = slots < 0
    assert torch.equal(got[no_adapter], y[no_adapter]), "a token without adapter changed"


def test_reference_shrink_expand_match_float64(rng: random.Random) -> None:
    x, a, b, slots, y = _case(rng, 37)
    got = _apply(shrink_ref, expand_ref, x, a, b, slots, y)
    torch.testing.assert_close(got.double(), _expected(x, a, b, slots, y), rtol=TOL, atol=TOL)
