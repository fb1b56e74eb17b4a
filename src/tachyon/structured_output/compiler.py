"""Constraints to xgrammar grammars: checked without a tokenizer (the API process), compiled
against the model's vocabulary (the engine core), each cached per process.

xgrammar reports errors with a C++ source location in front ("[12:00:00] /project/cpp/
json_schema_converter.cc:5082: Unsupported type ..."); ``GrammarError`` keeps the part a
client can act on.
"""

from __future__ import annotations

import functools
import json
import re
from typing import Any

from tachyon.structured_output.params import StructuredOutputsParams

# Compiled grammars kept per process; a JSON schema's compiled form is a few hundred KiB to
# a few MiB (its token-mask cache), so a few hundred cover a busy server's distinct schemas.
MAX_CACHED_GRAMMARS = 256
# Parsed (uncompiled) grammars the API process keeps: small, and checked on every request.
MAX_CHECKED_GRAMMARS = 1024
# The JSON the model writes: compact separators and no free whitespace, so that a model
# (or a random test model) cannot fill max_tokens with blanks between two tokens of JSON.
JSON_SEPARATORS = (",", ": ")
_CPP_PREFIX = re.compile(r"^\[[\d:]+\]\s*\S+:\d+:\s*(Check failed: \(.*?\) is false:\s*)?")


class GrammarError(ValueError):
    """The constraint cannot be turned into a grammar; the message says why."""


def _clean(e: Exception) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else repr(e)
    return _CPP_PREFIX.sub("", text)


def _grammar(spec: StructuredOutputsParams) -> Any:
    import xgrammar as xgr

    if spec.json is not None:
        return xgr.Grammar.from_json_schema(spec.json, any_whitespace=False,
                                            separators=JSON_SEPARATORS, strict_mode=True)
    if spec.json_object:
        return xgr.Grammar.from_json_schema('{"type": "object"}', any_whitespace=False,
                                            separators=JSON_SEPARATORS)
    if spec.regex is not None:
        return xgr.Grammar.from_regex(spec.regex)
    if spec.choice is not None:
        # JSON string literals are valid EBNF literals: the escaping comes for free.
        alternatives = " | ".join(json.dumps(c, ensure_ascii=False) for c in spec.choice)
        return xgr.Grammar.from_ebnf(f"root ::= {alternatives}")
    assert spec.grammar is not None
    return xgr.Grammar.from_ebnf(spec.grammar)


@functools.lru_cache(maxsize=MAX_CHECKED_GRAMMARS)
def check(spec: StructuredOutputsParams) -> None:
    """Raise ``GrammarError`` if ``spec`` cannot become a grammar (no tokenizer needed)."""
    try:
        _grammar(spec)
    except Exception as e:  # xgrammar raises RuntimeError / ValueError / its own kinds
        raise GrammarError(f"invalid {spec.kind} for structured outputs: {_clean(e)}") from None


class GrammarCompiler:
    """Compiles constraints against one vocabulary. Thread-safe (xgrammar's compiler is),
    so the core can compile on a worker thread while the model runs."""

    def __init__(self, tokenizer: Any, vocab_size: int) -> None:
        import xgrammar as xgr

        # vocab_size: the model's logits width, which may pad the tokenizer's vocabulary;
        # the padding ids are never allowed.
        self.info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
        self.vocab_size = vocab_size
        self._compiler = xgr.GrammarCompiler(self.info, cache_enabled=False)
        self.compile = functools.lru_cache(maxsize=MAX_CACHED_GRAMMARS)(self._compile)

    def _compile(self, spec: StructuredOutputsParams) -> Any:
        try:
            return self._compiler.compile_grammar(_grammar(spec))
        except Exception as e:
            raise GrammarError(f"invalid {spec.kind} for structured outputs: "
                               f"{_clean(e)}") from None


@functools.lru_cache(maxsize=4)
def compiler_for(tokenizer_path: str, vocab_size: int) -> GrammarCompiler:
    """The process's compiler for one model: the core's compile thread and its model runner
    share it (and its cache), so a grammar compiled before scheduling is found ready."""
    from tachyon.engine.llm_engine import load_tokenizer

    return GrammarCompiler(load_tokenizer(tokenizer_path), vocab_size)
