"""The CPU twin of tests/gpu/test_structured_gpu.py (eager, no graphs): on the embedded
SmolLM2-135M-Instruct, every json_schema answer of ``structured_testing.SCHEMAS`` (enum,
arrays, nesting, patterns, bounded numbers) validates with ``jsonschema``, and a batch where
half the requests are constrained gives each request exactly what it gives alone (greedy)."""

from __future__ import annotations

from typing import Any

import pytest

pytest.importorskip("xgrammar")
pytest.importorskip("jsonschema")

from structured_testing import (
    check_mixed_batch_matches_alone,
    check_schemas_validate,
)


def test_json_schemas_validate(default_llm: Any) -> None:
    check_schemas_validate(default_llm)


def test_mixed_batch_matches_each_request_alone(default_llm: Any) -> None:
    check_mixed_batch_matches_alone(default_llm, max_tokens=16)  # 10 s on 2 CPU cores
