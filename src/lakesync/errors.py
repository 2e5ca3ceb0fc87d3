"""The lakesync error hierarchy: every message says what is wrong and how to fix it."""

from __future__ import annotations

from typing import Any


class LakesyncError(Exception):
    """Base of all errors lakesync raises on purpose; `str()` is the user-facing message."""

    #: HTTP status the API answers with; only ``api/`` reads it.
    http_status = 500

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

    http_status = 400


class StoreError(LakesyncError):
    """MongoDB cannot be reached or refused an operation."""

    http_status = 503


class TransientStoreError(StoreError):
    """A MongoDB failure that may go away by itself (connection reset, not primary, timeout)."""


class RequestError(LakesyncError):
    """A request is malformed: unknown operation, option of the wrong type or range."""

    http_status = 400


class JobError(LakesyncError):
    """A job cannot do what was asked of it."""

    http_status = 409


class JobNotFound(JobError):
    """No job with that id exists (or its status has expired)."""

    http_status = 404


class CorruptJobDocument(JobError):
    """A job status document that no longer matches the schema (edited by hand?)."""

    http_status = 500


class JobCancelled(JobError):
    """Raised inside a running job when a cancellation request was seen."""


class LeaseLost(JobError):
    """Another process took the job over; this run must stop without writing status."""


class IdempotencyConflict(LakesyncError):
    """An Idempotency-Key was reused with a different request body."""

    http_status = 422
