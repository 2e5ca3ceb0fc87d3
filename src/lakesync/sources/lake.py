"""``Lake``: one readable table (see ``sources.base``) over data files of any kind.

``Lake.open`` finds what the source names: a table (a folder holding ``_delta_log``, read
at one version through ``sources.delta``; an Iceberg table's folder, metadata file or
catalog table, read at one snapshot through ``sources.iceberg``) or plain files
(``sources.files``: a folder, one file, a glob, local or on S3). Either way the table
becomes a list of data files in the table's order, each read through its own
``pyarrow.dataset`` fragment with its own physical schema (``sources.parquet``,
``sources.text``; an Iceberg file through pyiceberg, which applies its deletes), so one odd
file does not change how the others are read, and batches stream with bounded memory across
files (``sources.stream``).
"""

from __future__ import annotations

import collections
import itertools
import logging
import os
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.fs as pafs

import lakesync.sources.files as plain
from lakesync.config import Settings, get_settings
from lakesync.errors import SourceError
from lakesync.locations import (
    Location,
    WholeObjects,
    dot_segment_after_glob,
    first_glob_segment,
    read_error,
    resolve,
)
from lakesync.sources import iceberg, jsonnumbers, jsonruns, parquet, tables, text
from lakesync.sources.base import (
    ColumnStats,
    FileFacts,
    LakeBatch,
    Listing,
    OrderDoubt,
    OrderKey,
    Position,
    as_column_stats,
    hold,
    let_go,
)
from lakesync.sources.delta import snapshot
from lakesync.sources.deltalog import Lineage, commit_time
from lakesync.sources.deltarows import RowOrder, row_order
from lakesync.sources.stream import across_files, prefetched, prepared
from lakesync.sources.tables import DELTA_LOG as LOG_DIR

logger = logging.getLogger(__name__)

#: Decode at most two record batches ahead of the consumer, in the reading thread: memory
#: stays flat. Decoded data comes from the system allocator: Arrow's default (mimalloc) keeps
#: the pages its threads freed, so peak memory grew with the size of the largest file read.
_STREAMING = {
    "batch_readahead": 2,
    "fragment_readahead": 1,
    "use_threads": False,
    "memory_pool": pa.system_memory_pool(),
}
#: Lake batches a reader thread prepares while the consumer writes the current one.
_PREFETCH = 1
_S3_READ_THREADS = 32  # on S3 a small file's read is mostly waiting for the round trip
_READ_AHEAD = 32  # small files read ahead at most
_SMALL_FILE_ROWS = 10_000  # a file of at most this many rows (or one batch) is read whole
#: ... and of at most this many bytes decoded (a wide file of few rows is streamed instead),
#: while the files read ahead hold at most _READ_AHEAD_BYTES decoded
_SMALL_FILE_BYTES = 8 << 20
_READ_AHEAD_BYTES = 64 << 20


class _Opens:
    """A thread-safe count of file opens."""

    def __init__(self) -> None:
        self.count = 0
        self._lock = threading.Lock()

    def add(self) -> None:
        with self._lock:
            self.count += 1


