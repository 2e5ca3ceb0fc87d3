"""The job body: claim a job, copy the lake batch by batch from its checkpoint, end it.

Every executor calls `JobRunner.run`; executors only decide where and when it runs.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import cached_property, partial
from typing import Any

from lakesync import metrics, mirror, repeats
from lakesync.batchloop import copy_batches, summary
from lakesync.config import Settings
from lakesync.copy import BatchResult
from lakesync.errors import (
    JobError,
    LakesyncError,
    LeaseLost,
    SourceError,
    TransientSourceError,
    TransientStoreError,
)
from lakesync.jobstore import JobStore
from lakesync.lake import Lake, Listing, Position
from lakesync.lease import Alone, Heartbeat, died_reason, new_owner, progressed, run_owner, suspect
from lakesync.logs import job_context
from lakesync.masking import masked
from lakesync.mirror import MirrorSet, key_type
from lakesync.models import Checkpoint, Counters, JobState, JobStatus, Outcome, Watermark
from lakesync.operations import Mode, OperationRegistry, ResolvedJob
from lakesync.partitions import PartitionedJobs
from lakesync.retry import RetryPolicy
from lakesync.schema import check_columns
from lakesync.watermarks import (
    WatermarkStore,
    lake_filter,
    later,
    reach_back,
    scan,
    shown,
    watermark_column,
)

__all__ = ["JobRunner", "Outcome", "new_owner", "summary"]

logger = logging.getLogger(__name__)


@dataclass
class JobRunner:
    """Runs jobs against one database; shared by all executor threads of a process."""

    settings: Settings
    store: JobStore
    registry: OperationRegistry
    owner: str = field(default_factory=new_owner)
    stop: threading.Event = field(default_factory=threading.Event)
    #: partitions of partitioned jobs; its `submit` is set when an executor runs them
    partitioned: PartitionedJobs = field(init=False)
    #: failures that could not be written (the database refused every write): job -> error
    unrecorded: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.partitioned = PartitionedJobs(
            self.settings, self.store, self.registry, self.owner, self.stop
        )

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
        owner = run_owner(self.owner)
        policy = self.retry()
        try:
            alone = policy.call(
                lambda: suspect(self.store.jobs, {"jobId": job_id}), "reading a job"
            )
        except LakesyncError as e:
            logger.error("job %s cannot be run: %s", job_id, e)
            return Outcome.NOT_CLAIMED
        with Alone(alone):
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
        if status.processedRecords:  # a run after a pause, a crash or a time limit
            log.info(
                "job %s: run %d resumed at record %s of %s",
                job_id,
                status.attempt,
                f"{status.processedRecords:,}",
                f"{status.totalRecords:,}",
                extra={"owner": owner},
            )
        else:
            log.info("job %s: run %d started", job_id, status.attempt, extra={"owner": owner})
        if (unrecorded := self.unrecorded.pop(job_id, None)) is not None:
            # its failure could not be written (e.g. a full disk): record it, do not copy again
            self._try_end(job_id, owner, JobState.FAILED, "Failed", unrecorded)
            return Outcome.ENDED
        if status.failures >= self.settings.max_attempts:
            cp = status.checkpoint
            source = status.options.get("source") or "its lake"
            reading = (cp.file if cp is not None else None) or f"{source} (before a checkpoint)"
            self._end(
                job_id,
                owner,
                JobState.FAILED,
                "Gave up",
                status.error
                or died_reason(
                    status.attempt - 1,
                    status.failures,
                    reading,
                    status.processedRecords,
                    self.settings.max_attempts,
                ),
            )
            return Outcome.ENDED
        if status.cancelRequested:
            self._end(
                job_id,
                owner,
                JobState.CANCELLED,
                f"Cancelled; {summary(status)[0].lower()}{summary(status)[1:]}",
            )
            return Outcome.ENDED
        if status.partitions:  # continued from its partitions, whatever resumed it
            return self._partitions(status, owner, policy, on_progress)
        beat = self._heartbeat(job_id, owner)
        metrics.run_started(job_id)
        try:
            with beat:
                return self._copy_job(status, owner, policy, beat, on_progress)
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
        except TransientSourceError as e:
            log.error("job %s: %s", job_id, e)
            try:  # S3 unreachable or throttling: resume from the checkpoint, up to MAX_ATTEMPTS
                text = str(e)  # shown if it gives up
                policy.call(
                    partial(self.store.update_run, job_id, owner, error=text), "recording the error"
                )
                policy.call(
                    partial(
                        self.store.release, job_id, owner, f"Lake unavailable: {text}", failure=True
                    ),
                    "handing the job back",
                )
            except Exception:
                log.error("job %s: could not hand the job back; its lease will expire", job_id)
            return Outcome.NOT_CLAIMED
        except LakesyncError as e:
            log.error("job %s failed: %s", job_id, e)
            self._try_end(job_id, owner, JobState.FAILED, "Failed", str(e))
            return Outcome.ENDED
        except Exception as e:
            log.exception("job %s: unexpected error", job_id)
            error = masked(f"Unexpected error: {type(e).__name__}: {e}")[:2000]
            self._try_end(job_id, owner, JobState.FAILED, "Failed", error)
            return Outcome.ENDED
        finally:
            metrics.run_ended(job_id)

    def _heartbeat(self, job_id: str, owner: str) -> Heartbeat:
        """The job's heartbeat thread: renews the lease, notices cancel requests."""

        def renew() -> bool:
            return self.store.heartbeat(job_id, owner).cancelRequested

        return Heartbeat(renew, self.settings.lease_seconds / 4, f"heartbeat-{job_id}-{owner}")

    def _partitions(
        self,
        status: JobStatus,
        owner: str,
        policy: RetryPolicy,
        on_progress: Callable[[JobStatus], None] | None,
    ) -> Outcome:
        """Continue a partitioned job: dispatch its partitions, or copy them here."""
        job_id = status.jobId
        try:
            if self.partitioned.submit is not None:
                self.partitioned.dispatch(job_id, owner)
                return Outcome.ENDED
            with self._heartbeat(job_id, owner):
                return self.partitioned.run_inline(job_id, owner, on_progress)
        except LeaseLost as e:
            logger.warning("%s", e)
            return Outcome.NOT_CLAIMED
        except LakesyncError as e:  # MongoDB gone past the budget: its lease expires
            logger.error("job %s: could not continue its partitions: %s", job_id, e)
            with contextlib.suppress(Exception):
                self.store.release(job_id, owner, f"MongoDB unavailable: {e}", failure=True)
            return Outcome.NOT_CLAIMED

    def _copy_job(
        self,
        status: JobStatus,
        owner: str,
        policy: RetryPolicy,
        beat: Heartbeat,
        on_progress: Callable[[JobStatus], None] | None,
    ) -> Outcome:
        job_id = status.jobId
        job = self.registry.resolve(status.operation, status.options, self.settings)
        op, options, source = job.op, job.options, job.source
        dry_run = options.mode == "dry-run"  # a full copy's counts, written nowhere
        mode: Mode = "full" if options.mode == "dry-run" else options.mode or op.mode
        mirror.check_source(op, options, source, self.settings)  # the lake setting may change
        known = None
        if status.checkpoint is not None:  # the files' facts its first run kept: no footers
            known = policy.call(
                lambda: repeats.load_listing(self.store.db, job_id), "reading the plan"
            )
        lake = self._open_lake(job, mode, status.checkpoint is None, policy, known)
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
                    saved = policy.call(
                        lambda: self.watermarks.get(op.name, source, column),
                        "reading the watermark",
                    )
                    # of the files a table version added since the last copy (Delta,
                    # Iceberg), only the newer records: a rewrite's files carry old rows
                    since = reach_back(saved, op.lookback)
                changed, until = scan(lake, column, since)
                until = later(until, saved)  # a watermark never moves back
            # the file it starts in: named if the reader crashes before the first commit
            cp = Checkpoint(
                since=since, until=until, file=lake.file_name(0) if lake.files else None
            )
            total = changed if column is not None else lake.count_rows()  # scan counted them
            # which records a later record of the same key replaces: skipped by every run
            planned = lake_filter(lake, cp.since, cp.until if lake.version is None else None)
            by = [cp.since.column] if cp.since is not None else []
            spill = self.settings.data_dir / "plans"  # where a large plan waits
            policy.call(
                lambda: repeats.plan_job(
                    db, job_id, lake, op.schema_, planned, by, op.collection, spill
                ),
                "planning repeated keys",
            )
            lake.drop_kept()  # the plan's columns read at open: the copy reads whole records
            # each file's size, rows and schema: partitions and resumed runs read no footer
            policy.call(
                lambda: repeats.save_listing(db, job_id, lake.listing()),
                "keeping the lake's listing",
            )
            if (
                self.partitioned.plans
                and mode == "full"
                and not dry_run
                and self.partitioned.start(status, owner, lake, total, cp)
            ):
                return Outcome.ENDED
            # a resumed run keeps mode and version
            pinned = {**status.options, "mode": "dry-run" if dry_run else mode}
            pinned |= lake.pins()
            if seen is not None:
                policy.call(lambda: mirror.sweep(db, self.store.jobs), "sweeping key sets")
                policy.call(seen.begin, "starting the mirror's key set")
            what = f"{total:,} records" + (f" changed since {shown(since)}" if since else "")
            status = policy.call(
                lambda: self.store.update_run(
                    job_id,
                    owner,
                    totalRecords=total,
                    checkpoint=cp.model_dump(),
                    options=pinned,
                    message=f"Copying {what}",
                ),
                "recording the total",
            )
        elif status.attempt > 1:
            metrics.RESUMES.inc()
            status = policy.call(
                lambda: self.store.update_run(
                    job_id,
                    owner,
                    message=f"Resumed (run {status.attempt}) at record "
                    f"{status.processedRecords:,} of {status.totalRecords:,}",
                ),
                "resuming",
            )
        if on_progress:
            on_progress(status)
        superseded = policy.call(lambda: repeats.Superseded.load(db, job_id), "reading the plan")
        clock = _Clock()
        start = lake.resume_position(Position(cp.fileIndex, cp.row), cp.file)
        # A Delta version's files never change, so its range needs no upper bound; that also
        # keeps records above `until`'s last whole millisecond, which files added later
        # cannot bring back
        reading = lake_filter(lake, cp.since, cp.until if lake.version is None else None)
        run = _JobRun(self, status, owner, policy, beat, clock, seen, on_progress)
        paused, cp = copy_batches(
            run,
            self.store,
            op,
            job_id,
            lake,
            start,
            cp,
            batch_size=batch_size,
            policy=policy,
            filter=reading,
            superseded=superseded,
            dry_run=dry_run,
        )
        if paused is not None:
            return paused
        final = policy.call(lambda: self.store.get(job_id), "reading the job")
        if final.processedRecords != final.totalRecords:
            logger.warning(
                "job %s: processed %d but counted %d at start (lake changed?)",
                job_id,
                final.processedRecords,
                final.totalRecords,
            )
            done_count = final.processedRecords
            final = policy.call(
                lambda: self.store.update_run(job_id, owner, totalRecords=done_count),
                "correcting the total",
            )
        message = summary(final)
        if seen is not None:
            refused = mirror.refusal(final, op.collection, options.allowEmpty)
            if refused is None and not policy.call(seen.intact, "checking the mirror's keys"):
                refused = mirror.LOST
            if refused is not None:
                self._end(job_id, owner, JobState.FAILED, f"{message}; nothing deleted", refused)
                # a resumed run would refuse again: not needed
                policy.call(lambda: mirror.drop_seen(db, job_id), "dropping the key set")
                return Outcome.ENDED
            ended = self._delete_missing(final, cp, seen, owner, policy, beat, clock, on_progress)
            if ended is not None:
                return ended
            final = policy.call(lambda: self.store.get(job_id), "reading the job")
            message = summary(final)
        if cp.since is not None:
            message += f" (records changed since {shown(cp.since)})"
        done = self._end(job_id, owner, JobState.COMPLETED, message)  # or cancelled, see finish
        if cp.until is not None and done.state is JobState.COMPLETED and not dry_run:
            self._save_watermark(op.name, source, cp.until, job_id, mode, lake.pins())
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
        beat: Heartbeat,
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
            derived = {
                "message": "Deleting records the lake no longer holds: "
                f"{status.deletedRecords + len(gone):,} so far"
            }
            status = policy.call(
                partial(self.store.commit, job_id, owner, Counters(deleted=len(gone)), cp, derived),
                "committing deletions",
            )
            started = time.perf_counter()
            policy.call(partial(seen.delete, gone), "deleting records")
            metrics.observe_batch(Counters(deleted=len(gone)), time.perf_counter() - started)
            if on_progress:
                on_progress(status)
            if (paused := self._interrupted(status, owner, beat, clock, policy)) is not None:
                return paused

    def _interrupted(
        self, status: JobStatus, owner: str, beat: Heartbeat, clock: _Clock, policy: RetryPolicy
    ) -> Outcome | None:
        """After a commit: end on cancel, hand back on stop or at the time limit, else None."""
        job_id = status.jobId
        if status.cancelRequested or beat.cancel_seen:
            self._end(
                job_id,
                owner,
                JobState.CANCELLED,
                f"Cancelled after {status.processedRecords:,} of "
                f"{status.totalRecords:,} records; "
                + summary(status)[0].lower()
                + summary(status)[1:],
            )
            return Outcome.ENDED
        if self.stop.is_set():
            text = (
                f"Paused at record {status.processedRecords:,} (lakesync stopped); "
                "resumes from this checkpoint"
            )
        elif clock.elapsed() >= self.settings.job_time_limit:
            text = (
                f"Run {status.attempt} reached the {self.settings.job_time_limit:g} s time "
                f"limit at record {status.processedRecords:,} of {status.totalRecords:,}; "
                f"continuing in run {status.attempt + 1}"
            )
        else:
            return None
        logger.info("job %s: %s", job_id, text)
        policy.call(lambda: self.store.release(job_id, owner, text), "handing the job back")
        return Outcome.CONTINUE

    def _open_lake(
        self,
        job: ResolvedJob,
        mode: str,
        first_run: bool,
        policy: RetryPolicy,
        known: Listing | None = None,
    ) -> Lake:
        """The job's lake. An incremental copy of a Delta (or Iceberg) table opens only the
        files added since the version (snapshot) the last completed copy read: neither format
        changes a file in place, so every record added or changed since then lies in them, and
        the other files are not even opened. The first run looks that version up; it is pinned
        in the options (`sinceDeltaVersion`, `sinceIcebergSnapshotId`), so a resumed run opens
        the same files. When it can no longer
        be listed (its log was cleaned up, the table was recreated, the source is no Delta
        table), the whole version is read, with the watermark filter as for plain files.

        The first run reads the columns the plan of repeated keys needs (the keys and the
        watermark) from small files in the same pass as their footers (``Lake.open``'s
        ``keep``): the plan then costs no request for them.
        """
        since = job.options.sinceDeltaVersion
        since_snapshot = job.options.sinceIcebergSnapshotId
        keep = None
        if first_run:
            keep = [*job.op.schema_.key_columns, *([job.op.watermark] if job.op.watermark else [])]
        if first_run and mode == "incremental" and job.op.watermark:
            column, name, source = job.op.watermark, job.op.name, job.source
            since, since_snapshot = policy.call(
                lambda: self.watermarks.read_versions(name, source, column),
                "reading the watermark",
            )
        if since is not None or since_snapshot is not None:
            pins = {"sinceDeltaVersion": since, "sinceIcebergSnapshotId": since_snapshot}
            narrowed = job.options.model_copy(update=pins)
            try:
                narrowed_job = replace(job, options=narrowed)
                return narrowed_job.open_lake(self.settings, known=known, keep=keep)
            except TransientSourceError:
                raise
            except SourceError as e:
                what = f"Delta version {since}"
                if since is None:
                    what = f"Iceberg snapshot {since_snapshot}"
                logger.warning(
                    "%s: cannot list the files added to %s since %s (%s); reading the whole table",
                    job.op.name,
                    job.source,
                    what,
                    e,
                )
        whole = job.options.model_copy(
            update={"sinceDeltaVersion": None, "sinceIcebergSnapshotId": None}
        )
        return replace(job, options=whole).open_lake(self.settings, known=known, keep=keep)

    def _save_watermark(
        self,
        operation: str,
        source: str,
        reached: Watermark,
        job_id: str,
        mode: str,
        pins: dict[str, int],
    ) -> None:
        """Move the operation's watermark (with the Delta version or Iceberg snapshot read,
        ``Lake.pins``); a failure only makes the next copy read more."""
        try:
            self.retry().call(
                lambda: self.watermarks.save(
                    operation,
                    source,
                    reached,
                    job_id,
                    mode,
                    pins.get("deltaVersion"),
                    pins.get("icebergSnapshotId"),
                ),
                "recording the watermark",
            )
            logger.info("job %s: watermark of %s is now %s", job_id, operation, shown(reached))
        except LakesyncError as e:
            logger.error(
                "job %s: could not record the watermark %s (%s); the next "
                "incremental copy reads from the previous one",
                job_id,
                shown(reached),
                e,
            )

    def _end(
        self, job_id: str, owner: str, state: JobState, message: str, error: str | None = None
    ) -> JobStatus:
        done = self.retry().call(
            lambda: self.store.finish(job_id, owner, state, message, error), "ending the job"
        )
        if state is not JobState.FAILED:  # a failed job may be resumed: it needs its keys
            with contextlib.suppress(LakesyncError):  # swept later if this fails
                self.retry().call(
                    lambda: mirror.drop_seen(self.store.db, job_id), "dropping the key set"
                )
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


