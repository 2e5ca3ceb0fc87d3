"""The store boundary of the job path: every MongoDB call a run makes, retried and fenced.

Retrying is a property of the store, not of the call site. Each method of `Store` is one
unit that is safe to repeat after a lost reply; it runs under the retry policy (retry.py:
backoff with jitter within ``LAKESYNC_RETRY_BUDGET_SECONDS``) and names what it was doing
in the error a spent budget gives. The stages (plan.py, slices.py, finish.py) call these
as plain calls.

The job path's documents are written here too: besides the job and partition documents,
the plan a job keeps for its runs (`jobplans`: the lake's listing, the superseded records
repeats.py finds, the order warning) and the operations' watermarks (`syncstate`), so
repeats.py and watermarks.py only compute, and never see a job.

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

import functools
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, TypeVar

import numpy as np
import pyarrow as pa
from bson.binary import Binary
from pydantic import BaseModel, ConfigDict, ValidationError
from pymongo import DESCENDING
from pymongo.collection import Collection
from pymongo.database import Database
from pymongo.errors import DuplicateKeyError

from lakesync import metrics, mirror
from lakesync.config import Settings
from lakesync.errors import JobError, LakesyncError, LeaseLost, StoreError
from lakesync.jobstore import JobStore
from lakesync.lake import Lake, Listing
from lakesync.lease import FENCE_TRUST_SECONDS, Heartbeat, Leases, progressed, suspect
from lakesync.locations import canonical_uri
from lakesync.models import (
    ACTIVE_STATES,
    PARTITIONS,
    PLANS,
    Checkpoint,
    Counters,
    JobState,
    JobStatus,
    Watermark,
    utcnow,
)
from lakesync.mongo import insert_new
from lakesync.repeats import Plan, Superseded, plan_lake
from lakesync.retry import RetryPolicy
from lakesync.schema import RecordSchema
from lakesync.typemap import MONGODB, server_limits

if TYPE_CHECKING:
    import pyarrow.compute as pc

    from lakesync.copy import BatchResult, CopyEngine
    from lakesync.lake import LakeBatch

logger = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")
S = TypeVar("S", bound="Store")

#: where a job stood: its processed records and committed batches
Progress = tuple[int, int]
#: a job's end as failed that could not be written: job -> (message, error, where the job
#: stood then, the failed run's attempt), recorded by this process's next run of the job
#: if the job has not progressed since and no other run claimed it meanwhile
#: (SliceLease.fail, JobRunner._ended_before)
Unrecorded = dict[str, tuple[str, str, Progress, int]]

#: a partition document's counters and the job document's fields they add up to
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


def housekeeping(
    what: str | Callable[..., str], later: str
) -> Callable[[Callable[Concatenate[S, P], None]], Callable[Concatenate[S, P], None]]:
    """``retried``, for work that is done again later (``later`` says when): past the retry
    budget its failure is logged, not raised, and the caller goes on."""

    def wrap(method: Callable[Concatenate[S, P], None]) -> Callable[Concatenate[S, P], None]:
        run = retried(what)(method)

        def call(self: S, /, *args: P.args, **kwargs: P.kwargs) -> None:
            try:
                run(self, *args, **kwargs)
            except StoreError as e:
                logger.warning("%s; %s", e, later)

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
        does: ``Leases.take_over``)."""
        leases = self.part_leases
        doc = leases.claim(pid, owner, {"$inc": {"attempt": 1}})
        if doc is None:  # the death counts in the takeover's own write
            update = {"$inc": {"attempt": 1}}
            doc = leases.take_over(pid, owner, self.settings.lease_seconds, update)
        return doc

    @retried("recording the partition's runner")
    def ran_by(self, pid: str, process: str) -> None:
        """Who ran it, for operators (a separate $push: nx-27017 ignores $addToSet)."""
        self.parts.update_one({"_id": pid}, {"$push": {"ranBy": process}})

    @retried("planning the partitions")
    def insert_parts(self, docs: list[dict[str, Any]]) -> None:
        insert_new(self.parts, docs)  # a partition planned by a run (or try) before is kept

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
        return load_listing(self.jobs.db, job_id)

    @retried("keeping the lake's listing")
    def save_listing(self, job_id: str, listing: Listing | None) -> None:
        save_listing(self.jobs.db, job_id, listing)

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
        plan_job(self.jobs.db, job_id, lake, schema, planned, by, collection, spill)

    @retried("reading the plan")
    def order_warning(self, job_id: str) -> str | None:
        return order_warning(self.jobs.db, job_id)

    @retried("reading the plan")
    def superseded(self, job_id: str, files: list[str] | None = None) -> Superseded:
        """The job's plan for ``files``: each file's superseded rows are read when the copy
        reaches the file, a window of files at a time (``superseded_rows``, under the same
        retry policy)."""

        def fetch(files: list[str]) -> dict[str, np.ndarray]:
            return self.superseded_rows(job_id, files)

        return load_superseded(self.jobs.db, job_id, files, fetch)

    @retried("reading the plan")
    def superseded_rows(self, job_id: str, files: list[str]) -> dict[str, np.ndarray]:
        return load_superseded_rows(self.jobs.db, job_id, files)

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

    @housekeeping("sweeping key sets", "the next mirror job sweeps them again")
    def sweep_key_sets(self) -> None:
        """Drop the key sets of mirror jobs that ended (a drop that failed left them)."""
        mirror.sweep(self.jobs.db, self.jobs.jobs)

    @housekeeping(
        lambda job_id: f"dropping job {job_id}'s key set", "the next mirror job sweeps it"
    )
    def drop_key_set(self, job_id: str) -> None:
        """Drop a mirror job's key set at its end (the job's end stands if this fails)."""
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


