"""Delta Lake tables: the active Parquet files of one table version, found by ``deltalake``.

``deltalake`` (the optional extra ``lakesync[delta]``) reads the transaction log (JSON
commits, classic and v2 checkpoints): which files make up the version, their partition
values, their deletion vectors and the table schema with its column mapping. The files
themselves are then read like any other Parquet lake, through lakesync's own filesystem
(the same endpoint, timeouts and error messages as plain Parquet on S3), in the table's
commit order (``deltalog``) and row order, so the last record of a key is the newest and a
checkpoint (file, row) means the same rows on every run: the rows a deletion vector
removes are skipped, and physical column names become logical ones.
"""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import unquote

import pyarrow as pa
import pyarrow.compute as pc

from lakesync.errors import SourceError, TransientSourceError
from lakesync.locations import Location, s3_message, short_error
from lakesync.sources.base import TableVersion
from lakesync.sources.deltalog import commit_order
from lakesync.sources.tables import DELTA_LOG

logger = logging.getLogger(__name__)


#: reader features whose tables lakesync reads correctly (deletion vectors and column mapping
#: are applied here; the rest concern the log, which deltalake reads, or need nothing)
READABLE = {
    "deletionVectors",
    "columnMapping",
    "timestampNtz",
    "v2Checkpoint",
    "vacuumProtocolCheck",
    "typeWidening",
    "typeWidening-preview",
    "appendOnly",
    "invariants",
    "checkConstraints",
    "generatedColumns",
    "changeDataFeed",
    "identityColumns",
    "domainMetadata",
    "rowTracking",
    "inCommitTimestamp",
    "variantType",
    "variantType-preview",
}


def snapshot(location: Location, path: str, version: int | None = None) -> TableVersion:
    """The active files of the table at ``path`` (its latest version, or ``version``)."""
    try:
        from deltalake import DeltaTable
    except ImportError:
        raise SourceError(
            f"{location.show(path)} is a Delta table, and reading Delta tables needs the "
            "optional deltalake package: pip install 'lakesync[delta]'."
        ) from None
    uri = location.show(path)
    options = location.storage_options if location.is_s3 else None
    try:
        table = DeltaTable(uri, version=version, storage_options=options)
        features = set(table.protocol().reader_features or [])
        unknown = sorted(features - READABLE)
        if unknown:
            raise SourceError(
                f"The Delta table {uri} needs the reader feature(s) {', '.join(unknown)}, "
                "which lakesync cannot read. Rewrite the table without them.",
                file=uri,
            )
        mapping = table.metadata().configuration.get("delta.columnMapping.mode", "none")
        schema = pa.schema(table.schema().to_arrow())
        actions = pa.table(table.get_add_actions(flatten=True))
        vectors = pa.table(table.deletion_vectors().read_all())
        current = int(table.version())
    except SourceError:
        raise
    except Exception as e:  # deltalake raises its own DeltaError family, OSError, ValueError
        raise _delta_error(e, location, uri, version) from e
    partitions = [
        n.removeprefix("partition.") for n in actions.column_names if n.startswith("partition.")
    ]
    files, modified = [], {}
    chosen = ["path", "modification_time", *(f"partition.{p}" for p in partitions)]
    for row in actions.select(chosen).to_pylist():
        at = _file_path(location, path, row["path"])
        files.append((at, _expression(schema, row)))
        modified[at] = _millis(row["modification_time"])
    order, doubts, lineage = commit_order(
        location, path, current, modified, lambda logged: _file_path(location, path, logged)
    )
    files.sort(key=lambda f: order[f[0]])  # the table's commit order
    selections = vectors.column("selection_vector").combine_chunks()  # kept as Arrow bits
    live = {
        _file_path(location, path, logged): selections[i].values
        for i, logged in enumerate(vectors.column("filepath").to_pylist())
    }
    renames = {} if mapping == "none" else _physical_names(schema, set(partitions))
    physical = None
    if mapping != "none":  # partition columns keep their names: they are not in the files
        physical = pa.schema([f if f.name in partitions else physical_field(f) for f in schema])
    # the data columns as the files name them: what a rewrite's rows are traced by
    scanned = physical if physical is not None else schema
    lineage.columns = pa.schema([f for f in scanned if f.name not in partitions])

    def vectors_at(at: int) -> dict[str, pa.BooleanArray]:
        older = DeltaTable(uri, version=at, storage_options=options)
        found = pa.table(older.deletion_vectors().read_all())
        chosen = found.column("selection_vector").combine_chunks()
        return {
            _file_path(location, path, logged): chosen[i].values
            for i, logged in enumerate(found.column("filepath").to_pylist())
        }

    lineage.vectors_at = vectors_at
    logger.info(
        "Delta table %s version %d: %d active file(s), %d with deleted rows",
        uri,
        current,
        len(files),
        len(live),
    )
    return TableVersion(
        "delta", current, schema, files, renames, live, physical, doubts, order, lineage
    )


