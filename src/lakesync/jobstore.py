"""The job status store: `jobstatuses` documents created, claimed, advanced and ended.

Every state change is one atomic conditional update on the job document. A run owns a job
through the lease primitive of `lease.py` (the same one partitions use): every write of a
run is filtered on its owner, so a run whose job was taken over learns it (LeaseLost)
instead of writing over it, and expiry is judged on the server's clock only.

Every write also increments `revision`, and every document this process writes or reads
is kept in `RecentStatuses`, newest revision wins. Status polls (`JobStore.recent`) are
answered from there while it is fresh: a job this process runs refreshes it with every
batch, so polling costs no database read (see docs/performance.md, "Status polling").
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta
from typing import Any

from pydantic import ValidationError
from pymongo import ASCENDING, DESCENDING, ReturnDocument
from pymongo.collection import Collection
from pymongo.database import Database
from pymongo.errors import DuplicateKeyError

from lakesync.errors import (
    CorruptJobDocument,
    IdempotencyConflict,
    JobError,
    JobNotFound,
    LeaseLost,
)
from lakesync.lease import Leases, beat
from lakesync.models import (
    ACTIVE_STATES,
    FINAL_STATES,
    PARTITIONS,
    PLANS,
    Checkpoint,
    Counters,
    JobState,
    JobStatus,
    new_job_id,
    utcnow,
)

logger = logging.getLogger(__name__)

IDEMPOTENCY_TTL_SECONDS = 24 * 3600
#: a key taken this long ago by a request that never bound a job to it is taken over
IDEMPOTENCY_CLAIM_SECONDS = 30


def _now_ms() -> int:
    return int(time.time() * 1000)


def _rev(update: dict[str, Any]) -> dict[str, Any]:
    """Count the write in `revision`, which orders the documents RecentStatuses keeps."""
    update.setdefault("$inc", {})["revision"] = 1
    return update


def _stamp(update: dict[str, Any]) -> dict[str, Any]:
    """The job document's own bookkeeping on every write: `updatedAt` and the revision."""
    update.setdefault("$currentDate", {})["updatedAt"] = True
    return _rev(update)


def _beat(update: dict[str, Any]) -> dict[str, Any]:
    """Add a lease beat (see lease.py), the server-side times and the revision to an update."""
    return _stamp(beat(update))


def flight_key(operation: str, source: str) -> str:
    """The single-flight slot of a job: its operation and its source in canonical form, so
    `lake`, `lake/`, `./lake` and a symlink to it (or `s3://b/p` and `s3://b/p/`) share one."""
    from lakesync.locations import canonical_uri  # pyarrow: not for readers of statuses

    return f"{operation}|{canonical_uri(source) if source else ''}"


def _body_digest(body: Any) -> str:
    """What an idempotency key remembers of its request body."""
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()


def _same_body(key: str, stored: Mapping[str, Any], digest: str) -> str | None:
    """The job stored for ``key`` (None while its request creates it); IdempotencyConflict
    if it came with another body."""
    if stored.get("body") != digest:
        raise IdempotencyConflict(
            f"Idempotency-Key {key!r} was already used with a different request body "
            "in the last 24 hours. Use a new key for a different request."
        ) from None
    job_id = stored.get("jobId")
    return None if job_id is None else str(job_id)


