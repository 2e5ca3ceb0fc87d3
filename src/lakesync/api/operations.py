"""/api/operations: the declared operations, their last job, watermark and schedule."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from lakesync.api.deps import Authorized, RuntimeDep
from lakesync.masking import masked
from lakesync.service import allowed_roots

router = APIRouter(prefix="/api/operations", tags=["operations"], dependencies=[Authorized])


@router.get("", summary="Declared operations with their last job, watermark and schedule")
def list_operations(runtime: RuntimeDep) -> dict[str, Any]:
    listed = runtime.registry.overview(runtime.settings, runtime.store, runtime.runner.watermarks)
    runtime.scheduler.annotate(listed)
    # where a job's `source` option may point (the page's source field says it)
    return {
        "operations": [
            {
                **op.model_dump(mode="json"),
                "allowedRoots": [
                    masked(r)
                    for r in allowed_roots(runtime.settings, runtime.registry.get(op.name))
                ],
            }
            for op in listed
        ]
    }


@router.post("/{name}/pause", summary="Pause the operation's schedule (running jobs go on)")
def pause_schedule(name: str, runtime: RuntimeDep) -> dict[str, Any]:
    return {"operation": name, **runtime.scheduler.pause(name)}


@router.post("/{name}/unpause", summary="Resume the operation's schedule from the next slot")
def unpause_schedule(name: str, runtime: RuntimeDep) -> dict[str, Any]:
    return {"operation": name, **runtime.scheduler.unpause(name)}
