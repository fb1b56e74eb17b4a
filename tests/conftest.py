"""Shared fixtures: tiny random HF checkpoints written once per session, the embedded
default model and its tokenizer, and a seeded random generator per test."""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

# One intra-op thread per process: the suite's models are tiny, and on a 2-core machine two
# OpenMP threads in each of pytest, the servers and the TP workers it starts spin against
# each other (measured 5-9x slower per decode step than one thread). Set before torch loads;
# subprocesses inherit it. An OMP_NUM_THREADS set by the caller wins.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

# Without a GPU, Triton kernels run in the interpreter. Triton reads the switch when a kernel
# is decorated, so it must be set before any test module imports tachyon's kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tachyon_testing import TINY_SPECS, write_tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """name -> directory of a tiny random checkpoint, for every entry of ``TINY_SPECS``."""
    root = tmp_path_factory.mktemp("tiny_models")
    return {name: write_tiny_model(root, name, seed=i + 1) for i, name in enumerate(TINY_SPECS)}


@pytest.fixture(scope="session")
def tiny_llama(tiny_models: dict[str, Path]) -> str:
    return str(tiny_models["llama"])


@pytest.fixture(scope="session")
def default_gguf() -> str:
    from tachyon.loader.resolve import default_gguf_path

    try:
        return default_gguf_path()
    except ValueError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def smol_tokenizer(default_llm: Any) -> Any:
    """The real SmolLM2 tokenizer (read from the GGUF by the default engine)."""
    return default_llm.get_tokenizer()


@pytest.fixture(scope="session")
def tiny_tok_model(tmp_path_factory: pytest.TempPathFactory, smol_tokenizer: Any) -> str:
    """A tiny random Llama with SmolLM2's real tokenizer and vocabulary: text features
    (stop strings, detokenization) without the cost of the real model."""
    root = tmp_path_factory.mktemp("tiny_tok")
    path = write_tiny_model(root, "llama", seed=7, vocab_size=len(smol_tokenizer),
                            eos_token_id=smol_tokenizer.eos_token_id,
                            bos_token_id=smol_tokenizer.bos_token_id)
    smol_tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def default_llm(default_gguf: str) -> Iterator[Any]:
    """One engine over the embedded SmolLM2-135M-Instruct, shared by the whole session."""
    from tachyon import LLM

    # float32: the parity tests compare it with transformers' own float32 GGUF load.
    llm = LLM(device="cpu", dtype="float32", max_model_len=512, kv_cache_memory="64MiB",
              max_num_seqs=16)
    yield llm
    llm.engine.shutdown()


@pytest.fixture
def rng(request: pytest.FixtureRequest) -> random.Random:
    """Fresh random inputs every run; the seed is printed so a failure can be replayed
    (set TACHYON_TEST_SEED to force it)."""
    seed = int(os.environ.get("TACHYON_TEST_SEED") or random.SystemRandom().randrange(1 << 32))
    print(f"{request.node.nodeid}: TACHYON_TEST_SEED={seed}")
    return random.Random(seed)
