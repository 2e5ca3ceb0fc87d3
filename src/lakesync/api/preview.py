"""/api/preview: what a copy job would read and write, answered at once, nothing written."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from lakesync.api.deps import Authorized, RuntimeDep
from lakesync.api.jobs import JobRequest
from lakesync.preview import preview
from lakesync.typemap import server_limits

router = APIRouter(prefix="/api/preview", tags=["jobs"], dependencies=[Authorized])


@router.post("", summary="Preview a copy job: files, schema and BSON types, rows, samples")
def preview_job(body: JobRequest, runtime: RuntimeDep) -> dict[str, Any]:
    op = runtime.registry.get(body.operation)
    limits = server_limits(runtime.store.db[op.collection])
    return preview(runtime.settings, runtime.registry, body.operation, body.options, limits=limits)
