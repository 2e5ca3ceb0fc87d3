"""Starting, cancelling and reading jobs: what the API and the CLI both call."""

from __future__ import annotations

import glob
import logging
import os
from typing import Any

from lakesync import mirror
from lakesync.config import Settings
from lakesync.errors import JobError, JobNotFound, SourceError
from lakesync.executors import Executor
from lakesync.jobstore import JobStore, flight_key
from lakesync.locations import canonical_uri, within_roots
from lakesync.masking import masked
from lakesync.models import JobStatus
from lakesync.operations import JobOptions, Operation, OperationRegistry, parse_options

logger = logging.getLogger(__name__)

#: How old a status answered to a poll may be. A job run by this process refreshes it with
#: every batch; others' writes show within this time. The page polls once a second.
STATUS_MAX_AGE_SECONDS = 1.0


def allowed_roots(settings: Settings, op: Operation) -> list[str]:
    """Where a job's `source` option may point: LAKESYNC_ALLOWED_ROOTS, else the
    operation's own source."""
    return settings.allowed_roots or [op.source_uri(settings)]


def checked_request(
    settings: Settings,
    registry: OperationRegistry,
    operation: str,
    raw_options: Any,
    *,
    trusted: bool = False,
) -> tuple[JobOptions, str]:
    """A job request's options and canonical source, refused (RequestError, SourceError)
    as a job start refuses it: the same checks serve `JobService.start` and the preview.

    A `source` option must lie inside the allowed roots (checked before its existence, so
    API clients cannot probe the server's files) unless the caller is `trusted` (the CLI).
    """
    op = registry.get(operation)
    options = parse_options(raw_options)
    op.check_options(options)  # mode-level checks (incremental needs a watermark...)
    source = options.source or op.source_uri(settings)
    roots: list[str] | None = None
    if options.source and not trusted:
        roots = allowed_roots(settings, op)
        if not within_roots(options.source, roots):
            raise SourceError(
                f"The source {masked(options.source)} is outside the allowed roots "
                f"({', '.join(masked(r) for r in roots)}). Use a source under one "
                "of them, or list more roots in LAKESYNC_ALLOWED_ROOTS (a JSON list).",
                allowedRoots=[masked(r) for r in roots],
            )
    source = canonical_uri(source)  # one spelling: one flight, one watermark per lake
    mirror.check_source(op, options, source, settings)
    check_source_exists(source, roots)
    return options, source


