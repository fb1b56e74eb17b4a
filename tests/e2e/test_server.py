"""`tachyon serve` end to end: the official openai client against a live server on 127.0.0.1.

The server runs in a subprocess (the real CLI, its engine core in a process of its own) over
a tiny random Llama saved with the SmolLM2 tokenizer. References are independent of the
server: HF transformers for greedy tokens and logprobs, ``LLM.generate`` for the same requests,
the tokenizer for prompt lengths, the non-streamed text for streams, and the same request run
alone for the load test.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
torch = pytest.importorskip("torch")

MODEL = "tiny"
MAX_MODEL_LEN = 512
STARTUP_TIMEOUT_S = 180.0
REQUEST_TIMEOUT_S = 120.0
IDLE_TIMEOUT_S = 30.0
# Long enough that no client can read it to the end before it disconnects.
LONG_MAX_TOKENS = 400
KV_CACHE_MEMORY = "32MiB"
# Small server limits, so the tests can cross them cheaply.
MAX_N = 16
MAX_REQUEST_BYTES = 1_000_000


# -- fixtures ----------------------------------------------------------------------------------
def _build_tiny_model(path: Path) -> None:
    """2 layers, hidden 64, the SmolLM2 tokenizer. A wide init spreads the logits so greedy
    choices are far from ties (batched and single runs then agree to the token)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from tachyon.loader.resolve import default_gguf_path

    gguf = default_gguf_path()
    tok = AutoTokenizer.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf))
    tok.save_pretrained(path)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=MAX_MODEL_LEN, initializer_range=0.5,
                      tie_word_embeddings=False, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(path)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny-llama")
    _build_tiny_model(path)
    return path


@pytest.fixture(scope="module")
def server(model_dir: Path) -> Iterator[str]:
    port = _free_port()
    cmd = [sys.executable, "-m", "tachyon.entrypoints.cli", "serve", str(model_dir),
           "--host", "127.0.0.1", "--port", str(port), "--served-model-name", MODEL,
           "--kv-cache-memory", KV_CACHE_MEMORY, "--device", "cpu", "--max-n", str(MAX_N),
           "--max-request-bytes", str(MAX_REQUEST_BYTES)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(proc, base)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def _wait_healthy(proc: subprocess.Popen[str], base: str) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited ({proc.returncode}):\n{proc.stdout.read()}")
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise RuntimeError("the server did not become healthy in time")


@pytest.fixture(scope="module")
def client(server: str) -> Any:
    return openai.OpenAI(base_url=f"{server}/v1", api_key="none", max_retries=0,
                         timeout=REQUEST_TIMEOUT_S)


@pytest.fixture(scope="module")
def tokenizer(model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def hf_model(model_dir: Path) -> Any:
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


# -- helpers -----------------------------------------------------------------------------------
GREEDY = {"temperature": 0.0}
NO_EOS = {"ignore_eos": True}


def metrics(base: str) -> dict[str, float]:
    """Prometheus samples by name (labels folded into the name as ``name{k=v}``)."""
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    text = httpx.get(f"{base}/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


ABORTS = "tachyon:request_success_total{finished_reason=abort}"


def wait_idle(base: str) -> dict[str, float]:
    """Poll /metrics until nothing runs or waits and every KV block is free."""
    deadline = time.monotonic() + IDLE_TIMEOUT_S
    while True:
        m = metrics(base)
        idle = (m["tachyon:num_requests_running"] == 0 and m["tachyon:num_requests_waiting"] == 0
                and m["tachyon:kv_cache_free_blocks"] == m["tachyon:kv_cache_total_blocks"])
        if idle or time.monotonic() > deadline:
            return m
        time.sleep(0.1)


def assert_idle(base: str) -> dict[str, float]:
    m = wait_idle(base)
    assert m["tachyon:num_requests_running"] == 0
    assert m["tachyon:num_requests_waiting"] == 0
    assert m["tachyon:kv_cache_free_blocks"] == m["tachyon:kv_cache_total_blocks"]
    assert m["tachyon:kv_cache_usage_perc"] == 0
    return m


def hf_greedy(model: Any, prompt: list[int], num_tokens: int) -> tuple[list[int], list[float]]:
    """Greedy continuation and each chosen token's logprob, one full forward per token."""
    ids = list(prompt)
    logprobs = []
    with torch.no_grad():
        for _ in range(num_tokens):
            logits = model(torch.tensor([ids])).logits[0, -1].double()
            token = int(logits.argmax())
            logprobs.append(float(logits.log_softmax(-1)[token]))
            ids.append(token)
    return ids[len(prompt):], logprobs


def ok_request(client: Any) -> None:
    """After an error the server must keep serving."""
    out = client.completions.create(model=MODEL, prompt="ok", max_tokens=2, extra_body=NO_EOS)
    assert out.usage.completion_tokens == 2


def stream_completion(client: Any, **kwargs: Any) -> tuple[dict[int, list[Any]], Any]:
    """Chunks per choice index, and the usage chunk (or None)."""
    per_choice: dict[int, list[Any]] = {}
    usage = None
    for chunk in client.completions.create(model=MODEL, stream=True, **kwargs):
        if chunk.usage is not None:
            assert not chunk.choices
            usage = chunk.usage
        for c in chunk.choices:
            per_choice.setdefault(c.index, []).append(c)
    return per_choice, usage


def check_finish_only_last(chunks: list[Any]) -> None:
    assert all(c.finish_reason is None for c in chunks[:-1])
    assert chunks[-1].finish_reason is not None


# -- basics ------------------------------------------------------------------------------------
def test_models_and_health(server: str, client: Any) -> None:
    assert httpx.get(f"{server}/health", timeout=10).status_code == 200
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]


def test_completion_matches_hf_greedy(client: Any, tokenizer: Any, hf_model: Any) -> None:
    prompt = "The capital of France is"
    ids = tokenizer.encode(prompt)
    out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, logprobs=1,
                                    **GREEDY, extra_body=NO_EOS)
    want_ids, want_lps = hf_greedy(hf_model, ids, 8)
    choice = out.choices[0]
    assert choice.text == tokenizer.decode(want_ids, skip_special_tokens=True,
                                           clean_up_tokenization_spaces=False)
    assert choice.finish_reason == "length"
    assert choice.logprobs.token_logprobs == pytest.approx(want_lps, abs=1e-3)
    assert out.usage.prompt_tokens == len(ids)
    assert out.usage.completion_tokens == 8
    assert out.usage.total_tokens == len(ids) + 8


def test_chat(client: Any, tokenizer: Any, hf_model: Any) -> None:
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Name a color."}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = list(ids if isinstance(ids, list) else ids["input_ids"])
    out = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6,
                                         **GREEDY, extra_body=NO_EOS)
    msg = out.choices[0].message
    assert msg.role == "assistant"
    want, _ = hf_greedy(hf_model, ids, 6)
    assert msg.content == tokenizer.decode(want, skip_special_tokens=True,
                                           clean_up_tokenization_spaces=False)
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (len(ids), 6)
    parts = [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
             {"role": "user", "content": [{"type": "text", "text": "Name a "},
                                          {"type": "text", "text": "color."}]}]
    again = client.chat.completions.create(model=MODEL, messages=parts, max_tokens=6,
                                           **GREEDY, extra_body=NO_EOS)
    assert again.choices[0].message.content == msg.content


