"""Draft-model speculation through the whole engine on CPU: greedy output identical to plain
decoding in NONE and emulated FULL graph modes with chunked prefill and preemption forced
(a different drafter, a perturbed copy of the target, and the target itself, whose every
draft must be accepted); seeded sampling keeps the target's distribution (chi-square against
HF float64); the drafter's cache shares the target's blocks; every block free at the end;
a vocabulary mismatch and a missing model are clear errors."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from test_spec_decode_engine import _all_free, _greedy, _llm, _UniformBatchOnly

from graph_testing import PersistentTorchBackend
from tachyon import LLM, SamplingParams
from tachyon.cudagraph.dispatcher import BatchDescriptor
from tachyon_testing import TINY_VOCAB, load_hf, write_tiny_model

K = 3


def _spec(model: str | Path, k: int = K) -> dict:
    return {"method": "draft_model", "model": str(model), "num_speculative_tokens": k}


@pytest.fixture(scope="module")
def perturbed_llama(tiny_llama: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The target with noise on every weight: a drafter that agrees often, not always."""
    path = tmp_path_factory.mktemp("perturbed") / "llama"
    shutil.copytree(tiny_llama, path)
    gen = torch.Generator().manual_seed(3)
    weights = load_file(path / "model.safetensors")
    noisy = {n: w + 0.08 * w.std() * torch.randn(w.shape, generator=gen)
             for n, w in weights.items()}
    save_file(noisy, path / "model.safetensors", metadata={"format": "pt"})
    return str(path)


def _prompts(seed: int, num: int = 7) -> list[list[int]]:
    """Random prompts, one longer than the token budget (chunked prefill)."""
    rng = random.Random(seed)
    return [[rng.randrange(TINY_VOCAB) for _ in range(45 if i == 0 else rng.randint(3, 20))]
            for i in range(num)]


# 40 blocks of 4 tokens for 7 requests of up to 65 tokens: preemption happens.
SMALL = dict(num_gpu_blocks_override=40, max_model_len=160)
MODES = [("NONE", None), ("FULL", PersistentTorchBackend),
         ("FULL_AND_PIECEWISE", _UniformBatchOnly)]


@pytest.mark.parametrize("mode, backend", MODES)
@pytest.mark.parametrize("drafter", ["qwen2", "perturbed"])
def test_greedy_identity_with_another_drafter(tiny_llama, tiny_models, perturbed_llama,
                                              monkeypatch, mode, backend, drafter):
    draft = perturbed_llama if drafter == "perturbed" else tiny_models["qwen2"]
    prompts = _prompts(seed=14)
    ref = _greedy(_llm(tiny_llama, monkeypatch, **SMALL), prompts)
    llm = _llm(tiny_llama, monkeypatch, mode, backend, _spec(draft), **SMALL)
    assert _greedy(llm, prompts) == ref
    stats = llm.engine.stats
    assert stats["preemptions"] > 0 and stats["spec_verifies"] > 0
    if drafter == "perturbed":  # agrees often, not always: both paths of the walk run
        assert 0.2 < stats["spec_acceptance_rate"] < 1
    _all_free(llm)
    if mode != "NONE":
        runner = llm.engine.executor.runner.graph_runner
        assert BatchDescriptor(4 * (K + 1), K + 1) in runner.full
        assert runner.check_contract


@pytest.mark.parametrize("mode, backend", MODES[:2])
def test_the_target_as_its_own_drafter_has_every_draft_accepted(tiny_llama, monkeypatch,
                                                                mode, backend):
    """The drafter's cache follows the target's through chunks, preemption and rollback:
    with the target as drafter any stale K/V would show as a rejected draft."""
    prompts = _prompts(seed=15)
    ref = _greedy(_llm(tiny_llama, monkeypatch, **SMALL), prompts, 21)
    llm = _llm(tiny_llama, monkeypatch, mode, backend, _spec(tiny_llama), **SMALL)
    assert _greedy(llm, prompts, 21) == ref
    stats = llm.engine.stats
    assert stats["preemptions"] > 0 and stats["spec_draft_tokens"] > 0
    assert stats["spec_acceptance_rate"] == 1.0
    _all_free(llm)


