"""LoRA through the whole engine against PEFT (float64), batches mixing adapters.

Adapters are real PEFT directories (``lora_testing.write_adapter``: random A and B, several
ranks, target subsets, rsLoRA). Every request's logprobs must equal those of PEFT's model for
its own adapter (or the base model), while requests of different adapters share each step;
each adapter also moves the outputs far from the base model's, so a delta applied to the
wrong tokens, packed into the wrong slice or scaled wrongly cannot pass.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
import torch

from lora_testing import AdapterSpec, max_logprob_error, peft_reference, write_adapter
from tachyon import LLM, LoRARequest, SamplingParams
from tachyon_testing import TINY_VOCAB

# float32 engine against a float64 reference, relative error (lora_testing.max_logprob_error):
# observed up to ~1.2e-4 absolute on logprobs near -10; a wrong delta is off by > 1.
LOGPROB_TOL = 1e-4
# Each adapter must move the outputs at least this much from the base model's.
MIN_ADAPTER_EFFECT = 0.5
MAX_NEW = 6
ENGINE_KW = dict(device="cpu", dtype="float32", max_model_len=128, max_num_seqs=4,
                 block_size=4, kv_cache_memory="2MiB", enable_lora=True, max_lora_rank=16)
SPECS = [
    AdapterSpec(r=8, alpha=16),  # every target module
    AdapterSpec(r=4, alpha=8, targets=("q_proj", "v_proj"), rslora=True),  # alpha / sqrt(r)
    AdapterSpec(r=16, alpha=32, targets=("o_proj", "gate_proj", "up_proj", "down_proj")),
]


@pytest.fixture(scope="module")
def adapters(tiny_models: dict[str, Path],
             tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[LoRARequest]]:
    """model name -> one LoRARequest per entry of SPECS (ids 1, 2, 3)."""
    root = tmp_path_factory.mktemp("adapters")
    out = {}
    for name in ("llama", "qwen3"):
        out[name] = [LoRARequest(f"{name}-{i}", i + 1,
                                 str(write_adapter(tiny_models[name], root / f"{name}-{i}",
                                                   spec, seed=100 + i)))
                     for i, spec in enumerate(SPECS)]
    return out


def _prompts(rng: random.Random, n: int) -> list[list[int]]:
    return [[rng.randrange(TINY_VOCAB) for _ in range(rng.randrange(5, 14))] for _ in range(n)]


def _generate(llm: LLM, prompts: list[list[int]], loras: list[LoRARequest | None]) -> list[Any]:
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True, logprobs=4)
    outs = llm.generate(prompts, params, use_tqdm=False, lora_request=loras)
    return [o.outputs[0] for o in outs]


def _check_against_peft(base: Path, prompts: list[list[int]], loras: list[LoRARequest | None],
                        outs: list[Any], merged: bool = False) -> None:
    hf = peft_reference(base, None)
    refs: dict[str | None, Any] = {None: hf}
    for prompt, lora, out in zip(prompts, loras, outs, strict=True):
        path = lora.lora_path if lora is not None else None
        if path not in refs:
            refs[path] = peft_reference(base, Path(path), merged)
        err = max_logprob_error(refs[path], prompt, out)
        assert err < LOGPROB_TOL, f"{lora and lora.lora_name}: off PEFT by {err:.2e}"
        if lora is not None:
            assert max_logprob_error(hf, prompt, out, relative=False) > MIN_ADAPTER_EFFECT, \
                "adapter no-op"


@pytest.mark.parametrize(("name", "merged"), [("llama", False), ("qwen3", True)])
def test_mixed_batch_matches_peft(name: str, merged: bool, tiny_models: dict[str, Path],
                                  adapters: dict[str, list[LoRARequest]],
                                  rng: random.Random) -> None:
    """Three adapters and the base model in one batch (Llama: untied, GQA; Qwen3: tied
    embeddings, q/k norms), against PEFT unmerged and merged."""
    llm = LLM(str(tiny_models[name]), max_loras=3, **ENGINE_KW)
    a = adapters[name]
    loras = [a[0], None, a[1], a[2]]
    rng.shuffle(loras)
    prompts = _prompts(rng, len(loras))
    outs = _generate(llm, prompts, loras)
    assert llm.engine.stats["steps"] == MAX_NEW, "the four requests did not share each step"
    _check_against_peft(tiny_models[name], prompts, loras, outs, merged)
    llm.shutdown()


def test_lru_between_gpu_slots_and_cpu(tiny_models: dict[str, Path],
                                       adapters: dict[str, list[LoRARequest]],
                                       rng: random.Random) -> None:
    """Two GPU slots and two CPU entries for three adapters: the least recently used one is
    evicted from its slot (and from host memory: it is read again from disk), and a batch
    naming all three still runs (the third waits for a slot)."""
    llm = LLM(str(tiny_models["llama"]), max_loras=2, max_cpu_loras=2, **ENGINE_KW)
    manager = llm.engine.executor.runner.lora_manager
    a = adapters["llama"]
    prompts = _prompts(rng, 4)
    for lora in a:  # one after another: 1, 2, then 3 takes 1's slot
        _generate(llm, prompts[:1], [lora])
    assert manager.resident() == [2, 3]
    assert sorted(manager._cpu) == [2, 3]
    loras = [a[0], a[1], a[2], None]
    outs = _generate(llm, prompts, loras)
    assert set(manager.resident()) <= {1, 2, 3} and len(manager.resident()) == 2
    _check_against_peft(tiny_models["llama"], prompts, loras, outs)
    llm.shutdown()


def _emulated_full_llm(path: Path, monkeypatch: pytest.MonkeyPatch, **kw: Any) -> LLM:
    from graph_testing import PersistentTorchBackend
    from tachyon.worker import model_runner

    monkeypatch.setenv("TACHYON_EMULATE_CUDAGRAPHS", "1")
    monkeypatch.setattr(model_runner, "get_backend_class",
                        lambda name, dev, dtype: PersistentTorchBackend)
    llm = LLM(str(path), cudagraph_mode="FULL",
              compilation_config={"cudagraph_capture_sizes": [1, 2, 4]}, **kw)
    assert llm.engine.executor.runner.graph_stats["cudagraph_mode"] == "FULL"
    return llm


def test_adapters_swap_under_emulated_full_graphs(tiny_models: dict[str, Path],
                                                  adapters: dict[str, list[LoRARequest]],
                                                  rng: random.Random, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Emulated FULL replay re-runs the captured closures on the captured tensors: PEFT's
    outputs after adapters change slots, and after ``update_lora`` pushes new weights into a
    resident one, prove slot ids and weights are read from the persistent buffers; no graph
    is captured again."""
    base = tiny_models["llama"]
    llm = _emulated_full_llm(base, monkeypatch, max_loras=2, **ENGINE_KW)
    runner = llm.engine.executor.runner
    graphs = runner.graph_runner
    captured = dict(graphs.full)
    modes: list[Any] = []
    run = graphs.run
    graphs.run = lambda mode, desc, ctx: (modes.append(mode), run(mode, desc, ctx))[1]
    a = adapters["llama"]
    for loras in ([a[0], None, a[1]], [a[2], a[0], None, a[2]]):
        prompts = _prompts(rng, len(loras))
        _check_against_peft(base, prompts, loras, _generate(llm, prompts, loras))
    assert sorted(runner.lora_manager.resident()) == [1, 3]  # 2 made room for 3
    # New weights for adapter 1 while it sits in a slot (as a trainer pushes them).
    fresh = write_adapter(base, tmp_path / "fresh", SPECS[0], seed=rng.randrange(1 << 31))
    from safetensors.torch import load_file

    llm.update_lora(a[0], load_file(str(fresh / "adapter_model.safetensors")))
    prompts = _prompts(rng, 2)
    outs = _generate(llm, prompts, [a[0], a[0]])
    _check_against_peft(base, prompts, [LoRARequest("fresh", 9, str(fresh))] * 2, outs)
    from tachyon.cudagraph.modes import RuntimeMode

    assert RuntimeMode.FULL in modes
    assert graphs.full == captured, "graphs were captured again"
    llm.shutdown()


