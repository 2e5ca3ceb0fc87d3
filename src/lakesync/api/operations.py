"""/api/operations: the declared operations, their last job and watermark."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from lakesync.api.deps import Authorized, RuntimeDep
from lakesync.watermarks import WatermarkStore

router = APIRouter(prefix="/api/operations", tags=["operations"], dependencies=[Authorized])


@router.get("", summary="Declared operations with their last job and watermark")
def list_operations(runtime: RuntimeDep) -> dict[str, Any]:
    listed = runtime.registry.overview(
        runtime.settings, runtime.store, WatermarkStore(runtime.store.db)
    )
    return {"operations": [op.model_dump(mode="json") for op in listed]}
