"""Shared pieces of the benchmarks: the standard workload, hardware ceilings, step timing,
output files and the failure contract.

A benchmark either produces its figures (a table on stdout, a JSON and a PNG) or exits
non-zero with one line on stderr that says why; ``run_bench`` enforces that. torch is
imported inside the functions that need it, so ``tachyon bench KIND --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tachyon.entrypoints.args import engine_args_from

if TYPE_CHECKING:
    import torch

    from tachyon.config import EngineArgs

logger = logging.getLogger(__name__)

# Exit status of a benchmark that ran but could not produce its figures (2: bad usage).
EXIT_BENCH_FAILED = 1
EXIT_USAGE = 2
# Characters per line of a plot title: longer ones are wrapped, never cut off.
TITLE_WIDTH = 48
# What the engine benchmarks change of EngineArgs' defaults: the model of the published
# figures (docs/performance.md), and a context long enough for the standard workload.
BENCH_ENGINE_DEFAULTS = {"model": "qwen3-0.6b", "max_model_len": 4096}
BENCH_ENGINE_NOTES = {"load_format": "for a benchmark, auto means random (dummy) weights for "
                                     "a preset and the real weights of a model path"}

# BENCHMARKS.md: 256 prompts of 100..1024 random ids (< 10000), outputs of 100..1024 tokens.
STANDARD_NUM_PROMPTS = 256
STANDARD_LEN_RANGE = (100, 1024)
STANDARD_VOCAB_CAP = 10000


def standard_workload(num_prompts: int = STANDARD_NUM_PROMPTS,
                      input_len: tuple[int, int] = STANDARD_LEN_RANGE,
                      output_len: tuple[int, int] = STANDARD_LEN_RANGE,
                      seed: int = 0, vocab_size: int | None = None,
                      ) -> tuple[list[list[int]], list[int]]:
    """Exactly the nano-vllm workload with the defaults (prompts drawn first, then lengths).
    A vocabulary smaller than the id range (a tiny test model) wraps the ids into it."""
    random.seed(seed)
    wrap = vocab_size if vocab_size is not None and vocab_size <= STANDARD_VOCAB_CAP else None
    prompts = [[random.randint(0, STANDARD_VOCAB_CAP) for _ in range(random.randint(*input_len))]
               for _ in range(num_prompts)]
    if wrap is not None:
        prompts = [[t % wrap for t in p] for p in prompts]
    max_tokens = [random.randint(*output_len) for _ in range(num_prompts)]
    return prompts, max_tokens


class BenchError(Exception):
    """A benchmark cannot produce its figures; the message is the one-line reason."""


def run_bench(name: str, body: Callable[[], None]) -> int:
    """Run ``body``; turn any failure into one line on stderr and a non-zero exit status."""
    try:
        body()
    except BenchError as e:
        return _fail(name, str(e), EXIT_BENCH_FAILED)
    except ValueError as e:  # a bad flag or value (EngineArgs validation)
        return _fail(name, str(e), EXIT_USAGE)
    except Exception as e:
        logger.debug("%s failed", name, exc_info=True)
        return _fail(name, f"{type(e).__name__}: {e}", EXIT_BENCH_FAILED)
    return 0


def _fail(name: str, reason: str, code: int) -> int:
    line = reason.strip().splitlines()[0] if reason.strip() else "failed"
    print(f"{name}: error: {line}", file=sys.stderr)
    return code


def add_output_args(p: argparse.ArgumentParser, kind: str) -> None:
    p.add_argument("--json", default=f"bench_results/{kind}.json", metavar="PATH",
                   help="write the results here (default: %(default)s)")
    p.add_argument("--plot", default=f"bench_results/{kind}.png", metavar="PATH",
                   help="write a PNG of the results here (default: %(default)s)")
    p.add_argument("--no-plot", dest="plot", action="store_const", const=None,
                   help="write no PNG, which needs matplotlib: pip install 'tachyon[bench]' "
                        "(default: write it)")


def bench_engine_args(ns: argparse.Namespace) -> EngineArgs:
    """The engine a benchmark's command line asks for. A preset has a config and no weights,
    so ``--load-format auto`` gives it dummy weights; a model path keeps its real ones."""
    from tachyon.loader.resolve import preset_names

    args = engine_args_from(ns)
    if args.load_format == "auto" and args.model in preset_names():
        args.load_format = "dummy"
    return args


def check_can_plot(path: str | None) -> None:
    """Fail before measuring, not after, when the PNG cannot be written."""
    if path is None:
        return
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise BenchError("the PNG needs matplotlib: pip install 'tachyon[bench]', or pass "
                         "--no-plot") from None


def wrapped_title(text: str) -> str:
    return "\n".join(textwrap.wrap(text, TITLE_WIDTH))


def short_model_name(model: str | None) -> str:
    """A model path's last component (a title has no room for a whole path)."""
    return Path(model).name if model else "SmolLM2-135M-Instruct (default)"


