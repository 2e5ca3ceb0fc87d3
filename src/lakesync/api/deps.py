"""Dependencies shared by the routers: the runtime, and the bearer-token check."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException

from lakesync.api.auth import UNAUTHORIZED, authorized
from lakesync.runtime import Runtime


async def get_runtime(request: Request) -> Runtime:
    """The process's Runtime, stored on the app at start-up (async: no thread-pool hop)."""
    runtime: Runtime = request.app.state.runtime
    return runtime


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]

#: Only declares the scheme in OpenAPI (the /docs "Authorize" button); the check is ours.
_bearer = HTTPBearer(auto_error=False, description="The value of LAKESYNC_API_TOKEN.")


async def require_token(
    request: Request,
    _declared: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)] = None,
) -> None:
    """With LAKESYNC_API_TOKEN set, demand `Authorization: Bearer <token>` (constant time).

    EventSource cannot send headers, so the events stream also accepts `?access_token=`.
    `auth.TokenGuard` applies the same check to every protected path before the body is
    read; this dependency keeps each route safe on its own and documents the scheme.
    """
    if not authorized(request):
        raise HTTPException(401, UNAUTHORIZED, headers={"WWW-Authenticate": "Bearer"})


Authorized = Depends(require_token)
