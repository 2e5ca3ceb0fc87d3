"""The copy engine: one lake batch -> validate -> bulk write -> exact counts.

Records are written whole, with InsertOne / ReplaceOne, never with `$set`: nx-27017 (the
embedded server) stores a top-level date given to `$set` as a string, while inserted and
replaced documents keep their dates as BSON dates on every MongoDB-wire server.

Each written document carries `_lakesync: {h, job, op, at}`: a hash of its content, the
job that last wrote it, how that job counted the key (``Counted``: "i" inserted, "u"
updated) and the lake position (file index in the whole lake, row) it was written from;
and ``k``, the digest of its composite ``_id``, on a server that cannot look one up
(``typemap.uses_key_digest``): the batch's read and its replaces then go by ``k``, indexed.

Repeated keys: a job writes one record per key, the last valid one in lake order. The
records a later record of the same key replaces are found before the job writes anything
(repeats.py) and skipped here, counted as duplicates; so are earlier records of a key that
repeats within one batch. One `$in` read per batch then tells, for every record, whether
it is new, changed or unchanged, so:

* unchanged records are not written at all (a re-sync is nearly read-only);
* the write of each key is counted from the server's bulk-write result;
* after a batch none of whose keys existed, the next batch is inserted without the read
  (an initial copy reads nothing); a key that then turns out to exist fails its insert
  with a duplicate-key error, and only those keys are read and classified as usual;
* a batch replayed after a crash (written, not yet checkpointed) is counted as it was
  the first time: a record whose marker names this job and a position inside this batch
  counts as that job counted it, never as "unchanged". That keeps processed = inserted +
  updated + unchanged + duplicate + error = total exact across crashes.

Stored keys are matched to the batch's in the form the server answers them
(``typemap.lookup_key``): a date key read back as ``datetime`` matches the value it was
written from, and a composite key (a subdocument) is hashable.

The hot path builds no Python dict per record: each record's BSON comes from
``Validated.encoded`` (written column by column), is hashed as it is, and is sent with its
marker appended as a ``RawBSONDocument``, so pymongo does not encode it again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import struct
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import bson
from bson.raw_bson import RawBSONDocument
from pymongo import InsertOne, ReplaceOne, UpdateOne
from pymongo.collection import Collection
from pymongo.errors import BulkWriteError

from lakesync.lake import LakeBatch
from lakesync.models import Counters, utcnow
from lakesync.mongo import DUPLICATE_KEY, insert_new
from lakesync.repeats import Superseded
from lakesync.schema import RecordSchema, Rejection, Validated, validate
from lakesync.typemap import (
    KEY_CODEC,
    KEY_DIGEST_FIELD,
    ServerLimits,
    digest_filter,
    id_digest,
    key_digest,
    key_filter,
    lookup_key,
    server_limits,
    uses_key_digest,
)

logger = logging.getLogger(__name__)

MARKER = "_lakesync"
MAX_MESSAGE_BYTES = 40 * 1024 * 1024  # below MongoDB's 48 MB message limit
MAX_MESSAGE_OPS = 100_000  # MongoDB's maxWriteBatchSize
_MARKER_ELEMENT = b"\x03" + MARKER.encode() + b"\x00"  # BSON: an embedded document named _lakesync
_I32 = struct.Struct("<i")


def digest(body: bytes) -> str:
    """The content hash of a document's BSON (without its marker)."""
    return hashlib.blake2b(body, digest_size=12).hexdigest()


class Counted(Enum):
    """How a job counted a key: what its write does, and the ``op`` of the marker it leaves.

    A batch written again after a crash counts each record as the marker says it was
    counted the first time; a marker with another ``op`` counts as unchanged.
    """

    INSERTED = "i"  # written with InsertOne (insert_many)
    UPDATED = "u"  # written with ReplaceOne, upsert


def marker_bson(h: str, job: str, op: str, at: tuple[int, int], k: str | None = None) -> bytes:
    """The marker ``{h, job, op, at: [file index, row]}`` as BSON, with ``k`` (the key's
    digest) where the server finds documents by it (``typemap.uses_key_digest``)."""
    marker: dict[str, Any] = {"h": h, "job": job, "op": op, "at": [at[0], at[1]]}
    if k is not None:
        marker["k"] = k
    return bson.encode(marker)


def with_marker(body: bytes, marker: bytes) -> bytes:
    """The BSON document ``body`` with ``_lakesync: marker`` (BSON) appended as its last field."""
    size = len(body) + len(_MARKER_ELEMENT) + len(marker)
    return b"".join((_I32.pack(size), body[4:-1], _MARKER_ELEMENT, marker, b"\x00"))