# -- jobplans: what the plan stage keeps for every run of the job ---------------------

#: superseded rows per document (4 bytes each: well under the 16 MB document limit)
_ROWS_PER_DOCUMENT = 1_000_000
_REFUSED_PER_DOCUMENT = 20_000  # rows and reasons (~250 bytes each)
_FILES_PER_DOCUMENT = 20_000  # a listing's entries: ~60 bytes each, ~1.2 MB per document
#: bytes of file names in one listing document, and of schemas in the first one (the two
#: together under the server's 16 MB limit)
_LISTING_NAMES_BYTES = 6 << 20
_LISTING_SCHEMA_BYTES = 6 << 20


#: bytes of plan documents in one insert
_INSERT_BYTES = 1 << 20


def ensure_plan_indexes(db: Database[dict[str, Any]]) -> None:
    """Plans are found by job (they expire with their job: JobStore.finish), and a copy
    reads a file's superseded rows when it reaches the file (``load_superseded_rows``)."""
    db[PLANS].create_index("jobId")
    db[PLANS].create_index([("jobId", 1), ("file", 1)])


def _rows_document(job_id: str, n: int, file: str, rows: np.ndarray, now: Any) -> dict[str, Any]:
    """Rows of a file, the ``n``-th part of the plan (zero-padded: the documents sort in
    lake order, as ``load_superseded`` reads them), and how many."""
    return {
        "_id": f"{job_id}:{n:06d}:{file}",
        "jobId": job_id,
        "file": file,
        "rows": Binary(rows.astype("<u4").tobytes()),
        "n": len(rows),
        "createdAt": now,
    }


def _refused_documents(
    job_id: str, refused: dict[str, list[tuple[int, str]]], now: Any
) -> Iterator[dict[str, Any]]:
    for file, pairs in refused.items():
        for n, at in enumerate(range(0, len(pairs), _REFUSED_PER_DOCUMENT)):
            part = pairs[at : at + _REFUSED_PER_DOCUMENT]
            yield {
                "_id": f"{job_id}:r{n}:{file}",
                "jobId": job_id,
                "file": file,
                "refused": Binary(np.array([r for r, _ in part], dtype="<u4").tobytes()),
                "reasons": [why for _, why in part],
                "createdAt": now,
            }


