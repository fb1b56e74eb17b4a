"""``tachyon serve``: an OpenAI-compatible HTTP server, FastAPI + uvicorn over ``AsyncLLM``.

Routes: POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /health,
GET /metrics. A client that goes away aborts its request at once: streamed responses and
non-streamed handlers both race the work against the ASGI ``http.disconnect`` message.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import logging
import sys
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from tachyon.config import EngineArgs
from tachyon.engine.async_llm import AsyncLLM
from tachyon.entrypoints.openai.metrics import CONTENT_TYPE, ServerMetrics
from tachyon.entrypoints.openai.protocol import OpenAIError, parse_json_body
from tachyon.entrypoints.openai.serving_chat import OpenAIServingChat
from tachyon.entrypoints.openai.serving_completion import OpenAIServingCompletion

logger = logging.getLogger(__name__)

# The name /v1/models shows for the embedded default model (no --model given).
DEFAULT_SERVED_MODEL_NAME = "SmolLM2-135M-Instruct"
# Seconds uvicorn waits for open streams on shutdown before closing them.
GRACEFUL_SHUTDOWN_SECONDS = 5
# Status logged for requests whose client left (nginx's convention; the client never sees it).
CLIENT_CLOSED_REQUEST = 499

T = TypeVar("T")
Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any] | AsyncIterator[str]]]


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

    def __init__(self, events: AsyncGenerator[str, None]) -> None:
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


async def _serve(request: Request, handler: Handler) -> Response:
    try:
        body = parse_json_body(await request.body())
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
    assert isinstance(result, AsyncGenerator)
    return SSEResponse(result)


def build_app(llm: AsyncLLM, model_name: str) -> FastAPI:
    """The app; the engine loop starts with the app's lifespan and stops with it."""
    tokenizer = copy.deepcopy(llm.tokenizer)  # the engine thread keeps the original to itself
    completions = OpenAIServingCompletion(llm, model_name, tokenizer)
    chat = OpenAIServingChat(llm, model_name, tokenizer)
    metrics = ServerMetrics(llm)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        llm.start()
        yield
        llm.shutdown()

    app = FastAPI(title="tachyon", lifespan=lifespan)

    @app.post("/v1/completions")
    async def create_completion(request: Request) -> Response:
        return await _serve(request, completions.create)

    @app.post("/v1/chat/completions")
    async def create_chat_completion(request: Request) -> Response:
        return await _serve(request, chat.create)

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        card = {"id": model_name, "object": "model", "created": created, "owned_by": "tachyon",
                "max_model_len": llm.max_model_len}
        return {"object": "list", "data": [card]}

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200 if llm.is_running else 503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    return app


def run_server(ns: argparse.Namespace, engine_args: EngineArgs) -> int:
    import uvicorn

    llm = AsyncLLM.from_engine_args(engine_args)
    name = ns.served_model_name or ns.model or DEFAULT_SERVED_MODEL_NAME
    app = build_app(llm, name)
    print(f"tachyon: serving {name!r} on http://{ns.host}:{ns.port}", file=sys.stderr,
          flush=True)
    uvicorn.run(app, host=ns.host, port=ns.port, log_level=ns.log_level.lower(),
                access_log=False, timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS)
    return 0
