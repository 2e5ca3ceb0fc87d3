"""/api/jobs: start, list, read, cancel and follow jobs."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field

from lakesync.api.deps import Authorized, RuntimeDep
from lakesync.api.events import Feeds
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
    feeds: Feeds = request.app.state.feeds

    async def read(job: str) -> JobStatus:
        return await job_status(runtime, job)

    async def stream() -> AsyncIterator[str]:
        # one reader per job (events.Feeds): this stream writes what the feed rendered
        with feeds.follow(first, read, lambda: POLL_SECONDS, lambda: runtime.stopping) as feed:
            sent = -1
            while True:
                if feed.version != sent:
                    sent = feed.version
                    yield f"event: status\ndata: {feed.payload}\n\n"
                if feed.final:
                    yield "event: end\ndata: {}\n\n"
                    return
                if feed.gone or feed.stopped:
                    return  # expired, or the server stops: the client reconnects later
                if not await feed.wait(sent, KEEPALIVE_SECONDS):
                    yield ": ping\n\n"
                if await request.is_disconnected() or runtime.stopping:
                    return  # the client went away, or the server stops

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(stream(), media_type="text/event-stream", headers=headers)
