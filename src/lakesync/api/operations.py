"""/api/operations: the declared operations, their last job and watermark."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from lakesync.api.deps import Authorized, RuntimeDep

router = APIRouter(prefix="/api/operations", tags=["operations"], dependencies=[Authorized])


@router.get("", summary="Declared operations with their last job")
def list_operations(runtime: RuntimeDep) -> dict[str, Any]:
    out = []
    for op in runtime.registry.all():
        last = runtime.store.list_jobs(operation=op.name, limit=1)
        out.append({
            "name": op.name,
            "description": op.description,
            "collection": op.collection,
            "mode": op.mode,
            "lastJob": last[0].public() if last else None,
            "watermark": None,
        })  # fmt: skip
    return {"operations": out}
