"""``tachyon generate | chat | serve | bench``.

Engine flags are shared by every subcommand and named like vLLM's. Bad flags or values end
with a one-line error and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

from tachyon.config import EngineArgs

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, no usage dump
        print(f"tachyon: error: {message}", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def add_engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine")
    g.add_argument("--model", default=None,
                   help="HF directory, .gguf file or preset (qwen3-0.6b, ...); default: the "
                        "embedded SmolLM2-135M-Instruct")
    g.add_argument("--tokenizer", default=None)
    g.add_argument("--dtype", default="auto")
    g.add_argument("--max-model-len", type=int, default=None)
    g.add_argument("--load-format", default="auto",
                   choices=["auto", "safetensors", "gguf", "dummy"])
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--block-size", type=int, default=16)
    g.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    g.add_argument("--kv-cache-memory", default=None, help="KV cache size, e.g. 2GiB (CPU)")
    g.add_argument("--no-enable-prefix-caching", dest="enable_prefix_caching",
                   action="store_false")
    g.add_argument("--max-num-seqs", type=int, default=256)
    g.add_argument("--max-num-batched-tokens", type=int, default=None)
    g.add_argument("--no-enable-chunked-prefill", dest="enable_chunked_prefill",
                   action="store_false")
    g.add_argument("--async-scheduling", dest="async_scheduling", action="store_true",
                   default=None, help="overlap host scheduling with the device (CUDA default)")
    g.add_argument("--no-async-scheduling", dest="async_scheduling", action="store_false")
    g.add_argument("--tensor-parallel-size", "-tp", type=int, default=1)
    g.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    g.add_argument("--attention-backend", default=None, choices=["torch", "triton", "flex"])
    g.add_argument("--enforce-eager", action="store_true")
    g.add_argument("--cudagraph-mode", default=None,
                   help="NONE | PIECEWISE | FULL | FULL_DECODE_ONLY | FULL_AND_PIECEWISE")
    g.add_argument("--compilation-config", "-O", default=None,
                   help='JSON, e.g. \'{"cudagraph_capture_sizes": [1, 2, 4], '
                        '"piecewise_backend": "compile"}\'')


def engine_args_from(ns: argparse.Namespace) -> EngineArgs:
    return EngineArgs(
        model=ns.model, tokenizer=ns.tokenizer, dtype=ns.dtype, max_model_len=ns.max_model_len,
        load_format=ns.load_format, seed=ns.seed, block_size=ns.block_size,
        gpu_memory_utilization=ns.gpu_memory_utilization, kv_cache_memory=ns.kv_cache_memory,
        enable_prefix_caching=ns.enable_prefix_caching, max_num_seqs=ns.max_num_seqs,
        max_num_batched_tokens=ns.max_num_batched_tokens,
        enable_chunked_prefill=ns.enable_chunked_prefill, async_scheduling=ns.async_scheduling,
        tensor_parallel_size=ns.tensor_parallel_size, device=ns.device,
        attention_backend=ns.attention_backend, enforce_eager=ns.enforce_eager,
        cudagraph_mode=ns.cudagraph_mode, compilation_config=ns.compilation_config,
    )


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--sampling-seed", type=int, default=None)
    g.add_argument("--max-tokens", type=int, default=256)
    g.add_argument("--min-tokens", type=int, default=0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--presence-penalty", type=float, default=0.0)
    g.add_argument("--frequency-penalty", type=float, default=0.0)
    g.add_argument("--stop", action="append", default=None)
    g.add_argument("--ignore-eos", action="store_true")


def sampling_params_from(ns: argparse.Namespace) -> Any:
    from tachyon.sampling_params import SamplingParams

    return SamplingParams(
        temperature=ns.temperature, top_p=ns.top_p, top_k=ns.top_k, min_p=ns.min_p,
        seed=ns.sampling_seed, max_tokens=ns.max_tokens, min_tokens=ns.min_tokens,
        repetition_penalty=ns.repetition_penalty, presence_penalty=ns.presence_penalty,
        frequency_penalty=ns.frequency_penalty, stop=ns.stop, ignore_eos=ns.ignore_eos,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="tachyon", description="A fast LLM inference and serving engine")
    parser.add_argument("--log-level", default=os.environ.get("TACHYON_LOG_LEVEL", "WARNING"))
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    gen = sub.add_parser("generate", help="complete one prompt and print the text")
    gen.add_argument("prompt", nargs="?", default=None, help="prompt text (default: stdin)")
    gen.add_argument("--chat-template", dest="chat_template", action="store_true", default=None,
                     help="wrap the prompt as a user message in the model's chat template "
                          "(the default when the tokenizer has one)")
    gen.add_argument("--no-chat-template", dest="chat_template", action="store_false",
                     help="send the prompt as raw text")
    add_engine_args(gen)
    add_sampling_args(gen)

    chat = sub.add_parser("chat", help="interactive chat that streams the reply")
    chat.add_argument("--system", default=None, help="system prompt")
    add_engine_args(chat)
    add_sampling_args(chat)

    serve = sub.add_parser("serve", help="OpenAI-compatible HTTP server")
    from tachyon.entrypoints.openai.cli_args import add_serve_args

    add_serve_args(serve)
    add_engine_args(serve)

    bench = sub.add_parser("bench", help="benchmarks: throughput | latency | serve")
    bench.add_argument("bench_kind", choices=["throughput", "latency", "serve"])
    bench.add_argument("bench_args", nargs=argparse.REMAINDER)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    logging.basicConfig(level=ns.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    # tachyon's own start-up report and warnings go to stderr at INFO unless told otherwise.
    if "TACHYON_LOG_LEVEL" not in os.environ and ns.log_level.upper() == "WARNING":
        logging.getLogger("tachyon").setLevel(logging.INFO)
    try:
        if ns.command == "generate":
            return _generate(ns)
        if ns.command == "chat":
            return _chat(ns)
        if ns.command == "serve":
            from tachyon.entrypoints.openai.server import run_server

            if ns.model_tag and ns.model:
                parser.error("give the model once: positional or --model")
            ns.model = ns.model or ns.model_tag
            return run_server(ns, engine_args_from(ns))
        if ns.command == "bench":
            return _bench(ns.bench_kind, ns.bench_args)
    except ValueError as e:
        print(f"tachyon: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    return 0


def _generate(ns: argparse.Namespace) -> int:
    from tachyon.entrypoints.llm import LLM

    prompt = ns.prompt if ns.prompt is not None else sys.stdin.read().strip()
    if not prompt.strip():
        raise ValueError("the prompt is empty; pass it as an argument or on stdin")
    params = sampling_params_from(ns)
    llm = LLM.from_engine_args(engine_args_from(ns))
    tok = llm.get_tokenizer()
    use_template = ns.chat_template if ns.chat_template is not None else bool(
        tok is not None and getattr(tok, "chat_template", None))
    if use_template:
        out = llm.chat([{"role": "user", "content": prompt}], params)
    else:
        out = llm.generate([prompt], params, use_tqdm=False)
    print(out[0].outputs[0].text)
    return 0


def _chat(ns: argparse.Namespace) -> int:
    from tachyon.entrypoints.chat import run_chat

    return run_chat(engine_args_from(ns), sampling_params_from(ns), ns.system)


def _bench(kind: str, args: list[str]) -> int:
    if kind == "throughput":
        from tachyon.bench.throughput import main as bench_main
    elif kind == "latency":
        from tachyon.bench.latency import main as bench_main
    else:
        from tachyon.bench.serve import main as bench_main
    return bench_main(args)


if __name__ == "__main__":
    sys.exit(main())
