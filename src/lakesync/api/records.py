"""/api/jobs/{jobId}/errors and /logs: a job's rejected records and its own log lines."""

from __future__ import annotations

from collections.abc import Iterator
from enum import StrEnum
from typing import Annotated, Any

from fastapi import APIRouter, Query
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse

from lakesync import joblog, rejections
from lakesync.api.deps import Authorized, RuntimeDep

router = APIRouter(prefix="/api/jobs", tags=["jobs"], dependencies=[Authorized])


class ErrorFormat(StrEnum):
    """How GET /api/jobs/{jobId}/errors answers."""

    json = "json"
    csv = "csv"
    ndjson = "ndjson"


@router.get(
    "/{job_id}/errors",
    summary="The job's rejected records (key, file, row, reason), in lake order",
    description="JSON pages of `limit` records; pass the answer's `next` as `after` for the "
    "next page. `format=csv` or `ndjson` downloads all of them (limit and after ignored).",
)
async def job_errors(
    job_id: str,
    runtime: RuntimeDep,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    after: Annotated[str | None, Query(max_length=2000)] = None,
    format: Annotated[ErrorFormat, Query()] = ErrorFormat.json,
) -> Any:
    job = await run_in_threadpool(runtime.jobs.get, job_id)  # 404 for an unknown job
    if after:  # checked for downloads too, which read every page
        rejections.parse_cursor(after, job_id)
    coll = runtime.store.copyerrors
    if format is ErrorFormat.json:
        docs, following = await run_in_threadpool(rejections.page, coll, job_id, limit, after)
        return {
            "jobId": job_id,
            "errorRecords": job.errorRecords,
            "errors": docs,
            "next": following,
        }
    if format is ErrorFormat.csv:
        line, media, first = rejections.to_csv, "text/csv; charset=utf-8", rejections.csv_header()
    else:
        line, media, first = rejections.to_ndjson, "application/x-ndjson", ""

    def body() -> Iterator[str]:
        if first:
            yield first
        for doc in rejections.every(coll, job_id):
            yield line(doc)

    name = f"{job_id}-errors.{format.value}"
    headers = {"Content-Disposition": f'attachment; filename="{name}"'}
    return StreamingResponse(body(), media_type=media, headers=headers)


@router.get("/{job_id}/logs", summary="The job's own log lines (INFO and above), oldest first")
async def job_logs(
    job_id: str, runtime: RuntimeDep, limit: Annotated[int, Query(ge=1, le=1000)] = 1000
) -> dict[str, Any]:
    await run_in_threadpool(runtime.jobs.get, job_id)  # 404 for an unknown job
    lines = await run_in_threadpool(joblog.read_lines, runtime.store.db, job_id, limit)
    return {"jobId": job_id, "lines": lines}