class _Inserts:
    """Plan documents inserted in batches of at most 100 documents or _INSERT_BYTES."""

    def __init__(self, coll: Collection[dict[str, Any]]) -> None:
        self._coll = coll
        self._batch: list[dict[str, Any]] = []
        self._bytes = 0

    def add(self, doc: dict[str, Any]) -> None:
        self._batch.append(doc)
        self._bytes += len(doc.get("rows", b"")) + len(doc.get("refused", b"")) + 200
        if len(self._batch) >= 100 or self._bytes >= _INSERT_BYTES:
            self.flush()

    def flush(self) -> None:
        if self._batch:
            self._coll.insert_many(self._batch, ordered=False)
        self._batch, self._bytes = [], 0


def save_plan(
    db: Database[dict[str, Any]],
    job_id: str,
    plan: Plan | dict[str, np.ndarray],
    replace: bool = True,
) -> int:
    """Store a job's plan: the superseded rows it holds and its refused rows; the count of
    superseded records stored. ``replace``: first remove any plan a dead run left
    half-written (``plan_job`` does that itself, before the superseded rows it stores as
    the plan finds them)."""
    if not isinstance(plan, Plan):
        plan = Plan(plan)
    coll = db[PLANS]
    if replace:
        coll.delete_many({"jobId": job_id})
    now = utcnow()
    inserts = _Inserts(coll)
    for file, rows in plan.superseded.items():
        for n, at in enumerate(range(0, len(rows), _ROWS_PER_DOCUMENT)):
            inserts.add(_rows_document(job_id, n, file, rows[at : at + _ROWS_PER_DOCUMENT], now))
    for doc in _refused_documents(job_id, plan.refused, now):
        inserts.add(doc)
    inserts.flush()
    return sum(len(r) for r in plan.superseded.values())


def plan_job(
    db: Database[dict[str, Any]],
    job_id: str,
    lake: Lake,
    schema: RecordSchema,
    filter: pc.Expression | None = None,
    filter_columns: Sequence[str] = (),
    collection: str | None = None,
    spill: Path | None = None,
) -> int:
    """Find and store the records a job skips as duplicates (and those it refuses because
    the server cannot tell their key from an earlier one); how many duplicates there are.
    ``spill``: the folder where a large plan waits (the data folder). Any plan a dead run
    left is removed first; the superseded rows are then stored file by file as the plan
    finds them (``plan_lake``'s ``store``), so a bounded part of them is held at once."""
    limits = MONGODB if collection is None else server_limits(db[collection])
    coll = db[PLANS]
    coll.delete_many({"jobId": job_id})
    inserts = _Inserts(coll)
    now = utcnow()
    stored: dict[str, int] = {}  # superseded records stored, by file

    def store(file: str, part: int, rows: np.ndarray) -> None:
        inserts.add(_rows_document(job_id, part, file, rows, now))
        stored[file] = stored.get(file, 0) + len(rows)

    plan = plan_lake(lake, schema, filter, filter_columns, limits, spill, store)
    inserts.flush()
    pa.default_memory_pool().release_unused()  # the plan's Arrow buffers, before the copy
    save_plan(db, job_id, plan, replace=False)  # the refused rows (the superseded: stored)
    count = sum(stored.values())
    warning = plan.warning()
    if warning is not None:  # the job's log keeps it; its final message says it (finish)
        logger.warning("job %s: %s", job_id, warning)
        doc = {"_id": f"{job_id}:order", "jobId": job_id, "order": warning, "createdAt": utcnow()}
        coll.insert_one(doc)  # (any a dead run left was removed above)
    if count:
        logger.info(
            "job %s: %d records are replaced by a later record of the same key in %d files",
            job_id,
            count,
            len(stored),
        )
    if plan.refused:
        logger.info(
            "job %s: %d records refused: %s cannot tell their key from an earlier record's",
            job_id,
            sum(len(r) for r in plan.refused.values()),
            limits.name,
        )
    return count


