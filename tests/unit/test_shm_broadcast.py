"""The shared-memory step ring: every message reaches every reader, in order, whole; the
writer never overwrites a slot a reader has not read; a waiting reader sleeps.

The expected stream is what the test itself pickled and handed to the writer, never read back
from the ring. Slots are made small (a few hundred bytes) so that ordinary steps wrap the ring
many times and large prompts take the side-file path.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import threading
import time
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from tachyon.distributed.shm_broadcast import RingSpec, ShmBroadcastReader, ShmBroadcastWriter
from tachyon.sampling_params import SamplingParams
from tachyon.step import ScheduledRequest, SchedulerOutput

SLOT_BYTES = 512
CTX = mp.get_context("fork")
# A reader blocked for IDLE_S must use under IDLE_CPU_FRACTION of a core: it sleeps, it does
# not poll (a 50 us sleep-poll loop costs several percent; a pure spin, 100%).
IDLE_S = 0.5
IDLE_CPU_FRACTION = 0.02
# An example takes milliseconds; one this slow is a lost message or a lost wake-up.
STUCK_S = 10.0


def _churn(draws: list[tuple[int, int, int]]) -> list[bytes]:
    """Pickled ``SchedulerOutput``s of a random request churn: per step, ``arrive`` new
    requests with prompts of ``prompt_len`` tokens (long ones pickle beyond a slot), the
    running ones decoding a token, and ``finish`` of the oldest leaving."""
    running: list[str] = []
    steps, next_id = [], 0
    for arrive, prompt_len, finish in draws:
        reqs = [ScheduledRequest(rid, [7], 10 + i, [i], False, True)
                for i, rid in enumerate(running)]
        for _ in range(arrive):
            rid = f"req-{next_id}"
            next_id += 1
            prompt = [(next_id * 31 + t) % 1000 for t in range(prompt_len)]
            reqs.append(ScheduledRequest(rid, prompt, 0, list(range(prompt_len // 16 + 1)),
                                         True, True, prompt_token_ids=prompt,
                                         params=SamplingParams(max_tokens=8)))
            running.append(rid)
        finished, running = running[:finish], running[finish:]
        steps.append(pickle.dumps(
            SchedulerOutput(reqs, sum(len(r.new_token_ids) for r in reqs), finished),
            protocol=pickle.HIGHEST_PROTOCOL))
    return steps


def _read_all(reader: ShmBroadcastReader, n: int, delays: list[float],
              got: list[bytes]) -> None:
    for i in range(n):
        if delays[i % len(delays)]:
            time.sleep(delays[i % len(delays)])
        got.append(reader.read())


@settings(max_examples=40, deadline=None)
@given(
    draws=st.lists(st.tuples(st.integers(0, 3), st.sampled_from([1, 5, 40, 400, 3000]),
                             st.integers(0, 2)), min_size=1, max_size=30),
    num_slots=st.integers(1, 4),
    speeds=st.lists(st.lists(st.sampled_from([0.0, 0.0, 1e-4, 1e-3]), min_size=1,
                             max_size=5), min_size=1, max_size=4),
)
def test_every_reader_gets_every_step_in_order(tmp_path_factory, draws, num_slots,
                                               speeds) -> None:
    """Random churn, random payload sizes (oversize included), readers of random speeds:
    each reader receives exactly the written sequence, and side files do not pile up."""
    steps = _churn(draws)
    root = tmp_path_factory.mktemp("ring")
    spec = RingSpec.create(CTX, str(root), len(speeds), num_slots, SLOT_BYTES)
    writer = ShmBroadcastWriter(spec)
    got: list[list[bytes]] = [[] for _ in speeds]
    readers = [threading.Thread(target=_read_all, daemon=True,
                                args=(ShmBroadcastReader(spec, r), len(steps), delays, got[r]))
               for r, delays in enumerate(speeds)]
    for t in readers:
        t.start()
    deadline = time.monotonic() + STUCK_S
    for payload in steps:
        assert writer.write(payload, lambda: time.monotonic() > deadline), "ring stuck"
        assert len(os.listdir(root)) <= 1 + num_slots  # the ring, side files of live slots
    for t in readers:
        t.join(timeout=max(0.0, deadline - time.monotonic()))
    assert all(not t.is_alive() for t in readers)
    for r, stream in enumerate(got):
        assert stream == steps, f"reader {r} (delays {speeds[r]})"
    writer.close()


def test_a_full_ring_waits_for_the_slowest_reader_and_can_give_up(tmp_path: Path) -> None:
    spec = RingSpec.create(CTX, str(tmp_path), num_readers=2, num_slots=2, slot_bytes=64)
    writer = ShmBroadcastWriter(spec)
    fast, slow = ShmBroadcastReader(spec, 0), ShmBroadcastReader(spec, 1)
    assert writer.write(b"a") and writer.write(b"b")
    assert fast.read() == b"a" and fast.read() == b"b"
    asked: list[float] = []

    def give_up() -> bool:
        asked.append(time.monotonic())
        return len(asked) >= 3

    assert not writer.write(b"c", give_up)  # slot 0 still holds "a", unread by ``slow``
    assert fast.try_read() is None  # nothing was published
    assert slow.read() == b"a"
    assert writer.write(b"c", give_up)
    assert slow.read() == b"b" and slow.read() == b"c" and fast.read() == b"c"


def test_a_waiting_reader_sleeps(tmp_path: Path) -> None:
    """CPU time of a reader that waits IDLE_S for its next step, and how fast it wakes."""
    spec = RingSpec.create(CTX, str(tmp_path), num_readers=1)
    writer, reader = ShmBroadcastWriter(spec), ShmBroadcastReader(spec, 0)
    result: dict[str, float] = {}

    def wait_for_one() -> None:
        result["started"] = time.perf_counter()
        cpu = time.thread_time()
        reader.read()
        result["woke"] = time.perf_counter()
        result["cpu"] = time.thread_time() - cpu

    t = threading.Thread(target=wait_for_one)
    t.start()
    time.sleep(IDLE_S)
    sent = time.perf_counter()
    writer.write(b"step")
    t.join(timeout=5)
    assert result["cpu"] < IDLE_CPU_FRACTION * IDLE_S, result
    assert result["woke"] - sent < 0.05, result  # woken by the doorbell, not a timeout
    # The wait is counted where the driver can read it (the step-time split).
    assert IDLE_S <= writer.reader_wait_s(0) <= result["woke"] - result["started"], result


def _reader_process(spec: RingSpec, rank: int, n: int, conn) -> None:
    reader = ShmBroadcastReader(spec, rank)
    conn.send([reader.read() for _ in range(n)])
    os._exit(0)


def test_reader_processes(tmp_path: Path) -> None:
    """Forked readers over the mapped file (the ranks' setting), the ring wrapped many times."""
    steps = [os.urandom(n) for n in [0, 1, 100, 4096, 70_000, 3] * 20]
    spec = RingSpec.create(CTX, str(tmp_path), num_readers=3, num_slots=4, slot_bytes=4096)
    pipes = [CTX.Pipe(duplex=False) for _ in range(3)]
    procs = [CTX.Process(target=_reader_process, args=(spec, r, len(steps), pipes[r][1]))
             for r in range(3)]
    for p in procs:
        p.start()
    writer = ShmBroadcastWriter(spec)
    for payload in steps:
        assert writer.write(payload, lambda: not all(p.is_alive() for p in procs))
    for (recv, _), p in zip(pipes, procs, strict=True):
        assert recv.recv() == steps
        p.join(timeout=5)
        assert p.exitcode == 0
