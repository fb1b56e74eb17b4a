"""Flags of ``tachyon serve`` that belong to the server (host, port, API process options).

Engine flags are added by the CLI itself; this module owns only what the HTTP side needs, so
the server's options live next to the server's code. Values are checked here, at parse time,
so a bad one ends with a one-line usage error before any model loads.
"""

from __future__ import annotations

import argparse

# At most this many samples per prompt: n = 10000 would hold the engine for minutes.
DEFAULT_MAX_N = 128
# Request bodies above this are refused with 413 before they are read to the end.
DEFAULT_MAX_REQUEST_BYTES = 16 * 2**20


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
