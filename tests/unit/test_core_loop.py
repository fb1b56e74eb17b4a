"""The engine core's process loop over real zmq sockets, with a stand-in core (no model): a
request the core refuses fails alone, the others keep running, and one message goes out per
step with every token of that step."""

from __future__ import annotations

import os
import threading

import msgspec
import pytest
import zmq

from tachyon.engine.core import TokenEvent
from tachyon.engine.core_proc import CoreLoop
from tachyon.engine.messages import (
    AbortRequests,
    AddRequest,
    CoreOutput,
    Shutdown,
    StepOutputs,
)
from tachyon.engine.request import Request, RequestStatus
from tachyon.sampling_params import SamplingParams

TIMEOUT_MS = 10_000


class _Stats:
    num_running = num_waiting = num_free_blocks = prefix_queries = prefix_hits = 0

    def __init__(self) -> None:
        self.spec_counts = {"draft_tokens": 0, "accepted_tokens": 0, "verifies": 0}


class _Pool:
    num_blocks = 8


class _Kv(_Stats):
    pool = _Pool()


class StubCore:
    """Each step gives every running request the token ``100 + its step count``; a request
    ends after ``max_tokens``. Refuses prompts containing a negative id."""

    def __init__(self) -> None:
        self.running: dict[str, Request] = {}
        self.kv, self.scheduler = _Kv(), _Stats()
        self.stats = {"generation_tokens": 0, "preemptions": 0, "steps": 0}
        self.wait_seconds = 0.0  # EngineCore's time blocked on device results

    def check_request(self, req: Request) -> None:
        if min(req.prompt_token_ids) < 0:
            raise ValueError("token id -1 is outside the vocabulary")

    def add_request(self, req: Request) -> None:
        self.running[req.request_id] = req

    def finish_requests(self, ids: list[str], status: RequestStatus) -> None:
        for rid in ids:
            self.running.pop(rid, None)

    def has_unfinished_requests(self) -> bool:
        return bool(self.running)

    def step(self) -> list[TokenEvent]:
        events = []
        for rid, req in list(self.running.items()):
            req.append_token(100 + req.num_output_tokens)
            done = req.num_output_tokens >= req.params.max_tokens
            status = RequestStatus.FINISHED_LENGTH if done else RequestStatus.RUNNING
            events.append(TokenEvent(req, req.all_token_ids[-1], status, None, None))
            if done:
                del self.running[rid]
        return events


@pytest.fixture
def loop_sockets() -> tuple[zmq.Socket, zmq.Socket, threading.Thread]:
    ctx = zmq.Context()
    to_core, from_core = ctx.socket(zmq.PUSH), ctx.socket(zmq.PULL)
    to_core.bind("inproc://in")
    from_core.bind("inproc://out")
    inp, out = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
    inp.connect("inproc://in")
    out.connect("inproc://out")
    loop = CoreLoop(StubCore(), inp, out, os.getppid())
    thread = threading.Thread(target=loop.run, daemon=True)
    yield to_core, from_core, thread
    to_core.send(msgspec.msgpack.encode(Shutdown()))
    thread.join(10)
    for s in (to_core, from_core, inp, out):
        s.close(0)
    ctx.term()


def _add(rid: str, prompt: list[int], max_tokens: int) -> bytes:
    return msgspec.msgpack.encode(AddRequest(rid, prompt, SamplingParams(max_tokens=max_tokens),
                                             [], 0.0))


def _recv(sock: zmq.Socket) -> StepOutputs:
    assert sock.poll(TIMEOUT_MS), "the core loop sent nothing"
    msg = msgspec.msgpack.decode(sock.recv(), type=CoreOutput)
    assert isinstance(msg, StepOutputs)
    return msg


def test_refused_request_fails_alone(loop_sockets: tuple) -> None:
    to_core, from_core, thread = loop_sockets
    for raw in (_add("good", [1, 2], 3), _add("bad", [1, -1], 3), _add("short", [4], 1)):
        to_core.send(raw)
    thread.start()
    first = _recv(from_core)
    assert first.rejected == {"bad": "token id -1 is outside the vocabulary"}
    assert first.request_ids == ["good", "short"] and first.token_ids == [100, 100]
    assert [(f.event, f.reason) for f in first.finished] == [(1, "length")]
    tokens = {}
    while len(tokens.get("good", [])) < 2:
        out = _recv(from_core)
        assert not out.rejected
        for rid, tok in zip(out.request_ids, out.token_ids, strict=True):
            tokens.setdefault(rid, []).append(tok)
    assert tokens == {"good": [101, 102]}


def test_abort_stops_a_request(loop_sockets: tuple) -> None:
    to_core, from_core, thread = loop_sockets
    to_core.send(_add("long", [1], 10_000))
    thread.start()
    assert _recv(from_core).request_ids == ["long"]
    to_core.send(msgspec.msgpack.encode(AbortRequests(["long"])))
    while _recv(from_core).request_ids:  # steps already under way may still report it
        pass
    assert not from_core.poll(200)  # idle now: nothing more is sent
