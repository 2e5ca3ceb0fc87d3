"""Drop-in endpoints for the seed's Netlify frontend (DataCopy.js works unchanged)."""

from __future__ import annotations

import json
import re
from functools import partial
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.concurrency import run_in_threadpool

from lakesync.api.deps import Authorized, RuntimeDep
from lakesync.api.jobs import job_response
from lakesync.errors import RequestError

#: The job id a seed frontend names itself (the seed's example: job_1234567890).
CLIENT_JOB_ID = re.compile(r"job_[A-Za-z0-9_-]{1,64}")
CLIENT_JOB_ID_RULE = (
    "jobId must be 'job_' followed by 1 to 64 characters of A-Z, a-z, 0-9, '_' or '-' "
    "(e.g. job_1732865123456), or be left out to let lakesync name the job."
)


async def client_job_id(
    request: Request, query: Annotated[str | None, Query(alias="jobId")] = None
) -> str | None:
    """The job id the frontend named (JSON body or query string), checked against the rule."""
    named: Any = None
    try:  # the route itself answers a body that is not JSON
        body = json.loads(await request.body() or b"null")
    except ValueError:
        body = None
    if isinstance(body, dict):
        named = body.get("jobId")
    if query is not None and named is not None and query != named:
        raise RequestError("jobId differs between the query string and the body; send it once.")
    named = query if named is None else named
    if named is not None and not (isinstance(named, str) and CLIENT_JOB_ID.fullmatch(named)):
        raise RequestError(CLIENT_JOB_ID_RULE, rule=CLIENT_JOB_ID.pattern)
    return named


ClientJobId = Annotated[str | None, Depends(client_job_id)]


router = APIRouter(
    prefix="/.netlify/functions", tags=["seed compatibility"], dependencies=[Authorized]
)

SEED_OPTIONS = (
    "The seed endpoint starts copy-taskdetail with its defaults and takes no options; "
    "send options (source, batchSize, mode) to POST /api/jobs instead."
)


@router.post("/copy-taskdetail", status_code=202, summary="Start copy-taskdetail (seed endpoint)")
async def copy_taskdetail(
    request: Request, response: Response, runtime: RuntimeDep, named: ClientJobId
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
    start = partial(runtime.jobs.start, "copy-taskdetail", client_job_id=named)
    status, created = await run_in_threadpool(start)
    body_out = job_response(response, status, created)
    response.status_code = 202
    return body_out


@router.get("/simple-status", summary="A job's status by ?jobId= (seed endpoint)")
async def simple_status(
    runtime: RuntimeDep, jobId: Annotated[str | None, Query(max_length=200)] = None
) -> dict[str, Any]:
    if not jobId:
        raise RequestError("Missing jobId: call /.netlify/functions/simple-status?jobId=job_...")
    status = runtime.jobs.peek_seed(jobId)  # answered for the jobId or the client-named id
    if status is None:
        status = await run_in_threadpool(runtime.jobs.get_seed, jobId)
    return status.public()
