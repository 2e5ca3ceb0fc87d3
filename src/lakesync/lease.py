"""Leases: which run may write a job or a partition, for whole jobs and partitions alike.

A leased document (a job status or a partition) has `status`, `owner` (unique per run:
process, thread and a random suffix), `leaseBeat` (a counter the owner increments with
every write) and `heartbeatAt` (set with `$currentDate`, the server's clock). Every write
of a run is filtered on its owner and `in_progress`, so a run that lost its lease learns
it (LeaseLost) and its write changes nothing.

Expiry is judged on the server's clock alone: a lease has expired when the server's time
(`hello.localTime`) is at least the lease past the `heartbeatAt` the server itself wrote.
No two machines' clocks are compared. nx-27017 cannot range-query a `$currentDate` date,
so the comparison is made on the documents read, and the takeover is a compare-and-swap
on `leaseBeat`: a beat that lands between the read and the takeover wins.

No lease is judged expired before `MIN_LEASE_SECONDS` of silence, whatever a process is
configured with. That is what lets a run trust, for `FENCE_TRUST_SECONDS` after sending a
write that proved it held the lease (a commit), that nobody can have taken it over since
(see boundary.py): a takeover needs a lease's silence on the server's clock, and the
server wrote the run's beat no earlier than the run sent that write.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

from pymongo import ReturnDocument
from pymongo.collection import Collection

from lakesync.errors import LeaseLost
from lakesync.models import JobState

logger = logging.getLogger(__name__)

PENDING = JobState.PENDING.value
IN_PROGRESS = JobState.IN_PROGRESS.value

Doc = dict[str, Any]

#: the shortest silence after which any process may take a lease over
MIN_LEASE_SECONDS = 1.0
#: how long after sending a write that proved the lease held a run skips the fence read;
#: half of MIN_LEASE_SECONDS, so that the clocks' rates may differ by a wide margin
FENCE_TRUST_SECONDS = MIN_LEASE_SECONDS / 2
#: the least time a queued mark is trusted: a message a broker delivered to a worker that was
#: killed before claiming it stays unacknowledged (Redis: for its 12 h visibility timeout), so
#: a mark older than this (or two leases, if longer) is cleared and the document sent again;
#: a duplicate delivery finds the document claimed and returns at once
QUEUED_TRUST_SECONDS = 60.0


def new_owner() -> str:
    """An identity for this process's runs: host, pid and a random suffix."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


def run_owner(process: str) -> str:
    """The owner of one run: the process's identity, the thread and a suffix of its own,
    so that a later run of the same thread is never taken for this one."""
    return f"{process}:{threading.get_ident()}:{uuid.uuid4().hex[:4]}"


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def beat(update: Doc) -> Doc:
    """Add a lease beat to an update: `leaseBeat + 1`, the server's time, a display stamp."""
    update.setdefault("$inc", {})["leaseBeat"] = 1
    update.setdefault("$currentDate", {})["heartbeatAt"] = True
    update.setdefault("$set", {})["heartbeatMs"] = int(time.time() * 1000)  # shown only
    return update