class Lake:
    """A sorted set of same-format data files read as one stream; build it with ``open``.

    ``format`` is parquet, csv, json, orc, delta or iceberg; ``version`` is the Delta table
    version or the Iceberg snapshot id read (None for plain files), ``since_version`` the
    version whose files were left out (None: all the version's files). ``files`` are the data
    files' URIs in reading order: a Position's file index points into it, and ``file_name``
    gives the stable name a checkpoint keeps.
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
        table: iceberg.IcebergSnapshot | None = None,
        units: list[int] | None = None,
        doubts: list[OrderDoubt | None] | None = None,
        places: list[OrderKey] | None = None,
        lineage: Lineage | None = None,
    ) -> None:
        self.uri, self.format, self.files, self.version = uri, fmt, files, version
        #: per file: why its place or row order is not the table's own (None: it is)
        self.doubts: list[OrderDoubt | None] = doubts or [None] * len(files)
        #: Delta: per file its place in the table's order, and where rewrites' rows came
        #: from (``rebuilt_order``)
        self._places, self._lineage = places, lineage
        #: Iceberg: the snapshot read (it reads its units itself: deletes, field ids), and
        #: the unit of it each file index is
        self._table, self._units = table, units or list(range(len(files)))
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
        #: the scratch copies this lake reads (a JSON array as NDJSON...): held while it is
        #: open, let go by ``close`` (or when the lake is dropped)
        copies = [p for f in facts for p in f.scratch]
        hold(copies)
        self._let_go = weakref.finalize(self, let_go, copies)
        self._fs = fs
        self._root = root.rstrip("/")
        self._parquet = fmt in ("parquet", "delta")
        self._row_counts: list[int] | None = None
        #: files the reading filter rules out by their statistics (see ``rule_out``)
        self._ruled_out: frozenset[int] = frozenset()
        #: files opened for reading so far, shared with the lakes ``only`` makes of this one
        #: (footers read at open not counted)
        self._opens = _Opens()
        #: how CSV files are read (set by ``open``)
        self.csv = text.CsvOptions()
        #: a text lake's watermark column, compared as validation reads it (set by ``open``)
        self._compared: text.Compared | None = None
        #: columns of small files read at open (see ``parquet.Kept``); None once dropped
        self._kept: parquet.Kept | None = None
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
        snapshot_id: int | None = None,
        since_snapshot_id: int | None = None,
        catalog: iceberg.CatalogTable | None = None,
        csv: text.CsvOptions | None = None,
        since_read_at: int | None = None,
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

        An Iceberg table is named by its metadata file, its folder (one holding ``metadata/``)
        or, with ``catalog``, as ``iceberg://CATALOG/namespace.table``; it is read at its
        current snapshot or ``snapshot_id``, and with ``since_snapshot_id`` only the data
        files added after that snapshot (see ``sources.iceberg``).
        ``csv``: how CSV files are read (the operation's encoding, delimiter, header and
        the columns read as text; see ``text.CsvOptions``).
        ``since_read_at``: when the copy that read Delta version ``since_version`` ended (ms
        since the epoch); a version committed after it belongs to a table recreated since
        (its versions start again from 0), and is refused (SourceError) rather than read as
        the one that copy read.
        """
        fmt_given = None if format is None else plain.ALIASES.get(format.lower())
        if format is not None and fmt_given is None:
            raise SourceError(
                f"Unknown lake format {format!r}: use parquet, csv, json, orc, delta or iceberg."
            )
        pinned = snapshot_id is not None or since_snapshot_id is not None
        if uri.startswith("iceberg://") or catalog is not None:
            if catalog is None or catalog.uri != uri:
                raise SourceError(
                    f"{uri} names a table of an Iceberg catalog, but no such catalog is "
                    "declared for this operation: declare it in lakesync.toml "
                    '([catalogs.NAME], and catalog = "NAME" with table = "namespace.table").',
                    uri=uri,
                )
            props = iceberg.settings_properties(settings or get_settings())
            table = cls._open_iceberg(
                uri, None, None, snapshot_id, since_snapshot_id, catalog, props
            )
            return table if only is None else table.only(only, first_index)
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
            pattern = plain.glob_regex("/".join(segments[glob_at:]))
        try:
            info = loc.fs.get_file_info(base)
        except (OSError, pa.ArrowException) as e:
            raise read_error(e, loc.show(base), "", loc.endpoint, listing=True) from e
        if glob_at is None and loc.path.endswith("/" + LOG_DIR):
            raise SourceError(f"{loc.show(loc.path)} is a Delta log: use its parent folder.")
        is_folder = info.type == pafs.FileType.Directory
        kind = tables.kind_of(loc, base) if is_folder else None
        if info.type == pafs.FileType.File and iceberg.is_metadata_file(base):
            kind = "iceberg"  # a metadata file: that version of its table
        if kind is not None and glob_at is None:  # a table: read as such, or refused
            if fmt_given not in (None, kind):
                raise SourceError(
                    f"{loc.show(base)} is a {kind.capitalize()} table, read as a table and "
                    f"never as loose {fmt_given} files: leave the format out, or set "
                    f'format = "{kind}".',
                    uri=uri,
                )
            if kind == "iceberg":
                if version is not None or since_version is not None:
                    raise SourceError(
                        f"{loc.show(base)} is an Iceberg table, which has snapshots, not Delta "
                        "versions: remove deltaVersion (or give icebergSnapshotId).",
                        uri=uri,
                    )
                table = cls._open_iceberg(uri, loc, base, snapshot_id, since_snapshot_id, None)
            else:
                if pinned:
                    raise SourceError(
                        f"{loc.show(base)} is a Delta table, which has versions, not Iceberg "
                        "snapshots: remove icebergSnapshotId (or give deltaVersion).",
                        uri=uri,
                    )
                table = cls._open_delta(uri, loc, base, version, since_version, since_read_at)
            return table if only is None else table.only(only, first_index)
        parent = base.rstrip("/").rsplit("/", 1)[0]
        if (
            glob_at is None
            and base.rstrip("/").endswith("/" + iceberg.METADATA_DIR)
            and iceberg.is_iceberg_table(loc, parent)
        ):
            raise SourceError(
                f"{loc.show(base)} is an Iceberg table's metadata folder: use its parent "
                f"folder {loc.show(parent)}, or one of its .metadata.json files.",
                uri=uri,
            )
        if fmt_given == "iceberg" or pinned:
            raise SourceError(
                f"{loc.show(loc.path)} is not an Iceberg table (no {iceberg.METADATA_DIR} "
                "folder of *.metadata.json files in it, nor a .metadata.json file), so it "
                "has no Iceberg snapshot to read. Point the source at the table's folder or "
                "its current metadata file.",
                uri=uri,
            )
        if fmt_given == "delta" or version is not None or since_version is not None:
            raise SourceError(
                f"{loc.show(loc.path)} is not a Delta table (no {LOG_DIR} folder in it), "
                "so it has no Delta format or version to read. Point the source at the "
                "table's folder, or read plain Parquet, CSV or JSON files without them.",
                uri=uri,
            )
        # a glob, a file or a folder inside a table (a partition planned from the job's
        # listing was checked by the job's first open: no more requests for it)
        planned_part = only is not None and known is not None
        inside = (base, kind) if kind is not None else None
        if inside is None and not planned_part:
            inside = tables.enclosing_table(loc, base)
        if inside is not None:
            raise tables.refuse_inside(loc, inside[0], inside[1], loc.path)
        planned = plain.planned(loc, base, fmt_given, only, known)
        if planned is not None:  # a partition: its files, from the job's listing
            fmt, root, found, sizes = planned
            if not loc.is_s3:
                gone = [n for n, p in zip(only or [], found, strict=True) if not os.path.isfile(p)]
                plain.refuse_gone(gone, uri)
        else:
            try:
                found, single, sizes = plain.list_files(loc, base, pattern, info)
            except (OSError, pa.ArrowException) as e:
                raise read_error(e, loc.show(base), "", loc.endpoint, listing=True) from e
            if single:  # named as the source: its extension must be one lakesync reads
                plain.refuse_unreadable(loc, found, single=fmt_given is None)
            shown = [loc.show(p) for p in found]
            fmt = plain.choose_format(shown, fmt_given, loc.show(base), single)
            if not single and any(plain.format_of(p) for p in found):
                found = [p for p in found if plain.format_of(p) == fmt]  # skip README.md, *.crc...
            if not found:
                raise SourceError(
                    f"No data files found in {loc.show(loc.path)}: expected "
                    f"{plain.SUPPORTED} files (hidden and _-prefixed files are skipped). "
                    "Check the path or the glob.",
                    uri=uri,
                )
            root = base.rsplit("/", 1)[0] if single else base
            if only is not None:
                found = plain.picked(found, root, only, uri)
        if not loc.is_s3:  # the files read (a partition's own), not every file listed
            plain.refuse_links_out(base, found)
        keys = [plain.partition(p[len(root) :].lstrip("/")) for p in found]
        items = [(p, plain.hive_expression(k), k) for p, k in zip(found, keys, strict=True)]
        usable = known is not None and known.format == fmt and known.root == loc.show(root)
        kept = parquet.Kept() if keep and fmt == "parquet" else None
        reuse = known if usable else None
        csv = csv or text.CsvOptions()
        inspected = plain.inspect(loc, fmt, items, sizes, reuse, root, keep, kept, csv)
        logger.info("Opened lake %s: %d %s file(s)", loc.show(loc.path), len(found), fmt)
        files = [loc.show(p) for p in found]
        try:
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
        finally:  # the lake holds its copies now: the holds of their making are let go
            let_go([p for f, _, _ in inspected for p in f.scratch])
        lake._kept = None if kept is None else kept.finish()
        lake.csv = csv
        if fmt in text.FORMATS:
            lake._compare(text.compared(csv, lake._schemas))
        return lake

    def _compare(self, compared: text.Compared | None) -> None:
        """Compare the watermark column as ``compared`` says (None: as each file's reader
        typed it): the lake's schema gives it the type compared, so that the filter's
        bounds and the watermark's kind are of that type (``watermarks``)."""
        self._compared = compared
        if compared is not None:
            at = self.schema.get_field_index(compared.column)
            self.schema = self.schema.set(at, self.schema.field(at).with_type(compared.arrow_type))

    def as_compared(self, table: pa.Table) -> pa.Table:
        """``table`` with the watermark column as the lake's filter compares it: a text
        lake's cells read as validation reads them (``text.Compared``), a cell that cannot
        be read so null; any other lake's as they are."""
        return self._comparing(table)[0]

    def _comparing(self, table: pa.Table) -> tuple[pa.Table, pa.Array | None]:
        """``as_compared``, and which cells of the column could not be read (None: the
        table is as it was)."""
        compared = self._compared
        if compared is None or compared.column not in table.column_names:
            return table, None
        at = table.schema.get_field_index(compared.column)
        values, unreadable = compared.read(table.column(at))
        return table.set_column(at, pa.field(compared.column, values.type), values), unreadable

    @classmethod
    def _open_delta(
        cls,
        uri: str,
        loc: Location,
        base: str,
        version: int | None,
        since: int | None,
        since_read_at: int | None = None,
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
            committed = None if since_read_at is None else commit_time(loc, base, since)
            if committed is not None and since_read_at is not None and committed > since_read_at:
                raise SourceError(
                    f"Version {since} of the Delta table {uri} was committed at "
                    f"{_iso(committed)}, after the copy that read version {since} ended "
                    f"({_iso(since_read_at)}): the table was recreated since, so that version "
                    "holds other files than the ones copied. Copy it in mode full.",
                    uri=uri,
                )
            before = {p for p, _ in snapshot(loc, base, since).files}
            chosen = [(p, expr) for p, expr in snap.files if p not in before]
        if not loc.is_s3:  # the log may name a symlink, or a path out of the table
            plain.refuse_links_out(base, [p for p, _ in chosen])
        inspected = plain.inspect(loc, "delta", [(p, expr, []) for p, expr in chosen])
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
            doubts=[snap.doubts.get(p) for p, _ in chosen],
            places=[snap.places[p] for p, _ in chosen],
            lineage=snap.lineage,
        )

    @classmethod
    def _open_iceberg(
        cls,
        uri: str,
        loc: Location | None,
        base: str | None,
        snapshot_id: int | None,
        since: int | None,
        catalog: iceberg.CatalogTable | None,
        props: dict[str, str] | None = None,
    ) -> Lake:
        """An Iceberg table at a snapshot (see ``sources.iceberg``), named by a path in
        ``loc`` (``base``) or through a ``catalog`` (``props``: lakesync's S3 settings as
        FileIO properties): its data files are the lake's files, in lake order."""
        if (missing := iceberg.pyiceberg_missing(uri)) is not None:
            raise missing
        confined = None
        if catalog is not None or loc is None or base is None:
            assert catalog is not None
            table = iceberg.catalog_table(catalog, props or {})
        else:
            if iceberg.is_metadata_file(base) and base.rsplit("/", 2)[-2:-1] == ["metadata"]:
                folder = base.rsplit("/", 2)[0]
            elif iceberg.is_metadata_file(base):
                folder = base.rsplit("/", 1)[0]
            else:
                folder = base.rstrip("/")
            table = iceberg.load_table(loc, base)
            confined = loc.show(folder) if loc.is_s3 else f"file://{folder}"
        snap = iceberg.IcebergSnapshot(
            table,
            uri,
            snapshot_id=snapshot_id,
            since=since,
            confined=confined,
            endpoint=None if loc is None else loc.endpoint,
        )
        files = [iceberg.shown(u.path) for u in snap.units]
        if confined is not None and confined.startswith("file://"):  # a link out of it?
            plain.refuse_links_out(confined.removeprefix("file://"), files)
        root = iceberg.shown(table.metadata.location.rstrip("/"))
        facts = [FileFacts(f, u.size, u.records) for f, u in zip(files, snap.units, strict=True)]
        added = "" if since is None else f" added since snapshot {since}"
        logger.info(
            "Opened Iceberg table %s snapshot %s: %d data file(s)%s",
            uri,
            snap.snapshot_id,
            len(files),
            added,
        )
        return cls(
            uri,
            "iceberg",
            files,
            facts,
            [snap.schema] * len(files),
            None if loc is None else loc.endpoint,
            root=root,
            version=snap.snapshot_id,
            since_version=since,
            schema=snap.schema,
            table=snap,
            doubts=[snap.doubts.get(u.path) for u in snap.units],
        )

    def close(self) -> None:
        """Let go of the scratch copies this lake reads: a copy no other open lake of this
        process reads is removed (``base.let_go``). Reading after this is an error."""
        self._let_go()

    def __enter__(self) -> Lake:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def pins(self) -> dict[str, int]:
        """The job options that make a resumed run read the same version of the table:
        ``deltaVersion`` / ``sinceDeltaVersion``, or ``icebergSnapshotId`` /
        ``sinceIcebergSnapshotId`` (none for plain files)."""
        names = ("deltaVersion", "sinceDeltaVersion")
        if self.format == "iceberg":
            names = ("icebergSnapshotId", "sinceIcebergSnapshotId")
        pins = dict(zip(names, (self.version, self.since_version), strict=True))
        return {k: v for k, v in pins.items() if v is not None}

    def file_name(self, index: int) -> str:
        """The stable name of file ``index``: its path relative to the lake's root folder.

        A checkpoint keeps it beside the file index, so that a resumed run can check (with
        ``resume_position``) that the index still points at the same file.
        """
        file = self.files[index]
        return file[len(self._root) :].lstrip("/") if file.startswith(self._root) else file

    def rebuilt_order(self) -> tuple[RowOrder | None, list[OrderDoubt | None]]:
        """The order of this lake's rows for the plan of repeated keys when some of its
        files are Delta rewrites whose rows can be traced to the rows they were copied
        from (doubt ``REBUILT``: ``deltarows``), None when none is; and the files' doubts
        once traced (a rebuilt file is in doubt no more; one that could not be, is)."""
        if self._lineage is None or self._places is None:
            return None, self.doubts
        paths = [f.path for f in self._facts]
        return row_order(self._fs, self._lineage, paths, self._places, self.doubts)

    def only(self, names: list[str], first_index: int = 0) -> Lake:
        """This lake reduced to the files named (as ``file_name`` gives them), in that order.

        ``first_index`` is the whole lake's index of the first file named: the batches'
        ``ordinal`` keeps counting files as the whole lake does.

        A partition reads exactly the files it was planned with: a file added to the lake
        since is left to the next copy, and one that is gone stops it (SourceError, naming
        the file) instead of shifting every range after it.
        """
        index = {self.file_name(i): i for i in range(len(self.files))}
        plain.refuse_gone([name for name in names if name not in index], self.uri)
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
            table=self._table,
            units=[self._units[i] for i in picked],
            doubts=[self.doubts[i] for i in picked],
            places=None if self._places is None else [self._places[i] for i in picked],
            lineage=self._lineage,
        )
        if self._row_counts is not None:
            part._row_counts = [self._row_counts[i] for i in picked]
        part._opens = self._opens
        part._kept = self._kept
        part.csv = self.csv
        part._compared = self._compared
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
        exact = self._parquet or self._table is not None
        if exact and position.row > self.file_row_counts()[index]:
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
            return None  # (Iceberg files keep no statistics here: FileFacts.stats is None)
        found = facts.stats.get(column)
        if found is None or facts.rows is None or not _same_kind(found[3], column, self.schema):
            return None
        return as_column_stats(found), facts.rows

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
                    index, parquet.PARQUET.make_fragment, data, partition_expression=facts.expr
                )
        return self._guard(
            index,
            parquet.PARQUET.make_fragment,
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
            if self._table is not None:  # the manifests' counts, less deleted rows
                self._row_counts = [self._table.rows(u) for u in self._units]
            elif self._parquet:  # less the rows a deletion vector removed
                self._row_counts = [
                    int(f.rows or 0) - (0 if keep is None else len(keep) - keep.true_count)
                    for f, keep in zip(self._facts, self._live, strict=True)
                ]
            else:
                self._row_counts = [self._counted(i, None) for i in range(len(self.files))]
        return list(self._row_counts)

    def count_rows(self, filter: pc.Expression | None = None) -> int:
        """Rows after ``filter``, counted exactly as ``batches`` counts them: with the
        rows the reader refused (a CSV record of another number of cells, a JSON record
        nested too deep), which ``batches`` keeps under any filter, to be rejected."""
        if filter is None:
            return sum(self.file_row_counts())
        total = 0
        if self._table is not None:
            for i in range(len(self.files)):
                if i not in self._ruled_out:
                    total += sum(b.num_rows for b in self._table.read(self._units[i], [], filter))
            return total
        if self._mapped or self._compared or any(keep is not None for keep in self._live):
            for i in range(len(self.files)):
                if i not in self._ruled_out:
                    total += sum(
                        b.table.num_rows for b in self._file_batches(i, 1 << 16, 0, filter, None)
                    )
            return total
        for i in range(len(self.files)):
            if i in self._ruled_out:
                continue
            if self._facts[i].refused:  # kept whatever the filter says, to be rejected
                batches = self._file_batches(i, 1 << 16, 0, filter, None)
                total += sum(b.table.num_rows for b in batches)
            else:
                total += self._counted(i, filter)
        return total

    def _counted(self, index: int, filter: pc.Expression | None) -> int:
        """File ``index``'s rows after ``filter``, counted by the scanner (a JSON file Arrow
        cannot type: read, as ``batches`` reads it)."""
        counted = self._facts[index].rows  # a CSV file's, counted at open
        if filter is None and self.format == "csv" and counted is not None:
            return counted
        try:
            if filter is None:
                fragment = self._fragment(index)
                if self.format == "csv" and (rows := text.grouped_rows(fragment)) is not None:
                    return rows  # a wide file's grouped copy: one column read, not all
                return int(fragment.count_rows())
            fragment, schema = self._fragment(index), self._schemas[index]
            scanner = ds.Scanner.from_fragment(fragment, schema=schema, filter=filter)
            return int(scanner.count_rows())
        except (pa.ArrowException, OSError) as e:
            if self.format != "json" or not jsonruns.is_type_error(e):
                raise read_error(e, self.files[index], self.format, self._endpoint) from e
        batches = self._file_batches(index, 1 << 16, 0, filter, [])
        return sum(b.table.num_rows for b in batches)

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

        Batches span files (see ``stream.across_files``); ``batch.end`` is where the next starts.

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
        stream = across_files(itertools.chain.from_iterable(files), batch_size)
        yield from prefetched(stream if prepare is None else prepared(stream, prepare), _PREFETCH)

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
        schema, offset = self._schemas[index], skip  # the file row the first batch starts at
        if self._table is not None:  # deletes applied, columns resolved by pyiceberg
            rows = self._table.read(self._units[index], columns, filter)
            yield from self._pieces(index, rows, size, skip, offset, {})
            return
        keep, after = self._live[index], None
        if keep is not None or self._mapped:  # Delta: rows deleted, columns renamed as read
            after, filter = filter, None
            physical = {logical: name for name, logical in self._renames.items()}
            columns = None if columns is None else [physical.get(c, c) for c in columns]
        if columns is not None:  # a column some other file has is simply absent here
            columns = [c for c in columns if c in schema.names]
        held = dict(self._facts[index].refused or {})  # rows the reader refused (JSON guard)
        where, compared, wanted = None, self._compared, columns
        if (held or compared) and filter is not None and keep is None and not self._mapped:
            # applied as read, the refused rows and the cells the filter cannot compare kept:
            # see below
            where, filter = filter, None
            if compared is not None and columns is not None and compared.column in schema.names:
                columns = list(dict.fromkeys([*columns, compared.column]))
        # rows refused by the reader, by their place in the file's stream of rows; under a
        # filter (an incremental copy) they are kept, placed in the filtered stream: they
        # hold no value a filter could keep (a JSON record nested too deep is read as {}),
        # yet each must still be rejected with its reason, not vanish; so are the rows of a
        # text lake whose watermark cell cannot be read as validation reads it
        refused = held if filter is None and where is None else {}
        kept = self._kept_rows(index, columns, filter)  # read at open: no request
        fragment: Any = None if kept is not None else self._fragment(index, whole)
        memory = None  # a small file, local or fetched whole: decoded from memory
        # (not the file a resumed read starts in: the scanner skips row groups unread)
        if (
            whole
            and not skip
            and self._parquet
            and fragment is not None
            and parquet.in_reach(fragment)
        ):
            memory = self._guard(index, parquet.read_small, fragment, schema, columns, filter)
        unfiltered = filter is None and after is None and keep is None and self._parquet
        if skip and unfiltered and fragment is not None and memory is None:
            groups, first = fragment.row_groups, 0
            while first < len(groups) and groups[first].num_rows <= skip:
                skip -= groups[first].num_rows
                first += 1
            if first:  # row groups before the start position are never read
                fragment = fragment.subset(row_group_ids=[g.id for g in groups[first:]])
        scan = {"schema": schema, "columns": columns, "filter": filter, "batch_size": size}
        if self._parquet and fragment is not None and parquet.is_local(fragment):
            scan["fragment_scan_options"] = parquet.LOCAL_PARQUET
        if kept is not None:
            source: Iterator[pa.RecordBatch] = iter(kept.to_batches())
        elif memory is not None:
            source = iter(memory.to_batches())
        elif whole:  # a small file: one read (a scanner per batch costs more than the data)
            del scan["batch_size"]
            table = self._guard(index, fragment.to_table, **scan)
            source = iter(table.to_batches())
        elif self._parquet and self._guard(index, parquet.large_groups, fragment, columns):
            source = parquet.row_group_slices(fragment, schema, columns, filter, size)
        elif (
            self.format == "csv"
            and (grouped := text.grouped_batches(fragment, schema, columns, filter, size))
            is not None
        ):  # a CSV file of very many columns, from its copy
            source = grouped
        elif self.format == "json":  # Arrow's type errors are met as read (see below)
            source = _lazy(fragment.to_batches, **scan, **_STREAMING)
        else:
            source = iter(self._guard(index, fragment.to_batches, **scan, **_STREAMING))
        if keep is not None or self._mapped:
            source = self._logical_batches(source, keep, after)
        if self.format == "json":  # a column Arrow cannot give one type: read as written
            into = held if filter is None else refused
            source = self._json_as_written(index, fragment, source, columns, filter, into)
        if where is not None:
            source = _filtered_keeping(source, where, held, refused, self, wanted)
        yield from self._pieces(index, source, size, skip, offset, refused)

    def _json_as_written(
        self,
        index: int,
        fragment: Any,
        source: Iterator[pa.RecordBatch],
        columns: list[str] | None,
        filter: pc.Expression | None,
        refused: dict[int, str],
    ) -> Iterator[pa.RecordBatch]:
        """JSON file ``index``'s batches from Arrow's scan ``source``; if Arrow cannot type
        a column (or typed the key as a double, or typed as a double another column written
        with integers), from ``jsonruns`` instead, from the row the scan stopped at
        (``refused`` gets the rows it refuses, by their place)."""
        given = 0
        keys = frozenset(self.csv.keys)
        schema = self._schemas[index]
        # the columns whose integers matter: those read (and filtered on), not declared float
        read = pa.schema(
            f
            for f in schema
            if f.name not in self.csv.doubles
            and (columns is None or filter is not None or f.name in columns)
        )
        if jsonruns.needs_exact(schema, keys):
            logger.info("Reading %s as written: a key column is typed double", self.files[index])
        elif jsonnumbers.written_integers(fragment.filesystem, fragment.path, read, keys):
            logger.info(
                "Reading %s as written: a column typed double holds integers", self.files[index]
            )
        else:
            try:
                for batch in source:
                    given += batch.num_rows
                    yield batch
                return
            except pa.ArrowInvalid as e:
                if not jsonruns.is_type_error(e):
                    raise
                logger.info("Reading %s as written: %s", self.files[index], e)
        yield from jsonruns.batches(
            fragment.filesystem,
            fragment.path,
            list(self.csv.keys),
            self.csv.text,
            self._schemas[index],
            columns,
            filter,
            refused,
            skip=given,
        )

    def _logical_batches(
        self,
        source: Iterator[pa.RecordBatch],
        keep: pa.BooleanArray | None,
        where: pc.Expression | None,
    ) -> Iterator[pa.RecordBatch]:
        """A Delta file's batches with logical names, deleted rows and rows outside
        ``where`` removed."""
        read = 0  # rows of the file read so far (before deletions and the filter)
        for batch in source:
            yield self._logical(batch, keep, read, where)
            read += batch.num_rows

    def _pieces(
        self,
        index: int,
        source: Iterator[pa.RecordBatch],
        size: int,
        skip: int,
        offset: int,
        refused: dict[int, str],
    ) -> Iterator[LakeBatch]:
        """File ``index``'s rows from row ``offset`` in pieces of ``size`` rows: ``source``
        holds them after its first ``skip`` rows (row groups before them were not read);
        ``refused``: the reasons of rows the reader refused, by their place in the stream."""
        ordinal = self.first_index + index
        pending: list[pa.RecordBatch] = []
        pending_rows = 0
        streamed = 0  # rows the file's stream gave so far
        while (batch := self._guard(index, next, source, None)) is not None:
            if self.format in ("csv", "json"):  # text the encoding does not describe
                encoding = self.csv.encoding if self.format == "csv" else None
                batch, bad = text.decoded(batch, encoding)
                refused.update({streamed + row: why for row, why in bad.items()})
            streamed += batch.num_rows
            if skip:
                if batch.num_rows <= skip:
                    skip -= batch.num_rows
                    continue
                batch, skip = batch.slice(skip), 0
            if pending and not batch.schema.equals(pending[0].schema):  # (JSON as written)
                table = pa.Table.from_batches(pending)
                yield LakeBatch(
                    table,
                    self.files[index],
                    index,
                    offset,
                    ordinal,
                    refused=_within(refused, offset, pending_rows),
                )
                offset += pending_rows
                pending, pending_rows = [], 0
            if batch.num_rows:
                pending.append(batch)
                pending_rows += batch.num_rows
            while pending_rows >= size:
                table = pa.Table.from_batches(pending)
                yield LakeBatch(
                    table.slice(0, size),
                    self.files[index],
                    index,
                    offset,
                    ordinal,
                    refused=_within(refused, offset, size),
                )
                offset += size
                rest = table.slice(size)
                pending, pending_rows = rest.to_batches(), rest.num_rows
        if pending_rows:
            yield LakeBatch(
                pa.Table.from_batches(pending),
                self.files[index],
                index,
                offset,
                ordinal,
                refused=_within(refused, offset, pending_rows),
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


def _lazy(call: Callable[..., Iterable[pa.RecordBatch]], **kwargs: Any) -> Iterator[pa.RecordBatch]:
    """``call(**kwargs)``'s batches, called when the first is asked for (so that its errors
    are met where the batches are read)."""
    yield from call(**kwargs)


def _iso(ms: int) -> str:
    """A time in ms since the epoch as an ISO 8601 UTC string."""
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds")


def _filtered_keeping(
    source: Iterator[pa.RecordBatch],
    where: pc.Expression,
    held: dict[int, str],
    refused: dict[int, str],
    lake: Lake,
    columns: list[str] | None,
) -> Iterator[pa.RecordBatch]:
    """``source``'s rows that ``where`` keeps, and the rows ``held`` names (file rows, with
    their reason): ``refused`` gets those by their place in the stream given. ``where``
    compares the watermark column as the ``lake`` compares it (``Lake.as_compared``), and
    keeps the rows whose cell cannot be compared so. A column of the lake's schema the file
    lacks is null, as the scanner's filter has it. The batches given hold ``columns`` (None:
    those read)."""
    read = given = 0
    for batch in source:
        n = batch.num_rows
        table = pa.Table.from_batches([batch]).append_column("\0row", pa.array(range(n)))
        table, unreadable = lake._comparing(table)
        for f in lake.schema:
            if f.name not in table.column_names:
                table = table.append_column(f, pa.nulls(n, f.type))
        rows = table.filter(where).column("\0row").to_numpy()
        if unreadable is not None:  # kept: validation rejects them with the reason
            lost = pc.indices_nonzero(unreadable).to_numpy().astype(np.int64)  # (uint64)
            rows = np.union1d(rows, lost)
        mine = {r - read: why for r, why in held.items() if read <= r < read + n}
        order = np.union1d(rows, np.fromiter(mine, np.int64, len(mine)))
        refused.update({given + int(np.searchsorted(order, r)): why for r, why in mine.items()})
        read, given = read + n, given + len(order)
        out = batch.take(pa.array(order, pa.int64()))
        yield out if columns is None else out.select(columns)


def _within(refused: dict[int, str], start: int, rows: int) -> dict[int, str]:
    """The refused rows ``[start, start + rows)``, by their place in that range."""
    if not refused:
        return {}
    return {r - start: why for r, why in refused.items() if start <= r < start + rows}


def _same_kind(stats_type: pa.DataType, column: str, schema: pa.Schema) -> bool:
    """Whether a file's statistics of ``column`` (of ``stats_type``: int64 for integers,
    date32, a timestamp) are of the lake's kind of values: the same column may be an
    integer in one file and a date or a timestamp in another (the lake's type is then the
    first file's), and days or a timestamp's units are no integers of the lake."""
    if column not in schema.names:
        return False
    lake_type = schema.field(column).type
    if pa.types.is_timestamp(stats_type):
        return bool(pa.types.is_timestamp(lake_type))
    if pa.types.is_date(stats_type):
        return bool(pa.types.is_date(lake_type))
    return bool(pa.types.is_integer(lake_type))
