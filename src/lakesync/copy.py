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
* after a batch none of whose keys existed, the next batch is inserted without the read
  (an initial copy reads nothing); a key that then turns out to exist fails its insert
  with a duplicate-key error, and only those keys are read and classified as usual;
* a batch replayed after a crash (written, not yet checkpointed) is counted as it was
  the first time: a record whose marker names this job and a position inside this batch
  counts as that job counted it, never as "unchanged". That keeps processed = inserted +
  updated + unchanged + error = total exact across crashes. The same key seen again in a
  later batch of the same job is compared as usual (unchanged if equal).

The hot path builds no Python dict per record: each record's BSON comes from
``Validated.encoded`` (written column by column), is hashed as it is, and is sent with its
marker appended as a ``RawBSONDocument``, so pymongo does not encode it again.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import struct
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import bson
from bson.raw_bson import RawBSONDocument
from pymongo import InsertOne, ReplaceOne
from pymongo.collection import Collection
from pymongo.errors import BulkWriteError

from lakesync.lake import LakeBatch
from lakesync.models import Counters, utcnow
from lakesync.schema import RecordSchema, Rejection, Validated, validate
from lakesync.typemap import KEY_CODEC, key_filter, lookup_key, replace_filter, server_limits

logger = logging.getLogger(__name__)

MARKER = "_lakesync"
MAX_MESSAGE_BYTES = 40 * 1024 * 1024  # below MongoDB's 48 MB message limit
MAX_MESSAGE_OPS = 100_000  # MongoDB's maxWriteBatchSize
_DUPLICATE_KEY = 11000
_MARKER_ELEMENT = b"\x03" + MARKER.encode() + b"\x00"  # BSON: an embedded document named _lakesync
_COUNTED = {"i": "inserted", "u": "updated"}
_I32, _I64 = struct.Struct("<i"), struct.Struct("<q")
_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1
_HASH_CHARS = 24  # digest(): 12 bytes as hex


