"""``TACHYON_PROFILE_DIR=DIR``: profile a serving process's main thread with cProfile and
write ``DIR/<role>-<pid>.prof`` when it ends (``python -m pstats`` reads it). For finding the
host work of a served step — the API process's event loop, the engine core's loop; cProfile
slows Python code down, so read it for where time goes, not for how much there is."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def maybe_profile(role: str) -> Iterator[None]:
    root = os.environ.get("TACHYON_PROFILE_DIR")
    if not root:
        yield
        return
    import cProfile

    profiler = cProfile.Profile()
    profiler.enable()
    try:
        yield
    finally:
        profiler.disable()
        Path(root).mkdir(parents=True, exist_ok=True)
        profiler.dump_stats(str(Path(root) / f"{role}-{os.getpid()}.prof"))