@pytest.fixture(scope="module")
def lora_llm(tiny_models: dict[str, Path]) -> LLM:
    llm = LLM(str(tiny_models["llama"]), max_loras=2, **ENGINE_KW)
    yield llm
    llm.shutdown()


def _bad_adapter(kind: str, tiny_models: dict[str, Path], adapters: dict[str, list[LoRARequest]],
                 tmp: Path) -> str:
    """A directory that must be refused, and (returned) what the error must say."""
    llama = tiny_models["llama"]
    if kind == "rank":
        write_adapter(llama, tmp, AdapterSpec(r=32, alpha=32), seed=1)
        return "exceeds max_lora_rank"
    if kind == "target":
        write_adapter(llama, tmp, AdapterSpec(r=4, alpha=8, targets=("q_proj", "lm_head")),
                      seed=1)
        return "lm_head"
    if kind == "shape":  # made for Qwen3 (head_dim 32): q_proj's B has twice the rows
        write_adapter(tiny_models["qwen3"], tmp, AdapterSpec(r=4, alpha=8), seed=1)
        return "does not fit the model"
    if kind == "missing-config":
        tmp.mkdir()
        return "adapter_config.json"
    write_adapter(llama, tmp, AdapterSpec(r=4, alpha=8), seed=1)
    (tmp / "adapter_model.safetensors").unlink()
    return "adapter_model.safetensors"


