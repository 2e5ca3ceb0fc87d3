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
from lakesync.sources.base import MERGED, MISSING, OrderDoubt, OrderKey, rewritten_place

logger = logging.getLogger(__name__)

_COMMIT = re.compile(r"(\d{20})\.json")
#: operations whose added files carry rows of the files they remove
_REWRITES = ("DELETE", "UPDATE", "MERGE", "OPTIMIZE", "REORG", "ZORDER", "COMPACT")
_READ_THREADS = 32  # commits fetched in parallel on S3
_UNKNOWN: OrderKey = (0, 0, "")  # a removed file whose add is not in the log any more


@dataclass
class _Commit:
    version: int
    operation: str = ""
    adds: list[tuple[str, bool]] = field(default_factory=list)  # logged path, dataChange
    removes: list[str] = field(default_factory=list)


def commit_order(
    location: Location,
    root: str,
    version: int,
    active: dict[str, int],
    path_of: Callable[[str], str],
) -> tuple[dict[str, OrderKey], dict[str, OrderDoubt]]:
    """The sort key of each active file (``active``: path -> modification time in ms) of
    version ``version`` of the table at ``root``, and the files whose place or row order
    the log cannot tell (see the module's doc); ``path_of`` turns a path as the log writes
    it into a filesystem path."""
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
    with ThreadPoolExecutor(max(threads, 1)) as pool:
        for commit in (pool.map if threads else map)(read, found):
            _apply(commit, keys, spans)
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
    missing = sum(1 for path in active if path not in keys)
    if missing:
        logger.info(
            "Delta table %s: %d active file(s) are older than the commits kept in its log; "
            "they are read first, by modification time",
            location.show(root),
            missing,
        )
    return order, doubts


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
    commit: _Commit, keys: dict[str, OrderKey], spans: dict[str, tuple[int, int] | None]
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
    for index, (path, _) in enumerate(commit.adds):
        if path not in keys:
            own = (commit.version, index)
            keys[path] = rewritten_place(removed, own) if rewrite and removed else (1, *own)
            spans[path] = span


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
        elif "remove" in action:
            commit.removes.append(path_of(action["remove"]["path"]))
        elif "commitInfo" in action:
            commit.operation = str(action["commitInfo"].get("operation") or "")
    return commit
