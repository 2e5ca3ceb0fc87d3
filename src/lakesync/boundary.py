"""The store boundary of the job path: every MongoDB call a run makes, retried and fenced.

Retrying is a property of the store, not of the call site. Each method of `Store` is one
unit that is safe to repeat after a lost reply; it runs under the retry policy (retry.py:
backoff with jitter within ``LAKESYNC_RETRY_BUDGET_SECONDS``) and names what it was doing
in the error a spent budget gives. The stages (plan.py, slices.py, finish.py) call these
as plain calls.

A `SliceLease` is the lease one run holds on its slice of a job: the job document for a
whole job, or one partition document. It fences data writes (`fence`), commits a batch's
counters and checkpoint only while it holds the lease (`commit`), hands the slice back,
and ends it. Fencing: before a write the run makes sure it still holds its lease, which is
a read of its own document, except within `FENCE_TRUST_SECONDS` of sending the last
commit that succeeded: no process may take a lease over before `MIN_LEASE_SECONDS` of
silence on the server's clock, twice as long, so the lease is still held and the read
would only cost a round trip per batch. In a copy that keeps up, only a run's first batch
reads; after a stall (a slow read of the lake, a retry, a paused process) the read is made.
So a run that lost its lease writes at most the one batch it had already started: it
writes exactly the records the new owner writes for the same positions, and its commit is
refused, so the counters never count it.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, TypeVar

import numpy as np
from pymongo.collection import Collection
from pymongo.errors import BulkWriteError

from lakesync import metrics, mirror, repeats
from lakesync.config import Settings
from lakesync.errors import JobError, LakesyncError, LeaseLost
from lakesync.jobstore import JobStore
from lakesync.lake import Lake, Listing
from lakesync.lease import FENCE_TRUST_SECONDS, Heartbeat, Leases, progressed, suspect
from lakesync.models import ACTIVE_STATES, PARTITIONS, Checkpoint, Counters, JobState, JobStatus
from lakesync.retry import RetryPolicy
from lakesync.watermarks import WatermarkStore

if TYPE_CHECKING:
    import pyarrow.compute as pc

    from lakesync.copy import BatchResult, CopyEngine
    from lakesync.lake import LakeBatch
    from lakesync.models import Watermark
    from lakesync.schema import RecordSchema

logger = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")
S = TypeVar("S", bound="Store")

#: a partition document's counters and the job document's fields they add up to
#: a job's end as failed that could not be written: job -> (message, error), recorded by
#: this process's next run of the job (SliceLease.fail)
Unrecorded = dict[str, tuple[str, str]]

COUNTERS = {
    "processedRecords": "processed",
    "insertedRecords": "inserted",
    "updatedRecords": "updated",
    "unchangedRecords": "unchanged",
    "duplicateRecords": "duplicates",
    "errorRecords": "errors",
}


def retried(
    what: str | Callable[..., str],
) -> Callable[[Callable[Concatenate[S, P], T]], Callable[Concatenate[S, P], T]]:
    """Run the method under the store's retry policy; `what` names it in errors (a text,
    or a function of the method's arguments)."""

    def wrap(method: Callable[Concatenate[S, P], T]) -> Callable[Concatenate[S, P], T]:
        def call(self: S, /, *args: P.args, **kwargs: P.kwargs) -> T:
            text = what if isinstance(what, str) else what(*args, **kwargs)
            return self.policy.call(lambda: method(self, *args, **kwargs), text)

        return functools.update_wrapper(call, method)

    return wrap


def _named(pid: str) -> str:
    """A partition as people count it in messages ("partition 3"), from its `_id`: the
    job's own log leaves the job's id out, and indexes count from 0."""
    return f"partition {int(pid.rsplit(':', 1)[1]) + 1}"


def now_ms() -> int:
    return int(time.time() * 1000)


def partition_leases(coll: Collection[dict[str, Any]]) -> Leases:
    """The lease primitive on partition documents (`_id` = "jobId:index")."""
    return Leases(coll, "_id")


