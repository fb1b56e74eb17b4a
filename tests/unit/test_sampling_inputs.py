"""The runner's per-step sampling inputs kept between steps (issue 12: host work on the hot
path): ``PenaltyRows`` (token histories written only where a row changed) and
``SamplingBuffers`` (parameters written only where a row's params changed) must hand the
sampler exactly what a from-scratch build gives, whatever the batch does between steps:
requests join, finish, move rows, grow, are truncated (preemption, rejected drafts), have a
placeholder filled, or outgrow the buffers."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from tachyon.sampling_params import SamplingParams
from tachyon.worker.input_buffers import SamplingBuffers
from tachyon.worker.request_state import RequestState
from tachyon.worker.sampling_inputs import PenaltyRows, padded_token_ids, sampling_metadata

VOCAB = 50
CPU = torch.device("cpu")


def _state(rng: random.Random, prompt_len: int) -> RequestState:
    ids = [rng.randrange(VOCAB) for _ in range(prompt_len)]
    return RequestState(prompt_len, SamplingParams(repetition_penalty=1.5), ids, [], None)


def _reference(states: list[RequestState]) -> tuple[torch.Tensor, torch.Tensor]:
    """What the runner built every step before the rows were kept (the old code path)."""
    return (padded_token_ids([st.token_ids[:st.prompt_len] for st in states], VOCAB, CPU),
            padded_token_ids([st.token_ids[st.prompt_len:] for st in states], VOCAB, CPU))


@pytest.mark.parametrize("pack", [False, True], ids=["views", "packed"])
def test_penalty_rows_match_a_full_rebuild_over_a_churning_batch(pack: bool) -> None:
    rng = random.Random(0)
    rows = PenaltyRows(8, VOCAB, CPU, pack=pack)
    live = [_state(rng, rng.randrange(1, 12)) for _ in range(5)]
    for step in range(300):
        event = rng.random()
        if event < 0.1 and len(live) > 1:  # a request finishes: the rows after it move up
            live.pop(rng.randrange(len(live)))
        elif event < 0.2 and len(live) < 8:  # one joins, anywhere in the batch
            live.insert(rng.randrange(len(live) + 1), _state(rng, rng.randrange(1, 40)))
        elif event < 0.25:  # preemption or rejected drafts: truncated, then regrown
            st = rng.choice(live)
            cut = rng.randrange(len(st.token_ids) + 1)
            del st.token_ids[cut:]
            short = max(0, st.prompt_len - cut)  # the prompt comes back whole
            st.token_ids += [rng.randrange(VOCAB) for _ in range(short + rng.randrange(3))]
            st.version += 1
        elif event < 0.3:  # a placeholder filled in place
            st = rng.choice(live)
            if len(st.token_ids) > st.prompt_len:
                st.token_ids[-1] = rng.randrange(VOCAB)
                st.version += 1
        for st in live:  # decode (sometimes several tokens: a verify step's drafts)
            if len(st.token_ids) >= st.prompt_len:
                st.token_ids += [rng.randrange(VOCAB) for _ in range(rng.choice([1, 1, 3]))]
        batch = [st for st in live if len(st.token_ids) >= st.prompt_len]
        if not batch:
            continue
        got = rows.stage(batch, CPU)
        for g, want in zip(got, _reference(batch), strict=True):
            assert g.shape == want.shape and torch.equal(g, want), f"step {step}"
    # Histories grew far past the first capacity (16): the buffers were regrown.
    assert rows.output.shape[1] >= 256


def test_penalty_rows_repeat_a_verifying_request_over_its_rows() -> None:
    rng = random.Random(1)
    st = _state(rng, 5)
    st.token_ids += [3, 4, 5]
    other = _state(rng, 2)
    rows = PenaltyRows(4, VOCAB, CPU)
    for _ in range(3):
        batch = [st, st, st, other]
        got = rows.stage(batch, CPU)
        assert all(torch.equal(g, w) for g, w in zip(got, _reference(batch), strict=True))
        st.token_ids.append(7)
        other.token_ids += [8, 9]


def _params(rng: random.Random) -> SamplingParams:
    return SamplingParams(
        temperature=rng.choice([0.0, 0.7, 1.0]), top_p=rng.choice([1.0, 0.9]),
        top_k=rng.choice([0, 5]), min_p=rng.choice([0.0, 0.1]),
        presence_penalty=rng.choice([0.0, 0.5]), repetition_penalty=rng.choice([1.0, 1.2]),
        logprobs=rng.choice([None, 0, 3]))


def test_sampling_metadata_matches_the_params_of_each_row_as_rows_change() -> None:
    rng = random.Random(2)
    sb = SamplingBuffers(6, CPU)
    pen = PenaltyRows(6, VOCAB, CPU)
    states = [RequestState(1, _params(rng), [1, 2], [], None) for _ in range(6)]
    for _ in range(200):
        if rng.random() < 0.3:  # a new request takes a row
            states[rng.randrange(6)] = RequestState(1, _params(rng), [1, 2], [], None)
        batch = rng.sample(states, rng.randrange(1, 7))
        meta = sampling_metadata(batch, sb, pen, CPU)
        ps = [st.params for st in batch]
        k = len(ps)
        assert torch.equal(meta.temperature, torch.tensor([p.temperature for p in ps]))
        assert meta.all_greedy == all(p.temperature == 0.0 for p in ps)
        assert (meta.top_p is None) == all(p.top_p >= 1.0 for p in ps)
        assert (meta.min_p is None) == all(p.min_p <= 0.0 for p in ps)
        if meta.top_k is not None:
            assert meta.top_k.tolist() == [p.top_k for p in ps]
        assert (meta.top_k is None) == all(p.top_k == 0 for p in ps)
        pen_on = [p.presence_penalty != 0 or p.repetition_penalty != 1.0 for p in ps]
        assert (meta.repetition_penalty is None) == (not any(pen_on))
        if meta.repetition_penalty is not None:
            assert meta.repetition_penalty.tolist() == pytest.approx(
                [p.repetition_penalty for p in ps])
            assert meta.presence_penalty.tolist() == [p.presence_penalty for p in ps]
            assert meta.prompt_token_ids.shape == (k, 1)
        wants = [p.logprobs for p in ps if p.logprobs is not None]
        assert meta.max_num_logprobs == (max(wants) if wants else None)
        top_ks = [p.top_k for p in ps]
        assert meta.max_top_k == (max(top_ks) if any(top_ks) and meta.top_p is None else None)
        assert np.all(sb.np_f[0, :k] == np.float32([p.temperature for p in ps]))
