"""The job body: claim a job, copy the lake batch by batch from its checkpoint, end it.

Every executor calls `JobRunner.run`; executors only decide where and when it runs.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from functools import partial
from typing import Any

from lakesync import metrics
from lakesync.config import Settings
from lakesync.copy import CopyEngine
from lakesync.errors import (
    JobError,
    LakesyncError,
    LeaseLost,
    SourceError,
    TransientStoreError,
)
from lakesync.lake import Lake, Position
from lakesync.models import Checkpoint, Counters, JobState, JobStatus
from lakesync.mongo import mask_uri
from lakesync.operations import OperationRegistry, parse_options
from lakesync.retry import RetryPolicy
from lakesync.schema import check_columns
from lakesync.store import JobStore

logger = logging.getLogger(__name__)


class Outcome(Enum):
    """How a run ended, so the executor knows whether to schedule another."""

    ENDED = "ended"  # completed, failed or cancelled
    CONTINUE = "continue"  # time limit or shutdown: a new run resumes from the checkpoint
    NOT_CLAIMED = "not_claimed"  # someone else runs it, or it already ended


def new_owner() -> str:
    """An identity for this process's runs: host, pid and a random suffix."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


def summary(s: JobStatus) -> str:
    """The human message of a finished copy."""
    text = (
        f"Copied {s.processedRecords:,} records: {s.insertedRecords:,} inserted, "
        f"{s.updatedRecords:,} updated, {s.unchangedRecords:,} unchanged, "
        f"{s.errorRecords:,} rejected"
    )
    if s.deletedRecords:
        text += f", {s.deletedRecords:,} deleted"
    return text


