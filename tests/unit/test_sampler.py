"""Unit tests for tachyon.layers.sampler (CPU; one CUDA-only test skips without a GPU)."""

from __future__ import annotations

import math

import pytest
import torch

from tachyon.layers.sampler import (
    Sampler,
    SamplingMetadata,
    apply_penalties,
    apply_top_k_top_p_min_p,
)

NEG_INF = float("-inf")

# A 6-token distribution that makes the truncation rules easy to work by hand.
# Sorted descending: tok1 .35, tok3 .25, tok5 .20, tok0 .10, tok4 .06, tok2 .04.
HAND_PROBS = [0.10, 0.35, 0.04, 0.25, 0.06, 0.20]


def make_meta(batch: int, device: str = "cpu", **overrides) -> SamplingMetadata:
    """Metadata with everything disabled (temperature 1, not greedy) plus overrides."""
    fields = dict(
        temperature=torch.ones(batch, device=device),
        all_greedy=False,
        top_k=None,
        top_p=None,
        min_p=None,
        generators={},
        presence_penalty=None,
        frequency_penalty=None,
        repetition_penalty=None,
        prompt_token_ids=None,
        output_token_ids=None,
        max_num_logprobs=None,
    )
    fields.update(overrides)
    return SamplingMetadata(**fields)


def padded(rows: list[list[int]], pad: int) -> torch.Tensor:
    width = max(1, max(len(r) for r in rows))
    return torch.tensor([r + [pad] * (width - len(r)) for r in rows], dtype=torch.long)


def kept(logits: torch.Tensor) -> list[set[int]]:
    return [set(torch.isfinite(row).nonzero().flatten().tolist()) for row in logits]


# --------------------------------------------------------------------------- penalties

PEN_LOGITS = [2.0, -1.0, 0.5, 3.0, -2.0, 0.0]
PEN_PROMPT = [0, 1]  # tokens 0 and 1 only in the prompt
PEN_OUTPUT = [3, 3, 4]  # token 3 twice, token 4 once


@pytest.mark.parametrize(
    "rep, freq, pres, expected",
    [
        # repetition 2 over prompt+output {0,1,3,4}: positive /2, negative *2.
        (2.0, None, None, [1.0, -2.0, 0.5, 1.5, -4.0, 0.0]),
        # frequency 0.5 over output counts {3: 2, 4: 1}; prompt tokens untouched.
        (None, 0.5, None, [2.0, -1.0, 0.5, 2.0, -2.5, 0.0]),
        # presence 0.25 once per distinct output token.
        (None, None, 0.25, [2.0, -1.0, 0.5, 2.75, -2.25, 0.0]),
        # all three: repetition first, then frequency, then presence.
        (2.0, 0.5, 0.25, [1.0, -2.0, 0.5, 0.25, -4.75, 0.0]),
        # negative frequency/presence reward repeats.
        (None, -1.0, -0.5, [2.0, -1.0, 0.5, 5.5, -0.5, 0.0]),
    ],
)
def test_penalties_hand_worked(rep, freq, pres, expected):
    vocab = len(PEN_LOGITS)
    logits = torch.tensor([PEN_LOGITS])
    original = logits.clone()

    def opt(x):
        return None if x is None else torch.tensor([x])

    meta = make_meta(
        1,
        repetition_penalty=opt(rep),
        frequency_penalty=opt(freq),
        presence_penalty=opt(pres),
        prompt_token_ids=padded([[*PEN_PROMPT, vocab]], vocab),  # explicit extra padding
        output_token_ids=padded([[*PEN_OUTPUT, vocab, vocab]], vocab),
    )
    out = apply_penalties(logits, meta)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.tensor([expected]), rtol=0, atol=0)
    assert torch.equal(logits, original), "input logits must not be modified"


def test_penalties_none_is_identity_and_bf16_upcasts():
    logits = torch.randn(3, 11).to(torch.bfloat16)
    out = apply_penalties(logits, make_meta(3))
    assert out.dtype == torch.float32
    assert torch.equal(out, logits.float())


