"""Partitioned copies: one job split into file ranges that workers copy in parallel.

The job's first run plans the partitions (`jobpartitions`, one document each) and hands
them to the executor. Each partition is claimed, checkpointed and counted on its own,
exactly like a whole job (an atomic conditional update per batch). The job document then
takes the sums of its partitions with `$max`: counters only grow, so a slow writer with
older sums can never move them back, and a replayed update changes nothing. The
partition that finds all others done completes the job; a partition that fails fails
the job, naming itself.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from pymongo import ReturnDocument
from pymongo.collection import Collection
from pymongo.errors import BulkWriteError

from lakesync import metrics
from lakesync.config import Settings
from lakesync.copy import CopyEngine
from lakesync.errors import LakesyncError, LeaseLost
from lakesync.lake import Lake, Position
from lakesync.logs import job_context
from lakesync.models import ACTIVE_STATES, Checkpoint, Counters, JobState, JobStatus
from lakesync.operations import OperationRegistry
from lakesync.repeats import Superseded
from lakesync.retry import RetryPolicy
from lakesync.runner import Outcome, summary
from lakesync.store import JobStore
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


@dataclass
class PartitionedJobs:
    """Plans, runs and aggregates the partitions of jobs."""

    settings: Settings
    store: JobStore
    registry: OperationRegistry
    owner: str
    stop: threading.Event
    submit: Callable[[str, int], None]

    @property
    def parts(self) -> Collection[dict[str, Any]]:
        """The `jobpartitions` collection."""
        return self.store.db["jobpartitions"]

    def ensure_indexes(self) -> None:
        """Index partitions by job; they expire with the job statuses."""
        self.parts.create_index("jobId")
        self.parts.create_index(
            "createdAt", expireAfterSeconds=int(self.settings.status_ttl_days * 86400)
        )

    def stale(self) -> list[tuple[str, int]]:
        """Partitions whose run died (lease expired) or that wait with nobody running them."""
        now = _now_ms()
        query = {"$or": [
            {"status": JobState.IN_PROGRESS.value,
             "heartbeatMs": {"$lt": now - int(self.settings.lease_seconds * 1000)}},
            {"status": JobState.PENDING.value,
             "heartbeatMs": {"$lt": now - int(self.settings.lease_seconds * 1000)}},
        ]}  # fmt: skip
        out = []
        for doc in self.parts.find(query, {"jobId": 1, "index": 1}).limit(200):
            job = self.store.jobs.find_one({"jobId": doc["jobId"]}, {"status": 1})
            if job is not None and job.get("status") == JobState.IN_PROGRESS.value:
                out.append((str(doc["jobId"]), int(doc["index"])))
        return out

    # -- the job's run: plan or re-dispatch --------------------------------------------------

    def start(
        self, status: JobStatus, owner: str, lake: Lake, total: int, checkpoint: Checkpoint
    ) -> bool:
        """Plan the job's partitions and dispatch them; False when one partition is enough.

        `checkpoint` carries the watermark the copy reaches (`until`), saved at completion.
        """
        ranges = plan(lake.file_row_counts(), self.settings.partition_rows)
        if len(ranges) < 2:
            return False
        counts = lake.file_row_counts()
        now = _now_ms()
        docs = [
            {"_id": f"{status.jobId}:{i}", "jobId": status.jobId, "index": i,
             "fileStart": a, "fileStop": b, "rows": sum(counts[a:b]),
             "files": [lake.file_name(f) for f in range(a, b)],
             "status": JobState.PENDING.value, "heartbeatMs": now, "attempt": 0,
             "createdAt": status.startTime, **{k: 0 for k in COUNTERS}}
            for i, (a, b) in enumerate(ranges)
        ]  # fmt: skip
        with contextlib.suppress(BulkWriteError):  # planned by a run that died before recording
            self.parts.insert_many(docs, ordered=False)
        options = {**status.options, "mode": "full"}
        if lake.version is not None:
            options["deltaVersion"] = lake.version
        self.store.update_run(
            status.jobId, owner, totalRecords=total, partitions=len(ranges), partitionsDone=0,
            partitionedAtMs=now, checkpoint=checkpoint.model_dump(), options=options,
            message=f"Copying {total:,} records in {len(ranges)} partitions",
        )  # fmt: skip
        self.dispatch(status.jobId, owner)
        return True

    def dispatch(self, job_id: str, owner: str) -> None:
        """Hand every unfinished partition to the executor and let go of the job document.

        The job runs again, so if some partitions failed or were stopped by that failure,
        it was resumed (`lakesync resume`): they continue from their checkpoints.
        """
        self.parts.update_many(
            {"jobId": job_id,
             "status": {"$in": [JobState.FAILED.value, JobState.CANCELLED.value]}},
            {"$set": {"status": JobState.PENDING.value, "heartbeatMs": _now_ms()},
             "$unset": {"owner": "", "error": ""}},
        )  # fmt: skip
        for doc in self.parts.find(
            {"jobId": job_id, "status": {"$in": list(ACTIVE_STATES)}}, {"index": 1}
        ):
            self.submit(job_id, int(doc["index"]))
        self.store.let_go(job_id, owner)
        logger.info("job %s: partitions dispatched", job_id)

    def hand_back(self, job_id: str) -> None:
        """After this process stopped its partitions of the job: if none runs anywhere, the
        job goes back to pending, and the next start dispatches them again at once."""
        if self.parts.count_documents({"jobId": job_id, "status": JobState.IN_PROGRESS.value}):
            return  # another process runs some: the job stays with them
        done = self.parts.count_documents({"jobId": job_id, "status": JobState.COMPLETED.value})
        total = self.parts.count_documents({"jobId": job_id})
        if self.store.hand_back_unowned(
            job_id, f"Paused with {done} of {total} partitions done (lakesync stopped); "
            "resumes from the partitions' checkpoints"
        ):  # fmt: skip
            logger.info("job %s: handed back; the next start resumes it", job_id)

    # -- one partition ---------------------------------------------------------------------

    def run(self, job_id: str, index: int) -> Outcome:
        """Copy one partition from its checkpoint until it ends, yields or is taken over."""
        with job_context(job_id):
            return self._run(job_id, index)

    def _run(self, job_id: str, index: int) -> Outcome:
        owner = f"{self.owner}:{threading.get_ident()}"
        policy = RetryPolicy(budget=self.settings.retry_budget_seconds, stop=self.stop,
                             on_retry=metrics.RETRIES.inc)  # fmt: skip
        job = policy.call(lambda: self.store.get(job_id), "reading the job")
        if job.state.is_final:
            return Outcome.ENDED
        with job_context(job_id, job.operation):  # every line of the run names both
            return self._run_part(job, index, owner, policy)

    def _run_part(self, job: JobStatus, index: int, owner: str, policy: RetryPolicy) -> Outcome:
        job_id = job.jobId
        part = policy.call(lambda: self._claim(job_id, index, owner), "claiming a partition")
        if part is None:
            return Outcome.NOT_CLAIMED
        # who ran it, for operators (a separate $push: nx-27017 ignores $addToSet)
        self.parts.update_one({"_id": part["_id"]}, {"$push": {"ranBy": self.owner}})
        where = f"partition {index + 1} of {job.partitions} (files {part['fileStart'] + 1}" \
                f"-{part['fileStop']})"  # fmt: skip
        metrics.run_started(job_id)
        try:
            return self._copy(job, part, owner, policy, where)
        except LeaseLost as e:
            logger.warning("job %s %s: %s", job_id, where, e)
            return Outcome.NOT_CLAIMED
        except LakesyncError as e:
            logger.error("job %s %s failed: %s", job_id, where, e)
            self._set_part(job_id, index, owner, JobState.FAILED, str(e))
            self._fail_job(job, f"{where.capitalize()} failed: {e}")
            return Outcome.ENDED
        except Exception as e:
            logger.exception("job %s %s: unexpected error", job_id, where)
            self._set_part(job_id, index, owner, JobState.FAILED, repr(e))
            self._fail_job(job, f"{where.capitalize()} failed: {type(e).__name__}: {e}")
            return Outcome.ENDED
        finally:
            metrics.run_ended(job_id)

    def _copy(
        self, job: JobStatus, part: dict[str, Any], owner: str, policy: RetryPolicy, where: str
    ) -> Outcome:
        job_id, index = job.jobId, int(part["index"])
        resolved = self.registry.resolve(job.operation, job.options, self.settings)
        op, batch_size = resolved.op, resolved.batch_size
        if part.get("files") is not None:  # the files it was planned with, whatever changed
            lake = resolved.open_lake(self.settings, part["files"], int(part["fileStart"]))
            first, stop = 0, None
        else:  # planned before partitions recorded their files: a range of the file list
            lake = resolved.open_lake(self.settings)
            first, stop = int(part["fileStart"]), int(part["fileStop"])
        superseded = policy.call(
            lambda: Superseded.load(self.store.db, job_id, lake.files), "reading the plan"
        )
        engine = CopyEngine(
            self.store.db[op.collection], self.store.copyerrors, op.schema_, job_id, superseded
        )
        cp = Checkpoint.model_validate(part.get("checkpoint") or {"fileIndex": first})
        start = lake.resume_position(Position(cp.fileIndex, cp.row), cp.file)
        started = time.monotonic()
        for batch in lake.batches(batch_size, start, stop_file=stop, prepare=engine.prepare):
            result = policy.call(partial(engine.write, batch), f"writing a batch of {where}")
            cp = Checkpoint(
                fileIndex=batch.end.file_index,
                row=batch.end.row,
                batches=cp.batches + 1,
                file=lake.file_name(batch.end.file_index),
            )
            policy.call(partial(self._commit, job_id, index, owner, result.counts, cp),
                        f"committing a batch of {where}")  # fmt: skip
            metrics.observe_batch(result.counts, result.write_seconds)
            logger.debug(
                "job %s %s batch %d: %s in %.3f s", job_id, where, cp.batches,
                result.counts.model_dump(), result.write_seconds,
                extra={"partition": index, "batch": cp.batches, **result.counts.model_dump(),
                       "seconds": round(result.write_seconds, 4)},
            )  # fmt: skip
            job = policy.call(partial(self._aggregate, job), "updating the job's progress")
            if job.state.is_final or job.cancelRequested:
                self._set_part(job_id, index, owner, JobState.CANCELLED)
                if job.cancelRequested and not job.state.is_final:
                    self._end_job(job, JobState.CANCELLED)
                return Outcome.ENDED
            if self.stop.is_set() or time.monotonic() - started >= self.settings.job_time_limit:
                self._release(job_id, index, owner)
                return Outcome.CONTINUE
        self._set_part(job_id, index, owner, JobState.COMPLETED)
        job = self._aggregate(job)
        if job.partitionsDone == job.partitions:
            self._end_job(job, JobState.COMPLETED)
        return Outcome.ENDED

    # -- documents ---------------------------------------------------------------------------

    def _claim(self, job_id: str, index: int, owner: str) -> dict[str, Any] | None:
        cutoff = _now_ms() - int(self.settings.lease_seconds * 1000)
        return self.parts.find_one_and_update(
            {"_id": f"{job_id}:{index}", "$or": [
                {"status": JobState.PENDING.value},
                {"status": JobState.IN_PROGRESS.value, "heartbeatMs": {"$lt": cutoff}}]},
            {"$set": {"status": JobState.IN_PROGRESS.value, "owner": owner,
                      "heartbeatMs": _now_ms()}, "$inc": {"attempt": 1}},
            return_document=ReturnDocument.AFTER,
        )  # fmt: skip

    def _commit(self, job_id: str, index: int, owner: str, delta: Counters, cp: Checkpoint) -> None:
        """Counters and checkpoint of a partition in one update, applied once per batch."""
        query: dict[str, Any] = {"_id": f"{job_id}:{index}", "owner": owner,
                                 "status": JobState.IN_PROGRESS.value}  # fmt: skip
        if cp.batches > 1:
            query["checkpoint.batches"] = cp.batches - 1
        else:
            query["checkpoint"] = None
        update = {"$inc": {k: getattr(delta, v) for k, v in COUNTERS.items()},
                  "$set": {"checkpoint": cp.model_dump(), "heartbeatMs": _now_ms()}}  # fmt: skip
        if self.parts.find_one_and_update(query, update) is None:
            current = self.parts.find_one({"_id": f"{job_id}:{index}", "owner": owner})
            if current is None or current.get("checkpoint") != cp.model_dump():
                raise LeaseLost(f"partition {index} of job {job_id} was taken over")

    def _aggregate(self, job: JobStatus) -> JobStatus:
        """Put the sums of the partitions into the job document (monotonic, so race-free).

        ``job`` is any recent status of the job: only what planning fixed is read from it
        (total, partitions, start), so no read of the job document is needed.
        """
        job_id = job.jobId
        sums = {k: 0 for k in COUNTERS}
        done = attempt = 0
        for doc in self.parts.find({"jobId": job_id}):
            for k in COUNTERS:
                sums[k] += int(doc.get(k, 0))
            done += doc.get("status") == JobState.COMPLETED.value
            attempt = max(attempt, int(doc.get("attempt", 0)))  # runs of the most-retried part
        total = max(job.totalRecords, 1)
        elapsed = max((_now_ms() - (job.partitionedAtMs or _now_ms())) / 1000, 1e-3)
        rate = sums["processedRecords"] / elapsed
        fields = {
            "percentComplete": round(100.0 * sums["processedRecords"] / total, 2),
            "recordsPerSecond": round(rate, 1),
            "etaSeconds": round((total - sums["processedRecords"]) / rate, 1) if rate else None,
            "message": f"Copying: {sums['processedRecords']:,} of {job.totalRecords:,} records, "
                       f"{done} of {job.partitions} partitions done",
            "heartbeatMs": _now_ms(),
        }  # fmt: skip
        maxes = {**sums, "partitionsDone": done, "attempt": attempt}
        return self.store.raise_totals(job_id, maxes, fields) or self.store.get(job_id)

    def _set_part(
        self, job_id: str, index: int, owner: str, state: JobState, error: str | None = None
    ) -> None:
        fields: dict[str, Any] = {"status": state.value}
        if error:
            fields["error"] = error
        self.parts.update_one({"_id": f"{job_id}:{index}", "owner": owner}, {"$set": fields})

    def _release(self, job_id: str, index: int, owner: str) -> None:
        self.parts.update_one(
            {"_id": f"{job_id}:{index}", "owner": owner},
            {"$set": {"status": JobState.PENDING.value, "heartbeatMs": _now_ms()},
             "$unset": {"owner": ""}},
        )  # fmt: skip

    def _end_job(self, job: JobStatus, state: JobState) -> None:
        job = self._aggregate(job)
        job_id = job.jobId
        text = summary(job)
        if state is JobState.CANCELLED:
            text = f"Cancelled after {job.processedRecords:,} of {job.totalRecords:,} records; " \
                   + text[0].lower() + text[1:]  # fmt: skip
        with contextlib.suppress(LeaseLost):  # another partition ended it first
            ended = self.store.finish(job_id, None, state, text)  # cancelled if cancel came
            reached = job.checkpoint.until if job.checkpoint else None
            if ended.state is JobState.COMPLETED and reached is not None:
                WatermarkStore(self.store.db).save(
                    job.operation,
                    str(job.options.get("source", "")),
                    reached,
                    job_id,
                    "full",
                    job.options.get("deltaVersion"),
                )

    def _fail_job(self, job: JobStatus, error: str) -> None:
        self._aggregate(job)
        with contextlib.suppress(LeaseLost):  # another partition ended it first
            self.store.finish(job.jobId, None, JobState.FAILED, "Failed", error)
