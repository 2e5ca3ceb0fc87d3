"""The data-lake reader: list, count and stream records from Parquet, CSV or NDJSON files.

A lake is a directory (hive partitions such as ``projectId=P-003/`` become string columns),
a single file, a glob, or ``s3://bucket/prefix``; a directory holding ``_delta_log`` is a
Delta table, read at one version (see ``delta.py``). Each file is read through its own
``pyarrow.dataset`` fragment with its own physical schema, so one odd file does not change
how the others are read, and batches stream with bounded memory.
"""

from __future__ import annotations

import bisect
import collections
import itertools
import logging
import os
import queue
import re
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar
from urllib.parse import unquote

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from lakesync.config import Settings, get_settings
from lakesync.delta import LOG_DIR, is_delta_table, snapshot
from lakesync.errors import SourceError
from lakesync.jsonarray import is_json_array, ndjson_copy
from lakesync.locations import (
    Location,
    WholeObjects,
    dot_segment_after_glob,
    first_glob_segment,
    read_error,
    resolve,
)

logger = logging.getLogger(__name__)

_EXTENSIONS = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".json": "json"}
_EXTENSIONS |= {".jsonl": "json", ".ndjson": "json"}
_FORMATS = {"parquet": ds.ParquetFileFormat, "csv": ds.CsvFileFormat, "json": ds.JsonFileFormat}
_ALIASES = {"pq": "parquet", "jsonl": "json", "ndjson": "json", "delta": "delta"}
_ALIASES |= {f: f for f in _FORMATS}
_GLOB = {"**/": "(?:[^/]*/)*", "**": ".*", "*": "[^/]*", "?": "[^/]"}
#: Decode at most two record batches ahead of the consumer, in the reading thread: memory
#: stays flat. Decoded data comes from the system allocator: Arrow's default (mimalloc) keeps
#: the pages its threads freed, so peak memory grew with the size of the largest file read.
_STREAMING = {
    "batch_readahead": 2,
    "fragment_readahead": 1,
    "use_threads": False,
    "memory_pool": pa.system_memory_pool(),
}
#: Local Parquet files are read column chunk by column chunk. Pre-buffering (Arrow's default,
#: kept for S3, where fewer larger requests matter) caches every range read until the file
#: is done, so memory grew with file size: a million-record lake peaked 30% higher.
_LOCAL_PARQUET = ds.ParquetFragmentScanOptions(pre_buffer=False)
#: int96 timestamps are nanoseconds to pyarrow unless told otherwise, which wraps dates after
#: 2262 (Spark's 9999-12-31 became 1816); microseconds cover every year
_INT96 = ds.ParquetReadOptions(coerce_int96_timestamp_unit="us")
_PARQUET = ds.ParquetFileFormat(read_options=_INT96)
#: Lake batches a reader thread prepares while the consumer writes the current one.
_PREFETCH = 1
_INSPECT_THREADS = 32  # footers / headers read in parallel at open on S3
_S3_READ_THREADS = 32  # on S3 a small file's read is mostly waiting for the round trip
_READ_AHEAD = 32  # small files read ahead at most
_SMALL_FILE_ROWS = 10_000  # a file of at most this many rows (or one batch) is read whole
#: ... and of at most this many bytes decoded (a wide file of few rows is streamed instead),
#: while the files read ahead hold at most _READ_AHEAD_BYTES decoded
_SMALL_FILE_BYTES = 8 << 20
_READ_AHEAD_BYTES = 64 << 20
#: A Parquet row group whose columns read decode to more than this is read batch by batch
#: (``_row_group_slices``): Arrow's dataset scanner decodes a whole row group before it cuts
#: it into batches, so a 200-column, 200,000-row group sat whole in memory.
_ROW_GROUP_BYTES = 32 << 20
#: the read buffer per column of a Parquet file read in slices (local files)
_SLICE_BUFFER = 64 << 10
#: a Parquet file of at most this size (by the listing) has the columns ``Lake.open`` is
#: asked to keep read in the same pass as its footer (one more request, none later)
_KEEP_FILE_BYTES = 4 << 20
#: on S3, a Parquet file of at most this size is read whole, in one GET, when the lake is
#: opened (its footer and the kept columns from memory; see ``locations.WholeObjects``);
#: files read whole by the copy (``_SMALL_FILE_BYTES`` decoded) are fetched the same way
_WHOLE_GET_BYTES = 1 << 20
_KEEP_CHUNK_FILES = 512  # kept columns of this many files are packed into one table
#: bytes of kept columns in all: past them a small file's columns are read again when asked
#: for, so that what is kept at open does not grow with the lake (issue #27)
_KEEP_BYTES = 4 << 20


@dataclass(frozen=True)
class Position:
    """A checkpoint in the lake: a file index and the rows of that file already consumed."""

    file_index: int = 0
    row: int = 0


#: a column's (min, max, null count) over a whole file, from its Parquet footer; min and
#: max are None when every value is null
ColumnStats = tuple[pa.Scalar | None, pa.Scalar | None, int]


@dataclass(frozen=True, slots=True)
class FileFacts:
    """What a lake keeps of one data file between reads: no pyarrow fragment (its footer
    costs tens of KB), only what opening the file again without a round trip needs.

    ``size`` comes from the listing (so no HEAD request is needed to read the file),
    ``rows`` from the Parquet footer (None for CSV and JSON), ``stats`` are the footer's
    statistics of the file's integer, date and timestamp columns (watermark pruning).
    """

    path: str
    size: int | None = None
    rows: int | None = None
    expr: pc.Expression | None = None
    stats: dict[str, ColumnStats] | None = None
    decoded: int | None = None  # Parquet: bytes of its row groups decoded (the footer's sum)


@dataclass(frozen=True)
class Segment:
    """The rows of one file in a batch: batch rows ``[offset, offset + rows)`` are rows
    ``[start_row, start_row + rows)`` of file ``file_index`` (``ordinal`` in the whole lake)."""

    file: str
    file_index: int
    ordinal: int
    start_row: int
    rows: int
    offset: int = 0

    def file_row(self, row: int) -> int:
        """The file's row of batch row ``row``."""
        return self.start_row + row - self.offset


