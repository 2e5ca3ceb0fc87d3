"""Dependencies shared by the routers: the runtime, and the bearer-token check."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request
from starlette.exceptions import HTTPException

from lakesync.runtime import Runtime


def get_runtime(request: Request) -> Runtime:
    """The process's Runtime, stored on the app at start-up."""
    runtime: Runtime = request.app.state.runtime
    return runtime


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]


def require_token(request: Request) -> None:
    """With LAKESYNC_API_TOKEN set, demand `Authorization: Bearer <token>` (constant time).

    EventSource cannot send headers, so the events stream also accepts `?access_token=`.
    """
    token = request.app.state.runtime.settings.api_token
    if token is None:
        return
    given = ""
    header = request.headers.get("authorization", "")
    if header.lower().startswith("bearer "):
        given = header[7:].strip()
    elif request.url.path.endswith("/events"):
        given = request.query_params.get("access_token", "")
    if not hmac.compare_digest(given.encode(), token.get_secret_value().encode()):
        raise HTTPException(
            401,
            "Missing or wrong API token. Send the header 'Authorization: Bearer <token>' "
            "with the value of LAKESYNC_API_TOKEN.",
            headers={"WWW-Authenticate": "Bearer"},
        )


Authorized = Depends(require_token)