class Leases:
    """The lease primitive on one collection: claim, renew, check, release, take over, scan.

    ``key`` names the field that identifies a document (`jobId`, `_id`); ``decorate`` adds
    what the collection's own bookkeeping needs to every update (e.g. a revision counter).
    """

    def __init__(
        self,
        coll: Collection[Doc],
        key: str,
        decorate: Callable[[Doc], Doc] = lambda u: u,
        projection: Mapping[str, Any] | None = None,
    ) -> None:
        self.coll = coll
        self.key = key
        self.decorate = decorate
        self.projection = projection

    def held(self, value: Any, owner: str) -> Doc:
        """The filter every write of the lease holder carries (the fence)."""
        return {self.key: value, "owner": owner, "status": IN_PROGRESS}

    def _update(self, value: Any, query: Doc, update: Doc) -> Doc | None:
        return self.coll.find_one_and_update(
            query,
            self.decorate(beat(update)),
            projection=self.projection,
            return_document=ReturnDocument.AFTER,
        )

    def claim(self, value: Any, owner: str, update: Doc | None = None) -> Doc | None:
        """Take a pending document; None if it is not pending (and not already ours: the
        reply of a claim that was applied may have been lost, and the claim retried)."""
        update = _merge(
            update, {"$set": {"status": IN_PROGRESS, "owner": owner}, "$unset": {"queued": ""}}
        )
        doc = self._update(value, {self.key: value, "status": PENDING}, update)
        if doc is None:
            doc = self.coll.find_one(self.held(value, owner), self.projection)
        return doc

    def take_over(
        self, value: Any, owner: str, lease_seconds: float, update: Doc | None = None
    ) -> Doc | None:
        """Take an in-progress document whose lease expired (server time); None otherwise.

        The run that held it died: its death is counted in the same write (the rule of
        ``_death``). A retry of a takeover whose reply was lost finds the document
        held by ``owner`` (``claim``) with the death counted once and right: counted in a
        later write, it would be lost with that reply, and a death at a new record would
        add to an old streak (failing the job as one that kept dying at one spot)."""
        fields = {"leaseBeat": 1, "heartbeatAt": 1, "heartbeatMs": 1}
        fields |= {"processedRecords": 1, "failedAtRecord": 1}
        doc = self.coll.find_one({self.key: value, "status": IN_PROGRESS}, fields)
        if doc is None or not self.expired(doc, lease_seconds, self.server_now()):
            return None
        update = _merge(update, {"$set": {"owner": owner}, "$unset": {"queued": ""}})
        update = _merge(update, _death(doc))
        swap = {self.key: value, "status": IN_PROGRESS, "leaseBeat": doc.get("leaseBeat")}
        for name in ("processedRecords", "failedAtRecord"):  # as read (a job's sums move
            swap[name] = doc.get(name, {"$exists": False})  # without a beat: raise_totals)
        return self._update(value, swap, update)

    def commit(
        self, value: Any, owner: str, cp: Doc, update: Doc, field: str = "checkpoint"
    ) -> Doc:
        """Commit a batch: `update` (counters, progress) and the checkpoint `cp` in one write
        of the holder, applied only on top of the previous checkpoint (`batches - 1`). A
        retry whose first attempt was applied finds its checkpoint there and changes
        nothing, so no batch is counted twice. LeaseLost if the lease is gone."""
        query = self.held(value, owner)
        if cp["batches"] > 1:
            query[f"{field}.batches"] = cp["batches"] - 1
        else:  # the first batch: no checkpoint yet, or the empty one set with the total
            # inside $and: nx-27017 applies a top-level $or holding a null test to updates
            # without the other conditions, i.e. to another document
            query["$and"] = [{"$or": [{field: None}, {f"{field}.batches": 0}]}]
        doc = self._update(value, query, _merge(update, {"$set": {field: cp}}))
        if doc is None:
            current = self.coll.find_one(self.held(value, owner), self.projection)
            if current is None or _field(current, field) != cp:
                raise LeaseLost(f"{value} is no longer held by {owner}; stopping this run.")
            doc = current  # the first attempt was applied; its reply was lost
        return doc

    def reap(
        self,
        value: Any,
        seen: Mapping[str, Any],
        update: Doc | None = None,
        count_death: bool = False,
    ) -> Doc | None:
        """Hand back (pending) a document whose lease a scan saw expired; None if it beat
        since. Returns the document as it was, so the caller sees who held it.

        With ``count_death``, a run that died holding it (it has an owner) is counted in
        the same write that hands it back (the rule of ``_death``): once pending, a
        run may claim it at once, and die on the same record, before a later write could
        count the first death (the process crashing again lost it)."""
        swap = {self.key: value, "status": IN_PROGRESS, "leaseBeat": seen.get("leaseBeat")}
        update = _merge(
            update, {"$set": {"status": PENDING}, "$unset": {"owner": "", "queued": ""}}
        )
        if count_death:
            fields = {"owner": 1, "processedRecords": 1, "failedAtRecord": 1}
            current = self.coll.find_one(swap, fields)
            if current is None:
                return None
            if current.get("owner"):
                for name in ("processedRecords", "failedAtRecord"):  # as read, or not reaped
                    swap[name] = current.get(name, {"$exists": False})
                update = _merge(update, _death(current))
        return self.coll.find_one_and_update(
            swap, self.decorate(update), return_document=ReturnDocument.BEFORE
        )

    def renew(self, value: Any, owner: str, update: Doc | None = None) -> Doc:
        """A write of the holder (heartbeat, progress); LeaseLost if it is no longer held."""
        doc = self._update(value, self.held(value, owner), update or {})
        if doc is None:
            raise LeaseLost(f"{value} is no longer held by {owner}; stopping this run.")
        return doc

    def check(self, value: Any, owner: str) -> None:
        """LeaseLost unless this run still holds the lease (the fence read before a data
        write; see boundary.SliceLease.fence for when it is skipped)."""
        if self.coll.find_one(self.held(value, owner), {"_id": 1}) is None:
            raise LeaseLost(f"{value} is no longer held by {owner}; stopping this run.")

    def release(self, value: Any, owner: str, update: Doc | None = None) -> Doc:
        """Hand the document back (pending) so that another run continues it."""
        update = _merge(
            update,
            {
                "$set": {"status": PENDING, "releasedBy": owner},
                "$unset": {"owner": "", "queued": ""},
            },
        )
        doc = self._update(value, self.held(value, owner), update)
        if doc is None:  # applied, but the reply was lost?
            mine = {self.key: value, "status": PENDING, "releasedBy": owner}
            doc = self.coll.find_one(mine, self.projection)
        if doc is None:
            raise LeaseLost(f"{value} could not be handed back: another run holds it.")
        return doc

    def settle(self, value: Any, owner: str, state: str, update: Doc | None = None) -> Doc:
        """Move a held document to a final state (completed, failed...); LeaseLost if it is
        no longer held. A retry whose first attempt was applied finds it settled by us."""
        update = _merge(update, {"$set": {"status": state}})
        doc = self._update(value, self.held(value, owner), update)
        if doc is None:
            doc = self.coll.find_one(
                {self.key: value, "owner": owner, "status": state}, self.projection
            )
        if doc is None:
            raise LeaseLost(f"{value} is no longer held by {owner}; stopping this run.")
        return doc

    def mark_queued(self, value: Any) -> bool:
        """Note that a run of a pending document was sent to a queue; False if one already was.

        Claims and hand-backs clear the mark, so each pending state is sent once.
        """
        found = self.coll.find_one_and_update(
            {self.key: value, "status": PENDING, "queued": None},  # nx: no $ne on missing
            {"$set": {"queued": True}, "$currentDate": {"queuedAt": True}, "$inc": {"sends": 1}},
            projection={"_id": 1},
        )
        return found is not None

    def _unqueue_stale(self, doc: Mapping[str, Any], now: datetime, trust: float) -> bool:
        """Clear the queued mark of a pending document sent at least ``trust`` seconds ago
        (server time) and not claimed since: its message may have been lost with a killed
        worker. A compare-and-swap on `sends`, so only one scan clears one mark."""
        at = doc.get("queuedAt")
        age = (now - _aware(at)).total_seconds() if isinstance(at, datetime) else None
        if age is not None and age < trust:
            return False
        swap = {self.key: doc[self.key], "status": PENDING, "sends": doc.get("sends")}
        if doc.get("sends") is None:
            swap["sends"] = {"$exists": False}
        cleared = self.coll.find_one_and_update(
            swap, {"$unset": {"queued": "", "queuedAt": ""}}, projection={"_id": 1}
        )
        if cleared is not None:
            since = "long" if age is None else f"{age:.0f} s"
            logger.warning(
                "%s: sent %s ago and never claimed; sending it again", doc[self.key], since
            )
        return cleared is not None

    def server_now(self) -> datetime:
        """The server's time, the only clock leases are judged by."""
        hello = self.coll.database.client.admin.command("hello")
        local = hello.get("localTime")
        if isinstance(local, datetime):
            return _aware(local)
        probe = self.coll.database["leaseclock"].find_one_and_update(
            {"_id": "now"},
            {"$currentDate": {"now": True}},
            upsert=True,
            return_document=ReturnDocument.AFTER,
        )
        return _aware(probe["now"])  # type: ignore[index]

    @staticmethod
    def expired(doc: Mapping[str, Any], lease_seconds: float, now: datetime) -> bool:
        """Whether the holder's last beat is at least a lease old on the server's clock
        (never less than MIN_LEASE_SECONDS)."""
        lease_seconds = max(lease_seconds, MIN_LEASE_SECONDS)
        at = doc.get("heartbeatAt")
        if isinstance(at, datetime):
            return (now - _aware(at)).total_seconds() >= lease_seconds
        stamp = doc.get("heartbeatMs")  # a document written before leases used the server
        if isinstance(stamp, int | float):
            return now.timestamp() * 1000 - stamp >= lease_seconds * 1000
        return True  # never beaten: nobody holds it

    def scan(
        self, lease_seconds: float, query: Doc | None = None, limit: int = 500
    ) -> tuple[list[Doc], list[Doc]]:
        """(pending documents not sent to a queue yet, or sent so long ago that the message
        may be lost, in-progress documents whose lease expired)."""
        base = dict(query or {})
        fields = {self.key: 1, "status": 1, "leaseBeat": 1, "heartbeatAt": 1, "heartbeatMs": 1}
        pending = list(
            self.coll.find({**base, "status": PENDING, "queued": None}, fields).limit(limit)
        )
        sent = {**fields, "queuedAt": 1, "sends": 1}
        queued = list(
            self.coll.find({**base, "status": PENDING, "queued": {"$exists": True}}, sent).limit(
                limit
            )
        )
        running = list(self.coll.find({**base, "status": IN_PROGRESS}, fields).limit(limit))
        if not running and not queued:
            return pending, []
        now = self.server_now()
        expired = [d for d in running if self.expired(d, lease_seconds, now)]
        if len(expired) == len(running):  # no run at work: a mark this old is a lost message
            # (while some run holds a live lease, the queue may just be long: workers busy
            # with documents sent earlier take the rest in turn, so nothing is sent twice)
            trust = max(QUEUED_TRUST_SECONDS, 2 * lease_seconds)
            pending += [d for d in queued if self._unqueue_stale(d, now, trust)]
        return pending, expired