@dataclass
class LakeBatch:
    """Up to batch_size rows of the lake, starting at row ``start_row`` of ``file``.

    A batch may span files (a lake of many small files is still written in whole batches):
    ``segments`` says which rows came from which file, and ``end`` where the next batch starts.
    """

    table: pa.Table
    file: str
    file_index: int
    start_row: int
    #: the file's index in the job's whole lake (``file_index`` counts from a partition's
    #: first file): lake positions in markers, rejections and the plan use it
    ordinal: int = -1
    #: what ``batches(prepare=...)`` computed from the batch ahead of time (None if it failed)
    prepared: Any = field(default=None, repr=False, compare=False)
    segments: list[Segment] = field(default_factory=list, repr=False)
    _offsets: list[int] = field(default_factory=list, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.ordinal < 0:
            self.ordinal = self.file_index
        if not self.segments:
            self.segments = [
                Segment(
                    self.file,
                    self.file_index,
                    self.ordinal,
                    self.start_row,
                    int(self.table.num_rows),
                )
            ]

    @property
    def end(self) -> Position:
        """The position just after this batch: where a resumed read starts."""
        last = self.segments[-1]
        return Position(last.file_index, last.start_row + last.rows)

    def segment_of(self, row: int) -> Segment:
        """The segment holding batch row ``row``."""
        if len(self.segments) == 1:
            return self.segments[0]
        if len(self._offsets) != len(self.segments):  # asked for each row: built once
            self._offsets = [s.offset for s in self.segments]
        return self.segments[bisect.bisect_right(self._offsets, row) - 1]

    def at(self, row: int) -> tuple[int, int]:
        """The lake position (ordinal, file row) of batch row ``row``."""
        seg = self.segment_of(row)
        return seg.ordinal, seg.file_row(row)

    def holds(self, ordinal: int, file_row: int) -> bool:
        """Whether the lake position (ordinal, file row) is one of this batch's rows."""
        return any(
            s.ordinal == ordinal and s.start_row <= file_row < s.start_row + s.rows
            for s in self.segments
        )


def _joined(pieces: list[LakeBatch]) -> LakeBatch:
    """One batch of consecutive pieces of the lake (whose tables have the same schema)."""
    if len(pieces) == 1:
        return pieces[0]
    segments, offset = [], 0
    for piece in pieces:
        for s in piece.segments:
            segments.append(replace(s, offset=offset + s.offset))
        offset += piece.table.num_rows
    first = pieces[0]
    table = pa.concat_tables([p.table for p in pieces])
    return LakeBatch(
        table, first.file, first.file_index, first.start_row, first.ordinal, segments=segments
    )


def _sliced(piece: LakeBatch, rows: int) -> tuple[LakeBatch, LakeBatch]:
    """A one-file piece cut after ``rows`` rows."""
    head = LakeBatch(
        piece.table.slice(0, rows), piece.file, piece.file_index, piece.start_row, piece.ordinal
    )
    tail = LakeBatch(
        piece.table.slice(rows), piece.file, piece.file_index, piece.start_row + rows, piece.ordinal
    )
    return head, tail


def _across_files(pieces: Iterator[LakeBatch], size: int) -> Iterator[LakeBatch]:
    """Batches of exactly ``size`` rows made of one-file pieces, spanning files.

    Fewer rows only at the end, or where the next file's columns differ (name, type or
    order): records of such files are never put in one table, so each is stored exactly
    as its own file holds it.
    """
    pending: list[LakeBatch] = []
    rows = 0
    for piece in pieces:
        if pending and not piece.table.schema.equals(pending[0].table.schema, check_metadata=False):
            yield _joined(pending)
            pending, rows = [], 0
        pending.append(piece)
        rows += piece.table.num_rows
        while rows >= size:
            head: list[LakeBatch] = []
            need = size
            while need:
                first = pending.pop(0)
                n = first.table.num_rows
                if n > need:
                    first, rest = _sliced(first, need)
                    pending.insert(0, rest)
                    n = need
                head.append(first)
                need -= n
            rows -= size
            yield _joined(head)
    if pending:
        yield _joined(pending)


class _Kept:
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

    def finish(self) -> _Kept | None:
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


class _Opens:
    """A thread-safe count of file opens."""

    def __init__(self) -> None:
        self.count = 0
        self._lock = threading.Lock()

    def add(self) -> None:
        with self._lock:
            self.count += 1


@dataclass(frozen=True)
class Listing:
    """A lake's files as one open found them, compact enough to keep in a job's plan:
    per file its size, rows and the number of its schema (most files share one)."""

    root: str
    format: str
    schemas: list[pa.Schema]
    #: file name (as ``Lake.file_name`` gives it) -> (size in bytes, rows, schema number)
    files: dict[str, tuple[int, int, int]]


class Lake:
    """A sorted set of same-format data files read as one stream; build it with ``open``.

    ``format`` is parquet, csv, json or delta; ``version`` is the Delta table version read
    (None for plain files), ``since_version`` the version whose files were left out (None:
    all the version's files). ``files`` are the data files' URIs in reading order: a Position's
    file index points into it, and ``file_name`` gives the stable name a checkpoint keeps.
    """

    def __init__(
        self,
        uri: str,
        fmt: str,
        files: list[str],
        facts: list[FileFacts],
        schemas: list[pa.Schema],
        endpoint: str | None,
        *,
        fs: Any = None,
        fragments: list[Any] | None = None,
        root: str = "",
        version: int | None = None,
        since_version: int | None = None,
        schema: pa.Schema | None = None,
        first_index: int = 0,
        renames: dict[str, str] | None = None,
        live: list[pa.BooleanArray | None] | None = None,
        views: dict[str, pa.DataType] | None = None,
        objects: WholeObjects | None = None,
    ) -> None:
        self.uri, self.format, self.files, self.version = uri, fmt, files, version
        #: S3: small files fetched whole, one request each (None: read through ``fs``)
        self._objects = objects
        #: the index of ``files[0]`` in the whole lake (non-zero for a partition's files)
        self.first_index = first_index
        self.since_version = since_version
        #: Delta: physical -> logical column names, and each file's live rows (None: all)
        self._renames = renames or {}
        self._live = live or [None] * len(files)
        #: columns whose nested fields column mapping renamed: their logical types
        self._views = views or {}
        self._mapped = bool(self._renames or self._views)
        #: each file's facts; CSV and JSON files also keep their (small) fragment, Parquet
        #: files are opened again from their facts when read (see ``_fragment``)
        self._facts, self._schemas, self._endpoint = facts, schemas, endpoint
        self._fragments = fragments or [None] * len(files)
        self._fs = fs
        self._root = root.rstrip("/")
        self._parquet = fmt in ("parquet", "delta")
        self._row_counts: list[int] | None = None
        #: files the reading filter rules out by their statistics (see ``rule_out``)
        self._ruled_out: frozenset[int] = frozenset()
        #: files opened for reading so far, shared with the lakes ``only`` makes of this one
        #: (footers read at open not counted)
        self._opens = _Opens()
        #: columns of small files read at open (see ``_Kept``); None once dropped
        self._kept: _Kept | None = None
        if schema is not None:
            self.schema: pa.Schema = schema
            return
        try:
            self.schema = pa.unify_schemas(schemas, promote_options="permissive")
        except (pa.ArrowException, TypeError):  # e.g. a column is double here, string there
            fields: dict[str, pa.Field] = {}
            for field in (f for schema in schemas for f in schema):
                fields.setdefault(field.name, field)
            self.schema = pa.schema(list(fields.values()))

    @classmethod
    def open(
        cls,
        uri: str,
        *,
        format: str | None = None,
        settings: Settings | None = None,
        version: int | None = None,
        since_version: int | None = None,
        only: list[str] | None = None,
        first_index: int = 0,
        known: Listing | None = None,
        keep: list[str] | None = None,
    ) -> Lake:
        """List and inspect the lake at ``uri``; raise SourceError if it cannot be read.

        With ``only`` (names as ``file_name`` gives them), the lake is reduced to those files
        as ``Lake.only`` does, and only their footers are read: a partition of a lake of
        many files opens its own files, not all of them.

        ``known`` is what an earlier open of the same lake found (``Lake.listing``, kept in
        the job's plan): a file listed there with the same size is not inspected again, so
        partitions and resumed runs list the lake but read no footer.

        A directory holding ``_delta_log`` is read as a Delta table (its latest version,
        or ``version``) unless ``format`` names a plain file format. With ``since_version``
        only the files added to the table after that version are read: what an incremental
        copy needs, since Delta never changes a file in place.

        ``keep`` names columns to read from each small Parquet file (up to a few MB) in the
        same pass as its footer: the first read asking only for some of them (the plan of
        repeated keys) opens no file. They are kept until ``drop_kept``.
        """
        fmt_given = None if format is None else _ALIASES.get(format.lower())
        if format is not None and fmt_given is None:
            raise SourceError(f"Unknown lake format {format!r}: use parquet, csv, json or delta.")
        if version is not None and (version < 0 or fmt_given not in (None, "delta")):
            raise SourceError(
                f"Invalid Delta version {version} for {uri}: a version (>= 0) can only "
                "be read from a Delta table."
            )
        loc = resolve(uri, settings or get_settings())
        if dot_segment_after_glob(loc.path):  # refused before the filesystem is asked
            raise SourceError(
                f"The glob {loc.show(loc.path)} has a '.' or '..' segment after a wildcard, "
                "which lakesync does not follow (it could lead out of the lake). Remove it: "
                "put the folder meant before the first wildcard.",
                uri=uri,
            )
        segments = loc.path.split("/")
        glob_at = first_glob_segment(segments)
        base, pattern = loc.path, None
        if glob_at is not None:
            base = "/".join(segments[:glob_at]) or "/"
            pattern = _glob_regex("/".join(segments[glob_at:]))
        try:
            info = loc.fs.get_file_info(base)
        except (OSError, pa.ArrowException) as e:
            raise read_error(e, loc.show(base), "", loc.endpoint, listing=True) from e
        maybe_delta = glob_at is None and fmt_given in (None, "delta")
        if maybe_delta and info.type == pafs.FileType.Directory and is_delta_table(loc, base):
            table = cls._open_delta(uri, loc, base, version, since_version)
            return table if only is None else table.only(only, first_index)
        if fmt_given == "delta" or version is not None or since_version is not None:
            raise SourceError(
                f"{loc.show(loc.path)} is not a Delta table (no {LOG_DIR} folder in it), "
                "so it has no Delta format or version to read. Point the source at the "
                "table's folder, or read plain Parquet, CSV or JSON files without them.",
                uri=uri,
            )
        if glob_at is None and loc.path.endswith("/" + LOG_DIR):
            raise SourceError(f"{loc.show(loc.path)} is a Delta log: use its parent folder.")
        planned = _planned(loc, base, fmt_given, only, known)
        if planned is not None:  # a partition: its files, from the job's listing
            fmt, root, found, sizes = planned
            if not loc.is_s3:
                gone = [n for n, p in zip(only or [], found, strict=True) if not os.path.isfile(p)]
                _refuse_gone(gone, uri)
        else:
            try:
                found, single, sizes = _list_files(loc, base, pattern, info)
            except (OSError, pa.ArrowException) as e:
                raise read_error(e, loc.show(base), "", loc.endpoint, listing=True) from e
            fmt = _choose_format([loc.show(p) for p in found], fmt_given, loc.show(base), single)
            if not single and any(_format_of(p) for p in found):
                found = [p for p in found if _format_of(p) == fmt]  # skip README.md, *.crc...
            if not found:
                raise SourceError(
                    f"No data files found in {loc.show(loc.path)}: expected .parquet/.pq, .csv "
                    "or .json/.jsonl/.ndjson files (hidden and _-prefixed files are skipped). "
                    "Check the path or the glob.",
                    uri=uri,
                )
            root = base.rsplit("/", 1)[0] if single else base
            if only is not None:
                found = _picked(found, root, only, uri)
        if not loc.is_s3:  # the files read (a partition's own), not every file listed
            _refuse_links_out(base, found)
        keys = [_partition(p[len(root) :].lstrip("/")) for p in found]
        items = [(p, _hive_expression(k), k) for p, k in zip(found, keys, strict=True)]
        usable = known is not None and known.format == fmt and known.root == loc.show(root)
        kept = _Kept() if keep and fmt == "parquet" else None
        inspected = _inspect(loc, fmt, items, sizes, known if usable else None, root, keep, kept)
        logger.info("Opened lake %s: %d %s file(s)", loc.show(loc.path), len(found), fmt)
        files = [loc.show(p) for p in found]
        lake = cls(
            uri,
            fmt,
            files,
            [f for f, _, _ in inspected],
            [s for _, s, _ in inspected],
            loc.endpoint,
            fs=loc.fs,
            fragments=[f for _, _, f in inspected],
            root=loc.show(root),
            first_index=first_index,
            objects=loc.objects,
        )
        lake._kept = None if kept is None else kept.finish()
        return lake

    @classmethod
    def _open_delta(
        cls, uri: str, loc: Location, base: str, version: int | None, since: int | None
    ) -> Lake:
        snap = snapshot(loc, base, version)
        chosen = snap.files
        if since is not None:
            if since > snap.version:
                raise SourceError(
                    f"Cannot read the files added to the Delta table {uri} after version "
                    f"{since}: the table is at version {snap.version}. Copy it in mode full.",
                    uri=uri,
                )
            before = {p for p, _ in snapshot(loc, base, since).files}
            chosen = [(p, expr) for p, expr in snap.files if p not in before]
        if not loc.is_s3:  # the log may name a symlink, or a path out of the table
            _refuse_links_out(base, [p for p, _ in chosen])
        inspected = _inspect(loc, "delta", [(p, expr, []) for p, expr in chosen])
        facts = [f for f, _, _ in inspected]
        files = [loc.show(p) for p, _ in chosen]
        scanned = snap.physical or snap.schema
        schemas = [scanned] * len(files)  # the table's schema (physical names), not each file's
        views = {
            f.name: f.type for f, p in zip(snap.schema, scanned, strict=True) if p.type != f.type
        }
        live = [snap.live.get(p) for p, _ in chosen]
        added = "" if since is None else f" added since version {since}"
        logger.info(
            "Opened Delta table %s version %d: %d file(s)%s", uri, snap.version, len(files), added
        )
        return cls(
            uri,
            "delta",
            files,
            facts,
            schemas,
            loc.endpoint,
            fs=loc.fs,
            root=loc.show(base),
            version=snap.version,
            schema=snap.schema,
            since_version=since,
            renames=snap.renames,
            live=live,
            views=views,
            objects=loc.objects,
        )

    def file_name(self, index: int) -> str:
        """The stable name of file ``index``: its path relative to the lake's root folder.

        A checkpoint keeps it beside the file index, so that a resumed run can check (with
        ``resume_position``) that the index still points at the same file.
        """
        file = self.files[index]
        return file[len(self._root) :].lstrip("/") if file.startswith(self._root) else file

    def only(self, names: list[str], first_index: int = 0) -> Lake:
        """This lake reduced to the files named (as ``file_name`` gives them), in that order.

        ``first_index`` is the whole lake's index of the first file named: the batches'
        ``ordinal`` keeps counting files as the whole lake does.

        A partition reads exactly the files it was planned with: a file added to the lake
        since is left to the next copy, and one that is gone stops it (SourceError, naming
        the file) instead of shifting every range after it.
        """
        index = {self.file_name(i): i for i in range(len(self.files))}
        _refuse_gone([name for name in names if name not in index], self.uri)
        picked = [index[name] for name in names]
        part = Lake(
            self.uri,
            self.format,
            [self.files[i] for i in picked],
            [self._facts[i] for i in picked],
            [self._schemas[i] for i in picked],
            self._endpoint,
            fs=self._fs,
            fragments=[self._fragments[i] for i in picked],
            root=self._root,
            version=self.version,
            since_version=self.since_version,
            schema=self.schema,
            renames=self._renames,
            live=[self._live[i] for i in picked],
            views=self._views,
            first_index=first_index,
            objects=self._objects,
        )
        if self._row_counts is not None:
            part._row_counts = [self._row_counts[i] for i in picked]
        part._opens = self._opens
        part._kept = self._kept
        return part

    def resume_position(self, position: Position, file_name: str | None) -> Position:
        """``position`` checked against the lake as it is now; raise SourceError if stale.

        ``file_name`` is what ``file_name(position.file_index)`` returned when the checkpoint
        was taken (None for checkpoints without one: only the index range is checked). If
        files were added or removed before it, the position follows the file to its new
        index; if the file is gone, or now has fewer rows than the checkpoint consumed, the
        checkpoint cannot be trusted and the job must start over.
        """
        names = [self.file_name(i) for i in range(len(self.files))]
        index = position.file_index
        if file_name is None:
            if not 0 <= index <= len(self.files):
                raise SourceError(
                    f"The checkpoint points at file {index} but {self.uri} now has "
                    f"{len(self.files)} files. Start a new copy.",
                    uri=self.uri,
                )
            return position
        if index >= len(names) or names[index] != file_name:
            if file_name not in names:
                raise SourceError(
                    f"The checkpoint's file {file_name} is no longer in {self.uri} (the lake "
                    "changed under the job). Start a new copy; an incremental copy only "
                    "reads what changed.",
                    uri=self.uri,
                    file=file_name,
                )
            logger.warning(
                "Lake %s changed since the checkpoint: %s moved from file %d to file %d",
                self.uri,
                file_name,
                index,
                names.index(file_name),
            )
            index = names.index(file_name)
        if self._parquet and position.row > self.file_row_counts()[index]:
            raise SourceError(
                f"The checkpoint consumed {position.row:,} rows of {self.files[index]}, which "
                f"now has {self.file_row_counts()[index]:,} (rewritten since). Start a new copy.",
                uri=self.uri,
                file=self.files[index],
            )
        return Position(index, position.row)

    def listing(self) -> Listing | None:
        """What this open found about each file, for ``Lake.open(known=...)`` (None for
        Delta tables, which have their own log, and for CSV or JSON, which have no footer)."""
        if self.format != "parquet" or any(f.size is None or f.rows is None for f in self._facts):
            return None
        numbers: dict[int, int] = {}
        schemas: list[pa.Schema] = []
        files: dict[str, tuple[int, int, int]] = {}
        for i, (facts, schema) in enumerate(zip(self._facts, self._schemas, strict=True)):
            number = numbers.setdefault(id(schema), len(schemas))
            if number == len(schemas):
                schemas.append(schema)
            files[self.file_name(i)] = (int(facts.size or 0), int(facts.rows or 0), number)
        return Listing(self._root, self.format, schemas, files)

    def file_stats(self, index: int, column: str) -> tuple[ColumnStats, int] | None:
        """The footer statistics of ``column`` in file ``index`` and the file's rows; None
        when they are not known (no statistics, CSV or JSON, a Delta file with deleted rows
        or renamed columns): then only reading the file tells."""
        facts = self._facts[index]
        if facts.stats is None or self._mapped or self._live[index] is not None:
            return None
        found = facts.stats.get(column)
        return None if found is None or facts.rows is None else (found, facts.rows)

    @property
    def opened(self) -> int:
        """How many times a file of this lake was opened to be read."""
        return self._opens.count

    def drop_kept(self) -> None:
        """Let the columns read at open go (see ``Lake.open``'s ``keep``); reads after this
        open the files."""
        self._kept = None

    def rule_out(self, indexes: Iterable[int]) -> None:
        """Files whose statistics show that the reading filter keeps none of their rows:
        ``batches`` and ``count_rows`` with a filter do not open them (the caller vouches
        that every filter it reads with excludes them)."""
        self._ruled_out = frozenset(indexes)

    def _fragment(self, index: int, whole: bool = False) -> Any:
        """File ``index`` as a pyarrow fragment, opened afresh: no footer is kept between
        reads, so memory does not grow with the number of files. The size from the listing
        spares a HEAD request on S3; a small file to be read ``whole`` is fetched in one
        request there and read from memory."""
        made = self._fragments[index]
        if made is not None:
            return made
        facts = self._facts[index]
        self._opens.add()
        size = facts.size
        if whole and self._objects is not None and size is not None and size <= _SMALL_FILE_BYTES:
            data = self._guard(index, self._objects.get, facts.path, size)
            if data is not None:
                return self._guard(
                    index, _PARQUET.make_fragment, data, partition_expression=facts.expr
                )
        return self._guard(
            index,
            _PARQUET.make_fragment,
            facts.path,
            filesystem=self._fs,
            partition_expression=facts.expr,
            file_size=facts.size,
        )

    def has_column(self, name: str) -> bool:
        """Whether some file of the lake (or a partition key) has this column."""
        return name in self.schema.names

    def file_row_counts(self) -> list[int]:
        """Rows per file, unfiltered (Parquet: from the footers, no data read)."""
        if self._row_counts is None:
            if self._parquet:  # less the rows a deletion vector removed
                self._row_counts = [
                    int(f.rows or 0) - (0 if keep is None else len(keep) - keep.true_count)
                    for f, keep in zip(self._facts, self._live, strict=True)
                ]
            else:
                self._row_counts = [
                    int(self._guard(i, self._fragment(i).count_rows))
                    for i in range(len(self.files))
                ]
        return list(self._row_counts)

    def count_rows(self, filter: pc.Expression | None = None) -> int:
        """Rows after ``filter``, counted exactly as ``batches`` counts them."""
        if filter is None:
            return sum(self.file_row_counts())
        total = 0
        if self._mapped or any(keep is not None for keep in self._live):  # filtered as read
            for i in range(len(self.files)):
                if i not in self._ruled_out:
                    total += sum(
                        b.table.num_rows for b in self._file_batches(i, 1 << 16, 0, filter, None)
                    )
            return total
        for i, schema in enumerate(self._schemas):
            if i in self._ruled_out:
                continue
            scanner = self._guard(
                i, ds.Scanner.from_fragment, self._fragment(i), schema=schema, filter=filter
            )
            total += int(self._guard(i, scanner.count_rows))
        return total

    def batches(
        self,
        batch_size: int,
        start: Position = Position(),
        *,
        stop_file: int | None = None,
        filter: pc.Expression | None = None,
        columns: list[str] | None = None,
        prepare: Callable[[LakeBatch], Any] | None = None,
    ) -> Iterator[LakeBatch]:
        """Stream batches of exactly ``batch_size`` rows (fewer at the end) from ``start``.

        Batches span files (see ``_across_files``); ``batch.end`` is where the next starts.

        A reader thread reads (and decodes) the next batch while the caller works on this
        one. ``prepare``, if given, runs there too, on each batch, and its result is kept
        in ``batch.prepared`` (None if it raised: the caller does the work itself then, and
        meets the error where it always did).
        """
        if batch_size < 1 or start.file_index < 0 or start.row < 0:
            raise ValueError(f"invalid batch_size {batch_size} or start {start}")
        if columns is not None and (missing := [c for c in columns if not self.has_column(c)]):
            raise SourceError(
                f"Column(s) {missing} are not in the lake {self.uri}, which has "
                f"{self.schema.names}. Fix the column names.",
                uri=self.uri,
            )
        stop = len(self.files) if stop_file is None else min(stop_file, len(self.files))
        files = self._files_read_ahead(
            range(start.file_index, stop), start, batch_size, filter, columns
        )
        stream = _across_files(itertools.chain.from_iterable(files), batch_size)
        yield from _prefetched(stream if prepare is None else _prepared(stream, prepare), _PREFETCH)

    def _files_read_ahead(
        self,
        indexes: range,
        start: Position,
        size: int,
        filter: pc.Expression | None,
        columns: list[str] | None,
    ) -> Iterator[Iterable[LakeBatch]]:
        """Each file's batches, in order. Small Parquet files (a lake of many small files, as
        Spark writes them) are read whole; on S3 several at a time, by a bounded pool of
        threads: one file after another would pay each file's latency (a round trip or two)
        in turn. Local files are read one after another in this thread: a pool spent more
        CPU handing the GIL and futures around than reading 20-row files (0.55 ms of CPU per
        file against 0.27), and the copy shares its cores with MongoDB. Larger files are
        streamed batch by batch, so memory stays bounded by batches."""

        def batches(index: int, whole: bool = False) -> Iterator[LakeBatch]:
            skip = start.row if index == start.file_index else 0
            return self._file_batches(index, size, skip, filter, columns, whole)

        counts = self.file_row_counts() if self._parquet else None
        small = max(size, _SMALL_FILE_ROWS)

        def weight(index: int) -> int:
            """A file read whole: its decoded size (at least 1); one streamed: 0."""
            if counts is None or counts[index] > small:
                return 0
            decoded = self._decoded_bytes(index)
            return 0 if decoded > _SMALL_FILE_BYTES else max(decoded, 1)

        wanted = (i for i in indexes if filter is None or i not in self._ruled_out)
        s3 = self.files[0].startswith("s3://") if self.files else False
        if not s3:  # one after another, in this thread
            for index in wanted:
                yield batches(index, weight(index) > 0)
            return
        threads = _S3_READ_THREADS
        with ThreadPoolExecutor(threads, thread_name_prefix="lake-read") as pool:
            ahead: collections.deque[tuple[int, Future[list[LakeBatch]] | None, int]] = (
                collections.deque()
            )
            held = 0  # decoded bytes of the files read ahead
            for index in wanted:  # not those the filter rules out by their statistics
                cost = weight(index)
                future = pool.submit(list, batches(index, True)) if cost else None
                ahead.append((index, future, cost))
                held += cost
                while (
                    len(ahead) > max(_READ_AHEAD, threads)
                    or held > _READ_AHEAD_BYTES
                    or (ahead and ahead[0][1] is None)
                ):
                    first, future, cost = ahead.popleft()
                    held -= cost
                    yield batches(first) if future is None else future.result()
            while ahead:
                first, future, _ = ahead.popleft()
                yield batches(first) if future is None else future.result()

    def _decoded_bytes(self, index: int) -> int:
        """File ``index``'s size decoded, as its Parquet footer said at open; for a file
        known from the job's plan (no footer read), eight times its size on storage."""
        facts = self._facts[index]
        if facts.decoded is not None:
            return facts.decoded
        return 8 * (facts.size or 0)

    def _kept_rows(
        self, index: int, columns: list[str] | None, filter: pc.Expression | None
    ) -> pa.Table | None:
        """File ``index``'s rows from the columns kept at open, ``filter`` applied (None
        when they do not hold every column asked for, or the filter needs another)."""
        if self._kept is None or self._mapped or self._live[index] is not None:
            return None
        path = self._facts[index].path
        if columns is None or self._kept.get(path, columns) is None:
            return None
        table = self._kept.get(path, None, every=True)
        assert table is not None
        if filter is not None:
            try:
                table = table.filter(filter)
            except (pa.ArrowException, KeyError):  # a column the filter needs is not kept
                return None
        return table.select(columns)

    def _file_batches(
        self,
        index: int,
        size: int,
        skip: int,
        filter: pc.Expression | None,
        columns: list[str] | None,
        whole: bool = False,
    ) -> Iterator[LakeBatch]:
        schema, offset = self._schemas[index], skip
        ordinal = self.first_index + index
        keep, after = self._live[index], None
        if keep is not None or self._mapped:  # Delta: rows deleted, columns renamed as read
            after, filter = filter, None
            physical = {logical: name for name, logical in self._renames.items()}
            columns = None if columns is None else [physical.get(c, c) for c in columns]
        if columns is not None:  # a column some other file has is simply absent here
            columns = [c for c in columns if c in schema.names]
        kept = self._kept_rows(index, columns, filter)  # read at open: no request
        fragment: Any = None if kept is not None else self._fragment(index, whole)
        memory = None  # a small file, local or fetched whole: decoded from memory
        # (not the file a resumed read starts in: the scanner skips row groups unread)
        if whole and not skip and self._parquet and fragment is not None and _in_reach(fragment):
            memory = self._guard(index, _read_small, fragment, schema, columns, filter)
        plain = filter is None and after is None and keep is None and self._parquet
        if skip and plain and fragment is not None and memory is None:
            groups, first = fragment.row_groups, 0
            while first < len(groups) and groups[first].num_rows <= skip:
                skip -= groups[first].num_rows
                first += 1
            if first:  # row groups before the start position are never read
                fragment = fragment.subset(row_group_ids=[g.id for g in groups[first:]])
        scan = {"schema": schema, "columns": columns, "filter": filter, "batch_size": size}
        if self._parquet and fragment is not None and _is_local(fragment):
            scan["fragment_scan_options"] = _LOCAL_PARQUET
        if kept is not None:
            source: Iterator[pa.RecordBatch] = iter(kept.to_batches())
        elif memory is not None:
            source = iter(memory.to_batches())
        elif whole:  # a small file: one read (a scanner per batch costs more than the data)
            del scan["batch_size"]
            table = self._guard(index, fragment.to_table, **scan)
            source = iter(table.to_batches())
        elif self._parquet and self._guard(index, _large_groups, fragment, columns):
            source = _row_group_slices(fragment, schema, columns, filter, size)
        else:
            source = iter(self._guard(index, fragment.to_batches, **scan, **_STREAMING))
        pending: list[pa.RecordBatch] = []
        pending_rows = 0
        read = 0  # rows of the file read so far (before deletions and the filter)
        while (batch := self._guard(index, next, source, None)) is not None:
            if keep is not None or self._mapped:
                read, batch = read + batch.num_rows, self._logical(batch, keep, read, after)
            if skip:
                if batch.num_rows <= skip:
                    skip -= batch.num_rows
                    continue
                batch, skip = batch.slice(skip), 0
            if batch.num_rows:
                pending.append(batch)
                pending_rows += batch.num_rows
            while pending_rows >= size:
                table = pa.Table.from_batches(pending)
                yield LakeBatch(table.slice(0, size), self.files[index], index, offset, ordinal)
                offset += size
                rest = table.slice(size)
                pending, pending_rows = rest.to_batches(), rest.num_rows
        if pending_rows:
            yield LakeBatch(
                pa.Table.from_batches(pending), self.files[index], index, offset, ordinal
            )
        if skip:
            logger.warning("Start row %d is past the end of %s", offset, self.files[index])

    def _logical(
        self,
        batch: pa.RecordBatch,
        keep: pa.BooleanArray | None,
        start: int,
        where: pc.Expression | None,
    ) -> pa.RecordBatch:
        """A Delta batch (rows ``start``... of its file) with logical names, deleted rows and
        rows outside ``where`` removed."""
        batch = batch.rename_columns([self._renames.get(n, n) for n in batch.schema.names])
        if self._views:  # nested fields renamed too: the same data under the logical names
            names = batch.schema.names
            batch = pa.RecordBatch.from_arrays(
                [
                    c.view(self._views[n]) if n in self._views else c
                    for n, c in zip(names, batch.columns, strict=True)
                ],
                names=names,
            )
        if keep is not None and start < len(keep):
            mask = keep.slice(start, batch.num_rows)
            if len(mask) < batch.num_rows:  # rows past the vector's end are live
                mask = pa.concat_arrays([mask, pa.array([True] * (batch.num_rows - len(mask)))])
            batch = batch.filter(mask)
        if where is not None:
            batch = batch.filter(where)
        return batch

    def _guard(self, index: int, call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return call(*args, **kwargs)
        except (pa.ArrowException, OSError) as e:
            raise read_error(e, self.files[index], self.format, self._endpoint) from e


def _is_local(fragment: Any) -> bool:
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


def _large_groups(fragment: Any, columns: list[str] | None) -> bool:
    """Whether a row group of the Parquet fragment, read for ``columns``, decodes to more
    than _ROW_GROUP_BYTES (the dataset scanner would hold it whole)."""
    meta = fragment.metadata
    return any(
        _group_bytes(meta.row_group(g.id), columns) > _ROW_GROUP_BYTES for g in fragment.row_groups
    )


def _row_group_slices(
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
    source = _parquet_file(
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


def _in_reach(fragment: Any) -> bool:
    """Whether a fragment reads a local file or bytes in memory (fetched whole from S3):
    reading it needs no request that pre-buffering would save."""
    return fragment.filesystem is None or fragment.filesystem.type_name == "local"


def _parquet_file(source: Any, metadata: Any = None, **options: Any) -> pq.ParquetFile:
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


def _read_small(
    fragment: Any, schema: pa.Schema, columns: list[str] | None, filter: pc.Expression | None
) -> pa.Table | None:
    """A small Parquet file's rows (local or in memory: ``_in_reach``) as
    ``fragment.to_table(schema=..., columns=..., filter=...)`` gives them, read in one go
    and decoded from memory: a dataset scanner costs ~0.4 ms per file to set up, three
    times the decoding of 20 records. None when no column of the file is asked for (the
    scanner reads those)."""
    with fragment.open() as f:
        data = f.read_buffer()
    return _read_plain(_parquet_file(pa.BufferReader(data)), fragment, schema, columns, filter)


def _read_plain(
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


_T = TypeVar("_T")
_END = object()


def _prepared(
    batches: Iterator[LakeBatch], prepare: Callable[[LakeBatch], Any]
) -> Iterator[LakeBatch]:
    for batch in batches:
        try:
            batch.prepared = prepare(batch)
        except Exception:
            logger.debug(
                "preparing a batch of %s failed; it is done again", batch.file, exc_info=True
            )
        yield batch


def _prefetched(source: Iterator[_T], depth: int) -> Iterator[_T]:
    """``source``, produced by a thread that runs at most ``depth`` items ahead.

    Reading and decoding the next batch overlaps with the consumer's work on this one (the
    copy waits on MongoDB most of the time). Memory stays bounded: the queue holds at most
    ``depth`` items, and the thread holds one more. An exception in the source is raised
    where the consumer would have met it; when the consumer stops early (closing this
    generator), the thread stops after the item it is reading.
    """
    if depth < 1:
        yield from source
        return
    items: queue.Queue[tuple[bool, Any]] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: tuple[bool, Any]) -> bool:
        while not stop.is_set():
            try:
                items.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in source:
                if not put((True, item)):
                    return
            put((True, _END))
        except BaseException as e:  # handed to the consumer, raised there
            put((False, e))

    thread = threading.Thread(target=produce, name="lake-reader", daemon=True)
    thread.start()
    try:
        while True:
            ok, item = items.get()
            if not ok:
                raise item
            if item is _END:
                return
            yield item
    finally:
        stop.set()


def _format_of(name: str) -> str | None:
    lower = name.lower()
    return next((fmt for ext, fmt in _EXTENSIONS.items() if lower.endswith(ext)), None)


def _glob_regex(pattern: str) -> re.Pattern[str]:
    """Glob to regex: ``**`` spans directories, ``*``, ``?`` and ``[...]`` stay inside one."""
    tokens = re.split(r"(\*\*/|\*\*|\*|\?|\[[^]/]+\])", pattern)
    return re.compile(
        "".join(
            _GLOB.get(t) or (t.replace("[!", "[^", 1) if t.startswith("[") else re.escape(t))
            for t in tokens
        )
    )


def _partition(rel: str) -> list[tuple[str, str | None]]:
    """Hive ``key=value`` directory segments of a path relative to the lake root."""
    pairs = [seg.split("=", 1) for seg in rel.split("/")[:-1] if "=" in seg]
    return [
        (unquote(k), None if v == "__HIVE_DEFAULT_PARTITION__" else unquote(v))
        for k, v in pairs
        if k
    ]


def _hive_expression(keys: list[tuple[str, str | None]]) -> pc.Expression | None:
    expr = None
    for key, value in keys:
        term = pc.field(key).is_null() if value is None else pc.field(key) == value
        expr = term if expr is None else expr & term
    return expr


_Item = tuple[str, pc.Expression | None, list[tuple[str, str | None]]]


def _refuse_gone(gone: list[str], uri: str) -> None:
    """SourceError naming the first of the planned files that are no longer in the lake."""
    if gone:
        raise SourceError(
            f"{gone[0]} is no longer in {uri}: the lake changed while the job was copying it "
            f"({len(gone)} of the files planned for this part are gone). Restore the file and "
            "resume the job, or start a new copy.",
            uri=uri,
            file=gone[0],
        )


def _planned(
    loc: Location, base: str, fmt_given: str | None, only: list[str] | None, known: Listing | None
) -> tuple[str, str, list[str], dict[str, int]] | None:
    """A partition's files from the job's listing (``known``, made by the job's first run):
    format, root, paths and sizes, without listing the lake again (a lake is listed once
    per job: 20,000 files cost each partition ~0.3 s locally, and LIST requests on S3).
    None when the listing does not cover them (then the lake is listed as usual). A file
    gone since is found when it is read (or, locally, by the caller at once)."""
    if known is None or only is None or fmt_given not in (None, known.format):
        return None
    if not known.root.startswith(loc.prefix):
        return None
    root = known.root[len(loc.prefix) :]
    if root not in (base, base.rsplit("/", 1)[0]) or any(n not in known.files for n in only):
        return None
    found = [f"{root}/{name}" for name in only]
    sizes = {path: known.files[name][0] for path, name in zip(found, only, strict=True)}
    return known.format, root, found, sizes


def _picked(found: list[str], root: str, names: list[str], uri: str) -> list[str]:
    """The paths of the files named (relative to ``root``), in that order."""
    by_name = {p[len(root) :].lstrip("/") if p.startswith(root) else p: p for p in found}
    _refuse_gone([n for n in names if n not in by_name], uri)
    return [by_name[n] for n in names]


def _inspect(
    loc: Location,
    fmt: str,
    files: list[_Item],
    sizes: dict[str, int] | None = None,
    known: Listing | None = None,
    root: str = "",
    keep: list[str] | None = None,
    kept: _Kept | None = None,
) -> list[tuple[FileFacts, pa.Schema, Any]]:
    """Each file's facts and schema (plus hive keys), its footer read in parallel (S3
    latency), and for CSV and JSON its fragment. Parquet fragments are dropped: a file is
    opened again when read. A file ``known`` lists with the same size is not read at all.

    With ``kept``, the ``keep`` columns of each Parquet file of at most ``_KEEP_FILE_BYTES``
    are read right after its footer, by the same fragment (which reuses the footer: one
    more request on S3, coalesced), and added to ``kept`` in the lake's order."""
    sizes = sizes or {}
    shared: dict[bytes, pa.Schema] = {}  # files that share a schema share one object
    lock = threading.Lock()

    def interned(schema: pa.Schema) -> pa.Schema:
        key = schema.serialize().to_pybytes()
        with lock:
            return shared.setdefault(key, schema)

    def inspect(item: _Item) -> tuple[FileFacts, pa.Schema, Any, pa.Table | None]:
        path, expr, keys = item
        size = sizes.get(path)
        if known is not None and size is not None:
            name = path[len(root) :].lstrip("/")
            seen = known.files.get(name)
            if seen is not None and seen[0] == size:
                return FileFacts(path, size, seen[1], expr), known.schemas[seen[2]], None, None
        table = None
        try:
            fs, real = loc.fs, path
            if fmt == "json" and is_json_array(fs, path):  # [{...}, ...]: read as NDJSON
                fs, real = pafs.LocalFileSystem(), ndjson_copy(fs, path, loc.show(path))
                size = None
            file_format = _PARQUET if fmt in ("parquet", "delta") else _FORMATS[fmt]()
            data = None
            small = size is not None and size <= _WHOLE_GET_BYTES
            if fmt in ("parquet", "delta") and small and loc.objects is not None:
                data = loc.objects.get(real, size)  # one GET: footer and kept columns
            if data is not None:
                fragment = file_format.make_fragment(data, partition_expression=expr)
            else:
                fragment = file_format.make_fragment(
                    real, filesystem=fs, partition_expression=expr, file_size=size
                )
            schema = fragment.physical_schema  # Parquet: reads the footer (one GET on S3)
            for key, _ in keys:
                if key not in schema.names:
                    schema = schema.append(pa.field(key, pa.string()))
            if fmt in ("parquet", "delta"):
                meta = fragment.metadata
                decoded = sum(meta.row_group(g).total_byte_size for g in range(meta.num_row_groups))
                stats = _column_stats(meta, schema)
                facts = FileFacts(path, size, meta.num_rows, expr, stats, int(decoded))
                small = size is not None and size <= _KEEP_FILE_BYTES
                if kept is not None and small and not kept.full:
                    columns = [c for c in keep or [] if c in schema.names]
                    if _in_reach(fragment):  # no scanner: ~0.3 ms of setup per file
                        with fragment.open() as f:  # the footer just read is reused
                            source = _parquet_file(f, meta)
                            table = _read_plain(source, fragment, schema, columns, None)
                    if table is None:
                        scan: dict[str, Any] = {"use_threads": False}
                        if fs.type_name == "local":
                            scan["fragment_scan_options"] = _LOCAL_PARQUET
                        scan["memory_pool"] = pa.system_memory_pool()
                        table = fragment.to_table(schema=schema, columns=columns, **scan)
                fragment = None  # its footer stays behind: ~30 KB per file
            else:
                facts = FileFacts(real, size, None, expr)
        except (pa.ArrowException, OSError) as e:
            raise read_error(e, loc.show(path), fmt, loc.endpoint) from e
        return facts, interned(schema), fragment, table

    if not files:
        return []
    out = []
    # local footers are read in this thread: a pool of threads spent several times the CPU
    # of reading them passing the GIL around
    threads = min(_INSPECT_THREADS, len(files)) if loc.is_s3 else 0
    with ThreadPoolExecutor(max_workers=max(threads, 1)) as pool:
        for facts, schema, fragment, table in (pool.map if threads else map)(inspect, files):
            if kept is not None and table is not None:
                kept.add(facts.path, table)
            out.append((facts, schema, fragment))
    return out


def _column_stats(meta: Any, schema: pa.Schema) -> dict[str, ColumnStats]:
    """Min, max and null count over a file's row groups of its top-level integer, date and
    timestamp columns, from the footer; a column some row group has no statistics for is
    left out (it must be read to be known)."""
    out: dict[str, ColumnStats] = {}
    wanted = {f.name for f in schema if _stats_kind(f.type)}
    groups = [meta.row_group(g) for g in range(meta.num_row_groups)] if wanted else []
    if not groups:
        return out
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
            out[name] = (
                None if low is None else pa.scalar(low, scalar_type),
                None if high is None else pa.scalar(high, scalar_type),
                nulls,
            )
    return out


_UNITS = {"MILLIS": "ms", "MICROS": "us", "NANOS": "ns"}


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
        return None if unit is None else pa.timestamp(unit)
    if kind == "DATE" and pa.types.is_date(arrow_type):
        return pa.date32()
    if kind in ("INT", "NONE") and pa.types.is_signed_integer(arrow_type):
        if kind == "INT" and "isSigned=false" in str(logical):
            return None
        return pa.int64()
    return None


def _list_files(
    loc: Location, base: str, pattern: re.Pattern[str] | None, info: Any
) -> tuple[list[str], bool, dict[str, int]]:
    """Sorted file paths under ``base`` (``info``: its FileInfo), whether it is a file, and
    the files' sizes as the listing gave them."""
    fs = loc.fs
    if info.type == pafs.FileType.NotFound and loc.is_s3:
        bucket = base.split("/", 1)[0]
        if fs.get_file_info(bucket).type == pafs.FileType.NotFound:
            raise SourceError(
                f"S3 bucket s3://{bucket} does not exist (or these credentials "
                "cannot see it). Check the bucket name in the source URI and "
                "LAKESYNC_S3_ENDPOINT_URL."
            )
    if info.type == pafs.FileType.NotFound:
        raise SourceError(
            f"Data lake path {loc.show(base)} does not exist. Check "
            "LAKESYNC_LAKE_URI or the source option (a directory, a file, a glob "
            "or s3://bucket/prefix)."
        )
    if info.type == pafs.FileType.File and pattern is None:
        return [base], True, {} if info.size is None else {base: int(info.size)}
    found, sizes = [], {}
    for item in fs.get_file_info(pafs.FileSelector(base, recursive=True)):
        rel = item.path[len(base) :].lstrip("/")
        if item.type != pafs.FileType.File or any(s.startswith((".", "_")) for s in rel.split("/")):
            continue  # hidden files, _SUCCESS, _delta_log/, _common_metadata...
        if pattern is None or pattern.fullmatch(rel):
            found.append(item.path)
            if item.size is not None:
                sizes[item.path] = int(item.size)
    found.sort()
    return found, False, sizes


def _refuse_links_out(base: str, found: list[str]) -> None:
    """A symlink inside a local lake must stay inside it: the allowed roots are checked on
    the source, and a planted link must not make the server read any file it can."""
    root = os.path.realpath(base)
    for path in found:
        real = os.path.realpath(path)
        if real != root and not real.startswith(root.rstrip("/") + "/"):
            link = _outermost_link(base, path)  # named alone: not what lies behind it
            raise SourceError(
                f"{link} is a symbolic link that points out of the lake {base}; lakesync "
                "does not follow links out of the lake. Move or copy the data into the lake, "
                "or point the source at where it really is.",
                file=link,
            )


def _outermost_link(base: str, path: str) -> str:
    """The first symbolic link on the way from the lake's root down to `path`."""
    current = base.rstrip("/") or "/"
    for part in path[len(base) :].strip("/").split("/"):
        current = f"{current.rstrip('/')}/{part}"
        if os.path.islink(current):
            return current
    return path


def _choose_format(found: list[str], given: str | None, where: str, single: bool) -> str:
    by_format: dict[str, list[str]] = {}
    for path in found:
        if (fmt := _format_of(path)) is not None:
            by_format.setdefault(fmt, []).append(path)
    if given is not None:
        by_format.pop(_ALIASES[given.lower()], None)
        if single or not by_format:
            return _ALIASES[given.lower()]
    if len(by_format) > 1 or given is not None:
        kinds = ", ".join(f"{len(v)} {k} (e.g. {v[0]})" for k, v in sorted(by_format.items()))
        raise SourceError(
            f"Mixed file formats in {where}: {kinds}"
            f"{f' besides the {given} files asked for' if given else ''}. A lake "
            "holds one format: point the source at one of them with a glob such "
            f"as {where.rstrip('/')}/**/*.parquet.",
            where=where,
        )
    return next(iter(by_format), "parquet")
