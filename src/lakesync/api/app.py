"""create_app: the FastAPI application around a Runtime."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from lakesync import __version__
from lakesync.api import health, jobs, netlify, operations, page
from lakesync.api.errors import install_error_handlers
from lakesync.api.limits import BodySizeLimit
from lakesync.runtime import Runtime


def create_app(runtime: Runtime) -> FastAPI:
    """The app serving the API, the seed endpoints, health, metrics and the page."""
    app = FastAPI(
        title="lakesync",
        version=__version__,
        description="Copy data-lake records into MongoDB as durable background jobs.",
    )
    app.state.runtime = runtime
    app.add_middleware(BodySizeLimit, max_bytes=64 * 1024)
    install_error_handlers(app)
    for module in (jobs, operations, netlify, health, page):
        app.include_router(module.router)
    app.mount("/static", StaticFiles(directory=page.STATIC), name="static")
    return app