#: A run of a document whose last run died without progress since (``suspect``) holds
#: this lock until it commits a batch, one such run at a time in a process: a crash kills
#: every run of the process, so a document that dies again while it ran beside no other
#: suspect is the likelier cause, and the runs that only shared a process with it stop
#: adding up deaths towards LAKESYNC_MAX_ATTEMPTS.
SUSPECTS = threading.Lock()
_solo = threading.local()


class Alone:
    """Holds ``SUSPECTS`` for this thread's run if ``needed``, until ``progressed`` (or the
    end of the ``with`` block)."""

    def __init__(self, needed: bool) -> None:
        self.needed = needed

    def __enter__(self) -> Alone:
        self.took = self.needed and not getattr(_solo, "held", False)  # not twice (inline)
        if self.took:
            SUSPECTS.acquire()
            _solo.held = True
        return self

    def __exit__(self, *_: object) -> None:
        if self.took:
            progressed()


def progressed() -> None:
    """This thread's run committed a batch: other suspects may run beside it now."""
    if getattr(_solo, "held", False):
        _solo.held = False
        SUSPECTS.release()


def suspect(coll: Collection[Doc], query: Doc) -> bool:
    """Whether the document's last run died, and no run made progress since (its deaths
    are adding up: see ``_death``)."""
    fields = {"failures": 1, "failedAtRecord": 1, "processedRecords": 1, "_id": 0}
    doc = coll.find_one(query, fields)
    if not doc or not int(doc.get("failures") or 0):
        return False
    return bool(doc.get("failedAtRecord") == int(doc.get("processedRecords") or 0))