def marked(
    body: bytes, h: str, job: str, op: str, at: tuple[int, int], k: str | None = None
) -> RawBSONDocument:
    """What is written for a record: its BSON ``body`` with its marker, ready for pymongo."""
    return RawBSONDocument(with_marker(body, marker_bson(h, job, op, at, k)))


#: in a marker ``_markers`` answers: the ``_id`` of the document the server gave for the key
_TWIN = "\0twin"


def _twin(limits: ServerLimits, key: Any, stored: Any) -> str:
    """Why a record whose key the server keeps as one with a stored document's is rejected."""
    shown = [json.dumps(v) if isinstance(v, str) else str(v) for v in (key, stored)]
    return (
        f"{limits.name.split(',')[0]} cannot tell _id {shown[0]} from {shown[1]}, the key of "
        "a document in the collection: it keeps them as one key (MongoDB keeps them apart). "
        "Type the key column as the collection's documents have it (or write to MongoDB)"
    )


def id_element(body: bytes) -> bytes:
    """The BSON element of a document's ``_id``: its first field, as lakesync writes it."""
    if body[4] != 0x03 or body[5:9] != b"_id\x00":  # a subdocument named _id
        raise ValueError("the document does not start with a subdocument _id")
    return body[4 : 9 + _I32.unpack_from(body, 9)[0]]


def _new_documents(
    job: str,
    batch: LakeBatch,
    rows: list[int],
    bodies: list[bytes],
    digests: list[str],
    kdigests: list[str] | None = None,
) -> list[RawBSONDocument]:
    """The documents that insert these records (batch rows ``rows``)."""
    op = Counted.INSERTED.value
    ks: list[str] | list[None] = kdigests if kdigests is not None else [None] * len(rows)
    return [
        marked(body, h, job, op, batch.at(row), k)
        for row, body, h, k in zip(rows, bodies, digests, ks, strict=True)
    ]


@dataclass(slots=True)
class Write:
    """One planned write of the record of ``key``: inserted or replaced, as ``counted``."""

    counted: Counted
    key: Any
    row: int  # in the batch
    body: bytes
    h: str
    job: str
    at: tuple[int, int]  # file index, row in the file
    k: str | None = None  # the key's digest, where documents are found by it

    def document(self) -> RawBSONDocument:
        """What is written: the record and its marker, already BSON."""
        return marked(self.body, self.h, self.job, self.counted.value, self.at, self.k)


