"""``update_weights``, ``sleep`` and ``wake_up`` against HF transformers.

The reference is HF transformers in float64 holding a perturbed copy of the tiny checkpoint
(every tensor moved by a quarter of its spread, q/k/v and gate/up independently, so a
mix-up in packing changes the outputs). tachyon (float32) loads the original checkpoint,
takes the perturbed state dict through ``update_weights`` and must then give HF's greedy
tokens and logprobs, also with the prompts' blocks already in its prefix cache (stale K/V
unless the cache was reset) and under emulated FULL CUDA graph replay (stale weights unless
the copy went into the captured parameters).
"""

from __future__ import annotations

import random
import re
import weakref
from pathlib import Path
from typing import Any

import pytest
import torch

from tachyon import LLM, SamplingParams
from tachyon.cudagraph.modes import RuntimeMode
from tachyon_testing import TINY_VOCAB

# float32 engine against a float64 reference: observed <= 2e-6; a wrong weight is off by > 0.1.
LOGPROB_TOL = 1e-4
# A perturbation must move the outputs by at least this much, or the test proves nothing.
MIN_PERTURBATION_EFFECT = 0.05
NUM_TOP = 4
MAX_NEW = 8
ENGINE_KW = dict(device="cpu", dtype="float32", max_model_len=128, max_num_seqs=4,
                 block_size=4, kv_cache_memory="2MiB")
EMULATED_GRAPHS_KW = dict(cudagraph_mode="FULL",
                          compilation_config={"cudagraph_capture_sizes": [1, 2, 4]})


def _hf_model(path: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64).eval()


def _perturb(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.25 * p.std() * torch.randn(p.shape, generator=gen, dtype=p.dtype))


def _prompts(rng: random.Random) -> list[list[int]]:
    # Longer than a block (4), so a second generation starts from the prefix cache.
    return [[rng.randrange(TINY_VOCAB) for _ in range(n)] for n in (9, 14)]


def _generate(llm: LLM, prompts: list[list[int]]) -> list[Any]:
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True,
                            logprobs=NUM_TOP)
    return [o.outputs[0] for o in llm.generate(prompts, params, use_tqdm=False)]


def _hf_logprobs(hf: Any, prompt: list[int], out: Any) -> torch.Tensor:
    """HF's log-probabilities at each step of ``out``, from one cache-free forward."""
    ids = torch.tensor([prompt + out.token_ids[:-1]])
    with torch.no_grad():
        return torch.log_softmax(hf(input_ids=ids).logits[0, len(prompt) - 1:], dim=-1)


def _max_logprob_error(hf: Any, prompts: list[list[int]], outs: list[Any]) -> float:
    """Largest |tachyon - HF| over every logprob tachyon returned."""
    worst = 0.0
    for prompt, out in zip(prompts, outs, strict=True):
        ref = _hf_logprobs(hf, prompt, out)
        for step, top in enumerate(out.logprobs):
            worst = max(worst, *(abs(lp - float(ref[step, t])) for t, lp in top.items()))
    return worst


def _assert_matches_hf(hf: Any, prompts: list[list[int]], outs: list[Any]) -> None:
    """Logprobs within tolerance, and each greedy token HF's argmax (where HF's top two are
    clearly apart)."""
    assert _max_logprob_error(hf, prompts, outs) < LOGPROB_TOL
    for prompt, out in zip(prompts, outs, strict=True):
        two = _hf_logprobs(hf, prompt, out).topk(2)
        for step, tok in enumerate(out.token_ids):
            if two.values[step, 0] - two.values[step, 1] > 1e-3:
                assert tok == int(two.indices[step, 0]), f"step {step}: not HF's argmax"


@pytest.mark.parametrize("name", ["llama", "qwen3"])
def test_update_weights_matches_hf(name: str, tiny_models: dict[str, Path],
                                   rng: random.Random) -> None:
    """Llama (untied, GQA) and Qwen3 (tied embeddings, q/k norms, head_dim apart)."""
    llm = LLM(str(tiny_models[name]), **ENGINE_KW)
    prompts = _prompts(rng)
    before = _generate(llm, prompts)  # fills the prefix cache with the old weights' K/V
    hf = _hf_model(tiny_models[name])
    _assert_matches_hf(hf, prompts, before)
    _perturb(hf, rng.randrange(1 << 31))
    assert _max_logprob_error(hf, prompts, before) > MIN_PERTURBATION_EFFECT
    report = llm.update_weights(hf.named_parameters())  # float64 in, float32 held
    assert report.num_tensors == len(list(hf.parameters()))
    hits = llm.engine.kv.prefix_hits
    after = _generate(llm, prompts)
    assert llm.engine.kv.prefix_hits == hits, "the prefix cache outlived the old weights"
    _assert_matches_hf(hf, prompts, after)
    llm.shutdown()