def kept_dying(doc: Mapping[str, Any], max_attempts: int, before: str) -> str | None:
    """Why a job or partition document whose runs kept dying is failed, or None while it
    may run again: ``max_attempts`` runs in a row (`failures`, the last one of `attempt`)
    died without ending at the same record (`processedRecords`), reading the file at its
    last checkpoint (``before`` a checkpoint: what it starts with)."""
    failures = int(doc.get("failures") or 0)
    if failures < max_attempts:
        return None
    reading = (doc.get("checkpoint") or {}).get("file") or before
    run, reached = int(doc.get("attempt") or 1) - 1, int(doc.get("processedRecords") or 0)
    return (
        f"The lake crashed the reader in run {run}: {reading} ({failures} runs in a row died "
        f"without ending at record {reached:,}: the process crashed or was killed while "
        f"reading there; max {max_attempts}, LAKESYNC_MAX_ATTEMPTS). Fix or remove that file, "
        "or leave it out of the source with a glob, then resume the job."
    )


def _death(doc: Mapping[str, Any]) -> Doc:
    """The update counting the death of a run that held ``doc`` (its lease expired: a
    crash, a kill) in `failures`: runs that died in a row at the same record
    (`processedRecords`). A run that committed records before dying restarts the count, so
    only a document stuck at one spot adds up; a clean hand-back (``release``) never counts.
    A takeover and a reap count it in their own write (``Leases.take_over``, ``reap``)."""
    reached = int(doc.get("processedRecords", 0))
    if doc.get("failedAtRecord") == reached:
        return {"$inc": {"failures": 1}}
    return {"$set": {"failures": 1, "failedAtRecord": reached}}