def test_chat_top_logprobs(client: Any) -> None:
    out = client.chat.completions.create(model=MODEL, max_tokens=4, logprobs=True,
                                         top_logprobs=3, **GREEDY, extra_body=NO_EOS,
                                         messages=[{"role": "user", "content": "Hi"}])
    content = out.choices[0].logprobs.content
    assert len(content) == 4
    for pos in content:
        tops = [t.logprob for t in pos.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True)
        assert pos.logprob == pytest.approx(tops[0])  # greedy picks the most likely token


# -- streaming ---------------------------------------------------------------------------------
def test_completion_stream_equals_full(client: Any) -> None:
    kwargs = dict(prompt="Once upon a time", max_tokens=12, **GREEDY, extra_body=NO_EOS)
    full = client.completions.create(model=MODEL, **kwargs)
    chunks, usage = stream_completion(client, stream_options={"include_usage": True},
                                      logprobs=0, **kwargs)
    assert list(chunks) == [0]
    # Usually one token per chunk; more when the client reads slower than the engine runs.
    assert sum(len(c.logprobs.tokens) for c in chunks[0]) == 12
    assert "".join(c.text for c in chunks[0]) == full.choices[0].text
    check_finish_only_last(chunks[0])
    assert usage.model_dump() == full.usage.model_dump()


def test_chat_stream_equals_full(client: Any) -> None:
    kwargs = dict(model=MODEL, messages=[{"role": "user", "content": "Tell me a story."}],
                  max_completion_tokens=10, **GREEDY, extra_body=NO_EOS)
    full = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(stream=True, **kwargs,
                                                 stream_options={"include_usage": True}))
    usage = chunks[-1].usage
    deltas = [c.choices[0] for c in chunks if c.choices]
    assert 1 <= len(deltas) <= 10 and usage.completion_tokens == 10
    assert deltas[0].delta.role == "assistant"
    assert all(d.delta.role is None for d in deltas[1:])
    assert "".join(d.delta.content for d in deltas) == full.choices[0].message.content
    check_finish_only_last(deltas)
    assert usage.model_dump() == full.usage.model_dump()


