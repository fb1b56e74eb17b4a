"""``--api-key``: a bearer token on every route but ``/health``.

A pure ASGI middleware rather than a FastAPI dependency, so that no route can be added
without it (vLLM's dependency-per-route approach left ``/tokenize`` and others open, its issue
#29922) and so that streamed responses keep the raw ``receive`` they watch for disconnects.
"""

from __future__ import annotations

import hmac
import json

from starlette.types import ASGIApp, Receive, Scope, Send

from tachyon.entrypoints.openai.protocol import OpenAIError

# Load balancers and supervisors probe this without credentials.
OPEN_PATHS = frozenset({"/health"})
_BEARER = b"bearer "


def _error_body() -> bytes:
    err = OpenAIError("Incorrect or missing API key: send 'Authorization: Bearer <key>'",
                      status=401, code="invalid_api_key")
    return json.dumps(err.body()).encode()


class APIKeyMiddleware:
    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.expected = api_key.encode()
        self.body = _error_body()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS or self._allowed(scope):
            await self.app(scope, receive, send)
            return
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"),
                                (b"www-authenticate", b"Bearer")]})
        await send({"type": "http.response.body", "body": self.body})

    def _allowed(self, scope: Scope) -> bool:
        for name, value in scope["headers"]:
            if name == b"authorization":
                if value[:len(_BEARER)].lower() != _BEARER:
                    return False
                # Constant time: the comparison must not leak how much of the key matched.
                return hmac.compare_digest(value[len(_BEARER):].strip(), self.expected)
        return False