def ref_penalise(row, prompt, output, rep, freq, pres):
    """Plain-Python float64 reference of the penalty semantics."""
    row = [float(x) for x in row]
    for t in set(prompt) | set(output):
        row[t] = row[t] / rep if row[t] > 0 else row[t] * rep
    for t in set(output):
        row[t] -= freq * output.count(t) + pres
    return row


def random_penalty_batch(batch: int, vocab: int):
    """Random logits, ragged token lists and penalties; row 0 is neutral."""
    logits = torch.randn(batch, vocab) * 3
    prompts = [torch.randint(0, vocab, (int(n),)).tolist() for n in torch.randint(0, 12, (batch,))]
    outputs = [torch.randint(0, vocab, (int(n),)).tolist() for n in torch.randint(0, 12, (batch,))]
    rep = torch.rand(batch) * 1.5 + 0.5
    freq = torch.rand(batch) * 2 - 1
    pres = torch.rand(batch) * 2 - 1
    rep[0], freq[0], pres[0] = 1.0, 0.0, 0.0
    meta = make_meta(
        batch,
        repetition_penalty=rep,
        frequency_penalty=freq,
        presence_penalty=pres,
        prompt_token_ids=padded(prompts, vocab),
        output_token_ids=padded(outputs, vocab),
    )
    ref = [
        ref_penalise(
            logits[i].tolist(), prompts[i], outputs[i], *map(float, (rep[i], freq[i], pres[i]))
        )
        for i in range(batch)
    ]
    return logits, meta, torch.tensor(ref, dtype=torch.float64)