@dataclass
class Store:
    """The job path's MongoDB: job and partition documents, plans, watermarks, key sets."""

    settings: Settings
    jobs: JobStore
    stop: threading.Event

    @functools.cached_property
    def policy(self) -> RetryPolicy:
        """The transient-failure policy of every call below."""
        return RetryPolicy(
            budget=self.settings.retry_budget_seconds, stop=self.stop, on_retry=metrics.RETRIES.inc
        )

    @property
    def parts(self) -> Collection[dict[str, Any]]:
        """The `jobpartitions` collection."""
        return self.jobs.db[PARTITIONS]

    @functools.cached_property
    def part_leases(self) -> Leases:
        """The lease primitive on partition documents."""
        return partition_leases(self.parts)

    @functools.cached_property
    def watermarks(self) -> WatermarkStore:
        """The operations' watermarks (`syncstate`)."""
        return WatermarkStore(self.jobs.db)

    # -- the job document ---------------------------------------------------------------

    @retried("reading a job")
    def job_suspect(self, job_id: str) -> bool:
        return suspect(self.jobs.jobs, {"jobId": job_id})

    @retried("claiming a job")
    def claim(self, job_id: str, owner: str) -> JobStatus | None:
        return self.jobs.claim(job_id, owner, self.settings.lease_seconds)

    @retried("reading the job")
    def get(self, job_id: str) -> JobStatus:
        return self.jobs.get(job_id)

    @retried("recording the job's run")
    def update_run(self, job_id: str, owner: str, /, **fields: Any) -> JobStatus:
        return self.jobs.update_run(job_id, owner, **fields)

    @retried(lambda job_id, owner, delta, cp, derived: f"committing batch {cp.batches}")
    def commit(
        self, job_id: str, owner: str, delta: Counters, cp: Checkpoint, derived: dict[str, Any]
    ) -> JobStatus:
        return self.jobs.commit(job_id, owner, delta, cp, derived)

    @retried("handing the job back")
    def release(self, job_id: str, owner: str, message: str, failure: bool = False) -> JobStatus:
        return self.jobs.release(job_id, owner, message, failure=failure)

    @retried("handing the job on")
    def let_go(self, job_id: str, owner: str) -> None:
        self.jobs.let_go(job_id, owner)

    @retried("ending the job")
    def finish(
        self,
        job_id: str,
        owner: str | None,
        state: JobState,
        message: str,
        error: str | None = None,
        ender: str | None = None,
    ) -> JobStatus:
        return self.jobs.finish(job_id, owner, state, message, error, ender)

    @retried("checking the lease")
    def check_job(self, job_id: str, owner: str) -> None:
        self.jobs.leases.check(job_id, owner)

    # -- partition documents ------------------------------------------------------------

    @retried("reading a partition")
    def part_suspect(self, pid: str) -> bool:
        return suspect(self.parts, {"_id": pid})

    @retried("claiming a partition")
    def claim_part(self, pid: str, owner: str) -> dict[str, Any] | None:
        """Take a pending partition, or one whose run died (that death counts, as a job's
        does: ``Leases.count_death``)."""
        leases = self.part_leases
        doc = leases.claim(pid, owner, {"$inc": {"attempt": 1}})
        if doc is None:
            update = {"$inc": {"attempt": 1, "failures": 1}}
            doc = leases.take_over(pid, owner, self.settings.lease_seconds, update)
            if doc is not None:
                doc = leases.count_death(pid, doc, owner) or doc
        return doc

    @retried("recording the partition's runner")
    def ran_by(self, pid: str, process: str) -> None:
        """Who ran it, for operators (a separate $push: nx-27017 ignores $addToSet)."""
        self.parts.update_one({"_id": pid}, {"$push": {"ranBy": process}})

    @retried("planning the partitions")
    def insert_parts(self, docs: list[dict[str, Any]]) -> None:
        with contextlib.suppress(BulkWriteError):  # planned by a run (or try) before
            self.parts.insert_many(docs, ordered=False)

    @retried("reading the partitions")
    def unfinished(self, job_id: str) -> list[int]:
        """Reopen failed or cancelled partitions (the job was resumed); the unfinished ones."""
        self.parts.update_many(
            {"jobId": job_id, "status": {"$in": [JobState.FAILED.value, JobState.CANCELLED.value]}},
            {  # a resumed job's runs may die again as many times
                "$set": {"status": JobState.PENDING.value, "failures": 0},
                "$unset": {"owner": "", "error": "", "queued": "", "failedAtRecord": ""},
            },
        )
        found = self.parts.find(
            {"jobId": job_id, "status": {"$in": list(ACTIVE_STATES)}}, {"index": 1}
        )
        return sorted(int(d["index"]) for d in found)

    @retried(lambda job_id, index, owner, delta, cp, where: f"committing a batch{where}")
    def commit_part(
        self, job_id: str, index: int, owner: str, delta: Counters, cp: Checkpoint, where: str
    ) -> None:
        """Counters and checkpoint of a partition in one update, applied once per batch."""
        update = {"$inc": {k: getattr(delta, v) for k, v in COUNTERS.items()}}
        try:
            self.part_leases.commit(f"{job_id}:{index}", owner, cp.model_dump(), update)
        except LeaseLost:
            raise LeaseLost(f"partition {index + 1} of job {job_id} was taken over") from None

    @retried("updating the job's progress")
    def aggregate(self, job: JobStatus) -> JobStatus:
        """Put the sums of the partitions into the job document (monotonic, so race-free).

        ``job`` is any recent status of the job: only what planning fixed is read from it
        (total, partitions, start), so no read of the job document is needed. Only the
        counters of the partitions are read, never their file lists.
        """
        sums = {k: 0 for k in COUNTERS}
        done = attempt = 0
        fields = {**{k: 1 for k in COUNTERS}, "status": 1, "attempt": 1, "_id": 0}
        for doc in self.parts.find({"jobId": job.jobId}, fields):
            for k in COUNTERS:
                sums[k] += int(doc.get(k, 0))
            done += doc.get("status") == JobState.COMPLETED.value
            attempt = max(attempt, int(doc.get("attempt", 0)))  # runs of the most-retried part
        total = max(job.totalRecords, 1)
        elapsed = max((now_ms() - (job.partitionedAtMs or now_ms())) / 1000, 1e-3)
        rate = sums["processedRecords"] / elapsed
        progress = {
            "percentComplete": round(100.0 * sums["processedRecords"] / total, 2),
            "recordsPerSecond": round(rate, 1),
            "etaSeconds": round((total - sums["processedRecords"]) / rate, 1) if rate else None,
            "message": f"Copying: {sums['processedRecords']:,} of {job.totalRecords:,} records, "
            f"{done} of {job.partitions} partitions done",
        }
        maxes = {**sums, "partitionsDone": done, "attempt": attempt}
        return self.jobs.raise_totals(job.jobId, maxes, progress) or self.jobs.get(job.jobId)

    @retried(lambda pid, owner, state, error=None: f"recording {_named(pid)} {state.value}")
    def settle_part(self, pid: str, owner: str, state: JobState, error: str | None = None) -> None:
        fields = {"error": error} if error else {}
        self.part_leases.settle(pid, owner, state.value, {"$set": fields})

    @retried(lambda pid, owner, where: f"handing back {where}")
    def release_part(self, pid: str, owner: str, where: str) -> None:
        self.part_leases.release(pid, owner)

    @retried("checking the lease")
    def check_part(self, pid: str, owner: str) -> None:
        self.part_leases.check(pid, owner)

    # -- the plan, watermarks, mirror key sets, data ------------------------------------

    @retried("reading the plan")
    def load_listing(self, job_id: str) -> Listing | None:
        return repeats.load_listing(self.jobs.db, job_id)

    @retried("keeping the lake's listing")
    def save_listing(self, job_id: str, listing: Listing | None) -> None:
        repeats.save_listing(self.jobs.db, job_id, listing)

    @retried("planning repeated keys")
    def plan_repeats(
        self,
        job_id: str,
        lake: Lake,
        schema: RecordSchema,
        planned: pc.Expression | None,
        by: list[str],
        collection: str,
        spill: Path,
    ) -> None:
        repeats.plan_job(self.jobs.db, job_id, lake, schema, planned, by, collection, spill)

    @retried("reading the plan")
    def order_warning(self, job_id: str) -> str | None:
        return repeats.order_warning(self.jobs.db, job_id)

    @retried("reading the plan")
    def superseded(self, job_id: str, files: list[str] | None = None) -> repeats.Superseded:
        """The job's plan for ``files``: each file's superseded rows are read when the copy
        reaches the file, a window of files at a time (``superseded_rows``, under the same
        retry policy)."""

        def fetch(files: list[str]) -> dict[str, np.ndarray]:
            return self.superseded_rows(job_id, files)

        return repeats.Superseded.load(self.jobs.db, job_id, files, fetch)

    @retried("reading the plan")
    def superseded_rows(self, job_id: str, files: list[str]) -> dict[str, np.ndarray]:
        return repeats.rows_of(self.jobs.db, job_id, files)

    @retried("reading the watermark")
    def watermark(self, operation: str, source: str, column: str) -> Watermark | None:
        return self.watermarks.get(operation, source, column)

    @retried("reading the watermark")
    def watermark_versions(
        self, operation: str, source: str, column: str
    ) -> tuple[int | None, int | None, int | None]:
        return self.watermarks.read_versions(operation, source, column)

    @retried("recording the watermark")
    def save_watermark(
        self, operation: str, source: str, reached: Watermark, job_id: str, mode: str,
        pins: dict[str, int],
    ) -> None:  # fmt: skip
        self.watermarks.save(
            operation,
            source,
            reached,
            job_id,
            mode,
            pins.get("deltaVersion"),
            pins.get("icebergSnapshotId"),
        )

    @retried("sweeping key sets")
    def sweep_key_sets(self) -> None:
        mirror.sweep(self.jobs.db, self.jobs.jobs)

    @retried("dropping the key set")
    def drop_key_set(self, job_id: str) -> None:
        mirror.drop_seen(self.jobs.db, job_id)

    @retried("starting the mirror's key set")
    def begin_keys(self, seen: mirror.MirrorSet) -> None:
        seen.begin()

    @retried(lambda seen, keys, batch: f"recording keys of {batch}")
    def add_keys(self, seen: mirror.MirrorSet, keys: list[Any], batch: int) -> None:
        seen.add(keys)

    @retried("checking the mirror's keys")
    def keys_intact(self, seen: mirror.MirrorSet) -> bool:
        return seen.intact()

    @retried("comparing ids")
    def missing_page(self, seen: mirror.MirrorSet, after: Any) -> tuple[Any, list[Any]] | None:
        return seen.next_page(after)

    @retried("deleting records")
    def delete(self, seen: mirror.MirrorSet, ids: list[Any]) -> int:
        return seen.delete(ids)

    @retried(lambda engine, batch, what: what)
    def write(self, engine: CopyEngine, batch: LakeBatch, what: str) -> BatchResult:
        return engine.write(batch)