def test_raw_sse_framing(server: str) -> None:
    body = {"model": MODEL, "prompt": [1, 2, 3], "max_tokens": 3, "stream": True,
            "stream_options": {"include_usage": True}, "ignore_eos": True}
    with httpx.stream("POST", f"{server}/v1/completions", json=body, timeout=30) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    payloads = [json.loads(e[6:]) for e in events[:-1]]
    # One choice per content chunk, then the usage chunk with none. Tokens the client has not
    # read yet merge into one chunk (the API process never queues per-token events), so a
    # loaded machine may send the 3 tokens in 2 or even 1 chunk.
    counts = [len(p["choices"]) for p in payloads]
    assert counts[-1] == 0 and all(c == 1 for c in counts[:-1]), counts
    assert 1 <= len(counts) - 1 <= 3, counts
    assert payloads[-2]["choices"][0]["finish_reason"] == "length"
    assert all(p["choices"][0]["finish_reason"] is None for p in payloads[:-2])
    assert payloads[-1]["usage"] == {"prompt_tokens": 3, "completion_tokens": 3,
                                     "total_tokens": 6}


def test_n2(client: Any) -> None:
    kwargs = dict(prompt="Roses are", max_tokens=5, n=2, temperature=1.0, seed=7,
                  extra_body=NO_EOS)
    out = client.completions.create(model=MODEL, **kwargs)
    assert sorted(c.index for c in out.choices) == [0, 1]
    assert out.usage.completion_tokens == 10
    chunks, usage = stream_completion(client, stream_options={"include_usage": True}, **kwargs)
    assert sorted(chunks) == [0, 1]
    for i in (0, 1):
        assert 1 <= len(chunks[i]) <= 5
        check_finish_only_last(chunks[i])
    assert usage.completion_tokens == 10
    # A seed makes sampling reproducible, stream or not.
    assert ["".join(c.text for c in chunks[i]) for i in (0, 1)] == [
        c.text for c in sorted(out.choices, key=lambda c: c.index)]