def digest(body: bytes) -> str:
    """The content hash of a document's BSON (without its marker)."""
    return hashlib.blake2b(body, digest_size=_HASH_CHARS // 2).hexdigest()


def content_hash(doc: dict[str, Any]) -> str:
    """A short, stable digest of a document's content (without its marker)."""
    return digest(bson.encode(doc))


def _bson_string(name: bytes, value: str) -> bytes:
    data = value.encode()
    return b"\x02" + name + b"\x00" + _I32.pack(len(data) + 1) + data + b"\x00"


def _bson_int(name: bytes, value: int) -> bytes:
    if _INT32_MIN <= value <= _INT32_MAX:
        return b"\x10" + name + b"\x00" + _I32.pack(value)
    return b"\x12" + name + b"\x00" + _I64.pack(value)


def marker_bson(h: str, job: str, op: str, at: tuple[int, int]) -> bytes:
    """``bson.encode({"h": h, "job": job, "op": op, "at": [*at]})``, without the dict."""
    row = at[1]
    if len(h) == _HASH_CHARS and _INT32_MIN <= row <= _INT32_MAX:
        head, middle = _marker_template(job, op, at[0])
        return b"".join((head, h.encode(), middle, _I32.pack(row), b"\x00\x00"))
    return _marker_elements(h, job, op, at)


@functools.lru_cache(maxsize=64)
def _marker_template(job: str, op: str, file_index: int) -> tuple[bytes, bytes]:
    """The bytes of a marker before its hash, and between the hash and the row number."""
    whole = _marker_elements("0" * _HASH_CHARS, job, op, (file_index, 0))
    start = 4 + 3 + 4  # document length, b"\x02h\x00", string length
    return whole[:start], whole[start + _HASH_CHARS : -6]  # the end: row (4), 0, 0


def _new_documents(
    job: str, batch: LakeBatch, rows: list[int], bodies: list[bytes], digests: list[str]
) -> list[RawBSONDocument]:
    """The documents that insert these records: each body with marker ``{h, job, "i", at}``."""
    start = batch.start_row
    if rows and start + rows[-1] > _INT32_MAX:  # rare: the general (slower) way
        return [
            RawBSONDocument(with_marker(body, marker_bson(h, job, "i", (batch.file_index,
                                                                        start + row))))
            for row, body, h in zip(rows, bodies, digests, strict=True)
        ]  # fmt: skip
    head, middle = _marker_template(job, "i", batch.file_index)
    lead = _MARKER_ELEMENT + head
    # the row (4 bytes) and the ends of at, of the marker and of the document replacing the
    # body's own end: 4 + 3 - 1
    extra = len(lead) + _HASH_CHARS + len(middle) + 6
    pack, end = _I32.pack, b"\x00\x00\x00"
    return [
        RawBSONDocument(b"".join((pack(len(body) + extra), body[4:-1], lead, h.encode(),
                                  middle, pack(start + row), end)))
        for row, body, h in zip(rows, bodies, digests, strict=True)
    ]  # fmt: skip


def _marker_elements(h: str, job: str, op: str, at: tuple[int, int]) -> bytes:
    items = _bson_int(b"0", at[0]) + _bson_int(b"1", at[1])
    elements = b"".join((
        _bson_string(b"h", h), _bson_string(b"job", job), _bson_string(b"op", op),
        b"\x04at\x00", _I32.pack(len(items) + 5), items, b"\x00",
    ))  # fmt: skip
    return _I32.pack(len(elements) + 5) + elements + b"\x00"


def with_marker(body: bytes, marker: bytes) -> bytes:
    """The BSON document ``body`` with ``_lakesync: marker`` (BSON) appended as its last field."""
    size = len(body) + len(_MARKER_ELEMENT) + len(marker)
    return b"".join((_I32.pack(size), body[4:-1], _MARKER_ELEMENT, marker, b"\x00"))


@dataclass(slots=True)
class Write:
    """One planned write: insert ("i") or replace ("u") the document of ``key``.

    The document written is the record (``body``, BSON) with its marker ``{h, job, op, at}``
    appended; ``counted`` is the marker's ``op``: how the job counted the key's first record.
    """

    op: str
    key: Any
    row: int  # in the batch
    body: bytes
    h: str
    counted: str
    job: str
    at: tuple[int, int]  # file index, row in the file

    def document(self) -> RawBSONDocument:
        """What is written: the record and its marker, already BSON."""
        marker = marker_bson(self.h, self.job, self.counted, self.at)
        return RawBSONDocument(with_marker(self.body, marker))


@dataclass
class Prepared:
    """A batch validated, encoded and hashed: the part of ``write`` that needs no server."""

    table: Any  # the batch's table (pa.Table) it was made from
    checked: Validated
    bodies: list[bytes]  # each valid record's BSON
    digests: list[str]  # and its content hash
    inserts: list[RawBSONDocument] | None = None  # the documents, if they are all new


@dataclass
class BatchResult:
    """What writing one batch did."""

    counts: Counters
    rejections: list[dict[str, Any]] = field(default_factory=list)
    write_seconds: float = 0.0
    keys: list[Any] = field(default_factory=list)  # the `_id` of each valid record


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
        self.limits = server_limits(target)  # what the server cannot store or find
        #: none of the last batch's keys existed: insert the next batch without reading first
        self._assume_new = False

    def prepare(self, batch: LakeBatch) -> Prepared:
        """Validate, encode and hash a batch: all of ``write``'s work that needs no server.

        Safe to call from another thread: ``Lake.batches(prepare=engine.prepare)`` runs it
        on the next batch while this one is written, and ``write`` then uses the result.
        """
        checked = validate(self.schema, batch.table, self.limits)
        bodies = checked.encoded() if checked.rows else []
        digests = [digest(b) for b in bodies]
        inserts = None
        if self._assume_new:  # most likely inserted as they are: build the documents now
            inserts = _new_documents(self.job_id, batch, checked.rows, bodies, digests)
        return Prepared(batch.table, checked, bodies, digests, inserts)

    def write(self, batch: LakeBatch) -> BatchResult:
        """Write one batch; safe to call again for the same batch (idempotent)."""
        ready = batch.prepared
        if not (isinstance(ready, Prepared) and ready.table is batch.table):
            ready = self.prepare(batch)
        checked = ready.checked
        counts = Counters(processed=batch.table.num_rows)
        rejected = [self._rejection(batch, r) for r in checked.rejections]
        started = time.perf_counter()
        if checked.rows:
            self._copy(checked.keys, checked.rows, ready, batch, counts, rejected)
        if rejected:
            self._store_rejections(rejected)
        counts.errors = len(rejected)
        return BatchResult(counts, rejected, time.perf_counter() - started, checked.keys)

    def _copy(
        self,
        keys: list[Any],
        rows: list[int],
        ready: Prepared,
        batch: LakeBatch,
        counts: Counters,
        rejected: list[dict[str, Any]],
    ) -> None:
        bodies, digests = ready.bodies, ready.digests
        unique = len(set(keys)) == len(keys)
        if not (unique and self._assume_new):
            existing = self._markers(keys)
            plan = self._classify(keys, rows, bodies, digests, existing, batch, counts)
            self._execute(plan, counts, rejected, batch)
            self._assume_new = not existing
            return
        docs = ready.inserts
        if docs is None:
            docs = _new_documents(self.job_id, batch, rows, bodies, digests)
        taken = self._insert(docs, keys, rows, batch, counts, rejected)
        if taken:  # these keys existed after all: classify them as usual
            self._assume_new = False
            existing = self._markers([keys[i] for i in taken])
            plan = self._classify(
                [keys[i] for i in taken], [rows[i] for i in taken],
                [bodies[i] for i in taken], [digests[i] for i in taken],
                existing, batch, counts,
            )  # fmt: skip
            self._execute(plan, counts, rejected, batch)

    def _insert(
        self,
        docs: list[RawBSONDocument],
        keys: list[Any],
        rows: list[int],
        batch: LakeBatch,
        counts: Counters,
        rejected: list[dict[str, Any]],
    ) -> list[int]:
        """Insert new records' documents; the indexes of those whose key was taken."""
        taken: list[int] = []
        start = 0
        while start < len(docs):
            stop, size = start, 0
            while stop < len(docs) and stop - start < MAX_MESSAGE_OPS:
                size += len(docs[stop].raw)
                if size > MAX_MESSAGE_BYTES and stop > start:
                    break
                stop += 1
            chunk: list[Any] = docs[start:stop]
            try:
                self.target.insert_many(chunk, ordered=False)
                counts.inserted += len(chunk)
            except BulkWriteError as e:
                counts.inserted += int(e.details.get("nInserted", 0))
                for err in e.details.get("writeErrors", []):
                    i = start + int(err["index"])
                    if err.get("code") == _DUPLICATE_KEY:
                        taken.append(i)
                        continue
                    reason = err.get("errmsg", "")
                    rejected.append(
                        self._rejection(batch, Rejection(rows[i], str(keys[i]), reason))
                    )
            start = stop
        return taken

    def _markers(self, keys: Sequence[Any]) -> dict[Any, dict[str, Any]]:
        """The stored marker of each key that has a document ({} for one without a marker)."""
        target = self.target.with_options(codec_options=KEY_CODEC)
        query = key_filter(list(keys), self.limits)
        found = target.find(query, {MARKER: 1}, batch_size=len(keys))
        return {lookup_key(d["_id"]): d.get(MARKER) or {} for d in found}

    def _write(
        self, op: str, key: Any, row: int, body: bytes, h: str, counted: str, batch: LakeBatch
    ) -> Write:
        at = (batch.file_index, batch.start_row + row)
        return Write(op, key, row, body, h, counted, self.job_id, at)

    def _plan(
        self,
        docs: list[dict[str, Any]],
        rows: list[int],
        batch: LakeBatch,
        counts: Counters,
        rejected: list[dict[str, Any]],
    ) -> dict[Any, Write]:
        """Classify documents given as dicts (reading their stored markers); see _classify."""
        if not docs:
            return {}
        keys = [d["_id"] for d in docs]
        bodies = [bson.encode(d) for d in docs]
        digests = [digest(b) for b in bodies]
        return self._classify(keys, rows, bodies, digests, self._markers(keys), batch, counts)

    def _classify(
        self,
        keys: list[Any],
        rows: list[int],
        bodies: list[bytes],
        digests: list[str],
        existing: dict[Any, dict[str, Any]],
        batch: LakeBatch,
        counts: Counters,
    ) -> dict[Any, Write]:
        """Classify each record: key -> the write to make, counting those not written.

        The occurrences of one key in a batch form a chain, each compared with the one
        before it (the first with the stored document). The first change in the chain is
        the one write (counted from the server's answer); the others are counted here.
        """
        tally = {"inserted": 0, "updated": 0, "unchanged": 0}
        plan: dict[Any, Write] = {}
        if len(set(keys)) == len(keys):  # no key twice in the batch: chains of one
            for key, row, body, h in zip(keys, rows, bodies, digests, strict=True):
                marker = existing.get(key)
                if marker is None:
                    plan[key] = self._write("i", key, row, body, h, "i", batch)
                elif self._replayed(marker, h, batch):
                    tally[_COUNTED.get(marker.get("op", ""), "unchanged")] += 1
                elif marker.get("h") == h:
                    tally["unchanged"] += 1
                else:
                    plan[key] = self._write("u", key, row, body, h, "u", batch)
        else:
            chains: dict[Any, list[tuple[int, bytes, str]]] = {}
            for key, row, body, h in zip(keys, rows, bodies, digests, strict=True):
                chains.setdefault(key, []).append((row, body, h))
            for key, chain in chains.items():
                marker = existing.get(key)
                changes = [chain[j][2] != chain[j - 1][2] for j in range(1, len(chain))]
                if marker is not None and self._replayed(marker, chain[-1][2], batch):
                    # a replay: this job already wrote this batch's records of the key
                    tally[_COUNTED.get(marker.get("op", ""), "unchanged")] += 1
                    tally["updated"] += sum(changes)
                    tally["unchanged"] += len(changes) - sum(changes)
                    continue
                op = "i" if marker is None else "u" if marker.get("h") != chain[0][2] else "n"
                changes.insert(0, op != "n")
                if not any(changes):
                    tally["unchanged"] += len(changes)
                    continue
                # the first change is written and counted by the server; the rest are counted here
                tally["updated"] += sum(changes) - 1
                tally["unchanged"] += len(changes) - sum(changes)
                row, body, h = chain[-1]
                write = "i" if marker is None else "u"
                plan[key] = self._write(write, key, row, body, h, op, batch)
        counts.inserted += tally["inserted"]
        counts.updated += tally["updated"]
        counts.unchanged += tally["unchanged"]
        return plan

    def _replayed(self, marker: Mapping[str, Any], h: str, batch: LakeBatch) -> bool:
        """Whether this job wrote the record from this very batch (a batch written again)."""
        at = marker.get("at")
        return (
            marker.get("job") == self.job_id
            and marker.get("h") == h
            and isinstance(at, list)
            and at[0] == batch.file_index
            and batch.start_row <= at[1] < batch.start_row + batch.table.num_rows
        )

    def _execute(
        self,
        plan: Mapping[Any, Write],
        counts: Counters,
        rejected: list[dict[str, Any]],
        batch: LakeBatch,
    ) -> None:
        """Send the planned writes as unordered bulks under the message limits."""
        chunk: list[tuple[Write, RawBSONDocument]] = []
        size = 0
        for write in plan.values():
            doc = write.document()
            n = len(doc.raw)
            if chunk and (size + n > MAX_MESSAGE_BYTES or len(chunk) >= MAX_MESSAGE_OPS):
                self._bulk(chunk, counts, rejected, batch)
                chunk, size = [], 0
            chunk.append((write, doc))
            size += n
        if chunk:
            self._bulk(chunk, counts, rejected, batch)

    def _bulk(
        self,
        chunk: list[tuple[Write, RawBSONDocument]],
        counts: Counters,
        rejected: list[dict[str, Any]],
        batch: LakeBatch,
    ) -> None:
        details: Mapping[str, Any]
        ops: list[Any] = [
            InsertOne(doc)
            if w.op == "i"
            else ReplaceOne(replace_filter(w.key, self.limits), doc, upsert=True)
            for w, doc in chunk
        ]
        try:
            details = self.target.bulk_write(ops, ordered=False).bulk_api_result
            errors: list[dict[str, Any]] = []
        except BulkWriteError as e:
            details = e.details
            errors = details.get("writeErrors", [])
        counts.inserted += int(details.get("nInserted", 0)) + int(details.get("nUpserted", 0))
        counts.updated += int(details.get("nMatched", 0))
        retry: list[tuple[Write, RawBSONDocument]] = []
        for err in errors:
            write = chunk[err["index"]][0]
            if err.get("code") == _DUPLICATE_KEY and write.op == "i":
                write.op = write.counted = "u"  # inserted meanwhile by another writer
                retry.append((write, write.document()))
                continue
            rejected.append(
                self._rejection(batch, Rejection(write.row, str(write.key), err.get("errmsg", "")))
            )
        if retry:
            self._bulk(retry, counts, rejected, batch)

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
