"""``tachyon generate`` as a user runs it: a subprocess, the embedded default model, stdout
for the answer, one line on stderr and a non-zero exit for anything wrong."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

CLI = [sys.executable, "-m", "tachyon.entrypoints.cli"]
TIMEOUT_S = 300


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=TIMEOUT_S,
                          env=env)


def test_default_model_knows_the_capital_of_france(default_gguf: str) -> None:
    proc = run_cli("generate", "What is the capital of France?", "--max-tokens", "32")
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout


BAD_INVOCATIONS = {
    "unknown-flag": (["generate", "hi", "--frobnicate"], "unrecognized arguments: --frobnicate"),
    "unknown-command": (["frobnicate"], "invalid choice: 'frobnicate'"),
    "not-an-int": (["generate", "hi", "--max-tokens", "many"],
                   "argument --max-tokens: invalid int value: 'many'"),
    "bad-choice": (["generate", "hi", "--device", "tpu"], "argument --device: invalid choice"),
    "negative-temperature": (["generate", "hi", "--temperature", "-1"],
                             r"temperature must be >= 0"),
    "top-p-zero": (["generate", "hi", "--top-p", "0"], r"top_p must be in \(0, 1\]"),
    "max-tokens-zero": (["generate", "hi", "--max-tokens", "0"], "max_tokens must be"),
    "empty-prompt": (["generate", "  "], "the prompt is empty"),
    "unknown-model": (["generate", "hi", "--model", "/no/such/model"], "unknown model"),
}


@pytest.mark.parametrize("case", list(BAD_INVOCATIONS))
def test_bad_invocation_is_one_line_and_non_zero(case: str) -> None:
    import re

    args, match = BAD_INVOCATIONS[case]
    proc = run_cli(*args)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("tachyon: error: ") and re.search(match, lines[0]), lines[0]
    assert "Traceback" not in proc.stderr and proc.stdout == ""


@pytest.mark.parametrize("args, match", [
    (["--compilation-config", "{not json"], "--compilation-config is not valid JSON"),
    (["--cudagraph-mode", "FULLEST"], "unknown CUDA graph mode 'FULLEST'"),
    (["--block-size", "12"], "block_size must be a power of two"),
    (["--kv-cache-memory", "a lot"], "cannot read memory size"),
])
def test_bad_engine_flag_values(args: list[str], match: str, tiny_llama: str) -> None:
    import re

    proc = run_cli("generate", "hi", "--model", tiny_llama, *args)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert re.search(match, lines[0]), lines[0]
