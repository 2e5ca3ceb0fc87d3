"""Where each row of a Delta rewrite's file came from: its place in the table's order.

A delta-rs DELETE or OPTIMIZE reads files added at several versions and writes the rows it
keeps into one new file, in its own order: the file's place in the table's order
(``deltalog``) cannot say which of two rows of one key in it is the newer. When the files it
removed are still on storage and the commits that added them still in the log
(``deltalog.Lineage``), each of its rows is found among the rows of those files by a hash
of the whole row (every data column and the file's partition values), and takes that row's
place: the place of the file that first wrote it (a plain write or append: its version and
its place in that commit), then the row's place in that file. Rewrites of rewrites
(OPTIMIZE after DELETE) compose: a removed file that a rewrite wrote passes on the places
of its own rows.

Rows that are equal in every column are interchangeable: each takes the newest place among
the equal rows the rewrite read. The one newest row of a key is then the same record
whichever of the equal rows it was. A row found in none of the removed files (a hash that
no row of them has: the files changed since, or a writer that changed rows) makes the whole
file unrecoverable: its doubt stays.

Memory: for each rewrite, 16 bytes per row of the files it removed (the row's hash and its
place, sorted; about 32 at the peak of gathering and sorting them), until the last file it
wrote that is needed is traced; and 8 bytes per row of every file traced (its rows'
places): a lake's files until the plan is done, a file a later rewrite removed until that
rewrite's sources are gathered. The rows are read in batches of _BATCH rows, the data
columns only.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lakesync.hashing import hash_rows, hash_strings
from lakesync.sources.base import MERGED, REBUILT, OrderDoubt, OrderKey
from lakesync.sources.deltalog import Lineage, Rewrite

logger = logging.getLogger(__name__)

_BATCH = 65_536
_ROW_BITS = 32  # a place: the origin's number << 32 | its row
_ROWS = (1 << _ROW_BITS) - 1


@dataclass
class RowOrder:
    """The order the plan of repeated keys gives a lake's rows when some of its files were
    rebuilt: ``ranks[i]`` is file i's rank in the table's order, and a row's order is its
    file's rank << 32 | its row; a rebuilt file's rows (``rows[i]``) take the rank of the
    file that first wrote each of them and their row there instead."""

    ranks: list[int]
    rows: dict[int, np.ndarray]

    def of(self, unit: int, file_rows: np.ndarray) -> np.ndarray:
        """The order of rows ``file_rows`` of file ``unit``."""
        rebuilt = self.rows.get(unit)
        if rebuilt is not None:
            return np.asarray(rebuilt[file_rows], dtype=np.int64)
        return (np.int64(self.ranks[unit]) << _ROW_BITS) + file_rows.astype(np.int64)


def row_order(
    fs: Any,
    lineage: Lineage,
    paths: list[str],
    places: list[OrderKey],
    doubts: list[OrderDoubt | None],
) -> tuple[RowOrder | None, list[OrderDoubt | None]]:
    """The order of the rows of a lake's files (``paths``, in the table's order, with their
    ``places`` and ``doubts``) for the plan of repeated keys, None when no file is
    ``REBUILT``; and the files' doubts after it: a rebuilt file's is gone, one whose rows
    could not be traced is ``MERGED`` again."""
    rebuilt = [i for i, d in enumerate(doubts) if d is not None and d.kind == REBUILT]
    if not rebuilt:
        return None, doubts
    finder = Rebuilt(fs, lineage, [paths[i] for i in rebuilt])
    found: dict[int, np.ndarray] = {}
    after = list(doubts)
    for i in rebuilt:
        rows = finder.places(paths[i])
        doubt = doubts[i]
        assert doubt is not None
        if rows is None:
            after[i] = OrderDoubt(MERGED, doubt.why.split(" (")[0])
        else:
            found[i] = rows
            after[i] = None
    used = sorted({int(n) for rows in found.values() for n in np.unique(rows >> _ROW_BITS)})
    keys = sorted({*places, *(finder.origin_place(n) for n in used)})
    rank = {key: r for r, key in enumerate(keys)}
    origin_rank = np.zeros(max(used, default=-1) + 1, dtype=np.int64)
    for n in used:
        origin_rank[n] = rank[finder.origin_place(n)]
    for i, rows in found.items():
        found[i] = (origin_rank[rows >> _ROW_BITS] << _ROW_BITS) | (rows & _ROWS)
    return RowOrder([rank[p] for p in places], found), after


class Unmatched(Exception):
    """A row of a rewrite's file that none of the rows it could come from has, or a file
    that cannot be read as the lineage says (gone, another schema)."""


class Rebuilt:
    """Finds the places of the rows of rewrites' files (``places``), sharing the work of
    one rewrite among the files it wrote and the rewrites after it."""

    def __init__(self, fs: Any, lineage: Lineage, targets: Iterable[str] = ()) -> None:
        self._fs, self._lineage = fs, lineage
        #: the files written with rows of their own, in the table's order: a place's number
        self.origins: list[str] = sorted(lineage.origins, key=lineage.origins.__getitem__)
        self._number = {path: n for n, path in enumerate(self.origins)}
        self._rows: dict[str, np.ndarray | None] = {}
        self._sources: dict[Rewrite, tuple[np.ndarray, np.ndarray] | None] = {}
        #: per rewrite, how many of its files (``targets`` and their ancestors) are still to
        #: be traced: its sources are dropped after the last one
        self._pending: Counter[Rewrite] = Counter()
        wanted = set(targets)
        for target in list(wanted):
            wanted |= lineage.ancestry(target) or set()
        self._pending.update(lineage.made[p] for p in wanted if p in lineage.made)

    def origin_place(self, number: int) -> OrderKey:
        """The table's order key of origin file ``number``."""
        return self._lineage.origins[self.origins[number]]

    def places(self, path: str) -> np.ndarray | None:
        """Each row's place (int64: the origin file's number << 32 | its row there) of the
        file ``path`` a rewrite wrote, in the file's own row order; None when a row of it
        cannot be found in the files it could come from (see the module's doc)."""
        if path not in self._rows:
            try:
                self._rows[path] = self._find(path)
            except Unmatched as e:
                logger.info("The rows of %s cannot be traced to the files it rewrote: %s", path, e)
                self._rows[path] = None
        return self._rows[path]

    def _find(self, path: str) -> np.ndarray:
        rewrite = self._lineage.made.get(path)
        if rewrite is None or not rewrite.copies:
            raise Unmatched("the log does not say which files it rewrote")
        if rewrite not in self._sources:
            try:
                self._sources[rewrite] = self._read_sources(rewrite)
            except Unmatched:
                self._sources[rewrite] = None
                raise
        sources = self._sources[rewrite]
        if sources is None:
            raise Unmatched(f"the files version {rewrite.version} rewrote cannot be read")
        hashes, places = sources
        out = []
        for rows in self._hashes(path):
            if not len(hashes):
                raise Unmatched(f"the files version {rewrite.version} rewrote hold no rows")
            at = np.minimum(np.searchsorted(hashes, rows), len(hashes) - 1)
            if not np.array_equal(hashes[at], rows):
                what = f"version {rewrite.version} rewrote"
                raise Unmatched(f"a row of it is in none of the files {what}")
            out.append(places[at])
        self._pending[rewrite] -= 1
        if self._pending[rewrite] <= 0:  # its last file traced: its sources are not needed
            self._sources.pop(rewrite, None)
        return np.concatenate(out) if out else np.empty(0, np.int64)

    def _read_sources(self, rewrite: Rewrite) -> tuple[np.ndarray, np.ndarray]:
        """The hashes of the rows of the files ``rewrite`` removed, sorted, each with the
        newest place among the rows of that hash."""
        hashes: list[np.ndarray] = []
        places: list[np.ndarray] = []
        live: dict[str, pa.BooleanArray] = {}
        if rewrite.vectors_at is not None:  # rows deleted before it read them: not sources
            if self._lineage.vectors_at is None:
                raise Unmatched("the deletion vectors of the files it rewrote are not known")
            try:
                live = self._lineage.vectors_at(rewrite.vectors_at)
            except Exception as e:  # deltalake's own errors: the version cannot be read
                raise Unmatched(f"version {rewrite.vectors_at} cannot be read ({e})") from e
        for source in rewrite.removes:
            inherited = None
            if source in self._lineage.made:  # itself a rewrite's file: its rows' places
                inherited = self.places(source)
                if inherited is None:
                    raise Unmatched(f"the rows of {source}, which it rewrote, cannot be traced")
            elif source not in self._number:
                raise Unmatched(f"the commit that added {source} is not in the log")
            done = 0
            kept = live.get(source)
            for rows in self._hashes(source):
                n = len(rows)
                if inherited is not None:
                    if done + n > len(inherited):
                        raise Unmatched(f"{source} holds other rows than when it was traced")
                    at = inherited[done : done + n]
                else:
                    first = self._number[source] << _ROW_BITS
                    at = np.arange(first + done, first + done + n, dtype=np.int64)
                if kept is not None:  # a deletion vector: its live rows (past its end: all)
                    mask = np.ones(n, dtype=bool)
                    seen = kept.slice(done, n).to_numpy(zero_copy_only=False)
                    mask[: len(seen)] = seen
                    rows, at = rows[mask], at[mask]
                hashes.append(rows)
                places.append(at)
                done += n
            if inherited is not None:  # removed once, so read by no other rewrite: dropped
                if done != len(inherited):
                    raise Unmatched(f"{source} holds other rows than when it was traced")
                self._rows.pop(source, None)
        every = np.concatenate(hashes) if hashes else np.empty(0, np.uint64)
        at = np.concatenate(places) if places else np.empty(0, np.int64)
        del hashes, places
        order = np.argsort(every)
        every = every[order]
        at = at[order]
        del order
        if not len(every):
            return every, at
        starts = np.flatnonzero(np.r_[True, every[1:] != every[:-1]])
        return every[starts], np.maximum.reduceat(at, starts)  # the newest of equal rows

    def _hashes(self, path: str) -> Iterator[np.ndarray]:
        """The hash of every row of the data file ``path`` (``hash_rows``: the data columns
        as the lineage names them, missing ones null, then its partition values), a batch
        at a time."""
        columns = self._lineage.columns
        values = self._lineage.partitions.get(path, "{}")
        seed = int(hash_strings(pa.array([values], pa.large_string()))[0])
        try:
            handle = self._fs.open_input_file(path)
        except (OSError, pa.ArrowException) as e:
            raise Unmatched(f"{path} cannot be read ({e})") from e
        with handle:
            try:
                parquet = pq.ParquetFile(handle)
                present = [n for n in columns.names if n in parquet.schema_arrow.names]
                if parquet.metadata.num_rows > _ROWS:
                    raise Unmatched(f"{path} holds more than {_ROWS:,} rows")
                for batch in parquet.iter_batches(_BATCH, columns=present, use_threads=False):
                    arrays = []
                    for field in columns:
                        if field.name not in present:
                            arrays.append(pa.nulls(batch.num_rows, field.type))
                            continue
                        col = batch.column(field.name)
                        arrays.append(col if col.type == field.type else col.cast(field.type))
                    yield hash_rows(arrays, seed)
            except (OSError, pa.ArrowException) as e:
                raise Unmatched(f"{path} cannot be read ({e})") from e