def step_timer(device: str) -> Callable[[Callable[[], Any]], float]:
    """A function that runs ``fn`` once and returns its duration in milliseconds: CUDA events
    on a GPU (device time of the queued work), the wall clock elsewhere (a CPU step is
    synchronous)."""
    if device != "cuda":
        def wall(fn: Callable[[], Any]) -> float:
            start = time.perf_counter()
            fn()
            return (time.perf_counter() - start) * 1e3
        return wall

    import torch

    def events(fn: Callable[[], Any]) -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    return events


def measure_copy_bandwidth(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus written."""
    import torch

    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).uniform_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    reps = 20
    start.record()
    for _ in range(reps):
        dst.copy_(src)
    end.record()
    torch.cuda.synchronize()
    return 2 * nbytes * reps / (start.elapsed_time(end) / 1e3)


def measure_matmul_flops(device: torch.device, n: int = 8192) -> float:
    """bf16 matmul rate in FLOP/s on random data."""
    import torch

    a = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    b = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    reps = 10
    start.record()
    for _ in range(reps):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return 2 * n**3 * reps / (start.elapsed_time(end) / 1e3)


def model_bytes_and_kv(hf_config: Any, dtype_bytes: int = 2) -> tuple[int, int, int]:
    """(weight bytes, KV bytes per token, parameter count) of a Llama-family config."""
    c = hf_config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    q = c.num_attention_heads * head_dim
    kv = c.num_key_value_heads * head_dim
    per_layer = c.hidden_size * (q + 2 * kv) + q * c.hidden_size \
        + 3 * c.hidden_size * c.intermediate_size
    params = c.num_hidden_layers * per_layer + c.vocab_size * c.hidden_size * (
        1 if getattr(c, "tie_word_embeddings", False) else 2)
    kv_per_token = c.num_hidden_layers * 2 * kv * dtype_bytes
    return params * dtype_bytes, kv_per_token, params


def throughput_floor_seconds(hf_config: Any, prompts: list[list[int]], max_tokens: list[int],
                             bandwidth: float, flops: float, tp: int = 1) -> dict[str, float]:
    """What the hardware cannot beat: each decode token reads its whole context's KV once,
    each decode step reads the weights once, prefill is compute."""
    weight_bytes, kv_tok, params = model_bytes_and_kv(hf_config)
    kv_bytes = sum(sum(len(p) + i for i in range(m)) for p, m in zip(prompts, max_tokens,
                                                                       strict=True)) * kv_tok
    steps = max(max_tokens)
    prefill_flops = 2 * params * sum(len(p) for p in prompts)
    t_kv = kv_bytes / (bandwidth * tp)
    t_w = weight_bytes * steps / (bandwidth * tp)
    t_pf = prefill_flops / (flops * tp)
    return {"kv_read_s": t_kv, "weight_read_s": t_w, "prefill_compute_s": t_pf,
            "floor_s": t_kv + t_w + t_pf, "kv_bytes": kv_bytes}


def write_json(path: str | None, data: dict[str, Any]) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(data, indent=2, default=str))


def save_figure(fig: Any, path: str) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def timestamp() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S")


def device_name(device: str) -> str:
    if device != "cuda":
        return "cpu"
    import torch

    return torch.cuda.get_device_name(0)
