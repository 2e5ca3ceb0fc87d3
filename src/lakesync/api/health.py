"""Liveness, readiness and Prometheus metrics.

`/healthz` and `/readyz` need no token (probes and load balancers rarely send one); without
the token, a not-ready answer names only what is down, not hosts or driver messages.
`/metrics` needs the token when one is set: Prometheus sends it with `authorization:`
(`credentials_file`) in the scrape config.
"""

from __future__ import annotations

from typing import Any

import pymongo
from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pymongo.errors import PyMongoError

from lakesync import metrics
from lakesync.api.auth import authorized
from lakesync.api.deps import Authorized, RuntimeDep
from lakesync.errors import StoreError
from lakesync.retry import server_reason

router = APIRouter(tags=["health"])

#: Probes time out after a second or two; a ping must not wait the 5 s server selection.
PROBE_SECONDS = 2.0
PROBE_COLLECTION = "lakesync_probe"  # one tiny document that /readyz rewrites


@router.get("/healthz", summary="Liveness: the process answers")
async def healthz() -> dict[str, Any]:
    return {"status": "ok"}


@router.get("/readyz", summary="Readiness: MongoDB reachable and the executor running")
def readyz(request: Request, runtime: RuntimeDep) -> Response:
    problems: list[tuple[str, str]] = []  # (for anyone, with details)
    try:
        with pymongo.timeout(PROBE_SECONDS):
            runtime.mongo.ping()
    except StoreError as e:
        problems.append(("MongoDB is not reachable.", str(e)))
    else:
        try:  # a full disk answers pings but refuses every write
            with pymongo.timeout(PROBE_SECONDS):
                runtime.store.db[PROBE_COLLECTION].update_one(
                    {"_id": "readyz"}, {"$inc": {"probes": 1}}, upsert=True
                )
        except PyMongoError as e:
            reason = f"MongoDB is not writable: {server_reason(e)}"
            problems.append(("MongoDB is not writable.", reason))
    if runtime.executor is not None:
        ok, why = runtime.executor.healthy()
        if not ok:
            problems.append((f"The {runtime.executor.name} executor is not running.", why))
    if problems:
        detailed = authorized(request)
        error = " ".join(full if detailed else short for short, full in problems)
        if not detailed:
            error += " Details: GET /readyz with the API token, or the server log."
        return JSONResponse({"status": "not ready", "error": error}, status_code=503)
    return JSONResponse({"status": "ready"})


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=PlainTextResponse,
    dependencies=[Authorized],
)
def prometheus(runtime: RuntimeDep) -> Response:
    try:
        with pymongo.timeout(PROBE_SECONDS):
            counts = runtime.store.count_by_status()
    except (PyMongoError, StoreError):
        metrics.MONGODB_UP.set(0)  # job gauges keep their last values
    else:
        metrics.MONGODB_UP.set(1)
        metrics.set_job_counts(counts)
    return Response(generate_latest(metrics.REGISTRY), media_type=CONTENT_TYPE_LATEST)
