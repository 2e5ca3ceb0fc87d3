"""Iceberg tables: the data files of one snapshot, planned and read by ``pyiceberg``.

``pyiceberg`` (the optional extra ``lakesync[iceberg]``) reads the table's metadata, plans the
snapshot's data files with the position delete files that apply to each, and reads each file
with its deletes applied, its columns resolved by field id (renamed, added and dropped
columns) and its partition values filled in. A table is named by a metadata file, by its
folder (see ``metadata_file``), or through a catalog declared in lakesync.toml.

Lake order is the snapshot's data sequence numbers, then manifest order: each data file is a
unit, read in that order, rows in file order; a file a rewrite wrote (a copy-on-write delete
or update, a compaction) takes the place of the newest file it replaced (``icebergorder``).
Equality deletes, which pyiceberg does not apply yet, are applied here by the Iceberg spec's
rules (a delete file of a higher data sequence number, in the data file's partition or in an
unpartitioned spec; nulls match nulls). A unit's rows (after deletes) are the same on every
read of the same snapshot, so a checkpoint (unit, row) means the same rows on every run.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from lakesync.config import Settings
from lakesync.errors import SourceError, TransientSourceError
from lakesync.locations import Location, read_error, short_error
from lakesync.sources.base import MISSING, OrderDoubt, OrderKey, rewritten_place
from lakesync.sources.icebergorder import rewrite_places

if TYPE_CHECKING:
    from pyiceberg.manifest import DataFile
    from pyiceberg.schema import Schema
    from pyiceberg.table import FileScanTask, Table

logger = logging.getLogger(__name__)

METADATA_DIR = "metadata"
VERSION_HINT = "version-hint.text"
#: ``v3.metadata.json`` (tables written without a catalog) or ``00003-<uuid>.metadata.json``
#: (catalogs), either possibly gzip-compressed as ``.gz.metadata.json``
_METADATA_NAME = re.compile(r"(?:v(\d+)|(\d+)-[^/]+?)(?:\.gz)?\.metadata\.json")
_INSTALL = "pip install 'lakesync[iceberg]'"
_TIMEOUTS = {"s3.connect-timeout": "10", "s3.request-timeout": "60"}  # as for other lakes
#: catalog errors of a catalog out of reach (SQLAlchemy's, the REST client's), by name
_UNREACHABLE = ("OperationalError", "ConnectionError", "Timeout", "ReadTimeout")


@dataclass(frozen=True)
class CatalogTable:
    """A table named through a catalog of lakesync.toml: ``[catalogs.NAME]`` properties
    passed to ``pyiceberg.catalog.load_catalog(NAME, **properties)``."""

    catalog: str
    table: str  # "namespace.table"
    #: may hold secrets (a catalog password or token): never shown
    properties: dict[str, str] = field(default_factory=dict, repr=False)

    @property
    def uri(self) -> str:
        """How jobs, watermarks and messages name the table."""
        return f"iceberg://{self.catalog}/{self.table}"


@dataclass(frozen=True)
class Unit:
    """One data file of the snapshot, with the delete files that apply to it."""

    name: str  # its path relative to the table's location: stable across reads
    path: str  # as the metadata names it
    sequence: int  # its data sequence number
    size: int
    records: int  # rows in the file, before deletes
    task: FileScanTask
    equality: tuple[DataFile, ...] = ()

    @property
    def has_deletes(self) -> bool:
        """Whether some delete file applies: then only reading the file gives its rows."""
        return bool(self.task.delete_files or self.equality)


def pyiceberg_missing(where: str) -> SourceError | None:
    """The error to raise when pyiceberg is not installed (None when it is)."""
    try:
        import pyiceberg.table  # noqa: F401
    except ImportError:
        return SourceError(
            f"{where} is an Iceberg table, and reading Iceberg tables needs the optional "
            f"pyiceberg package: {_INSTALL}."
        )
    return None


def is_metadata_file(path: str) -> bool:
    """Whether ``path`` names an Iceberg table metadata file."""
    return _METADATA_NAME.fullmatch(path.rsplit("/", 1)[-1]) is not None


def is_iceberg_table(location: Location, path: str) -> bool:
    """Whether the directory ``path`` holds a ``metadata`` folder with Iceberg metadata."""
    folder = f"{path.rstrip('/')}/{METADATA_DIR}"
    try:
        if location.fs.get_file_info(folder).type != pafs.FileType.Directory:
            return False
        names = [i.base_name for i in location.fs.get_file_info(pafs.FileSelector(folder))]
    except (OSError, pa.ArrowException) as e:
        raise read_error(e, location.show(path), "iceberg", location.endpoint, listing=True) from e
    return any(n == VERSION_HINT or _METADATA_NAME.fullmatch(n) for n in names)


def metadata_file(location: Location, path: str) -> str:
    """The current metadata file of the table folder ``path`` (a path in ``location``).

    The rule: ``metadata/version-hint.text`` names it when present (tables written without a
    catalog keep it); otherwise the metadata file with the highest number (``vN`` or ``N-``)
    is current, as every commit writes the next number. Two files of that number (a commit
    that lost a race leaves one behind) cannot be told apart: the error asks for the file.
    """
    folder = f"{path.rstrip('/')}/{METADATA_DIR}"
    shown = location.show(folder)
    try:
        hint = location.fs.get_file_info(f"{folder}/{VERSION_HINT}")
        if hint.type == pafs.FileType.File:
            with location.fs.open_input_stream(f"{folder}/{VERSION_HINT}") as f:
                text = f.read(4096).decode("utf-8", "replace").strip()
            name = text if text.endswith(".metadata.json") else f"v{text}.metadata.json"
            if not text.isdigit() and not _METADATA_NAME.fullmatch(text):
                raise SourceError(
                    f"{shown}/{VERSION_HINT} holds {text[:80]!r}, not a version number nor a "
                    "metadata file name. Point the source at the table's current "
                    ".metadata.json file instead.",
                    file=f"{shown}/{VERSION_HINT}",
                )
            if location.fs.get_file_info(f"{folder}/{name}").type != pafs.FileType.File:
                raise SourceError(
                    f"{shown}/{VERSION_HINT} names {name}, which is not in {shown}. Point the "
                    "source at the table's current .metadata.json file instead.",
                    file=f"{shown}/{name}",
                )
            return f"{folder}/{name}"
        names = [i.base_name for i in location.fs.get_file_info(pafs.FileSelector(folder))]
    except (OSError, pa.ArrowException) as e:
        raise read_error(e, shown, "iceberg", location.endpoint, listing=True) from e
    numbered: dict[int, list[str]] = {}
    for name in names:
        if (m := _METADATA_NAME.fullmatch(name)) is not None:
            numbered.setdefault(int(m.group(1) or m.group(2)), []).append(name)
    if not numbered:
        raise SourceError(
            f"{shown} holds no Iceberg metadata file (*.metadata.json). Point the source at "
            "an Iceberg table's folder or metadata file.",
            file=shown,
        )
    newest = numbered[max(numbered)]
    if len(newest) > 1:
        raise SourceError(
            f"{shown} holds {len(newest)} metadata files numbered {max(numbered)} "
            f"({', '.join(sorted(newest))}), so which is current cannot be told from the "
            "folder. Point the source at the current one, or name the table through its "
            "catalog in lakesync.toml.",
            file=shown,
        )
    return f"{folder}/{newest[0]}"


def io_properties(location: Location) -> dict[str, str]:
    """pyiceberg FileIO properties for a lake's S3 settings (LAKESYNC_S3_ENDPOINT_URL, the
    region); credentials come from the standard AWS variables, as for every lake."""
    props = {"py-io-impl": "pyiceberg.io.pyarrow.PyArrowFileIO"}
    if not location.is_s3:
        return props
    options = location.storage_options
    if "AWS_ENDPOINT_URL" in options:
        props["s3.endpoint"] = options["AWS_ENDPOINT_URL"]
    if "AWS_REGION" in options:
        props["s3.region"] = options["AWS_REGION"]
    return props | _TIMEOUTS


def settings_properties(settings: Settings) -> dict[str, str]:
    """lakesync's S3 settings as pyiceberg FileIO properties, for a catalog's tables (a
    catalog's own properties win over them)."""
    props = dict(_TIMEOUTS)
    if settings.s3_endpoint_url:
        url = settings.s3_endpoint_url
        props["s3.endpoint"] = url if "://" in url else f"https://{url}"
    if settings.s3_region:
        props["s3.region"] = settings.s3_region
    return props


def load_table(location: Location, path: str) -> Table:
    """The table whose metadata file (or folder) is ``path`` in ``location``.

    The FileIO is lakesync's own (its S3 endpoint and region), never one the table's
    properties would choose: a table written by anyone does not pick the code or endpoint
    that reads it.
    """
    from pyiceberg.catalog.noop import NoopCatalog
    from pyiceberg.io import load_file_io
    from pyiceberg.serializers import FromInputFile
    from pyiceberg.table import StaticTable

    found = path if is_metadata_file(path) else metadata_file(location, path)
    uri = _uri(location, found)
    io = load_file_io(io_properties(location), location=uri)
    try:
        metadata = FromInputFile.table_metadata(io.new_input(uri))
    except (OSError, pa.ArrowException) as e:
        raise read_error(e, uri, "iceberg", location.endpoint) from e
    except Exception as e:  # pydantic ValidationError, JSON and gzip errors
        problems = getattr(e, "errors", None)
        text = short_error(str(e))
        if callable(problems):  # pydantic: the fields, not its paragraph per field
            fields = [".".join(str(p) for p in item["loc"][1:]) for item in problems()]
            text = f"{', '.join(dict.fromkeys(fields))}: missing or invalid"
        raise SourceError(
            f"The Iceberg table metadata {shown(uri)} cannot be read ({text}). Point the "
            "source at the table's current .metadata.json file, or its folder.",
            file=shown(uri),
        ) from e
    return StaticTable(
        identifier=("static-table", uri),
        metadata=metadata,
        metadata_location=uri,
        io=io,
        catalog=NoopCatalog("static-table"),
    )


def catalog_table(named: CatalogTable, defaults: dict[str, str]) -> Table:
    """The table a catalog of lakesync.toml names (the catalog's own properties win over
    ``defaults``, lakesync's S3 settings)."""
    from pyiceberg.catalog import load_catalog

    props = {**defaults, **named.properties}
    try:
        catalog = load_catalog(named.catalog, **props)
        return catalog.load_table(named.table)
    except Exception as e:  # NoSuchTableError, connection and driver errors of every catalog
        text, kind = short_error(str(e)), type(e).__name__
        if kind in ("NoSuchTableError", "NoSuchNamespaceError"):
            raise SourceError(
                f"The catalog {named.catalog!r} has no table {named.table!r} ({text}). Check "
                "`table` in lakesync.toml (namespace.table).",
                uri=named.uri,
            ) from e
        # a catalog out of reach may come back (a retry helps); a wrong setting will not
        unreachable = isinstance(e, OSError) or kind in _UNREACHABLE
        raise (TransientSourceError if unreachable else SourceError)(
            f"Cannot load the table {named.table!r} from the catalog {named.catalog!r}: "
            f"{kind}: {text}. Check [catalogs.{named.catalog}] in lakesync.toml"
            f"{' and that the catalog is reachable' if unreachable else ''}.",
            uri=named.uri,
        ) from e


class IcebergSnapshot:
    """The units (data files) of one snapshot of a table, in lake order, and their rows.

    ``since`` is the snapshot whose data files were left out (None: all of the snapshot's):
    what an incremental copy reads, since Iceberg never changes a data file in place.
    """

    def __init__(
        self,
        table: Table,
        uri: str,
        *,
        snapshot_id: int | None = None,
        since: int | None = None,
        confined: str | None = None,
        endpoint: str | None = None,
    ) -> None:
        from pyiceberg.io.pyarrow import schema_to_pyarrow

        self.uri, self._table, self._endpoint = uri, table, endpoint
        metadata = table.metadata
        snapshot = metadata.current_snapshot() if snapshot_id is None else None
        if snapshot_id is not None:
            snapshot = metadata.snapshot_by_id(snapshot_id)
            if snapshot is None:
                latest = metadata.current_snapshot_id
                raise SourceError(
                    f"The Iceberg table {uri} has no snapshot {snapshot_id} (its current one "
                    f"is {latest}); it may have been expired. Copy the current snapshot instead.",
                    uri=uri,
                )
        self.snapshot_id: int | None = None if snapshot is None else snapshot.snapshot_id
        self.since = since
        scan = table.scan(snapshot_id=self.snapshot_id)
        self._schema: Schema = scan.projection()
        self.schema: pa.Schema = pa.schema(
            [f.remove_metadata() for f in schema_to_pyarrow(self._schema, include_field_ids=False)]
        )
        self._root = metadata.location.rstrip("/")
        #: data file path -> why its place or row order is not the table's own
        self.doubts: dict[str, OrderDoubt] = {}
        self.units: list[Unit] = [] if snapshot is None else self._plan(snapshot, confined)
        if since is not None and snapshot is not None:
            before = self._data_files(since, confined)
            self.units = [u for u in self.units if u.path not in before]
        self._rows: dict[int, int] = {}
        self._equality_rows: dict[str, tuple[list[str], pa.Table]] = {}

    def _plan(self, snapshot: Any, confined: str | None) -> list[Unit]:
        from pyiceberg.manifest import DataFileContent
        from pyiceberg.table import ManifestGroupPlanner
        from pyiceberg.table.snapshots import ancestors_of

        table, order = self._table, itertools.count()
        placed: dict[str, OrderKey] = {}  # data file -> its place in lake order (module doc)
        sequences: dict[str, int] = {}  # data file -> its data sequence number
        equality: list[tuple[DataFile, int]] = []
        everywhere: list[tuple[DataFile, int]] = []  # position deletes of an unpartitioned spec
        specs = table.metadata.specs()
        # v1 tables have no sequence numbers (all are 0): the place in the table's history of
        # the snapshot that added a file stands in for it, as a v2 table would have numbered it
        history = list(ancestors_of(snapshot, table.metadata))[::-1]
        rank = {s.snapshot_id: i + 1 for i, s in enumerate(history)}
        v1 = table.metadata.format_version == 1

        def check(path: str) -> None:
            if confined is not None:
                _confined(path, confined, self.uri)

        def take(entry: Any) -> bool:  # called in manifest order, entry by entry
            f, seq = entry.data_file, entry.sequence_number or 0
            if v1:
                seq = rank.get(entry.snapshot_id, 0)
            if confined is not None:
                _confined(f.file_path, confined, self.uri)
            if f.content == DataFileContent.EQUALITY_DELETES:  # pyiceberg refuses them
                equality.append((f, seq))
                return False
            if (
                f.content == DataFileContent.POSITION_DELETES
                and specs[f.spec_id].is_unpartitioned()
            ):
                everywhere.append((f, seq))
            if f.content == DataFileContent.DATA:
                own, sequences[f.file_path] = (seq, next(order)), seq
                base = rewrites.get(f.file_path)  # written by a rewrite: its source's place
                placed[f.file_path] = own if base is None else rewritten_place((base,), own)
            return True

        try:
            rewrites = rewrite_places(table, history, rank if v1 else None, check, self.doubts)
            if confined is not None:
                _confined(snapshot.manifest_list, confined, self.uri)
            manifests = snapshot.manifests(table.io)
            if confined is not None:
                for m in manifests:
                    _confined(m.manifest_path, confined, self.uri)
            planner = ManifestGroupPlanner(table.metadata, table.io)
            tasks = list(planner.plan_files(manifests, take))
        except SourceError:
            raise
        except (OSError, pa.ArrowException) as e:
            raise read_error(e, self.uri, "iceberg", self._endpoint) from e
        except Exception as e:
            raise SourceError(
                f"Cannot plan the Iceberg table {self.uri}: {short_error(str(e))}.", uri=self.uri
            ) from e
        units = []
        for task in tasks:
            data = task.file
            seq = sequences[data.file_path]
            if not specs[data.spec_id].is_unpartitioned():
                # an unpartitioned spec's position deletes apply to files of every spec (the
                # Iceberg spec); pyiceberg's planner matches them to their own spec only
                task.delete_files |= {f for f, f_seq in everywhere if f_seq >= seq}
            applies = tuple(
                f
                for f, f_seq in equality
                if f_seq > seq
                and (
                    specs[f.spec_id].is_unpartitioned()
                    or (f.spec_id == data.spec_id and f.partition == data.partition)
                )
            )
            name = data.file_path
            if name.startswith(self._root + "/"):
                name = name[len(self._root) + 1 :]
            units.append(
                Unit(
                    name,
                    data.file_path,
                    seq,
                    int(data.file_size_in_bytes),
                    int(data.record_count),
                    task,
                    applies,
                )
            )
        units.sort(key=lambda u: placed[u.path])
        if history:  # a file older than the oldest snapshot kept: its snapshot was expired
            kept = 1 if v1 else history[0].sequence_number or 0
            for u in units:
                if sequences[u.path] < kept and u.path not in self.doubts:
                    why = "history missing (the snapshot that wrote it was expired)"
                    self.doubts[u.path] = OrderDoubt(MISSING, why)
        return units

    def _data_files(self, snapshot_id: int, confined: str | None) -> set[str]:
        """The data files of an earlier snapshot (SourceError if it is no longer known)."""
        from pyiceberg.manifest import DataFileContent

        metadata = self._table.metadata
        old = metadata.snapshot_by_id(snapshot_id)
        if old is None:
            raise SourceError(
                f"Cannot read the files added to the Iceberg table {self.uri} since snapshot "
                f"{snapshot_id}: the table no longer has that snapshot (expired?).",
                uri=self.uri,
            )
        io = self._table.io
        try:
            if confined is not None:
                _confined(old.manifest_list, confined, self.uri)
            manifests = old.manifests(io)
            if confined is not None:
                for m in manifests:
                    _confined(m.manifest_path, confined, self.uri)
            return {
                e.data_file.file_path
                for m in manifests
                for e in m.fetch_manifest_entry(io, discard_deleted=True)
                if e.data_file.content == DataFileContent.DATA
            }
        except (OSError, pa.ArrowException) as e:
            raise read_error(e, self.uri, "iceberg", self._endpoint) from e

    def rows(self, index: int) -> int:
        """Unit ``index``'s rows after its deletes (the manifest's count when none apply)."""
        unit = self.units[index]
        if not unit.has_deletes:
            return unit.records
        if index not in self._rows:
            self._rows[index] = sum(b.num_rows for b in self.read(index, []))
        return self._rows[index]

    def read(
        self, index: int, columns: list[str] | None = None, where: pc.Expression | None = None
    ) -> Iterator[pa.RecordBatch]:
        """Unit ``index``'s rows in file order, deletes applied, then those ``where`` keeps;
        ``columns`` (None: all of the snapshot's schema) in that order."""
        from pyiceberg.expressions import AlwaysTrue
        from pyiceberg.io.pyarrow import ArrowScan

        unit = self.units[index]
        deletes = [self._equality_deletes(f) for f in unit.equality]
        wanted = None if columns is None or where is not None else list(columns)
        if wanted is not None:
            wanted += [n for names, _ in deletes for n in names if n not in wanted]
            if not wanted:  # rows only: one plain column carries them
                plain = [f for f in self._schema.fields if f.field_type.is_primitive]
                wanted = [(plain or self._schema.fields)[0].name]
        projection = self._schema if wanted is None else self._schema.select(*wanted)
        # the top-level fields (``column_names`` names nested ones too: ``s.a``, ``l.element``)
        target = pa.schema([self.schema.field(f.name) for f in projection.fields])
        scan = ArrowScan(self._table.metadata, self._table.io, projection, AlwaysTrue())
        try:
            for batch in _task_batches(scan, self._table.io, unit.task):
                if not batch.schema.equals(target):  # e.g. string read, large_string declared
                    batch = pa.RecordBatch.from_arrays(
                        [c.cast(f.type) for c, f in zip(batch.columns, target, strict=True)],
                        schema=target,
                    )
                for names, rows in deletes:
                    batch = batch.filter(_not_deleted(batch, names, rows))
                if where is not None:
                    batch = batch.filter(where)
                if columns is not None:
                    batch = batch.select(columns)
                yield batch
        except SourceError:
            raise
        except (OSError, pa.ArrowException) as e:
            raise read_error(e, shown(unit.path), "iceberg", self._endpoint) from e
        except Exception as e:  # pyiceberg's ResolveError, ValueError on a bad file
            raise SourceError(
                f"Cannot read {shown(unit.path)} of the Iceberg table {self.uri}: "
                f"{short_error(str(e))}.",
                file=shown(unit.path),
            ) from e

    def _equality_deletes(self, delete: DataFile) -> tuple[list[str], pa.Table]:
        """An equality delete file's columns (by today's names) and rows, read once."""
        from pyiceberg.expressions import AlwaysTrue
        from pyiceberg.io.pyarrow import ArrowScan
        from pyiceberg.schema import Schema
        from pyiceberg.table import FileScanTask

        known = self._equality_rows.get(delete.file_path)
        if known is not None:
            return known
        try:
            fields = [self._schema.find_field(i) for i in delete.equality_ids or []]
        except ValueError as e:
            raise SourceError(
                f"The equality delete file {shown(delete.file_path)} of the Iceberg table "
                f"{self.uri} matches on a column the snapshot's schema no longer has; "
                "lakesync cannot apply it. Rewrite the table's deletes (e.g. compact it).",
                file=shown(delete.file_path),
            ) from e
        if not fields:
            raise SourceError(
                f"The equality delete file {shown(delete.file_path)} of the Iceberg table "
                f"{self.uri} names no equality columns (equality_ids).",
                file=shown(delete.file_path),
            )
        scan = ArrowScan(self._table.metadata, self._table.io, Schema(*fields), AlwaysTrue())
        try:
            rows = scan.to_table([FileScanTask(delete)])
        except (OSError, pa.ArrowException) as e:
            raise read_error(e, shown(delete.file_path), "iceberg", self._endpoint) from e
        names = [f.name for f in fields]
        rows = rows.select(names).cast(pa.schema([self.schema.field(n) for n in names]))
        self._equality_rows[delete.file_path] = (names, rows)
        return names, rows


def _task_batches(scan: Any, io: Any, task: FileScanTask) -> Iterator[pa.RecordBatch]:
    """The task's batches, streamed: ``ArrowScan.to_record_batches`` holds a whole file's
    batches in memory before it yields the first, so its per-task reader is used when
    this pyiceberg has it."""
    from pyiceberg.io import pyarrow as pyiceberg_arrow

    read_deletes = getattr(pyiceberg_arrow, "_read_all_delete_files", None)
    stream = getattr(scan, "_record_batches_from_scan_tasks_and_deletes", None)
    if read_deletes is None or stream is None:
        return iter(scan.to_record_batches([task]))
    return iter(stream([task], read_deletes(io, [task])))


def _not_deleted(batch: pa.RecordBatch, names: list[str], rows: pa.Table) -> pa.Array:
    """Which rows of ``batch`` no row of an equality delete file matches (null matches null,
    as the Iceberg spec has it)."""
    if len(names) == 1:
        values = rows.column(0).combine_chunks()
        return pc.invert(pc.is_in(batch.column(names[0]), value_set=values, skip_nulls=False))
    gone = set(zip(*(rows.column(n).to_pylist() for n in names), strict=True))
    mine = zip(*(batch.column(n).to_pylist() for n in names), strict=True)
    return pa.array([key not in gone for key in mine], pa.bool_())


def _uri(location: Location, path: str) -> str:
    """A path of ``location`` as pyiceberg's FileIO takes it."""
    return location.show(path) if location.is_s3 else f"file://{path}"


def shown(path: str) -> str:
    """A file of the metadata as lakesync names files (local: a plain path, whether the
    writer spelt it ``file:///tmp/t`` or, as Hadoop does, ``file:/tmp/t``)."""
    if not path.startswith("file:"):
        return path
    rest = path.removeprefix("file:")
    return unquote(rest[2:] if rest.startswith("//") else rest)


def _confined(path: str, root: str, uri: str) -> None:
    """SourceError unless a file the metadata names lies in the table's folder ``root``
    (a URI, ``file:///...`` or ``s3://...``): a metadata file anyone can write must not
    make the server read files outside the lake it was allowed to read."""
    parts, base = urlsplit(path), urlsplit(root)
    scheme = {"s3a": "s3", "s3n": "s3", "": "file"}.get(parts.scheme, parts.scheme)
    if scheme == "file":  # both as the filesystem resolves them (links in the way)
        where = ("file", "", os.path.realpath(_normal(unquote(parts.path))))
        home = ("file", "", os.path.realpath(_normal(unquote(base.path))).rstrip("/"))
    else:
        where = (scheme, parts.netloc, _normal(parts.path))
        home = (base.scheme, base.netloc, _normal(unquote(base.path)).rstrip("/"))
    if where[:2] == home[:2] and where[2].startswith(home[2] + "/"):
        return
    raise SourceError(
        f"The Iceberg table {uri} names a file outside its folder ({path}); lakesync reads "
        "tables named by a metadata file only from their own folder. Name the table through "
        "a catalog in lakesync.toml to read it as it is.",
        uri=uri,
    )


def _normal(path: str) -> str:
    """A path with ``.`` and ``..`` segments resolved (never above its root)."""
    out: list[str] = []
    for segment in path.split("/"):
        if segment == "..":
            if out:
                out.pop()
        elif segment not in ("", "."):
            out.append(segment)
    return "/" + "/".join(out)
