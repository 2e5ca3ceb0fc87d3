"""Realistic TaskDetail demo data: a hive-partitioned Parquet lake, deterministic per seed."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from lakesync.config import Settings
from lakesync.errors import RequestError, SourceError

logger = logging.getLogger(__name__)

TS = pa.timestamp("ms", tz="UTC")
#: Columns of every data file; ``projectId`` lives in the ``projectId=...`` directory name.
FILE_SCHEMA = pa.schema(
    [
        pa.field("taskDetailId", pa.string()),
        pa.field("taskId", pa.string(), nullable=False),
        pa.field("assignee", pa.string()),
        pa.field("status", pa.string(), nullable=False),
        pa.field("hoursLogged", pa.float64(), nullable=False),
        pa.field("estimateHours", pa.float64()),
        pa.field("startedAt", TS),
        pa.field("completedAt", TS),
        pa.field("updatedAt", TS),
        pa.field("tags", pa.list_(pa.string()), nullable=False),
        pa.field("notes", pa.string()),
    ]
)
STATUSES = ("todo", "in_progress", "blocked", "done")
_CHUNK = 100_000  # rows generated and written at a time: bounds memory, fixed for determinism
_BASE_MS = int(datetime(2024, 1, 1, tzinfo=UTC).timestamp() * 1000)
_DAY_MS = 86_400_000
# fmt: off
#: The rule each bad demo record breaks, in the order ``generate`` cycles through them.
BAD_KINDS = ("missing_key", "empty_key", "negative_hours", "unknown_status", "wrong_type",
             "null_updated_at")
_PEOPLE = pa.array(["ana.silva", "ben.okafor", "chen.wei", "dana.cohen", "eli.martin",
                    "fatima.zahra", "gus.larsen", "hana.sato", "ivan.petrov", "jo.kim",
                    "kofi.mensah", "lena.fischer", "mo.haddad", "nina.rossi", "omar.ali"])
_TAGS = pa.array(["backend", "frontend", "bug", "infra", "docs", "urgent", "review", "data",
                  "security", "ux", "tech-debt", "qa"])
_NOTES = pa.array(["Waiting on design sign-off.", "Blocked by upstream API change.",
                   "Pairing session scheduled.", "Needs a second review.",
                   "Estimate revised after spike.", "Customer escalation, prioritise.",
                   "Split into two subtasks.", "Deployed to staging."])
# fmt: on
_RULE_COLUMNS = ["taskDetailId", "hoursLogged", "status", "updatedAt", "estimateHours"]
_BAD_HOURS = ("three hours", "2h 30m", "n/a", "about 4", "TBD")


@dataclass(frozen=True)
class DemoSummary:
    """What ``generate`` wrote: total rows (bad ones included), bad rows, data files, where."""

    rows: int
    bad_rows: int
    files: int
    out: Path


def _ids(prefix: str, numbers: np.ndarray[Any, Any], width: int) -> pa.Array:
    digits = pc.utf8_lpad(pc.cast(pa.array(numbers), pa.string()), width=width, padding="0")
    return pc.binary_join_element_wise(prefix, digits, "")


def _records(
    rng: np.random.Generator,
    first_id: int,
    n: int,
    tasks: int,
    bad: dict[str, np.ndarray[Any, Any]] | None = None,
) -> pa.Table:
    """``n`` valid records with ids from ``first_id``; ``bad`` maps a kind to rows to break."""
    bad = bad or {}
    none = np.zeros(0, dtype=int)
    status = rng.choice(4, size=n, p=[0.3, 0.3, 0.1, 0.3])
    todo, done = status == 0, status == 3
    hours = np.where(todo, 0.0, np.round(rng.gamma(2.0, 4.0, n) * 4) / 4)
    started = _BASE_MS + rng.integers(0, 540 * _DAY_MS, n)
    completed = started + rng.integers(_DAY_MS // 24, 30 * _DAY_MS, n)
    updated = np.where(done, completed, started + rng.integers(0, 10 * _DAY_MS, n))
    updated += rng.integers(0, 3_600_000, n)  # after completedAt, when there is one
    counts = rng.integers(0, 4, n)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    owner = np.repeat(np.arange(n), counts)  # tag j of a row: distinct vocabulary entries
    tag_idx = rng.integers(0, len(_TAGS), n)[owner] + 5 * (np.arange(len(owner)) - offsets[owner])
    negative = bad.get("negative_hours", none)
    hours[negative] = -1.5 - hours[negative]
    status[bad.get("unknown_status", none)] = 4
    keys = _ids("TD-", np.arange(first_id, first_id + n), 8)
    for kind, value in (("missing_key", pa.scalar(None, pa.string())), ("empty_key", "")):
        if len(bad.get(kind, none)):
            mask = np.zeros(n, dtype=bool)
            mask[bad[kind]] = True
            keys = pc.if_else(pa.array(mask), value, keys)
    no_update = np.zeros(n, dtype=bool)
    no_update[bad.get("null_updated_at", none)] = True
    columns = [
        keys,
        _ids("TSK-", rng.integers(1, tasks + 1, n), 6),
        _PEOPLE.take(pa.array(rng.integers(0, len(_PEOPLE), n), mask=rng.random(n) < 0.1)),
        pa.array([*STATUSES, "archived"]).take(pa.array(status)),
        pa.array(hours),
        pa.array(np.round(rng.uniform(1, 40, n)), mask=rng.random(n) < 0.2),
        pa.array(started, type=TS, mask=todo),
        pa.array(completed, type=TS, mask=~done),
        pa.array(updated, type=TS, mask=no_update),
        pa.ListArray.from_arrays(pa.array(offsets), _TAGS.take(pa.array(tag_idx % len(_TAGS)))),
        _NOTES.take(pa.array(rng.integers(0, len(_NOTES), n), mask=rng.random(n) < 0.6)),
    ]
    return pa.Table.from_arrays(columns, schema=FILE_SCHEMA)


def generate(
    out: Path, rows: int, *, bad_rows: int = 0, seed: int = 0, files_per_partition: int = 1
) -> DemoSummary:
    """Write ``rows`` TaskDetail records (``bad_rows`` of them invalid) as a Parquet lake."""
    if rows < 1 or not 0 <= bad_rows <= rows or files_per_partition < 1:
        raise RequestError(
            f"Invalid demo data request: rows={rows} must be >= 1, bad_rows="
            f"{bad_rows} between 0 and rows, files_per_partition >= 1."
        )
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise SourceError(
            f"{out} already exists and is not an empty directory. Choose a new "
            "directory for the demo lake (or delete this one)."
        )
    rng = np.random.default_rng(seed)
    projects = [f"PRJ-{k:03d}" for k in range(1, int(rng.integers(15, 41)) + 1)]
    weights = 1 / np.arange(1, len(projects) + 1) ** 0.8  # a few big projects, a long tail
    kinds = [BAD_KINDS[k % len(BAD_KINDS)] for k in range(bad_rows)]
    wrong_type = kinds.count("wrong_type")
    inline = np.array([k for k in kinds if k != "wrong_type"], dtype=str)
    main = rows - wrong_type
    spots = np.sort(rng.choice(main, size=len(inline), replace=False))
    tasks = max(1, rows // 5)
    writers: dict[tuple[int, int], pq.ParquetWriter] = {}
    try:
        for first in range(0, main, _CHUNK):
            n = min(_CHUNK, main - first)
            lo, hi = np.searchsorted(spots, [first, first + n])
            local, here = spots[lo:hi] - first, inline[lo:hi]
            bad = {kind: local[here == kind] for kind in BAD_KINDS}
            table = _records(rng, first + 1, n, tasks, bad)
            project = rng.choice(len(projects), size=n, p=weights / weights.sum())
            group = project * files_per_partition + (
                np.arange(first, first + n) % files_per_partition
            )
            order = np.argsort(group, kind="stable")
            bounds = np.searchsorted(group[order], np.arange(group.max() + 2))
            table = table.take(pa.array(order))
            for g in np.flatnonzero(np.diff(bounds)):
                key = divmod(int(g), files_per_partition)
                if key not in writers:
                    path = out / f"projectId={projects[key[0]]}" / f"part-{key[1]}.parquet"
                    path.parent.mkdir(parents=True, exist_ok=True)
                    writers[key] = pq.ParquetWriter(path, FILE_SCHEMA)
                writers[key].write_table(table.slice(bounds[g], bounds[g + 1] - bounds[g]))
    finally:
        for writer in writers.values():
            writer.close()
    files = len(writers)
    if wrong_type:  # a file whose hoursLogged column is text: every row breaks the type rule
        table = _records(rng, main + 1, wrong_type, tasks)
        text = pa.array([_BAD_HOURS[i % len(_BAD_HOURS)] for i in range(wrong_type)])
        table = table.set_column(4, pa.field("hoursLogged", pa.string()), text)
        path = out / f"projectId={projects[0]}" / "part-bad.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, path)
        files += 1
    return DemoSummary(rows=rows, bad_rows=bad_rows, files=files, out=out)


def ensure_demo_lake(settings: Settings) -> Path:
    """Generate the demo lake under the data dir on first use; return its directory."""
    target = settings.demo_lake_dir
    if target.is_dir() and any(target.iterdir()):
        return target  # only ever created complete, by the rename below
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(f".{target.name}.tmp-*"):
        if time.time() - stale.stat().st_mtime > 3600:  # left behind by an interrupted run
            logger.info("Removing stale partial demo lake %s", stale)
            shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    bad = min(12, settings.demo_rows // 1000)
    logger.info(
        "Generating the demo lake (%d rows, %d invalid) in %s; this happens once",
        settings.demo_rows,
        bad,
        target,
    )
    started = time.monotonic()
    try:
        summary = generate(tmp, settings.demo_rows, bad_rows=bad, seed=0)
        if target.is_dir():
            target.rmdir()  # empty: a rename cannot replace it on every platform
        tmp.rename(target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if target.is_dir() and any(target.iterdir()):
            return target  # another process finished first
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info(
        "Demo lake ready: %d files in %s (%.1f s)",
        summary.files,
        target,
        time.monotonic() - started,
    )
    return target


def _data_files(lake_dir: Path) -> list[Path]:
    return sorted(
        p
        for p in Path(lake_dir).rglob("*.parquet")
        if not p.name.startswith((".", "_", "part-bad"))
    )


def _valid(table: pa.Table) -> pa.Array:
    """Which rows obey the TaskDetail rules (the demo's own check, mirroring the contract)."""
    if not pa.types.is_floating(table.schema.field("hoursLogged").type):
        return pa.array(np.zeros(table.num_rows, dtype=bool))
    key, hours, estimate = table["taskDetailId"], table["hoursLogged"], table["estimateHours"]
    ok = pc.and_(pc.not_equal(key, ""), pc.greater_equal(hours, 0))
    ok = pc.and_(ok, pc.is_in(table["status"], pa.array(STATUSES)))
    ok = pc.and_(ok, pc.is_valid(table["updatedAt"]))
    ok = pc.and_(ok, pc.greater_equal(pc.fill_null(estimate, 0.0), 0))
    return pc.fill_null(ok, False).combine_chunks()


def _replace(path: Path, table: pa.Table) -> None:
    tmp = path.with_name(f".{path.name}.tmp")  # hidden: a lake reader never lists it
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def _next_updated_at(files: list[Path]) -> int:
    """A timestamp (ms) later than every updatedAt in the lake, and not in the past."""
    latest = [pc.max(pq.ParquetFile(f).read(columns=["updatedAt"])["updatedAt"]) for f in files]
    seen = max((int(s.value) for s in latest if s.is_valid), default=0)
    return max(int(time.time() * 1000), seen + 1)


def touch_records(lake_dir: Path, n: int, *, seed: int = 1) -> list[str]:
    """Change ``notes`` and bump ``updatedAt`` of n valid records in place; return their keys."""
    files = _data_files(lake_dir)
    masks = [_valid(pq.ParquetFile(f).read(columns=_RULE_COLUMNS)) for f in files]
    counts = np.array([int(pc.sum(m).as_py() or 0) for m in masks])
    if n > counts.sum():
        raise RequestError(f"Cannot touch {n} records: {lake_dir} has {counts.sum()} valid ones.")
    picks = np.sort(np.random.default_rng(seed).choice(int(counts.sum()), n, replace=False))
    stamp = _next_updated_at(files)
    ends, keys = np.cumsum(counts), []
    for i, path in enumerate(files):
        mine = picks[(picks >= ends[i] - counts[i]) & (picks < ends[i])] - (ends[i] - counts[i])
        if not len(mine):
            continue
        table = pq.ParquetFile(path).read()
        hit = np.zeros(table.num_rows, dtype=bool)
        hit[np.flatnonzero(masks[i].to_numpy(zero_copy_only=False))[mine]] = True
        when = pa.scalar(stamp, type=TS)
        note = f"Revised after review at {when.as_py().isoformat()}."
        table = table.set_column(10, "notes", pc.if_else(pa.array(hit), note, table["notes"]))
        table = table.set_column(
            8, "updatedAt", pc.if_else(pa.array(hit), when, table["updatedAt"])
        )
        _replace(path, table)
        keys += table["taskDetailId"].filter(pa.array(hit)).to_pylist()
    logger.info("Touched %d records in %s", len(keys), lake_dir)
    return keys


def append_records(lake_dir: Path, n: int, *, start_id: int, seed: int = 2) -> list[str]:
    """Add n new valid records (ids from ``start_id``) in a new file; return their keys."""
    lake_dir = Path(lake_dir)
    rng = np.random.default_rng(seed)
    # The last partition, so the new file sorts after every existing one and the file
    # indexes of checkpoints taken before the append stay valid.
    partitions = sorted(p.name for p in lake_dir.glob("projectId=*") if p.is_dir())
    project = partitions[-1] if partitions else "projectId=PRJ-001"
    path = lake_dir / project / f"part-append-{start_id:08d}.parquet"
    if path.exists():
        raise RequestError(f"{path} already exists: choose another start_id.")
    table = _records(rng, start_id, n, max(1, n))
    stamp = pa.array(np.full(n, _next_updated_at(_data_files(lake_dir))), type=TS)
    table = table.set_column(8, "updatedAt", stamp)  # newer than any watermark already taken
    path.parent.mkdir(parents=True, exist_ok=True)
    _replace(path, table)
    logger.info("Appended %d records to %s", n, path)
    return list(table["taskDetailId"].to_pylist())
