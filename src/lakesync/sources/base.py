"""What every kind of table gives the copy: its units in order, positions, batches.

A *readable table* (``sources.lake.Lake``, whatever the kind underneath) offers:

- ``files``: its units (data files) in the table's own order, the order that decides which
  record of a key is the last one (see the README's formats table); ``file_name(i)`` is the
  stable name a checkpoint keeps beside the index, ``resume_position`` checks it again;
- counts: ``file_row_counts()`` (live rows per unit) and ``count_rows(filter)``;
- statistics for watermarks: ``file_stats(i, column)`` (min, max, nulls; None: unknown);
- reading: ``batches(size, start=Position(unit, row))`` streams ``LakeBatch``es from any
  position, so partitions and resumed runs read exactly the rows they were planned with;
- ``version``: the table version read (Delta version, Iceberg snapshot id; None for plain
  files), ``since_version`` for an incremental read of the units added after a version;
- ``doubts``: per unit, None when its place and its own row order are the table's order,
  else an ``OrderDoubt`` saying why not (a rewrite that merged rows of several versions
  into it: the order of one key's rows inside it is the writer's; or its history is gone:
  its place among such units is a guess). The plan warns of the keys whose winner this
  leaves in doubt (``repeats``). A merged rewrite whose history is all there (Delta:
  ``REBUILT``) is not in doubt: ``rebuilt_order`` gives each of its rows the place of the
  row it was copied from, and the plan of repeated keys orders them by it.

A *table kind* (Delta today, Iceberg next) plugs in by turning a folder into a
``TableVersion``: its data files in the table's order, each with its partition values and
its live rows (a deletion vector, or position deletes applied), the table's logical schema
and column renames. ``Lake`` reads those files as Parquet, skipping the rows that are not
live and renaming columns as it goes, so positions (unit, row) keep counting the file's
own rows and a checkpoint means the same rows on every run.
"""

from __future__ import annotations

import atexit
import bisect
import functools
import os
import shutil
import stat
import struct
import tempfile
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

#: a data file's place in a table's lake order (Delta, Iceberg), compared as tuples
OrderKey = tuple[int | str, ...]


def rewritten_place(removed: Iterable[OrderKey], own: OrderKey) -> OrderKey:
    """The place of a file a rewrite wrote (a copy-on-write DELETE, UPDATE or MERGE, a
    compaction): it carries rows of the files the rewrite removed, so it takes the place
    of the newest of them, then ``own`` (its commit and its place in it). An old row it
    carries then never comes after a newer row of the same key written in between, as it
    would if the rewrite's commit were its place."""
    return (*max(removed), *own)


@dataclass(frozen=True)
class OrderDoubt:
    """Why a unit's place in lake order, or its rows' order, is not the table's own.

    ``kind`` is ``MERGED`` (a rewrite wrote rows of several versions into this one unit:
    two rows of one key inside it are in the writer's order, not commit order),
    ``MISSING`` (the commit or snapshot that added it was cleaned up: its place among other
    such units is a guess, by modification time) or ``REBUILT`` (a merged rewrite whose
    rows' places the table can still tell: the files it rewrote are still there and their
    commits still in the log, so the plan of repeated keys gives each of its rows the place
    of the row it was copied from, ``Lake.rebuilt_order``; if that fails, it is ``MERGED``).
    ``why`` says so in words."""

    kind: str
    why: str


MERGED, MISSING, REBUILT = "merged", "missing", "rebuilt"


@dataclass(frozen=True)
class Position:
    """A checkpoint in the lake: a file index and the rows of that file already consumed."""

    file_index: int = 0
    row: int = 0


#: a column's (min, max, null count) over a whole file, from its Parquet footer; min and
#: max are None when every value is null
ColumnStats = tuple[pa.Scalar | None, pa.Scalar | None, int]
#: one column's as the footer gives them: raw min and max (Python integers: days, units of
#: time since the epoch, or the integer itself) and the null count, with their Arrow type
RawStats = tuple[Any, Any, int, pa.DataType]
#: the columns whose statistics a file has: names and Arrow types, in order
StatsLayout = tuple[tuple[str, pa.DataType], ...]
#: one column's packed: min, max, null count, which of min and max are known (1, 2)
_PACKED = struct.Struct("<qqqB")