def _emulated_full_llm(path: Path, monkeypatch: pytest.MonkeyPatch) -> LLM:
    from graph_testing import PersistentTorchBackend
    from tachyon.worker import model_runner

    monkeypatch.setenv("TACHYON_EMULATE_CUDAGRAPHS", "1")
    monkeypatch.setattr(model_runner, "get_backend_class",
                        lambda name, dev, dtype: PersistentTorchBackend)
    llm = LLM(str(path), **ENGINE_KW, **EMULATED_GRAPHS_KW)
    assert llm.engine.executor.runner.graph_stats["cudagraph_mode"] == "FULL"
    return llm


def _record_graph_modes(runner: Any) -> list[Any]:
    """The runtime mode of every step the graph runner runs from now on."""
    modes: list[Any] = []
    graphs, run = runner.graph_runner, runner.graph_runner.run

    def recording_run(mode: Any, desc: Any, ctx: Any) -> torch.Tensor:
        modes.append(mode)
        return run(mode, desc, ctx)

    graphs.run = recording_run
    return modes


def test_update_lands_in_captured_graphs(tiny_models: dict[str, Path], rng: random.Random,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Emulated FULL replay re-runs the captured closures on the captured tensors: HF's
    outputs after the update prove the copies went into the parameters the graphs hold."""
    llm = _emulated_full_llm(tiny_models["qwen3"], monkeypatch)
    runner = llm.engine.executor.runner
    graphs = runner.graph_runner
    addresses = {n: p.data_ptr() for n, p in runner.model.named_parameters()}
    hf = _hf_model(tiny_models["qwen3"])
    _perturb(hf, rng.randrange(1 << 31))
    llm.update_weights(hf.state_dict())
    assert runner.graph_runner is graphs  # no re-capture
    assert {n: p.data_ptr() for n, p in runner.model.named_parameters()} == addresses
    modes = _record_graph_modes(runner)
    prompts = _prompts(rng)
    _assert_matches_hf(hf, prompts, _generate(llm, prompts))
    # Every decode step (the first token comes from the eager prefill) replayed a graph.
    assert modes.count(RuntimeMode.FULL) == MAX_NEW - 1
    llm.shutdown()


@pytest.mark.parametrize("level", [1, 2])
def test_sleep_then_wake_gives_the_same_output(level: int, tiny_models: dict[str, Path],
                                               rng: random.Random,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Sleep drops every reference to the KV cache (graphs included) and, at level 2, the
    weights' storage; wake-up re-allocates and re-captures; greedy outputs are unchanged
    (at level 2 once the weights are pushed again)."""
    path = tiny_models["llama"]
    llm = _emulated_full_llm(path, monkeypatch)
    runner = llm.engine.executor.runner
    prompts = _prompts(rng)
    want = _generate(llm, prompts)
    cache = weakref.ref(runner.kv_caches[0][0])
    s = runner.attn_spec
    kv_bytes = 2 * runner.num_layers * runner.num_blocks * 4 * s.num_kv_heads * s.head_dim * 4
    weight_bytes = sum(p.numel() * 4 for p in runner.model.parameters())

    slept = llm.sleep(level)
    # Freed at once, by reference counting: sleep runs no collection (slow) before returning
    # the memory to the device.
    assert cache() is None, "something (a captured graph?) still holds the KV cache"
    assert slept.kv_cache_bytes == kv_bytes
    assert slept.weight_bytes == (weight_bytes if level == 2 else 0)
    if level == 2:
        assert all(p.untyped_storage().nbytes() == 0 for p in runner.model.parameters())
    with pytest.raises(RuntimeError, match=r"asleep.*wake_up"):
        llm.generate(prompts, use_tqdm=False)
    with pytest.raises(RuntimeError, match="already asleep"):
        llm.sleep(1)

    woke = llm.wake_up()
    assert woke.kv_cache_bytes == kv_bytes
    assert runner.graph_stats["graphs"] == 6  # 3 sizes x (decode, mixed), captured again
    modes = _record_graph_modes(runner)
    if level == 2:
        with pytest.raises(RuntimeError, match="update_weights"):
            llm.generate(prompts, use_tqdm=False)
        hf = _hf_model(path)
        # All but k: q and v fill their rows of the packed qkv matrix, k's rows stay unset.
        k = "model.layers.1.self_attn.k_proj.weight"
        llm.update_weights([(n, t) for n, t in hf.named_parameters() if n != k])
        with pytest.raises(RuntimeError, match="not all pushed"):
            llm.generate(prompts, use_tqdm=False)
        llm.update_weights(hf.named_parameters())
    got = _generate(llm, prompts)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert modes.count(RuntimeMode.FULL) == MAX_NEW - 1  # the new graphs served the decodes
    llm.shutdown()


def test_bad_updates_change_nothing(tiny_models: dict[str, Path], rng: random.Random) -> None:
    """A bad tensor anywhere in the update fails it whole, naming the tensor; the good
    tensors before it are not applied and the engine still generates as before."""
    llm = LLM(str(tiny_models["llama"]), **ENGINE_KW)
    prompts = _prompts(rng)
    want = [o.token_ids for o in _generate(llm, prompts)]
    model = llm.engine.executor.runner.model
    snapshot = {n: p.detach().clone() for n, p in model.named_parameters()}
    good = [(n, torch.randn_like(p)) for n, p in _hf_model(tiny_models["llama"]).named_parameters()]
    q = "model.layers.1.self_attn.q_proj.weight"
    bad_updates = {
        "model.layers.7.mlp.up_proj.weight": (ValueError, "model.layers.7.mlp.up_proj.weight"),
        q: (ValueError, q),  # wrong shape
        "model.norm.weight": (ValueError, "not a floating-point tensor"),
    }
    bad_values = {q: torch.zeros(64, 32), "model.norm.weight": torch.ones(64, dtype=torch.int64),
                  "model.layers.7.mlp.up_proj.weight": torch.zeros(128, 64)}
    for name, (error, match) in bad_updates.items():
        with pytest.raises(error, match=re.escape(match)):
            llm.update_weights([*good[:5], (name, bad_values[name]), *good[5:]])
    with pytest.raises(ValueError, match="pairs"):
        llm.update_weights(["model.norm.weight"])
    with pytest.raises(ValueError, match="sleep level"):
        llm.sleep(3)
    for n, p in model.named_parameters():
        assert torch.equal(p, snapshot[n]), f"{n} changed by a rejected update"
    assert [o.token_ids for o in _generate(llm, prompts)] == want
    llm.shutdown()


def test_update_and_sleep_need_an_idle_engine(tiny_models: dict[str, Path]) -> None:
    llm = LLM(str(tiny_models["llama"]), **ENGINE_KW)
    engine = llm.engine
    engine.add_request("busy", [1, 2, 3], SamplingParams(max_tokens=4))
    engine.step()
    for call in (lambda: llm.sleep(1), lambda: llm.update_weights({})):
        with pytest.raises(RuntimeError, match="1 requests are unfinished"):
            call()
    engine.abort_request("busy")
    llm.update_weights({})  # nothing to copy: fine once idle
    assert llm.sleep(1).kv_cache_bytes > 0
    llm.wake_up()
    with pytest.raises(RuntimeError, match="awake"):
        llm.wake_up()
    llm.shutdown()


def test_tp2_update_sleep_wake(tiny_models: dict[str, Path], rng: random.Random) -> None:
    """Two gloo ranks: each takes the full tensors and its shard (KV heads, vocabulary and
    MLP split); a bad update fails on both and leaves them serving; sleep and wake on both."""
    llm = LLM(str(tiny_models["qwen3"]), tensor_parallel_size=2, **ENGINE_KW)
    hf = _hf_model(tiny_models["qwen3"])
    _perturb(hf, rng.randrange(1 << 31))
    with pytest.raises(ValueError, match=re.escape("model.layers.0.mlp.down_proj.weight")):
        llm.update_weights([*hf.named_parameters(),
                            ("model.layers.0.mlp.down_proj.weight", torch.zeros(64, 64))])
    llm.update_weights(hf.named_parameters())
    prompts = _prompts(rng)
    want = _generate(llm, prompts)
    _assert_matches_hf(hf, prompts, want)
    assert llm.sleep(2).weight_bytes > 0
    llm.wake_up()
    llm.update_weights(hf.named_parameters())
    assert [o.token_ids for o in _generate(llm, prompts)] == [o.token_ids for o in want]
    llm.shutdown()
