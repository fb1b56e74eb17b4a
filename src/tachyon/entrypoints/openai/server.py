"""``tachyon serve``: an OpenAI-compatible HTTP server, FastAPI + uvicorn over ``AsyncLLM``.

Routes: POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /health,
GET /metrics, POST /tokenize, POST /detokenize, GET /version, GET|POST /ping. With an API
key every route but /health needs it (``auth.APIKeyMiddleware``). A client that goes away
aborts its request at once: streamed responses and non-streamed handlers both race the
work against the ASGI ``http.disconnect`` message.

Start-up order: the port is bound first (a bad or busy port fails in a second, before any
model loads), then the engine core process loads the model, then "serving on" is printed and
uvicorn serves the bound socket. If the core dies, every request in flight gets an error,
/health turns 503, and after ``DEAD_CORE_EXIT_SECONDS`` the server exits with status 1 so that
its supervisor restarts it.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from tachyon import __version__
from tachyon.config import EngineArgs
from tachyon.engine.async_llm import AsyncLLM
from tachyon.entrypoints.openai.auth import APIKeyMiddleware
from tachyon.entrypoints.openai.cli_args import ServerSettings, settings_from
from tachyon.entrypoints.openai.metrics import CONTENT_TYPE, ServerMetrics
from tachyon.entrypoints.openai.protocol import OpenAIError, parse_json_body
from tachyon.entrypoints.openai.serving_chat import OpenAIServingChat
from tachyon.entrypoints.openai.serving_completion import OpenAIServingCompletion
from tachyon.entrypoints.openai.serving_engine import EventStream
from tachyon.entrypoints.openai.serving_lora import OpenAIServingLoRA
from tachyon.entrypoints.openai.serving_tokenize import OpenAIServingTokenization
from tachyon.profiling import maybe_profile

logger = logging.getLogger(__name__)

# The name /v1/models shows for the embedded default model (no --model given).
DEFAULT_SERVED_MODEL_NAME = "SmolLM2-135M-Instruct"
# Seconds uvicorn waits for open streams on shutdown before closing them.
GRACEFUL_SHUTDOWN_SECONDS = 5
# Status logged for requests whose client left (nginx's convention; the client never sees it).
CLIENT_CLOSED_REQUEST = 499
# After the core died: how long /health answers 503 (and in-flight requests get their
# errors out) before the process exits non-zero.
DEAD_CORE_EXIT_SECONDS = 2.0
EXIT_CORE_DIED = 1

T = TypeVar("T")
Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any] | str | EventStream]]


class ClientGone(Exception):
    """The client disconnected before the response was ready."""


async def _wait_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(receive: Receive, work: Awaitable[T]) -> T:
    """Await ``work``; if the client disconnects first, cancel it (aborting its request)."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_wait_disconnect(receive))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
    if task.cancelled() or not task.done():
        await asyncio.gather(task, return_exceptions=True)
        raise ClientGone
    return task.result()