class RecentStatuses:
    """The newest status document of each job this process wrote or read, with when.

    Thread-safe and bounded (least recently stored first out). A document only replaces one
    with a lower `revision`, so replies that arrive out of order never move a job back.
    """

    def __init__(self, capacity: int = 2048) -> None:
        self.capacity = capacity
        self._lock = threading.Lock()
        self._items: OrderedDict[str, tuple[float, JobStatus]] = OrderedDict()
        self._aliases: OrderedDict[str, str] = OrderedDict()  # clientJobId -> jobId
        self._reading = [threading.Lock() for _ in range(64)]

    def put(self, status: JobStatus) -> None:
        """Keep `status` unless a newer revision of the job is kept already."""
        now = time.monotonic()
        with self._lock:
            old = self._items.get(status.jobId)
            if old is not None and old[1].revision > status.revision:
                return
            self._items[status.jobId] = (now, status)
            self._items.move_to_end(status.jobId)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)
            if status.clientJobId:
                self._aliases[status.clientJobId] = status.jobId
                self._aliases.move_to_end(status.clientJobId)
                while len(self._aliases) > self.capacity:
                    self._aliases.popitem(last=False)

    def job_of(self, client_job_id: str) -> str | None:
        """The jobId last seen with this clientJobId (check the status still carries it)."""
        with self._lock:
            return self._aliases.get(client_job_id)

    def get(self, job_id: str, max_age: float) -> JobStatus | None:
        """The kept status if it was seen at most `max_age` seconds ago."""
        with self._lock:
            item = self._items.get(job_id)
        if item is None or time.monotonic() - item[0] > max_age:
            return None
        return item[1]

    def reading(self, job_id: str) -> threading.Lock:
        """The lock that lets one thread at a time read this job for everybody waiting."""
        return self._reading[hash(job_id) % len(self._reading)]


