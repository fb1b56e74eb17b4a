"""Flags of ``tachyon serve`` that belong to the server (host, port, API process options).

Engine flags are added by the CLI itself; this module owns only what the HTTP side needs, so
the server's options live next to the server's code. Values are checked here, at parse time,
so a bad one ends with a one-line usage error before any model loads.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field

# At most this many samples per prompt: n = 10000 would hold the engine for minutes.
DEFAULT_MAX_N = 128
# Request bodies above this are refused with 413 before they are read to the end.
DEFAULT_MAX_REQUEST_BYTES = 16 * 2**20
# Where --api-key is read from when the flag is not given (a flag shows in `ps`).
API_KEY_ENV = "TACHYON_API_KEY"
TOOL_CALL_PARSERS = ("hermes", "llama3_json")


@dataclass(frozen=True)
class ServerSettings:
    """What the HTTP side was started with, checked (see ``settings_from``)."""

    model_name: str
    max_n: int = DEFAULT_MAX_N
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    api_key: str | None = None
    chat_template: str | None = None  # the template text (the file already read)
    tool_call_parser: str | None = None
    enable_auto_tool_choice: bool = False
    lora_modules: dict[str, str] = field(default_factory=dict)  # name -> adapter path


def _lora_module(value: str) -> tuple[str, str]:
    name, sep, path = value.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"--lora-modules takes name=path, got {value!r}")
    return name, path


def settings_from(ns: argparse.Namespace, model_name: str) -> ServerSettings:
    """Raises ``ValueError`` (a one-line usage error) for flags that do not fit together."""
    from tachyon.entrypoints.openai.chat_utils import load_chat_template

    if ns.enable_auto_tool_choice and ns.tool_call_parser is None:
        raise ValueError("--enable-auto-tool-choice needs --tool-call-parser "
                         f"({' | '.join(TOOL_CALL_PARSERS)})")
    if ns.lora_modules and not ns.enable_lora:
        raise ValueError("--lora-modules needs --enable-lora")
    modules = dict(ns.lora_modules or ())
    if model_name in modules:
        raise ValueError(f"--lora-modules: {model_name!r} is the base model's name")
    return ServerSettings(model_name, ns.max_n, ns.max_request_bytes,
                          ns.api_key or os.environ.get(API_KEY_ENV) or None,
                          load_chat_template(ns.chat_template), ns.tool_call_parser,
                          ns.enable_auto_tool_choice, modules)


def _port(value: str) -> int:
    try:
        port = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {value!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"a port is in [0, 65535], got {port}")
    return port


def _positive(value: str) -> int:
    try:
        v = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {value!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def add_serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_tag", nargs="?", default=None, help="model (same as --model)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    p.add_argument("--port", type=_port, default=8000,
                   help="port to bind, 0 for any free one (default: %(default)s)")
    p.add_argument("--served-model-name", default=None,
                   help="model name clients use (default: derived from the model)")
    p.add_argument("--max-n", type=_positive, default=DEFAULT_MAX_N,
                   help="largest n (samples per prompt) a request may ask for "
                        "(default: %(default)s)")
    p.add_argument("--max-request-bytes", type=_positive, default=DEFAULT_MAX_REQUEST_BYTES,
                   help="largest request body; larger ones get 413 (default: %(default)s)")
    p.add_argument("--api-key", default=None,
                   help=f"require 'Authorization: Bearer KEY' on every route but /health "
                        f"(default: ${API_KEY_ENV}, else no key)")
    p.add_argument("--chat-template", default=None,
                   help="a Jinja chat template: a file, or the template text itself "
                        "(default: the tokenizer's)")
    p.add_argument("--tool-call-parser", choices=TOOL_CALL_PARSERS, default=None,
                   help="how tool calls are read out of the model's text (default: none)")
    p.add_argument("--enable-auto-tool-choice", action="store_true",
                   help='allow tool_choice "auto" (needs --tool-call-parser; default: off, so '
                        '"auto" is a 400)')
    p.add_argument("--lora-modules", type=_lora_module, nargs="+", default=None,
                   metavar="NAME=PATH",
                   help="LoRA adapters to load at start, served under NAME (needs "
                        "--enable-lora; default: none)")