def order_warning(db: Database[dict[str, Any]], job_id: str) -> str | None:
    """The warning ``plan_job`` kept for the job's final message (None: there is none)."""
    doc = db[PLANS].find_one({"_id": f"{job_id}:order"})
    return None if doc is None else str(doc["order"])


def save_listing(db: Database[dict[str, Any]], job_id: str, listing: Listing | None) -> None:
    """Keep the lake's files as the job's first run found them (size, rows, schema), so that
    its partitions and resumed runs read no footer again; in documents of at most
    20,000 files (a lake of 100,000 files takes five, about 6 MB)."""
    coll = db[PLANS]
    coll.delete_many({"jobId": job_id, "listing": {"$exists": True}})
    if listing is None:
        return
    schemas = [Binary(s.serialize().to_pybytes()) for s in listing.schemas]
    if sum(len(s) for s in schemas) > _LISTING_SCHEMA_BYTES:
        # files that differ in their schemas' metadata (pandas writes its index range there)
        logger.info(
            "job %s: the lake's files have %d different schemas; not kept in the plan "
            "(partitions and resumed runs read the footers again)",
            job_id,
            len(schemas),
        )
        return
    now = utcnow()
    for n, chunk in enumerate(_chunks(list(listing.files))):
        doc: dict[str, Any] = {
            "_id": f"{job_id}:files:{n}",
            "jobId": job_id,
            "listing": n,
            "names": chunk,
            "facts": Binary(
                np.array([listing.files[name] for name in chunk], dtype="<i8").tobytes()
            ),
            "createdAt": now,
        }
        if n == 0:
            doc |= {"root": listing.root, "format": listing.format, "schemas": schemas}
        coll.insert_one(doc)


def _chunks(names: list[str]) -> Iterator[list[str]]:
    """``names`` in runs of at most _FILES_PER_DOCUMENT files and _LISTING_NAMES_BYTES of
    names (S3 keys may be 1,024 bytes long), so every listing document fits in 16 MB."""
    chunk: list[str] = []
    size = 0
    for name in names:
        if chunk and (len(chunk) >= _FILES_PER_DOCUMENT or size >= _LISTING_NAMES_BYTES):
            yield chunk
            chunk, size = [], 0
        chunk.append(name)
        size += len(name.encode()) + 8
    yield chunk


def load_listing(db: Database[dict[str, Any]], job_id: str) -> Listing | None:
    """The listing ``save_listing`` kept for the job (None if there is none)."""
    docs = list(db[PLANS].find({"jobId": job_id, "listing": {"$exists": True}}, sort=[("_id", 1)]))
    docs.sort(key=lambda d: int(d["listing"]))
    if not docs or docs[0]["listing"] != 0:
        return None
    head = docs[0]
    schemas = [pa.ipc.read_schema(pa.py_buffer(bytes(b))) for b in head["schemas"]]
    files: dict[str, tuple[int, int, int]] = {}
    for doc in docs:
        facts = np.frombuffer(bytes(doc["facts"]), dtype="<i8").reshape(-1, 3)
        for name, (size, rows, schema) in zip(doc["names"], facts.tolist(), strict=True):
            files[name] = (size, rows, schema)
    return Listing(str(head["root"]), str(head["format"]), schemas, files)