class JobStore:
    """Creates, claims, advances and queries job status documents."""

    def __init__(self, db: Database[dict[str, Any]], ttl_days: float = 7) -> None:
        self.db = db
        self.jobs: Collection[dict[str, Any]] = db["jobstatuses"]
        self.copyerrors: Collection[dict[str, Any]] = db["copyerrors"]
        self.idempotency: Collection[dict[str, Any]] = db["idempotencykeys"]
        self.ttl_days = ttl_days
        self.seen = RecentStatuses()
        #: called by the write that ended a job, which set its `notifyDue` (notify.py)
        self.on_end: Callable[[], None] | None = None
        #: jobs whose end this process wrote, until the webhook outbox takes them (notify.py:
        #: a short command waits for those deliveries only)
        self.ended_here: set[str] = set()

    @property
    def leases(self) -> Leases:
        """The lease primitive on job documents (partitions use the same on theirs)."""
        return Leases(self.jobs, "jobId", _stamp, projection={"_id": 0})

    def ensure_indexes(self) -> None:
        """Create the indexes the contract names (idempotent)."""
        ttl = int(self.ttl_days * 86400)
        self.jobs.create_index("jobId", unique=True, name="jobId_unique")
        self._expire_ended_jobs()
        self.jobs.create_index("flightKey", unique=True, sparse=True, name="single_flight")
        # sparse: jobs started without a client-named id never collide on the missing field
        self.jobs.create_index("clientJobId", unique=True, sparse=True, name="clientJobId_unique")
        self.jobs.create_index([("status", ASCENDING), ("heartbeatMs", ASCENDING)])
        self.jobs.create_index([("startTime", DESCENDING)])
        self.copyerrors.create_index("jobId")
        self._ensure_ttl(self.copyerrors, "time", ttl)
        self._ensure_ttl(self.idempotency, "createdAt", IDEMPOTENCY_TTL_SECONDS)
        self._expire_job_data_with_jobs()

    def _expire_job_data_with_jobs(self) -> None:
        """A job's partitions and plan expire with its status (`expireAt`, set when it ends),
        never while it runs: a TTL from `createdAt` (older versions) removed them under a
        job running longer than LAKESYNC_STATUS_TTL_DAYS. Data of jobs that ended (or whose
        status expired) without getting its `expireAt` gets it now."""
        for name in (PARTITIONS, PLANS):
            coll = self.db[name]
            for index in coll.list_indexes():
                if dict(index["key"]) == {"createdAt": 1} and "expireAfterSeconds" in index:
                    coll.drop_index(index["name"])
            coll.create_index("expireAt", expireAfterSeconds=0)
            # (find, not distinct: nx-27017's distinct ignores its filter)
            ids = {d["jobId"] for d in coll.find({"expireAt": {"$exists": False}}, {"jobId": 1})}
            if not ids:
                continue
            query = {"jobId": {"$in": list(ids)}, "status": {"$in": list(ACTIVE_STATES)}}
            running = {d["jobId"] for d in self.jobs.find(query, {"jobId": 1})}
            ended = sorted(ids - running)
            coll.update_many(
                {"jobId": {"$in": ended}, "expireAt": {"$exists": False}},
                {"$set": {"expireAt": self.expire_at()}},
            )

    def _expire_ended_jobs(self) -> None:
        """Statuses expire at `expireAt`, set when a job ends: a TTL from `startTime` (older
        versions) removed statuses of long or resumed jobs while they ran. Jobs that ended
        before the upgrade get their `expireAt` now."""
        for index in self.jobs.list_indexes():
            if dict(index["key"]) == {"startTime": 1} and "expireAfterSeconds" in index:
                self.jobs.drop_index(index["name"])
        self.jobs.create_index("expireAt", expireAfterSeconds=0, name="status_ttl")
        self.jobs.update_many(
            {"status": {"$in": list(FINAL_STATES)}, "expireAt": {"$exists": False}},
            {"$set": {"expireAt": self.expire_at()}},
        )

    def expire_at(self) -> datetime:
        """When a status that ends now is removed: LAKESYNC_STATUS_TTL_DAYS from now."""
        return utcnow() + timedelta(days=self.ttl_days)

    @staticmethod
    def _ensure_ttl(coll: Collection[dict[str, Any]], field: str, seconds: int) -> None:
        for index in coll.list_indexes():
            if dict(index["key"]) == {field: 1} and index.get("expireAfterSeconds") != seconds:
                coll.drop_index(index["name"])  # the TTL setting changed
        coll.create_index(field, expireAfterSeconds=seconds)

    # -- reading -------------------------------------------------------------------------

    @staticmethod
    def _model(doc: Mapping[str, Any]) -> JobStatus:
        try:
            return JobStatus.model_validate(doc)
        except ValidationError as e:
            first = e.errors()[0]
            raise CorruptJobDocument(
                f"Job {doc.get('jobId')!r} has a malformed status document ({first['loc']}: "
                f"{first['msg']}); it was edited by hand or by another tool. Fix or "
                "delete it in the jobstatuses collection."
            ) from None

    def _seen(self, doc: Mapping[str, Any]) -> JobStatus:
        """The document as a model, kept as the job's most recent status."""
        status = self._model(doc)
        self.seen.put(status)
        return status

    def get(self, job_id: str) -> JobStatus:
        """The job's status; JobNotFound if unknown or expired."""
        doc = self.jobs.find_one({"jobId": job_id}, {"_id": 0})
        if doc is None:
            raise JobNotFound(
                f"No job {job_id!r}: the id is wrong or its status expired "
                f"(statuses are kept {self.ttl_days:g} days). List jobs with GET /api/jobs "
                "or `lakesync jobs`."
            )
        return self._seen(doc)

    # -- client-named job ids (the seed frontend's `job_<timestamp>`) --------------------

    def by_client_id(self, client_job_id: str) -> JobStatus | None:
        """The job started under this clientJobId, if its status still exists."""
        doc = self.jobs.find_one({"clientJobId": client_job_id}, {"_id": 0})
        return None if doc is None else self._seen(doc)

    def recent_by_client_id(self, client_job_id: str, max_age: float) -> JobStatus:
        """`recent` for a clientJobId; JobNotFound if no job carries it."""
        job_id = self.seen.job_of(client_job_id)
        if job_id is not None:
            try:
                status = self.recent(job_id, max_age)
                if status.clientJobId == client_job_id:
                    return status
            except JobNotFound:
                pass  # expired: the id may now name a newer job
        named = self.by_client_id(client_job_id)
        if named is None:
            raise JobNotFound(
                f"No job {client_job_id!r}: the id is wrong or its status expired "
                f"(statuses are kept {self.ttl_days:g} days)."
            )
        return named

    def add_client_id(self, job: JobStatus, client_job_id: str) -> JobStatus:
        """Give a job that was started without one (single-flight) this clientJobId.

        JobError (409) if the job already carries another one: the second frontend would
        poll an id that no job answers to. If another job took the id meanwhile, that job.
        """
        try:
            doc = self.jobs.find_one_and_update(
                {"jobId": job.jobId, "clientJobId": {"$exists": False}},
                _rev({"$set": {"clientJobId": client_job_id}}),
                projection={"_id": 0},
                return_document=ReturnDocument.AFTER,
            )
        except DuplicateKeyError:
            doc = self.jobs.find_one({"clientJobId": client_job_id}, {"_id": 0})
        if doc is None:
            doc = self.jobs.find_one({"jobId": job.jobId}, {"_id": 0}) or {}
        if doc.get("clientJobId") != client_job_id:
            raise JobError(
                f"{job.operation} is already running as job {job.jobId}, started under "
                "another client job id; it copies the same lake. Wait until it ends, then "
                f"start again (or follow it at /api/jobs/{job.jobId}).",
                jobId=job.jobId,
            )
        return self._seen(doc)

    def recent(self, job_id: str, max_age: float) -> JobStatus:
        """The job's status as this process saw it at most `max_age` seconds ago, else read.

        Concurrent callers for the same job share one read. Status polls use this: a job
        that runs in this process is refreshed by every committed batch, so they cost no
        database read; a job run elsewhere is read at most once per `max_age`.
        """
        kept = self.seen.get(job_id, max_age)
        if kept is not None:
            return kept
        with self.seen.reading(job_id):
            kept = self.seen.get(job_id, max_age)
            return kept if kept is not None else self.get(job_id)

    def list_jobs(
        self,
        *,
        status: str | None = None,
        operation: str | None = None,
        limit: int = 20,
        before: str | None = None,
    ) -> list[JobStatus]:
        """Newest first, from just after job `before` if given (paging); unreadable documents
        are reported in the log and skipped."""
        query: dict[str, Any] = {}
        if status:
            query["status"] = status
        if operation:
            query["operation"] = operation
        order = [("startTime", DESCENDING), ("jobId", DESCENDING)]
        tie: tuple[Any, str] | None = None
        if before:
            mark = self.jobs.find_one({"jobId": before}, {"startTime": 1})
            if mark is None:
                raise JobNotFound(
                    f"before={before!r} names no job (or it expired); pass the `next` value "
                    "of the previous page."
                )
            # a bound a little past the mark, and the exact test below: nx-27017 compares
            # dates to the second only (it sorts them to the millisecond)
            query["startTime"] = {"$lt": mark["startTime"] + timedelta(seconds=2)}
            tie = (mark["startTime"], before)
        extra = 200 if tie else 0  # room for the jobs started just after the mark
        out: list[JobStatus] = []
        for doc in self.jobs.find(query, {"_id": 0}).sort(order).limit(limit + extra):
            if tie is not None and (doc.get("startTime"), doc["jobId"]) >= tie:
                continue
            try:
                out.append(self._seen(doc))
            except JobError as e:
                logger.warning("%s", e)
            if len(out) >= limit:
                break
        return out

    def count_by_status(self) -> dict[str, int]:
        """How many job documents are in each status."""
        pipeline = [{"$group": {"_id": "$status", "n": {"$sum": 1}}}]
        return {str(d["_id"]): int(d["n"]) for d in self.jobs.aggregate(pipeline)}

    def stale(self, lease_seconds: float) -> list[str]:
        """Jobs to run: pending ones, and those whose lease expired, handed back first."""
        pending, expired = self.leases.scan(lease_seconds)
        out = [str(d["jobId"]) for d in pending]
        out += [str(d["jobId"]) for d in expired if self.reap(str(d["jobId"]), d)]
        return out[:100]

    def reap(self, job_id: str, seen: dict[str, Any]) -> bool:
        """Hand back a job whose lease a scan `seen` expired; False if it beat since.

        A run that died holding it counts as a failure towards LAKESYNC_MAX_ATTEMPTS; a
        partitioned job nobody holds (its partitions run on their own) does not.
        """
        message = {"$set": {"message": "Its run stopped; resuming from the checkpoint"}}
        # a run that died holding it counts, in the write that hands it back
        if self.leases.reap(job_id, seen, message, count_death=True) is None:
            return False
        logger.warning(
            "job %s: its lease expired; handed back to be resumed", job_id, extra={"jobId": job_id}
        )
        return True

    # -- creating ------------------------------------------------------------------------

    def create(
        self,
        operation: str,
        options: dict[str, Any],
        flight: str,
        fields: dict[str, Any] | None = None,
    ) -> tuple[JobStatus, bool]:
        """A new pending job (with `fields`, e.g. trigger), or the active job of the same
        flight (operation + source)."""
        now = utcnow()
        doc = JobStatus(
            jobId=new_job_id(),
            status=JobState.PENDING,
            operation=operation,
            startTime=now,
            heartbeatAt=now,
            options=options,
            message="Waiting for a worker",
            **(fields or {}),
        ).model_dump(exclude_none=True)
        doc["flightKey"] = flight
        doc["heartbeatMs"] = _now_ms()
        for _ in range(3):
            try:
                self.jobs.insert_one(dict(doc))
                return self._seen(doc), True
            except DuplicateKeyError:
                named = doc.get("clientJobId") and self.by_client_id(doc["clientJobId"])
                if named:  # a concurrent start under the same client id made the job
                    return named, False
                running = self.jobs.find_one({"flightKey": flight}, {"_id": 0})
                if running is not None:
                    return self._seen(running), False
        raise JobError(f"Could not start {operation}: the single-flight slot kept changing.")

    def claim_idempotency(self, key: str, body: Any, wait: float = 10.0) -> str | None:
        """Take ``key`` for this request (None: go and create the job, then bind it), or the
        job id of the request that took it first; IdempotencyConflict if that one had
        another body.

        The key is one unique insert, taken before any job exists, so of concurrent
        requests with one key exactly one creates a job. The others wait (up to ``wait``
        seconds) for its job id; a claim left without a job for IDEMPOTENCY_CLAIM_SECONDS
        (its request died) is taken over.
        """
        digest = _body_digest(body)
        deadline = time.monotonic() + wait
        while True:
            try:
                self.idempotency.insert_one(
                    {"_id": key, "body": digest, "createdAt": utcnow(), "claimedMs": _now_ms()}
                )
                return None
            except DuplicateKeyError:
                stored = self.idempotency.find_one({"_id": key})
            if stored is None:  # dropped meanwhile: try to take it again
                continue
            job_id = _same_body(key, stored, digest)
            if job_id is not None:
                return job_id
            claimed = int(stored.get("claimedMs") or 0)
            if claimed < _now_ms() - IDEMPOTENCY_CLAIM_SECONDS * 1000:
                self.idempotency.delete_one({"_id": key, "jobId": None, "claimedMs": claimed})
                continue
            if time.monotonic() >= deadline:
                raise JobError(
                    f"A request with Idempotency-Key {key!r} is still being carried out; "
                    "retry in a few seconds to get its job."
                )
            time.sleep(0.05)

    def bind_idempotency(self, key: str, job_id: str) -> None:
        """Record the job the request that took ``key`` got (created or single-flight)."""
        self.idempotency.update_one({"_id": key}, {"$set": {"jobId": job_id}})

    def drop_idempotency(self, key: str) -> None:
        """Give ``key`` back when its request failed before it had a job."""
        self.idempotency.delete_one({"_id": key, "jobId": None})

    # -- running -------------------------------------------------------------------------

    def claim(self, job_id: str, owner: str, lease_seconds: float) -> JobStatus | None:
        """Take the job if it is pending or its owner's lease expired; None if someone has it.

        Taking over an in-progress job means its previous run died: that counts as a failure
        towards LAKESYNC_MAX_ATTEMPTS.
        """
        update: dict[str, dict[str, Any]] = {
            "$set": {"runProcessed": 0, "message": "Started: opening the lake"},
            "$inc": {"attempt": 1},
            "$currentDate": {"runStartedAt": True},
        }
        doc = self.leases.claim(job_id, owner, update)
        if doc is None:  # the death counts in the takeover's own write
            doc = self.leases.take_over(job_id, owner, lease_seconds, update)
            if doc is not None:
                logger.warning(
                    "job %s: took over from a run whose lease expired",
                    job_id,
                    extra={"jobId": job_id},
                )
        return None if doc is None else self._seen(doc)

    def _owned(self, job_id: str, owner: str) -> dict[str, Any]:
        return self.leases.held(job_id, owner)

    def update_run(self, job_id: str, owner: str, **fields: Any) -> JobStatus:
        """Set fields of a running job (total, message, partitions...) and heartbeat."""
        return self._advance(job_id, owner, _beat({"$set": dict(fields)}))

    def commit(
        self,
        job_id: str,
        owner: str,
        delta: Counters,
        checkpoint: Checkpoint | dict[str, Any],
        derived: dict[str, Any],
    ) -> JobStatus:
        """One atomic update after a committed batch: counters, checkpoint, progress.

        The update only applies on top of the previous checkpoint (`batches - 1`), so a retry
        of a commit whose reply was lost finds the checkpoint already there and does not
        count the batch twice.
        """
        cp = checkpoint.model_dump() if isinstance(checkpoint, Checkpoint) else checkpoint
        update = {
            "$inc": {
                "processedRecords": delta.processed,
                "insertedRecords": delta.inserted,
                "updatedRecords": delta.updated,
                "unchangedRecords": delta.unchanged,
                "duplicateRecords": delta.duplicates,
                "errorRecords": delta.errors,
                "deletedRecords": delta.deleted,
                "runProcessed": delta.processed,
            },
            "$set": dict(derived),
        }
        try:
            doc = self.leases.commit(job_id, owner, cp, update)
        except LeaseLost:
            raise LeaseLost(
                f"Job {job_id} is no longer owned by {owner}; stopping this run."
            ) from None
        return self._seen(doc)

    def raise_totals(
        self, job_id: str, maxes: dict[str, int], fields: dict[str, Any]
    ) -> JobStatus | None:
        """Raise a partitioned job's sums to `maxes` (never lowers them, so concurrent
        partitions need no lock) and set `fields`; None once the job is no longer running."""
        doc = self.jobs.find_one_and_update(
            {"jobId": job_id, "status": JobState.IN_PROGRESS.value},
            _beat({"$max": maxes, "$set": fields}),
            projection={"_id": 0},
            return_document=ReturnDocument.AFTER,
        )
        return None if doc is None else self._seen(doc)

    def let_go(self, job_id: str, owner: str) -> None:
        """Stop owning the job without changing its status (its partitions carry on)."""
        self.jobs.update_one({"jobId": job_id, "owner": owner}, _beat({"$unset": {"owner": ""}}))

    def hand_back_unowned(self, job_id: str, message: str) -> bool:
        """Make an in-progress job no run owns (a partitioned job whose partitions all
        stopped) pending, so the next start resumes it at once; False if it was not."""
        result = self.jobs.update_one(
            {"jobId": job_id, "status": JobState.IN_PROGRESS.value, "owner": None},
            _beat(
                {
                    "$set": {"status": JobState.PENDING.value, "message": message},
                    "$unset": {"queued": ""},
                }
            ),
        )
        return result.modified_count > 0

    def heartbeat(self, job_id: str, owner: str) -> JobStatus:
        """Renew the lease; returns the document (to see cancelRequested)."""
        return self._advance(job_id, owner, {})

    def _advance(self, job_id: str, owner: str, update: dict[str, Any]) -> JobStatus:
        try:
            return self._seen(self.leases.renew(job_id, owner, update))
        except LeaseLost:
            raise LeaseLost(
                f"Job {job_id} is no longer owned by {owner}; stopping this run."
            ) from None

    def finish(
        self,
        job_id: str,
        owner: str | None,
        state: JobState,
        message: str,
        error: str | None = None,
        ender: str | None = None,
    ) -> JobStatus:
        """End the job (completed, failed, cancelled) and free its single-flight slot.

        `ender` names the run that ends it when it holds no lease on the job (a partition);
        a retry by the same run whose first attempt was applied finds the job ended by it.
        """
        query: dict[str, Any] = {"jobId": job_id}
        if owner is not None:
            query.update(owner=owner, status=JobState.IN_PROGRESS.value)
        else:
            query["status"] = {"$in": list(ACTIVE_STATES)}
        fields: dict[str, Any] = {"status": state.value, "message": message}
        fields["expireAt"] = self.expire_at()  # the status is kept this long after it ended
        fields["notifyDue"] = 1  # in the same write: the outbox learns of it (notify.py)
        if error is not None:
            fields["error"] = error
        if state is JobState.COMPLETED:
            fields.update(percentComplete=100, etaSeconds=0)
            query["cancelRequested"] = {"$ne": True}  # a cancel was answered: it wins
        if owner or ender:
            fields["endedBy"] = owner or ender
        asked = state.value
        update = _rev(
            {
                "$set": fields,
                "$unset": {"flightKey": "", "owner": ""},
                "$currentDate": {"endTime": True, "updatedAt": True},
            }
        )
        doc = self.jobs.find_one_and_update(
            query, update, projection={"_id": 0}, return_document=ReturnDocument.AFTER
        )
        if doc is None and state is JobState.COMPLETED:  # cancelled as the copy ended
            state, query["cancelRequested"] = JobState.CANCELLED, True
            message = f"Cancelled as the copy ended; {message[0].lower()}{message[1:]}"
            fields.update(status=state.value, message=message)
            doc = self.jobs.find_one_and_update(
                query, update, projection={"_id": 0}, return_document=ReturnDocument.AFTER
            )
        if doc is None and (owner or ender):  # applied, but the reply was lost?
            mine = {
                "jobId": job_id,
                "status": {"$in": [asked, state.value]},
                "endedBy": owner or ender,
            }
            doc = self.jobs.find_one(mine, {"_id": 0})
            if doc is not None:
                state = JobState(doc["status"])
        if doc is None:
            raise LeaseLost(f"Job {job_id} could not be ended: another run owns it or it ended.")
        ended = self._seen(doc)
        self._job_data_expires(job_id, fields["expireAt"])
        self._log_end(ended)
        self._ended(ended)
        return ended

    @staticmethod
    def _log_end(ended: JobStatus) -> None:
        """The end's line, with its counts and seconds as fields."""
        counts: dict[str, Any] = {
            k: getattr(ended, k)
            for k in (
                "totalRecords",
                "processedRecords",
                "insertedRecords",
                "updatedRecords",
                "unchangedRecords",
                "duplicateRecords",
                "errorRecords",
                "deletedRecords",
            )
        }
        if ended.endTime is not None:
            counts["seconds"] = round((ended.endTime - ended.startTime).total_seconds(), 3)
        state = ended.status.value
        logger.info(
            "job %s %s: %s",
            ended.jobId,
            state,
            ended.message,
            extra={"jobId": ended.jobId, "operation": ended.operation, "status": state, **counts},
        )

    def _job_data_expires(self, job_id: str, at: datetime | None) -> None:
        """The job's partitions and plan expire `at` with its status (None: never, it runs)."""
        update = {"$set": {"expireAt": at}} if at else {"$unset": {"expireAt": ""}}
        for name in (PARTITIONS, PLANS):
            self.db[name].update_many({"jobId": job_id}, update)

    def _ended(self, status: JobStatus) -> None:
        if self.on_end is not None:
            self.ended_here.add(status.jobId)
            try:
                self.on_end()
            except Exception as e:  # a notification never changes how the job ended
                logger.error("job %s: end hook failed: %s", status.jobId, e)

    def release(self, job_id: str, owner: str, message: str, *, failure: bool = False) -> JobStatus:
        """Hand the job back (pending) so a new run continues from its checkpoint.

        A `failure` (MongoDB or the lake unavailable) counts towards LAKESYNC_MAX_ATTEMPTS
        like a crash: only failures in a row without progress add up.
        """
        update = _beat(
            {
                "$set": {"status": JobState.PENDING.value, "message": message},
                "$unset": {"owner": "", "queued": ""},
            }
        )
        if failure:
            mine = (
                self.jobs.find_one(
                    self._owned(job_id, owner), {"processedRecords": 1, "failedAtRecord": 1}
                )
                or {}
            )
            reached = int(mine.get("processedRecords", 0))
            if mine.get("failedAtRecord") == reached:
                update["$inc"]["failures"] = 1
            else:  # progress since the last failure: this one is the first in a row
                update["$set"].update(failures=1, failedAtRecord=reached)
        update["$set"]["releasedBy"] = owner
        doc = self.jobs.find_one_and_update(
            self._owned(job_id, owner),
            update,
            projection={"_id": 0},
            return_document=ReturnDocument.AFTER,
        )
        if doc is None:  # applied, but the reply was lost?
            mine = {"jobId": job_id, "status": JobState.PENDING.value, "releasedBy": owner}
            doc = self.jobs.find_one(mine, {"_id": 0})
        if doc is None:
            raise LeaseLost(f"Job {job_id} could not be released: another run owns it.")
        return self._seen(doc)

    def reopen(self, job_id: str) -> JobStatus:
        """Make a failed job pending again, to continue from its checkpoint."""
        current = self.get(job_id)
        if current.state is not JobState.FAILED:
            raise JobError(
                f"Job {job_id} is {current.status.value}; only failed jobs can be resumed.",
                status=current.status.value,
            )
        flight = flight_key(current.operation, str(current.options.get("source", "")))
        self._job_data_expires(job_id, None)  # first: a start-up sweep mends a crash between
        try:
            doc = self.jobs.find_one_and_update(
                {"jobId": job_id, "status": JobState.FAILED.value},
                _beat(
                    {
                        "$set": {
                            "status": JobState.PENDING.value,
                            "failures": 0,
                            "flightKey": flight,
                            "message": f"Resuming from record {current.processedRecords:,} "
                            f"of {current.totalRecords:,}",
                        },
                        "$unset": {
                            "error": "",
                            "endTime": "",
                            "failedAtRecord": "",
                            "queued": "",
                            "expireAt": "",
                        },
                    }
                ),
                projection={"_id": 0},
                return_document=ReturnDocument.AFTER,
            )
        except DuplicateKeyError:
            running = self.jobs.find_one({"flightKey": flight}, {"jobId": 1}) or {}
            raise JobError(
                f"Job {running.get('jobId')} copies the same operation and source right now; "
                f"resume {job_id} once it has ended.",
                status=current.status.value,
            ) from None
        if doc is None:
            raise JobError(f"Job {job_id} changed while resuming it; try again.")
        logger.info("job %s: reopened to resume from its checkpoint", job_id)
        return self._seen(doc)

    def request_cancel(self, job_id: str) -> JobStatus:
        """Cancel a pending job at once, or flag a running one (it stops after its current
        batch); the status says which. JobError (409, with the job) once it has ended.

        The flag is set only on a job that has not ended, in one conditional update, and
        `finish` never completes a flagged job: a cancel answered with an active or
        cancelled status always ends the job cancelled.
        """
        for _ in range(5):  # a job may go pending <-> in_progress meanwhile; rarely twice
            current = self.get(job_id)
            if current.state is JobState.CANCELLED:
                return current
            if current.state.is_final:
                raise JobError(
                    f"Job {job_id} already ended with status {current.status.value}; "
                    "only pending or in-progress jobs can be cancelled.",
                    status=current.status.value,
                    job=current.public(),
                )
            ended = self.jobs.find_one_and_update(
                {"jobId": job_id, "status": JobState.PENDING.value},
                _rev(
                    {
                        "$set": {
                            "status": JobState.CANCELLED.value,
                            "cancelRequested": True,
                            "expireAt": self.expire_at(),
                            "notifyDue": 1,
                            "message": f"Cancelled before it started; "
                            f"{current.processedRecords:,} records had been copied",
                        },
                        "$unset": {"flightKey": "", "owner": ""},
                        "$currentDate": {"endTime": True, "updatedAt": True},
                    }
                ),
                projection={"_id": 0},
                return_document=ReturnDocument.AFTER,
            )
            if ended is not None:
                self._ended(cancelled := self._seen(ended))
                return cancelled
            if ended is None:
                ended = self.jobs.find_one_and_update(
                    {"jobId": job_id, "status": JobState.IN_PROGRESS.value},
                    _rev({"$set": {"cancelRequested": True}, "$currentDate": {"updatedAt": True}}),
                    projection={"_id": 0},
                    return_document=ReturnDocument.AFTER,
                )
            if ended is not None:
                return self._seen(ended)
        raise JobError(f"Job {job_id} kept changing state; try to cancel it again.")