@pytest.mark.parametrize("kind", ["rank", "target", "shape", "missing-config",
                                  "missing-weights"])
def test_bad_adapter_is_refused_and_engine_serves(kind: str, lora_llm: LLM,
                                                  tiny_models: dict[str, Path],
                                                  adapters: dict[str, list[LoRARequest]],
                                                  tmp_path: Path, rng: random.Random) -> None:
    message = _bad_adapter(kind, tiny_models, adapters, tmp_path / "bad")
    bad = LoRARequest("bad", 7, str(tmp_path / "bad"))
    prompts = _prompts(rng, 2)
    with pytest.raises(ValueError, match=message):
        _generate(lora_llm, prompts, [adapters["llama"][0], bad])
    assert not lora_llm.engine.has_unfinished_requests(), "a request of the batch was queued"
    assert 7 not in {r.lora_int_id for r in lora_llm.list_loras()}
    loras = [adapters["llama"][0], None]
    _check_against_peft(tiny_models["llama"], prompts, loras, _generate(lora_llm, prompts, loras))


def test_lora_request_needs_enable_lora(tiny_models: dict[str, Path],
                                        adapters: dict[str, list[LoRARequest]]) -> None:
    kw = {**ENGINE_KW, "enable_lora": False}
    llm = LLM(str(tiny_models["llama"]), **kw)
    with pytest.raises(ValueError, match="enable_lora"):
        llm.generate([[1, 2, 3]], lora_request=adapters["llama"][0], use_tqdm=False)
    assert llm.generate([[1, 2, 3]], SamplingParams(max_tokens=2), use_tqdm=False)
    llm.shutdown()


def test_lora_request_fields_are_checked() -> None:
    with pytest.raises(ValueError, match="lora_int_id"):
        LoRARequest("a", 0, "/x")
    with pytest.raises(ValueError, match="lora_path"):
        LoRARequest("a", 1, "")


