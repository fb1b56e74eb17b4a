"""The CPU twin of tests/gpu/test_structured_gpu.py (eager, no graphs): on the embedded
SmolLM2-135M-Instruct, every json_schema answer of ``structured_testing.SCHEMAS`` (enum,
arrays, nesting, patterns, bounded numbers) validates with ``jsonschema``, and a batch where
half the requests are constrained gives each request exactly what it gives alone (greedy)."""

from __future__ import annotations

import json
from typing import Any

import jsonschema

from structured_testing import (
    FREE_QUESTIONS,
    QUESTIONS,
    SCHEMAS,
    chat_prompt,
    check_mixed_batch_matches_alone,
    check_schemas_validate,
    constrained,
)
from tachyon import LLM, SamplingParams


def test_json_schemas_validate(default_llm: Any) -> None:
    check_schemas_validate(default_llm)


def test_mixed_batch_matches_each_request_alone(default_llm: Any) -> None:
    check_mixed_batch_matches_alone(default_llm, max_tokens=16)  # 10 s on 2 CPU cores


def test_asynchronous_scheduling_keeps_every_grammar(default_llm: Any) -> None:
    """Grammars no longer force the synchronous path: with asynchronous scheduling (step
    N+1 queued before step N's tokens reach the host) the runner advances the matchers with
    step N's tokens before it fills N+1's bitmask. Every constrained and free request of a
    mixed batch gives exactly the synchronous engine's tokens, and the JSON validates."""
    async_llm = LLM(device="cpu", dtype="float32", max_model_len=512, kv_cache_memory="64MiB",
                    max_num_seqs=16, async_scheduling=True)
    try:
        core = async_llm.engine.core
        assert core.async_scheduling
        names = list(SCHEMAS)
        prompts = [chat_prompt(default_llm, QUESTIONS[n]) for n in names] + \
            [chat_prompt(default_llm, q) for q in FREE_QUESTIONS[:2]]
        params = [constrained(SCHEMAS[n], 24) for n in names] + \
            [SamplingParams(temperature=0.0, max_tokens=24)] * 2
        want = default_llm.generate(prompts, params, use_tqdm=False)
        got = async_llm.generate(prompts, params, use_tqdm=False)
        assert not core._penalty_requests  # nothing pushed the core onto the sync path
        for i, (w, g) in enumerate(zip(want, got, strict=True)):
            assert g.outputs[0].token_ids == w.outputs[0].token_ids, f"request {i}"
        for name, out in zip(names, got, strict=False):
            if out.outputs[0].finish_reason == "stop":
                jsonschema.validate(json.loads(out.outputs[0].text), SCHEMAS[name])
    finally:
        async_llm.engine.shutdown()
