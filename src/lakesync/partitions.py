"""Partitioned copies: one job split into file ranges that workers copy in parallel.

The job's first run plans the partitions (`jobpartitions`, one document each) and hands
them to the executor. Each partition is a run of its own, with the same lease primitive
(`lease.py`: claim, heartbeat, fence, hand back, take over) and the same batch loop
(`batchloop.py`: fence, write, commit after checkpoint) as a whole job. The job document
then takes the sums of its partitions with `$max`: counters only grow, so a slow writer
with older sums can never move them back, and a replayed update changes nothing. The
partition that finds all others done completes the job; a partition that fails fails the
job, naming itself; a partition MongoDB or the lake cannot serve within the retry budget
is handed back and resumed later.

Whatever resumes a partitioned job (the API, `lakesync resume`, `lakesync copy` picking
it up, the recovery scan) continues its partitions from their checkpoints; a job whose
partitions are all done is completed by the next run of the job.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property, partial
from typing import Any

from pymongo.collection import Collection
from pymongo.errors import BulkWriteError

from lakesync import metrics
from lakesync.batchloop import copy_batches, summary
from lakesync.config import Settings
from lakesync.copy import BatchResult
from lakesync.errors import LakesyncError, LeaseLost, TransientSourceError, TransientStoreError
from lakesync.jobstore import JobStore
from lakesync.lake import Lake, Position
from lakesync.lease import Alone, Heartbeat, Leases, died_reason, progressed, run_owner, suspect
from lakesync.logs import job_context
from lakesync.models import (
    ACTIVE_STATES,
    PARTITIONS,
    Checkpoint,
    Counters,
    JobState,
    JobStatus,
    Outcome,
)
from lakesync.operations import OperationRegistry
from lakesync.repeats import Superseded, load_listing
from lakesync.retry import RetryPolicy
from lakesync.watermarks import WatermarkStore

logger = logging.getLogger(__name__)

COUNTERS = {
    "processedRecords": "processed",
    "insertedRecords": "inserted",
    "updatedRecords": "updated",
    "unchangedRecords": "unchanged",
    "duplicateRecords": "duplicates",
    "errorRecords": "errors",
}


def plan(rows_per_file: list[int], target_rows: int) -> list[tuple[int, int]]:
    """Consecutive file ranges [start, stop) of about `target_rows` records each."""
    ranges: list[tuple[int, int]] = []
    start, rows = 0, 0
    for i, n in enumerate(rows_per_file):
        rows += n
        if rows >= target_rows:
            ranges.append((start, i + 1))
            start, rows = i + 1, 0
    if start < len(rows_per_file):
        if ranges and rows < target_rows // 2:
            ranges[-1] = (ranges[-1][0], len(rows_per_file))  # fold a small tail in
        else:
            ranges.append((start, len(rows_per_file)))
    return ranges


def _now_ms() -> int:
    return int(time.time() * 1000)


def partition_leases(coll: Collection[dict[str, Any]]) -> Leases:
    """The lease primitive on partition documents (`_id` = "jobId:index")."""
    return Leases(coll, "_id")


@dataclass
class PartitionedJobs:
    """Plans, runs and aggregates the partitions of jobs.

    `submit` hands a partition to the executor; without one (`lakesync copy`, `lakesync
    resume`), the job's run copies its partitions itself, one after another.
    """

    settings: Settings
    store: JobStore
    registry: OperationRegistry
    owner: str
    stop: threading.Event
    submit: Callable[[str, int], None] | None = None

    @property
    def parts(self) -> Collection[dict[str, Any]]:
        """The `jobpartitions` collection."""
        return self.store.db[PARTITIONS]

    @cached_property
    def leases(self) -> Leases:
        """The lease primitive on partition documents."""
        return partition_leases(self.parts)

    def retry(self) -> RetryPolicy:
        """The transient-failure policy for one run."""
        return RetryPolicy(
            budget=self.settings.retry_budget_seconds, stop=self.stop, on_retry=metrics.RETRIES.inc
        )

    def ensure_indexes(self) -> None:
        """Index partitions by job (they expire with their job: JobStore.finish)."""
        self.parts.create_index("jobId")
        self.parts.create_index("status")  # the recovery scan

    def stale(self) -> list[tuple[str, int]]:
        """Partitions to run: pending ones and those whose lease expired (handed back
        first), of jobs that are running."""
        pending, expired = self.leases.scan(self.settings.lease_seconds)
        found = list(pending)
        for doc in expired:
            before = self.leases.reap(doc["_id"], doc)
            if before is not None:
                found.append(doc)
                if before.get("owner"):  # its run died holding it
                    self.leases.count_death(doc["_id"], before)
        out, running = [], {}
        for doc in found:
            job_id, index = str(doc["_id"]).rsplit(":", 1)
            if job_id not in running:
                job = self.store.jobs.find_one({"jobId": job_id}, {"status": 1})
                running[job_id] = job is not None and job.get("status") == "in_progress"
            if running[job_id]:
                out.append((job_id, int(index)))
        return out[:200]

    # -- the job's run: plan, dispatch or run inline ------------------------------------------

    @property
    def plans(self) -> bool:
        """Whether new full copies are split (only where an executor runs partitions)."""
        return self.submit is not None

    def start(
        self, status: JobStatus, owner: str, lake: Lake, total: int, checkpoint: Checkpoint
    ) -> bool:
        """Plan the job's partitions and dispatch them; False when one partition is enough.

        `checkpoint` carries the watermark the copy reaches (`until`), saved at completion.
        """
        counts = lake.file_row_counts()
        ranges = plan(counts, self.settings.partition_rows)
        if len(ranges) < 2:
            return False
        policy = self.retry()
        now = _now_ms()
        docs = [
            {
                "_id": f"{status.jobId}:{i}",
                "jobId": status.jobId,
                "index": i,
                "fileStart": a,
                "fileStop": b,
                "rows": sum(counts[a:b]),
                "files": [lake.file_name(f) for f in range(a, b)],
                "status": JobState.PENDING.value,
                "leaseBeat": 0,
                "attempt": 0,
                "createdAt": status.startTime,
                **{k: 0 for k in COUNTERS},
            }
            for i, (a, b) in enumerate(ranges)
        ]

        def insert() -> None:
            with contextlib.suppress(BulkWriteError):  # planned by a run (or try) before
                self.parts.insert_many(docs, ordered=False)

        policy.call(insert, "planning the partitions")
        options = {**status.options, "mode": "full"}
        options |= lake.pins()
        policy.call(
            lambda: self.store.update_run(
                status.jobId,
                owner,
                totalRecords=total,
                partitions=len(ranges),
                partitionsDone=0,
                partitionedAtMs=now,
                checkpoint=checkpoint.model_dump(),
                options=options,
                message=f"Copying {total:,} records in {len(ranges)} partitions",
            ),
            "recording the partitions",
        )
        self.dispatch(status.jobId, owner)
        return True

    def _unfinished(self, job_id: str, policy: RetryPolicy) -> list[int]:
        """Reopen failed or cancelled partitions (the job was resumed); the unfinished ones."""

        def reopen() -> list[int]:
            self.parts.update_many(
                {
                    "jobId": job_id,
                    "status": {"$in": [JobState.FAILED.value, JobState.CANCELLED.value]},
                },
                {  # a resumed job's runs may die again as many times
                    "$set": {"status": JobState.PENDING.value, "failures": 0},
                    "$unset": {"owner": "", "error": "", "queued": "", "failedAtRecord": ""},
                },
            )
            found = self.parts.find(
                {"jobId": job_id, "status": {"$in": list(ACTIVE_STATES)}}, {"index": 1}
            )
            return sorted(int(d["index"]) for d in found)

        return policy.call(reopen, "reading the partitions")

    def dispatch(self, job_id: str, owner: str) -> None:
        """Hand every unfinished partition to the executor and let go of the job document;
        complete the job if none is left (its last partition's run died before ending it)."""
        policy = self.retry()
        left = self._unfinished(job_id, policy)
        if not left:
            self._complete_if_done(job_id, owner, policy)
        assert self.submit is not None
        for index in left:
            self.submit(job_id, index)
        with contextlib.suppress(LeaseLost):
            policy.call(lambda: self.store.let_go(job_id, owner), "handing the job on")
        logger.info("job %s: %d partitions dispatched", job_id, len(left))

    def run_inline(
        self,
        job_id: str,
        owner: str,
        on_progress: Callable[[JobStatus], None] | None = None,
    ) -> Outcome:
        """Copy the job's unfinished partitions in this thread (no executor runs them)."""
        policy = self.retry()
        for index in self._unfinished(job_id, policy):
            outcome = Outcome.CONTINUE
            while outcome is Outcome.CONTINUE and not self.stop.is_set():
                outcome = self.run(job_id, index, on_progress)
            job = policy.call(lambda: self.store.get(job_id), "reading the job")
            if job.state.is_final:
                return Outcome.ENDED
            if self.stop.is_set():
                text = (
                    f"Paused at record {job.processedRecords:,} (lakesync stopped); "
                    "resumes from its partitions' checkpoints"
                )
                policy.call(
                    partial(self.store.release, job_id, owner, text), "handing the job back"
                )
                return Outcome.CONTINUE
        job = self._complete_if_done(job_id, owner, policy)
        if not job.state.is_final:  # another process holds a partition: it ends the job
            with contextlib.suppress(LeaseLost):
                policy.call(lambda: self.store.let_go(job_id, owner), "handing the job on")
        return Outcome.ENDED

    def _complete_if_done(self, job_id: str, owner: str, policy: RetryPolicy) -> JobStatus:
        job = policy.call(lambda: self.store.get(job_id), "reading the job")
        job = policy.call(partial(self._aggregate, job), "updating the job's progress")
        if not job.state.is_final and job.partitionsDone == job.partitions:
            self._end_job(job, JobState.COMPLETED, policy, owner)
        return job

    def hand_back(self, job_id: str) -> None:
        """After this process stopped its partitions of the job: if none runs anywhere, the
        job goes back to pending, and the next start dispatches them again at once."""
        if self.parts.count_documents({"jobId": job_id, "status": JobState.IN_PROGRESS.value}):
            return  # another process runs some: the job stays with them
        done = self.parts.count_documents({"jobId": job_id, "status": JobState.COMPLETED.value})
        total = self.parts.count_documents({"jobId": job_id})
        if self.store.hand_back_unowned(
            job_id,
            f"Paused with {done} of {total} partitions done (lakesync stopped); "
            "resumes from the partitions' checkpoints",
        ):
            logger.info("job %s: handed back; the next start resumes it", job_id)

    # -- one partition ---------------------------------------------------------------------

    def run(
        self, job_id: str, index: int, on_progress: Callable[[JobStatus], None] | None = None
    ) -> Outcome:
        """Copy one partition from its checkpoint until it ends, yields or is taken over."""
        with job_context(job_id):
            owner = run_owner(self.owner)
            policy = self.retry()
            try:
                job = policy.call(lambda: self.store.get(job_id), "reading the job")
            except LakesyncError as e:
                logger.error("job %s partition %d cannot be run: %s", job_id, index + 1, e)
                return Outcome.NOT_CLAIMED
            if job.state.is_final:
                return Outcome.ENDED
            pid = f"{job_id}:{index}"
            try:
                alone = policy.call(
                    lambda: suspect(self.parts, {"_id": pid}), "reading a partition"
                )
            except LakesyncError as e:
                logger.error("job %s partition %d cannot be run: %s", job_id, index + 1, e)
                return Outcome.NOT_CLAIMED
            with (
                job_context(job_id, job.operation),
                Alone(alone),
            ):
                return self._run_part(job, index, owner, policy, on_progress)

    def _claim(self, pid: str, owner: str) -> dict[str, Any] | None:
        """Take a pending partition, or one whose run died (that death counts, as a job's
        does: ``Leases.count_death``)."""
        doc = self.leases.claim(pid, owner, {"$inc": {"attempt": 1}})
        if doc is not None:
            return doc
        update = {"$inc": {"attempt": 1, "failures": 1}}
        doc = self.leases.take_over(pid, owner, self.settings.lease_seconds, update)
        if doc is not None:
            doc = self.leases.count_death(pid, doc, owner) or doc
        return doc

    def _run_part(
        self,
        job: JobStatus,
        index: int,
        owner: str,
        policy: RetryPolicy,
        on_progress: Callable[[JobStatus], None] | None,
    ) -> Outcome:
        job_id, pid = job.jobId, f"{job.jobId}:{index}"
        try:
            part = policy.call(partial(self._claim, pid, owner), "claiming a partition")
            if part is None:
                return Outcome.NOT_CLAIMED
            # who ran it, for operators (a separate $push: nx-27017 ignores $addToSet)
            ran_by = {"$push": {"ranBy": self.owner}}
            policy.call(
                partial(self.parts.update_one, {"_id": pid}, ran_by),
                "recording the partition's runner",
            )
        except LakesyncError as e:
            logger.error("job %s partition %d cannot be claimed: %s", job_id, index + 1, e)
            return Outcome.NOT_CLAIMED
        where = (
            f"partition {index + 1} of {job.partitions} (files {part['fileStart'] + 1}"
            f"-{part['fileStop']})"
        )
        if int(part.get("failures", 0)) >= self.settings.max_attempts:  # its runs kept dying
            cp = part.get("checkpoint") or {}
            files = part.get("files") or []
            reading = cp.get("file") or (files[0] if files else where)
            reason = died_reason(
                int(part.get("attempt", 1)) - 1,
                int(part["failures"]),
                str(reading),
                int(part.get("processedRecords", 0)),
                self.settings.max_attempts,
            )
            return self._failed(job, index, owner, where, reason, policy)
        beat = Heartbeat(
            lambda: bool(self.leases.renew(pid, owner)) and False,
            self.settings.lease_seconds / 4,
            f"heartbeat-{pid}-{owner}",
        )
        metrics.run_started(job_id)
        try:
            with beat:
                return self._copy_partition(job, part, owner, policy, where, beat, on_progress)
        except LeaseLost as e:
            logger.warning("job %s %s: %s", job_id, where, e)
            return Outcome.NOT_CLAIMED
        except (TransientStoreError, TransientSourceError) as e:
            logger.error("job %s %s: %s; handed back", job_id, where, e)
            try:  # resumed from its checkpoint by a later run
                self.leases.release(pid, owner, {"$set": {"error": str(e)}})
            except Exception:
                logger.error(
                    "job %s %s: could not hand it back; its lease will expire", job_id, where
                )
            return Outcome.NOT_CLAIMED
        except LakesyncError as e:
            return self._failed(job, index, owner, where, str(e), policy)
        except Exception as e:
            logger.exception("job %s %s: unexpected error", job_id, where)
            return self._failed(job, index, owner, where, f"{type(e).__name__}: {e}", policy)
        finally:
            metrics.run_ended(job_id)

    def _failed(
        self, job: JobStatus, index: int, owner: str, where: str, error: str, policy: RetryPolicy
    ) -> Outcome:
        logger.error("job %s %s failed: %s", job.jobId, where, error)
        try:
            self._set_part(job.jobId, index, owner, JobState.FAILED, policy, error)
            self._fail_job(job, policy, f"{where.capitalize()} failed: {error}", owner)
        except LakesyncError as e:
            logger.error(
                "job %s: could not record the failure (%s); it stays resumable", job.jobId, e
            )
        return Outcome.ENDED

    def _copy_partition(
        self,
        job: JobStatus,
        part: dict[str, Any],
        owner: str,
        policy: RetryPolicy,
        where: str,
        beat: Heartbeat,
        on_progress: Callable[[JobStatus], None] | None,
    ) -> Outcome:
        job_id, index = job.jobId, int(part["index"])
        resolved = self.registry.resolve(job.operation, job.options, self.settings)
        # each file's size, rows and schema as the job's first run found them: no footers
        known = policy.call(lambda: load_listing(self.store.db, job_id), "reading the plan")
        if part.get("files") is not None:  # the files it was planned with, whatever changed
            files, first_file = part["files"], int(part["fileStart"])
            lake = resolved.open_lake(self.settings, files, first_file, known)
            first, stop = 0, None
        else:  # planned before partitions recorded their files: a range of the file list
            lake = resolved.open_lake(self.settings, known=known)
            first, stop = int(part["fileStart"]), int(part["fileStop"])
        superseded = policy.call(
            lambda: Superseded.load(self.store.db, job_id, lake.files), "reading the plan"
        )
        cp = Checkpoint.model_validate(part.get("checkpoint") or {"fileIndex": first})
        start = lake.resume_position(Position(cp.fileIndex, cp.row), cp.file)
        run = _PartitionRun(self, job, index, owner, policy, where, beat, on_progress)
        outcome, cp = copy_batches(
            run,
            self.store,
            resolved.op,
            job_id,
            lake,
            start,
            cp,
            batch_size=resolved.batch_size,
            policy=policy,
            stop_file=stop,
            superseded=superseded,
        )
        if outcome is not None:
            return outcome
        self._set_part(job_id, index, owner, JobState.COMPLETED, policy)
        job = policy.call(partial(self._aggregate, run.job), "updating the job's progress")
        if on_progress:
            on_progress(job)
        if not job.state.is_final and job.partitionsDone == job.partitions:
            self._end_job(job, JobState.COMPLETED, policy, owner)
        return Outcome.ENDED

    # -- documents ---------------------------------------------------------------------------

    def _commit(self, job_id: str, index: int, owner: str, delta: Counters, cp: Checkpoint) -> None:
        """Counters and checkpoint of a partition in one update, applied once per batch."""
        update = {"$inc": {k: getattr(delta, v) for k, v in COUNTERS.items()}}
        try:
            self.leases.commit(f"{job_id}:{index}", owner, cp.model_dump(), update)
        except LeaseLost:
            raise LeaseLost(f"partition {index + 1} of job {job_id} was taken over") from None

    def _aggregate(self, job: JobStatus) -> JobStatus:
        """Put the sums of the partitions into the job document (monotonic, so race-free).

        ``job`` is any recent status of the job: only what planning fixed is read from it
        (total, partitions, start), so no read of the job document is needed. Only the
        counters of the partitions are read, never their file lists.
        """
        job_id = job.jobId
        sums = {k: 0 for k in COUNTERS}
        done = attempt = 0
        fields = {**{k: 1 for k in COUNTERS}, "status": 1, "attempt": 1, "_id": 0}
        for doc in self.parts.find({"jobId": job_id}, fields):
            for k in COUNTERS:
                sums[k] += int(doc.get(k, 0))
            done += doc.get("status") == JobState.COMPLETED.value
            attempt = max(attempt, int(doc.get("attempt", 0)))  # runs of the most-retried part
        total = max(job.totalRecords, 1)
        elapsed = max((_now_ms() - (job.partitionedAtMs or _now_ms())) / 1000, 1e-3)
        rate = sums["processedRecords"] / elapsed
        progress = {
            "percentComplete": round(100.0 * sums["processedRecords"] / total, 2),
            "recordsPerSecond": round(rate, 1),
            "etaSeconds": round((total - sums["processedRecords"]) / rate, 1) if rate else None,
            "message": f"Copying: {sums['processedRecords']:,} of {job.totalRecords:,} records, "
            f"{done} of {job.partitions} partitions done",
        }
        maxes = {**sums, "partitionsDone": done, "attempt": attempt}
        return self.store.raise_totals(job_id, maxes, progress) or self.store.get(job_id)

    def _set_part(
        self,
        job_id: str,
        index: int,
        owner: str,
        state: JobState,
        policy: RetryPolicy,
        error: str | None = None,
    ) -> None:
        fields: dict[str, Any] = {}
        if error:
            fields["error"] = error
        pid = f"{job_id}:{index}"
        policy.call(
            partial(self.leases.settle, pid, owner, state.value, {"$set": fields}),
            f"recording partition {index + 1} {state.value}",
        )

    def _end_job(self, job: JobStatus, state: JobState, policy: RetryPolicy, owner: str) -> None:
        job = policy.call(partial(self._aggregate, job), "updating the job's progress")
        job_id = job.jobId
        text = summary(job)
        if state is JobState.CANCELLED:
            text = (
                f"Cancelled after {job.processedRecords:,} of {job.totalRecords:,} records; "
                + text[0].lower()
                + text[1:]
            )
        try:
            ended = policy.call(
                partial(self.store.finish, job_id, None, state, text, ender=owner), "ending the job"
            )
        except LeaseLost:  # another partition ended it first
            return
        reached = job.checkpoint.until if job.checkpoint else None
        if ended.state is JobState.COMPLETED and reached is not None:  # not if cancel came
            marks = WatermarkStore(self.store.db)
            try:
                policy.call(
                    lambda: marks.save(
                        job.operation,
                        str(job.options.get("source", "")),
                        reached,
                        job_id,
                        "full",
                        job.options.get("deltaVersion"),
                        job.options.get("icebergSnapshotId"),
                    ),
                    "recording the watermark",
                )
            except LakesyncError as e:
                logger.error(
                    "job %s: could not record the watermark (%s); the next "
                    "incremental copy reads from the previous one",
                    job_id,
                    e,
                )

    def _fail_job(self, job: JobStatus, policy: RetryPolicy, error: str, owner: str) -> None:
        policy.call(partial(self._aggregate, job), "updating the job's progress")
        with contextlib.suppress(LeaseLost):  # another partition ended it first
            policy.call(
                partial(
                    self.store.finish,
                    job.jobId,
                    None,
                    JobState.FAILED,
                    "Failed",
                    error,
                    ender=owner,
                ),
                "ending the job",
            )


@dataclass
class _PartitionRun:
    """The partition side of the batch loop: fence, commit, progress, stop."""

    jobs: PartitionedJobs
    job: JobStatus
    index: int
    owner: str
    policy: RetryPolicy
    where_: str
    beat: Heartbeat
    on_progress: Callable[[JobStatus], None] | None
    started: float = field(default_factory=time.monotonic)
    where: str = field(init=False)
    log_extra: dict[str, Any] = field(init=False)

    def __post_init__(self) -> None:
        self.where = f" of {self.where_}"
        self.log_extra = {"partition": self.index}

    def fence(self) -> None:
        if self.beat.lost:
            raise LeaseLost(f"{self.where_} of job {self.job.jobId} was taken over")
        self.jobs.leases.check(f"{self.job.jobId}:{self.index}", self.owner)

    def written(self, result: BatchResult, cp: Checkpoint) -> None:
        return None

    def commit(self, result: BatchResult, cp: Checkpoint) -> Outcome | None:
        jobs, job_id, policy = self.jobs, self.job.jobId, self.policy
        policy.call(
            partial(jobs._commit, job_id, self.index, self.owner, result.counts, cp),
            f"committing a batch{self.where}",
        )
        progressed()  # it is not the run that crashes its process at one spot
        job = self.job = policy.call(
            partial(jobs._aggregate, self.job), "updating the job's progress"
        )
        if self.on_progress:
            self.on_progress(job)
        if job.state.is_final or job.cancelRequested:
            jobs._set_part(job_id, self.index, self.owner, JobState.CANCELLED, policy)
            if job.cancelRequested and not job.state.is_final:
                jobs._end_job(job, JobState.CANCELLED, policy, self.owner)
            return Outcome.ENDED
        limit = jobs.settings.job_time_limit
        if jobs.stop.is_set() or time.monotonic() - self.started >= limit:
            policy.call(
                lambda: jobs.leases.release(f"{job_id}:{self.index}", self.owner),
                f"handing back{self.where}",
            )
            return Outcome.CONTINUE
        return None