class JobService:
    """Validates requests, creates jobs (single-flight, idempotent), hands them to an executor."""

    def __init__(
        self,
        settings: Settings,
        store: JobStore,
        registry: OperationRegistry,
        executor: Executor | None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.registry = registry
        self.executor = executor

    @staticmethod
    def _flight(operation: str, source: str, mode: str | None) -> str:
        """A dry run neither joins nor blocks a copy of the same source: a slot of its own."""
        return flight_key(operation, source) + ("|dry-run" if mode == "dry-run" else "")

    def start(
        self,
        operation: str,
        raw_options: Any = None,
        idempotency_key: str | None = None,
        *,
        client_job_id: str | None = None,
        trusted: bool = False,
        trigger: str = "api",
        scheduled_for: str | None = None,
    ) -> tuple[JobStatus, bool]:
        """Validate, then create and submit a job; (status, created). Never reads the data.

        A `source` option must lie inside the allowed roots (checked before its existence,
        so API clients cannot probe the server's files) unless the caller is `trusted`:
        the CLI, whose user can read those files anyway. A `client_job_id` (the seed
        frontend's own name for the job) is kept as the job's clientJobId: starting again
        with it returns that job for as long as its status exists.
        """
        options, source = checked_request(
            self.settings, self.registry, operation, raw_options, trusted=trusted
        )
        body = {"operation": operation, "options": options.model_dump(exclude_none=True)}
        if idempotency_key and (known := self.store.claim_idempotency(idempotency_key, body)):
            return self.store.get(known), False  # the request that took the key made the job
        if client_job_id and (named := self._named(client_job_id)) is not None:
            if idempotency_key:
                self.store.bind_idempotency(idempotency_key, named.jobId)
            return named, False
        stored = {**options.model_dump(exclude_none=True, exclude_defaults=True), "source": source}
        fields = {"trigger": trigger, "scheduledFor": scheduled_for, "clientJobId": client_job_id}
        try:
            status, created = self.store.create(
                operation, stored, self._flight(operation, source, options.mode), fields
            )
            if client_job_id and status.clientJobId != client_job_id:  # joined a running job
                status = self.store.add_client_id(status, client_job_id)
        except BaseException:
            if idempotency_key:  # let a retry of this request try again
                self.store.drop_idempotency(idempotency_key)
            raise
        if idempotency_key:
            self.store.bind_idempotency(idempotency_key, status.jobId)
        if created:
            logger.info(
                "job %s: created (%s, source %s)",
                status.jobId,
                operation,
                source,
                extra={"jobId": status.jobId, "operation": operation},
            )
            if self.executor is not None:
                self.executor.submit(status.jobId)
        return status, created

    def _named(self, client_job_id: str) -> JobStatus | None:
        """The job already started under this client id; JobError if it is a job's own id."""
        named = self.store.by_client_id(client_job_id)
        if named is None:
            try:
                self.store.get(client_job_id)
            except JobNotFound:
                return None
            raise JobError(
                f"{client_job_id!r} is already the jobId of an existing job; a client-named "
                "jobId must be a new name (e.g. job_ + Date.now())."
            )
        return named

    def cancel(self, job_id: str) -> JobStatus:
        """Request cancellation; it takes effect after the current batch."""
        return self.store.request_cancel(job_id)

    def resume(self, job_id: str) -> JobStatus:
        """Continue a failed job from its checkpoint (after the cause was fixed)."""
        status = self.store.reopen(job_id)
        if self.executor is not None:
            self.executor.submit(job_id)
        return status

    def get(self, job_id: str) -> JobStatus:
        """One job's status, as seen at most STATUS_MAX_AGE_SECONDS ago (may read MongoDB)."""
        return self.store.recent(job_id, STATUS_MAX_AGE_SECONDS)

    def get_seed(self, job_id: str) -> JobStatus:
        """`get` by jobId or clientJobId: only the seed's simple-status accepts the latter.

        The two never name different jobs (a client id that is a jobId is refused), so a
        client id known to this process is looked up as one without trying it as a jobId.
        """
        if self.store.seen.job_of(job_id) is None:
            try:
                return self.get(job_id)
            except JobNotFound:
                pass
        return self.store.recent_by_client_id(job_id, STATUS_MAX_AGE_SECONDS)

    def peek_seed(self, job_id: str) -> JobStatus | None:
        """`peek` by jobId or clientJobId."""
        status = self.peek(job_id)
        if status is None and (named := self.store.seen.job_of(job_id)) is not None:
            status = self.peek(named)
            if status is not None and status.clientJobId != job_id:
                return None
        return status

    def peek(self, job_id: str) -> JobStatus | None:
        """`get` without waiting: the status if this process saw it recently enough, else None."""
        return self.store.seen.get(job_id, STATUS_MAX_AGE_SECONDS)

    def list(
        self,
        *,
        status: str | None = None,
        operation: str | None = None,
        limit: int = 20,
        before: str | None = None,
    ) -> list[JobStatus]:
        """Jobs, newest first (after job `before`, for the next page)."""
        return self.store.list_jobs(status=status, operation=operation, limit=limit, before=before)


def check_source_exists(source: str, roots: list[str] | None = None) -> None:
    """Cheap up-front check of a local source (S3 is checked when the job opens it).

    With ``roots``, only glob matches that really lie inside them count: a symlink in the
    lake must not let the answer tell whether files exist elsewhere.
    """
    if "://" in source:
        return
    if any(ch in source for ch in "*?["):
        found = glob.glob(source, recursive=True)
        if roots is not None:
            found = [path for path in found if within_roots(path, roots)]
        if not found:
            raise SourceError(f"No files match {source!r}. Fix the source glob or path.")
        return
    if not os.path.exists(source):
        raise SourceError(
            f"The source {source!r} does not exist. Point the job's source (`--source`, "
            "the page's Source, options.source) or else the operation's `source` in "
            "lakesync.toml (LAKESYNC_LAKE_URI for an operation without one) at a directory, "
            "file, glob or s3:// URI of the lake."
        )
