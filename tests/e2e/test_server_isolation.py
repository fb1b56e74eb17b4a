"""`tachyon serve` when things go wrong: the engine core killed mid-stream, bad or busy ports.

A killed core must end every request in flight with an error (streamed and not, none hangs),
turn /health to 503, and make the server exit with status 1 for its supervisor. Port errors
must come before any model loads and before "serving on".
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("torch")

from test_server import (  # noqa: E402  (the same tiny model and server helpers)
    MODEL,
    _build_tiny_model,
    _free_port,
    _wait_healthy,
)

REQUEST_TIMEOUT_S = 60.0
EXIT_TIMEOUT_S = 30.0
NUM_STREAMS = 4
CHUNKS_BEFORE_KILL = 3


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny-llama")
    _build_tiny_model(path)
    return path


def _serve_cmd(model_dir: Path, port: int | str) -> list[str]:
    return [sys.executable, "-m", "tachyon.entrypoints.cli", "serve", str(model_dir),
            "--host", "127.0.0.1", "--port", str(port), "--served-model-name", MODEL,
            "--kv-cache-memory", "16MiB", "--device", "cpu"]


def _core_pid(server_pid: int) -> int:
    """The engine core: the server's child started by multiprocessing's spawn."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == server_pid and b"spawn_main" in cmdline:
            return int(entry)
    raise AssertionError("no engine core process found")


async def _streams_until_killed(base: str, server_pid: int) -> list[BaseException | None]:
    """Streams and one non-streamed request in flight; the core is killed once every stream
    has its first chunks. Returns what each ended with."""
    client = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0,
                                timeout=REQUEST_TIMEOUT_S)
    started = [asyncio.Event() for _ in range(NUM_STREAMS)]
    body = dict(model=MODEL, max_tokens=400, extra_body={"ignore_eos": True})

    async def stream(i: int) -> BaseException | None:
        try:
            chunks = 0
            async for _ in await client.completions.create(prompt=f"go {i}", stream=True,
                                                           **body):
                chunks += 1
                if chunks == CHUNKS_BEFORE_KILL:
                    started[i].set()
        except openai.APIError as e:
            return e
        finally:
            started[i].set()
        return None

    async def whole() -> BaseException | None:
        try:
            await client.completions.create(prompt="whole", **body)
        except openai.APIError as e:
            return e
        return None

    tasks = [asyncio.create_task(stream(i)) for i in range(NUM_STREAMS)]
    tasks.append(asyncio.create_task(whole()))
    try:
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), REQUEST_TIMEOUT_S)
        os.kill(_core_pid(server_pid), signal.SIGKILL)
        return await asyncio.wait_for(asyncio.gather(*tasks), REQUEST_TIMEOUT_S)
    finally:
        await client.close()


def test_killed_core_fails_every_request_and_the_server_exits_1(model_dir: Path) -> None:
    port = _free_port()
    proc = subprocess.Popen(_serve_cmd(model_dir, port), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(proc, base)
        ended = asyncio.run(_streams_until_killed(base, proc.pid))
        health = httpx.get(f"{base}/health", timeout=10)
        code = proc.wait(EXIT_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    log = proc.stdout.read()
    assert all(isinstance(e, openai.APIError) for e in ended), (ended, log)
    assert all("engine core" in str(e) for e in ended), ended
    assert health.status_code == 503
    assert "died" in health.json()["error"]["message"]
    assert code == 1, log
    assert "exiting so a supervisor can restart" in log


@pytest.mark.parametrize("port", ["99999", "-1", "http"])
def test_bad_port_is_a_usage_error(model_dir: Path, port: str) -> None:
    start = time.monotonic()
    r = subprocess.run(_serve_cmd(model_dir, port), capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "port" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert time.monotonic() - start < 30  # no model was loaded


def test_busy_port_fails_before_loading(model_dir: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = subprocess.run(_serve_cmd(model_dir, port), capture_output=True, text=True,
                           timeout=60)
    out: Any = r.stdout + r.stderr
    assert r.returncode != 0
    assert f"cannot bind 127.0.0.1:{port}" in out
    assert "serving on" not in out and "loaded" not in out and "Traceback" not in out
