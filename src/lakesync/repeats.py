"""Repeated keys: which records of a lake a later record of the same key replaces.

A lake is read in lake order (files in their sorted order, rows in file order) and, for
each key, the last valid record wins. Before a job writes anything, its first run reads the
lake once more, validating each record (no encoding, no server), and finds the positions of
the valid records that a later valid record of the same key replaces: the *superseded*
records. They are stored in `jobplans` (by the store boundary, boundary.py: this module
finds them and never sees a job), and every run of the job (whole, or any of its
partitions, in any order, on any machine, after any crash) skips them and counts them as
`duplicateRecords`. What is left holds one record per key, so:

* partitions never write the same key: the order they run in cannot change the result;
* inserted, updated and unchanged count keys against the collection as it was before the
  job, and a rerun of an unchanged lake counts 0 inserted and 0 updated;
* a replayed batch is recognised by the lake position in each document's marker.

Why a plan and not partitions by key or writes fenced by position: partitions by key
would make every partition read the whole lake, and fenced writes need a read-compare-write
per record that a real MongoDB and nx-27017 both pay on every batch. The plan costs one
validating read of the key columns, and one of the files that hold a repeated key; a lake
whose keys are all unique stores nothing.

Keys are compared as MongoDB compares ``_id`` (``canonical_key``: numbers by value, so 1,
1.0 and Int64(1) are one key; 1 and "1" are two). Each valid record is logged as a 64-bit
hash of its key, the key's exact bytes and its lake position (``_KeyLog``): in memory up to
_PLAN_MEMORY, then in buckets by hash in the data folder, compared a bucket at a time, so
planning memory does not grow with the lake. The hash only routes a key to its bucket and
groups; the bytes decide, so a collision of hashes never merges two keys. An integer or
string key column is hashed column-wise (numpy); any other key value by value, through the
same functions, so a key hashes alike whichever way it came.

Lake order is each record's position, except where a Delta rewrite (DELETE, OPTIMIZE) wrote
rows of several versions into one file in its own order: when the table still holds the
files it rewrote, each of its rows takes the place of the row it was copied from
(``Lake.rebuilt_order``), logged beside its position (8 bytes more per record, only in
such lakes), and a key's winner is its last record by that order.

A server that keeps some keys as their text (nx-27017: ``_id`` 1 and "1" are one key there;
``ServerLimits.text_keys``) hashes them as that text, so keys it cannot tell apart meet in
one bucket: of their winning records the earliest is kept and the later ones are refused
with the reason (``Plan.refused``), so that reruns settle.

The first pass skips the BSON encoding of the copy's validation: it only has to find keys
that *may* repeat (a record it wrongly takes for valid can only add a candidate, which the
second pass, validating exactly as the copy does, settles).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import bson
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from bson import SON, Decimal128
from bson.decimal128 import create_decimal128_context

from lakesync.hashing import SEED as _INT_SEED
from lakesync.hashing import hash_strings as _hash_strings
from lakesync.hashing import mix as _mix
from lakesync.lake import Lake
from lakesync.schema import RecordSchema, Validated, validate
from lakesync.sources.base import MISSING, OrderDoubt
from lakesync.sources.deltarows import RowOrder
from lakesync.typemap import MONGODB, ServerLimits

logger = logging.getLogger(__name__)

#: records per batch of the first pass (keys only). A batch of a lake of small files is a
#: piece of each file it spans, and the pass holds about three (validated, queued, being
#: assembled): 50,000 records of 20-row files were 7,500 files' pieces, ~10 MB of a
#: 20,000-file copy's peak RSS (issue #27); 10,000 cost no time measured
_PLAN_BATCH = 10_000
_EXACT_BATCH = 5_000  # whole records, validated and encoded as the copy does
_EMPTY = np.empty(0, dtype=np.int64)
#: superseded positions in one shard of a stored plan (8 bytes each while it is stored)
_SHARD_ROWS = 1 << 18
#: superseded rows a copy reads ahead in one query, from the file it reaches on (and at
#: most _FETCH_FILES files): a lake of small files costs a query per window, not per file
_FETCH_ROWS = 1 << 16
_FETCH_FILES = 64
#: bytes of keys a plan holds in memory; past it they wait in the data folder (_KeyLog)
_PLAN_MEMORY = 4 << 20
_BUCKET_BITS = 8
_BUCKETS = 1 << _BUCKET_BITS


def find_superseded(
    lake: Lake,
    schema: RecordSchema,
    filter: pc.Expression | None = None,
    filter_columns: Sequence[str] = (),
    limits: ServerLimits = MONGODB,
    spill: Path | None = None,
) -> dict[str, np.ndarray]:
    """For each file (as ``LakeBatch.file`` names it): the sorted rows whose record a later
    valid record of the same key replaces (``plan_lake``'s ``superseded``)."""
    return plan_lake(lake, schema, filter, filter_columns, limits, spill).superseded


@dataclass
class Plan:
    """What every run of a job skips: per file, the sorted rows a later valid record of the
    same key replaces, and the rows refused because the server cannot tell their key from
    an earlier record's (with the reason)."""

    superseded: dict[str, np.ndarray] = field(default_factory=dict)
    refused: dict[str, list[tuple[int, str]]] = field(default_factory=dict)
    #: keys whose winning record the table's order cannot tell (``_doubted``): how many,
    #: and one of them (the key as shown, its winner's file, why)
    doubted: int = 0
    example: tuple[str, str, str] | None = None

    def warning(self) -> str | None:
        """What the job says of the keys in doubt (None: there are none)."""
        if not self.doubted or self.example is None:
            return None
        key, file, why = self.example
        n = self.doubted
        return (
            f"Warning: for {n:,} key{'' if n == 1 else 's'} the table cannot tell which "
            f"record is the newest, so the copy may hold an older version of "
            f"{'it' if n == 1 else 'them'} (e.g. _id {key} in {file}: {why}). Copy a table "
            "before compacting it, rewriting it or cleaning up its history; after that, "
            "only the table can tell: keep one row per key (MERGE upserts), or write it "
            "anew as appends in the order of a column that orders a key's versions (such "
            "as updatedAt). An incremental copy does not help: the rows it reads are in "
            "the same order"
        )


def plan_lake(
    lake: Lake,
    schema: RecordSchema,
    filter: pc.Expression | None = None,
    filter_columns: Sequence[str] = (),
    limits: ServerLimits = MONGODB,
    spill: Path | None = None,
    store: RowsSink | None = None,
) -> Plan:
    """The plan of a lake (``Plan``). Rows count as ``Lake.batches`` counts them (after
    ``filter``, whose columns ``filter_columns`` names). Invalid records replace nothing:
    they are rejected where they stand. ``limits`` are the server's; past _PLAN_MEMORY of
    keys, they wait in ``spill`` (a folder; the system's temporary folder when None).

    Two passes, the second one only when needed: the key columns alone, to find the files
    that hold a key that repeats (or that the server may not tell from another) at all
    (most lakes: none, and nothing else is read); then the whole records of just those
    files, validated as the copy validates them, so that the last *valid* record wins.

    The superseded rows are all held (``Plan.superseded``), unless ``store`` is given:
    then they are handed to it file by file as the buckets of keys are settled, a bounded
    part of them held at once (``_SpilledLosers``), and the plan returned holds none. The
    store boundary (``boundary.plan_job``) stores them so in the job's plan.
    """
    losers: _Losers = _HeldLosers() if store is None else _SpilledLosers(store, spill)
    try:
        plan = _plan(lake, schema, filter, filter_columns, limits, spill, losers)
    finally:
        losers.close()
    if isinstance(losers, _HeldLosers):
        plan.superseded = losers.superseded
    return plan


def _plan(
    lake: Lake,
    schema: RecordSchema,
    filter: pc.Expression | None,
    filter_columns: Sequence[str],
    limits: ServerLimits,
    spill: Path | None,
    losers: _Losers,
) -> Plan:
    """``plan_lake``'s work: the superseded positions go to ``losers`` as each bucket of
    keys is settled; the plan returned holds the rest (refusals, keys in doubt)."""
    keys_only = RecordSchema(
        key=schema.key, fields=[r for r in schema.fields if r.name in schema.key_columns]
    )
    wanted = [*schema.key_columns, *filter_columns]
    columns = [c for c in dict.fromkeys(wanted) if lake.has_column(c)]
    with _KeyLog(spill) as log:
        files = _log_keys(log, lake, keys_only, filter, columns, limits, exact=False)
        holding: set[int] = set()
        for bucket in log.buckets():
            holding.update(np.unique(_involved(bucket) >> 32).tolist())
    if not holding:
        return Plan()
    names = list(files)
    index = {f: i for i, f in enumerate(lake.files)}
    part = lake.only([lake.file_name(i) for i in sorted(index[names[f]] for f in holding)])
    del files, names, index, holding
    order, after = part.rebuilt_order()  # rewrites' rows where they came from (Delta)
    if order is not None:  # the tracing's hashes, freed: handed back before the log grows
        pa.default_memory_pool().release_unused()
    doubt_of = {f: d for f, d in zip(part.files, after, strict=True) if d is not None}
    with _KeyLog(spill, ordered=order is not None) as log:
        files = _log_keys(log, part, schema, filter, None, limits, exact=True, order=order)
        names = list(files)
        losers.start(names, log.extent)
        doubts = {n: doubt_of[f] for f, n in files.items() if f in doubt_of}
        refused: dict[str, list[tuple[int, str]]] = {}
        doubted, example = 0, None
        for bucket in log.buckets():
            lost, conflicts = _settle(bucket, limits)
            losers.add(lost)
            del lost
            for at, reason in conflicts:
                refused.setdefault(names[at >> 32], []).append((at & 0xFFFFFFFF, reason))
            if doubts:
                count, first = _doubted(bucket, doubts)
                doubted += count
                if example is None and first is not None:
                    at, key = first
                    example = (_shown(key), names[at >> 32], doubts[at >> 32].why)
        losers.finish()
    return Plan({}, {f: sorted(r) for f, r in refused.items()}, doubted, example)


class _Losers:
    """Where ``_plan`` puts the superseded positions (file number << 32 | row) of each
    bucket of keys as it settles it: ``start`` with the files' names (by number) and how
    far each file's logged rows reach (``_KeyLog.extent``), then ``add`` per bucket, then
    ``finish``."""

    def start(self, names: list[str], extent: Extent) -> None:
        self.names = names

    def add(self, lost: np.ndarray) -> None:
        raise NotImplementedError

    def finish(self) -> None:
        """Every bucket was added."""

    def close(self) -> None:
        """The plan is over (finished or not): what it left is removed."""


class _HeldLosers(_Losers):
    """All in memory (``plan_lake``): ``superseded`` once finished."""

    def __init__(self) -> None:
        self._parts: list[np.ndarray] = []
        self.superseded: dict[str, np.ndarray] = {}

    def add(self, lost: np.ndarray) -> None:
        self._parts.append(lost)

    def finish(self) -> None:
        self.superseded = _by_file(self._parts, self.names)


#: where ``plan_lake`` hands the superseded rows it does not hold: a file's name, the
#: number of this part of the file's rows (a file's parts are numbered apart) and the rows,
#: sorted (uint32); the parts of one file are ranges of rows that do not overlap
RowsSink = Callable[[str, int, np.ndarray], None]


def _shard_bounds(extent: Extent, most: int) -> np.ndarray:
    """Cuts of the positions (file << 32 | row) into ranges that hold at most ``most``
    logged records each (so at most ``most`` superseded ones): whole files together, and a
    file of more records cut every ``most`` rows. ``extent``: ``_KeyLog.extent``."""
    cuts = [0]
    held = 0
    logged = np.flatnonzero(extent.counts)
    for f, count, end in zip(
        logged.tolist(), extent.counts[logged].tolist(), extent.ends[logged].tolist(), strict=True
    ):
        if held and held + count > most:
            cuts.append(f << 32)
            held = 0
        if count > most:
            cuts.extend((f << 32) | r for r in range(most, end, most))
            cuts.append((f + 1) << 32)
            held = 0
        else:
            held += count
    cuts.append(((int(logged[-1]) if len(logged) else 0) + 1) << 32)
    return np.unique(np.array(cuts, dtype=np.int64))


class _SpilledLosers(_Losers):
    """The superseded positions handed to ``store`` (``RowsSink``) without holding them all
    at once: each bucket's go to shard files of the spill folder (ranges of positions that
    hold at most _SHARD_ROWS of them, ``_shard_bounds``), then each shard is read alone,
    sorted and handed on file by file (the shard's number numbers the part). Held at once:
    one bucket's positions, or one shard's (8 bytes each)."""

    def __init__(self, store: RowsSink, spill: Path | None) -> None:
        self._store, self._spill = store, spill
        self._dir: tempfile.TemporaryDirectory[str] | None = None
        self._bounds = _EMPTY
        #: the most positions held at once (by ``add``'s caller, or a shard)
        self.most_held = 0

    def start(self, names: list[str], extent: Extent) -> None:
        super().start(names, extent)
        self._bounds = _shard_bounds(extent, _SHARD_ROWS)
        if self._spill is not None:
            self._spill.mkdir(parents=True, exist_ok=True)
        folder = None if self._spill is None else str(self._spill)
        self._dir = tempfile.TemporaryDirectory(prefix="losers-", dir=folder)

    def _shard(self, s: int) -> str:
        assert self._dir is not None
        return os.path.join(self._dir.name, f"shard-{s:06d}.bin")

    def add(self, lost: np.ndarray) -> None:
        self.most_held = max(self.most_held, len(lost))
        if not len(lost):
            return
        lost = np.sort(lost)
        cuts = np.searchsorted(lost, self._bounds)
        for s in np.flatnonzero(np.diff(cuts)).tolist():
            with open(self._shard(s), "ab") as out:
                out.write(lost[cuts[s] : cuts[s + 1]].astype("<i8").tobytes())

    def finish(self) -> None:
        try:
            for s in range(len(self._bounds) - 1):
                path = self._shard(s)
                if not os.path.exists(path):
                    continue
                every = np.fromfile(path, dtype="<i8")
                os.remove(path)
                self.most_held = max(self.most_held, len(every))
                every.sort()
                numbers = every >> 32
                starts = np.flatnonzero(np.r_[True, numbers[1:] != numbers[:-1]])
                ends = [*starts[1:].tolist(), len(every)]
                for lo, hi in zip(starts.tolist(), ends, strict=True):
                    rows = (every[lo:hi] & 0xFFFFFFFF).astype(np.uint32)
                    self._store(self.names[int(numbers[lo])], s, rows)
                del every, numbers
        finally:
            self.close()

    def close(self) -> None:
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None


def _by_file(losers: list[np.ndarray], names: list[str]) -> dict[str, np.ndarray]:
    """The superseded positions (file << 32 | row, in lists of arrays that this empties) as
    sorted uint32 rows per file name: 12 bytes per position at most at once (the positions
    moved into one array as the lists are freed, sorted in place, then 4 bytes per row),
    not the 36 of sorting a concatenation and splitting off the file numbers."""
    every = np.empty(sum(len(a) for a in losers), dtype=np.int64)
    at = 0
    while losers:
        part = losers.pop()
        every[at : at + len(part)] = part
        at += len(part)
        del part
    every.sort()
    # file f's positions start at f << 32: bounds found without an array of file numbers
    bounds = np.searchsorted(every, np.arange(len(names) + 1, dtype=np.int64) << 32)
    every &= 0xFFFFFFFF  # in place: no third array
    rows = every.astype(np.uint32)
    del every
    return {  # views of one array: 4 bytes per superseded record
        names[f]: rows[bounds[f] : bounds[f + 1]] for f in np.flatnonzero(np.diff(bounds)).tolist()
    }


def _log_keys(
    log: _KeyLog,
    lake: Lake,
    schema: RecordSchema,
    filter: pc.Expression | None,
    columns: list[str] | None,
    limits: ServerLimits,
    exact: bool,
    order: RowOrder | None = None,
) -> dict[str, int]:
    """Log the key and lake position (file number << 32 | row) of each valid record; the
    files' numbers. Not ``exact``: records bson cannot encode count as valid (the first
    pass; see the module's docstring). With ``order``, each record's order too (the
    winner of a key is the last by it, not by position: ``RowOrder``)."""
    files: dict[str, int] = {}
    size = _EXACT_BATCH if exact else _PLAN_BATCH
    for batch in lake.batches(size, filter=filter, columns=columns):
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
        segment = np.searchsorted(offsets, rows, side="right") - 1
        where = base[segment] + rows
        hashes, keys = _batch_keys(checked, limits)
        ranks = None
        if order is not None:
            ranks = np.empty(len(rows), dtype=np.int64)
            for s in np.unique(segment).tolist():
                seg, mine = batch.segments[s], segment == s
                ranks[mine] = order.of(seg.file_index, rows[mine] - seg.offset + seg.start_row)
        log.add(hashes, keys, where, ranks)
    return files


# -- keys as fixed-width hashes and exact bytes ---------------------------------------------

_INT, _STR, _BSON = b"\x01", b"\x02", b"\x03"
_DECIMAL128 = create_decimal128_context()


def _int_keys(col: pa.Array, limits: ServerLimits) -> tuple[np.ndarray, pa.Array]:
    """Hashes and exact bytes of int64 keys (a server that keeps integer keys as their text
    hashes them as that text: they must meet the strings they cannot be told from)."""
    values = col.to_numpy(zero_copy_only=False).astype("<i8", copy=False)
    if int in limits.text_keys:
        hashes = _hash_strings(col.cast(pa.large_string()))
    else:
        hashes = _mix(values.view(np.uint64) ^ _INT_SEED)
    packed = np.empty(len(values), dtype=[("t", "u1"), ("v", "<i8")])
    packed["t"], packed["v"] = _INT[0], values
    exact = pa.FixedSizeBinaryArray.from_buffers(
        pa.binary(9), len(values), [None, pa.py_buffer(packed.tobytes())]
    )
    return hashes, exact.cast(pa.large_binary())


def _str_keys(col: pa.Array) -> tuple[np.ndarray, pa.Array]:
    data = col.cast(pa.large_binary())
    tag, empty = pa.scalar(_STR, pa.large_binary()), pa.scalar(b"", pa.large_binary())
    return _hash_strings(data), pc.binary_join_element_wise(tag, data, empty)


def _batch_keys(checked: Validated, limits: ServerLimits) -> tuple[np.ndarray, pa.Array]:
    """The valid records' keys: a 64-bit hash of the key as the server identifies it, and
    bytes that are equal exactly when MongoDB holds the keys equal. One integer or string
    column is done column-wise; any other key value by value."""
    col = checked.columns.get(checked.key) if isinstance(checked.key, str) else None
    if col is not None and checked.key not in checked.values:
        if pa.types.is_integer(col.type):
            with contextlib.suppress(pa.ArrowInvalid):  # an unsigned value past int64
                return _int_keys(col.cast(pa.int64()), limits)
        elif pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
            return _str_keys(col)
    return _value_keys(checked.ids, limits)


def _value_keys(keys: Sequence[Any], limits: ServerLimits) -> tuple[np.ndarray, pa.Array]:
    """``_batch_keys`` value by value: integers and strings through the column-wise path (so
    a key hashes alike whichever way it came), anything else by its canonical BSON."""
    n = len(keys)
    hashes = np.empty(n, dtype=np.uint64)
    exact: list[bytes | None] = [None] * n
    ints: list[int] = []
    strs: list[str] = []
    int_at: list[int] = []
    str_at: list[int] = []
    for i, key in enumerate(keys):
        value = canonical_key(key)
        if type(value) is int and -(2**63) <= value < 2**63:
            ints.append(value)
            int_at.append(i)
        elif isinstance(value, str):
            strs.append(value)
            str_at.append(i)
        else:
            data = _BSON + bson.encode({"": value})
            exact[i] = data
            text = _as_text(value, limits)
            if text is None:
                hashes[i] = int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")
            else:
                hashes[i] = _hash_strings(pa.array([text], pa.large_string()))[0]
    done: list[tuple[list[int], tuple[np.ndarray, pa.Array]]] = []
    if ints:
        done.append((int_at, _int_keys(pa.array(ints, pa.int64()), limits)))
    if strs:
        done.append((str_at, _str_keys(pa.array(strs, pa.large_string()))))
    for at, (h, data) in done:
        hashes[at] = h
        for i, b in zip(at, data.to_pylist(), strict=True):
            exact[i] = b
    return hashes, pa.array(exact, pa.large_binary())


def canonical_key(key: Any) -> Any:
    """A key in the form MongoDB compares it in: numbers by value (1, 1.0, Int64(1) and
    Decimal128("1") are one key; true stays apart from 1), documents field by field."""
    if isinstance(key, bool) or key is None:
        return key
    if isinstance(key, int):
        return int(key)
    if isinstance(key, float):
        if math.isfinite(key) and key.is_integer() and -(2.0**63) <= key < 2.0**63:
            return int(key)
        return math.nan if math.isnan(key) else key
    if isinstance(key, Decimal128):
        value = key.to_decimal()
        if not value.is_finite():
            return canonical_key(float(value))
        if value == value.to_integral_value() and -(2**63) <= value < 2**63:
            return int(value)
        if Decimal(float(value)) == value:  # exactly a double: it meets that double
            return canonical_key(float(value))
        return Decimal128(value.normalize(_DECIMAL128))
    if isinstance(key, Mapping):
        return SON((k, canonical_key(v)) for k, v in key.items())
    return key


def _as_text(value: Any, limits: ServerLimits) -> str | None:
    """The text the server keeps a key of this type as, when it cannot tell it from that
    string (``ServerLimits.text_keys``); None for a key it tells apart from every string."""
    if isinstance(value, limits.text_keys) and not isinstance(value, bool):
        return str(value)
    return None


def _shown(data: bytes) -> str:
    """A key, from its exact bytes, as a reason shows it (strings in double quotes)."""
    value = _decoded(data)
    return json.dumps(value) if isinstance(value, str) else str(value)


def _decoded(data: bytes) -> Any:
    tag = data[:1]
    if tag == _INT:
        return int.from_bytes(data[1:9], "little", signed=True)
    if tag == _STR:
        return data[1:].decode()
    return bson.decode(data[1:])[""]


# -- the log of keys: in memory up to a budget, then in buckets on disk ---------------------

_LOG_SCHEMA = pa.schema([("h", pa.uint64()), ("k", pa.large_binary()), ("p", pa.int64())])
#: with each record's order (``RowOrder``) where it is not its position
_ORDERED_SCHEMA = _LOG_SCHEMA.append(pa.field("o", pa.int64()))


class Extent:
    """How far the records logged reach in each file (by its number in the log): how many
    there are and the last row + 1, in two arrays indexed by file number (16 bytes per
    file; a dict of tuples of Python integers took ~0.1 KB, and a plan logs every file of
    the lake, issue #27)."""

    def __init__(self) -> None:
        self.counts = np.zeros(0, dtype=np.int64)
        self.ends = np.zeros(0, dtype=np.int64)

    def add(self, p: np.ndarray) -> None:
        """Positions (file number << 32 | row) logged."""
        files, at, counts = np.unique(p >> 32, return_inverse=True, return_counts=True)
        ends = np.zeros(len(files), dtype=np.int64)
        np.maximum.at(ends, at, (p & 0xFFFFFFFF) + 1)
        need = int(files[-1]) + 1
        if need > len(self.counts):  # grown by doubling: file numbers come in order
            size = max(need, 2 * len(self.counts))
            self.counts = np.concatenate([self.counts, np.zeros(size - len(self.counts), np.int64)])
            self.ends = np.concatenate([self.ends, np.zeros(size - len(self.ends), np.int64)])
        self.counts[files] += counts
        self.ends[files] = np.maximum(self.ends[files], ends)

    def __getitem__(self, file: int) -> tuple[int, int]:
        """The records logged of file ``file`` and its last row logged + 1."""
        if file >= len(self.counts):
            return 0, 0
        return int(self.counts[file]), int(self.ends[file])


class _KeyLog:
    """Every valid record's key hash (``h``), exact key bytes (``k``) and lake position
    (``p``). Held in memory up to _PLAN_MEMORY; past it, each full load is split into
    _BUCKETS buckets by the top bits of ``h`` and written to one file of the spill folder,
    and ``buckets`` then reads consecutive buckets of every file, about _PLAN_MEMORY at a
    time: all the records of one key (and of keys the server may confuse: same ``h``) are
    in one bucket. ``ordered``: each record's order (``o``) is logged too, 8 bytes more."""

    def __init__(self, spill: Path | None, budget: int = 0, ordered: bool = False) -> None:
        self.budget = budget or _PLAN_MEMORY
        self._schema = _ORDERED_SCHEMA if ordered else _LOG_SCHEMA
        self._spill = spill
        self._held: list[pa.RecordBatch] = []
        self._bytes = 0
        self._dir: tempfile.TemporaryDirectory[str] | None = None
        self._runs: list[str] = []
        #: by file number: records logged and last row logged + 1 (16 bytes per file)
        self.extent = Extent()

    def __enter__(self) -> _KeyLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self._held = []
        if self._dir is not None:
            self._dir.cleanup()

    def add(self, h: np.ndarray, k: pa.Array, p: np.ndarray, o: np.ndarray | None = None) -> None:
        if len(p):
            self.extent.add(p)
        columns = [pa.array(h), k, pa.array(p), *([] if o is None else [pa.array(o)])]
        batch = pa.RecordBatch.from_arrays(columns, schema=self._schema)
        self._held.append(batch)
        self._bytes += batch.nbytes
        if self._bytes > self.budget:
            self._write_run()

    @property
    def spilled_bytes(self) -> int:
        return sum(os.path.getsize(r) for r in self._runs)

    def _write_run(self) -> None:
        if self._dir is None:
            if self._spill is not None:
                self._spill.mkdir(parents=True, exist_ok=True)
            folder = None if self._spill is None else str(self._spill)
            self._dir = tempfile.TemporaryDirectory(prefix="plan-", dir=folder)
        table = pa.Table.from_batches(self._held, self._schema)
        self._held, self._bytes = [], 0
        hashes = np.concatenate([c.to_numpy() for c in table["h"].chunks])
        bucket = (hashes >> np.uint64(64 - _BUCKET_BITS)).astype(np.int64)
        del hashes
        order = np.argsort(bucket, kind="stable")
        bounds = np.searchsorted(bucket[order], np.arange(_BUCKETS + 1))
        del bucket
        data = table.take(pa.array(order)).combine_chunks()  # one copy, sliced below
        del table, order
        whole = data.to_batches()[0] if data.num_rows else None
        path = os.path.join(self._dir.name, f"run-{len(self._runs):05d}.arrow")
        empty = pa.RecordBatch.from_pylist([], self._schema)
        with pa.OSFile(path, "wb") as sink, pa.ipc.new_file(sink, self._schema) as writer:
            for b in range(_BUCKETS):  # one record batch per bucket, in bucket order
                lo, hi = int(bounds[b]), int(bounds[b + 1])
                part = whole.slice(lo, hi - lo) if whole is not None else None
                writer.write_batch(part if part is not None else empty)
        self._runs.append(path)

    def buckets(self) -> Iterator[pa.Table]:
        """The logged records, a bucket at a time (all of them at once if none spilled)."""
        if not self._runs:
            if self._held:
                yield pa.Table.from_batches(self._held, self._schema)
            return
        if self._held:
            self._write_run()
        files = [pa.OSFile(r, "rb") for r in self._runs]
        try:
            readers = [pa.ipc.open_file(f) for f in files]
            held: list[pa.RecordBatch] = []
            size = 0
            for b in range(_BUCKETS):  # consecutive buckets together, up to the budget
                for reader in readers:
                    batch = reader.get_batch(b)
                    held.append(batch)
                    size += batch.nbytes
                if size >= self.budget or b == _BUCKETS - 1:
                    yield pa.Table.from_batches(held, self._schema)
                    held, size = [], 0
        finally:
            for f in files:
                f.close()


@dataclass
class _Groups:
    """A bucket's records sorted by hash, key bytes and order (their position, or their
    ``o`` where it is logged): equal keys are runs, the last of a run is its winner."""

    p: np.ndarray  # positions, in that order
    k: pa.Array  # key bytes, in the same order
    first: np.ndarray  # bool: the first record of its key
    last: np.ndarray  # bool: the last record of its key (the winner)
    repeated: np.ndarray  # bool: its key has more than one record
    shared: np.ndarray  # bool: its key shares its hash with another key


def _groups(bucket: pa.Table) -> _Groups:
    if bucket.num_rows == 0:
        none = np.zeros(0, dtype=bool)
        return _Groups(_EMPTY, pa.array([], pa.large_binary()), none, none, none, none)
    by = "o" if "o" in bucket.column_names else "p"  # the records' order: the last one wins
    order = pc.sort_indices(
        bucket, sort_keys=[("h", "ascending"), ("k", "ascending"), (by, "ascending")]
    )
    table = bucket.take(order).combine_chunks()
    h, p, k = table["h"].to_numpy(), table["p"].to_numpy(), table["k"].chunk(0)
    n = len(p)
    same_h = h[1:] == h[:-1]
    same_k = same_h & pc.equal(k.slice(1), k.slice(0, n - 1)).to_numpy(zero_copy_only=False)
    first, last = np.r_[True, ~same_k], np.r_[~same_k, True]
    group = np.cumsum(first) - 1
    sizes = np.bincount(group, minlength=int(first.sum()))
    first_h = h[first]
    twin = first_h[1:] == first_h[:-1]  # a key whose hash the next key has too
    shared_group = np.r_[False, twin] | np.r_[twin, False]
    return _Groups(p, k, first, last, sizes[group] > 1, shared_group[group])


def _involved(bucket: pa.Table) -> np.ndarray:
    """The positions of the records whose key repeats, or shares its hash with another key
    (the first pass: the second one settles them)."""
    g = _groups(bucket)
    return np.asarray(g.p[g.repeated | g.shared])


def _settle(bucket: pa.Table, limits: ServerLimits) -> tuple[np.ndarray, list[tuple[int, str]]]:
    """A bucket's superseded positions (all but the last record of each key), and the
    positions the server cannot tell from an earlier key's record, with the reason."""
    g = _groups(bucket)
    lost = np.asarray(g.p[~g.last])
    conflicts: list[tuple[int, str]] = []
    if limits.text_keys and g.shared.any():
        winners = np.flatnonzero(g.last & g.shared)  # one per key
        same: dict[Any, list[tuple[int, bytes]]] = {}
        for i in winners.tolist():
            data = g.k[i].as_py()
            value = _decoded(data)
            text = value if isinstance(value, str) else _as_text(value, limits)
            same.setdefault(("text", text) if text is not None else data, []).append(
                (int(g.p[i]), data)
            )
        for keys in same.values():
            keys.sort()
            (_, earliest), later = keys[0], keys[1:]
            for at, data in later:
                conflicts.append((at, _confused(limits, data, earliest)))
    return lost, conflicts


def _doubted(
    bucket: pa.Table, doubts: dict[int, OrderDoubt]
) -> tuple[int, tuple[int, bytes] | None]:
    """How many of a bucket's keys have a winner the table's order cannot tell from the
    record before it, and the first one's (position, key bytes): the winner's file is a
    merged rewrite (its rows of the key may be of any of the versions merged, in the
    writer's order, and may be older than a record in a file written between those
    versions), or both files lost their history (their places among themselves are a
    guess). ``doubts``: file number -> its ``OrderDoubt``."""
    g = _groups(bucket)
    file = g.p >> 32
    numbers = np.array(sorted(doubts), dtype=np.int64)
    missing = np.array([doubts[n].kind == MISSING for n in numbers.tolist()], dtype=bool)

    def kind(files: np.ndarray) -> np.ndarray:  # 0: a file in order, 1: merged, 2: missing
        at = np.minimum(np.searchsorted(numbers, files), len(numbers) - 1)
        return np.where(numbers[at] == files, np.where(missing[at], 2, 1), 0)

    winners = np.flatnonzero(g.last & ~g.first)  # the last record of a repeated key
    mine, before = file[winners], file[winners - 1]
    theirs = kind(mine)
    flagged = winners[(theirs == 1) | ((theirs == 2) & (before != mine) & (kind(before) == 2))]
    if not len(flagged):
        return 0, None
    i = int(flagged[0])
    return len(flagged), (int(g.p[i]), g.k[i].as_py())


def _confused(limits: ServerLimits, later: bytes, earlier: bytes) -> str:
    server = limits.name.split(",")[0]
    return (
        f"{server} cannot tell _id {_shown(later)} from {_shown(earlier)}, the key of an "
        f"earlier record: it keeps them as one key (MongoDB keeps them apart). Type the key "
        f"column alike in every file (or write to MongoDB) to keep both"
    )


class Superseded:
    """The plan of some files of a job, looked up batch by batch: the rows a later record of
    the same key replaces (4 bytes each), and the rows refused with their reason.

    Given as ``rows`` (all held), or as ``fetch`` (a function of some files' names: their
    sorted rows) with the files ``holding`` any, in lake order (the plan's documents come
    sorted so), each with its count of rows when known: then a file's rows are read when
    the copy first asks for them, with those of the files after it up to _FETCH_ROWS rows
    (and _FETCH_FILES files) in the same query, and only that window is held (as the store
    boundary loads a job's plan: ``boundary.load_superseded``), so what the copy holds of
    the plan does not grow with the lake."""

    def __init__(
        self,
        rows: dict[str, np.ndarray] | None = None,
        refused: dict[str, list[tuple[int, str]]] | None = None,
        *,
        fetch: Callable[[list[str]], dict[str, np.ndarray]] | None = None,
        holding: Mapping[str, int | None] | None = None,
    ) -> None:
        self._rows = {f: np.asarray(r, dtype=np.uint32) for f, r in (rows or {}).items()}
        self._refused: dict[str, tuple[np.ndarray, list[str]]] = {}
        for file, pairs in (refused or {}).items():
            pairs = sorted(pairs)
            self._refused[file] = (np.array([r for r, _ in pairs], np.int64), [w for _, w in pairs])
        self._fetch = fetch
        self._order = list(holding or {})
        self._place = {f: i for i, f in enumerate(self._order)}
        self._counts = [(holding or {})[f] for f in self._order]
        self._lock = threading.Lock()  # the copy's reader thread and its writer may both ask

    def _of(self, file: str) -> np.ndarray | None:
        at = self._place.get(file) if self._fetch is not None else None
        if at is None:
            return self._rows.get(file)
        with self._lock:
            rows = self._rows.get(file)
            if rows is None:
                window, total = [file], self._counts[at] or 0
                for name, n in zip(self._order[at + 1 :], self._counts[at + 1 :], strict=False):
                    if n is None or total + n > _FETCH_ROWS or len(window) >= _FETCH_FILES:
                        break
                    window.append(name)
                    total += n
                assert self._fetch is not None
                found = self._fetch(window)
                self._rows = {f: np.asarray(found.get(f, _EMPTY), np.uint32) for f in window}
                rows = self._rows[file]
            return rows

    @property
    def held(self) -> int:
        """How many superseded rows are held in memory now."""
        return sum(len(r) for r in list(self._rows.values()))

    def within(self, file: str, start: int, stop: int) -> np.ndarray:
        """The superseded rows of ``file`` in ``[start, stop)``, relative to ``start``."""
        rows = self._of(file)
        if rows is None:
            return _EMPTY
        lo, hi = np.searchsorted(rows, [start, stop])
        return rows[lo:hi].astype(np.int64) - start

    def refused_within(self, file: str, start: int, stop: int) -> list[tuple[int, str]]:
        """The refused rows of ``file`` in ``[start, stop)`` (relative to ``start``) and why."""
        if file not in self._refused:
            return []
        rows, reasons = self._refused[file]
        lo, hi = np.searchsorted(rows, [start, stop])
        return [(int(rows[i]) - start, reasons[i]) for i in range(lo, hi)]
