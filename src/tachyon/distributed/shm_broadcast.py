"""One writer, N readers on one machine: a ring of fixed slots in shared memory.

The driver writes each step once; every rank reads it from the same pages (no per-step
collective, no copy per rank through a pipe). The ring is a file in a tmpfs (``/dev/shm``
where there is one) that each process maps; it lives and dies with the executor's temp dir.

Layout, each field on its own 64-byte line so a reader's acknowledgement never shares a cache
line with another reader's or with a slot the writer is filling::

    line 0                 the writer waits for space (1) or not (0)
    line 1 + r             reader r's acknowledgement (how many messages it has read), then
                           the nanoseconds it has spent in ``wait`` (for the step-time split)
    slot i (i < slots)     a header line (sequence number, length), then slot_bytes

Invariants: message ``k`` (from 0) goes to slot ``k % slots``; its header's sequence number
is ``k + 1``, written after the payload, so a reader that sees it sees the payload (x86 keeps
stores, and loads, in program order; the sequence number is the last store). The writer
reuses a slot only once every reader's acknowledgement is past the message it held, so no
reader ever misses a message or reads a torn one. A payload over ``slot_bytes`` goes to a side
file named after its sequence number (length ``-1`` in the header), removed when its slot is
reused.

Waiting: a reader spins for ``SPIN_NS`` (yielding the core) and then blocks on its doorbell, a
semaphore the writer posts once per message. Posting a semaphore nobody waits on is a
userspace atomic (no system call), so a writer whose readers keep up pays next to nothing.
A reader takes back one post per message it reads, so stale posts stay few; one left over
(posted after a read that had already seen its message) only costs one empty wake-up.
"""

from __future__ import annotations

import mmap
import os
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

_LINE = 64  # a cache line
_COUNTER = struct.Struct("<q")
_SLOT_HEADER = struct.Struct("<qq")  # sequence number (0: never written), payload length
_SIDE_FILE = -1  # header length of a payload that went to a side file

# Eight steps of slack: the engine has at most two steps in flight (asynchronous scheduling),
# so the writer waits for space only behind a rank that has stopped reading.
DEFAULT_NUM_SLOTS = 8
# A decode step of hundreds of requests pickles to tens of KiB; prompts of a large prefill
# step, or a weight update, go to a side file. Untouched slot pages take no memory.
DEFAULT_SLOT_BYTES = 1 << 20
# About one futex wake-up's latency: spinning longer costs more CPU than it saves in latency.
SPIN_NS = 50_000
# How often a writer waiting for space re-checks on its own: its wake-up can be lost in a race
# with a reader's acknowledgement (the flag below is no fence), which this bounds.
WRITER_RECHECK_S = 0.01


def _never() -> bool:
    return False


@dataclass(frozen=True)
class RingSpec:
    """Everything a process needs to open the ring: picklable, so a spawned rank gets it as a
    process argument (semaphores cross process boundaries only that way, or by fork)."""

    path: str
    num_readers: int
    num_slots: int
    slot_bytes: int
    doorbells: tuple[Any, ...]  # one semaphore per reader, posted once per message
    space: Any  # the writer's semaphore, posted by readers while the writer waits for space

    @classmethod
    def create(cls, ctx: Any, directory: str, num_readers: int,
               num_slots: int = DEFAULT_NUM_SLOTS,
               slot_bytes: int = DEFAULT_SLOT_BYTES) -> RingSpec:
        """A fresh, zeroed ring file in ``directory``; ``ctx`` is the multiprocessing context
        the readers will be started with."""
        spec = cls(os.path.join(directory, "steps.ring"), num_readers, num_slots, slot_bytes,
                   tuple(ctx.Semaphore(0) for _ in range(num_readers)), ctx.Semaphore(0))
        with open(spec.path, "wb") as f:
            f.truncate(spec.size)
        return spec

    @property
    def size(self) -> int:
        return self._slots_start + self.num_slots * (_LINE + self.slot_bytes)

    @property
    def _slots_start(self) -> int:
        return _LINE * (1 + self.num_readers)

    def ack_offset(self, reader: int) -> int:
        return _LINE * (1 + reader)

    def waited_offset(self, reader: int) -> int:
        return self.ack_offset(reader) + _COUNTER.size

    def slot_offset(self, seq: int) -> int:
        """Where message ``seq``'s slot header is; its payload follows one line later."""
        return self._slots_start + (seq % self.num_slots) * (_LINE + self.slot_bytes)

    def side_path(self, seq: int) -> str:
        return f"{self.path}.{seq}"


def _map(spec: RingSpec) -> mmap.mmap:
    fd = os.open(spec.path, os.O_RDWR)
    try:
        return mmap.mmap(fd, spec.size)
    finally:
        os.close(fd)  # the mapping keeps the file


