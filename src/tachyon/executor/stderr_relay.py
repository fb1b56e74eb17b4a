"""A child process's stderr, relayed through its parent: passed on to the parent's own
stderr as it comes, its last lines kept for the parent's error message when the child dies
without saying why any other way (a crash; a spawned child failing before any of our code
runs in it)."""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import sys
import threading

# A Python traceback's last frames and its exception fit in this many lines, a whole log
# does not. At most TAIL_BYTES of output are kept to find them in.
TAIL_LINES = 25
TAIL_BYTES = 16384


class StderrRelay:
    """Starts ``proc`` with its stderr on a pipe; ``start()`` then copies what it writes to
    ours, keeping the tail. Call ``start()`` after the last fork of a batch of children: a
    child forked while the relay thread holds a lock would inherit it held."""

    def __init__(self, proc: mp.process.BaseProcess) -> None:
        self._read_fd = _start_with_stderr_pipe(proc)
        self._tail = b""
        self._thread = threading.Thread(target=self._relay, name=f"{proc.name}-stderr",
                                        daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _relay(self) -> None:
        with open(self._read_fd, "rb", buffering=0) as src, open(2, "wb", closefd=False) as dst:
            while chunk := src.read(TAIL_BYTES):
                self._tail = (self._tail + chunk)[-TAIL_BYTES:]
                with contextlib.suppress(OSError):  # our stderr is gone: keep the tail anyway
                    dst.write(chunk)
                    dst.flush()

    def tail(self, timeout: float) -> str:
        """The child's last stderr lines. Once the child has ended its pipe is at EOF within
        moments; ``timeout`` bounds the wait for that (a grandchild may hold the pipe)."""
        self._thread.join(timeout)
        return "\n".join(self._tail.decode(errors="replace").rstrip().splitlines()[-TAIL_LINES:])


def _start_with_stderr_pipe(proc: mp.process.BaseProcess) -> int:
    """Start ``proc`` with a new pipe as its fd 2 and return the pipe's read end. A child
    inherits fd 2 as it starts (fork or spawn alike), so ours points there only meanwhile;
    whatever another of our threads writes meanwhile is relayed too."""
    read_fd, write_fd = os.pipe()
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        os.dup2(write_fd, 2)
        proc.start()
    except BaseException:
        os.close(read_fd)
        raise
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(write_fd)
    return read_fd