def test_penalties_match_reference_on_random_batches():
    logits, meta, ref = random_penalty_batch(batch=16, vocab=37)
    out = apply_penalties(logits, meta)
    torch.testing.assert_close(out.double(), ref, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(out[0], logits[0], rtol=0, atol=0)  # neutral row unchanged


# --------------------------------------------------------------------------- truncation


def hand_logits(rows: int = 1) -> torch.Tensor:
    return torch.tensor(HAND_PROBS).log().expand(rows, -1).clone()


@pytest.mark.parametrize(
    "top_k, top_p, min_p, expected",
    [
        (2, None, None, {1, 3}),
        (None, 0.7, None, {1, 3, 5}),  # .35 + .25 = .60 < .7, adding .20 reaches .80
        (None, 0.35, None, {1}),  # the first token's mass already reaches p
        (None, None, 0.25, {0, 1, 3, 5}),  # cutoff .25 * .35 = .0875
        (None, None, 0.5, {1, 3, 5}),  # cutoff .175
        (None, None, 1.0, {1}),
        # top-p sees the renormalised top-3: .4375, .3125, .25 -> .4375+.3125 = .75 >= .7
        (3, 0.7, None, {1, 3}),
        # min_p .5 leaves {1,3,5}; renormalised top-p .7 as above
        (None, 0.7, 0.5, {1, 3}),
        (4, 0.99, 0.25, {0, 1, 3, 5}),
        (1, 0.9, 0.0, {1}),
        # disabled values
        (0, None, None, set(range(6))),
        (6, None, None, set(range(6))),
        (100, 1.0, 0.0, set(range(6))),
        (None, 1.0, None, set(range(6))),
        (None, None, 0.0, set(range(6))),
    ],
)
def test_truncation_hand_worked(top_k, top_p, min_p, expected):
    logits = hand_logits()
    original = logits.clone()

    def opt(x, dtype):
        return None if x is None else torch.tensor([x], dtype=dtype)

    args = (opt(top_k, torch.int32), opt(top_p, torch.float32), opt(min_p, torch.float32))
    out = apply_top_k_top_p_min_p(logits, *args)
    assert kept(out) == [expected]
    # survivors keep their values
    finite = torch.isfinite(out)
    assert torch.equal(out[finite], logits[finite])
    assert torch.equal(logits, original), "input logits must not be modified"
    if top_k is not None and top_p is None:
        fast = apply_top_k_top_p_min_p(logits, *args, max_top_k=max(top_k, 1))
        assert torch.equal(fast, out)


def test_truncation_per_row_parameters():
    logits = hand_logits(4)
    top_k = torch.tensor([2, 0, 3, 6], dtype=torch.int32)
    top_p = torch.tensor([1.0, 0.7, 0.7, 0.35])
    min_p = torch.tensor([0.0, 0.25, 0.0, 0.0])
    out = apply_top_k_top_p_min_p(logits, top_k, top_p, min_p)
    assert kept(out) == [{1, 3}, {1, 3, 5}, {1, 3}, {1}]


def test_top_k_keeps_ties_with_the_boundary():
    logits = torch.tensor([[1.0, 3.0, 3.0, 3.0, 0.0]])
    k = torch.tensor([2], dtype=torch.int32)
    assert kept(apply_top_k_top_p_min_p(logits, k, None, None)) == [{1, 2, 3}]
    assert kept(apply_top_k_top_p_min_p(logits, k, None, None, max_top_k=2)) == [{1, 2, 3}]


def ref_keep(row: list[float], k: int, p: float, min_p: float) -> tuple[set[int], float]:
    """Float64 reference: survivors of min-p, top-k, top-p; and the margin to a boundary."""
    vocab = len(row)
    pmax = max(math.exp(x) for x in row)
    margin = math.inf
    alive = []
    for i, x in enumerate(row):
        ratio = math.exp(x) / pmax
        margin = min(margin, abs(ratio - min_p)) if min_p > 0 else margin
        if ratio >= min_p:
            alive.append(i)
    order = sorted(alive, key=lambda i: -row[i])
    if 0 < k < vocab:
        order = order[:k]
    if p < 1.0:
        z = sum(math.exp(row[i]) for i in order)
        mass, cut = 0.0, len(order)
        for j, i in enumerate(order):
            margin = min(margin, abs(mass - p))
            if mass >= p:
                cut = min(cut, j)
            mass += math.exp(row[i]) / z
        order = order[:cut]
    return set(order), margin


@pytest.mark.parametrize("use_k", [False, True])
@pytest.mark.parametrize("use_p", [False, True])
@pytest.mark.parametrize("use_min_p", [False, True])
def test_truncation_matches_reference_on_random_rows(use_k, use_p, use_min_p):
    batch, vocab = 128, 30
    logits = torch.randn(batch, vocab) * 2
    top_k = torch.randint(0, vocab + 4, (batch,), dtype=torch.int32)
    top_p = torch.where(torch.rand(batch) < 0.2, 1.0, torch.rand(batch) * 0.95 + 0.05)
    min_p = torch.where(torch.rand(batch) < 0.2, 0.0, torch.rand(batch) * 0.5)
    args = (top_k if use_k else None, top_p if use_p else None, min_p if use_min_p else None)
    out = apply_top_k_top_p_min_p(logits, *args)
    got = kept(out)
    checked = 0
    for i in range(batch):
        expected, margin = ref_keep(
            logits[i].double().tolist(),
            int(top_k[i]) if use_k else 0,
            float(top_p[i]) if use_p else 1.0,
            float(min_p[i]) if use_min_p else 0.0,
        )
        if margin < 1e-4:  # float32 vs float64 may legitimately disagree at a boundary
            continue
        checked += 1
        assert got[i] == expected, f"row {i}"
    assert checked > batch // 2
    if use_k and not use_p:
        max_k = int(torch.where((top_k > 0) & (top_k < vocab), top_k, 1).max())
        fast = apply_top_k_top_p_min_p(logits, *args, max_top_k=max_k)
        assert torch.equal(fast, out)


# --------------------------------------------------------------------------- sampling


def test_greedy_rows_equal_argmax_of_penalised_logits():
    batch, vocab = 12, 50
    logits, meta, ref = random_penalty_batch(batch, vocab)
    temperature = torch.where(torch.arange(batch) % 2 == 0, 0.0, 1.0)
    meta.temperature = temperature
    meta.top_k = torch.full((batch,), 3, dtype=torch.int32)
    out = Sampler()(logits, meta).sampled_token_ids
    assert out.dtype == torch.int64 and out.shape == (batch,)
    greedy_rows = temperature == 0
    assert torch.equal(out[greedy_rows], ref.argmax(dim=-1)[greedy_rows])

    meta.all_greedy = True
    meta.temperature = torch.zeros(batch)
    assert torch.equal(Sampler()(logits, meta).sampled_token_ids, ref.argmax(dim=-1))


def test_temperature_sampling_distribution():
    n, temperature = 20_000, 0.7
    logits = torch.rand(5) * 2  # keeps every p >= ~1.4%, so counts are far from 0
    meta = make_meta(n, temperature=torch.full((n,), temperature))
    out = Sampler()(logits.expand(n, -1), meta).sampled_token_ids
    assert_matches_distribution(out, torch.softmax(logits.double() / temperature, dim=-1), n)


def test_truncated_sampling_distribution():
    n = 20_000
    base = torch.tensor(HAND_PROBS, dtype=torch.float64)
    # (top_k, top_p, min_p) per block of n rows; survivors as in the hand-worked cases.
    settings = [(3, 1.0, 0.0, {1, 3, 5}), (0, 0.7, 0.0, {1, 3, 5}), (0, 1.0, 0.25, {0, 1, 3, 5})]
    meta = make_meta(
        n * len(settings),
        top_k=torch.tensor([s[0] for s in settings], dtype=torch.int32).repeat_interleave(n),
        top_p=torch.tensor([s[1] for s in settings]).repeat_interleave(n),
        min_p=torch.tensor([s[2] for s in settings]).repeat_interleave(n),
    )
    out = Sampler()(hand_logits(n * len(settings)), meta).sampled_token_ids
    for b, (*_, survivors) in enumerate(settings):
        mask = torch.tensor([i in survivors for i in range(6)], dtype=torch.float64)
        expected = base * mask / (base * mask).sum()
        assert_matches_distribution(out[b * n : (b + 1) * n], expected, n)


def assert_matches_distribution(samples: torch.Tensor, probs: torch.Tensor, n: int):
    """Every count within 5 binomial sigmas; impossible tokens never drawn."""
    counts = torch.bincount(samples, minlength=len(probs)).double()
    assert counts.sum() == n
    for c, p in zip(counts.tolist(), probs.tolist(), strict=True):
        if p == 0:
            assert c == 0
            continue
        sigma = math.sqrt(n * p * (1 - p))
        assert abs(c - n * p) < 5 * sigma, f"count {c} vs expected {n * p:.1f} (probs {probs})"


def run_seeded(target_rows: torch.Tensor, batch: int, pos: int, seed: int, extra: bool) -> list:
    """Sample the target row at position `pos` of a batch of random other rows, per step."""
    gen = torch.Generator().manual_seed(seed)
    other_gen = torch.Generator().manual_seed(seed + 12345)
    tokens = []
    for target in target_rows:
        logits = torch.randn(batch, target.shape[0])
        logits[pos] = target
        generators = {pos: gen}
        if extra:  # another seeded row and other sampling settings in the batch
            generators[(pos + 1) % batch] = other_gen
        top_k = torch.randint(0, 5, (batch,), dtype=torch.int32) if extra else None
        meta = make_meta(batch, generators=generators, top_k=top_k)
        if top_k is not None:
            top_k[pos] = 0
        tokens.append(int(Sampler()(logits, meta).sampled_token_ids[pos]))
    return tokens


def test_seeded_rows_reproducible_and_independent_of_batch():
    vocab, steps = 1000, 8
    targets = torch.randn(steps, vocab) * 0.1  # near-uniform: different noise, different token
    alone = run_seeded(targets, batch=1, pos=0, seed=7, extra=False)
    assert run_seeded(targets, batch=1, pos=0, seed=7, extra=False) == alone
    assert run_seeded(targets, batch=9, pos=4, seed=7, extra=False) == alone
    assert run_seeded(targets, batch=5, pos=2, seed=7, extra=True) == alone
    assert run_seeded(targets, batch=5, pos=2, seed=8, extra=True) != alone


# --------------------------------------------------------------------------- logprobs


@pytest.mark.parametrize("num_logprobs", [0, 3])
def test_logprobs_and_ranks(num_logprobs):
    batch, vocab = 10, 40
    logits, meta, ref = random_penalty_batch(batch, vocab)
    meta.temperature = torch.rand(batch) + 0.5
    meta.temperature[:3] = 0.0
    meta.max_num_logprobs = num_logprobs
    out = Sampler()(logits, meta)
    ref_lp = torch.log_softmax(ref, dim=-1)  # float64, penalised, untempered

    assert out.logprob_token_ids.shape == (batch, num_logprobs + 1)
    assert out.logprobs.dtype == torch.float32
    assert torch.equal(out.logprob_token_ids[:, 0], out.sampled_token_ids)
    gathered = ref_lp.gather(1, out.logprob_token_ids)
    torch.testing.assert_close(out.logprobs.double(), gathered, rtol=0, atol=1e-5)
    if num_logprobs:
        # robust to near-ties: the values at the returned ids are the top-k values
        top = ref_lp.topk(num_logprobs, dim=-1).values
        torch.testing.assert_close(gathered[:, 1:], top, rtol=0, atol=1e-5)

    tok_lp = ref_lp.gather(1, out.sampled_token_ids.unsqueeze(1))
    lo = (ref_lp > tok_lp + 1e-4).sum(-1) + 1
    hi = (ref_lp > tok_lp - 1e-4).sum(-1)  # tokens within 1e-4 counted as ties either way
    ranks = out.sampled_token_ranks
    assert ranks.dtype == torch.int64
    assert torch.all((lo <= ranks) & (ranks <= torch.maximum(hi, lo)))
    assert torch.all(ranks[:3] == 1)  # greedy rows sample the best token


def test_logprobs_ignore_temperature_and_truncation():
    logits = hand_logits(2)
    meta = make_meta(
        2,
        temperature=torch.tensor([0.3, 2.0]),
        top_k=torch.tensor([1, 2], dtype=torch.int32),
        max_num_logprobs=10,  # more than the vocabulary: clamped to 6
    )
    out = Sampler()(logits, meta)
    assert out.logprobs.shape == (2, 7)
    expected = torch.tensor(HAND_PROBS, dtype=torch.float64).log()
    torch.testing.assert_close(
        out.logprobs[:, 1:].double(),
        expected.sort(descending=True).values.expand(2, -1),
        rtol=0,
        atol=1e-6,
    )
    assert out.sampled_token_ids[0] == 1
    assert set(out.sampled_token_ids.tolist()) <= {1, 3}


def test_no_logprobs_requested():
    out = Sampler()(torch.randn(3, 7), make_meta(3))
    assert out.logprobs is None and out.logprob_token_ids is None
    assert out.sampled_token_ranks is None


# --------------------------------------------------------------------------- CUDA


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_no_host_sync_and_graph_capture():
    dev, batch, vocab = "cuda", 8, 1000
    logits, meta, _ = random_penalty_batch(batch, vocab)
    meta = make_meta(
        batch,
        device=dev,
        temperature=torch.tensor([0.0, 0.5, 1.0, 1.5] * 2, device=dev),
        top_k=torch.tensor([0, 5, 50, 0] * 2, dtype=torch.int32, device=dev),
        top_p=torch.tensor([1.0, 0.9, 0.5, 0.8] * 2, device=dev),
        min_p=torch.tensor([0.0, 0.1, 0.0, 0.05] * 2, device=dev),
        generators={1: torch.Generator(device=dev).manual_seed(1)},
        repetition_penalty=meta.repetition_penalty.to(dev),
        frequency_penalty=meta.frequency_penalty.to(dev),
        presence_penalty=meta.presence_penalty.to(dev),
        prompt_token_ids=meta.prompt_token_ids.to(dev),
        output_token_ids=meta.output_token_ids.to(dev),
        max_num_logprobs=5,
    )
    logits = logits.to(dev)
    sampler = Sampler()
    torch.cuda.set_sync_debug_mode("error")
    try:
        sampler(logits, meta)
        sampler(logits, make_meta(batch, device=dev, top_k=meta.top_k, max_top_k=50))
    finally:
        torch.cuda.set_sync_debug_mode("default")

    meta.generators = {}
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        sampler(logits, meta)  # warm up outside the graph
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = sampler(logits, meta)
    draws = []
    for _ in range(20):
        graph.replay()
        draws.append(out.sampled_token_ids.clone())
    draws = torch.stack(draws)
    assert torch.all(draws[:, 0] == draws[0, 0])  # greedy row fixed
    assert len(set(draws[:, 2].tolist())) > 1  # fresh noise on every replay
