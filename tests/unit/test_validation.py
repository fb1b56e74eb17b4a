"""One test per bad input: a ``ValueError`` that says what is wrong and what is allowed, and
nothing already accepted is lost."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tachyon import LLM, SamplingParams
from tachyon.config import EngineArgs
from tachyon.cudagraph.modes import CGSupport, CUDAGraphMode, resolve_cudagraph_mode
from tachyon.engine.llm_engine import LLMEngine
from tachyon_testing import TINY_VOCAB

MAX_MODEL_LEN = 64
GOOD_PROMPT = [5, 17, 33, 101, 7, 250]
GOOD_PARAMS = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)


@pytest.fixture(scope="module")
def engine(tiny_llama: str) -> LLMEngine:
    return LLMEngine.from_engine_args(EngineArgs(model=tiny_llama, device="cpu",
                                                 max_model_len=MAX_MODEL_LEN, block_size=4))


@pytest.fixture(scope="module")
def reference_tokens(engine: LLMEngine) -> list[int]:
    return drain(engine, [engine.add_request(None, GOOD_PROMPT, GOOD_PARAMS)])[0]


def drain(engine: LLMEngine, ids: list[str]) -> list[list[int]]:
    done: dict[str, list[int]] = {}
    for _ in range(1000):
        if not engine.has_unfinished_requests():
            break
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
    assert not engine.has_unfinished_requests()
    assert engine.num_free_blocks() == engine.kv.pool.num_blocks
    return [done[i] for i in ids]


def rejected_without_harm(engine: LLMEngine, reference_tokens: list[int],
                          bad: Callable[[], Any], match: str) -> None:
    """Queue a good request, make the bad call, then check the good one still completes
    with the tokens it produces alone."""
    queued = engine.add_request(None, GOOD_PROMPT, GOOD_PARAMS)
    engine.step()  # it is running, not just queued
    with pytest.raises(ValueError, match=match):
        bad()
    assert drain(engine, [queued]) == [reference_tokens]


def with_field(**changes: Any) -> SamplingParams:
    """Valid params mutated after construction, as a caller holding a params object may."""
    params = SamplingParams(temperature=0.0, max_tokens=4)
    for k, v in changes.items():
        setattr(params, k, v)
    return params


# --------------------------------------------------------------------------- requests

BAD_PROMPTS = {
    "too-long": ([1] * (MAX_MODEL_LEN + 1), r"65 tokens, more than max_model_len \(64\)"),
    "empty-string": ("", "prompt is empty"),
    "empty-token-list": ([], "prompt is empty"),
    "token-above-vocab": ([1, 2, TINY_VOCAB], rf"token id {TINY_VOCAB} .*\[0, {TINY_VOCAB}\)"),
    "negative-token": ([1, -1], r"token id -1 .*outside the vocabulary"),
    "string-without-tokenizer": ("hello", "no tokenizer"),
    "not-a-prompt": (3.5, "a prompt is a string or a list of token ids"),
}


@pytest.mark.parametrize("case", list(BAD_PROMPTS))
def test_bad_prompt(case: str, engine: LLMEngine, reference_tokens: list[int]) -> None:
    prompt, match = BAD_PROMPTS[case]
    rejected_without_harm(engine, reference_tokens,
                          lambda: engine.add_request(None, prompt, GOOD_PARAMS), match)


BAD_SAMPLING = {
    "negative-temperature": (dict(temperature=-0.5), r"temperature must be a number in \[0, "),
    "top-p-zero": (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
    "top-p-above-one": (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
    "top-k-minus-two": (dict(top_k=-2), r"top_k must be 0 or -1 \(disabled\) or an integer"),
    "top-k-beyond-int32": (dict(top_k=2**31), r"top_k .*an integer in \[1, 2\*\*31\)"),
    "min-p-two": (dict(min_p=2.0), r"min_p must be in \[0, 1\]"),
    "max-tokens-zero": (dict(max_tokens=0), r"max_tokens must be an integer >= 1"),
    "min-above-max-tokens": (dict(min_tokens=5, max_tokens=3),
                             r"min_tokens \(5\) must be <= max_tokens \(3\)"),
    "logprobs-21": (dict(logprobs=21), r"logprobs must be an integer in \[0, 20\]"),
    "n-zero": (dict(n=0), r"n must be an integer >= 1"),
    "n-bool": (dict(n=True), r"n must be an integer >= 1, got True"),
    "seed-beyond-int64": (dict(seed=2**70), r"seed must be an integer in \[0, 2\*\*63\) or None"),
    "seed-negative": (dict(seed=-1), r"seed must be an integer in \[0, 2\*\*63\)"),
    "seed-float": (dict(seed=1.5), r"seed must be an integer in \[0, 2\*\*63\)"),
    "seed-of-last-sample-overflows": (dict(seed=2**63 - 2, n=3),
                                      r"seed \+ n - 1 must be < 2\*\*63"),
    "max-tokens-float": (dict(max_tokens=8.0), r"max_tokens must be an integer >= 1 or None"),
    "min-tokens-negative": (dict(min_tokens=-1), r"min_tokens must be an integer >= 0"),
    "temperature-inf": (dict(temperature=float("inf")), r"temperature must be a number in \[0, "),
    "temperature-beyond-float32": (dict(temperature=1e39), r"temperature must be a number in"),
    "repetition-penalty-inf": (dict(repetition_penalty=float("inf")),
                               r"repetition_penalty must be a number in \(0, "),
    "stop-int-in-list": (dict(stop=["ok", 5]), r"stop must be a non-empty string or a list"),
    "stop-empty-string": (dict(stop=""), r"stop must be a non-empty string"),
    "repetition-penalty-zero": (dict(repetition_penalty=0.0),
                                r"repetition_penalty must be a number in \(0, "),
    "presence-penalty-3": (dict(presence_penalty=3.0), r"presence_penalty must be in \[-2, 2\]"),
    "nan-temperature": (dict(temperature=float("nan")), r"temperature must be a number in"),
    "stop-token-ids-negative": (dict(stop_token_ids=[-3]), "stop_token_ids must be a list"),
}

@pytest.mark.parametrize("case", [
    *BAD_SAMPLING,
    "stop-int",
    "stop-token-ids-int",
])
def test_bad_sampling_params(case: str, engine: LLMEngine, reference_tokens: list[int]) -> None:
    extra = {"stop-int": (dict(stop=5), r"stop must be a non-empty string or a list"),
             "stop-token-ids-int": (dict(stop_token_ids=5), "stop_token_ids must be a list")}
    kwargs, match = {**BAD_SAMPLING, **extra}[case]
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)
    # The same values set on an existing object are caught when the request arrives.
    if "stop" not in kwargs:
        params = with_field(**kwargs)
        rejected_without_harm(engine, reference_tokens,
                              lambda: engine.add_request(None, GOOD_PROMPT, params), match)


def test_stop_token_id_outside_vocab(engine: LLMEngine, reference_tokens: list[int]) -> None:
    params = SamplingParams(max_tokens=4, min_tokens=2, stop_token_ids=[TINY_VOCAB + 7])
    rejected_without_harm(engine, reference_tokens,
                          lambda: engine.add_request(None, GOOD_PROMPT, params),
                          rf"stop token id {TINY_VOCAB + 7} is outside the vocabulary")


def test_duplicate_request_id(engine: LLMEngine, reference_tokens: list[int]) -> None:
    engine.add_request("dup", GOOD_PROMPT, GOOD_PARAMS)
    rejected_without_harm(engine, reference_tokens,
                          lambda: engine.add_request("dup", GOOD_PROMPT, GOOD_PARAMS),
                          "'dup' is already in use")


def test_params_of_the_wrong_type(engine: LLMEngine, reference_tokens: list[int]) -> None:
    rejected_without_harm(engine, reference_tokens,
                          lambda: engine.add_request(None, GOOD_PROMPT, {"temperature": 0}),
                          "params must be a tachyon.SamplingParams")


@pytest.fixture(scope="module")
def llm(tiny_llama: str) -> LLM:
    return LLM(model=tiny_llama, device="cpu", max_model_len=MAX_MODEL_LEN)


PROMPT_FORMS = r"a prompt is a string, a list of token ids \(ints\), or a dict with 'prompt'"
BAD_GENERATE_PROMPTS = {
    "int": (5, rf"prompts must be one prompt or a list of prompts; {PROMPT_FORMS}.*got int"),
    "none": (None, r"prompts must be one prompt or a list of prompts; .*got NoneType"),
    "bytes": (b"hello", r"prompts must be one prompt or a list of prompts; .*got bytes"),
    "set": ({3, 4}, r"prompts must be one prompt or a list of prompts; .*got set"),
    "float-in-a-list": ([GOOD_PROMPT, 2.5], rf"prompt 1 is a float; {PROMPT_FORMS}"),
    "ints-mixed-with-strings": ([5, "hello", 7], r"the prompts mix token ids and other values"),
    "string-in-token-ids": ([GOOD_PROMPT, [5, "x"]], r"prompt 1 holds 'x', not a token id"),
    "bools-as-token-ids": ([[True, False]], r"prompt 0 holds True, not a token id"),
    "dict-of-another-shape": ({"text": "hi"}, rf"the prompt is a dict with keys \['text'\]; "
                                               rf"{PROMPT_FORMS}"),
    "empty-dict": ({}, r"the prompt is a dict with keys \[\]"),
    "dict-with-int-prompt": ({"prompt": 5}, r"'prompt' must be a string, got 5"),
    "dict-with-string-ids": ([{"prompt_token_ids": "hi"}],
                             r"prompt 0: 'prompt_token_ids' must be a list of ints, got 'hi'"),
}


@pytest.mark.parametrize("case", list(BAD_GENERATE_PROMPTS))
def test_generate_rejects_what_is_not_a_prompt(case: str, llm: LLM) -> None:
    prompts, match = BAD_GENERATE_PROMPTS[case]
    with pytest.raises(ValueError, match=match):
        llm.generate(prompts, GOOD_PARAMS, use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()


@pytest.mark.parametrize("params", [5, "greedy", GOOD_PARAMS.__dict__])
def test_generate_rejects_what_is_not_sampling_params(params: Any, llm: LLM) -> None:
    with pytest.raises(ValueError, match=r"sampling_params must be a tachyon\.SamplingParams, "
                                         r"a list of them \(one per prompt\) or None"):
        llm.generate([GOOD_PROMPT], params, use_tqdm=False)


@pytest.mark.parametrize("messages", [5, None, "hello", [], [[]], [{"role": "user"}, "hi"]])
def test_chat_rejects_what_is_not_a_conversation(messages: Any, llm: LLM) -> None:
    with pytest.raises(ValueError, match=r"messages must be a non-empty list of \{'role': ..., "
                                         r"'content': ...\} dicts \(one conversation\) or a "
                                         r"list of such lists"):
        llm.chat(messages)


def test_seeds_up_to_the_int64_limit_work(llm: LLM) -> None:
    """The largest accepted seed reaches torch, and sample i of n uses seed + i: the second
    of two samples seeded 2**63 - 2 is the sample seeded 2**63 - 1."""
    top = 2**63 - 1
    sampled = dict(temperature=1.0, max_tokens=8, ignore_eos=True)
    alone = llm.generate([GOOD_PROMPT], SamplingParams(seed=top, **sampled),
                         use_tqdm=False)[0].outputs[0].token_ids
    pair = llm.generate([GOOD_PROMPT], SamplingParams(seed=top - 1, n=2, **sampled),
                        use_tqdm=False)[0].outputs
    assert len(alone) == 8 and pair[1].token_ids == alone


def test_generate_rejects_a_batch_with_one_bad_prompt_before_queueing_any(llm: LLM) -> None:
    good = llm.generate([GOOD_PROMPT], GOOD_PARAMS, use_tqdm=False)[0].outputs[0].token_ids
    with pytest.raises(ValueError, match="outside the vocabulary"):
        llm.generate([GOOD_PROMPT, [1, TINY_VOCAB + 3]], GOOD_PARAMS, use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()
    bad_stop = SamplingParams(max_tokens=4, stop_token_ids=[TINY_VOCAB])
    with pytest.raises(ValueError, match="stop token id"):
        llm.generate([GOOD_PROMPT, GOOD_PROMPT], [GOOD_PARAMS, bad_stop], use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()
    with pytest.raises(ValueError, match=r"params must be a tachyon\.SamplingParams"):
        llm.generate([GOOD_PROMPT], {"temperature": 0}, use_tqdm=False)
    with pytest.raises(ValueError, match="got 1 SamplingParams for 2 prompts"):
        llm.generate([GOOD_PROMPT, GOOD_PROMPT], [GOOD_PARAMS], use_tqdm=False)
    with pytest.raises(ValueError, match="no prompts given"):
        llm.generate([], GOOD_PARAMS, use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()
    assert llm.generate([GOOD_PROMPT], GOOD_PARAMS, use_tqdm=False)[0].outputs[0].token_ids \
        == good


# --------------------------------------------------------------------------- models


def test_unknown_model_path(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"unknown model .*does not download models"):
        LLM(model=str(tmp_path / "no-such-model"), device="cpu")


def test_directory_without_config(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"has no config\.json"):
        LLM(model=str(tmp_path), device="cpu")


def copy_model(src: str, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_malformed_config_json(tiny_llama: str, tmp_path: Path) -> None:
    path = copy_model(tiny_llama, tmp_path / "m")
    (path / "config.json").write_text('{"model_type": "llama", "hidden_size": ')
    with pytest.raises(ValueError, match=r"cannot read .*config.json"):
        LLM(model=str(path), device="cpu")


def test_config_without_model_type(tiny_llama: str, tmp_path: Path) -> None:
    path = copy_model(tiny_llama, tmp_path / "m")
    cfg = json.loads((path / "config.json").read_text())
    del cfg["model_type"]
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"cannot read .*config.json"):
        LLM(model=str(path), device="cpu")


def test_unsupported_architecture(tiny_llama: str, tmp_path: Path) -> None:
    path = copy_model(tiny_llama, tmp_path / "m")
    cfg = json.loads((path / "config.json").read_text())
    cfg["architectures"] = ["MambaForCausalLM"]
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"unsupported architecture .*LlamaForCausalLM"):
        LLM(model=str(path), device="cpu")


def test_config_that_does_not_match_the_weights(tiny_llama: str, tmp_path: Path) -> None:
    path = copy_model(tiny_llama, tmp_path / "m")
    cfg = json.loads((path / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="weight shape"):
        LLM(model=str(path), device="cpu")


def test_missing_safetensors(tiny_llama: str, tmp_path: Path) -> None:
    path = copy_model(tiny_llama, tmp_path / "m")
    for f in path.glob("*.safetensors"):
        f.unlink()
    with pytest.raises(ValueError, match=r"no \*.safetensors files.*--load-format dummy"):
        LLM(model=str(path), device="cpu")


def test_truncated_safetensors(tiny_llama: str, tmp_path: Path) -> None:
    path = copy_model(tiny_llama, tmp_path / "m")
    (f,) = path.glob("*.safetensors")
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="safetensors"):
        LLM(model=str(path), device="cpu")


def test_garbage_gguf(tmp_path: Path) -> None:
    f = tmp_path / "model.gguf"
    f.write_bytes(b"this is not a gguf file" * 100)
    with pytest.raises(ValueError, match="cannot read GGUF file"):
        LLM(model=str(f), device="cpu")


def test_truncated_gguf(default_gguf: str, tmp_path: Path) -> None:
    """The real model file cut short: the header parses, the tensor data is missing."""
    f = tmp_path / "cut.gguf"
    with open(default_gguf, "rb") as src, open(f, "wb") as dst:
        dst.write(src.read(8 << 20))
    with pytest.raises(ValueError, match="GGUF"):
        LLM(model=str(f), device="cpu")


def test_preset_without_dummy_load_format() -> None:
    with pytest.raises(ValueError, match="add --load-format dummy"):
        EngineArgs(model="qwen3-0.6b", device="cpu").create_config()


# --------------------------------------------------------------------------- engine args


def test_unknown_engine_kwarg(tiny_llama: str) -> None:
    with pytest.raises(ValueError, match=r"unknown engine argument.*max_num_sequences.*known: "):
        LLM(model=tiny_llama, device="cpu", max_num_sequences=4)


BAD_ENGINE_ARGS = {
    "block-size-not-power-of-two": (dict(block_size=12), "block_size must be a power of two"),
    "max-num-seqs-zero": (dict(max_num_seqs=0), "max_num_seqs must be an integer >= 1"),
    "budget-below-seats": (dict(max_num_seqs=8, max_num_batched_tokens=4),
                           r"max_num_batched_tokens \(4\) must be >= max_num_seqs \(8\)"),
    "max-model-len-above-model": (dict(max_model_len=10_000), "exceeds the model's"),
    "dtype": (dict(dtype="float8"), "dtype must be one of"),
    "device": (dict(device="tpu"), "device must be 'auto', 'cuda' or 'cpu'"),
    "kv-cache-memory": (dict(kv_cache_memory="lots"), "cannot read memory size 'lots'"),
    "load-format": (dict(load_format="pickle"), "load_format must be one of"),
    "gpu-memory-utilization": (dict(gpu_memory_utilization=1.5),
                               r"gpu_memory_utilization must be in \(0, 1\]"),
    "attention-backend": (dict(attention_backend="magic"), "unknown attention backend 'magic'"),
    # The CPU tests run Triton in its interpreter (conftest), which gets bf16 dots wrong.
    "triton-bf16-interpreted": (dict(attention_backend="triton", dtype="bfloat16"),
                                r"'triton' attention backend cannot run bfloat16 under "
                                r"TRITON_INTERPRET=1 .*use --dtype float32 or float16"),
    "graph-mode": (dict(cudagraph_mode="FULLEST"),
                   "unknown CUDA graph mode 'FULLEST'; use one of: NONE, PIECEWISE, FULL"),
    "graph-mode-in-json": (dict(compilation_config='{"cudagraph_mode": "sometimes"}'),
                           "unknown CUDA graph mode 'sometimes'"),
    "compilation-config-json": (dict(compilation_config='{"cudagraph_mode": FULL}'),
                                "--compilation-config is not valid JSON"),
    "compilation-config-not-object": (dict(compilation_config="[1, 2]"),
                                      "must be a JSON object"),
    "compilation-config-unknown-key": (dict(compilation_config={"cuda_graph_sizes": [1]}),
                                       "unknown compilation_config key.*cuda_graph_sizes"),
    "capture-sizes": (dict(compilation_config={"cudagraph_capture_sizes": [0, 2]}),
                      "cudagraph_capture_sizes must be a list of positive integers"),
    "piecewise-backend": (dict(compilation_config={"piecewise_backend": "magic"}),
                          "piecewise_backend must be 'breakable' or 'compile'"),
}


@pytest.mark.parametrize("case", list(BAD_ENGINE_ARGS))
def test_bad_engine_args(case: str, tiny_llama: str) -> None:
    kwargs, match = BAD_ENGINE_ARGS[case]
    with pytest.raises(ValueError, match=match):
        LLM(model=tiny_llama, **{"device": "cpu", **kwargs})


def test_graph_mode_from_environment(tiny_llama: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TACHYON_CUDAGRAPH_MODE", "EVERYTHING")
    with pytest.raises(ValueError, match="unknown CUDA graph mode 'EVERYTHING'"):
        EngineArgs(model=tiny_llama, device="cpu").create_config()


def test_kv_cache_too_small_for_max_model_len(tiny_llama: str) -> None:
    """A pool that cannot hold one request of max_model_len would leave such a request
    waiting forever: refuse at start-up and say what to change."""
    with pytest.raises(ValueError, match=r"KV cache .*max_model_len \(64\)"):
        LLM(model=tiny_llama, device="cpu", max_model_len=64, block_size=4,
            num_gpu_blocks_override=8)


@pytest.mark.parametrize("mode", [CUDAGraphMode.FULL, CUDAGraphMode.FULL_DECODE_ONLY])
def test_full_graphs_with_the_torch_backend(mode: CUDAGraphMode) -> None:
    with pytest.raises(ValueError, match=(
            rf"{mode.value} is not supported by the 'torch' attention backend \(support: NEVER\)"
            r"; use --cudagraph-mode PIECEWISE or --attention-backend triton")):
        resolve_cudagraph_mode(mode, "torch", CGSupport.NEVER, on_cuda=True)


def test_graph_mode_downgrades_are_explained() -> None:
    res = resolve_cudagraph_mode(CUDAGraphMode.FULL_AND_PIECEWISE, "torch", CGSupport.NEVER, True)
    assert res.mode is CUDAGraphMode.PIECEWISE
    assert "FULL_AND_PIECEWISE" in res.warning and "PIECEWISE" in res.warning
    res = resolve_cudagraph_mode(CUDAGraphMode.FULL, "triton", CGSupport.UNIFORM_DECODE, True)
    assert res.mode is CUDAGraphMode.FULL_AND_PIECEWISE and "UNIFORM_DECODE" in res.warning
    res = resolve_cudagraph_mode(CUDAGraphMode.FULL, "flex", CGSupport.ALWAYS, True)
    assert res == type(res)(CUDAGraphMode.FULL, None)
    # Without CUDA every mode runs eagerly, with a word about it.
    res = resolve_cudagraph_mode(CUDAGraphMode.FULL, "torch", CGSupport.NEVER, False)
    assert res.mode is CUDAGraphMode.NONE and "needs a CUDA GPU" in res.warning


@pytest.mark.parametrize(("kwargs", "want"), [
    ({}, False), ({"presence_penalty": 0.5}, True), ({"frequency_penalty": -0.2}, True),
    ({"repetition_penalty": 1.1}, True), ({"repetition_penalty": 1.0}, False),
    ({"temperature": 0.0, "top_k": 5, "min_p": 0.1}, False)])
def test_has_penalties_is_the_one_penalty_rule(kwargs: dict, want: bool) -> None:
    """The engine core (sync path), the scheduler (no drafts) and the sampling rows (the
    penalty flag) all ask ``SamplingParams.has_penalties``."""
    assert SamplingParams(**kwargs).has_penalties is want
