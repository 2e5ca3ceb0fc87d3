"""The copy engine: one lake batch -> validate -> bulk write -> exact counts.

Records are written whole, with InsertOne / ReplaceOne, never with `$set`: nx-27017 (the
embedded server) stores a top-level date given to `$set` as a string, while inserted and
replaced documents keep their dates as BSON dates on every MongoDB-wire server.

Each written document carries `_lakesync: {h, job, op, at}`: a hash of its content, the
job that last wrote it, how that job counted the batch's first record of the key ("i"
inserted, "u" updated, "n" unchanged) and the lake position (file index, row) it was
written from. One `$in` read per batch tells, for every record, whether it is new,
changed or unchanged, so:

* unchanged records are not written at all (a re-sync is nearly read-only);
* the write of each key is counted from the server's bulk-write result;
* a batch replayed after a crash (written, not yet checkpointed) is counted as it was
  the first time: a record whose marker names this job and a position inside this batch
  counts as that job counted it, never as "unchanged". That keeps processed = inserted +
  updated + unchanged + error = total exact across crashes. The same key seen again in a
  later batch of the same job is compared as usual (unchanged if equal).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import bson
from pymongo import InsertOne, ReplaceOne
from pymongo.collection import Collection
from pymongo.errors import BulkWriteError

from lakesync.lake import LakeBatch
from lakesync.models import Counters, utcnow
from lakesync.schema import RecordSchema, Rejection, validate

logger = logging.getLogger(__name__)

MARKER = "_lakesync"
MAX_MESSAGE_BYTES = 40 * 1024 * 1024  # below MongoDB's 48 MB message limit
_DUPLICATE_KEY = 11000


def content_hash(doc: dict[str, Any]) -> str:
    """A short, stable digest of a document's content (without its marker)."""
    return hashlib.blake2b(bson.encode(doc), digest_size=12).hexdigest()


@dataclass
class BatchResult:
    """What writing one batch did."""

    counts: Counters
    rejections: list[dict[str, Any]] = field(default_factory=list)
    write_seconds: float = 0.0