def test_mean_accepted_length_is_k_plus_one_far_from_the_stop(tiny_llama, monkeypatch):
    """Room for every draft (budget, blocks, max_model_len): after its prefill token each
    request verifies k drafts per step, all accepted, up to max_tokens = 1 + 4 (k + 1)."""
    prompts = _prompts(seed=16, num=6)[1:]
    llm = _llm(tiny_llama, monkeypatch, spec=_spec(tiny_llama), max_num_batched_tokens=128)
    ref = _greedy(_llm(tiny_llama, monkeypatch, max_num_batched_tokens=128), prompts, 17)
    assert _greedy(llm, prompts, 17) == ref
    stats = llm.engine.stats
    assert stats["spec_verifies"] == 4 * len(prompts)
    assert stats["spec_acceptance_rate"] == 1.0
    assert stats["spec_mean_accepted_length"] == K + 1
    _all_free(llm)


def test_drafter_cache_has_the_targets_blocks(tiny_llama, tiny_models, monkeypatch):
    """Same block count and size, the drafter's own head shapes; the CPU budget pays for
    both caches."""
    plain = _llm(tiny_llama, monkeypatch, kv_cache_memory="1MiB").engine.executor.runner
    runner = _llm(tiny_llama, monkeypatch, spec=_spec(tiny_models["qwen2"]),
                  kv_cache_memory="1MiB").engine.executor.runner
    drafter = runner.drafter
    k_cache = drafter.kv_caches[0][0]
    # tiny qwen2: 3 layers, 2 KV heads of 16 dims; block size 4.
    assert len(drafter.kv_caches) == 3 and k_cache.shape == (runner.num_blocks, 4, 2, 16)
    assert runner.kv_bytes_per_block == 2 * plain.kv_bytes_per_block * 5 // 4
    assert runner.num_blocks == 2**20 // runner.kv_bytes_per_block
    assert runner.num_blocks < plain.num_blocks


# chi-square critical values at p = 0.001 for 1 ... 7 degrees of freedom.
CHI2_P001 = [10.83, 13.82, 16.27, 18.47, 20.52, 22.46, 24.32]


def _second_token_probs(path: Path, prompt: list[int], temperature: float) -> np.ndarray:
    """HF float64: the marginal of the second sampled token, sum_t p(t) p(. | t)."""
    hf = load_hf(path)
    with torch.no_grad():
        first = torch.softmax(hf(torch.tensor([prompt])).logits[0, -1] / temperature, -1)
        ids = torch.tensor([[*prompt, t] for t in range(len(first))])
        second = torch.softmax(hf(ids).logits[:, -1] / temperature, -1)
    return (first @ second).numpy()


def test_sampling_keeps_the_target_distribution(tmp_path, monkeypatch):
    """Vocabulary 8: the second token of each request comes out of a verify step whose
    draft is a different random model's; its counts match the target's marginal."""
    target = write_tiny_model(tmp_path / "t", "llama", seed=21, vocab_size=8)
    draft = write_tiny_model(tmp_path / "d", "llama", seed=22, vocab_size=8)
    prompt, temperature, num = [3, 5, 1, 6], 1.5, 1500
    llm = _llm(str(target), monkeypatch, spec=_spec(draft, 1), max_num_seqs=64,
               max_num_batched_tokens=256)
    sp = SamplingParams(temperature=temperature, max_tokens=3, ignore_eos=True)
    outs = llm.generate([prompt] * num, sp, use_tqdm=False)
    stats = llm.engine.stats
    assert stats["spec_verifies"] == num and 0 < stats["spec_acceptance_rate"] < 1
    counts = np.bincount([o.outputs[0].token_ids[1] for o in outs], minlength=8)
    expected = num * _second_token_probs(target, prompt, temperature)
    # Cells expected fewer than 5 times are pooled (the chi-square approximation needs it).
    small = expected < 5
    obs = np.append(counts[~small], counts[small].sum())
    exp = np.append(expected[~small], expected[small].sum())
    if not small.any():
        obs, exp = obs[:-1], exp[:-1]
    chi2 = float(((obs - exp) ** 2 / exp).sum())
    assert chi2 < CHI2_P001[len(obs) - 2], (counts, expected)
    _all_free(llm)


def test_vocabulary_mismatch_and_missing_model(tiny_llama, tmp_path):
    other = write_tiny_model(tmp_path, "llama", seed=5, vocab_size=64)
    with pytest.raises(ValueError, match=r"draft model's vocabulary \(64 tokens\) differs "
                                         rf"from the target's \({TINY_VOCAB}\)"):
        LLM(tiny_llama, device="cpu", speculative_config=_spec(other))
    with pytest.raises(ValueError, match="method 'draft_model' needs 'model'"):
        LLM(tiny_llama, device="cpu",
            speculative_config={"method": "draft_model", "num_speculative_tokens": 2})
    with pytest.raises(ValueError, match="unknown model"):
        LLM(tiny_llama, device="cpu", speculative_config=_spec(tmp_path / "nowhere"))
