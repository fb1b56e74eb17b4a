"""Flags of ``tachyon serve`` that belong to the server (host, port, API process options).

Engine flags are added by the CLI itself; this module owns only what the HTTP side needs, so
the server's options live next to the server's code.
"""

from __future__ import annotations

import argparse


def add_serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_tag", nargs="?", default=None, help="model (same as --model)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    p.add_argument("--port", type=int, default=8000, help="port to bind (default: %(default)s)")
    p.add_argument("--served-model-name", default=None,
                   help="model name clients use (default: derived from the model)")
