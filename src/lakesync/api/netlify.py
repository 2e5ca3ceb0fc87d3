"""Drop-in endpoints for the seed's Netlify frontend (DataCopy.js works unchanged)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response

from lakesync.api.deps import Authorized, RuntimeDep
from lakesync.api.jobs import job_response, job_status
from lakesync.errors import RequestError

router = APIRouter(prefix="/.netlify/functions", tags=["seed compatibility"],
                   dependencies=[Authorized])  # fmt: skip

SEED_OPTIONS = (
    "The seed endpoint starts copy-taskdetail with its defaults and takes no options; "
    "send options (source, batchSize, mode) to POST /api/jobs instead."
)


@router.post("/copy-taskdetail", status_code=202, summary="Start copy-taskdetail (seed endpoint)")
async def copy_taskdetail(
    request: Request, response: Response, runtime: RuntimeDep
) -> dict[str, Any]:
    from fastapi.concurrency import run_in_threadpool

    raw = await request.body()
    if raw.strip():
        import json

        try:
            body = json.loads(raw)
        except ValueError:
            raise RequestError("The request body is not valid JSON; send {} or no body.") from None
        if isinstance(body, dict) and body.get("options"):  # the seed took none
            raise RequestError(SEED_OPTIONS)
    status, created = await run_in_threadpool(runtime.jobs.start, "copy-taskdetail")
    body_out = job_response(response, status, created)
    response.status_code = 202
    return body_out


@router.get("/simple-status", summary="A job's status by ?jobId= (seed endpoint)")
async def simple_status(
    runtime: RuntimeDep, jobId: Annotated[str | None, Query(max_length=200)] = None
) -> dict[str, Any]:
    if not jobId:
        raise RequestError("Missing jobId: call /.netlify/functions/simple-status?jobId=job_...")
    return (await job_status(runtime, jobId)).public()
