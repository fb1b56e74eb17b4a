"""Engine configuration: one frozen dataclass per concern, built once from user arguments.

``EngineArgs`` is what users type (CLI flags, ``LLM(**kwargs)``); ``EngineArgs.create_config``
validates it and produces an ``EngineConfig``. Every bad value fails here with a
``ValueError`` that says what is wrong and what is allowed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the module stays importable without torch (the CLI's --help)
    from tachyon.cudagraph.modes import CUDAGraphMode

ENV_CUDAGRAPH_MODE = "TACHYON_CUDAGRAPH_MODE"
ENV_ATTENTION_BACKEND = "TACHYON_ATTENTION_BACKEND"
ENV_CACHE_DIR = "TACHYON_CACHE_DIR"


def cache_root() -> Path:
    """Where tachyon keeps what it derives between runs (compiled graphs, GGUF weights):
    ``$TACHYON_CACHE_DIR``, by default ``~/.cache/tachyon``."""
    return Path(os.environ.get(ENV_CACHE_DIR, Path.home() / ".cache" / "tachyon"))


# Default KV budget on CPU, where there is no device memory to profile.
DEFAULT_CPU_KV_CACHE_BYTES = 1 << 30
# The capture-size ladder of DESIGN.md: small sizes one by one, then steps of 16.
_SMALL_CAPTURE_SIZES = (1, 2, 4, 8)
_CAPTURE_STEP = 16
DEFAULT_MAX_CAPTURE_SIZE = 512
# Mixed batches (prefill chunks beside decodes) above the decode sizes: PIECEWISE (or FULL
# mixed) graphs on a coarser ladder, so a step carrying a prompt chunk replays graphs instead
# of launching every kernel from Python (docs/cuda_graphs.md, "Mixed sizes").
DEFAULT_MAX_MIXED_CAPTURE_SIZE = 2048
_MIXED_LADDER = ((1024, 64), (4096, 256))  # (up to, step)

_SIZE_UNITS = {"": 1, "b": 1, "kb": 1000, "mb": 1000**2, "gb": 1000**3,
               "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "k": 1 << 10,
               "m": 1 << 20, "g": 1 << 30}


def parse_memory_size(text: str | int) -> int:
    """'2GiB' / '512MiB' / '1.5G' / 1073741824 -> bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _SIZE_UNITS:
        raise ValueError(
            f"cannot read memory size {text!r}; write it like '2GiB', '512MiB' or bytes")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])


@dataclass(frozen=True)
class ModelConfig:
    model: str  # what the user asked for: a path, a preset name or "" for the default model
    hf_config: Any  # transformers.PretrainedConfig
    dtype: Any  # torch.dtype
    max_model_len: int
    load_format: str  # "auto" | "safetensors" | "gguf" | "dummy"
    weights_path: str | None  # resolved path of the weights (dir or .gguf file)
    tokenizer_path: str | None
    gguf_file: str | None
    seed: int
    skip_tokenizer_init: bool


@dataclass(frozen=True)
class CacheConfig:
    block_size: int
    gpu_memory_utilization: float
    kv_cache_memory: int | None  # explicit bytes for the KV cache (CPU, or an override on GPU)
    enable_prefix_caching: bool
    num_gpu_blocks_override: int | None


@dataclass(frozen=True)
class LoRAConfig:
    """LoRA adapters (tachyon.lora): ``max_loras`` GPU slots of rank ``max_lora_rank`` each,
    allocated once (graphs never re-capture for an adapter change); ``max_cpu_loras``
    adapters kept loaded in host memory, least recently used ones dropped beyond that."""

    max_lora_rank: int
    max_loras: int
    max_cpu_loras: int


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int
    max_num_batched_tokens: int
    enable_chunked_prefill: bool
    # Schedule step N+1 while the device runs step N (default on CUDA).
    async_scheduling: bool = False


