"""The one place that maps lakesync errors to HTTP answers: `{"error": ...}`, never a trace."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pymongo.errors import PyMongoError
from starlette.exceptions import HTTPException

from lakesync.api.openapi import allowed_methods
from lakesync.errors import (
    CorruptJobDocument,
    IdempotencyConflict,
    JobError,
    JobNotFound,
    LakesyncError,
    LeaseLost,
    RequestError,
    SourceError,
    StoreError,
    TransientSourceError,
)
from lakesync.masking import masked

logger = logging.getLogger(__name__)

#: The HTTP status of each error family, most specific first: the first match answers;
#: any other LakesyncError (a ConfigError...) is a 500.
STATUS_OF: tuple[tuple[type[LakesyncError], int], ...] = (
    (JobNotFound, 404),
    (CorruptJobDocument, 500),
    (JobError, 409),
    (LeaseLost, 409),  # another run took the job over as this request changed it
    (TransientSourceError, 503),  # the lake out of reach (S3 down, throttling): try later
    (SourceError, 400),
    (RequestError, 400),
    (IdempotencyConflict, 422),
    (StoreError, 503),
)


def status_of(error: LakesyncError) -> int:
    """The HTTP status the API answers ``error`` with."""
    return next((status for family, status in STATUS_OF if isinstance(error, family)), 500)


def error_response(
    http_status: int, message: str, headers: dict[str, str] | None = None, **details: Any
) -> JSONResponse:
    """A JSON error body with what is wrong and how to fix it (passwords masked)."""
    body = masked({"error": message, **details})
    return JSONResponse(body, status_code=http_status, headers=headers)


def _validation_message(exc: RequestValidationError) -> tuple[int, str]:
    problems = []
    status = 422
    for item in exc.errors():
        if item.get("type") == "json_invalid":
            return 400, (
                "The request body is not valid JSON. Send a JSON object such as "
                '{"operation": "copy-taskdetail", "options": {}}.'
            )
        loc = ".".join(str(p) for p in item.get("loc", ()) if p != "body") or "body"
        problems.append(f"{loc}: {item.get('msg')}")
    return status, "Invalid request: " + "; ".join(problems) + "."


def install_error_handlers(app: FastAPI) -> None:
    """Register the handlers on the app."""

    @app.exception_handler(LakesyncError)
    async def lakesync_error(request: Request, exc: LakesyncError) -> JSONResponse:
        status = status_of(exc)
        if status >= 500:
            logger.warning("%s %s: %s", request.method, request.url.path, exc)
        return error_response(status, str(exc), **exc.details)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        status, message = _validation_message(exc)
        return error_response(status, message)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        detail = exc.detail if isinstance(exc.detail, str) else "Request failed"
        if exc.status_code == 404 and detail == "Not Found":
            detail = f"No route {request.method} {request.url.path}. See /docs for the API."
        headers = getattr(exc, "headers", None)
        if exc.status_code == 405:
            detail = f"{request.method} is not allowed on {request.url.path}. See /docs."
            allow = allowed_methods(request.app, request.url.path)
            headers = {**(headers or {}), **({"Allow": allow} if allow else {})}
        return error_response(exc.status_code, detail, headers)

    @app.exception_handler(PyMongoError)
    async def mongo_error(request: Request, exc: PyMongoError) -> JSONResponse:
        logger.warning("%s %s: MongoDB error: %s", request.method, request.url.path, exc)
        where = request.app.state.runtime.mongo.where
        return error_response(
            503,
            f"MongoDB at {where} is not answering ({type(exc).__name__}). The request was not "
            "carried out; retry in a few seconds. /readyz tells when it is back.",
        )

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, "Internal error; the server log has the details.")
