"""The tokenizer of a model: from an HF directory, or from a GGUF file (cached in HF form)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

# transformers 5 saves its generic fast tokenizer under this class name.
_GENERIC_TOKENIZER_CLASS = "TokenizersBackend"


def load_tokenizer(path: str) -> Any:
    """An HF tokenizer from a directory or a .gguf file; ValueError if there is none."""
    from transformers.utils import logging as hf_logging

    from tachyon.loader.weights import cached_from_gguf

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        if path.endswith(".gguf"):
            return cached_from_gguf(
                path, "tokenizer",
                lambda: _auto(os.path.dirname(path), gguf_file=os.path.basename(path)),
                _load_saved)
        return _auto(path)
    except Exception as e:
        raise ValueError(f"cannot load a tokenizer from {path}: {e}") from e
    finally:
        hf_logging.set_verbosity(verbosity)


def _auto(path: str, **kwargs: Any) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, **kwargs)


def _load_saved(directory: str) -> Any:
    """A tokenizer tachyon saved itself. Its class is written in the directory, so loading
    that class directly is what AutoTokenizer would do, without importing AutoTokenizer's
    tables of every model (0.3 s of a 2-core machine's start-up)."""
    config = json.loads((Path(directory) / "tokenizer_config.json").read_text())
    if config.get("tokenizer_class") != _GENERIC_TOKENIZER_CLASS:
        return _auto(directory)
    from transformers.tokenization_utils_tokenizers import TokenizersBackend

    return TokenizersBackend.from_pretrained(directory)