@dataclass(frozen=True)
class ParallelConfig:
    tensor_parallel_size: int
    distributed_backend: str | None  # None: pick nccl on CUDA, gloo on CPU


@dataclass(frozen=True)
class CompilationConfig:
    cudagraph_mode: CUDAGraphMode | None  # None: default for the device
    cudagraph_capture_sizes: tuple[int, ...] | None
    max_cudagraph_capture_size: int
    compile_sizes: tuple[int, ...]
    piecewise_backend: str  # "breakable" | "compile"
    cache_dir: str | None
    max_mixed_capture_size: int = DEFAULT_MAX_MIXED_CAPTURE_SIZE  # 0: none above decode

    def capture_sizes(self, max_num_seqs: int) -> tuple[int, ...]:
        """Sizes to capture, ascending. The largest always covers ``max_num_seqs``."""
        cap = max(1, min(self.max_cudagraph_capture_size, max_num_seqs))
        if self.cudagraph_capture_sizes is not None:
            sizes = sorted({s for s in self.cudagraph_capture_sizes if s <= cap})
        else:
            ladder = list(_SMALL_CAPTURE_SIZES) + list(range(_CAPTURE_STEP, cap + 1, _CAPTURE_STEP))
            sizes = sorted({s for s in ladder if s <= cap})
        if not sizes or sizes[-1] < cap:
            sizes.append(cap)  # no gap at the top: max_num_seqs must always find a graph
        return tuple(sizes)

    def mixed_capture_sizes(self, max_num_seqs: int, max_num_tokens: int) -> tuple[int, ...]:
        """Sizes above ``capture_sizes`` for mixed batches only (a decode batch never has
        more tokens than ``max_num_seqs``), ascending, up to ``max_mixed_capture_size`` and
        the step's token budget; none when explicit capture sizes were given."""
        if self.cudagraph_capture_sizes is not None:
            return ()
        low = self.capture_sizes(max_num_seqs)[-1]
        top = min(self.max_mixed_capture_size, max_num_tokens)
        sizes, size = [], low
        for limit, step in _MIXED_LADDER:
            while size + step <= min(limit, top):
                size = (size // step + 1) * step
                sizes.append(size)
        if top > (sizes[-1] if sizes else low):
            sizes.append(top)  # the budget itself: no mixed batch is left above a graph
        return tuple(sizes)


SPEC_METHODS = ("ngram", "draft_model", "eagle", "eagle3")
# Methods with a proposer today; the others are accepted by name and refused with a clear error.
SPEC_METHODS_IMPLEMENTED = ("ngram", "draft_model")
_SPEC_KEYS = {"method", "num_speculative_tokens", "prompt_lookup_min", "prompt_lookup_max",
              "model"}
# n-gram lookup: the longest suffix tried first, the shortest accepted (a one-token match
# proposes too often to pay).
DEFAULT_PROMPT_LOOKUP_MAX = 5
DEFAULT_PROMPT_LOOKUP_MIN = 2


@dataclass(frozen=True)
class SpeculativeConfig:
    """Speculative decoding: a proposer drafts up to ``num_speculative_tokens`` tokens per
    decoding request, the target scores them all in one step (spec_decode/)."""

    method: str  # one of SPEC_METHODS_IMPLEMENTED
    num_speculative_tokens: int  # k >= 1
    prompt_lookup_min: int  # n-gram: shortest suffix match that proposes
    prompt_lookup_max: int  # n-gram: longest suffix tried
    model: str | None  # the drafter's weights (draft_model, eagle, eagle3)
    # draft_model: the drafter resolved like a target (same dtype and max_model_len).
    draft: ModelConfig | None = None


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig
    cache: CacheConfig
    scheduler: SchedulerConfig
    parallel: ParallelConfig
    compilation: CompilationConfig
    device: str  # "cuda" | "cpu"
    attention_backend: str | None  # None: default for the device
    lora: LoRAConfig | None = None  # None: LoRA off (--enable-lora)
    speculative: SpeculativeConfig | None = None  # None: no speculative decoding


_COMPILATION_KEYS = {
    "cudagraph_mode", "cudagraph_capture_sizes", "max_cudagraph_capture_size",
    "compile_sizes", "piecewise_backend", "cache_dir", "max_mixed_capture_size",
}
# vLLM's torch.compile level (``level``, renamed ``mode``): tachyon has no such knob, and
# accepting the key while ignoring it would hide that the setting does nothing.
_VLLM_COMPILE_LEVEL_KEYS = ("level", "mode")


def _cli(help: str, **more: Any) -> dict[str, Any]:
    """Field metadata for the CLI flag of an ``EngineArgs`` field (``tachyon.entrypoints.args``).

    ``more`` keys: ``default_help`` (what the default means, where the value alone does not
    say it: ``None`` fields), ``aliases`` (more option strings), ``choices``, ``metavar``.
    """
    return {"help": help, **more}


@dataclass
class EngineArgs:
    """Everything a user may set, with its default and its help: the only home of both.

    Each field is one CLI flag named like vLLM's (``max_model_len`` -> ``--max-model-len``);
    ``tachyon.entrypoints.args`` generates the flags from these fields.
    """

    model: str | None = field(default=None, metadata=_cli(
        "HF model directory, .gguf file, or a preset name (qwen3-0.6b, qwen3-4b, qwen3-8b, "
        "qwen3-32b, llama-3.2-1b: configs only, use with --load-format dummy)",
        default_help="the embedded SmolLM2-135M-Instruct GGUF", metavar="MODEL"))
    tokenizer: str | None = field(default=None, metadata=_cli(
        "tokenizer directory or .gguf file", default_help="the model's own", metavar="PATH"))
    dtype: str = field(default="auto", metadata=_cli(
        "weight and activation dtype: auto, float32, bfloat16 or float16 (auto: bfloat16 on "
        "CUDA and for GGUF models on CPU, else float32)", metavar="DTYPE"))
    max_model_len: int | None = field(default=None, metadata=_cli(
        "most tokens (prompt + output) of one request",
        default_help="the model's max_position_embeddings"))
    load_format: str = field(default="auto", metadata=_cli(
        "where weights come from; auto: safetensors for a directory, gguf for a .gguf file; "
        "dummy: random weights", choices=("auto", "safetensors", "gguf", "dummy")))
    seed: int = field(default=0, metadata=_cli(
        "seed of the engine's random generator: dummy weights, and sampling of requests that "
        "bring no seed of their own"))
    skip_tokenizer_init: bool = field(default=False, metadata=_cli(
        "load no tokenizer; prompts must be token ids"))
    block_size: int = field(default=16, metadata=_cli(
        "tokens per KV cache block (a power of two <= 256)"))
    gpu_memory_utilization: float = field(default=0.9, metadata=_cli(
        "fraction of GPU memory for weights, activations, graphs and the KV cache"))
    kv_cache_memory: str | int | None = field(default=None, metadata=_cli(
        "KV cache size, e.g. 2GiB or 512MiB (on a GPU it overrides --gpu-memory-utilization)",
        default_help="1GiB on CPU, what is left on a GPU", metavar="SIZE"))
    enable_prefix_caching: bool = field(default=True, metadata=_cli(
        "reuse the KV cache of shared prompt prefixes"))
    num_gpu_blocks_override: int | None = field(default=None, metadata=_cli(
        "number of KV cache blocks, instead of sizing the cache from memory",
        default_help="sized from memory"))
    max_num_seqs: int = field(default=256, metadata=_cli("most requests running in one step"))
    max_num_batched_tokens: int | None = field(default=None, metadata=_cli(
        "most tokens computed in one step",
        default_help="max(8192, --max-num-seqs) with chunked prefill, else --max-model-len"))
    enable_chunked_prefill: bool = field(default=True, metadata=_cli(
        "split long prompts over several steps, next to running decodes"))
    async_scheduling: bool | None = field(default=None, metadata=_cli(
        "schedule step N+1 while the device runs step N", default_help="on for CUDA, off for CPU"))
    tensor_parallel_size: int = field(default=1, metadata=_cli(
        "GPUs (or CPU processes) to shard the model over", aliases=("-tp",)))
    distributed_backend: str | None = field(default=None, metadata=_cli(
        "collective backend for tensor parallelism", choices=("nccl", "gloo"),
        default_help="nccl on CUDA, gloo on CPU"))
    device: str = field(default="auto", metadata=_cli(
        "device to run on; auto: CUDA if a GPU is visible", choices=("auto", "cuda", "cpu")))
    attention_backend: str | None = field(default=None, metadata=_cli(
        "attention implementation", choices=("torch", "triton", "flex"),
        default_help=f"${ENV_ATTENTION_BACKEND}, else triton on CUDA and torch on CPU"))
    enforce_eager: bool = field(default=False, metadata=_cli(
        "run without CUDA graphs (same as --cudagraph-mode NONE)"))
    cudagraph_mode: str | None = field(default=None, metadata=_cli(
        "NONE, PIECEWISE, FULL, FULL_DECODE_ONLY or FULL_AND_PIECEWISE", metavar="MODE",
        default_help=f"${ENV_CUDAGRAPH_MODE}, else FULL_AND_PIECEWISE on CUDA and NONE on CPU"))
    compilation_config: dict[str, Any] | str | None = field(default=None, metadata=_cli(
        "JSON object; keys: cudagraph_mode, cudagraph_capture_sizes, "
        "max_cudagraph_capture_size, compile_sizes, piecewise_backend (breakable | compile), "
        "cache_dir; e.g. '{\"cudagraph_capture_sizes\": [1, 2, 4]}'",
        aliases=("-O",), default_help="{}", metavar="JSON"))
    speculative_config: dict[str, Any] | str | None = field(default=None, metadata=_cli(
        "speculative decoding, a JSON object; keys: method (ngram | draft_model | eagle | "
        "eagle3; ngram and draft_model for now), num_speculative_tokens, prompt_lookup_min, "
        "prompt_lookup_max, model (the drafter); e.g. "
        "'{\"method\": \"ngram\", \"num_speculative_tokens\": 3}'. Steps then run "
        "synchronously (no --async-scheduling)", default_help="off", metavar="JSON"))

    enable_lora: bool = field(default=False, metadata=_cli(
        "serve LoRA adapters (PEFT directories) per request"))
    max_lora_rank: int = field(default=16, metadata=_cli(
        "largest adapter rank that can be loaded (GPU slots are sized for it)"))
    max_loras: int = field(default=1, metadata=_cli(
        "adapters resident on the device at once: at most this many distinct adapters run "
        "in one step"))
    max_cpu_loras: int | None = field(default=None, metadata=_cli(
        "adapters kept loaded in host memory (least recently used dropped beyond it)",
        default_help="--max-loras"))

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> EngineArgs:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise ValueError(
                f"unknown engine argument(s): {', '.join(unknown)}; "
                f"known: {', '.join(sorted(names))}"
            )
        return cls(**kwargs)

    def create_config(self) -> EngineConfig:
        import torch

        from tachyon.loader.resolve import resolve_model

        device = self._resolve_device(torch)
        resolved = resolve_model(self.model, self.load_format, self.tokenizer)
        hf_config = resolved.hf_config
        dtype = _resolve_dtype(self.dtype, resolved.load_format, device, torch)
        max_pos = int(getattr(hf_config, "max_position_embeddings", 0) or 0) or 4096
        max_model_len = self.max_model_len if self.max_model_len is not None else max_pos
        _check_int("max_model_len", max_model_len, 1)
        if max_model_len > max_pos:
            raise ValueError(
                f"max_model_len={max_model_len} exceeds the model's max_position_embeddings "
                f"({max_pos}); use --max-model-len {max_pos} or less"
            )
        _check_int("block_size", self.block_size, 1)
        if self.block_size & (self.block_size - 1) or self.block_size > 256:
            raise ValueError(f"block_size must be a power of two <= 256, got {self.block_size}")
        _check_int("max_num_seqs", self.max_num_seqs, 1)
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(
                f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}"
            )
        tokens = self.max_num_batched_tokens
        if tokens is None:
            tokens = max(8192, self.max_num_seqs) if self.enable_chunked_prefill else max(
                max_model_len, self.max_num_seqs)
        _check_int("max_num_batched_tokens", tokens, 1)
        if tokens < self.max_num_seqs:
            raise ValueError(
                f"max_num_batched_tokens ({tokens}) must be >= max_num_seqs ({self.max_num_seqs}) "
                f"so every running request can decode in one step"
            )
        if not self.enable_chunked_prefill and tokens < max_model_len:
            raise ValueError(
                f"without chunked prefill, max_num_batched_tokens ({tokens}) must be >= "
                f"max_model_len ({max_model_len}); raise it or enable chunked prefill"
            )
        _check_int("tensor_parallel_size", self.tensor_parallel_size, 1)
        kv_mem = parse_memory_size(self.kv_cache_memory) if self.kv_cache_memory else None
        speculative = self._speculative_config(hf_config, dtype, max_model_len)
        if speculative is not None and self.async_scheduling:
            raise ValueError("speculative decoding runs its steps synchronously (the next "
                             "step's drafts need this step's tokens); drop --async-scheduling")
        if kv_mem is not None and kv_mem <= 0:
            raise ValueError("kv_cache_memory must be positive, e.g. '2GiB'")
        return EngineConfig(
            model=ModelConfig(
                model=self.model or "",
                hf_config=hf_config,
                dtype=dtype,
                max_model_len=max_model_len,
                load_format=resolved.load_format,
                weights_path=resolved.weights_path,
                tokenizer_path=resolved.tokenizer_path,
                gguf_file=resolved.gguf_file,
                seed=self.seed,
                skip_tokenizer_init=self.skip_tokenizer_init or resolved.tokenizer_path is None,
            ),
            cache=CacheConfig(
                block_size=self.block_size,
                gpu_memory_utilization=self.gpu_memory_utilization,
                kv_cache_memory=kv_mem,
                enable_prefix_caching=self.enable_prefix_caching,
                num_gpu_blocks_override=self.num_gpu_blocks_override,
            ),
            scheduler=SchedulerConfig(
                max_num_seqs=self.max_num_seqs,
                max_num_batched_tokens=tokens,
                enable_chunked_prefill=self.enable_chunked_prefill,
                # Off with speculation: its steps run synchronously (see speculative_config).
                async_scheduling=(device == "cuda" and speculative is None
                                  if self.async_scheduling is None
                                  else bool(self.async_scheduling)),
            ),
            parallel=ParallelConfig(self.tensor_parallel_size, self.distributed_backend),
            compilation=self._compilation_config(),
            lora=self._lora_config(),
            device=device,
            attention_backend=self.attention_backend or os.environ.get(ENV_ATTENTION_BACKEND),
            speculative=speculative,
        )

    def _lora_config(self) -> LoRAConfig | None:
        if not self.enable_lora:
            return None
        _check_int("max_lora_rank", self.max_lora_rank, 1)
        _check_int("max_loras", self.max_loras, 1)
        cpu = self.max_cpu_loras if self.max_cpu_loras is not None else self.max_loras
        _check_int("max_cpu_loras", cpu, self.max_loras)
        return LoRAConfig(self.max_lora_rank, self.max_loras, cpu)

    def _resolve_device(self, torch: Any) -> str:
        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        if self.device not in ("cuda", "cpu"):
            raise ValueError(f"device must be 'auto', 'cuda' or 'cpu', got {self.device!r}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("device 'cuda' requested but no CUDA GPU is visible; use --device cpu")
        return self.device

    def _compilation_config(self) -> CompilationConfig:
        from tachyon.cudagraph.modes import CUDAGraphMode

        raw = self.compilation_config or {}
        if isinstance(raw, str):
            try:
                raw = json.loads(raw)
            except json.JSONDecodeError as e:
                raise ValueError(
                    f"--compilation-config is not valid JSON ({e.msg}): {raw!r}") from e
        if not isinstance(raw, dict):
            raise ValueError(
                "--compilation-config must be a JSON object, e.g. '{\"cudagraph_mode\": \"FULL\"}'")
        for key in _VLLM_COMPILE_LEVEL_KEYS:
            if key in raw:
                raise ValueError(
                    f"compilation_config key {key!r} (vLLM's torch.compile level) is not "
                    "supported; choose graphs with 'cudagraph_mode' and how PIECEWISE graphs "
                    "are made with 'piecewise_backend': 'breakable' (no compiler) or 'compile' "
                    "(torch.compile split at attention)"
                )
        unknown = sorted(set(raw) - _COMPILATION_KEYS)
        if unknown:
            raise ValueError(
                f"unknown compilation_config key(s): {', '.join(unknown)}; "
                f"known: {', '.join(sorted(_COMPILATION_KEYS))}"
            )
        mode_text = self.cudagraph_mode or raw.get("cudagraph_mode") or os.environ.get(
            ENV_CUDAGRAPH_MODE)
        mode = CUDAGraphMode.parse(mode_text) if mode_text else None
        if self.enforce_eager:
            mode = CUDAGraphMode.NONE
        sizes = raw.get("cudagraph_capture_sizes")
        if sizes is not None:
            sizes = tuple(_int_list("cudagraph_capture_sizes", sizes))
        compile_sizes = tuple(_int_list("compile_sizes", raw.get("compile_sizes", [])))
        max_size = raw.get("max_cudagraph_capture_size", DEFAULT_MAX_CAPTURE_SIZE)
        _check_int("max_cudagraph_capture_size", max_size, 1)
        mixed = raw.get("max_mixed_capture_size", DEFAULT_MAX_MIXED_CAPTURE_SIZE)
        _check_int("max_mixed_capture_size", mixed, 0)
        backend = raw.get("piecewise_backend", "breakable")
        if backend not in ("breakable", "compile"):
            raise ValueError(f"piecewise_backend must be 'breakable' or 'compile', got {backend!r}")
        return CompilationConfig(
            cudagraph_mode=mode,
            cudagraph_capture_sizes=sizes,
            max_cudagraph_capture_size=max_size,
            compile_sizes=compile_sizes,
            piecewise_backend=backend,
            cache_dir=raw.get("cache_dir"),
            max_mixed_capture_size=mixed,
        )


    def _speculative_config(self, target_hf_config: Any, dtype: Any = None,
                            max_model_len: int | None = None) -> SpeculativeConfig | None:
        """``dtype`` and ``max_model_len``: the target's, which a draft model takes too
        (defaults: float32 and the drafter's own maximum, for checks on their own)."""
        raw = _json_object("speculative_config", self.speculative_config,
                           '{"method": "ngram", "num_speculative_tokens": 3}')
        if raw is None:
            return None
        unknown = sorted(set(raw) - _SPEC_KEYS)
        if unknown:
            raise ValueError(f"unknown speculative_config key(s): {', '.join(unknown)}; "
                             f"known: {', '.join(sorted(_SPEC_KEYS))}")
        method = raw.get("method")
        if method not in SPEC_METHODS:
            raise ValueError(f"speculative_config method must be one of "
                             f"{', '.join(SPEC_METHODS)}, got {method!r}")
        k = raw.get("num_speculative_tokens")
        _check_int("speculative_config num_speculative_tokens", k, 1)
        lo = raw.get("prompt_lookup_min", DEFAULT_PROMPT_LOOKUP_MIN)
        _check_int("speculative_config prompt_lookup_min", lo, 1)
        hi = raw.get("prompt_lookup_max", max(lo, DEFAULT_PROMPT_LOOKUP_MAX))
        _check_int("speculative_config prompt_lookup_max", hi, lo)
        model = raw.get("model")
        draft = None
        if method == "ngram":
            if model is not None:
                raise ValueError("speculative_config method 'ngram' takes no model (it looks "
                                 "drafts up in the request's own tokens)")
        else:
            if not model or not isinstance(model, str):
                raise ValueError(f"speculative_config method {method!r} needs 'model': the "
                                 f"drafter's directory, .gguf file or preset")
            draft = self._draft_model_config(model, target_hf_config, dtype, max_model_len)
        if method not in SPEC_METHODS_IMPLEMENTED:
            raise ValueError(f"speculative decoding method {method!r} is not implemented yet; "
                             f"use one of: {', '.join(SPEC_METHODS_IMPLEMENTED)}")
        return SpeculativeConfig(method, k, lo, hi, model, draft)

    def _draft_model_config(self, model: str, target_hf_config: Any, dtype: Any,
                            max_model_len: int | None) -> ModelConfig:
        """The drafter, resolved by the target's loaders (a directory, a .gguf file, or a
        preset with ``--load-format dummy``); a drafter proposes token ids of its own
        vocabulary, so they must mean the target's tokens."""
        import torch

        from tachyon.loader.resolve import resolve_model

        fmt = "dummy" if self.load_format == "dummy" else "auto"
        resolved = resolve_model(model, fmt, None)
        ours = getattr(target_hf_config, "vocab_size", None)
        theirs = getattr(resolved.hf_config, "vocab_size", None)
        if ours != theirs:
            raise ValueError(f"the draft model's vocabulary ({theirs} tokens) differs from "
                             f"the target's ({ours}); speculative decoding needs the target's "
                             f"tokenizer")
        max_pos = int(getattr(resolved.hf_config, "max_position_embeddings", 0) or 0) or 4096
        return ModelConfig(
            model=model, hf_config=resolved.hf_config,
            dtype=dtype if dtype is not None else torch.float32,
            max_model_len=max_model_len if max_model_len is not None else max_pos,
            load_format=resolved.load_format, weights_path=resolved.weights_path,
            tokenizer_path=resolved.tokenizer_path, gguf_file=resolved.gguf_file,
            seed=self.seed, skip_tokenizer_init=True)


def _json_object(name: str, value: dict[str, Any] | str | None,
                 example: str) -> dict[str, Any] | None:
    """A JSON-object flag (or the dict itself from ``LLM(...)``); None when unset."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(f"--{name.replace('_', '-')} is not valid JSON ({e.msg}): "
                             f"{value!r}") from e
    if not isinstance(value, dict):
        raise ValueError(f"--{name.replace('_', '-')} must be a JSON object, e.g. '{example}'")
    return value


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _int_list(name: str, value: Any) -> list[int]:
    if not isinstance(value, list | tuple) or not all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value
    ):
        raise ValueError(f"{name} must be a list of positive integers, got {value!r}")
    return list(value)


def _resolve_dtype(name: str, load_format: str, device: str, torch: Any) -> Any:
    table = {"float32": torch.float32, "float": torch.float32, "fp32": torch.float32,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "half": torch.float16, "fp16": torch.float16}
    if name == "auto":
        if device == "cuda":
            return torch.bfloat16
        # On a CPU with bf16 instructions (AVX512-BF16 on this project's machines), bfloat16
        # matmuls run 2.5x (one token) to 4x (a batch) faster than float32. A GGUF model's
        # weights are quantized anyway, so it runs in bfloat16; other checkpoints keep
        # float32 for exactness.
        return torch.bfloat16 if load_format == "gguf" else torch.float32
    if name not in table:
        raise ValueError(f"dtype must be one of auto, {', '.join(sorted(table))}; got {name!r}")
    return table[name]