def _field(doc: Mapping[str, Any], path: str) -> Any:
    """The value at a dotted path of a document (None when absent)."""
    value: Any = doc
    for part in path.split("."):
        if not isinstance(value, Mapping):
            return None
        value = value.get(part)
    return value


def _merge(first: Doc | None, second: Doc) -> Doc:
    """Two updates as one (operators merged; the first's fields win)."""
    out: Doc = {k: dict(v) for k, v in second.items()}
    for op, fields in (first or {}).items():
        out.setdefault(op, {}).update(fields)
    return out


class Heartbeat(threading.Thread):
    """Renews a lease while its run works, also while a batch or a retry takes long.

    ``renew`` returns whether a cancel was requested; LeaseLost stops the beat and marks
    the lease `lost`, which the run checks before its next write.
    """

    def __init__(self, renew: Callable[[], bool], every: float, name: str) -> None:
        super().__init__(name=name, daemon=True)
        self.renew, self.every = renew, max(every, 0.5)
        self._done = threading.Event()
        self.cancel_seen = False
        self.lost = False

    def run(self) -> None:
        while not self._done.wait(self.every):
            try:
                self.cancel_seen = self.renew() or self.cancel_seen
            except LeaseLost:
                self.lost = True
                return
            except Exception as e:  # a missed beat is retried at the next tick
                logger.debug("%s failed: %s", self.name, e)

    def cancel(self) -> None:
        self._done.set()

    def __enter__(self) -> Heartbeat:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.cancel()