def test_stop_strings(client: Any) -> None:
    kwargs = dict(prompt="In the beginning", **GREEDY, extra_body=NO_EOS)
    full = client.completions.create(model=MODEL, max_tokens=24, **kwargs).choices[0].text
    words = full.split()
    assert len(words) > 4, full
    stop = words[len(words) // 2]
    want = full[:full.index(stop)]
    out = client.completions.create(model=MODEL, max_tokens=24, stop=[stop, "never-seen"],
                                    **kwargs)
    assert out.choices[0].text == want
    assert out.choices[0].finish_reason == "stop"
    chunks, usage = stream_completion(client, max_tokens=24, stop=stop,
                                      stream_options={"include_usage": True}, **kwargs)
    assert "".join(c.text for c in chunks[0]) == want
    check_finish_only_last(chunks[0])
    assert chunks[0][-1].finish_reason == "stop"
    assert usage.completion_tokens == out.usage.completion_tokens


def test_stop_string_across_tokens_never_leaks(client: Any) -> None:
    """A stop string that begins in one token and ends in the next: the stream must hold the
    first half back until it knows, and never emit it."""
    kwargs = dict(prompt="Long ago", max_tokens=24, **GREEDY, extra_body=NO_EOS)
    full = client.completions.create(model=MODEL, logprobs=0, **kwargs).choices[0]
    tokens = full.logprobs.tokens
    i = next(i for i in range(len(tokens) // 2, len(tokens) - 1)
             if len(tokens[i]) >= 2 and len(tokens[i + 1]) >= 2)
    stop = tokens[i][-2:] + tokens[i + 1][:2]
    want = full.text[:full.text.index(stop)]
    chunks, _ = stream_completion(client, stop=stop, **kwargs)
    assert "".join(c.text for c in chunks[0]) == want
    assert chunks[0][-1].finish_reason == "stop"


def test_prompt_forms_and_echo(client: Any, tokenizer: Any) -> None:
    a, b = tokenizer.encode("Hello there"), tokenizer.encode("General Kenobi, you are")
    by_text = client.completions.create(model=MODEL, prompt=["Hello there",
                                                             "General Kenobi, you are"],
                                        max_tokens=4, **GREEDY, extra_body=NO_EOS)
    by_ids = client.completions.create(model=MODEL, prompt=[a, b], max_tokens=4, **GREEDY,
                                       extra_body=NO_EOS)
    one = client.completions.create(model=MODEL, prompt=b, max_tokens=4, **GREEDY,
                                    extra_body=NO_EOS)
    texts = [c.text for c in sorted(by_ids.choices, key=lambda c: c.index)]
    assert [c.text for c in sorted(by_text.choices, key=lambda c: c.index)] == texts
    assert one.choices[0].text == texts[1]
    assert by_ids.usage.prompt_tokens == len(a) + len(b)
    assert by_ids.usage.completion_tokens == 8
    echo = client.completions.create(model=MODEL, prompt="Hello there", max_tokens=4, echo=True,
                                     **GREEDY, extra_body=NO_EOS)
    assert echo.choices[0].text == "Hello there" + texts[0]


def test_echo_logprobs_and_prompt_logprobs_match_hf(client: Any, tokenizer: Any,
                                                    model_dir: Path) -> None:
    """echo with logprobs lists the prompt's tokens first (the first one null), and vLLM's
    prompt_logprobs comes in the choice: both are HF's float64 log-softmax within 1e-4, and
    each prompt token has its exact rank, in the top-k or not."""
    from tachyon_testing import load_hf

    prompt = "The quick brown fox jumps over the lazy"
    ids = tokenizer.encode(prompt)
    with torch.no_grad():
        ref = load_hf(model_dir)(input_ids=torch.tensor([ids])).logits[0, :-1].log_softmax(-1)
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=3, echo=True,
                                  logprobs=2, **GREEDY,
                                  extra_body={**NO_EOS, "prompt_logprobs": 2})
    c = r.choices[0]
    assert c.text.startswith(prompt)
    lp, n = c.logprobs, len(ids)
    pieces = [tokenizer.decode([t]) for t in ids]
    assert len(lp.tokens) == n + 3 and lp.tokens[:n] == pieces
    assert lp.text_offset[:n] == [sum(len(p) for p in pieces[:i]) for i in range(n)]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    prompt_lps = c.model_extra["prompt_logprobs"]
    assert len(prompt_lps) == n and prompt_lps[0] is None
    for i in range(1, n):
        want = float(ref[i - 1, ids[i]])
        assert abs(lp.token_logprobs[i] - want) < 1e-4, f"position {i}"
        top2 = ref[i - 1].topk(2)
        assert set(lp.top_logprobs[i]) == {pieces[i]} | {tokenizer.decode([int(t)])
                                                          for t in top2.indices}
        entries = prompt_lps[i]
        assert abs(entries[str(ids[i])]["logprob"] - want) < 1e-4, f"position {i}"
        # Its exact rank wherever it falls (up to HF entries within 1e-4 of it).
        lowest, highest = (1 + int((ref[i - 1] > want + d).sum()) for d in (1e-4, -1e-4))
        assert lowest <= entries[str(ids[i])]["rank"] <= highest, f"position {i}"
        for rank, (t, v) in enumerate(zip(top2.indices, top2.values, strict=True), start=1):
            e = entries[str(int(t))]
            assert e["rank"] == rank and abs(e["logprob"] - float(v)) < 1e-4
            assert e["decoded_token"] == tokenizer.decode([int(t)])

    # Streamed: the first chunk carries the prompt's text and its tokens' logprobs.
    chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=3,
                                            echo=True, logprobs=2, stream=True, **GREEDY,
                                            extra_body=NO_EOS))
    first = chunks[0].choices[0]
    assert first.text.startswith(prompt) and first.logprobs.tokens[:n] == pieces
    assert first.logprobs.token_logprobs[0] is None
    assert abs(first.logprobs.token_logprobs[n - 1] - float(ref[n - 2, ids[-1]])) < 1e-4
    with pytest.raises(openai.BadRequestError, match="prompt_logprobs"):
        client.completions.create(model=MODEL, prompt=prompt, max_tokens=1, stream=True,
                                  extra_body={"prompt_logprobs": 1})

    # Chat: one prompt, its logprobs at the top level of the response (as vLLM).
    chat = client.chat.completions.create(model=MODEL, max_tokens=2, **GREEDY,
                                          messages=[{"role": "user", "content": prompt}],
                                          extra_body={"prompt_logprobs": 1})
    chat_lps = chat.model_extra["prompt_logprobs"]
    assert len(chat_lps) == chat.usage.prompt_tokens and chat_lps[0] is None
    assert all(1 <= len(e) <= 2 and any(v["rank"] == 1 for v in e.values())
               for e in chat_lps[1:])


