"""The web page: one static HTML file with its script, served by the API itself."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter
from fastapi.responses import FileResponse

from lakesync.api.deps import Authorized, RuntimeDep
from lakesync.masking import masked

STATIC = Path(__file__).parent / "static"
router = APIRouter(include_in_schema=False)
#: what the page asks the API, in the OpenAPI document (a router left out of it would
#: leave its routes out too, whatever each route says)
api_router = APIRouter(tags=["destination"], dependencies=[Authorized])


@router.get("/")
def index() -> FileResponse:
    return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})


@router.get("/jobs/{job_id}")
def job_page(job_id: str) -> FileResponse:
    """The job's own page (the same script; it reads the id from the address)."""
    return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})


@api_router.get(
    "/api/destination",
    summary="Where copied records go: the MongoDB (password masked) and database",
)
def destination(runtime: RuntimeDep) -> dict[str, Any]:
    settings, mongo = runtime.settings, runtime.mongo
    if mongo.embedded is not None:
        uri = mongo.embedded.uri
    else:
        uri = settings.mongodb_uri.get_secret_value() if settings.mongodb_uri else ""
    return {
        "mongodbUri": masked(uri),
        "database": settings.database,
        "embedded": mongo.embedded is not None,
    }
