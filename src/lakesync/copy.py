"""The copy engine: one lake batch -> validate -> bulk write -> exact counts.

Each written document carries `_lakesync: {h, job, op}`: a hash of its content, the job
that last wrote it and whether that job inserted ("i") or updated ("u") it. One `$in` read
per batch tells, for every record, whether it is new, changed or unchanged, so:

* unchanged records are not written at all (a re-sync is nearly read-only);
* counts come from the server's bulk-write result, not from guesses;
* a batch replayed after a crash (written, not yet checkpointed) is counted as it was
  the first time: a record whose marker names this job counts as that job's insert or
  update again, never as "unchanged". That keeps processed = inserted + updated +
  unchanged + error = total exact across crashes.
"""

from __future__ import annotations

import hashlib
import logging
import time
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
        """Classify each record: key -> (op, document, batch row) for those to write."""
        if not docs:
            return {}
        existing = {
            d["_id"]: d.get(MARKER) or {}
            for d in self.target.find({"_id": {"$in": [d["_id"] for d in docs]}}, {MARKER: 1})
        }
        plan: dict[str, tuple[str, dict[str, Any], int]] = {}
        for doc, row in zip(docs, rows, strict=True):
            key = doc["_id"]
            digest = content_hash(doc)
            if key in plan:  # the same key twice in one batch: the later record wins
                op, previous, _ = plan[key]
                if previous[MARKER]["h"] == digest:
                    counts.unchanged += 1
                    continue
                counts.updated += 1
                doc[MARKER] = {"h": digest, "job": self.job_id, "op": op}
                plan[key] = (op, doc, row)
                continue
            marker = existing.get(key)
            if marker is None:
                op = "i"
            elif marker.get("h") != digest:
                op = "u"
            elif marker.get("job") == self.job_id:  # replay of this job's own write
                if marker.get("op") == "i":
                    counts.inserted += 1
                else:
                    counts.updated += 1
                continue
            else:
                counts.unchanged += 1
                continue
            doc[MARKER] = {"h": digest, "job": self.job_id, "op": op}
            plan[key] = (op, doc, row)
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
        if len(retry) == len(ops) and errors:
            raise RuntimeError("duplicate-key retry made no progress")  # pragma: no cover
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
