"""Where weights come from: safetensors directories, GGUF files, or random (dummy) tensors.

Every source yields HF-named full tensors; the model's ``load_weights`` shards them for this
rank. That keeps TP sharding in one place and makes dummy weights identical for any TP size.
"""

from __future__ import annotations

import hashlib
import logging
import os
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from tachyon.config import cache_root

logger = logging.getLogger(__name__)

# Std of dummy weights: small enough that activations stay finite through dozens of layers.
DUMMY_WEIGHT_STD = 0.02


def iterate_safetensors(path: str) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    files = sorted(Path(path).glob("*.safetensors"))
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as fh:
                for name in fh.keys():  # noqa: SIM118 (safe_open has no __iter__)
                    yield name, fh.get_tensor(name)
        except Exception as e:  # safetensors raises its own error type on damaged files
            raise ValueError(f"cannot read safetensors file {f}: {e}") from e


def gguf_cache_dir(gguf_path: str) -> Path:
    """Where what tachyon derives from a GGUF file is kept: dequantized weights, and the
    config and tokenizer in HF form (reading them from the GGUF takes seconds). The key
    changes when the file does."""
    st = os.stat(gguf_path)
    key = hashlib.sha256(f"{os.path.abspath(gguf_path)}:{st.st_size}:{st.st_mtime_ns}".encode())
    return cache_root() / "gguf" / f"{Path(gguf_path).stem}-{key.hexdigest()[:16]}"


def _gguf_cache_path(gguf_path: str) -> Path:
    return gguf_cache_dir(gguf_path).with_suffix(".safetensors")


def cached_from_gguf(gguf_path: str, what: str, load_gguf: Any, load_dir: Any) -> Any:
    """``what`` ("config" or "tokenizer") from the cache directory if present, else from the
    GGUF file, then saved there for the next start. A broken cache is ignored."""
    cache = gguf_cache_dir(gguf_path) / what
    if cache.is_dir():
        try:
            return load_dir(str(cache))
        except Exception as e:  # a torn or outdated cache: rebuild it
            logger.warning("ignoring unreadable cached GGUF %s at %s: %s", what, cache, e)
    obj = load_gguf()
    try:
        tmp = cache.with_name(f"{what}.tmp{os.getpid()}")
        obj.save_pretrained(str(tmp))
        if cache.exists():
            import shutil

            shutil.rmtree(cache, ignore_errors=True)
        tmp.replace(cache)
    except OSError as e:
        logger.warning("could not cache the GGUF %s: %s", what, e)
    return obj


def iterate_gguf(gguf_path: str, hf_config: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """Dequantize through transformers' GGUF reader (which also undoes llama.cpp's Q/K row
    permutation), then keep the float tensors in a safetensors cache: the second start reads
    them back in a fraction of the dequantization time."""
    cache = _gguf_cache_path(gguf_path)
    if cache.is_file():
        try:
            yield from iterate_safetensors_file(cache)
            return
        except Exception as e:  # a torn cache file: rebuild it
            logger.warning("ignoring unreadable GGUF cache %s: %s", cache, e)
    tensors = _dequantize_gguf(gguf_path, hf_config)
    try:
        from safetensors.torch import save_file

        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".tmp{os.getpid()}")
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
        tmp.replace(cache)
    except OSError as e:
        logger.warning("could not cache dequantized GGUF weights: %s", e)
    yield from tensors.items()


def iterate_safetensors_file(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        for name in fh.keys():  # noqa: SIM118
            yield name, fh.get_tensor(name)


def _dequantize_gguf(gguf_path: str, hf_config: Any) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    from transformers.utils import logging as hf_logging

    from tachyon.loader.resolve import as_transformers_config

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(as_transformers_config(hf_config))
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        parsed = load_gguf_checkpoint(gguf_path, return_tensors=True, model_to_load=skeleton)
    except Exception as e:
        raise ValueError(f"cannot read GGUF weights from {gguf_path}: {e}") from e
    finally:
        hf_logging.set_verbosity(verbosity)
    return parsed["tensors"]


def iterate_dummy(hf_config: Any, seed: int, device: torch.device,
                  dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """Random full tensors named and shaped like the HF checkpoint would be.

    Each tensor's values depend only on (seed, its name), so every TP size and every rank
    sees the same full weights.
    """
    from transformers import AutoModelForCausalLM

    from tachyon.loader.resolve import as_transformers_config

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(as_transformers_config(hf_config))
    gen = torch.Generator(device=device)
    seen: set[int] = set()
    for name, p in skeleton.state_dict(keep_vars=True).items():
        # Tied tensors (embedding and LM head) appear under two names: generate them once.
        if "rotary_emb" in name or id(p) in seen:
            continue
        seen.add(id(p))
        gen.manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        t = torch.empty(p.shape, dtype=torch.float32, device=device)
        if p.dim() == 1 and "norm" in name:
            t.normal_(1.0, DUMMY_WEIGHT_STD, generator=gen)  # norms near identity
        else:
            t.normal_(0.0, DUMMY_WEIGHT_STD, generator=gen)
        yield name, t.to(dtype)
