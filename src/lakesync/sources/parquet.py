"""Parquet files: reading footers (rows, statistics), small files decoded from memory,
large row groups in slices, and the columns kept from the open for the first read.

Plain Parquet lakes, Delta and (next) Iceberg data files are all read here; the dataset
scanner's own results are the reference each shortcut is held to (see ``_View``).
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from lakesync.locations import Location
from lakesync.sources.base import FileFacts, PackedStats, RawStats, with_partition_columns

#: Local Parquet files are read column chunk by column chunk. Pre-buffering (Arrow's default,
#: kept for S3, where fewer larger requests matter) caches every range read until the file
#: is done, so memory grew with file size: a million-record lake peaked 30% higher.
LOCAL_PARQUET = ds.ParquetFragmentScanOptions(pre_buffer=False)
#: int96 timestamps are nanoseconds to pyarrow unless told otherwise, which wraps dates after
#: 2262 (Spark's 9999-12-31 became 1816); microseconds cover every year
_INT96 = ds.ParquetReadOptions(coerce_int96_timestamp_unit="us")
PARQUET = ds.ParquetFileFormat(read_options=_INT96)
#: A Parquet row group whose columns read decode to more than this is read batch by batch
#: (``row_group_slices``): Arrow's dataset scanner decodes a whole row group before it cuts
#: it into batches, so a 200-column, 200,000-row group sat whole in memory.
_ROW_GROUP_BYTES = 32 << 20
#: the read buffer per column of a Parquet file read in slices (local files)
_SLICE_BUFFER = 64 << 10
#: a Parquet file of at most this size (by the listing) has the columns ``Lake.open`` is
#: asked to keep read in the same pass as its footer (one more request, none later)
KEEP_FILE_BYTES = 4 << 20
#: on S3, a Parquet file of at most this size is read whole, in one GET, when the lake is
#: opened (its footer and the kept columns from memory; see ``locations.WholeObjects``);
#: files read whole by the copy (``_SMALL_FILE_BYTES`` decoded) are fetched the same way
WHOLE_GET_BYTES = 1 << 20
_KEEP_CHUNK_FILES = 512  # kept columns of this many files are packed into one table
#: bytes of kept columns in all: past them a small file's columns are read again when asked
#: for, so that what is kept at open does not grow with the lake
_KEEP_BYTES = 4 << 20


class Kept:
    """Some columns of small files, read when the lake was opened, for the first read that
    asks for no other column (the plan of repeated keys: its key columns and the watermark):
    that read costs no request. The files' columns are packed into a few large tables (a
    small table per file would cost ~3 KB of overhead each), so memory follows the rows
    kept, not the number of files; ``Lake.drop_kept`` lets them go."""

    def __init__(self) -> None:
        self._chunks: list[pa.Table] = []
        self._pending: list[pa.Table] = []
        self._pending_paths: list[str] = []
        #: file path -> (chunk number, first row, rows)
        self._where: dict[str, tuple[int, int, int]] = {}
        self._bytes = 0

    def add(self, path: str, table: pa.Table) -> None:
        """Keep ``table`` (a file's kept columns); files are added in the lake's order. Past
        _KEEP_BYTES in all, a file's columns are not kept (its first read reads them)."""
        self._bytes += table.nbytes
        if self._bytes > _KEEP_BYTES:
            return
        if self._pending and not table.schema.equals(self._pending[0].schema):
            self._pack()
        self._pending.append(table)
        self._pending_paths.append(path)
        if len(self._pending) >= _KEEP_CHUNK_FILES:
            self._pack()

    @property
    def full(self) -> bool:
        """Whether _KEEP_BYTES are kept (no more files are)."""
        return self._bytes > _KEEP_BYTES

    def _pack(self) -> None:
        if not self._pending:
            return
        number, row = len(self._chunks), 0
        for path, table in zip(self._pending_paths, self._pending, strict=True):
            self._where[path] = (number, row, table.num_rows)
            row += table.num_rows
        packed = pa.concat_tables(self._pending).combine_chunks(pa.system_memory_pool())
        self._chunks.append(packed)
        self._pending, self._pending_paths = [], []

    def finish(self) -> Kept | None:
        """This store, packed (None when it keeps nothing)."""
        self._pack()
        return self if self._where else None

    def get(self, path: str, columns: list[str] | None, every: bool = False) -> pa.Table | None:
        """The kept ``columns`` of ``path``, in that order, or with ``every`` all its kept
        columns (None: not all of them kept)."""
        found = self._where.get(path)
        if found is None or (columns is None and not every):
            return None
        table = self._chunks[found[0]].slice(found[1], found[2])
        if every:
            return table
        if any(c not in table.schema.names for c in columns or []):
            return None
        return table.select(columns or [])


def is_local(fragment: Any) -> bool:
    """Whether a fragment reads a local file (not S3, nor bytes already in memory)."""
    return fragment.filesystem is not None and fragment.filesystem.type_name == "local"


def _group_bytes(group: Any, columns: list[str] | None) -> int:
    """A row group's size decoded (as its footer says), of ``columns`` if given."""
    if columns is None:
        return int(group.total_byte_size)
    wanted = {c.split(".", 1)[0] for c in columns}
    return sum(
        int(chunk.total_uncompressed_size)
        for chunk in (group.column(i) for i in range(group.num_columns))
        if chunk.path_in_schema.split(".", 1)[0] in wanted
    )


def large_groups(fragment: Any, columns: list[str] | None) -> bool:
    """Whether a row group of the Parquet fragment, read for ``columns``, decodes to more
    than _ROW_GROUP_BYTES (the dataset scanner would hold it whole)."""
    meta = fragment.metadata
    return any(
        _group_bytes(meta.row_group(g.id), columns) > _ROW_GROUP_BYTES for g in fragment.row_groups
    )


def row_group_slices(
    fragment: Any,
    schema: pa.Schema,
    columns: list[str] | None,
    filter: pc.Expression | None,
    size: int,
) -> Iterator[pa.RecordBatch]:
    """The Parquet fragment's rows as the dataset scanner gives them (``schema``'s columns,
    or ``columns``, after ``filter``), decoded ``size`` rows at a time.

    Memory holds a batch and each column's current page, not the row group. Row groups are
    read one at a time: on S3 each is fetched in a few large requests (pre-buffered).
    """
    view = _View.of(fragment, fragment.physical_schema, schema, columns, filter)
    local = fragment.filesystem.type_name == "local"
    source = parquet_file(
        fragment.path,
        fragment.metadata,  # the footer read at open, not read again
        filesystem=fragment.filesystem,
        pre_buffer=not local,
        buffer_size=_SLICE_BUFFER if local else 0,
    )
    try:
        for group in fragment.row_groups:
            for raw in source.iter_batches(
                size, row_groups=[group.id], columns=view.read, use_threads=False
            ):
                yield view.of_raw(raw)
    finally:
        source.close()


def in_reach(fragment: Any) -> bool:
    """Whether a fragment reads a local file or bytes in memory (fetched whole from S3):
    reading it needs no request that pre-buffering would save."""
    return fragment.filesystem is None or fragment.filesystem.type_name == "local"


def parquet_file(source: Any, metadata: Any = None, **options: Any) -> pq.ParquetFile:
    """An open Parquet file read as the dataset reads it (``_INT96``, no extension types);
    ``metadata``: its footer, already read. By default not pre-buffered: local, or in
    memory."""
    return pq.ParquetFile(
        source,
        metadata=metadata,
        coerce_int96_timestamp_unit="us",  # as the dataset reads it (_INT96)
        arrow_extensions_enabled=False,  # the dataset scanner's default
        **({"pre_buffer": False} | options),
    )


def read_small(
    fragment: Any, schema: pa.Schema, columns: list[str] | None, filter: pc.Expression | None
) -> pa.Table | None:
    """A small Parquet file's rows (local or in memory: ``in_reach``) as
    ``fragment.to_table(schema=..., columns=..., filter=...)`` gives them, read in one go
    and decoded from memory: a dataset scanner costs ~0.4 ms per file to set up, three
    times the decoding of 20 records. None when no column of the file is asked for (the
    scanner reads those)."""
    with fragment.open() as f:
        data = f.read_buffer()
    return read_plain(parquet_file(pa.BufferReader(data)), fragment, schema, columns, filter)


def read_plain(
    source: pq.ParquetFile,
    fragment: Any,
    schema: pa.Schema,
    columns: list[str] | None,
    filter: pc.Expression | None,
) -> pa.Table | None:
    """``source`` (the file of ``fragment``) read whole as the dataset scanner reads it with
    ``schema`` (see ``_View``). None when none of the columns read is in the file (the
    scanner reads those)."""
    view = _View.of(fragment, source.schema_arrow, schema, columns, filter)
    if not view.read:
        return None
    table = source.read(columns=view.read, use_threads=False)
    return pa.Table.from_batches([view.of_raw(b) for b in table.to_batches()], view.shown)


@dataclass(frozen=True)
class _View:
    """How batches read straight from a Parquet file (``pq.ParquetFile``, not the dataset
    scanner) become what the scanner gives for the file with the lake's ``schema``: the
    file's columns to read, cast to the schema's types, hive partition values, nulls for
    the columns the file lacks, then the filter and the columns asked for."""

    read: list[str]  # the file's columns to read
    target: pa.Schema  # the columns conformed before the filter (it may need others)
    shown: pa.Schema  # the columns given
    physical: set[str]
    keys: dict[str, Any]
    filter: pc.Expression | None
    columns: list[str] | None

    @classmethod
    def of(
        cls,
        fragment: Any,
        file_schema: pa.Schema,
        schema: pa.Schema,
        columns: list[str] | None,
        filter: pc.Expression | None,
    ) -> _View:
        keys = ds.get_partition_keys(fragment.partition_expression)
        physical = set(file_schema.names) - set(keys)  # a partition value wins
        names = schema.names if columns is None or filter is not None else columns
        shown = names if columns is None or filter is None else columns
        return cls(
            read=[n for n in names if n in physical],
            target=pa.schema([schema.field(n) for n in names]),
            shown=pa.schema([schema.field(n) for n in shown]),
            physical=physical,
            keys=keys,
            filter=filter,
            columns=columns,
        )

    def of_raw(self, raw: pa.RecordBatch) -> pa.RecordBatch:
        """``raw`` (the ``read`` columns of the file) as the scanner gives it."""
        batch = _conformed(raw, self.target, self.physical, self.keys)
        if self.filter is not None:
            batch = batch.filter(self.filter)
            if self.columns is not None:
                batch = batch.select(self.columns)
        return batch


def _conformed(
    raw: pa.RecordBatch, target: pa.Schema, physical: set[str], keys: dict[str, Any]
) -> pa.RecordBatch:
    """A batch read from a file with ``target``'s columns, as the dataset scanner gives it:
    the file's columns (``physical``, read) cast, a hive partition's value (``keys``; it
    wins over a column of the same name in the file, null for ``__HIVE_DEFAULT_PARTITION__``),
    and nulls for a column the file lacks."""
    if raw.schema.equals(target):  # the file holds the columns as they are read
        return pa.RecordBatch.from_arrays(raw.columns, schema=target)
    arrays = []
    at = {name: i for i, name in enumerate(raw.schema.names)}
    for f in target:
        if f.name in physical:
            column = raw.column(at[f.name])
            arrays.append(column if column.type == f.type else column.cast(f.type))
        elif keys.get(f.name) is not None:  # hive text cast as the scanner casts it
            value = pa.scalar(keys[f.name])
            arrays.append(
                pa.repeat(value if value.type == f.type else value.cast(f.type), raw.num_rows)
            )
        else:
            arrays.append(pa.nulls(raw.num_rows, f.type))
    return pa.RecordBatch.from_arrays(arrays, schema=target)


def column_stats(meta: Any, schema: pa.Schema, partition: Iterable[str] = ()) -> PackedStats | None:
    """Min, max and null count over a file's row groups of its top-level integer, date and
    timestamp columns, from the footer, packed (None: none); a column some row group has
    no statistics for is left out (it must be read to be known). So are the columns of
    the file's hive ``partition`` (the partition's value is read, not the file's column)
    and a path the footer gives twice (a column "a.b" and a struct a's field b: which is
    which cannot be told)."""
    out: dict[str, RawStats] = {}
    wanted = {f.name for f in schema if _stats_kind(f.type)} - set(partition)
    groups = [meta.row_group(g) for g in range(meta.num_row_groups)] if wanted else []
    if not groups:
        return None
    paths = Counter(groups[0].column(i).path_in_schema for i in range(meta.num_columns))
    wanted = {name for name in wanted if paths[name] == 1}
    for i in range(meta.num_columns):
        first = groups[0].column(i)
        name = first.path_in_schema
        if name not in wanted or first.physical_type not in ("INT32", "INT64"):
            continue
        scalar_type = _stats_type(first.statistics, schema.field(name).type)
        if scalar_type is None:
            continue
        low = high = None
        nulls = 0
        for group in groups:
            st = group.column(i).statistics
            if st is None or not st.has_null_count:
                break
            nulls += st.null_count
            if st.has_min_max:
                low = st.min_raw if low is None else min(low, st.min_raw)
                high = st.max_raw if high is None else max(high, st.max_raw)
            elif st.null_count != group.num_rows:
                break
        else:
            # raw values, the name and type shared between files (``RawStats``)
            out[sys.intern(name)] = (low, high, nulls, scalar_type)
    return PackedStats.of(out)


_UNITS = {"MILLIS": "ms", "MICROS": "us", "NANOS": "ns"}
_TIMESTAMPS = {u: pa.timestamp(u) for u in _UNITS.values()}  # one object each: RawStats


def _stats_kind(t: pa.DataType) -> bool:
    """Whether ``_stats_type`` may read statistics of a column of Arrow type ``t``."""
    return bool(pa.types.is_timestamp(t) or pa.types.is_date(t) or pa.types.is_signed_integer(t))


def _stats_type(st: Any, arrow_type: pa.DataType) -> pa.DataType | None:
    """The Arrow type of a column's raw statistics (None: not a watermark-like column, or
    statistics whose meaning is unclear, such as unsigned integers)."""
    if st is None:
        return None
    logical = st.logical_type
    kind = logical.type if logical is not None else "NONE"
    if kind == "TIMESTAMP" and pa.types.is_timestamp(arrow_type):
        text = str(logical)  # e.g. Timestamp(isAdjustedToUTC=true, timeUnit=microseconds, ...)
        unit = next((u for k, u in _UNITS.items() if k.lower() in text.lower()), None)
        return None if unit is None else _TIMESTAMPS[unit]
    if kind == "DATE" and pa.types.is_date(arrow_type):
        return pa.date32()
    if kind in ("INT", "NONE") and pa.types.is_signed_integer(arrow_type):
        if kind == "INT" and "isSigned=false" in str(logical):
            return None
        return pa.int64()
    return None


def inspect_file(
    loc: Location,
    path: str,
    expr: pc.Expression | None,
    keys: list[tuple[str, str | None]],
    size: int | None,
    keep: list[str] | None = None,
) -> tuple[FileFacts, pa.Schema, pa.Table | None]:
    """A Parquet file's facts and schema (plus hive ``keys``) from its footer; with ``keep``,
    those columns of a file of at most ``KEEP_FILE_BYTES`` are read right after the footer,
    by the same fragment (which reuses the footer: one more request on S3, coalesced)."""
    table = None
    data = None
    small = size is not None and size <= WHOLE_GET_BYTES
    if small and loc.objects is not None:
        data = loc.objects.get(path, size)  # one GET: footer and kept columns
    if data is not None:
        fragment = PARQUET.make_fragment(data, partition_expression=expr)
    else:
        fragment = PARQUET.make_fragment(
            path, filesystem=loc.fs, partition_expression=expr, file_size=size
        )
    schema = fragment.physical_schema  # reads the footer (one GET on S3)
    schema = with_partition_columns(schema, keys)
    meta = fragment.metadata
    decoded = sum(meta.row_group(g).total_byte_size for g in range(meta.num_row_groups))
    stats = column_stats(meta, schema, (name for name, _ in keys))
    facts = FileFacts(path, size, meta.num_rows, expr, stats, int(decoded))
    if keep is not None and size is not None and size <= KEEP_FILE_BYTES:
        columns = [c for c in keep if c in schema.names]
        if in_reach(fragment):  # no scanner: ~0.3 ms of setup per file
            with fragment.open() as f:  # the footer just read is reused
                source = parquet_file(f, meta)
                table = read_plain(source, fragment, schema, columns, None)
        if table is None:
            scan: dict[str, Any] = {"use_threads": False}
            if loc.fs.type_name == "local":
                scan["fragment_scan_options"] = LOCAL_PARQUET
            scan["memory_pool"] = pa.system_memory_pool()
            table = fragment.to_table(schema=schema, columns=columns, **scan)
    return facts, schema, table  # the fragment's footer is dropped: ~30 KB per file