@functools.lru_cache(maxsize=256)
def _layout(layout: StatsLayout) -> StatsLayout:
    """One object per layout, shared by the files that have it."""
    return layout


@dataclass(frozen=True, slots=True)
class PackedStats:
    """A file's statistics as ``FileFacts`` keeps them (issue #27): the layout shared between
    files, the values packed in bytes. ~0.15 KB per file of three timestamp columns, where a
    dict of ``RawStats`` tuples of Python integers took ~0.5 KB (and Arrow scalars ~1.3 KB),
    and a lake keeps them for each of its files."""

    layout: StatsLayout
    data: bytes

    @staticmethod
    def of(found: dict[str, RawStats]) -> PackedStats | None:
        """``found`` packed (None when empty); a column whose values are not 64-bit integers
        is left out (unknown: the file is read to know it)."""
        layout, parts = [], []
        for name, (low, high, nulls, kind) in found.items():
            if not all(v is None or type(v) is int for v in (low, high, nulls)):
                continue
            flags = (low is not None) | (high is not None) << 1
            try:
                parts.append(_PACKED.pack(low or 0, high or 0, nulls or 0, flags))
            except struct.error:  # past int64
                continue
            layout.append((name, kind))
        if not layout:
            return None
        return PackedStats(_layout(tuple(layout)), b"".join(parts))

    def get(self, column: str) -> RawStats | None:
        """The column's statistics (None: not known)."""
        for i, (name, kind) in enumerate(self.layout):
            if name == column:
                low, high, nulls, flags = _PACKED.unpack_from(self.data, i * _PACKED.size)
                return (low if flags & 1 else None, high if flags & 2 else None, nulls, kind)
        return None


def as_column_stats(raw: RawStats) -> ColumnStats:
    """``RawStats`` as Arrow scalars."""
    low, high, nulls, kind = raw
    return (
        None if low is None else pa.scalar(low, kind),
        None if high is None else pa.scalar(high, kind),
        nulls,
    )


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
    stats: PackedStats | None = None
    decoded: int | None = None  # Parquet: bytes of its row groups decoded (the footer's sum)
    #: rows the reader must not read, and why (a JSON record nested too deep: jsondepth.py)
    refused: dict[int, str] | None = None
    #: the scratch copies made to read the file (held until the lake is closed)
    scratch: tuple[str, ...] = ()


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
    #: batch rows the reader refused, and why (``FileFacts.refused``): rejected as they are
    refused: dict[int, str] = field(default_factory=dict, repr=False)
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


@dataclass(frozen=True)
class Listing:
    """A lake's files as one open found them, compact enough to keep in a job's plan:
    per file its size, rows and the number of its schema (most files share one)."""

    root: str
    format: str
    schemas: list[pa.Schema]
    #: file name (as ``Lake.file_name`` gives it) -> (size in bytes, rows, schema number)
    files: dict[str, tuple[int, int, int]]


@dataclass(frozen=True)
class TableVersion:
    """One version of a table (Delta, Iceberg): its schema and active data files, in the
    table's order (the order "the last record of a key" follows), with their partitions."""

    kind: str  # "delta", "iceberg"
    version: int
    schema: pa.Schema
    files: list[tuple[str, pc.Expression | None]]  # paths inside the Location's filesystem
    #: column mapping: physical name in the Parquet files -> logical (table) name
    renames: dict[str, str] = field(default_factory=dict)
    #: deleted rows: path -> which rows of the file are live (rows past its end are)
    live: dict[str, pa.BooleanArray] = field(default_factory=dict)
    #: column mapping: the schema as the Parquet files name it (nested fields too), or None
    physical: pa.Schema | None = None
    #: path -> why its place or row order is not the table's own (``OrderDoubt``)
    doubts: dict[str, OrderDoubt] = field(default_factory=dict)
    #: path -> its place in the table's order (the key ``files`` is sorted by)
    places: dict[str, OrderKey] = field(default_factory=dict)
    #: Delta: where the rows of rewritten files came from (``deltalog.Lineage``), for the
    #: files whose doubt is ``REBUILT``
    lineage: Any = None