def load_superseded(
    db: Database[dict[str, Any]],
    job_id: str,
    files: Sequence[str] | None = None,
    fetch: Callable[[list[str]], dict[str, np.ndarray]] | None = None,
) -> Superseded:
    """The job's plan for ``files`` (all of the job's files when None): the refused rows,
    and the names of the files with superseded rows (in lake order, with their counts),
    whose rows ``fetch`` reads when the copy reaches them (``load_superseded_rows`` when
    None)."""
    query: dict[str, Any] = {"jobId": job_id, "file": {"$exists": True}}  # not the listing
    if files is not None:
        query["file"] = {"$in": list(files)}
    holding: dict[str, int | None] = {}
    refused: dict[str, list[tuple[int, str]]] = {}
    for doc in db[PLANS].find(query, {"rows": 0}, sort=[("_id", 1)]):
        file = str(doc["file"])
        if "refused" in doc:
            rows = np.frombuffer(bytes(doc["refused"]), dtype="<u4").tolist()
            refused.setdefault(file, []).extend(zip(rows, doc["reasons"], strict=True))
        else:  # (a plan stored before session 9 has no count: its files come alone)
            n = doc.get("n")
            was = holding.get(file, 0)
            holding[file] = None if n is None or was is None else was + int(n)
    if fetch is None:

        def fetch(files: list[str]) -> dict[str, np.ndarray]:
            return load_superseded_rows(db, job_id, files)

    refusals = {f: sorted(r) for f, r in refused.items()}
    return Superseded(refused=refusals, fetch=fetch, holding=holding)


def load_superseded_rows(
    db: Database[dict[str, Any]], job_id: str, files: list[str]
) -> dict[str, np.ndarray]:
    """The superseded rows of some files of a job's plan, sorted (uint32), by file name (a
    file without any is left out)."""
    query = {"jobId": job_id, "file": {"$in": files}, "rows": {"$exists": True}}
    parts: dict[str, list[np.ndarray]] = {}
    for doc in db[PLANS].find(query):
        parts.setdefault(str(doc["file"]), []).append(np.frombuffer(bytes(doc["rows"]), "<u4"))
    return {f: np.sort(np.concatenate(p)) for f, p in parts.items()}


# -- syncstate: how far each operation has read each source ---------------------------


class SyncState(BaseModel):
    """One `syncstate` document: an operation's watermark for one source."""

    model_config = ConfigDict(extra="ignore")

    operation: str
    source: str
    watermark: Watermark
    jobId: str | None = None
    mode: str | None = None
    updatedAtMs: int | None = None
    deltaVersion: int | None = None  # the Delta table version that copy read
    icebergSnapshotId: int | None = None  # the Iceberg snapshot that copy read


