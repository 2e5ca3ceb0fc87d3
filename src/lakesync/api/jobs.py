"""/api/jobs: start, list, read, cancel and follow jobs."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field

from lakesync.api.deps import Authorized, RuntimeDep
from lakesync.errors import JobNotFound
from lakesync.models import JobState, JobStatus
from lakesync.runtime import Runtime

router = APIRouter(prefix="/api/jobs", tags=["jobs"], dependencies=[Authorized])

RETRY_AFTER_SECONDS = 2
KEEPALIVE_SECONDS = 15.0
POLL_SECONDS = 0.5


class JobRequest(BaseModel):
    """Body of POST /api/jobs."""

    operation: str = Field("copy-taskdetail", min_length=1, max_length=200)
    options: dict[str, Any] | None = None


def job_response(response: Response, status: Any, created: bool) -> dict[str, Any]:
    """202 + Location + Retry-After for a new job; 200 for an existing one (single-flight)."""
    response.status_code = 202 if created else 200
    response.headers["Location"] = f"/api/jobs/{status.jobId}"
    response.headers["Retry-After"] = str(RETRY_AFTER_SECONDS)
    body: dict[str, Any] = status.public()
    return body


@router.post(
    "", status_code=202, summary="Start a job (answers at once; the copy runs in the background)"
)
def start_job(
    body: JobRequest,
    response: Response,
    runtime: RuntimeDep,
    idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
) -> dict[str, Any]:
    status, created = runtime.jobs.start(body.operation, body.options, idempotency_key)
    return job_response(response, status, created)


@router.get("", summary="List jobs, newest first")
def list_jobs(
    runtime: RuntimeDep,
    status: Annotated[JobState | None, Query()] = None,
    operation: Annotated[str | None, Query(max_length=200)] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 20,
    before: Annotated[
        str | None, Query(max_length=200, description="The `next` of the previous page")
    ] = None,
) -> dict[str, Any]:
    state = status.value if status else None
    found = runtime.jobs.list(status=state, operation=operation, limit=limit + 1, before=before)
    page = found[:limit]
    following = page[-1].jobId if len(found) > limit else None
    return {"jobs": [j.public() for j in page], "next": following}


@router.get("/{job_id}", summary="A job's status")
async def get_job(job_id: str, runtime: RuntimeDep) -> dict[str, Any]:
    return (await job_status(runtime, job_id)).public()


async def job_status(runtime: Runtime, job_id: str) -> JobStatus:
    """A polled status: from this process's recent copy when fresh (no thread hop, no
    database read), else read in the thread pool."""
    status = runtime.jobs.peek(job_id)
    if status is None:
        status = await run_in_threadpool(runtime.jobs.get, job_id)
    return status


@router.post("/{job_id}/resume", status_code=202, summary="Resume a failed job from its checkpoint")
def resume_job(job_id: str, response: Response, runtime: RuntimeDep) -> dict[str, Any]:
    return job_response(response, runtime.jobs.resume(job_id), created=True)


@router.post("/{job_id}/cancel", status_code=202, summary="Cancel a job after its current batch")
def cancel_job(job_id: str, runtime: RuntimeDep) -> dict[str, Any]:
    return runtime.jobs.cancel(job_id).public()


@router.get(
    "/{job_id}/events",
    summary="Server-Sent Events: the job status after every batch, until the job ends",
    response_class=StreamingResponse,
)
async def job_events(job_id: str, request: Request, runtime: RuntimeDep) -> StreamingResponse:
    first = await job_status(runtime, job_id)  # 404 before the stream starts

    async def stream() -> AsyncIterator[str]:
        status = first
        last = None
        quiet = 0.0
        while True:
            payload = json.dumps(status.public())
            if payload != last:
                yield f"event: status\ndata: {payload}\n\n"
                last, quiet = payload, 0.0
            if status.state.is_final:
                yield "event: end\ndata: {}\n\n"
                return
            if quiet >= KEEPALIVE_SECONDS:
                yield ": ping\n\n"
                quiet = 0.0
            await asyncio.sleep(POLL_SECONDS)
            quiet += POLL_SECONDS
            if await request.is_disconnected() or runtime.stopping:
                return  # the client went away, or the server stops: it reconnects later
            try:
                status = await job_status(runtime, job_id)
            except JobNotFound:
                return

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(stream(), media_type="text/event-stream", headers=headers)
