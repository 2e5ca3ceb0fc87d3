"""Repeated keys: which records of a lake a later record of the same key replaces.

A lake is read in lake order (files in their sorted order, rows in file order) and, for
each key, the last valid record wins. Before a job writes anything, its first run reads the
lake once more, validating each record (no encoding, no server), and finds the positions of
the valid records that a later valid record of the same key replaces: the *superseded*
records. They are stored in `jobplans`, and every run of the job (whole, or any of its
partitions, in any order, on any machine, after any crash) skips them and counts them as
`duplicateRecords`. What is left holds one record per key, so:

* partitions never write the same key: the order they run in cannot change the result;
* inserted, updated and unchanged count keys against the collection as it was before the
  job, and a rerun of an unchanged lake counts 0 inserted and 0 updated;
* a replayed batch is recognised by the lake position in each document's marker.

Why a plan and not partitions by key or writes fenced by position: partitions by key
would make every partition read the whole lake, and fenced writes need a read-compare-write
per record that a real MongoDB and nx-27017 both pay on every batch. The plan costs one
validating read of the lake (about 1M records/s per core here, against ~9k/s for the writes
on the embedded server) and 24 bytes per valid record while planning; a lake whose keys are
all unique stores nothing.

Keys are compared in Arrow: a key of one integer or string column as its value (int64, or
UTF-8 bytes), which is equal exactly when the keys' BSON is; any other key (dates, composite
keys, or a column whose type changes between files) by a 128-bit hash of its BSON (BLAKE2b):
two different keys share one with a probability of about n²/2¹²⁹ (10⁻²⁶ for a billion
records). The first pass also skips the BSON encoding of the copy's validation: it only has
to find keys that *may* repeat (a record it wrongly takes for valid can only add a candidate,
which the second pass, validating exactly as the copy does, settles).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import bson
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from bson.binary import Binary
from pymongo.database import Database

from lakesync.lake import Lake, Listing
from lakesync.models import PLANS, utcnow
from lakesync.schema import RecordSchema, Validated, validate
from lakesync.typemap import MONGODB, ServerLimits, server_limits

logger = logging.getLogger(__name__)

_ROWS_PER_DOCUMENT = 1_000_000  # 4 bytes each: well under the 16 MB document limit
_PLAN_BATCH = 50_000
#: bytes of file names in one listing document, and of schemas in the first one (the two
#: together under the server's 16 MB limit)
_LISTING_NAMES_BYTES = 6 << 20
_LISTING_SCHEMA_BYTES = 6 << 20
_FILES_PER_DOCUMENT = 20_000  # a listing's entries: ~60 bytes each, ~1.2 MB per document
_EMPTY = np.empty(0, dtype=np.int64)
_DIGEST = pa.binary(16)


def key_digest(key: Any) -> bytes:
    """A 16-byte digest of a key's BSON: equal keys (whatever Python type holds them) match."""
    return hashlib.blake2b(bson.encode({"": key}), digest_size=16).digest()