class SSEResponse(StreamingResponse):
    """Server-sent events that stop, and close their generator (aborting the request), the
    moment the client disconnects."""

    def __init__(self, events: EventStream) -> None:
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache"})
        self.events = events

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        sender = asyncio.ensure_future(self.stream_response(send))
        watch = asyncio.ensure_future(_wait_disconnect(receive))
        try:
            await asyncio.wait({sender, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            sender.cancel()
            watch.cancel()
            results = await asyncio.gather(sender, watch, return_exceptions=True)
            await self.events.aclose()
        for r in results:  # a client that left mid-write raises OSError: not our fault
            if isinstance(r, Exception) and not isinstance(r, OSError):
                logger.error("a streamed response failed", exc_info=r)


def error_response(e: OpenAIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


def too_large(limit: int) -> OpenAIError:
    return OpenAIError(f"the request body is larger than {limit} bytes", status=413,
                       code="request_too_large")


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused (413) as soon as it is known to exceed ``limit`` bytes: from the
    Content-Length header if there is one, else while it streams in."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large(limit)
    parts, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large(limit)
        parts.append(chunk)
    return b"".join(parts)


async def _serve(request: Request, handler: Handler, max_bytes: int) -> Response:
    try:
        body = parse_json_body(await read_body(request, max_bytes))
        result = await _unless_disconnected(request.receive, handler(body))
    except OpenAIError as e:
        return error_response(e)
    except ClientGone:
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    except Exception as e:  # a bug must cost one request, not the server
        logger.exception("request failed")
        return error_response(OpenAIError(f"internal error: {e!r}", status=500,
                                          type_="server_error"))
    if isinstance(result, dict):
        return JSONResponse(result)
    if isinstance(result, str):
        return PlainTextResponse(result)
    assert isinstance(result, EventStream)
    return SSEResponse(result)


def build_app(llm: AsyncLLM, settings: ServerSettings) -> FastAPI:
    completions = OpenAIServingCompletion(llm, settings)
    chat = OpenAIServingChat(llm, settings)
    tokenization = OpenAIServingTokenization(llm, settings)
    loras = OpenAIServingLoRA(llm, settings)
    metrics = ServerMetrics(llm)
    created = int(time.time())
    model_name, max_request_bytes = settings.model_name, settings.max_request_bytes
    app = FastAPI(title="tachyon")
    if settings.api_key is not None:
        app.add_middleware(APIKeyMiddleware, api_key=settings.api_key)

    @app.post("/v1/completions")
    async def create_completion(request: Request) -> Response:
        return await _serve(request, completions.create, max_request_bytes)

    @app.post("/v1/chat/completions")
    async def create_chat_completion(request: Request) -> Response:
        return await _serve(request, chat.create, max_request_bytes)

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        card = {"id": model_name, "object": "model", "created": created, "owned_by": "tachyon",
                "root": model_name, "parent": None, "max_model_len": llm.max_model_len}
        adapters = [{**card, "id": lora.lora_name, "root": lora.lora_path,
                     "parent": model_name} for lora in llm.loras]
        return {"object": "list", "data": [card, *adapters]}

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(request: Request) -> Response:
        return await _serve(request, loras.load, max_request_bytes)

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(request: Request) -> Response:
        return await _serve(request, loras.unload, max_request_bytes)

    @app.get("/health")
    async def health() -> Response:
        if llm.is_running:
            return Response(status_code=200)
        return error_response(OpenAIError(f"the engine is dead: {llm.dead_reason}",
                                          status=503, type_="server_error"))

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.post("/tokenize")
    async def tokenize(request: Request) -> Response:
        return await _serve(request, tokenization.tokenize, max_request_bytes)

    @app.post("/detokenize")
    async def detokenize(request: Request) -> Response:
        return await _serve(request, tokenization.detokenize, max_request_bytes)

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": __version__}

    @app.api_route("/ping", methods=["GET", "POST"])
    async def ping() -> Response:  # SageMaker's liveness probe; unlike /health, behind the key
        return Response(status_code=200)

    return app


def bind_socket(host: str, port: int) -> socket.socket:
    """Bind now, listen later (uvicorn does): a busy port fails before the model loads."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ValueError(f"cannot bind {host}:{port}: {e.strerror or e}") from None
    sock.set_inheritable(False)
    return sock


def run_server(ns: argparse.Namespace, engine_args: EngineArgs) -> int:
    sock = bind_socket(ns.host, ns.port)
    try:
        with maybe_profile("api"), asyncio.Runner(loop_factory=_loop_factory()) as runner:
            return runner.run(_run(ns, engine_args, sock))
    finally:
        sock.close()


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop]:
    """uvloop where it is installed (uvicorn's own choice, which running the server inside
    our loop would otherwise lose): every streamed token is a write on this loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop
    return uvloop.new_event_loop


async def _run(ns: argparse.Namespace, engine_args: EngineArgs, sock: socket.socket) -> int:
    import uvicorn

    llm = await AsyncLLM.create(engine_args)
    try:
        name = ns.served_model_name or ns.model or DEFAULT_SERVED_MODEL_NAME
        settings = settings_from(ns, name)
        app = build_app(llm, settings)
        lora_serving = OpenAIServingLoRA(llm, settings)
        for lora_name, path in settings.lora_modules.items():
            try:
                await lora_serving.add(lora_name, path)
            except OpenAIError as e:
                raise ValueError(f"--lora-modules {lora_name}={path}: {e.message}") from None
        config = uvicorn.Config(app, log_level=ns.log_level.lower(), access_log=False,
                                timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS)
        server = uvicorn.Server(config)
        died: list[str] = []

        def exit_soon(reason: str) -> None:
            died.append(reason)
            asyncio.get_running_loop().call_later(DEAD_CORE_EXIT_SECONDS, _stop, server)

        llm.on_dead(exit_soon)
        host, port = sock.getsockname()[:2]
        print(f"tachyon: serving {name!r} on http://{host}:{port}", file=sys.stderr,
              flush=True)
        await server.serve(sockets=[sock])
    finally:
        await llm.shutdown()
    if died:
        print(f"tachyon: error: {died[0]}; exiting so a supervisor can restart the server",
              file=sys.stderr, flush=True)
        return EXIT_CORE_DIED
    return 0


def _stop(server: Any) -> None:
    server.should_exit = True
