"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from lakesync import metrics
from lakesync.api.deps import RuntimeDep
from lakesync.errors import StoreError
from lakesync.models import JobState

router = APIRouter(tags=["operations"])


@router.get("/healthz", summary="Liveness: the process answers")
def healthz() -> dict[str, Any]:
    return {"status": "ok"}


@router.get("/readyz", summary="Readiness: MongoDB reachable and the executor running")
def readyz(runtime: RuntimeDep) -> Response:
    problems = []
    try:
        runtime.mongo.ping()
    except StoreError as e:
        problems.append(str(e))
    if runtime.executor is not None:
        ok, why = runtime.executor.healthy()
        if not ok:
            problems.append(why)
    if problems:
        return JSONResponse({"status": "not ready", "error": " ".join(problems)}, status_code=503)
    return JSONResponse({"status": "ready"})


@router.get("/metrics", summary="Prometheus metrics", response_class=PlainTextResponse)
def prometheus(runtime: RuntimeDep) -> Response:
    try:
        counts = runtime.store.count_by_status()
    except StoreError:
        counts = {}
    for state in JobState:
        metrics.JOBS.labels(status=state.value).set(counts.get(state.value, 0))
    return Response(generate_latest(metrics.REGISTRY), media_type=CONTENT_TYPE_LATEST)
