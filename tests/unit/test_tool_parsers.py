"""Tool-call parsers on hand-written model outputs, whole and streamed in random pieces, and
the sampler's bitmask unpacking against a per-token Python reference."""

from __future__ import annotations

import json
import random

import pytest
import torch

from tachyon.entrypoints.openai.tool_parsers import TOOL_PARSERS, ToolStream
from tachyon.layers.sampler import apply_token_bitmask

HERMES = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}'
          '\n</tool_call>\n<tool_call>{"name": "get_time", "arguments": {}}</tool_call>')
LLAMA = '{"name": "get_weather", "parameters": {"city": "Paris"}}; {"name": "get_time", ' \
        '"parameters": {}}'
CASES = [("hermes", HERMES, "Let me check."), ("llama3_json", LLAMA, None)]


@pytest.mark.parametrize("name,text,content", CASES)
def test_whole_and_streamed(name: str, text: str, content: str | None) -> None:
    parser = TOOL_PARSERS[name]()
    got_content, calls = parser.extract(text)
    assert got_content == content
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris"}), ("get_time", {})]
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    stream, sent, streamed = ToolStream(parser), "", []
    cuts = [*sorted(rng.sample(range(1, len(text)), 12)), len(text)]
    start = 0
    for end in cuts:
        piece, new = stream.feed(text[start:end], end == len(text))
        sent += piece
        streamed += new
        start = end
    assert sent.strip() == (content or ""), seed
    assert [c.name for c in streamed] == ["get_weather", "get_time"], seed


@pytest.mark.parametrize("name", list(TOOL_PARSERS))
def test_plain_text_is_content(name: str) -> None:
    parser = TOOL_PARSERS[name]()
    assert parser.extract("Hello there, no tools.") == ("Hello there, no tools.", [])
    stream = ToolStream(parser)
    out = "".join(stream.feed(p, i == 2)[0] for i, p in enumerate(["Hel", "lo <tool", "!"]))
    assert out == "Hello <tool!"


def test_bitmask_matches_reference() -> None:
    gen = torch.Generator().manual_seed(0)
    vocab, rows = 70, 3  # 3 words, the last one partly past the vocabulary
    mask = torch.randint(-2**31, 2**31, (rows, 3), generator=gen, dtype=torch.int64).to(
        torch.int32)
    logits = torch.randn(rows, vocab, generator=gen)
    out = apply_token_bitmask(logits, mask)
    for r in range(rows):
        for t in range(vocab):
            allowed = (int(mask[r, t // 32]) >> (t % 32)) & 1
            assert out[r, t] == (logits[r, t] if allowed else float("-inf"))