def with_partition_columns(schema: pa.Schema, keys: list[tuple[str, str | None]]) -> pa.Schema:
    """A file's schema plus its hive partition columns (strings) it does not hold itself."""
    for key, _ in keys:
        if key not in schema.names:
            schema = schema.append(pa.field(key, pa.string()))
    return schema


def _scratch_root() -> Path:
    """This user's own folder for local copies of lake files, in the system's temporary
    folder: one per user, private to them, so that another user's lakesync can neither
    block the copies (a folder it cannot write) nor plant one (a copy is used as found, by
    its name)."""
    folder = Path(tempfile.gettempdir()) / f"lakesync-json-{os.getuid()}"
    folder.mkdir(mode=0o700, exist_ok=True)
    info = folder.lstat()
    if (
        not stat.S_ISDIR(info.st_mode)
        or info.st_uid != os.getuid()
        or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    ):
        raise OSError(
            f"{folder} is not a folder of this user's alone; remove it so that lakesync "
            "makes its own"
        )
    return folder


#: the scratch copies in use: path -> how many open lakes (or opens under way) read it
_held: dict[str, int] = {}
_scratch_lock = threading.Lock()
_scratch: tuple[int, Path, Path] | None = None  # (pid, the user's folder, the pid's folder)


def scratch_folder() -> Path:
    """This process's folder for local copies of lake files (NDJSON copies of JSON arrays,
    JSON without the records nested too deep, CSV of very many columns): a folder named
    after the process id in this user's scratch folder. A copy is removed when the last
    lake reading it is closed (``let_go``), the folder when the process exits; the first
    use in a process removes the folders of processes that are gone (a crash, a kill)."""
    global _scratch
    pid, root = os.getpid(), _scratch_root()  # (checked every time: it is the guard)
    with _scratch_lock:
        if _scratch is not None and _scratch[:2] == (pid, root):
            return _scratch[2]
        if _scratch is not None and _scratch[0] != pid:  # a forked child: not its copies
            _held.clear()
        sweep_scratch(root)
        folder = root / str(pid)
        folder.mkdir(mode=0o700, exist_ok=True)
        if _scratch is None:
            atexit.register(_remove_own)
        _scratch = (pid, root, folder)
        return folder


def sweep_scratch(root: Path) -> list[Path]:
    """Remove the scratch folders of processes that are gone, and copies left loose in
    ``root`` by lakesync before 0.9 (one folder for all processes); the ones removed."""
    gone = []
    for entry in root.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            if entry.name.isdigit() and not _alive(int(entry.name)):
                shutil.rmtree(entry, ignore_errors=True)
                gone.append(entry)
        elif entry.suffix in (".ndjson", ".json", ".arrow", ".part"):
            entry.unlink(missing_ok=True)
            gone.append(entry)
    return gone


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_own() -> None:
    if _scratch is not None and _scratch[0] == os.getpid():
        shutil.rmtree(_scratch[2], ignore_errors=True)


def reused(copy: Path) -> bool:
    """Whether the scratch ``copy`` exists; if so it is held (``let_go`` when done)."""
    with _scratch_lock:
        if not copy.exists():
            return False
        _held[str(copy)] = _held.get(str(copy), 0) + 1
        return True


def hold(paths: Iterable[str]) -> None:
    """Hold scratch copies: they stay until each hold is let go."""
    with _scratch_lock:
        for path in paths:
            _held[path] = _held.get(path, 0) + 1


def let_go(paths: Iterable[str]) -> None:
    """Let go of scratch copies; one nobody holds any more is removed (a guarded JSON
    copy or a CSV copy with the list of its refused rows)."""
    with _scratch_lock:
        own = _scratch[2] if _scratch is not None and _scratch[0] == os.getpid() else None
        for path in paths:
            left = _held.get(path, 0) - 1
            if left > 0:
                _held[path] = left
                continue
            _held.pop(path, None)
            if Path(path).parent != own:  # a forked child's lake: the parent's copies
                continue
            Path(path).unlink(missing_ok=True)
            if path.endswith(".safe.ndjson"):
                Path(path.removesuffix(".safe.ndjson") + ".refused.json").unlink(missing_ok=True)
            elif path.endswith(".arrow"):  # a CSV copy's (``widecsv``)
                Path(path.removesuffix(".arrow") + ".refused.json").unlink(missing_ok=True)
