"""``tachyon generate`` as a user runs it: a subprocess, the embedded default model, stdout
for the answer, one line on stderr and a non-zero exit for anything wrong."""

from __future__ import annotations

import os
import re
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
    # SmolLM2-Instruct answers a bare prompt with <|im_end|> (transformers agrees), so the
    # question goes through its chat template.
    proc = run_cli("generate", "What is the capital of France?", "--max-tokens", "32",
                   "--chat-template")
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout


def check_one_line_error(returncode: int, stdout: str, stderr: str, match: str) -> None:
    assert returncode != 0
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("tachyon: error: ") and re.search(match, lines[0]), lines[0]
    assert stdout == ""


@pytest.mark.parametrize("args, match", [
    (["generate", "hi", "--frobnicate"], "unknown option --frobnicate"),
    (["--bogus"], "unknown option --bogus"),
    (["generate", "hi", "--max-tokens", "many"], "argument --max-tokens: invalid int value"),
    (["generate", "hi", "--temperature", "-1"], r"temperature must be"),
])
def test_bad_invocation_subprocess(args: list[str], match: str) -> None:
    proc = run_cli(*args)
    check_one_line_error(proc.returncode, proc.stdout, proc.stderr, match)


BAD_INVOCATIONS = {
    "unknown-command": (["frobnicate"], "invalid choice: 'frobnicate'"),
    "bad-choice": (["generate", "hi", "--device", "tpu"], "argument --device: invalid choice"),
    "top-p-zero": (["generate", "hi", "--top-p", "0"], r"top_p must be"),
    "max-tokens-zero": (["generate", "hi", "--max-tokens", "0"], "max_tokens must be"),
    "empty-prompt": (["generate", "  "], "the prompt is empty"),
    "unknown-model": (["generate", "hi", "--model", "/no/such/model"], "unknown model"),
    "compilation-config": (["--compilation-config", "{not json"],
                           "--compilation-config is not valid JSON"),
    "graph-mode": (["--cudagraph-mode", "FULLEST"], "unknown CUDA graph mode 'FULLEST'"),
    "block-size": (["--block-size", "12"], "block_size must be a power of two"),
    "kv-cache-memory": (["--kv-cache-memory", "a lot"], "cannot read memory size"),
}


@pytest.mark.parametrize("case", list(BAD_INVOCATIONS))
def test_bad_invocation_in_process(case: str, tiny_llama: str,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    """The same contract through ``main(argv)``, for the many cases a subprocess would make
    slow. Engine flags go with a tiny model so only the bad value can fail."""
    from tachyon.entrypoints.cli import main

    args, match = BAD_INVOCATIONS[case]
    if args[0].startswith("--"):
        args = ["generate", "hi", "--model", tiny_llama, *args]
    try:
        rc = main(args)
    except SystemExit as e:
        rc = e.code
    out = capsys.readouterr()
    check_one_line_error(rc, out.out, out.err, match)