def find_superseded(
    lake: Lake,
    schema: RecordSchema,
    filter: pc.Expression | None = None,
    filter_columns: Sequence[str] = (),
    limits: ServerLimits = MONGODB,
) -> dict[str, np.ndarray]:
    """For each file (as ``LakeBatch.file`` names it): the sorted rows whose record a later
    valid record of the same key replaces. Rows count as ``Lake.batches`` counts them (after
    ``filter``, whose columns ``filter_columns`` names). Invalid records replace nothing:
    they are rejected where they stand.

    Two passes, the second one only when needed: the key columns alone, to find keys that
    repeat at all (most lakes: none, and nothing else is read); then the whole records of
    just the files that hold a repeated key, validated as the copy validates them (``limits``
    are the server's), so that the last *valid* record wins.
    """
    keys_only = RecordSchema(
        key=schema.key, fields=[r for r in schema.fields if r.name in schema.key_columns]
    )
    wanted = [*schema.key_columns, *filter_columns]
    columns = [c for c in dict.fromkeys(wanted) if lake.has_column(c)]
    keys, positions, files = _key_positions(lake, keys_only, filter, columns, limits, exact=False)
    repeated = _repeated(keys, positions)
    if repeated is None:
        return {}
    names = list(files)
    index = {f: i for i, f in enumerate(lake.files)}
    holding = sorted(index[names[int(f)]] for f in np.unique(repeated >> 32))
    part = lake.only([lake.file_name(i) for i in holding])
    keys, positions, files = _key_positions(part, schema, filter, None, limits, exact=True)
    again = _repeated(keys, positions, losers=True)
    if again is None:
        return {}
    file_of, row_of = again >> 32, again & 0xFFFFFFFF
    names = list(files)
    out: dict[str, np.ndarray] = {}
    bounds = np.flatnonzero(np.diff(file_of)) + 1
    for chunk_rows, chunk_files in zip(
        np.split(row_of, bounds), np.split(file_of, bounds), strict=True
    ):
        out[names[int(chunk_files[0])]] = chunk_rows.astype(np.int64)
    return out


def _key_positions(
    lake: Lake,
    schema: RecordSchema,
    filter: pc.Expression | None,
    columns: list[str] | None,
    limits: ServerLimits,
    exact: bool,
) -> tuple[list[pa.Array], list[np.ndarray], dict[str, int]]:
    """The key (``_comparable``) and lake position (file number << 32 | row) of each valid
    record, and the files' numbers. Not ``exact``: records bson cannot encode count as valid
    (the first pass; see the module's docstring)."""
    keys: list[pa.Array] = []
    positions: list[np.ndarray] = []
    files: dict[str, int] = {}
    for batch in lake.batches(_PLAN_BATCH, filter=filter, columns=columns):
        checked = validate(schema, batch.table, limits, encode=exact, refused=batch.refused)
        if not checked.rows:
            continue
        rows = np.asarray(checked.rows, dtype=np.int64)
        # each row's segment by binary search (a batch spans up to thousands of small files)
        offsets = np.fromiter((seg.offset for seg in batch.segments), np.int64)
        base = np.fromiter(
            (
                (files.setdefault(seg.file, len(files)) << 32) + seg.start_row - seg.offset
                for seg in batch.segments
            ),
            np.int64,
        )
        where = base[np.searchsorted(offsets, rows, side="right") - 1] + rows
        keys.append(_key_values(checked))
        positions.append(where)
    return _comparable(keys), positions, files


def _key_values(checked: Validated) -> pa.Array:
    """The valid records' keys as an Arrow array that is equal where their BSON is: one
    integer column as int64, one string column as large_string, else BSON digests."""
    col = checked.columns.get(checked.key) if isinstance(checked.key, str) else None
    if col is not None and checked.key not in checked.values:
        if pa.types.is_integer(col.type):
            with contextlib.suppress(pa.ArrowInvalid):  # an unsigned value past int64
                return col.cast(pa.int64())
        elif pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
            return col.cast(pa.large_string())
    return _digests(checked.keys)


def _digests(keys: Iterable[Any]) -> pa.Array:
    return pa.array([key_digest(k) for k in keys], _DIGEST)


def _comparable(keys: list[pa.Array]) -> list[pa.Array]:
    """The batches' keys in one type: as they are when they share one, else all digests."""
    if len({k.type for k in keys}) <= 1:
        return keys
    return [k if k.type == _DIGEST else _digests(k.to_pylist()) for k in keys]