@dataclass
class JobRunner:
    """Runs jobs against one database; shared by all executor threads of a process."""

    settings: Settings
    store: JobStore
    registry: OperationRegistry
    owner: str = field(default_factory=new_owner)
    stop: threading.Event = field(default_factory=threading.Event)

    def retry(self) -> RetryPolicy:
        """The transient-failure policy for one job."""
        return RetryPolicy(
            budget=self.settings.retry_budget_seconds, stop=self.stop, on_retry=metrics.RETRIES.inc
        )

    def run(self, job_id: str, on_progress: Callable[[JobStatus], None] | None = None) -> Outcome:
        """Run one job from its checkpoint until it ends, yields or loses its lease."""
        owner = f"{self.owner}:{threading.get_ident()}"
        policy = self.retry()
        try:
            status = policy.call(
                lambda: self.store.claim(job_id, owner, self.settings.lease_seconds),
                "claiming a job",
            )
        except LakesyncError as e:
            logger.error("job %s cannot be run: %s", job_id, e)
            return Outcome.NOT_CLAIMED
        if status is None:
            return Outcome.NOT_CLAIMED
        log = logging.LoggerAdapter(logger, {"jobId": job_id, "operation": status.operation})
        log.info("job %s: run %d started by %s", job_id, status.attempt, owner)
        if status.failures >= self.settings.max_attempts:
            self._end(job_id, owner, JobState.FAILED, "Gave up", status.error or (
                f"The job's runs died {status.failures} times (max {self.settings.max_attempts}, "
                "LAKESYNC_MAX_ATTEMPTS); last checkpoint kept."))  # fmt: skip
            return Outcome.ENDED
        if status.cancelRequested:
            self._end(job_id, owner, JobState.CANCELLED, f"Cancelled; {summary(status)[0].lower()}"
                      f"{summary(status)[1:]}")  # fmt: skip
            return Outcome.ENDED
        beat = _Heartbeat(self.store, job_id, owner, self.settings.lease_seconds / 4)
        beat.start()
        metrics.ACTIVE.inc()
        try:
            return self._copy(status, owner, policy, beat, on_progress)
        except LeaseLost as e:
            log.warning("%s", e, exc_info=True)
            return Outcome.NOT_CLAIMED
        except TransientStoreError as e:
            log.error("job %s: %s", job_id, e)
            try:  # hand it back: the recovery loop resumes it, up to LAKESYNC_MAX_ATTEMPTS
                self.store.release(job_id, owner, f"MongoDB unavailable: {e}", failure=True)
            except Exception:
                log.error("job %s: could not hand the job back; its lease will expire", job_id)
            return Outcome.NOT_CLAIMED
        except SourceError as e:
            if not e.details.get("transient"):
                log.error("job %s failed: %s", job_id, e)
                self._try_end(job_id, owner, JobState.FAILED, "Failed", str(e))
                return Outcome.ENDED
            log.error("job %s: %s", job_id, e)
            try:  # S3 unreachable or throttling: resume from the checkpoint, up to MAX_ATTEMPTS
                self.store.update_run(job_id, owner, error=str(e))  # shown if it gives up
                self.store.release(job_id, owner, f"Lake unavailable: {e}", failure=True)
            except Exception:
                log.error("job %s: could not hand the job back; its lease will expire", job_id)
            return Outcome.NOT_CLAIMED
        except LakesyncError as e:
            log.error("job %s failed: %s", job_id, e)
            self._try_end(job_id, owner, JobState.FAILED, "Failed", str(e))
            return Outcome.ENDED
        except Exception as e:
            log.exception("job %s: unexpected error", job_id)
            error = mask_uri(f"Unexpected error: {type(e).__name__}: {e}")[:2000]
            self._try_end(job_id, owner, JobState.FAILED, "Failed", error)
            return Outcome.ENDED
        finally:
            beat.cancel()
            metrics.ACTIVE.dec()

    def _copy(
        self,
        status: JobStatus,
        owner: str,
        policy: RetryPolicy,
        beat: _Heartbeat,
        on_progress: Callable[[JobStatus], None] | None,
    ) -> Outcome:
        job_id = status.jobId
        op = self.registry.get(status.operation)
        options = parse_options(status.options)
        source = options.source or op.source_uri(self.settings)
        lake = Lake.open(
            source, format=op.format, settings=self.settings, version=options.deltaVersion
        )
        check_columns(op.schema_, lake.schema.names, lake.uri)
        batch_size = options.batchSize or op.batchSize or self.settings.batch_size
        cp = status.checkpoint or Checkpoint()
        if status.checkpoint is None:
            total = lake.count_rows()
            pinned = {} if lake.version is None else {
                "options": {**status.options, "deltaVersion": lake.version}}  # fmt: skip
            status = policy.call(lambda: self.store.update_run(
                job_id, owner, totalRecords=total, checkpoint=cp.model_dump(),
                message=f"Copying {total:,} records", **pinned), "recording the total")  # fmt: skip
        elif status.attempt > 1:
            metrics.RESUMES.inc()
            status = policy.call(lambda: self.store.update_run(
                job_id, owner, message=f"Resumed (run {status.attempt}) at record "
                f"{status.processedRecords:,} of {status.totalRecords:,}"), "resuming")  # fmt: skip
        if on_progress:
            on_progress(status)
        db = self.store.db
        engine = CopyEngine(db[op.collection], self.store.copyerrors, op.schema_, job_id)
        run_started = time.monotonic()
        run_done = 0
        start = lake.resume_position(Position(cp.fileIndex, cp.row), cp.file)
        for batch in lake.batches(batch_size, start):
            result = policy.call(partial(engine.write, batch), f"writing batch {cp.batches + 1}")
            cp = Checkpoint(fileIndex=batch.end.file_index, row=batch.end.row,
                            batches=cp.batches + 1,
                            file=lake.file_name(batch.end.file_index))  # fmt: skip
            run_done += result.counts.processed
            derived = _progress(status, result.counts, run_done, time.monotonic() - run_started)
            status = policy.call(
                partial(self.store.commit, job_id, owner, result.counts, cp, derived),
                f"committing batch {cp.batches}",
            )
            metrics.observe_batch(result.counts, result.write_seconds)
            logger.debug(
                "job %s batch %d: %s in %.3f s", job_id, cp.batches,
                result.counts.model_dump(), result.write_seconds,
                extra={"jobId": job_id, "operation": status.operation, "batch": cp.batches,
                       **result.counts.model_dump(), "seconds": round(result.write_seconds, 4)},
            )  # fmt: skip
            if on_progress:
                on_progress(status)
            if status.cancelRequested or beat.cancel_seen:
                self._end(job_id, owner, JobState.CANCELLED,
                          f"Cancelled after {status.processedRecords:,} of "
                          f"{status.totalRecords:,} records; " + summary(status)[0].lower()
                          + summary(status)[1:])  # fmt: skip
                return Outcome.ENDED
            if self.stop.is_set():
                self.store.release(job_id, owner, f"Paused at record {status.processedRecords:,} "
                                   "(lakesync stopped); resumes from this checkpoint")  # fmt: skip
                return Outcome.CONTINUE
            if time.monotonic() - run_started >= self.settings.job_time_limit:
                self.store.release(
                    job_id, owner,
                    f"Run {status.attempt} reached the {self.settings.job_time_limit:g} s time "
                    f"limit at record {status.processedRecords:,} of {status.totalRecords:,}; "
                    f"continuing in run {status.attempt + 1}",
                )  # fmt: skip
                return Outcome.CONTINUE
        final = self.store.get(job_id)
        if final.processedRecords != final.totalRecords:
            logger.warning("job %s: processed %d but counted %d at start (lake changed?)",
                           job_id, final.processedRecords, final.totalRecords)  # fmt: skip
            self.store.update_run(job_id, owner, totalRecords=final.processedRecords)
            final = self.store.get(job_id)
        done = self._end(job_id, owner, JobState.COMPLETED, summary(final))
        if on_progress:
            on_progress(done)
        return Outcome.ENDED

    def _end(
        self, job_id: str, owner: str, state: JobState, message: str, error: str | None = None
    ) -> JobStatus:
        return self.retry().call(
            lambda: self.store.finish(job_id, owner, state, message, error), "ending the job"
        )

    def _try_end(self, job_id: str, owner: str, state: JobState, message: str, error: str) -> None:
        try:
            self._end(job_id, owner, state, message, error)
        except (LakesyncError, JobError) as e:
            logger.error("job %s: could not record its end (%s); it stays resumable", job_id, e)


