"""Structured-output checks shared by the GPU test (every CUDA graph mode) and its CPU twin.

The references are independent of the engine: ``jsonschema`` for what a constrained answer
must be, and the same request run alone for what a mixed batch must give.
"""

from __future__ import annotations

import json
from typing import Any

import jsonschema

from tachyon import LLM, SamplingParams
from tachyon.structured_output.params import StructuredOutputsParams

# Bounded lengths and numbers throughout: unbounded, a 135M model may write digits or
# characters until max_tokens cuts the JSON short.
SCHEMAS: dict[str, dict[str, Any]] = {
    "enum": {
        "type": "object",
        "properties": {"mood": {"enum": ["happy", "sad", "neutral"]},
                       "color": {"type": "string", "enum": ["red", "green", "blue"]}},
        "required": ["mood", "color"], "additionalProperties": False,
    },
    "array": {
        "type": "object",
        "properties": {"tags": {"type": "array", "items": {"type": "string", "maxLength": 16},
                                "minItems": 1, "maxItems": 3},
                       "scores": {"type": "array", "minItems": 2, "maxItems": 2,
                                  "items": {"type": "integer", "minimum": 0, "maximum": 9}}},
        "required": ["tags", "scores"], "additionalProperties": False,
    },
    "nested": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 30},
            "address": {
                "type": "object",
                "properties": {"street": {"type": "string", "maxLength": 30},
                               "city": {"type": "object",
                                        "properties": {
                                            "name": {"type": "string", "maxLength": 20},
                                            "population": {"type": "integer", "minimum": 0,
                                                           "maximum": 10**8}},
                                        "required": ["name", "population"],
                                        "additionalProperties": False}},
                "required": ["street", "city"], "additionalProperties": False},
            "manager": {"type": "boolean"},
        },
        "required": ["name", "address", "manager"], "additionalProperties": False,
    },
    "pattern": {
        "type": "object",
        "properties": {"code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
                       "date": {"type": "string",
                                "pattern": "^20[0-9]{2}-[01][0-9]-[0-3][0-9]$"}},
        "required": ["code", "date"], "additionalProperties": False,
    },
    "numbers": {
        "type": "object",
        "properties": {"celsius": {"type": "number", "minimum": -90, "maximum": 60},
                       "stars": {"type": "integer", "minimum": 1, "maximum": 5},
                       "ok": {"type": "boolean"}},
        "required": ["celsius", "stars", "ok"], "additionalProperties": False,
    },
}
QUESTIONS = {
    "enum": "How do you feel today, and what is your favourite color? Answer in JSON.",
    "array": "Give a few tags and two scores for a blog post about cats, in JSON.",
    "nested": "Describe an employee and their address in JSON.",
    "pattern": "Give a product code like ABC-1234 and a date, in JSON.",
    "numbers": "Rate the weather today in JSON.",
}
FREE_QUESTIONS = [
    "Write one sentence about the sea.",
    "List three fruits.",
    "What is the capital of France?",
    "Tell me a short joke.",
    "Explain what a CPU does in one sentence.",
]
MAX_TOKENS = 160


def chat_prompt(llm: LLM, question: str) -> list[int]:
    from tachyon.entrypoints.llm import apply_chat_template

    return apply_chat_template(llm.get_tokenizer(), [{"role": "user", "content": question}])


def constrained(schema: dict[str, Any], max_tokens: int = MAX_TOKENS) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens,
                          structured_outputs=StructuredOutputsParams(json=json.dumps(schema)))


def check_schemas_validate(llm: LLM, names: list[str] | None = None) -> None:
    """Each schema's answer (all in one batch) ends by itself and validates."""
    names = list(SCHEMAS) if names is None else names
    outs = llm.generate([chat_prompt(llm, QUESTIONS[n]) for n in names],
                        [constrained(SCHEMAS[n]) for n in names], use_tqdm=False)
    for name, out in zip(names, outs, strict=True):
        o = out.outputs[0]
        assert o.finish_reason == "stop", (name, o.text)
        jsonschema.validate(json.loads(o.text), SCHEMAS[name])


def check_mixed_batch_matches_alone(llm: LLM, max_tokens: int = 48) -> None:
    """Half the batch constrained (one schema each), half free, interleaved: every greedy
    output equals that request run alone. Constrained answers validate when they end."""
    names = list(SCHEMAS)
    prompts: list[list[int]] = []
    params: list[SamplingParams] = []
    for name, free in zip(names, FREE_QUESTIONS, strict=True):
        prompts += [chat_prompt(llm, QUESTIONS[name]), chat_prompt(llm, free)]
        params += [constrained(SCHEMAS[name], max_tokens),
                   SamplingParams(temperature=0.0, max_tokens=max_tokens)]
    together = llm.generate(prompts, params, use_tqdm=False)
    for i, (prompt, sp) in enumerate(zip(prompts, params, strict=True)):
        alone = llm.generate([prompt], sp, use_tqdm=False)[0].outputs[0]
        got = together[i].outputs[0]
        kind = "constrained" if sp.structured_outputs is not None else "free"
        assert got.token_ids == alone.token_ids, f"request {i} ({kind}) differs in the batch"
        if sp.structured_outputs is not None and got.finish_reason == "stop":
            jsonschema.validate(json.loads(got.text), SCHEMAS[names[i // 2]])