def _millis(value: Any) -> int:
    """A modification time from the add actions (a datetime, or milliseconds) in ms."""
    if value is None:
        return 0
    if isinstance(value, int):
        return value
    return int(value.timestamp() * 1000)


def physical_field(f: pa.Field) -> pa.Field:
    """A field as column mapping names it in the Parquet files, its nested fields too."""
    name = (f.metadata or {}).get(b"delta.columnMapping.physicalName")
    return f.with_name(name.decode() if name else f.name).with_type(_physical_type(f.type))


def _physical_type(kind: pa.DataType) -> pa.DataType:
    if pa.types.is_struct(kind):
        return pa.struct([physical_field(child) for child in kind])
    if pa.types.is_list(kind):
        return pa.list_(kind.value_field.with_type(_physical_type(kind.value_type)))
    if pa.types.is_large_list(kind):
        return pa.large_list(kind.value_field.with_type(_physical_type(kind.value_type)))
    if pa.types.is_map(kind):
        return pa.map_(kind.key_field, kind.item_field.with_type(_physical_type(kind.item_type)))
    return kind


def _physical_names(schema: pa.Schema, partitions: set[str]) -> dict[str, str]:
    """Column mapping: physical -> logical name of each top-level data column renamed."""
    out = {}
    for f in schema:
        physical = (f.metadata or {}).get(b"delta.columnMapping.physicalName")
        if physical and f.name not in partitions and physical.decode() != f.name:
            out[physical.decode()] = f.name
    return out


def _file_path(location: Location, root: str, logged: str) -> str:
    """The filesystem path of a file named in the log (URI-encoded, relative or absolute)."""
    if "://" not in logged:
        return f"{root.rstrip('/')}/{unquote(logged)}"
    if location.is_s3 and logged.startswith("s3://"):
        return unquote(logged.removeprefix("s3://"))
    if not location.is_s3 and logged.startswith("file://"):
        return unquote(logged.removeprefix("file://"))
    raise SourceError(
        f"The Delta table {location.show(root)} names a data file elsewhere ({logged}); "
        "lakesync reads tables whose files live on the table's own storage."
    )


def _expression(schema: pa.Schema, row: dict[str, Any]) -> pc.Expression | None:
    """The partition values of one file as the expression pyarrow fills the columns from."""
    expr = None
    for key, value in row.items():
        if not key.startswith("partition."):
            continue
        name = key.removeprefix("partition.")
        if value is None:
            term = pc.field(name).is_null()
        else:
            term = pc.field(name) == pa.scalar(value, type=schema.field(name).type)
        expr = term if expr is None else expr & term
    return expr


def _delta_error(
    error: BaseException, location: Location, uri: str, version: int | None
) -> SourceError:
    text = short_error(str(error))
    name = type(error).__name__
    if name == "TableNotFoundError" or "No files in log segment" in text:
        message = (
            f"{uri} has a {DELTA_LOG} folder but no Delta table commits in it, so it is "
            "not a table lakesync can read, and a table's files are never read as loose "
            f"files. Point the source at a Delta table's folder; if {uri} holds plain "
            f"files, remove its stray {DELTA_LOG} folder."
        )
    elif version is not None and ("version" in text.lower()):
        message = (
            f"Version {version} of the Delta table {uri} cannot be read ({text}). It may "
            f"not exist yet{_latest(location, uri)}, or its log was cleaned up: copy the "
            "current version instead."
        )
    elif name == "DeltaProtocolError":
        message = (
            f"The Delta table {uri} uses a feature lakesync cannot read ({text}). Rewrite "
            "the table without it (e.g. purge deletion vectors with OPTIMIZE/REORG)."
        )
    elif location.is_s3 and isinstance(error, OSError):
        message, transient = s3_message(text, uri, location.endpoint)
        return (TransientSourceError if transient else SourceError)(message, file=uri)
    else:
        message = f"Cannot read the Delta table {uri}: {text}. Check the path and the table."
    return SourceError(message, file=uri)


def _latest(location: Location, uri: str) -> str:
    """The error message's hint " (the latest is N)", or "" if that cannot be read."""
    from deltalake import DeltaTable

    try:
        options = location.storage_options if location.is_s3 else None
        return f" (the latest is {DeltaTable(uri, storage_options=options).version()})"
    except Exception:
        return ""
