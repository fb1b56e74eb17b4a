"""``tachyon generate | chat | serve | bench``.

Engine flags come from ``EngineArgs`` (``tachyon.entrypoints.args``) and are named like
vLLM's. Bad flags or values end with a one-line error and exit status 2, never a traceback.
Nothing heavy is imported before a command runs, so ``--help`` answers at once.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from tachyon.entrypoints.args import (
    EXIT_USAGE,
    Parser,
    Toggle,
    add_engine_args,
    add_sampling_args,
    engine_args_from,
    parse_args,
    sampling_params_from,
)

# Exit status of a command stopped by Ctrl-C, as a shell reports SIGINT.
EXIT_INTERRUPTED = 130
# ``tachyon bench KIND``: the module whose ``main(argv) -> int`` runs it.
BENCHES = {"throughput": "tachyon.bench.throughput", "latency": "tachyon.bench.latency",
           "serve": "tachyon.bench.serve"}
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
# generate and chat run one request at a time: sized for one, the KV cache on a CPU is what
# one --max-model-len request needs (189 MB for SmolLM2) instead of the 1 GiB default, which
# took 0.9 s to zero at start-up; on a GPU only batch-1 graphs are captured.
ONE_REQUEST = {"max_num_seqs": 1}
# Idle OpenMP threads sleep instead of spinning. On a CPU whose cores other processes also
# use, spinning threads starve the ones doing the work: on the 2-core machine at load 5, a
# warm one-token generate took 2.4-3.3 s spinning and 0.10-0.17 s passive, 32 tokens 32-48 s
# against 3.2-4.7 s (docs/performance.md). Set OMP_WAIT_POLICY to override.
OMP_WAIT_POLICY = "PASSIVE"


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="tachyon", description="A fast LLM inference and serving engine.")
    parser.add_argument("--log-level", type=str.upper, choices=LOG_LEVELS,
                        default=os.environ.get("TACHYON_LOG_LEVEL", "WARNING").upper(),
                        help="log level of other libraries; tachyon's own start-up report "
                             "shows at WARNING too (default: $TACHYON_LOG_LEVEL, else "
                             "%(default)s)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)

    gen = sub.add_parser("generate", help="complete one prompt and print the text",
                         usage="%(prog)s [options] [PROMPT]",
                         description="Complete one prompt; the text streams to stdout.")
    gen.add_argument("prompt", nargs="?", default=None, help="prompt text (default: stdin)")
    gen.add_argument("--chat-template", "--no-chat-template", action=Toggle, default=None,
                     help="wrap the prompt as a user message in the model's chat template, or "
                          "send it as raw text (default: on when the tokenizer has one)")
    add_engine_args(gen, defaults=ONE_REQUEST)
    add_sampling_args(gen)

    chat = sub.add_parser("chat", help="interactive chat that streams the reply",
                          usage="%(prog)s [options]",
                          description="Interactive chat. Ctrl-C stops the reply being "
                                      "written; Ctrl-C at the prompt, Ctrl-D or /exit quits.")
    chat.add_argument("--system", default=None, help="system prompt (default: none)")
    add_engine_args(chat, defaults=ONE_REQUEST)
    add_sampling_args(chat)

    serve = sub.add_parser("serve", help="OpenAI-compatible HTTP server",
                           usage="%(prog)s [MODEL] [options]")
    from tachyon.entrypoints.openai.cli_args import add_serve_args

    add_serve_args(serve)
    add_engine_args(serve)

    bench = sub.add_parser("bench", help="benchmarks: " + " | ".join(BENCHES),
                           description="Run a benchmark; 'tachyon bench KIND --help' lists "
                                       "its flags.")
    bench.add_argument("bench_kind", choices=list(BENCHES), metavar="KIND",
                       help=" | ".join(BENCHES))
    bench.add_argument("bench_args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    # Before torch loads: the OpenMP runtime reads the policy once, when it starts.
    os.environ.setdefault("OMP_WAIT_POLICY", OMP_WAIT_POLICY)
    parser = build_parser()
    ns = parse_args(parser, argv)
    if ns.command is None:
        parser.error("a command is required: generate, chat, serve or bench "
                     "(see tachyon --help)")
    _configure_logging(ns.log_level)
    try:
        return _run(parser, ns)
    except ValueError as e:
        print(f"tachyon: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


def _configure_logging(level: str) -> None:
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    # tachyon's own start-up report and warnings go to stderr at INFO unless told otherwise.
    if "TACHYON_LOG_LEVEL" not in os.environ and level == "WARNING":
        logging.getLogger("tachyon").setLevel(logging.INFO)


def _run(parser: argparse.ArgumentParser, ns: argparse.Namespace) -> int:
    if ns.command == "generate":
        return _generate(ns)
    if ns.command == "chat":
        from tachyon.entrypoints.chat import run_chat

        return run_chat(engine_args_from(ns), sampling_params_from(ns), ns.system)
    if ns.command == "serve":
        from tachyon.entrypoints.openai.server import run_server

        if ns.model_tag and ns.model:
            parser.error("give the model once: positional or --model")
        ns.model = ns.model or ns.model_tag
        return run_server(ns, engine_args_from(ns))
    return importlib.import_module(BENCHES[ns.bench_kind]).main(ns.bench_args)


def _generate(ns: argparse.Namespace) -> int:
    from tachyon.engine.llm_engine import LLMEngine
    from tachyon.entrypoints.chat import cut_note, stream_reply
    from tachyon.entrypoints.llm import apply_chat_template

    prompt = ns.prompt if ns.prompt is not None else sys.stdin.read().strip()
    if not prompt.strip():
        raise ValueError("the prompt is empty; pass it as an argument or on stdin")
    params = sampling_params_from(ns)
    engine = LLMEngine.from_engine_args(engine_args_from(ns))
    tok = engine.get_tokenizer()
    use_template = ns.chat_template if ns.chat_template is not None else bool(
        tok is not None and getattr(tok, "chat_template", None))
    request = apply_chat_template(tok, [{"role": "user", "content": prompt}]) \
        if use_template else prompt
    reply = stream_reply(engine, "generate-0", request, params, _write)
    _write("\n")
    # stdout holds the text alone (scripts read it); why it ended early goes to stderr.
    note = cut_note(reply, params)
    if note:
        print(f"tachyon: {note}", file=sys.stderr)
    return EXIT_INTERRUPTED if reply.finish_reason == "abort" else 0


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(main())
