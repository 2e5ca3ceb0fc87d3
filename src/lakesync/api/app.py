"""create_app: the FastAPI application around a Runtime."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.concurrency import run_in_threadpool
from fastapi.staticfiles import StaticFiles

from lakesync import __version__
from lakesync.api import (
    docs,
    health,
    jobs,
    netlify,
    openapi,
    operations,
    page,
    preview,
    records,
)
from lakesync.api.auth import TokenGuard
from lakesync.api.crosssite import CrossSiteGuard
from lakesync.api.errors import install_error_handlers
from lakesync.api.events import Feeds
from lakesync.api.headers import SecurityHeaders
from lakesync.api.hosts import HostGuard
from lakesync.api.limits import BodySizeLimit
from lakesync.runtime import Runtime


def create_app(runtime: Runtime, close_on_shutdown: bool = False) -> FastAPI:
    """The app serving the API, the seed endpoints, health, metrics and the page.

    With `close_on_shutdown`, the app's shutdown hands running jobs back and stops the
    runtime (uvicorn re-raises SIGTERM once it returns, so later cleanup would not run).
    """

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        if close_on_shutdown:
            await run_in_threadpool(runtime.close)

    app = FastAPI(
        lifespan=lifespan,
        title="lakesync",
        version=__version__,
        description="Copy data-lake records into MongoDB as durable background jobs.",
        docs_url=None,  # api/docs.py serves it from the installed package, not a CDN
        redoc_url=None,
    )
    app.state.runtime = runtime
    app.state.feeds = Feeds()  # one status reader per job followed by event streams
    app.add_middleware(BodySizeLimit, max_bytes=64 * 1024)
    app.add_middleware(CrossSiteGuard)  # 403 cross-site, 415 not JSON: before any body is read
    app.add_middleware(TokenGuard)  # 401 before any body is read
    app.add_middleware(HostGuard)  # 400 for a foreign Host (DNS rebinding) before anything
    app.add_middleware(SecurityHeaders)  # added last, runs first: on every answer
    install_error_handlers(app)
    for module in (jobs, preview, records, operations, netlify, health, page):
        app.include_router(module.router)
    app.include_router(page.api_router)
    docs.install(app)
    openapi.install(app, runtime.settings.api_token is not None, runtime.registry.names())
    app.mount("/static", StaticFiles(directory=page.STATIC), name="static")
    return app
