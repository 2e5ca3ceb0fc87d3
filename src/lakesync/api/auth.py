"""Bearer-token authentication: which paths need LAKESYNC_API_TOKEN, and the guard that asks.

With a token configured, everything under ``/api`` and ``/.netlify/functions``, and
``/metrics``, answers 401 unless the request carries ``Authorization: Bearer <token>``. The
events stream also accepts ``?access_token=`` because EventSource cannot send headers.
Open: ``/healthz`` and ``/readyz`` (probes and load balancers rarely send headers; without
the token ``/readyz`` gives no details), the page and its static files (the page asks for
the token), and ``/docs`` + ``/openapi.json`` (the API's shape is no secret).
"""

from __future__ import annotations

import hmac
import re

from starlette.requests import HTTPConnection
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

PROTECTED = ("/api", "/.netlify/functions", "/metrics")
EVENTS = re.compile(r"/api/jobs/[^/]+/events")  # the one route that takes ?access_token=

UNAUTHORIZED = (
    "Missing or wrong API token. Send the header 'Authorization: Bearer <token>' with the "
    "value of LAKESYNC_API_TOKEN."
)


def needs_token(path: str) -> bool:
    """Whether `path` is one of the protected ones (whole segments: /apiX is not /api)."""
    return any(path == p or path.startswith(p + "/") for p in PROTECTED)


def presented_token(conn: HTTPConnection) -> str:
    """The bearer token of the request ("" if none); `?access_token=` only on event streams."""
    scheme, _, value = conn.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer":
        return value.strip()
    if EVENTS.fullmatch(conn.url.path):
        return conn.query_params.get("access_token", "")
    return ""


def authorized(conn: HTTPConnection) -> bool:
    """True if no token is configured or the request presents it (compared in constant time)."""
    token = conn.app.state.runtime.settings.api_token
    if token is None:
        return True
    given = presented_token(conn).encode()
    return hmac.compare_digest(given, token.get_secret_value().encode())


def unauthorized_response() -> JSONResponse:
    """The 401 answer: JSON error and a WWW-Authenticate challenge."""
    return JSONResponse(
        {"error": UNAUTHORIZED}, status_code=401, headers={"WWW-Authenticate": "Bearer"}
    )


class TokenGuard:
    """Answer 401 on protected paths before anything else runs (no body is read first)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and needs_token(scope["path"]):
            conn = HTTPConnection(scope)
            if not authorized(conn):
                await unauthorized_response()(scope, receive, send)
                return
        await self.app(scope, receive, send)
