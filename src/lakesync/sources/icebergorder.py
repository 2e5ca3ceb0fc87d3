"""Where the data files an Iceberg rewrite wrote come in lake order.

Lake order is the data sequence number of each file, then manifest order. A copy-on-write
DELETE, UPDATE or MERGE (pyiceberg's ``delete`` and ``overwrite``, Spark's defaults) or a
compaction rewrites the files holding the rows it changes: the new file carries the other
rows of the old one unchanged, under the rewrite's newer sequence number. By that number
alone an old row it carries would come after a newer row of the same key written in
between, and win. So, as for Delta (``base.rewritten_place``), a data file a rewrite added
takes the place of the newest file it replaced, then its own sequence number and manifest
order:

- a rewrite is a snapshot whose operation is not ``append`` that removed data files and
  added some, unless its summary says ``replace-partitions`` (a dynamic partition
  overwrite: its files hold new rows only);
- the files it removed are its own manifests' DELETED entries, which keep each removed
  file's data sequence number (v2); a v1 table numbers no sequence, so the parent
  snapshot's entries tell which snapshot added each removed file (``rank``);
- which removed files an added file replaced: Iceberg does not record it, so it is told
  from the manifests: those of the same partition (when of the same partition spec: a
  rewrite under a newer spec splits a file by it), with at least as many rows, whose
  column bounds (and null counts) hold the added file's. A rewrite of several files of
  different ages (one delete touching old and new files) then places each new file where
  its own source was. When no removed file fits (an update moved values out of range),
  every file the snapshot removed is a candidate;
- a removed file comes, among the files of its own sequence number, after all of them (its
  place in manifest order is not kept);
- the history followed is the snapshot's ancestors still in the metadata: a rewrite whose
  snapshot was expired gives its files their own sequence number.

What this cannot tell is said per file (``base.OrderDoubt``): a file a rewrite wrote from
files of several sequence numbers holds their rows in the writer's order; the files older
than the oldest snapshot kept (the others expired) may come from a rewrite that is gone.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from lakesync.sources.base import MERGED, OrderDoubt, OrderKey, rewritten_place

if TYPE_CHECKING:
    from pyiceberg.manifest import DataFile
    from pyiceberg.table import Table

#: a removed file's place among the files of its sequence number: after all of them
_LAST = 1 << 62
_READ_THREADS = 8  # snapshots whose manifests are read at once (on S3, one round trip each)


def rewrite_places(
    table: Table,
    history: list[Any],
    rank: dict[int, int] | None,
    confined: Callable[[str], None],
    doubts: dict[str, OrderDoubt] | None = None,
) -> dict[str, OrderKey]:
    """The place of each data file a rewrite of ``history`` (the snapshot read and its
    ancestors, oldest first) added, by path: the place of the newest file it replaced (see
    the module's rules), to which the file's own (sequence number, manifest order) is added.
    ``rank`` (v1 tables) numbers each snapshot in place of a sequence number; ``confined``
    checks each metadata file read lies in the table's folder. ``doubts`` receives the
    added files that may hold rows of several sequence numbers (``OrderDoubt``)."""
    rewrites = [s for s in history if _is_rewrite(s)]
    if not rewrites:
        return {}
    types = _field_types(table)
    with ThreadPoolExecutor(min(_READ_THREADS, len(rewrites))) as pool:
        changes = list(pool.map(lambda s: _changes(table, s, rank, confined), rewrites))
    places: dict[str, OrderKey] = {}
    spans: dict[str, tuple[int, int]] = {}  # the sequence numbers a file's rows come from
    for removed, added in changes:
        if not removed:
            continue
        place = {}  # each removed file's place (after every file of its sequence number)
        for f, sequence in removed:
            own = (sequence, _LAST)
            earlier = places.get(f.file_path)
            place[f.file_path] = own if earlier is None else rewritten_place((earlier,), own)
            spans.setdefault(f.file_path, (sequence, sequence))
        for f in added:
            sources = [r for r, _ in removed if _could_hold(r, f, types)] or [r for r, _ in removed]
            places[f.file_path] = max(place[r.file_path] for r in sources)
            low = min(spans[r.file_path][0] for r in sources)
            high = max(spans[r.file_path][1] for r in sources)
            spans[f.file_path] = (low, high)
            if low != high and doubts is not None:
                why = f"merged rewrite of sequence numbers {low}..{high}"
                doubts[f.file_path] = OrderDoubt(MERGED, why)
    return places


def _is_rewrite(snapshot: Any) -> bool:
    """Whether a snapshot may have rewritten data files (its summary says so, or has no
    counts to say otherwise)."""
    summary = snapshot.summary
    if summary is None:
        return False  # v1 tables may lack a summary: read as appends
    extra = summary.additional_properties
    if summary.operation.value == "append" or extra.get("replace-partitions") == "true":
        return False
    return bool(extra.get("deleted-data-files") != "0" and extra.get("added-data-files") != "0")


def _changes(
    table: Table, snapshot: Any, rank: dict[int, int] | None, confined: Callable[[str], None]
) -> tuple[list[tuple[DataFile, int]], list[DataFile]]:
    """The data files ``snapshot`` removed (each with its data sequence number, or in a v1
    table the rank of the snapshot that added it) and those it added."""
    from pyiceberg.manifest import DataFileContent, ManifestContent, ManifestEntryStatus

    io = table.io
    confined(snapshot.manifest_list)
    removed: list[Any] = []
    added: list[DataFile] = []
    for manifest in snapshot.manifests(io):
        if manifest.added_snapshot_id != snapshot.snapshot_id:
            continue  # an earlier snapshot's: none of this one's changes
        if manifest.content != ManifestContent.DATA:
            continue
        confined(manifest.manifest_path)
        for e in manifest.fetch_manifest_entry(io, discard_deleted=False):
            if e.snapshot_id != snapshot.snapshot_id:
                continue
            if e.data_file.content != DataFileContent.DATA:
                continue
            if e.status == ManifestEntryStatus.DELETED:
                removed.append(e)
            elif e.status == ManifestEntryStatus.ADDED:
                added.append(e.data_file)
    if rank is None:
        return [(e.data_file, e.sequence_number or 0) for e in removed], added
    paths = {e.data_file.file_path for e in removed}
    adders = _adders(table, snapshot.parent_snapshot_id, paths, confined)
    files = [(e.data_file, rank.get(adders.get(e.data_file.file_path, 0), 0)) for e in removed]
    return files, added


def _adders(
    table: Table, parent_id: int | None, paths: set[str], confined: Callable[[str], None]
) -> dict[str, int]:
    """v1: the snapshot that added each of ``paths``, from the live entries of ``parent_id``."""
    parent = None if parent_id is None else table.metadata.snapshot_by_id(parent_id)
    if parent is None or not paths:
        return {}
    confined(parent.manifest_list)
    found = {}
    for manifest in parent.manifests(table.io):
        confined(manifest.manifest_path)
        for e in manifest.fetch_manifest_entry(table.io, discard_deleted=True):
            if e.data_file.file_path in paths and e.snapshot_id is not None:
                found[e.data_file.file_path] = e.snapshot_id
    return found


def _field_types(table: Table) -> dict[int, Any]:
    """Every primitive field's type by id, over all the table's schemas (newest last)."""
    types: dict[int, Any] = {}
    for schema in sorted(table.metadata.schemas, key=lambda s: s.schema_id):
        for field_id in schema.field_ids:
            kind = schema.find_type(field_id)
            if kind.is_primitive:
                types[field_id] = kind
    return types


def _could_hold(source: DataFile, out: DataFile, types: dict[int, Any]) -> bool:
    """Whether ``out`` may hold rows of ``source`` only: the same partition (of the same
    spec), no more rows, and per column no more nulls and bounds inside the source's (where
    both have them)."""
    from pyiceberg.conversions import from_bytes

    if source.spec_id == out.spec_id and source.partition != out.partition:
        return False  # (a rewrite under a newer spec may split a file: bounds tell then)
    if out.record_count > source.record_count:
        return False
    nulls, out_nulls = source.null_value_counts or {}, out.null_value_counts or {}
    if any(n > nulls[i] for i, n in out_nulls.items() if i in nulls):
        return False
    for bounds, out_bounds, lower in (
        (source.lower_bounds, out.lower_bounds, True),
        (source.upper_bounds, out.upper_bounds, False),
    ):
        for field_id, value in (out_bounds or {}).items():
            theirs = (bounds or {}).get(field_id)
            if theirs is None or field_id not in types:
                continue
            try:
                mine = from_bytes(types[field_id], value)
                bound = from_bytes(types[field_id], theirs)
                if (mine < bound) if lower else (bound < mine):
                    return False
            except (TypeError, ValueError, ArithmeticError):
                continue  # a bound that cannot be compared says nothing
    return True