@dataclass
class _JobRun:
    """The whole-job side of the batch loop: fence, mirror keys, commit, progress, stop."""

    runner: JobRunner
    status: JobStatus
    owner: str
    policy: RetryPolicy
    beat: Heartbeat
    clock: _Clock
    seen: MirrorSet | None
    on_progress: Callable[[JobStatus], None] | None
    where: str = ""
    log_extra: dict[str, Any] = field(default_factory=dict)

    def fence(self) -> None:
        if self.beat.lost:
            raise LeaseLost(f"Job {self.status.jobId} is no longer owned by {self.owner}.")
        self.runner.store.leases.check(self.status.jobId, self.owner)

    def written(self, result: BatchResult, cp: Checkpoint) -> None:
        # with a rejected record the delete phase is refused: no need to remember keys
        if self.seen is not None and self.status.errorRecords + result.counts.errors == 0:
            self.policy.call(partial(self.seen.add, result.keys), f"recording keys of {cp.batches}")

    def commit(self, result: BatchResult, cp: Checkpoint) -> Outcome | None:
        store, job_id = self.runner.store, self.status.jobId
        self.clock.done += result.counts.processed
        derived = _progress(self.status, result.counts, self.clock.done, self.clock.elapsed())
        self.status = self.policy.call(
            partial(store.commit, job_id, self.owner, result.counts, cp, derived),
            f"committing batch {cp.batches}",
        )
        progressed()  # it is not the run that crashes its process at one spot
        if self.on_progress:
            self.on_progress(self.status)
        return self.runner._interrupted(self.status, self.owner, self.beat, self.clock, self.policy)