class ShmBroadcastWriter:
    """The one writer (the driver)."""

    def __init__(self, spec: RingSpec) -> None:
        self.spec = spec
        self._buf = _map(spec)
        self._next = 0  # the next message's number

    def write(self, payload: bytes, abort: Callable[[], bool] = _never) -> bool:
        """Publish ``payload`` to every reader. Waits while the ring is full (a reader lags
        ``num_slots`` messages behind), asking ``abort`` every so often; False if it said
        to give up (e.g. a reader died), the message unsent."""
        spec, k = self.spec, self._next
        if not self._wait_for_space(k, abort):
            return False
        off = spec.slot_offset(k)
        if k >= spec.num_slots and self._header(off)[1] == _SIDE_FILE:
            os.unlink(spec.side_path(k - spec.num_slots))  # every reader has read it
        if len(payload) <= spec.slot_bytes:
            self._buf[off + _LINE:off + _LINE + len(payload)] = payload
            length = len(payload)
        else:
            with open(spec.side_path(k), "wb") as f:
                f.write(payload)
            length = _SIDE_FILE
        _COUNTER.pack_into(self._buf, off + 8, length)
        _COUNTER.pack_into(self._buf, off, k + 1)  # last: publishes the message
        self._next = k + 1
        for bell in spec.doorbells:
            bell.release()
        return True

    def _header(self, off: int) -> tuple[int, int]:
        return _SLOT_HEADER.unpack_from(self._buf, off)

    def _slot_free(self, k: int) -> bool:
        """Every reader has read message ``k - num_slots``, the one slot ``k`` still holds."""
        need = k + 1 - self.spec.num_slots
        return all(_COUNTER.unpack_from(self._buf, self.spec.ack_offset(r))[0] >= need
                   for r in range(self.spec.num_readers))

    def _wait_for_space(self, k: int, abort: Callable[[], bool]) -> bool:
        while not self._slot_free(k):
            if abort():
                return False
            _COUNTER.pack_into(self._buf, 0, 1)
            if not self._slot_free(k):
                self.spec.space.acquire(timeout=WRITER_RECHECK_S)
            _COUNTER.pack_into(self._buf, 0, 0)
        return True

    def reader_wait_s(self, reader: int) -> float:
        """How long ``reader`` has waited for messages so far, in seconds."""
        return _COUNTER.unpack_from(self._buf, self.spec.waited_offset(reader))[0] * 1e-9

    def close(self) -> None:
        self._buf.close()


class ShmBroadcastReader:
    """Reader ``reader`` (a rank): every message, in order, exactly once."""

    def __init__(self, spec: RingSpec, reader: int) -> None:
        self.spec, self.reader = spec, reader
        self._buf = _map(spec)
        self._doorbell = spec.doorbells[reader]
        self._next = 0
        self._waited_ns = 0

    def try_read(self) -> bytes | None:
        """The next message if it has been published, else None (never waits)."""
        spec, k = self.spec, self._next
        off = spec.slot_offset(k)
        seq, length = _SLOT_HEADER.unpack_from(self._buf, off)
        if seq != k + 1:
            return None
        if length == _SIDE_FILE:
            with open(spec.side_path(k), "rb") as f:
                payload = f.read()
        else:
            payload = self._buf[off + _LINE:off + _LINE + length]
        self._next = k + 1
        _COUNTER.pack_into(self._buf, spec.ack_offset(self.reader), k + 1)  # after the copy
        self._doorbell.acquire(False)  # this message's post (if already made)
        if _COUNTER.unpack_from(self._buf, 0)[0]:
            spec.space.release()
        return payload

    def wait(self) -> None:
        """Return once a message may have arrived (or ``wake`` was called): spin briefly,
        then sleep on the doorbell. The caller re-checks with ``try_read``."""
        start = time.perf_counter_ns()
        deadline = start + SPIN_NS
        while time.perf_counter_ns() < deadline and not self._published():
            os.sched_yield()
        if not self._published():
            self._doorbell.acquire()
        self._waited_ns += time.perf_counter_ns() - start
        _COUNTER.pack_into(self._buf, self.spec.waited_offset(self.reader), self._waited_ns)

    def read(self) -> bytes:
        """The next message, waiting for it as long as it takes."""
        while (payload := self.try_read()) is None:
            self.wait()
        return payload

    def wake(self) -> None:
        """End this reader's ``wait`` (from another thread: something else to do)."""
        self._doorbell.release()

    def _published(self) -> bool:
        return _COUNTER.unpack_from(self._buf, self.spec.slot_offset(self._next))[0] \
            == self._next + 1

    def close(self) -> None:
        self._buf.close()