# -- the lease on one slice -------------------------------------------------------------


@dataclass
class SliceLease:
    """The lease one run holds on its slice of a job: the job document (a whole job) or
    one partition document (``index``). Everything the run stage and the finish stage do to
    their documents goes through it."""

    store: Store
    job_id: str
    owner: str
    #: the partition's index; None: the whole job
    index: int | None = None
    #: e.g. "partition 3 of 8 (files 5-7)"; "" for a whole job
    where: str = ""
    beat: Heartbeat | None = None
    #: the job's counters are its partitions' sums (any run of a partitioned job)
    partitioned: bool = False
    _held_at: float = field(default=-math.inf, init=False)

    def __post_init__(self) -> None:
        self.partitioned = self.partitioned or self.index is not None

    @property
    def pid(self) -> str:
        return f"{self.job_id}:{self.index}"

    @property
    def of_where(self) -> str:
        """For messages: "" or " of partition 3 of 8 (files 5-7)"."""
        return f" of {self.where}" if self.where else ""

    def heartbeat(self) -> Heartbeat:
        """The run's heartbeat thread: renews the lease, notices cancel requests."""
        jobs, job_id, owner = self.store.jobs, self.job_id, self.owner
        if self.index is None:

            def renew() -> bool:
                return jobs.heartbeat(job_id, owner).cancelRequested

            name = f"heartbeat-{job_id}-{owner}"
        else:
            pid, leases = self.pid, self.store.part_leases

            def renew() -> bool:
                return bool(leases.renew(pid, owner)) and False

            name = f"heartbeat-{pid}-{owner}"
        self.beat = Heartbeat(renew, self.settings.lease_seconds / 4, name)
        return self.beat

    @property
    def settings(self) -> Settings:
        return self.store.settings

    @property
    def cancel_seen(self) -> bool:
        return self.beat is not None and self.beat.cancel_seen

    def fence(self) -> None:
        """LeaseLost unless this run still holds its lease (read before a data write, but
        not within FENCE_TRUST_SECONDS of the last commit that proved it)."""
        if time.monotonic() - self._held_at < FENCE_TRUST_SECONDS:
            return
        if self.beat is not None and self.beat.lost:
            if self.index is None:
                raise LeaseLost(f"Job {self.job_id} is no longer owned by {self.owner}.")
            raise LeaseLost(f"{self.where} of job {self.job_id} was taken over")
        if self.index is None:
            self.store.check_job(self.job_id, self.owner)
        else:
            self.store.check_part(self.pid, self.owner)

    def commit(
        self, status: JobStatus, delta: Counters, cp: Checkpoint, derived: dict[str, Any]
    ) -> JobStatus:
        """Commit a batch's counters and checkpoint (LeaseLost unless the lease is still
        held); the job's status after it."""
        sent = time.monotonic()
        if self.index is None:
            status = self.store.commit(self.job_id, self.owner, delta, cp, derived)
        else:
            self.store.commit_part(self.job_id, self.index, self.owner, delta, cp, self.of_where)
        self._held_at = sent
        progressed()  # it is not the run that crashes its process at one spot
        return status if self.index is None else self.store.aggregate(status)

    def hand_back(self, message: str) -> None:
        """Let another run continue the slice from its checkpoint (stop, time limit)."""
        if self.index is None:
            self.store.release(self.job_id, self.owner, message)
        else:
            self.store.release_part(self.pid, self.owner, self.where)

    def hand_back_failed(self, error: Exception, lake: bool) -> None:
        """MongoDB or the lake unavailable past the retry budget: hand the slice back,
        resumed from its checkpoint, up to LAKESYNC_MAX_ATTEMPTS runs (never raises)."""
        text = str(error)
        if lake:  # the lake's text (a preview's too) says what is out of reach; a job's says
            text += " The job's last checkpoint is kept: it resumes from there."  # what follows
        try:
            if self.index is not None:
                self.store.part_leases.release(self.pid, self.owner, {"$set": {"error": text}})
            elif lake:  # S3 unreachable or throttling: the error is shown if it gives up
                self.store.update_run(self.job_id, self.owner, error=text)
                self.store.release(self.job_id, self.owner, f"Lake unavailable: {text}", True)
            else:
                message = f"MongoDB unavailable: {text}"
                self.store.jobs.release(self.job_id, self.owner, message, failure=True)
        except Exception:
            logger.error(
                "job %s%s: could not hand it back; its lease will expire",
                self.job_id,
                f" {self.where}" if self.where else "",
            )

    def end(
        self, status: JobStatus, state: JobState, message: str, error: str | None = None
    ) -> JobStatus | None:
        """End the job (the last slice, or a failure or cancel in any); None if another
        slice's run ended it first."""
        if not self.partitioned:
            done = self.store.finish(self.job_id, self.owner, state, message, error)
            # a mirror's key set (a failed one may be resumed: it needs its keys)
            if state is not JobState.FAILED and status.options.get("mode") == "mirror":
                with contextlib.suppress(LakesyncError):  # swept later if this fails
                    self.store.drop_key_set(self.job_id)
            return done
        try:
            return self.store.finish(self.job_id, None, state, message, error, ender=self.owner)
        except LeaseLost:  # another partition ended it first
            return None

    def settle(self, state: JobState, error: str | None = None) -> None:
        """A partition's own end (completed, failed, cancelled); nothing for a whole job."""
        if self.index is not None:
            self.store.settle_part(self.pid, self.owner, state, error)

    def totals(self, status: JobStatus) -> JobStatus:
        """The job's counters once its slices are copied."""
        if self.partitioned:
            return self.store.aggregate(status)
        final = self.store.get(self.job_id)
        if final.processedRecords != final.totalRecords:
            logger.warning(
                "job %s: processed %d but counted %d at start (lake changed?)",
                self.job_id,
                final.processedRecords,
                final.totalRecords,
            )
            final = self.store.update_run(
                self.job_id, self.owner, totalRecords=final.processedRecords
            )
        return final

    def fail(
        self, status: JobStatus, error: str, unrecorded: Unrecorded, message: str = "Failed"
    ) -> None:
        """End the slice and its job as failed (with `message`: "Gave up" when its runs kept
        dying); a failure that cannot be written is kept in `unrecorded`, recorded when this
        process next claims the job (never raises)."""
        if self.index is None:
            logger.error("job %s failed: %s", self.job_id, error)
        else:
            logger.error("job %s %s failed: %s", self.job_id, self.where, error)
        try:
            if self.index is None:
                self.end(status, JobState.FAILED, message, error)
                return
            self.settle(JobState.FAILED, error)
            self.store.aggregate(status)
            self.end(status, JobState.FAILED, message, f"{self.where.capitalize()} failed: {error}")
        except (LakesyncError, JobError) as e:
            logger.error(
                "job %s: could not record its end (%s); it stays resumable", status.jobId, e
            )
            if self.index is None:
                unrecorded[self.job_id] = (message, error)
