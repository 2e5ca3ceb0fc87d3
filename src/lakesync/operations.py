"""The registry of operations: `copy-taskdetail` built in, more declared in lakesync.toml."""

from __future__ import annotations

import logging
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lakesync.config import Settings
from lakesync.errors import RequestError
from lakesync.schema import TASK_DETAIL, RecordSchema

logger = logging.getLogger(__name__)

Mode = Literal["full", "incremental", "mirror"]


class Operation(BaseModel):
    """A named copy: where records come from, what they look like, where they go."""

    name: str
    description: str = ""
    source: str | None = None  # None: LAKESYNC_LAKE_URI or the demo lake
    format: str | None = None
    collection: str
    schema_: RecordSchema = Field(alias="schema")
    batchSize: int | None = Field(None, ge=1, le=100_000)
    mode: Mode = "full"
    watermark: str | None = "updatedAt"

    model_config = ConfigDict(populate_by_name=True)

    def source_uri(self, settings: Settings) -> str:
        """The lake this operation reads by default."""
        return self.source or settings.effective_lake_uri


class JobOptions(BaseModel):
    """Options a copy job accepts (API body `options`, CLI flags)."""

    model_config = ConfigDict(extra="forbid")

    source: str | None = Field(None, min_length=1, max_length=2048)
    batchSize: int | None = Field(None, ge=1, le=100_000)
    mode: Mode | None = None
    allowEmpty: bool = False
    deltaVersion: int | None = Field(None, ge=0)  # Delta table version to read (default: latest)


COPY_TASKDETAIL = Operation(
    name="copy-taskdetail",
    description="Copy TaskDetail records from the data lake into the taskdetails collection",
    collection="taskdetails",
    schema_=TASK_DETAIL,
)


class OperationRegistry:
    """Looks up operations by name; lists them in a stable order."""

    def __init__(self, operations: list[Operation]) -> None:
        self._ops = {op.name: op for op in operations}

    @classmethod
    def from_settings(cls, settings: Settings) -> OperationRegistry:
        """The built-in operation plus those declared in the operations file, if present."""
        return cls([COPY_TASKDETAIL])

    def names(self) -> list[str]:
        """Operation names, built-in first."""
        return list(self._ops)

    def all(self) -> list[Operation]:
        """Every operation."""
        return list(self._ops.values())

    def get(self, name: str) -> Operation:
        """The named operation, or a RequestError listing the valid names."""
        try:
            return self._ops[name]
        except KeyError:
            raise RequestError(
                f"Unknown operation {name!r}. Valid operations: {', '.join(self._ops)}.",
                valid=self.names(),
            ) from None


def parse_options(raw: Any) -> JobOptions:
    """Validate job options, raising RequestError that names the bad option."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise RequestError('"options" must be a JSON object, e.g. {"batchSize": 1000}.')
    try:
        return JobOptions.model_validate(raw)
    except ValidationError as e:
        problems = []
        for item in e.errors():
            where = ".".join(str(p) for p in item["loc"]) or "options"
            msg = "is not an accepted option" if item["type"] == "extra_forbidden" else item["msg"]
            problems.append(f"options.{where} {msg}")
        accepted = ", ".join(JobOptions.model_fields)
        raise RequestError(
            f"Invalid job options: {'; '.join(problems)}. Accepted options: {accepted}.",
            problems=problems,
        ) from None