@dataclass
class Prepared:
    """A batch validated, encoded and hashed: the part of ``write`` that needs no server."""

    table: Any  # the batch's table (pa.Table) it was made from
    checked: Validated
    keys: list[Any]  # the `_id` of each record to write (valid, and not a duplicate)
    rows: list[int]  # its row in the batch
    bodies: list[bytes]  # its BSON
    digests: list[str]  # and its content hash
    kdigests: list[str] | None = None  # its key's digest, where documents are found by it
    duplicates: int = 0  # valid records left out: a later record of their key replaces them
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
        superseded: Superseded | None = None,
        *,
        dry_run: bool = False,
    ) -> None:
        self.target = target
        #: count against the collection as it is, write nothing to it (rejections are kept)
        self.dry_run = dry_run
        self.errors = errors
        self.schema = schema
        self.job_id = job_id
        #: the job's records that a later record of the same key replaces (repeats.py)
        self.superseded = superseded or Superseded()
        self.limits = server_limits(target)  # what the server cannot store or find
        #: documents are found by the digest of their (composite) key: typemap.uses_key_digest
        self.by_digest = uses_key_digest(schema.key, self.limits)
        self._digests_ready = not self.by_digest  # the index exists, old documents have one
        #: whether documents without a key digest exist (a dry run's look; None: not yet)
        self._lacking: bool | None = None
        #: none of the last batch's keys existed: insert the next batch without reading first
        self._assume_new = False

    def prepare(self, batch: LakeBatch) -> Prepared:
        """Validate, encode and hash a batch: all of ``write``'s work that needs no server.

        Safe to call from another thread: ``Lake.batches(prepare=engine.prepare)`` runs it
        on the next batch while this one is written, and ``write`` then uses the result.
        """
        checked = validate(self.schema, batch.table, self.limits, refused=batch.refused)
        keys, rows = checked.keys, checked.rows
        bodies = checked.encoded() if rows else []
        refused = self._refused(batch, checked)
        keep = self._winners(batch, keys, rows, refused)
        duplicates = 0
        if keep is not None:
            duplicates = len(rows) - len(keep) - len(refused)
            keys, rows = [keys[i] for i in keep], [rows[i] for i in keep]
            bodies = [bodies[i] for i in keep]
        digests = [digest(b) for b in bodies]
        kdigests = [key_digest(id_element(b)) for b in bodies] if self.by_digest else None
        ready = Prepared(
            batch.table, checked, keys, rows, bodies, digests, kdigests, duplicates=duplicates
        )
        if self._assume_new:  # most likely inserted as they are: build the documents now
            ready.inserts = _new_documents(self.job_id, batch, rows, bodies, digests, kdigests)
        return ready

    def _index_key_digests(self) -> None:
        """Index ``_lakesync.k``, and give it to documents that lack it (written before it
        existed, or by another tool): one update each, once per collection. Before the
        first write of a run; safe to repeat, and to run in several partitions at once."""
        self.target.create_index(KEY_DIGEST_FIELD, name="lakesync_key_digest")
        target = self.target.with_options(codec_options=KEY_CODEC)
        lacking = target.find({KEY_DIGEST_FIELD: {"$exists": False}}, {"_id": 1})
        ops: list[UpdateOne] = []
        done = 0
        for doc in lacking:
            key = doc["_id"]
            if not isinstance(key, dict) or not key:
                continue  # not a composite key: no record of this job can have it
            # by its fields: nx-27017 cannot filter on a whole subdocument _id
            where = {f"_id.{name}": value for name, value in key.items()}
            where[KEY_DIGEST_FIELD] = {"$exists": False}
            ops.append(UpdateOne(where, {"$set": {KEY_DIGEST_FIELD: id_digest(key)}}))
            if len(ops) == 1000:
                done += target.bulk_write(ops, ordered=False).modified_count
                ops = []
        if ops:
            done += target.bulk_write(ops, ordered=False).modified_count
        if done:
            logger.info("gave %d document(s) of %s their key digest", done, self.target.name)
        self._digests_ready = True

    def _markers_without_digest(
        self, keys: Sequence[Any], bodies: list[bytes], found: Mapping[Any, Any]
    ) -> dict[Any, dict[str, Any]]:
        """The markers of the composite keys not ``found`` by their digest whose document has
        none yet (a dry run gives none: ``_index_key_digests`` is the real run's), by the
        ``_id``'s fields as ``_index_key_digests`` finds them; one look first for whether
        any document lacks a digest (then none is looked for again)."""
        target = self.target.with_options(codec_options=KEY_CODEC)
        lacking = {KEY_DIGEST_FIELD: {"$exists": False}}
        if self._lacking is None:
            self._lacking = target.find_one(lacking, {"_id": 1}) is not None
        if not self._lacking:
            return {}
        out: dict[Any, dict[str, Any]] = {}
        for key, body in zip(keys, bodies, strict=True):
            if key in found:
                continue
            value = bson.decode(id_element(body)[5:], codec_options=KEY_CODEC)
            where = {f"_id.{name}": v for name, v in value.items()} | lacking
            doc = target.find_one(where, {MARKER: 1})
            if doc is not None:
                out[lookup_key(doc["_id"])] = doc.get(MARKER) or {}
        return out

    def _refused(self, batch: LakeBatch, checked: Validated) -> set[int]:
        """The valid rows the job's plan refuses (the server cannot tell their key from an
        earlier record's), added to the batch's rejections."""
        out: dict[int, str] = {}
        for seg in batch.segments:
            for rel, why in self.superseded.refused_within(
                seg.file, seg.start_row, seg.start_row + seg.rows
            ):
                out[rel + seg.offset] = why
        if not out:
            return set()
        at = {row: i for i, row in enumerate(checked.rows)}
        found = {row: why for row, why in out.items() if row in at}
        added = [Rejection(r, str(checked.keys[at[r]]), why) for r, why in found.items()]
        checked.rejections = sorted([*checked.rejections, *added], key=lambda r: r.row)
        return set(found)

    def _winners(
        self, batch: LakeBatch, keys: list[Any], rows: list[int], refused: set[int]
    ) -> list[int] | None:
        """Indexes (into ``rows``) of the records to write; None when that is all of them.

        Left out: records the job's plan marks as superseded or refuses, and any but the
        last record of a key that repeats within this batch (the plan finds those too,
        unless the job was planned without it).
        """
        if not rows:
            return None
        dropped: set[int] = set(refused)
        for seg in batch.segments:
            rel = self.superseded.within(seg.file, seg.start_row, seg.start_row + seg.rows)
            dropped.update((rel + seg.offset).tolist())
        # the last of a key among the records the plan keeps: where the plan orders a key's
        # records other than by place (a traced Delta rewrite), its winner need not be last
        last = {key: i for i, key in enumerate(keys) if rows[i] not in dropped}  # hashable keys
        if not dropped and len(last) == len(keys):
            return None
        return sorted(last.values())

    def write(self, batch: LakeBatch) -> BatchResult:
        """Write one batch; safe to call again for the same batch (idempotent)."""
        ready = batch.prepared
        if not (isinstance(ready, Prepared) and ready.table is batch.table):
            ready = self.prepare(batch)
        if not self._digests_ready and not self.dry_run:  # a dry run writes nothing at all
            self._index_key_digests()
        checked = ready.checked
        counts = Counters(processed=batch.table.num_rows, duplicates=ready.duplicates)
        rejected = [self._rejection(batch, r) for r in checked.rejections]
        started = time.perf_counter()
        if ready.rows and self.dry_run:  # the one place a dry run differs: no write
            keys, ks = ready.keys, ready.kdigests
            existing = self._markers(keys, ks)
            if not self._digests_ready:  # none given: find the documents still without one
                existing.update(self._markers_without_digest(keys, ready.bodies, existing))
            args = (keys, ready.rows, ready.bodies, ready.digests, ks, existing, batch, counts)
            for planned in self._classify(*args, rejected):
                if planned.counted is Counted.INSERTED:
                    counts.inserted += 1
                else:
                    counts.updated += 1
        elif ready.rows:
            self._classify_and_write(ready.keys, ready.rows, ready, batch, counts, rejected)
        if rejected:
            self._store_rejections(rejected)
        counts.errors = len(rejected)
        return BatchResult(counts, rejected, time.perf_counter() - started, ready.keys)

    def _classify_and_write(
        self,
        keys: list[Any],
        rows: list[int],
        ready: Prepared,
        batch: LakeBatch,
        counts: Counters,
        rejected: list[dict[str, Any]],
    ) -> None:
        """Count each record against its stored marker and write the new and changed ones."""
        bodies, digests, ks = ready.bodies, ready.digests, ready.kdigests
        if not self._assume_new:
            existing = self._markers(keys, ks)
            plan = self._classify(
                keys, rows, bodies, digests, ks, existing, batch, counts, rejected
            )
            self._execute(plan, counts, rejected, batch)
            self._assume_new = not existing
            return
        docs = ready.inserts
        if docs is None:
            docs = _new_documents(self.job_id, batch, rows, bodies, digests, ks)
        taken = self._insert(docs, keys, rows, batch, counts, rejected)
        if taken:  # these keys existed after all: classify them as usual
            self._assume_new = False
            keys, rows = [keys[i] for i in taken], [rows[i] for i in taken]
            bodies, digests = [bodies[i] for i in taken], [digests[i] for i in taken]
            ks = None if ks is None else [ks[i] for i in taken]
            existing = self._markers(keys, ks)
            plan = self._classify(
                keys, rows, bodies, digests, ks, existing, batch, counts, rejected
            )
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
                    if err.get("code") == DUPLICATE_KEY:
                        taken.append(i)
                        continue
                    reason = err.get("errmsg", "")
                    rejected.append(
                        self._rejection(batch, Rejection(rows[i], str(keys[i]), reason))
                    )
            start = stop
        return taken

    def _markers(self, keys: Sequence[Any], ks: list[str] | None) -> dict[Any, dict[str, Any]]:
        """The stored marker of each key that has a document ({} for one without a marker).

        One query for the batch, ``_id: {$in: [...]}``, answered from the ``_id`` index; or,
        where ``ks`` are given (``typemap.uses_key_digest``), one equality query per key on
        its digest: nx-27017 answers those from the digest's index, but an ``$in`` on any
        field but ``_id`` with a scan of the whole collection. Either way the documents
        found are matched to keys by their ``_id``.
        """
        target = self.target.with_options(codec_options=KEY_CODEC)
        if ks is None:
            found = list(target.find(key_filter(list(keys)), {MARKER: 1}, batch_size=len(keys)))
        else:
            found = [
                doc
                for k in ks
                if (doc := target.find_one(digest_filter(k), {MARKER: 1})) is not None
            ]
        markers = {lookup_key(d["_id"]): d.get(MARKER) or {} for d in found}
        if self.limits.text_keys and len(markers) > 0:
            markers.update(self._text_twins(keys, found, markers))
        return markers

    def _text_twins(
        self, keys: Sequence[Any], found: list[Any], markers: Mapping[Any, Any]
    ) -> dict[Any, dict[str, Any]]:
        """The keys this server answered with another key's document: one it keeps as one
        key with them (``ServerLimits.text_keys``: _id 1 and "1"), mapped to a marker that
        names that document's ``_id`` (``_TWIN``): the record is rejected, not written over
        a key MongoDB keeps apart."""
        by_text = {self._key_text(k): k for k in keys if k not in markers}
        by_text.pop(None, None)
        twins: dict[Any, dict[str, Any]] = {}
        for doc in found:
            asked = by_text.get(self._key_text(doc["_id"]))
            if asked is not None and lookup_key(doc["_id"]) != asked:
                twins[asked] = {_TWIN: doc["_id"]}
        return twins

    def _key_text(self, key: Any) -> str | None:
        """The text this server keeps a key as (None: one it tells apart from any text)."""
        if isinstance(key, str):
            return key
        if isinstance(key, self.limits.text_keys) and not isinstance(key, bool):
            return str(key)
        return None

    def _write(
        self,
        counted: Counted,
        key: Any,
        row: int,
        body: bytes,
        h: str,
        k: str | None,
        batch: LakeBatch,
    ) -> Write:
        return Write(counted, key, row, body, h, self.job_id, batch.at(row), k)

    def _classify(
        self,
        keys: list[Any],
        rows: list[int],
        bodies: list[bytes],
        digests: list[str],
        ks: list[str] | None,
        existing: dict[Any, dict[str, Any]],
        batch: LakeBatch,
        counts: Counters,
        rejected: list[dict[str, Any]],
    ) -> list[Write]:
        """The write each record needs (its key is in the batch once), counting the others.

        New keys are inserted and changed ones replaced, both counted from the server's
        answer; unchanged ones are counted here, as are records this job already wrote from
        this very batch (a replay), which count as the job counted them then.
        """
        plan: list[Write] = []
        kk: list[str] | list[None] = ks if ks is not None else [None] * len(keys)
        for key, row, body, h, k in zip(keys, rows, bodies, digests, kk, strict=True):
            marker = existing.get(key)
            if marker is not None and _TWIN in marker:
                why = _twin(self.limits, key, marker[_TWIN])
                rejected.append(self._rejection(batch, Rejection(row, str(key), why)))
                continue
            if marker is None:
                plan.append(self._write(Counted.INSERTED, key, row, body, h, k, batch))
            elif self._replayed(marker, h, batch):
                op = marker.get("op")
                if op == Counted.INSERTED.value:
                    counts.inserted += 1
                elif op == Counted.UPDATED.value:
                    counts.updated += 1
                else:
                    counts.unchanged += 1
            elif marker.get("h") == h:
                counts.unchanged += 1
            else:
                plan.append(self._write(Counted.UPDATED, key, row, body, h, k, batch))
        return plan

    def _replayed(self, marker: Mapping[str, Any], h: str, batch: LakeBatch) -> bool:
        """Whether this job wrote the record from this very batch (a batch written again)."""
        at = marker.get("at")
        return (
            marker.get("job") == self.job_id
            and marker.get("h") == h
            and isinstance(at, list)
            and len(at) == 2
            and batch.holds(at[0], at[1])
        )

    def _execute(
        self,
        plan: list[Write],
        counts: Counters,
        rejected: list[dict[str, Any]],
        batch: LakeBatch,
    ) -> None:
        """Send the planned writes as unordered bulks under the message limits."""
        chunk: list[tuple[Write, RawBSONDocument]] = []
        size = 0
        for write in plan:
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
            if w.counted is Counted.INSERTED
            else ReplaceOne({"_id": w.key} if w.k is None else digest_filter(w.k), doc, upsert=True)
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
            if err.get("code") == DUPLICATE_KEY and write.counted is Counted.INSERTED:
                write.counted = Counted.UPDATED  # inserted meanwhile by another writer
                retry.append((write, write.document()))
                continue
            rejected.append(
                self._rejection(batch, Rejection(write.row, str(write.key), err.get("errmsg", "")))
            )
        if retry:
            self._bulk(retry, counts, rejected, batch)

    def _rejection(self, batch: LakeBatch, r: Rejection) -> dict[str, Any]:
        seg = batch.segment_of(r.row)
        row = seg.file_row(r.row)
        return {
            "_id": f"{self.job_id}:{seg.ordinal}:{row}",
            "jobId": self.job_id,
            "key": r.key,
            "file": seg.file,
            "row": row,
            "reason": r.reason,
            "time": utcnow(),
        }

    def _store_rejections(self, rejected: list[dict[str, Any]]) -> None:
        """Insert rejections; ids are positional, so a replayed batch adds no duplicates."""
        insert_new(self.errors, rejected)
