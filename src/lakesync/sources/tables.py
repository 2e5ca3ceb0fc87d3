"""Table folders: which kind of table a folder is, and why a table's files are never
read as loose files.

A folder holding ``_delta_log/`` is a Delta table; one holding ``metadata/`` with
``*.metadata.json`` files is an Iceberg table. Their folders also hold files that are not
in the table's current version (removed, rewritten, deleted rows), so reading the files
found there gives wrong records: such a folder is read as its table (``Lake.open``) or
refused, and so is a glob, a file or a folder inside a table, or a folder holding one.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterable

import pyarrow as pa
import pyarrow.fs as pafs

from lakesync.errors import SourceError
from lakesync.locations import Location, read_error

DELTA_LOG = "_delta_log"
ICEBERG_METADATA = "metadata"


def kind_of(location: Location, path: str) -> str | None:
    """ "delta" or "iceberg" when the folder ``path`` holds that kind of table, else None.

    One listing of the folder on S3 (one LIST request, no HEAD), two stats locally, and a
    listing of its ``metadata/`` folder when it has one."""
    folder = path.rstrip("/") or "/"
    try:
        if location.is_s3:  # one LIST of the folder
            children = location.fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True))
        else:  # two stats (a folder such as /tmp may hold thousands of entries)
            named = [f"{folder.rstrip('/')}/{n}" for n in (DELTA_LOG, ICEBERG_METADATA)]
            children = location.fs.get_file_info(named)
        folders = {c.base_name for c in children if c.type == pafs.FileType.Directory}
        if DELTA_LOG in folders:
            return "delta"
        if ICEBERG_METADATA not in folders:
            return None
        inside = pafs.FileSelector(f"{folder.rstrip('/')}/{ICEBERG_METADATA}")
        listed = location.fs.get_file_info(inside)
    except (OSError, pa.ArrowException) as e:
        raise read_error(e, location.show(path), "", location.endpoint, listing=True) from e
    return "iceberg" if any(_is_iceberg_metadata(i.base_name) for i in listed) else None


def enclosing_table(location: Location, path: str) -> tuple[str, str] | None:
    """The table (its folder, its kind) that ``path`` lies inside, if any: its parent
    folders are looked at up to the filesystem's root (the bucket on S3)."""
    current = path.rstrip("/")
    while True:
        parent = posixpath.dirname(current)
        if not parent or parent == current:
            return None
        kind = kind_of(location, parent)
        if kind is not None:
            return parent, kind
        current = parent


def tables_listed(base: str, paths: Iterable[str]) -> list[tuple[str, str]]:
    """The table folders (folder, kind) below ``base`` that a recursive listing shows: a
    ``_delta_log/`` folder's parent, or a ``metadata/*.metadata.json`` file's table (a
    folder holding both is Delta, as ``kind_of`` reads it)."""
    found: dict[str, str] = {}
    for path in paths:
        if f"/{DELTA_LOG}/" not in path and f"/{ICEBERG_METADATA}/" not in path:
            continue  # most files: no table's folder on their way
        segments = path[len(base) :].strip("/").split("/")
        for i, segment in enumerate(segments[:-1]):
            folder = "/".join([base.rstrip("/"), *segments[:i]]) if i else base.rstrip("/")
            if segment == DELTA_LOG:  # over Iceberg metadata beside it, as kind_of reads it
                found[folder] = "delta"
                break
            if (
                segment == ICEBERG_METADATA
                and i == len(segments) - 2
                and _is_iceberg_metadata(segments[-1])
            ):
                found.setdefault(folder, "iceberg")
                break
    return sorted(found.items())


def refuse_inside(location: Location, table: str, kind: str, source: str) -> SourceError:
    """The error for a source that names files inside (or below) a table folder."""
    shown = location.show(table)
    return SourceError(
        f"{location.show(source)} reads files of the {_NAMES[kind]} table {shown} as loose "
        f"files, which would copy removed and rewritten rows. {_how(kind, shown)}",
        uri=location.show(source),
        file=shown,
    )


def refuse_holding(location: Location, source: str, tables: list[tuple[str, str]]) -> SourceError:
    """The error for a source folder (or glob) that holds table folders among its files."""
    table, kind = tables[0]
    shown = location.show(table)
    more = f" (and {len(tables) - 1} more table(s))" if len(tables) > 1 else ""
    return SourceError(
        f"{location.show(source)} holds the {_NAMES[kind]} table {shown}{more}; a table's "
        "files are never read as loose files (its folder also holds removed and rewritten "
        f"rows). {_how(kind, shown)} Copy other files with a source that leaves the table out.",
        uri=location.show(source),
        file=shown,
    )


def _is_iceberg_metadata(name: str) -> bool:
    return name.endswith(".metadata.json")


_NAMES = {"delta": "Delta", "iceberg": "Iceberg"}


def _how(kind: str, shown: str) -> str:
    """How to read the table ``shown`` instead."""
    if kind == "delta":
        return f"Point the source at the table's folder {shown} to read it as a Delta table."
    return f"Name the table itself: {shown} is an Iceberg table."
