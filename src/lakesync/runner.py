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
from dataclasses import dataclass, field, replace
from enum import Enum
from functools import cached_property, partial
from typing import TYPE_CHECKING, Any

from lakesync import metrics, mirror, repeats
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
from lakesync.logs import job_context
from lakesync.mirror import MirrorSet, key_type
from lakesync.models import Checkpoint, Counters, JobState, JobStatus, Watermark
from lakesync.mongo import mask_uri
from lakesync.operations import OperationRegistry, ResolvedJob
from lakesync.retry import RetryPolicy
from lakesync.schema import check_columns
from lakesync.store import JobStore
from lakesync.watermarks import (
    WatermarkStore,
    lake_filter,
    later,
    reach_back,
    scan,
    shown,
    watermark_column,
)

if TYPE_CHECKING:
    from lakesync.partitions import PartitionedJobs

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
    noun = "record" if s.processedRecords == 1 else "records"
    text = (
        f"Copied {s.processedRecords:,} {noun}: {s.insertedRecords:,} inserted, "
        f"{s.updatedRecords:,} updated, {s.unchangedRecords:,} unchanged, "
    )
    if s.duplicateRecords:
        text += f"{s.duplicateRecords:,} duplicate{'' if s.duplicateRecords == 1 else 's'}, "
    text += f"{s.errorRecords:,} rejected"
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
    #: set when the executor can run partitions in parallel (see partitions.py)
    partitioned: PartitionedJobs | None = None
    #: failures that could not be written (the database refused every write): job -> error
    unrecorded: dict[str, str] = field(default_factory=dict)

    @cached_property
    def watermarks(self) -> WatermarkStore:
        """The operations' watermarks (`syncstate`)."""
        return WatermarkStore(self.store.db)

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
        with job_context(job_id, status.operation):
            return self._run_claimed(status, owner, policy, on_progress)

    def _run_claimed(
        self,
        status: JobStatus,
        owner: str,
        policy: RetryPolicy,
        on_progress: Callable[[JobStatus], None] | None,
    ) -> Outcome:
        job_id = status.jobId
        log = logging.LoggerAdapter(logger, {"jobId": job_id, "operation": status.operation})
        log.info("job %s: run %d started by %s", job_id, status.attempt, owner)
        if (unrecorded := self.unrecorded.pop(job_id, None)) is not None:
            # its failure could not be written (e.g. a full disk): record it, do not copy again
            self._try_end(job_id, owner, JobState.FAILED, "Failed", unrecorded)
            return Outcome.ENDED
        if status.failures >= self.settings.max_attempts:
            self._end(job_id, owner, JobState.FAILED, "Gave up", status.error or (
                f"The job's runs died {status.failures} times (max {self.settings.max_attempts}, "
                "LAKESYNC_MAX_ATTEMPTS); last checkpoint kept."))  # fmt: skip
            return Outcome.ENDED
        if status.cancelRequested:
            self._end(job_id, owner, JobState.CANCELLED, f"Cancelled; {summary(status)[0].lower()}"
                      f"{summary(status)[1:]}")  # fmt: skip
            return Outcome.ENDED
        if status.partitions and self.partitioned is not None:  # partitions run on their own
            self.partitioned.dispatch(job_id, owner)
            return Outcome.ENDED
        beat = _Heartbeat(self.store, job_id, owner, self.settings.lease_seconds / 4)
        beat.start()
        metrics.run_started(job_id)
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
            metrics.run_ended(job_id)

    def _copy(
        self,
        status: JobStatus,
        owner: str,
        policy: RetryPolicy,
        beat: _Heartbeat,
        on_progress: Callable[[JobStatus], None] | None,
    ) -> Outcome:
        job_id = status.jobId
        job = self.registry.resolve(status.operation, status.options, self.settings)
        op, options, source = job.op, job.options, job.source
        mode = options.mode or op.mode
        mirror.check_source(op, options, source, self.settings)  # the lake setting may change
        lake = self._open_lake(job, mode, status.checkpoint is None, policy)
        check_columns(op.schema_, lake.schema, lake.uri)
        column = watermark_column(op, lake, mode)
        key_kind = key_type(op.schema_, lake) if mode == "mirror" else None
        db = self.store.db
        seen = None if key_kind is None else MirrorSet(db, op.collection, job_id, key_kind)
        batch_size = job.batch_size
        cp = status.checkpoint or Checkpoint()
        if status.checkpoint is None:
            saved = since = until = None
            changed = 0
            if column is not None:
                if mode == "incremental":
                    saved = policy.call(lambda: self.watermarks.get(op.name, source, column),
                                        "reading the watermark")  # fmt: skip
                    since = reach_back(saved, op.lookback)
                changed, until = scan(lake, column, since)
                until = later(until, saved)  # a watermark never moves back
            cp = Checkpoint(since=since, until=until)
            total = changed if column is not None else lake.count_rows()  # scan counted them
            # which records a later record of the same key replaces: skipped by every run
            planned = lake_filter(lake, cp.since, cp.until if lake.version is None else None)
            by = [cp.since.column] if cp.since is not None else []
            policy.call(
                lambda: repeats.plan_job(db, job_id, lake, op.schema_, planned, by, op.collection),
                "planning repeated keys",
            )
            if (
                self.partitioned is not None
                and mode == "full"
                and self.partitioned.start(status, owner, lake, total, cp)
            ):
                return Outcome.ENDED
            pinned = {**status.options, "mode": mode}  # a resumed run keeps mode and version
            if lake.version is not None:
                pinned["deltaVersion"] = lake.version
            if lake.since_version is not None:
                pinned["sinceDeltaVersion"] = lake.since_version
            if seen is not None:
                mirror.sweep(db, self.store.jobs)
                policy.call(seen.begin, "starting the mirror's key set")
            what = f"{total:,} records" + (f" changed since {shown(since)}" if since else "")
            status = policy.call(lambda: self.store.update_run(
                job_id, owner, totalRecords=total, checkpoint=cp.model_dump(), options=pinned,
                message=f"Copying {what}"), "recording the total")  # fmt: skip
        elif status.attempt > 1:
            metrics.RESUMES.inc()
            status = policy.call(lambda: self.store.update_run(
                job_id, owner, message=f"Resumed (run {status.attempt}) at record "
                f"{status.processedRecords:,} of {status.totalRecords:,}"), "resuming")  # fmt: skip
        if on_progress:
            on_progress(status)
        superseded = policy.call(lambda: repeats.Superseded.load(db, job_id), "reading the plan")
        engine = CopyEngine(
            db[op.collection], self.store.copyerrors, op.schema_, job_id, superseded
        )
        clock = _Clock()
        start = lake.resume_position(Position(cp.fileIndex, cp.row), cp.file)
        # A Delta version's files never change, so its range needs no upper bound; that also
        # keeps records above `until`'s last whole millisecond, which files added later
        # cannot bring back
        reading = lake_filter(lake, cp.since, cp.until if lake.version is None else None)
        # the lake's reader thread validates, encodes and hashes the next batch meanwhile
        for batch in lake.batches(batch_size, start, filter=reading, prepare=engine.prepare):
            result = policy.call(partial(engine.write, batch), f"writing batch {cp.batches + 1}")
            if seen is not None and status.errorRecords + result.counts.errors == 0:
                # with a rejected record the delete phase is refused: no need to remember keys
                policy.call(partial(seen.add, result.keys), f"recording keys of {cp.batches + 1}")
            end = batch.end
            cp = cp.model_copy(update={"fileIndex": end.file_index, "row": end.row,
                                       "batches": cp.batches + 1,
                                       "file": lake.file_name(end.file_index)})  # fmt: skip
            clock.done += result.counts.processed
            derived = _progress(status, result.counts, clock.done, clock.elapsed())
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
            if (paused := self._interrupted(status, owner, beat, clock)) is not None:
                return paused
        final = self.store.get(job_id)
        if final.processedRecords != final.totalRecords:
            logger.warning("job %s: processed %d but counted %d at start (lake changed?)",
                           job_id, final.processedRecords, final.totalRecords)  # fmt: skip
            final = self.store.update_run(job_id, owner, totalRecords=final.processedRecords)
        message = summary(final)
        if seen is not None:
            refused = mirror.refusal(final, op.collection, options.allowEmpty)
            if refused is None and not policy.call(seen.intact, "checking the mirror's keys"):
                refused = mirror.LOST
            if refused is not None:
                self._end(job_id, owner, JobState.FAILED, f"{message}; nothing deleted", refused)
                mirror.drop_seen(db, job_id)  # a resumed run would refuse again: not needed
                return Outcome.ENDED
            ended = self._delete_missing(final, cp, seen, owner, policy, beat, clock, on_progress)
            if ended is not None:
                return ended
            final = self.store.get(job_id)
            message = summary(final)
        if cp.since is not None:
            message += f" (records changed since {shown(cp.since)})"
        done = self._end(job_id, owner, JobState.COMPLETED, message)  # or cancelled, see finish
        if cp.until is not None and done.state is JobState.COMPLETED:
            self._save_watermark(op.name, source, cp.until, job_id, mode, lake.version)
        if on_progress:
            on_progress(done)
        return Outcome.ENDED

    def _delete_missing(
        self,
        status: JobStatus,
        cp: Checkpoint,
        seen: MirrorSet,
        owner: str,
        policy: RetryPolicy,
        beat: _Heartbeat,
        clock: _Clock,
        on_progress: Callable[[JobStatus], None] | None,
    ) -> Outcome | None:
        """Mirror's delete phase, a page per commit; an Outcome if the run stops before its end."""
        job_id = status.jobId
        if cp.mirrorPending:  # counted by a run that died before deleting them
            policy.call(partial(seen.delete, cp.mirrorPending), "deleting records")
        while True:
            page = policy.call(partial(seen.next_page, cp.mirrorAfter), "comparing ids")
            if page is None:
                return None
            last, gone = page
            cp = cp.model_copy(
                update={"batches": cp.batches + 1, "mirrorAfter": last, "mirrorPending": gone}
            )
            derived = {"message": "Deleting records the lake no longer holds: "
                                  f"{status.deletedRecords + len(gone):,} so far"}  # fmt: skip
            status = policy.call(
                partial(self.store.commit, job_id, owner, Counters(deleted=len(gone)), cp, derived),
                "committing deletions",
            )
            started = time.perf_counter()
            policy.call(partial(seen.delete, gone), "deleting records")
            metrics.observe_batch(Counters(deleted=len(gone)), time.perf_counter() - started)
            if on_progress:
                on_progress(status)
            if (paused := self._interrupted(status, owner, beat, clock)) is not None:
                return paused

    def _interrupted(
        self, status: JobStatus, owner: str, beat: _Heartbeat, clock: _Clock
    ) -> Outcome | None:
        """After a commit: end on cancel, hand back on stop or at the time limit, else None."""
        job_id = status.jobId
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
        if clock.elapsed() >= self.settings.job_time_limit:
            self.store.release(
                job_id, owner,
                f"Run {status.attempt} reached the {self.settings.job_time_limit:g} s time "
                f"limit at record {status.processedRecords:,} of {status.totalRecords:,}; "
                f"continuing in run {status.attempt + 1}",
            )  # fmt: skip
            return Outcome.CONTINUE
        return None

    def _open_lake(self, job: ResolvedJob, mode: str, first_run: bool, policy: RetryPolicy) -> Lake:
        """The job's lake. An incremental copy of a Delta table opens only the files added
        since the version the last completed copy read: Delta never changes a file in place,
        so every record added or changed since then lies in them, and the other files are
        not even opened. The first run looks that version up; it is pinned in the options
        (`sinceDeltaVersion`), so a resumed run opens the same files. When it can no longer
        be listed (its log was cleaned up, the table was recreated, the source is no Delta
        table), the whole version is read, with the watermark filter as for plain files.
        """
        since = job.options.sinceDeltaVersion
        if first_run and mode == "incremental" and job.op.watermark:
            column, name, source = job.op.watermark, job.op.name, job.source
            since = policy.call(lambda: self.watermarks.delta_version(name, source, column),
                                "reading the watermark")  # fmt: skip
        if since is not None:
            narrowed = job.options.model_copy(update={"sinceDeltaVersion": since})
            try:
                return replace(job, options=narrowed).open_lake(self.settings)
            except SourceError as e:
                if e.details.get("transient"):
                    raise
                logger.warning("%s: cannot list the files added to %s since Delta version %d "
                               "(%s); reading the whole table", job.op.name, job.source, since,
                               e)  # fmt: skip
        whole = job.options.model_copy(update={"sinceDeltaVersion": None})
        return replace(job, options=whole).open_lake(self.settings)

    def _save_watermark(
        self,
        operation: str,
        source: str,
        reached: Watermark,
        job_id: str,
        mode: str,
        delta_version: int | None,
    ) -> None:
        """Move the operation's watermark; a failure only makes the next copy read more."""
        try:
            self.retry().call(
                lambda: self.watermarks.save(
                    operation, source, reached, job_id, mode, delta_version
                ),
                "recording the watermark",
            )
            logger.info("job %s: watermark of %s is now %s", job_id, operation, shown(reached))
        except LakesyncError as e:
            logger.error("job %s: could not record the watermark %s (%s); the next "
                         "incremental copy reads from the previous one", job_id,
                         shown(reached), e)  # fmt: skip

    def _end(
        self, job_id: str, owner: str, state: JobState, message: str, error: str | None = None
    ) -> JobStatus:
        done = self.retry().call(
            lambda: self.store.finish(job_id, owner, state, message, error), "ending the job"
        )
        if state is not JobState.FAILED:  # a failed job may be resumed: it needs its keys
            mirror.drop_seen(self.store.db, job_id)
        return done

    def _try_end(self, job_id: str, owner: str, state: JobState, message: str, error: str) -> None:
        try:
            self._end(job_id, owner, state, message, error)
        except (LakesyncError, JobError) as e:
            logger.error("job %s: could not record its end (%s); it stays resumable", job_id, e)
            if state is JobState.FAILED:  # recorded when this process next claims it
                self.unrecorded[job_id] = error


@dataclass
class _Clock:
    """When the current run started and how many records it processed (rate, time limit)."""

    started: float = field(default_factory=time.monotonic)
    done: int = 0

    def elapsed(self) -> float:
        return time.monotonic() - self.started


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
