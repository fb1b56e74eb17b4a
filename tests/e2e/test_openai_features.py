"""What agent frameworks use, against a live ``tachyon serve`` (issue 16): structured outputs
through the openai SDK's ``parse``, tool calls through the SDK and langchain-openai, the API
key on every route but /health, the small endpoints' shapes, and LoRA adapters over HTTP.

Structured outputs and tools run on the embedded SmolLM2-135M-Instruct (a real model: its
answers are short and end), each answer checked by ``jsonschema`` against the schema that
was sent, never against the server's own idea of it. LoRA runs on a tiny random Llama with a
random PEFT adapter (token-id prompts: the tiny model has no tokenizer).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("xgrammar")
from pydantic import BaseModel, Field  # noqa: E402

API_KEY = "test-key-0123456789"
STARTUP_TIMEOUT_S = 180.0
REQUEST_TIMEOUT_S = 120.0
MAX_TOKENS = 160


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(args: list[str], env: dict[str, str] | None = None) -> Iterator[str]:
    port = _free_port()
    cmd = [sys.executable, "-m", "tachyon.entrypoints.cli", "serve", *args, "--host",
           "127.0.0.1", "--port", str(port), "--device", "cpu", "--kv-cache-memory", "64MiB"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **(env or {})})
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited ({proc.returncode}):\n"
                                   f"{proc.stdout.read()}")
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the server did not become healthy in time")
            time.sleep(0.5)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@pytest.fixture(scope="module")
def server(default_gguf: str) -> Iterator[str]:
    # The key comes from the environment here; --api-key is the same setting.
    yield from _start(["--enable-auto-tool-choice", "--tool-call-parser", "hermes",
                       "--max-model-len", "2048"],
                      env={"TACHYON_API_KEY": API_KEY})


@pytest.fixture(scope="module")
def client(server: str) -> Any:
    return openai.OpenAI(base_url=f"{server}/v1", api_key=API_KEY, max_retries=0,
                         timeout=REQUEST_TIMEOUT_S)


def _auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {API_KEY}"}


# -- 20 schemas for client.beta.chat.completions.parse ------------------------------------
class Color(StrEnum):
    red = "red"
    green = "green"
    blue = "blue"


class Point(BaseModel):
    x: int
    y: int


class City(BaseModel):
    name: str = Field(max_length=40)
    population: int = Field(ge=0, le=10**9)  # unbounded, a 135M model writes 1s forever


class Person(BaseModel):
    name: str = Field(max_length=40)
    age: int = Field(ge=0, le=130)


class Address(BaseModel):
    street: str = Field(max_length=40)
    city: City


class Employee(BaseModel):
    person: Person
    address: Address
    manager: bool


class Palette(BaseModel):
    colors: list[Color] = Field(min_length=1, max_length=4)


class Temperature(BaseModel):
    celsius: float = Field(ge=-90, le=60)


class Polygon(BaseModel):
    points: list[Point] = Field(min_length=3, max_length=5)


class Rating(BaseModel):
    stars: int = Field(ge=1, le=5)
    comment: str = Field(max_length=60)


class Flag(BaseModel):
    enabled: bool


class Tags(BaseModel):
    tags: list[str] = Field(min_length=1, max_length=3)


class Mood(BaseModel):
    mood: Literal["happy", "sad", "neutral"]


class Matrix(BaseModel):
    rows: list[list[int]] = Field(min_length=2, max_length=2)


class Book(BaseModel):
    title: str = Field(max_length=40)
    year: int = Field(ge=1400, le=2030)
    authors: list[Person] = Field(min_length=1, max_length=2)


class Order(BaseModel):
    item: str = Field(max_length=30)
    quantity: int = Field(ge=1, le=100)
    price: float = Field(ge=0)


class Weather(BaseModel):
    city: str = Field(max_length=30)
    sky: Literal["clear", "cloudy", "rain"]
    temperature: Temperature


class Inventory(BaseModel):
    orders: list[Order] = Field(max_length=2)
    total: float


class Team(BaseModel):
    name: str = Field(max_length=30)
    members: list[Person] = Field(min_length=1, max_length=2)
    color: Color


class Nullable(BaseModel):
    nickname: str | None = Field(max_length=20)
    score: int = Field(ge=-10, le=10)


class Pair(BaseModel):
    first: Person
    second: Point


SCHEMAS: list[type[BaseModel]] = [
    Point, City, Person, Address, Employee, Palette, Temperature, Polygon, Rating, Flag, Tags,
    Mood, Matrix, Book, Order, Weather, Inventory, Team, Nullable, Pair,
]


def test_sdk_parse_twenty_schemas(client: Any) -> None:
    """Every answer parses into its model and validates against the schema sent."""
    def one(model: type[BaseModel]) -> tuple[type[BaseModel], Any]:
        return model, client.beta.chat.completions.parse(
            model="SmolLM2-135M-Instruct", response_format=model, temperature=0,
            max_tokens=MAX_TOKENS,
            messages=[{"role": "user", "content": f"Give an example {model.__name__}."}])

    with ThreadPoolExecutor(len(SCHEMAS)) as pool:  # one batch for the engine
        results = list(pool.map(one, SCHEMAS))
    for model, completion in results:
        choice = completion.choices[0]
        assert choice.finish_reason == "stop", (model.__name__, choice.message.content)
        assert isinstance(choice.message.parsed, model)
        jsonschema.validate(json.loads(choice.message.content), model.model_json_schema())


def test_json_object_and_choice_and_regex(client: Any) -> None:
    r = client.chat.completions.create(
        model="SmolLM2-135M-Instruct", temperature=0.7, seed=3, max_tokens=MAX_TOKENS, n=3,
        response_format={"type": "json_object"},
        messages=[{"role": "user", "content": "Describe a cat."}])
    for c in r.choices:
        if c.finish_reason == "stop":
            assert isinstance(json.loads(c.message.content), dict)
    assert any(c.finish_reason == "stop" for c in r.choices)
    r = client.completions.create(model="SmolLM2-135M-Instruct", prompt="Is water wet?",
                                  max_tokens=8, extra_body={"guided_choice": ["yes", "no"]})
    assert r.choices[0].text in ("yes", "no")
    r = client.completions.create(
        model="SmolLM2-135M-Instruct", prompt="A phone number:", max_tokens=20,
        extra_body={"structured_outputs": {"regex": r"\d{3}-\d{4}"}})
    assert r.choices[0].text[:3].isdigit() and r.choices[0].text[3] == "-"


def test_uncompilable_schema_is_400(client: Any) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model="SmolLM2-135M-Instruct", messages=[{"role": "user", "content": "hi"}],
            response_format={"type": "json_schema",
                             "json_schema": {"name": "x", "schema": {"type": "wat"}}})
    assert "wat" in str(e.value) and e.value.body["param"] == "response_format"


# -- tools -------------------------------------------------------------------------------
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 30},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"], "additionalProperties": False}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function",
                                                      "function": {"name": "get_weather"}}])
def test_sdk_tool_calls(client: Any, tool_choice: Any) -> None:
    r = client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=ASK,
                                       tools=[WEATHER_TOOL], tool_choice=tool_choice,
                                       temperature=0, max_tokens=MAX_TOKENS)
    calls = r.choices[0].message.tool_calls
    assert calls and calls[0].function.name == "get_weather"
    jsonschema.validate(json.loads(calls[0].function.arguments),
                        WEATHER_TOOL["function"]["parameters"])
    stream = client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=ASK,
                                            tools=[WEATHER_TOOL], tool_choice=tool_choice,
                                            temperature=0, max_tokens=MAX_TOKENS, stream=True)
    args, names, reasons = "", [], []
    for chunk in stream:
        for d in chunk.choices[0].delta.tool_calls or ():
            names += [d.function.name] if d.function.name else []
            args += d.function.arguments or ""
        reasons.append(chunk.choices[0].finish_reason)
    assert names == ["get_weather"] and json.loads(args) == json.loads(
        calls[0].function.arguments)
    assert reasons[-1] == r.choices[0].finish_reason


def test_auto_without_parser_call_is_text(client: Any) -> None:
    """tool_choice "auto": the hermes parser leaves a plain answer as content."""
    r = client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=[
        {"role": "user", "content": "Say hello."}], tools=[WEATHER_TOOL], temperature=0,
        max_tokens=20)
    m = r.choices[0].message
    assert (m.content and not m.tool_calls) or m.tool_calls


@pytest.mark.parametrize("streamed", [False, True])
def test_langchain_bind_tools_round_trip(server: str, streamed: bool) -> None:
    lc = pytest.importorskip("langchain_openai")
    from langchain_core.messages import HumanMessage, ToolMessage

    llm = lc.ChatOpenAI(model="SmolLM2-135M-Instruct", base_url=f"{server}/v1",
                        api_key=API_KEY, temperature=0, max_tokens=MAX_TOKENS, max_retries=0)

    def get_weather(city: str, unit: Literal["celsius", "fahrenheit"]) -> str:
        """The weather in a city."""
        return f"22 degrees {unit} and sunny in {city}"

    forced = llm.bind_tools([get_weather], tool_choice="get_weather")
    history: list[Any] = [HumanMessage("What is the weather in Paris?")]
    if streamed:
        ai = None
        for chunk in forced.stream(history):
            ai = chunk if ai is None else ai + chunk
    else:
        ai = forced.invoke(history)
    assert ai.tool_calls and ai.tool_calls[0]["name"] == "get_weather"
    call = ai.tool_calls[0]
    assert set(call["args"]) == {"city", "unit"}
    history += [ai, ToolMessage(get_weather(**call["args"]), tool_call_id=call["id"])]
    answer = llm.bind_tools([get_weather]).invoke(history)  # "auto": the parser decides
    assert answer.content or answer.tool_calls


# -- auth and the small endpoints ---------------------------------------------------------
PROTECTED = [("GET", "/v1/models", None), ("GET", "/metrics", None),
             ("GET", "/version", None), ("GET", "/ping", None), ("POST", "/ping", None),
             ("POST", "/tokenize", {"prompt": "hi"}), ("POST", "/detokenize", {"tokens": [1]}),
             ("POST", "/v1/completions", {"prompt": "hi", "max_tokens": 1}),
             ("POST", "/v1/chat/completions",
              {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}),
             ("POST", "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "/nope"}),
             ("POST", "/v1/unload_lora_adapter", {"lora_name": "x"})]


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"},
                                     {"Authorization": API_KEY}], ids=["none", "wrong", "raw"])
def test_api_key_on_every_route_but_health(server: str, headers: dict[str, str]) -> None:
    for method, path, body in PROTECTED:
        r = httpx.request(method, server + path, json=body, headers=headers, timeout=30)
        assert r.status_code == 401, (method, path)
        assert r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{server}/health", timeout=10).status_code == 200


def test_small_endpoints(server: str, client: Any) -> None:
    h = _auth()
    tok = httpx.post(f"{server}/tokenize", json={"model": "SmolLM2-135M-Instruct",
                                                  "prompt": "Hello world"}, headers=h).json()
    assert set(tok) == {"count", "max_model_len", "tokens"} and tok["count"] == len(
        tok["tokens"]) and tok["max_model_len"] == 2048
    detok = httpx.post(f"{server}/detokenize", json={"tokens": tok["tokens"]}, headers=h).json()
    assert detok == {"prompt": "Hello world"}
    msgs = [{"role": "user", "content": "hi"}]
    chat = httpx.post(f"{server}/tokenize", json={"messages": msgs}, headers=h).json()
    cont = httpx.post(f"{server}/tokenize", json={
        "messages": [*msgs, {"role": "assistant", "content": "Hel"}],
        "continue_final_message": True}, headers=h).json()
    # Continuing the assistant's message: its text is the prompt's end, nothing closes it.
    assert cont["tokens"][:chat["count"]] == chat["tokens"]
    assert httpx.post(f"{server}/detokenize", json={"tokens": cont["tokens"]},
                      headers=h).json()["prompt"].endswith("Hel")
    assert httpx.get(f"{server}/version", headers=h).json()["version"]
    assert httpx.get(f"{server}/ping", headers=h).status_code == 200
    r = client.completions.create(model="SmolLM2-135M-Instruct", prompt="1, 2, 3,",
                                  max_tokens=30, temperature=0, stop=[" 5"])
    assert r.system_fingerprint and r.choices[0].model_extra["stop_reason"] == " 5"


# -- LoRA over HTTP -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def lora_server(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
                ) -> Iterator[tuple[str, Path]]:
    pytest.importorskip("peft")
    from lora_testing import AdapterSpec, write_adapter

    base = tiny_models["llama"]
    root = tmp_path_factory.mktemp("adapters")
    a1 = write_adapter(base, root / "a1", AdapterSpec(r=8, alpha=16), seed=1)
    a2 = write_adapter(base, root / "a2", AdapterSpec(r=8, alpha=16), seed=2)
    for url in _start([str(base), "--served-model-name", "base", "--enable-lora",
                       "--max-loras", "2", "--max-model-len", "256",
                       "--lora-modules", f"a1={a1}"]):
        yield url, a2


def test_lora_over_http(lora_server: tuple[str, Path]) -> None:
    base_url, a2 = lora_server

    def complete(model: str) -> Any:
        return httpx.post(f"{base_url}/v1/completions", timeout=60, json={
            "model": model, "prompt": [1, 2, 3, 4], "max_tokens": 8, "temperature": 0,
            "ignore_eos": True, "logprobs": 0})

    def models() -> list[str]:
        return [m["id"] for m in httpx.get(f"{base_url}/v1/models").json()["data"]]

    assert models() == ["base", "a1"]
    r = httpx.post(f"{base_url}/v1/load_lora_adapter", json={"lora_name": "a2",
                                                             "lora_path": str(a2)})
    assert r.status_code == 200, r.text
    assert models() == ["base", "a1", "a2"]
    # No tokenizer: the tokens come back as "token_id:N" in the logprobs.
    outs = {m: tuple(complete(m).json()["choices"][0]["logprobs"]["tokens"])
            for m in ("base", "a1", "a2")}
    assert len(set(outs.values())) == 3, outs  # each adapter moves the greedy tokens
    assert complete("a2").json()["model"] == "a2"
    bad = httpx.post(f"{base_url}/v1/load_lora_adapter", json={"lora_name": "a3",
                                                               "lora_path": "/no/such/dir"})
    assert bad.status_code == 400 and bad.json()["error"]["message"]
    assert httpx.post(f"{base_url}/v1/unload_lora_adapter",
                      json={"lora_name": "a2"}).status_code == 200
    assert models() == ["base", "a1"]
    assert complete("a2").status_code == 404
