"""The lakesync error hierarchy: every message says what is wrong and how to fix it."""

from __future__ import annotations

from typing import Any


class LakesyncError(Exception):
    """Base of all errors lakesync raises on purpose; `str()` is the user-facing message.

    The HTTP status each family answers with is chosen in ``api/errors.py``, nowhere else.
    """

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def __str__(self) -> str:
        return self.message


class ConfigError(LakesyncError):
    """A setting or a config file is invalid."""


class SourceError(LakesyncError):
    """The data lake cannot be read: missing path, bad file, wrong schema, forbidden root."""


class TransientSourceError(SourceError):
    """A lake failure that may go away by itself (S3 unreachable or throttling)."""


class StoreError(LakesyncError):
    """MongoDB cannot be reached or refused an operation."""


class TransientStoreError(StoreError):
    """A MongoDB failure that may go away by itself (connection reset, not primary, timeout)."""


class RequestError(LakesyncError):
    """A request is malformed: unknown operation, option of the wrong type or range."""


class JobError(LakesyncError):
    """A job cannot do what was asked of it."""


class JobNotFound(JobError):
    """No job with that id exists (or its status has expired)."""


class CorruptJobDocument(JobError):
    """A job status document that no longer matches the schema (edited by hand?)."""


class LeaseLost(LakesyncError):
    """Another process took the job (or partition) over; this run must stop writing."""


class IdempotencyConflict(LakesyncError):
    """An Idempotency-Key was reused with a different request body."""