class CopyEngine:
    """Writes validated lake batches into a collection and rejected records into copyerrors."""

    def __init__(
        self,
        target: Collection[dict[str, Any]],
        errors: Collection[dict[str, Any]],
        schema: RecordSchema,
        job_id: str,
    ) -> None:
        self.target = target
        self.errors = errors
        self.schema = schema
        self.job_id = job_id

    def write(self, batch: LakeBatch) -> BatchResult:
        """Write one batch; safe to call again for the same batch (idempotent)."""
        checked = validate(self.schema, batch.table)
        counts = Counters(processed=batch.table.num_rows)
        rejected = [self._rejection(batch, r) for r in checked.rejections]
        started = time.perf_counter()
        plan = self._plan(checked.documents, checked.rows, batch, counts, rejected)
        self._execute(plan, counts, rejected, batch)
        if rejected:
            self._store_rejections(rejected)
        counts.errors = len(rejected)
        return BatchResult(counts, rejected, time.perf_counter() - started)

    def _plan(
        self,
        docs: list[dict[str, Any]],
        rows: list[int],
        batch: LakeBatch,
        counts: Counters,
        rejected: list[dict[str, Any]],
    ) -> dict[str, tuple[str, dict[str, Any], int]]:
        """Classify each record: key -> (op, document, batch row) for those to write.

        The occurrences of one key in a batch form a chain, each compared with the one
        before it (the first with the stored document). The first change in the chain is
        the one write (counted from the server's answer); the others are counted here.
        """
        if not docs:
            return {}
        existing = {
            d["_id"]: d.get(MARKER) or {}
            for d in self.target.find({"_id": {"$in": [d["_id"] for d in docs]}}, {MARKER: 1})
        }
        chains: dict[Any, list[tuple[dict[str, Any], int, str]]] = {}
        for doc, row in zip(docs, rows, strict=True):
            chains.setdefault(doc["_id"], []).append((doc, row, content_hash(doc)))
        first_row, end_row = batch.start_row, batch.start_row + batch.table.num_rows
        plan: dict[str, tuple[str, dict[str, Any], int]] = {}
        for key, chain in chains.items():
            marker = existing.get(key)
            changes = [chain[j][2] != chain[j - 1][2] for j in range(1, len(chain))]
            at = (marker or {}).get("at")
            if (
                marker is not None
                and marker.get("job") == self.job_id
                and marker.get("h") == chain[-1][2]
                and isinstance(at, list)
                and at[0] == batch.file_index
                and first_row <= at[1] < end_row
            ):  # a replay: this job already wrote this batch's records of the key
                first = {"i": "inserted", "u": "updated"}.get(marker.get("op", ""), "unchanged")
                setattr(counts, first, getattr(counts, first) + 1)
                counts.updated += sum(changes)
                counts.unchanged += len(changes) - sum(changes)
                continue
            op = "i" if marker is None else "u" if marker.get("h") != chain[0][2] else "n"
            changes.insert(0, op != "n")
            if not any(changes):
                counts.unchanged += len(changes)
                continue
            # the first change is written and counted by the server; the rest are counted here
            counts.updated += sum(changes) - 1
            counts.unchanged += len(changes) - sum(changes)
            doc, row, digest = chain[-1]
            doc[MARKER] = {"h": digest, "job": self.job_id, "op": op,
                           "at": [batch.file_index, batch.start_row + row]}  # fmt: skip
            plan[key] = ("i" if marker is None else "u", doc, row)
        return plan

    def _execute(
        self,
        plan: dict[str, tuple[str, dict[str, Any], int]],
        counts: Counters,
        rejected: list[dict[str, Any]],
        batch: LakeBatch,
    ) -> None:
        """Send the planned writes as unordered bulks under the message size limit."""
        items = list(plan.values())
        chunk: list[Any] = []
        meta: list[tuple[str, dict[str, Any], int]] = []
        size = 0
        for op, doc, row in items:
            n = len(bson.encode(doc)) if len(items) > 2000 else 0
            if chunk and size + n > MAX_MESSAGE_BYTES:
                self._bulk(chunk, meta, counts, rejected, batch)
                chunk, meta, size = [], [], 0
            chunk.append(
                InsertOne(doc) if op == "i" else ReplaceOne({"_id": doc["_id"]}, doc, upsert=True)
            )
            meta.append((op, doc, row))
            size += n
        if chunk:
            self._bulk(chunk, meta, counts, rejected, batch)

    def _bulk(
        self,
        ops: list[Any],
        meta: list[tuple[str, dict[str, Any], int]],
        counts: Counters,
        rejected: list[dict[str, Any]],
        batch: LakeBatch,
    ) -> None:
        details: Mapping[str, Any]
        try:
            result = self.target.bulk_write(ops, ordered=False)
            details = result.bulk_api_result
            errors: list[dict[str, Any]] = []
        except BulkWriteError as e:
            details = e.details
            errors = details.get("writeErrors", [])
        counts.inserted += int(details.get("nInserted", 0)) + int(details.get("nUpserted", 0))
        counts.updated += int(details.get("nMatched", 0))
        retry: list[tuple[str, dict[str, Any], int]] = []
        for err in errors:
            op, doc, row = meta[err["index"]]
            if err.get("code") == _DUPLICATE_KEY and op == "i":
                retry.append(("u", doc, row))  # inserted meanwhile by another writer
                continue
            rejected.append(
                self._rejection(batch, Rejection(row, str(doc["_id"]), err.get("errmsg", "")))
            )
        if retry:
            for _, doc, _ in retry:
                doc[MARKER]["op"] = "u"
            self._bulk(
                [ReplaceOne({"_id": d["_id"]}, d, upsert=True) for _, d, _ in retry],
                retry, counts, rejected, batch,
            )  # fmt: skip

    def _rejection(self, batch: LakeBatch, r: Rejection) -> dict[str, Any]:
        row = batch.start_row + r.row
        return {
            "_id": f"{self.job_id}:{batch.file_index}:{row}",
            "jobId": self.job_id,
            "key": r.key,
            "file": batch.file,
            "row": row,
            "reason": r.reason,
            "time": utcnow(),
        }

    def _store_rejections(self, rejected: list[dict[str, Any]]) -> None:
        """Insert rejections; ids are positional, so a replayed batch adds no duplicates."""
        try:
            self.errors.insert_many(rejected, ordered=False)
        except BulkWriteError as e:
            real = [w for w in e.details.get("writeErrors", []) if w.get("code") != _DUPLICATE_KEY]
            if real:
                raise