def _progress(status: JobStatus, delta: Counters, run_done: int, elapsed: float) -> dict[str, Any]:
    """percentComplete, rate and ETA after a batch, from the counters before it plus delta."""
    processed = status.processedRecords + delta.processed
    total = max(status.totalRecords, processed)
    rate = run_done / elapsed if elapsed > 0 else 0.0
    return {
        "percentComplete": round(100.0 * processed / total, 2) if total else 100.0,
        "recordsPerSecond": round(rate, 1),
        "etaSeconds": round((total - processed) / rate, 1) if rate > 0 else None,
        "message": f"Copying: {processed:,} of {total:,} records",
    }


class _Heartbeat(threading.Thread):
    """Renews the lease while a batch or a count takes long, and notices cancel requests."""

    def __init__(self, store: JobStore, job_id: str, owner: str, every: float) -> None:
        super().__init__(name=f"heartbeat-{job_id}", daemon=True)
        self.store, self.job_id, self.owner, self.every = store, job_id, owner, max(every, 0.5)
        self._done = threading.Event()
        self.cancel_seen = False

    def run(self) -> None:
        while not self._done.wait(self.every):
            try:
                self.cancel_seen = self.store.heartbeat(self.job_id, self.owner).cancelRequested
            except LeaseLost:
                return
            except Exception as e:  # a missed beat is retried at the next tick
                logger.debug("heartbeat of %s failed: %s", self.job_id, e)

    def cancel(self) -> None:
        self._done.set()