def test_prefix_cache_is_per_adapter(lora_llm: LLM, adapters: dict[str, list[LoRARequest]],
                                     rng: random.Random) -> None:
    """The same prompt under another adapter must not reuse the first one's K/V blocks."""
    prompt = _prompts(rng, 1)[0] + [1] * 8  # several full blocks
    a = adapters["llama"]
    _generate(lora_llm, [prompt], [a[0]])
    hits = lora_llm.engine.kv.prefix_hits
    _generate(lora_llm, [prompt], [a[1]])
    _generate(lora_llm, [prompt], [None])
    assert lora_llm.engine.kv.prefix_hits == hits
    _generate(lora_llm, [prompt], [a[0]])
    assert lora_llm.engine.kv.prefix_hits > hits


torch.set_num_threads(1)  # the conftest's choice, kept if this module runs alone


def _count_lora_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count every LoRA layer call that runs shrink/expand (emulated replay re-runs the
    captured forward, so this counts the kernels a graph holds too)."""
    from tachyon.lora.slots import LoRASlots

    calls = [0]
    add_delta = LoRASlots.add_delta

    def counting(self: LoRASlots, x: torch.Tensor, y: torch.Tensor) -> None:
        calls[0] += 1
        add_delta(self, x, y)

    monkeypatch.setattr(LoRASlots, "add_delta", counting)
    return calls


def _logprobs(outs: list[Any]) -> list[Any]:
    return [(o.token_ids, o.logprobs) for o in outs]


@pytest.mark.parametrize("mode", ["NONE", "FULL"])
def test_batches_without_adapters_run_the_base_model(mode: str, tiny_models: dict[str, Path],
                                                     adapters: dict[str, list[LoRARequest]],
                                                     rng: random.Random,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """With LoRA on, a batch in which no request has an adapter runs no LoRA kernel (eager,
    or replaying has_lora=False FULL graphs, emulated) and gives exactly the logprobs of an
    engine without LoRA, before and after adapters ran; batches with an adapter replay
    has_lora=True graphs and match PEFT; no graph is captured again."""
    base = tiny_models["llama"]
    kw = dict(ENGINE_KW, enable_lora=False)
    make = (lambda **k: _emulated_full_llm(base, monkeypatch, **k)) if mode == "FULL" else \
        (lambda **k: LLM(str(base), **k))
    plain = make(**kw)
    assert all(not k.has_lora for k in plain.engine.executor.runner.graph_runner.full) \
        if mode == "FULL" else plain.engine.executor.runner.graph_runner is None
    llm = make(max_loras=2, **ENGINE_KW)
    runner = llm.engine.executor.runner
    graphs = runner.graph_runner
    descs: list[Any] = []
    captures: list[int] = []
    if graphs is not None:
        assert len(graphs.full) == 2 * len(plain.engine.executor.runner.graph_runner.full)
        assert {k for k in graphs.full if not k.has_lora} == \
            set(plain.engine.executor.runner.graph_runner.full)
        run, capture = graphs.run, graphs.impl.capture
        graphs.run = lambda m, desc, ctx: (descs.append(desc), run(m, desc, ctx))[1]
        graphs.impl.capture = lambda fn: (captures.append(1), capture(fn))[1]
    calls = _count_lora_calls(monkeypatch)
    a = adapters["llama"]
    for loras in ([None, None, None], [a[0], None, a[1]], [None, None], [a[2], None]):
        prompts = _prompts(rng, len(loras))
        descs.clear()
        calls[0] = 0
        outs = _generate(llm, prompts, loras)
        _check_against_peft(base, prompts, loras, outs)
        assert bool(descs) == (mode == "FULL")  # the decode steps replayed graphs
        has_lora = any(loras)
        assert all(d.has_lora is has_lora for d in descs)
        if has_lora:
            assert calls[0] > 0
            continue
        assert calls[0] == 0, "LoRA kernels ran in a batch without adapters"
        assert _logprobs(outs) == _logprobs(_generate(plain, prompts, loras))
    assert not captures, "graphs were captured again"
    llm.shutdown()
    plain.shutdown()