def test_echo_with_max_tokens_zero_returns_only_the_prompt(client: Any, tokenizer: Any,
                                                           model_dir: Path) -> None:
    """As vLLM: ``echo`` with ``max_tokens`` 0 returns each prompt (text, and with logprobs
    its tokens' logprobs, HF's float64 log-softmax within 1e-4) and generates nothing, for
    a text prompt and a token-id prompt, streamed or not; without echo, 0 is a 400."""
    from tachyon_testing import load_hf

    hf = load_hf(model_dir)
    text = "Pack my box with five dozen liquor jugs"
    text_ids = tokenizer.encode(text)
    rng = random.Random("echo-only")
    id_prompt = [rng.randrange(1000, 40000) for _ in range(9)]
    r = client.completions.create(model=MODEL, prompt=[text_ids, id_prompt], max_tokens=0,
                                  echo=True, logprobs=1, extra_body={"prompt_logprobs": 1})
    assert r.usage.completion_tokens == 0
    assert r.usage.prompt_tokens == len(text_ids) + len(id_prompt)
    for c in r.choices:
        ids = [text_ids, id_prompt][c.index]
        with torch.no_grad():
            ref = hf(input_ids=torch.tensor([ids])).logits[0, :-1].log_softmax(-1)
        assert c.text == tokenizer.decode(ids) and c.finish_reason == "length"
        assert c.logprobs.tokens == [tokenizer.decode([t]) for t in ids]
        assert c.logprobs.token_logprobs[0] is None
        for i in range(1, len(ids)):
            want = float(ref[i - 1, ids[i]])
            assert abs(c.logprobs.token_logprobs[i] - want) < 1e-4, f"position {i}"
            assert abs(c.model_extra["prompt_logprobs"][i][str(ids[i])]["logprob"]
                       - want) < 1e-4
    plain = client.completions.create(model=MODEL, prompt=text, max_tokens=0, echo=True)
    assert plain.choices[0].text == text and plain.choices[0].logprobs is None
    assert plain.usage.completion_tokens == 0
    chunks = list(client.completions.create(model=MODEL, prompt=text, max_tokens=0, echo=True,
                                            logprobs=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == text
    streamed = [t for c in chunks if c.choices for t in c.choices[0].logprobs.tokens]
    assert streamed == [tokenizer.decode([t]) for t in text_ids]
    assert chunks[-1].usage.completion_tokens == 0
    for body in ({"max_tokens": 0}, {"max_tokens": 0, "echo": False},
                 {"max_completion_tokens": 0}):
        with pytest.raises(openai.BadRequestError, match="can be 0 only with 'echo'"):
            client.completions.create(model=MODEL, prompt=text, extra_body=body)


# -- errors ------------------------------------------------------------------------------------
def _long_prompt() -> list[int]:
    return [7] * (MAX_MODEL_LEN + 1)


CHAT = [{"role": "user", "content": "hi"}]
ERROR_CASES = {
    "top_logprobs_21": ("chat", {"messages": CHAT, "logprobs": True, "top_logprobs": 21},
                        "top_logprobs"),
    "logprobs_21": ("completions", {"prompt": "x", "logprobs": 21}, "logprobs"),
    "usage_without_stream": ("completions", {"prompt": "x",
                                             "stream_options": {"include_usage": True}},
                             "stream_options"),
    "prompt_too_long": ("completions", {"prompt": _long_prompt()}, "prompt"),
    "prompt_plus_max_tokens_too_long": ("completions", {"prompt": [7] * 500,
                                                        "max_tokens": 100}, "prompt"),
    "max_tokens_0": ("completions", {"prompt": "x", "max_tokens": 0}, "max_tokens"),
    "max_completion_tokens_0": ("chat", {"messages": CHAT, "max_completion_tokens": 0},
                                "max_completion_tokens"),
    "temperature_str": ("completions", {"prompt": "x", "temperature": "hot"}, "temperature"),
    "max_tokens_str": ("completions", {"prompt": "x", "max_tokens": "5"}, "max_tokens"),
    "n_float": ("completions", {"prompt": "x", "n": 1.5}, "n"),
    "stream_str": ("completions", {"prompt": "x", "stream": "yes"}, "stream"),
    "prompt_int": ("completions", {"prompt": 5}, "prompt"),
    "prompt_mixed": ("completions", {"prompt": ["a", [1, 2]]}, "prompt"),
    "messages_str": ("chat", {"messages": "hi"}, "messages"),
    "content_int": ("chat", {"messages": [{"role": "user", "content": 3}]}, "messages"),
    "top_p_0": ("completions", {"prompt": "x", "top_p": 0}, "top_p"),
    "token_out_of_vocab": ("completions", {"prompt": [10**9]}, "prompt"),
    # Each of these once took the engine down or was silently ignored.
    "seed_2_70": ("completions", {"prompt": "x", "seed": 2**70}, "seed"),
    "seed_max_with_n2": ("completions", {"prompt": "x", "seed": 2**63 - 1, "n": 2}, "seed"),
    "seed_negative": ("completions", {"prompt": "x", "seed": -1}, "seed"),
    "n_above_max": ("completions", {"prompt": "x", "n": MAX_N + 1}, "n"),
    "chat_n_above_max": ("chat", {"messages": CHAT, "n": MAX_N + 1}, "n"),
    "best_of": ("completions", {"prompt": "x", "best_of": 3}, "best_of"),
    "suffix": ("completions", {"prompt": "x", "suffix": "the end"}, "suffix"),
    "lone_surrogate": ("completions", {"prompt": "a\ud800b"}, "prompt"),
    "chat_lone_surrogate": ("chat", {"messages": [{"role": "user", "content": "\udfff"}]},
                            "messages"),
    "prompt_chars_too_many": ("completions", {"prompt": "ab " * (MAX_MODEL_LEN * 11)},
                              "prompt"),
}


@pytest.mark.parametrize("case", sorted(ERROR_CASES))
def test_bad_request_400(server: str, client: Any, case: str) -> None:
    endpoint, body, param = ERROR_CASES[case]
    path = "/v1/chat/completions" if endpoint == "chat" else "/v1/completions"
    raw = json.dumps({"model": MODEL, **body})  # ASCII: lone surrogates stay escaped
    r = httpx.post(f"{server}{path}", content=raw.encode(), timeout=30,
                   headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error" and err["message"]
    assert err["param"] == param
    ok_request(client)


def test_bad_request_via_openai_client(client: Any) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=CHAT, logprobs=True,
                                       top_logprobs=21)
    assert e.value.status_code == 400
    ok_request(client)


def test_huge_prompt_refused_before_tokenizing(server: str, client: Any) -> None:
    """A prompt with more characters than the context could hold is refused by its size
    alone (the message counts characters, not tokens)."""
    r = httpx.post(f"{server}/v1/completions", timeout=30,
                   json={"model": MODEL, "prompt": "z" * (MAX_REQUEST_BYTES - 100)})
    assert r.status_code == 400, r.text
    assert "characters" in r.json()["error"]["message"]
    ok_request(client)


def test_body_too_large_413(server: str, client: Any) -> None:
    body = json.dumps({"model": MODEL, "prompt": "y" * MAX_REQUEST_BYTES}).encode()
    r = httpx.post(f"{server}/v1/completions", content=body, timeout=30,
                   headers={"content-type": "application/json"})
    assert r.status_code == 413, r.text
    assert r.json()["error"]["code"] == "request_too_large"

    def chunked() -> Iterator[bytes]:  # no Content-Length: counted as it streams in
        yield body[: len(body) // 2]
        yield body[len(body) // 2:]

    r = httpx.post(f"{server}/v1/completions", content=chunked(), timeout=30,
                   headers={"content-type": "application/json"})
    assert r.status_code == 413, r.text
    ok_request(client)


def test_best_of_equal_to_n_is_accepted(client: Any) -> None:
    out = client.completions.create(model=MODEL, prompt="x", max_tokens=2, n=2, best_of=2,
                                    extra_body=NO_EOS)
    assert len(out.choices) == 2


@pytest.mark.parametrize("raw", [b'{"model": "tiny", "prompt": ', b"[1, 2]", b"\xff\xfe"])
def test_malformed_json_400(server: str, client: Any, raw: bytes) -> None:
    r = httpx.post(f"{server}/v1/completions", content=raw, timeout=30,
                   headers={"content-type": "application/json"})
    assert r.status_code == 400
    assert r.json()["error"]["type"] == "invalid_request_error"
    ok_request(client)


def test_unknown_model_404(client: Any) -> None:
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-17", prompt="x", max_tokens=2)
    assert e.value.body["code"] == "model_not_found"
    ok_request(client)


# -- metrics and bench ------------------------------------------------------------------------
def test_metrics_count_exactly(server: str, client: Any) -> None:
    before = assert_idle(server)
    prompt = list(range(100, 164))  # four full blocks of 16
    for _ in range(2):  # the second run finds the prompt in the prefix cache
        client.completions.create(model=MODEL, prompt=prompt, max_tokens=5, extra_body=NO_EOS)
    after = assert_idle(server)

    def delta(name: str) -> float:
        return after[name] - before[name]

    assert delta("tachyon:prompt_tokens_total") == 2 * len(prompt)
    assert delta("tachyon:generation_tokens_total") == 2 * 5
    assert delta("tachyon:time_to_first_token_seconds_count") == 2
    assert delta("tachyon:inter_token_latency_seconds_count") == 2 * 4
    assert delta("tachyon:e2e_request_latency_seconds_count") == 2
    assert delta("tachyon:request_success_total{finished_reason=length}") == 2
    assert delta("tachyon:prefix_cache_hits_total") >= 48
    assert 0 < after["tachyon:prefix_cache_hit_rate"] <= 1
    # The core's time split: its loop holds the steps and the sends, a step holds its wait
    # on the device (0 here: CPU steps are synchronous).
    loop, step = delta("tachyon:engine_loop_seconds_total"), delta(
        "tachyon:engine_step_seconds_total")
    send, wait = delta("tachyon:engine_send_seconds_total"), delta(
        "tachyon:engine_wait_seconds_total")
    assert delta("tachyon:engine_steps_total") >= 2 * 5
    assert loop >= step + send and step > 0 and send > 0 and 0 <= wait <= step


def test_bench_serve(server: str, tmp_path: Path) -> None:
    from tachyon.bench.serve import main, random_workload

    out = tmp_path / "bench.json"
    args = ["--base-url", server, "--dataset", "random", "--num-prompts", "12",
            "--random-input-len", "16", "--random-output-len", "4", "--random-range-ratio",
            "0.5", "--request-rate", "50", "--max-concurrency", "4", "--ignore-eos",
            "--json", str(out)]
    assert main(args) == 0
    result = json.loads(out.read_text())
    summary, reqs = result["summary"], result["requests"]
    assert (summary["completed"], summary["failed"]) == (12, 0)
    want = random_workload(12, 16, 4, 0.5, 0)
    assert [r["output_tokens"] for r in reqs] == [w.max_tokens for w in want]
    assert [r["prompt_len"] for r in reqs] == [len(w.prompt) for w in want]
    assert all(len(r["itl"]) <= r["output_tokens"] - 1 for r in reqs)
    for key in ("ttft_ms", "tpot_ms", "itl_ms"):
        assert set(summary[key]) == {"mean", "std", "median", "p99"}
    assert summary["ttft_ms"]["median"] > 0 and summary["output_throughput"] > 0
    assert_idle(server)


def test_bench_serve_vllm_command_line(server: str, model_dir: Path, tokenizer: Any,
                                       tmp_path: Path) -> None:
    """``vllm bench serve``'s own options (text prompts through --tokenizer) and its result
    file's fields."""
    from tachyon.bench.serve import main, random_workload

    port = httpx.URL(server).port
    args = ["--backend", "openai", "--host", "127.0.0.1", "--port", str(port),
            "--endpoint", "/v1/completions", "--model", MODEL, "--tokenizer", str(model_dir),
            "--dataset-name", "random", "--random-input-len", "12", "--random-output-len", "5",
            "--random-range-ratio", "0.2", "--num-prompts", "8", "--request-rate", "inf",
            "--ignore-eos", "--seed", "0", "--save-result", "--result-dir", str(tmp_path),
            "--result-filename", "r.json", "--disable-tqdm"]
    assert main(args) == 0
    r = json.loads((tmp_path / "r.json").read_text())
    assert (r["completed"], r["failed"], r["num_prompts"]) == (8, 0, 8)
    assert r["output_lens"] == [w.max_tokens for w in random_workload(8, 12, 5, 0.2, 0)]
    assert r["total_output_tokens"] == sum(r["output_lens"])
    assert all(n > 0 for n in r["input_lens"])  # as the server counted the text's tokens
    for key in ("output_throughput", "request_throughput", "total_token_throughput",
                "mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms", "mean_tpot_ms",
                "p99_tpot_ms", "mean_itl_ms", "p99_itl_ms", "duration"):
        assert r[key] > 0, key
    assert_idle(server)


def test_bench_serve_fails_with_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    from tachyon.bench.serve import main

    assert main(["--port", str(_free_port()), "--num-prompts", "2"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("tachyon bench serve: error:") and len(err.splitlines()) == 1


# -- disconnects and load ----------------------------------------------------------------------
def test_stream_disconnect_aborts(server: str, client: Any) -> None:
    before = assert_idle(server)[ABORTS]
    stream = client.completions.create(model=MODEL, prompt="Go on", stream=True,
                                       max_tokens=LONG_MAX_TOKENS, extra_body=NO_EOS)
    for i, _ in enumerate(stream):
        if i == 2:
            break
    stream.close()
    m = assert_idle(server)
    assert m[ABORTS] == before + 1


def _wait_running(base: str) -> None:
    deadline = time.monotonic() + IDLE_TIMEOUT_S
    while metrics(base)["tachyon:num_requests_running"] == 0:
        assert time.monotonic() < deadline, "the request never started running"
        time.sleep(0.02)


def test_nonstream_disconnect_aborts(server: str) -> None:
    """A raw socket, so the client leaves exactly while its request runs."""
    before = assert_idle(server)[ABORTS]
    body = json.dumps({"model": MODEL, "prompt": "Go on", "max_tokens": LONG_MAX_TOKENS,
                       "n": 8, "ignore_eos": True}).encode()
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n")
    port = httpx.URL(server).port
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head.encode() + body)
        _wait_running(server)
    m = assert_idle(server)
    assert m[ABORTS] == before + 1


NUM_LOAD_REQUESTS = 300
NUM_DISCONNECTS = 30
CHUNKS_BEFORE_DISCONNECT = 3


async def _load(server: str, jobs: list[dict[str, Any]], leave: set[int]) -> list[str | None]:
    client = openai.AsyncOpenAI(base_url=f"{server}/v1", api_key="none", max_retries=0,
                                timeout=REQUEST_TIMEOUT_S)

    async def one(i: int) -> str | None:
        stream = await client.completions.create(model=MODEL, stream=True, **jobs[i])
        texts = []
        async for chunk in stream:
            texts.append(chunk.choices[0].text)
            if i in leave and len(texts) == CHUNKS_BEFORE_DISCONNECT:
                await stream.close()
                return None
        return "".join(texts)

    try:
        return await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(len(jobs)))),
                                      REQUEST_TIMEOUT_S)
    finally:
        await client.close()


def test_load_with_disconnects(server: str, client: Any) -> None:
    """300 concurrent streams of random lengths, 30 leave midway: every finished stream equals
    the same request run alone, and afterwards every KV block is free."""
    rng = random.Random(1234)
    before = assert_idle(server)[ABORTS]
    leave = set(rng.sample(range(NUM_LOAD_REQUESTS), NUM_DISCONNECTS))
    jobs = []
    for i in range(NUM_LOAD_REQUESTS):
        prompt = [rng.randrange(10, 40000) for _ in range(rng.randint(1, 48))]
        max_tokens = LONG_MAX_TOKENS if i in leave else rng.randint(1, 16)
        jobs.append({"prompt": prompt, "max_tokens": max_tokens, **GREEDY,
                     "extra_body": NO_EOS if i in leave else {}})
    streamed = asyncio.run(_load(server, jobs, leave))
    m = assert_idle(server)
    assert m[ABORTS] == before + NUM_DISCONNECTS
    for i, text in enumerate(streamed):
        if i in leave:
            continue
        alone = client.completions.create(model=MODEL, **jobs[i])
        assert text == alone.choices[0].text, f"request {i} differs from its run alone"
    assert_idle(server)


# -- the same requests through LLM.generate -------------------------------------------------
def test_outputs_equal_llm_generate(model_dir: Path, client: Any, tokenizer: Any) -> None:
    """Greedy, seeded (n = 2) and stop-string requests: the server's texts, token counts and
    finish reasons equal those of ``LLM.generate`` for the same prompts and parameters."""
    from tachyon import LLM, SamplingParams

    prompts = ["The capital of France is", "Once upon a time", "def fib(n):"]
    cases = [dict(temperature=0.0, max_tokens=12),
             dict(temperature=0.9, top_p=0.9, seed=1234, n=2, max_tokens=10),
             dict(temperature=0.0, max_tokens=24, stop=["e"])]
    served = []
    for kw in cases:
        extra = {"ignore_eos": True}
        out = client.completions.create(model=MODEL, prompt=prompts, extra_body=extra, **kw)
        served.append([(c.text, c.finish_reason) for c in sorted(out.choices,
                                                                  key=lambda c: c.index)])
    llm = LLM(model=str(model_dir), kv_cache_memory=KV_CACHE_MEMORY, device="cpu")
    try:
        for kw, got in zip(cases, served, strict=True):
            params = SamplingParams(ignore_eos=True, **kw)
            want = [(o.text, o.finish_reason) for r in llm.generate(prompts, params,
                                                                    use_tqdm=False)
                    for o in r.outputs]
            assert got == want, kw
    finally:
        llm.engine.shutdown()