class WatermarkStore:
    """Reads and writes operations' watermarks (the `syncstate` collection)."""

    def __init__(self, db: Database[dict[str, Any]]) -> None:
        self.states: Collection[dict[str, Any]] = db["syncstate"]

    @staticmethod
    def _id(operation: str, source: str) -> str:
        return f"{operation}|{source}"

    def canonicalise(self) -> int:
        """Re-key watermarks stored under another spelling of their source (`/data/lake/`,
        `s3://b//p`: versions before sources were canonical) so that the next incremental
        copy, which looks them up canonically, finds them. Relative paths are left alone:
        they meant the writer's working directory, which this process may not share. Of two
        watermarks for one source, the later one stays. Returns how many moved."""
        moved = 0
        for doc in list(self.states.find({}, {"_id": 1, "operation": 1, "source": 1})):
            operation, source = doc.get("operation"), doc.get("source")
            if not isinstance(operation, str) or not isinstance(source, str):
                continue
            if not (source.startswith("/") or source.startswith("s3://")):
                continue
            try:
                canonical = canonical_uri(source)
            except Exception:  # a source no longer valid: left as it is
                continue
            if canonical == source:
                continue
            full = self.states.find_one({"_id": doc["_id"]})
            if full is None:
                continue
            full.update(_id=self._id(operation, canonical), source=canonical)
            try:
                self.states.insert_one(full)
            except DuplicateKeyError:  # both spellings hold one: keep the later
                kept = self.states.find_one({"_id": full["_id"]}) or {}
                if int(full.get("updatedAtMs") or 0) > int(kept.get("updatedAtMs") or 0):
                    self.states.replace_one({"_id": full["_id"]}, full)
            self.states.delete_one({"_id": doc["_id"]})
            moved += 1
        if moved:
            logger.info("syncstate: %d watermark(s) re-keyed to their canonical source", moved)
        return moved

    def get(self, operation: str, source: str, column: str) -> Watermark | None:
        """The watermark of the operation for this source (None if none, or another column's)."""
        doc = self.states.find_one({"_id": self._id(operation, source)})
        state = self._model(doc)
        if state is None:
            return None
        if state.watermark.column != column:
            logger.warning(
                "%s: the stored watermark is for column %s, not %s; reading everything",
                operation,
                state.watermark.column,
                column,
            )
            return None
        return state.watermark

    def save(
        self,
        operation: str,
        source: str,
        watermark: Watermark,
        job_id: str,
        mode: str,
        delta_version: int | None = None,
        iceberg_snapshot: int | None = None,
    ) -> None:
        """Record the watermark a completed job reached (and the Delta version or Iceberg
        snapshot it read)."""
        now = datetime.now(UTC)
        fields = {
            "operation": operation,
            "source": source,
            "jobId": job_id,
            "mode": mode,
            "watermark": watermark.model_dump(),
            "updatedAtMs": int(now.timestamp() * 1000),
        }
        update: dict[str, Any] = {"$set": fields, "$currentDate": {"updatedAt": True}}
        unset = {}
        for name, pin in (("deltaVersion", delta_version), ("icebergSnapshotId", iceberg_snapshot)):
            if pin is None:
                unset[name] = ""
            else:
                fields[name] = pin
        if unset:
            update["$unset"] = unset
        self.states.update_one({"_id": self._id(operation, source)}, update, upsert=True)

    def read_versions(
        self, operation: str, source: str, column: str
    ) -> tuple[int | None, int | None, int | None]:
        """The Delta version and the Iceberg snapshot the last completed copy read, if it
        recorded this column's watermark (an incremental copy then reads only the files
        added since), and when that copy ended (ms since the epoch, lakesync's clock: a
        Delta version committed later belongs to a table recreated since): one read of the
        operation's state."""
        state = self._model(self.states.find_one({"_id": self._id(operation, source)}))
        if state is None or state.watermark.column != column:
            return None, None, None
        return state.deltaVersion, state.icebergSnapshotId, state.updatedAtMs

    def for_operation(self, operation: str) -> list[SyncState]:
        """The operation's watermarks, most recently updated first."""
        docs = self.states.find({"operation": operation}).sort("updatedAtMs", DESCENDING)
        return [s for s in (self._model(d) for d in docs.limit(50)) if s is not None]

    @staticmethod
    def _model(doc: dict[str, Any] | None) -> SyncState | None:
        if doc is None:
            return None
        try:
            return SyncState.model_validate(doc)
        except ValidationError:
            logger.warning(
                "syncstate %r is malformed; ignoring it (a full copy rewrites it)", doc.get("_id")
            )
            return None


# -- the lease on one slice -------------------------------------------------------------


def progress(status: JobStatus) -> Progress:
    """Where the job stood in ``status``: a run that committed a batch moves it (the
    empty checkpoint a run sets at its start does not)."""
    return status.processedRecords, status.checkpoint.batches if status.checkpoint else 0


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
    #: where the job stood after this run's last commit (a whole job; None: as claimed)
    _progress: Progress | None = field(default=None, init=False)

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
            self._progress = progress(status)
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
                self.store.drop_key_set(self.job_id)  # swept later if this fails
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
        dying); a failure that cannot be written is kept in `unrecorded` with where the job
        stood, recorded when this process next claims the job unless it progressed since
        (never raises)."""
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
                stood = self._progress or progress(status)
                unrecorded[self.job_id] = (message, error, stood, status.attempt)