def _repeated(
    keys: list[pa.Array], positions: list[np.ndarray], losers: bool = False
) -> np.ndarray | None:
    """The sorted positions of the records whose key repeats (with ``losers``: of those but
    the last of each key); None when no key repeats."""
    if not keys:
        return None
    column = pa.chunked_array(keys)
    if len(pc.unique(column)) == len(column):  # most lakes: no key repeats (and it is cheap)
        return None
    table = pa.table({"d": column, "p": np.concatenate(positions)})
    groups = table.group_by("d").aggregate([("p", "max"), ("p", "count")])
    repeated = groups.filter(pc.greater(groups["p_count"], 1))
    if repeated.num_rows == 0:
        return None
    mask = pc.is_in(table["d"], value_set=repeated["d"].combine_chunks())
    if losers:
        last = pc.is_in(table["p"], value_set=repeated["p_max"].combine_chunks())
        mask = pc.and_(mask, pc.invert(last))
    return np.sort(table["p"].filter(mask).to_numpy())


class Superseded:
    """The superseded rows of some files of a job, looked up batch by batch."""

    def __init__(self, rows: dict[str, np.ndarray] | None = None) -> None:
        self._rows = rows or {}

    @property
    def count(self) -> int:
        """How many records are superseded."""
        return sum(len(r) for r in self._rows.values())

    def within(self, file: str, start: int, stop: int) -> np.ndarray:
        """The superseded rows of ``file`` in ``[start, stop)``, relative to ``start``."""
        rows = self._rows.get(file)
        if rows is None:
            return _EMPTY
        lo, hi = np.searchsorted(rows, [start, stop])
        return rows[lo:hi] - start

    @classmethod
    def load(
        cls, db: Database[dict[str, Any]], job_id: str, files: Sequence[str] | None = None
    ) -> Superseded:
        """The job's plan for ``files`` (all of the job's files when None)."""
        query: dict[str, Any] = {"jobId": job_id, "file": {"$exists": True}}  # not the listing
        if files is not None:
            query["file"] = {"$in": list(files)}
        parts: dict[str, list[np.ndarray]] = {}
        for doc in db[PLANS].find(query, sort=[("_id", 1)]):
            rows = np.frombuffer(bytes(doc["rows"]), dtype="<u4").astype(np.int64)
            parts.setdefault(str(doc["file"]), []).append(rows)
        return cls({f: np.sort(np.concatenate(p)) for f, p in parts.items()})


def ensure_indexes(db: Database[dict[str, Any]]) -> None:
    """Plans are found by job (they expire with their job: JobStore.finish)."""
    db[PLANS].create_index("jobId")


def save(db: Database[dict[str, Any]], job_id: str, plan: dict[str, np.ndarray]) -> int:
    """Store a job's plan (replacing any a dead run left half-written); the count stored."""
    coll = db[PLANS]
    coll.delete_many({"jobId": job_id})
    now = utcnow()

    def documents() -> Iterable[dict[str, Any]]:
        for file, rows in plan.items():
            for n, at in enumerate(range(0, len(rows), _ROWS_PER_DOCUMENT)):
                chunk = rows[at : at + _ROWS_PER_DOCUMENT].astype("<u4")
                yield {
                    "_id": f"{job_id}:{n}:{file}",
                    "jobId": job_id,
                    "file": file,
                    "rows": Binary(chunk.tobytes()),
                    "createdAt": now,
                }

    batch: list[dict[str, Any]] = []
    for doc in documents():
        batch.append(doc)
        if len(batch) >= 100:
            coll.insert_many(batch, ordered=False)
            batch = []
    if batch:
        coll.insert_many(batch, ordered=False)
    return sum(len(r) for r in plan.values())


def plan_job(
    db: Database[dict[str, Any]],
    job_id: str,
    lake: Lake,
    schema: RecordSchema,
    filter: pc.Expression | None = None,
    filter_columns: Sequence[str] = (),
    collection: str | None = None,
) -> int:
    """Find and store the records a job skips as duplicates; how many there are."""
    limits = MONGODB if collection is None else server_limits(db[collection])
    superseded = find_superseded(lake, schema, filter, filter_columns, limits)
    count = save(db, job_id, superseded)
    if count:
        logger.info(
            "job %s: %d records are replaced by a later record of the same key in %d files",
            job_id,
            count,
            len(superseded),
        )
    return count


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
