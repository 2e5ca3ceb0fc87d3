"""The nouns everyone shares: job states, the job status document, checkpoints."""

from __future__ import annotations

import secrets
from datetime import UTC, datetime
from enum import Enum, StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_serializer, field_validator

_BASE32 = "0123456789abcdefghjkmnpqrstvwxyz"  # Crockford's alphabet, lower case


def new_job_id() -> str:
    """An unguessable job id: `job_` + 26 random base32 characters (130 bits)."""
    return "job_" + "".join(secrets.choice(_BASE32) for _ in range(26))


def utcnow() -> datetime:
    """Now, in UTC, at millisecond precision (what BSON dates hold)."""
    now = datetime.now(UTC)
    return now.replace(microsecond=now.microsecond // 1000 * 1000)


class Outcome(Enum):
    """How a run ended, so the executor knows whether to schedule another."""

    ENDED = "ended"  # completed, failed or cancelled
    CONTINUE = "continue"  # time limit or shutdown: a new run resumes from the checkpoint
    NOT_CLAIMED = "not_claimed"  # someone else runs it, or it already ended


class JobState(StrEnum):
    """The life of a job: pending -> in_progress -> completed | failed | cancelled."""

    PENDING = "pending"
    IN_PROGRESS = "in_progress"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_final(self) -> bool:
        """True once the job will not run again."""
        return self in (JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED)


#: a job's own data besides its status; expires with it (JobStore.finish sets `expireAt`)
PARTITIONS = "jobpartitions"
PLANS = "jobplans"

ACTIVE_STATES = (JobState.PENDING.value, JobState.IN_PROGRESS.value)
FINAL_STATES = (JobState.COMPLETED.value, JobState.FAILED.value, JobState.CANCELLED.value)


class Watermark(BaseModel):
    """A value of an operation's watermark column (e.g. updatedAt): how far a copy has read."""

    column: str
    kind: Literal["timestamp", "date", "int"]
    value: int  # epoch milliseconds for timestamps and dates (UTC), else the integer itself
    iso: str | None = None  # timestamps and dates for people: ISO 8601 UTC ending in Z


class Checkpoint(BaseModel):
    """Where a job (or one partition of it) stands in the lake after its last committed batch."""

    fileIndex: int = 0
    row: int = 0
    batches: int = 0
    file: str | None = None  # Lake.file_name(fileIndex): resume checks it still matches
    # watermarks pinned at the job's start (see watermarks.py): an incremental job reads
    # since <= column <= until, so a resumed run reads the same rows (positions count
    # filtered rows); until becomes the operation's watermark when the job completes
    since: Watermark | None = None
    until: Watermark | None = None
    # mirror: the last _id compared with the lake, and ids counted as deleted but maybe
    # not deleted yet (a resumed run deletes them again)
    mirrorAfter: str | int | float | None = None
    mirrorPending: list[str | int | float] = Field(default_factory=list)


class Counters(BaseModel):
    """Per-batch or cumulative record counts."""

    processed: int = 0
    inserted: int = 0
    updated: int = 0
    unchanged: int = 0
    #: valid records that a later record of the same key in the same lake replaces
    duplicates: int = 0
    errors: int = 0
    deleted: int = 0


def _parse_time(value: Any) -> Any:
    """Accept BSON datetimes (naive = UTC) and the ISO strings some servers store."""
    if isinstance(value, str):
        value = datetime.fromisoformat(value.replace("Z", "+00:00"))
    if isinstance(value, datetime) and value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value


class JobStatus(BaseModel):
    """One document of `jobstatuses`; the API returns the same field names."""

    model_config = ConfigDict(extra="ignore")

    jobId: str
    clientJobId: str | None = None  # the seed frontend's own name for the job (api/netlify.py)
    status: JobState
    operation: str
    totalRecords: int = 0
    processedRecords: int = 0
    insertedRecords: int = 0
    updatedRecords: int = 0
    unchangedRecords: int = 0
    duplicateRecords: int = 0
    errorRecords: int = 0
    deletedRecords: int = 0
    percentComplete: float = 0
    startTime: datetime
    endTime: datetime | None = None
    updatedAt: datetime | None = None
    heartbeatAt: datetime | None = None
    message: str | None = None
    error: str | None = None
    options: dict[str, Any] = Field(default_factory=dict)
    attempt: int = 0
    failures: int = 0
    recordsPerSecond: float = 0
    etaSeconds: float | None = None
    cancelRequested: bool = False
    owner: str | None = None
    checkpoint: Checkpoint | None = None
    runStartedAt: datetime | None = None
    runProcessed: int = 0
    partitions: int | None = None
    partitionsDone: int | None = None
    partitionedAtMs: int | None = None
    trigger: Literal["api", "cli", "schedule"] | None = None  # who started the job
    scheduledFor: str | None = None  # a scheduled job's slot, ISO 8601 UTC (scheduler.py)
    revision: int = 0  # +1 on every write: orders the copies a process keeps (jobstore.py)

    @field_validator(
        "startTime", "endTime", "updatedAt", "heartbeatAt", "runStartedAt", mode="before"
    )
    @classmethod
    def _times(cls, value: Any) -> Any:
        return _parse_time(value)

    @field_serializer(
        "startTime", "endTime", "updatedAt", "heartbeatAt", "runStartedAt", when_used="json"
    )  # python-mode dumps (what the store inserts) keep datetimes: BSON dates, TTL works
    def _iso(self, value: datetime | None) -> str | None:
        if value is None:
            return None
        return value.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")

    @property
    def state(self) -> JobState:
        """The status as an enum."""
        return JobState(self.status)

    def public(self) -> dict[str, Any]:
        """The JSON document the API and `--json` print (internal lease fields left out)."""
        return self.model_dump(
            mode="json",
            exclude={"owner", "runStartedAt", "runProcessed", "partitionedAtMs", "revision"},
        )
