"""The commit order of a Delta table's files, read from the commits in its ``_delta_log``.

A Delta table's rows are defined by its log, and "newest" means the later commit: the
order of a version's active files is the version that added each file, then the file's
place in that commit (the order of its ``add`` actions). delta-rs names files
``part-00000-<uuid>``, so their names say nothing about it.

- A file added again under the same path (a deletion vector written for it, a restore)
  keeps the place of its first add: its rows were written then.
- A file written by a rewrite (DELETE, UPDATE, MERGE, OPTIMIZE..., or adds that change no
  data) holds rows carried over from the files that commit removed: it takes the place of
  the newest of them (then its own version and place), so an old row it carries does not
  come after a newer row of the same key written in between (``base.rewritten_place``,
  the rule Iceberg's order follows too).
- A file whose commit JSON is gone (the log was cleaned up after a checkpoint) comes before
  every file known from a commit, ordered by its modification time, then its path.

Two things this order cannot tell, said per file (``base.OrderDoubt``): a rewrite that
removed files of several versions wrote their rows into its files in its own order (delta-rs
DELETE/UPDATE, OPTIMIZE), so two rows of one key inside such a file are not in commit order;
and the files whose commit is gone are placed among themselves by a guess.

The first can be undone while the table still holds what the rewrite read: a rewrite that
copies rows unchanged (DELETE, OPTIMIZE, ...; not UPDATE or MERGE, which change the rows they
rewrite) whose removed files are still on storage (not vacuumed) and were added by commits
still in the log, each in turn such a rewrite or a plain write. Such a file's doubt is
``REBUILT``: ``Lineage`` keeps what the log says of its ancestry (with the version the
rewrite read, whose deletion vectors say which rows of the removed files it saw), and
``deltarows`` finds the row each of its rows was copied from when the plan needs it.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.fs as pafs

from lakesync.errors import SourceError
from lakesync.locations import Location, read_error
from lakesync.sources.base import (
    MERGED,
    MISSING,
    REBUILT,
    OrderDoubt,
    OrderKey,
    rewritten_place,
)

logger = logging.getLogger(__name__)

_COMMIT = re.compile(r"(\d{20})\.json")
#: operations whose added files carry rows of the files they remove
_REWRITES = ("DELETE", "UPDATE", "MERGE", "OPTIMIZE", "REORG", "ZORDER", "COMPACT")
#: rewrites that copy the rows they keep unchanged (UPDATE and MERGE change some of them)
_COPIES = ("DELETE", "OPTIMIZE", "REORG", "ZORDER", "COMPACT")
_READ_THREADS = 32  # commits fetched in parallel on S3
_UNKNOWN: OrderKey = (0, 0, "")  # a removed file whose add is not in the log any more


@dataclass
class _Commit:
    version: int
    operation: str = ""
    adds: list[tuple[str, bool]] = field(default_factory=list)  # logged path, dataChange
    removes: list[str] = field(default_factory=list)
    #: path -> its partition values (JSON, keys sorted), from its add or remove action
    partitions: dict[str, str] = field(default_factory=dict)
    #: some removed file had a deletion vector (rows deleted before the rewrite read it)
    vectors: bool = False
    #: the version the commit read (its commitInfo's readVersion), None if not said
    read: int | None = None


@dataclass(frozen=True)
class Rewrite:
    """A commit that rewrote files: its version, the files it removed, whether it copied
    the rows it kept unchanged (which finding each row's source needs), and when some of
    those files had a deletion vector, the version it read them at (their live rows then:
    ``Lineage.vectors_at``)."""

    version: int
    removes: tuple[str, ...]
    copies: bool
    vectors_at: int | None = None


@dataclass
class Lineage:
    """What the log says of where each file's rows came from: the files added with rows of
    their own (a write, an append) and their places, the files a rewrite added and that
    rewrite, and every file's partition values (JSON). ``columns`` are the data columns as
    the Parquet files name them, and ``vectors_at(version)`` the live rows of each file
    with a deletion vector at that version (both set by ``delta.snapshot``)."""

    origins: dict[str, OrderKey] = field(default_factory=dict)
    made: dict[str, Rewrite] = field(default_factory=dict)
    partitions: dict[str, str] = field(default_factory=dict)
    columns: pa.Schema = field(default_factory=lambda: pa.schema([]))
    vectors_at: Callable[[int], dict[str, pa.BooleanArray]] | None = None

    def ancestry(self, path: str) -> set[str] | None:
        """The files the rows of ``path`` (a rewrite's file) were copied from, down to
        plain writes, rewrites in between included; None when the log cannot tell (a file
        whose commit is gone, a rewrite that changed rows)."""
        out: set[str] = set()
        todo = [path]
        while todo:
            rewrite = self.made.get(todo.pop())
            if rewrite is None or not rewrite.copies:
                return None
            for source in rewrite.removes:
                if source in out:
                    continue
                if source not in self.origins and source not in self.made:
                    return None
                out.add(source)
                if source in self.made:
                    todo.append(source)
        return out


def commit_order(
    location: Location,
    root: str,
    version: int,
    active: dict[str, int],
    path_of: Callable[[str], str],
) -> tuple[dict[str, OrderKey], dict[str, OrderDoubt], Lineage]:
    """The sort key of each active file (``active``: path -> modification time in ms) of
    version ``version`` of the table at ``root``, the files whose place or row order the
    log cannot tell (see the module's doc), and the files' lineage; ``path_of`` turns a
    path as the log writes it into a filesystem path."""
    log = f"{root.rstrip('/')}/_delta_log"
    try:
        listed = location.fs.get_file_info(pafs.FileSelector(log))
    except (OSError, pa.ArrowException) as e:
        raise read_error(e, location.show(log), "delta", location.endpoint, listing=True) from e
    found = sorted(
        (int(m.group(1)), item.path)
        for item in listed
        if (m := _COMMIT.fullmatch(item.base_name)) and int(m.group(1)) <= version
    )
    threads = min(_READ_THREADS, len(found)) if location.is_s3 else 0

    def read(item: tuple[int, str]) -> _Commit:
        return _read_commit(location, *item, path_of)

    keys: dict[str, OrderKey] = {}
    spans: dict[str, tuple[int, int] | None] = {}
    lineage = Lineage()
    with ThreadPoolExecutor(max(threads, 1)) as pool:
        for commit in (pool.map if threads else map)(read, found):
            _apply(commit, keys, spans, lineage)
    order, doubts = {}, {}
    for path, mtime in active.items():  # not in any commit left: before all of them
        order[path] = keys.get(path) or (0, mtime, path)
        if path not in keys:
            doubts[path] = OrderDoubt(MISSING, "history missing (its commit was cleaned up)")
        elif path in spans:
            span = spans[path]
            if span is None:
                why = "rewrite of several files whose history is missing"
                doubts[path] = OrderDoubt(MERGED, why)
            elif span[0] != span[1]:
                why = f"merged rewrite of versions {span[0]}..{span[1]}"
                doubts[path] = OrderDoubt(MERGED, why)
    _rebuildable(location, lineage, doubts)
    missing = sum(1 for path in active if path not in keys)
    if missing:
        logger.info(
            "Delta table %s: %d active file(s) are older than the commits kept in its log; "
            "they are read first, by modification time",
            location.show(root),
            missing,
        )
    return order, doubts, lineage


def _rebuildable(location: Location, lineage: Lineage, doubts: dict[str, OrderDoubt]) -> None:
    """Turn the doubt of each merged rewrite whose rows' sources the table still holds
    (``Lineage.ancestry``, every one of those files still on storage) into ``REBUILT``."""
    wanted: dict[str, set[str]] = {}
    for path, doubt in doubts.items():
        if doubt.kind == MERGED and doubt.why.startswith("merged rewrite of versions"):
            sources = lineage.ancestry(path)
            if sources is not None:
                wanted[path] = sources
    if not wanted:
        return
    needed = sorted(set().union(*wanted.values()))
    threads = min(_READ_THREADS, len(needed)) if location.is_s3 else 0
    try:
        if threads:  # one request each on S3: in parallel, as the commits are read
            with ThreadPoolExecutor(threads) as pool:
                infos = list(pool.map(location.fs.get_file_info, needed))
        else:
            infos = location.fs.get_file_info(needed)
    except (OSError, pa.ArrowException) as e:
        logger.info("Delta table: cannot look for the files rewrites removed (%s)", e)
        return
    there = {p for p, i in zip(needed, infos, strict=True) if i.type == pafs.FileType.File}
    for path, sources in wanted.items():
        if sources <= there:
            why = doubts[path].why + " (its rows' order is found from the files it rewrote)"
            doubts[path] = OrderDoubt(REBUILT, why)


def commit_time(location: Location, root: str, version: int) -> int | None:
    """When version ``version`` of the table at ``root`` was committed (ms since the epoch:
    its ``inCommitTimestamp``, else its commitInfo's ``timestamp``, else the commit file's
    modification time); None when its commit file is gone (the log was cleaned up)."""
    path = f"{root.rstrip('/')}/_delta_log/{version:020d}.json"
    try:
        info = location.fs.get_file_info(path)
        if info.type != pafs.FileType.File:
            return None
        with location.fs.open_input_stream(path) as f:
            data = f.read()
    except (OSError, pa.ArrowException) as e:
        raise read_error(e, location.show(path), "delta", location.endpoint) from e
    for line in data.splitlines():
        try:
            action = json.loads(line) if line.strip() else {}
        except ValueError:
            break  # a damaged commit: reading the version says so
        info_action = action.get("commitInfo") if isinstance(action, dict) else None
        if isinstance(info_action, dict):
            stamp = info_action.get("inCommitTimestamp", info_action.get("timestamp"))
            if isinstance(stamp, int):
                return stamp
    return None if info.mtime_ns is None else info.mtime_ns // 1_000_000


def _apply(
    commit: _Commit,
    keys: dict[str, OrderKey],
    spans: dict[str, tuple[int, int] | None],
    lineage: Lineage,
) -> None:
    """Give each file ``commit`` adds its place (see the module's rules), and the versions
    whose rows it may hold (``spans``: first..last; None: some of them are unknown). The log
    does not say which removed file went into which added one: each may hold any."""
    removed = [keys.get(p, _UNKNOWN) for p in commit.removes]
    rewrite = commit.operation.upper().startswith(_REWRITES) or (
        bool(commit.adds) and not any(change for _, change in commit.adds)
    )
    span: tuple[int, int] | None = (commit.version, commit.version)
    if rewrite and removed:
        sources = [spans.get(p) if p in keys else None for p in commit.removes]
        if len(sources) > 1 and any(s is None for s in sources):
            span = None
        else:
            known = [s for s in sources if s is not None]
            span = (min(s[0] for s in known), max(s[1] for s in known)) if known else span
    lineage.partitions.update(commit.partitions)
    made = None
    if rewrite and removed:
        copies = commit.operation.upper().startswith(_COPIES) or not any(
            change for _, change in commit.adds
        )
        read = None
        if commit.vectors:  # the deletion vectors it read: its read version's
            read = commit.read if commit.read is not None else commit.version - 1
        made = Rewrite(commit.version, tuple(commit.removes), copies, read)
    for index, (path, _) in enumerate(commit.adds):
        if path not in keys:
            own = (commit.version, index)
            keys[path] = rewritten_place(removed, own) if made is not None else (1, *own)
            spans[path] = span
            if made is not None:
                lineage.made[path] = made
            else:
                lineage.origins[path] = keys[path]


def _read_commit(
    location: Location, version: int, path: str, path_of: Callable[[str], str]
) -> _Commit:
    """The operation, adds and removes of one commit file (newline-delimited JSON)."""
    try:
        with location.fs.open_input_stream(path) as f:
            data = f.read()
    except (OSError, pa.ArrowException) as e:
        raise read_error(e, location.show(path), "delta", location.endpoint) from e
    commit = _Commit(version)
    for line in data.splitlines():
        if not line.strip():
            continue
        try:
            action = json.loads(line)
        except ValueError as e:
            raise SourceError(
                f"The Delta log commit {location.show(path)} is not valid JSON ({e}); the "
                "table's log is damaged. Repair the table or copy an earlier version.",
                file=location.show(path),
            ) from e
        if "add" in action:
            add = action["add"]
            commit.adds.append((path_of(add["path"]), bool(add.get("dataChange", True))))
            commit.partitions[commit.adds[-1][0]] = _partitions(add)
        elif "remove" in action:
            remove = action["remove"]
            commit.removes.append(path_of(remove["path"]))
            commit.partitions.setdefault(commit.removes[-1], _partitions(remove))
            commit.vectors |= bool(remove.get("deletionVector"))
        elif "commitInfo" in action:
            commit.operation = str(action["commitInfo"].get("operation") or "")
            read = action["commitInfo"].get("readVersion")
            commit.read = read if isinstance(read, int) else None
    return commit


def _partitions(action: dict[str, object]) -> str:
    """An add or remove action's partition values, as JSON with its keys sorted."""
    return json.dumps(action.get("partitionValues") or {}, sort_keys=True)
