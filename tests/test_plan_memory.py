"""The plan of repeated keys holds a bounded part of the superseded positions at once
(issue #27): it stores them as it finds them, and a copy reads a file's rows when it reaches
the file. Measured with tracemalloc (numpy's arrays are traced), not with time."""

from __future__ import annotations

import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lakesync import boundary, repeats
from lakesync.lake import Lake
from lakesync.schema import RecordSchema

FILES = 60
ROWS = 5_000  # per file: 300,000 records, ~27% of them superseded (80,289)


def _lake(folder: Path) -> Path:
    """FILES files whose records take, 40% of them, the key of a random record of the next
    file (the last file's: of the first), as bench/scale.py's lake of repeats."""
    rng = np.random.default_rng(3)
    folder.mkdir()
    keys = [np.array([f"K{f * ROWS + i:07d}" for i in range(ROWS)]) for f in range(FILES)]
    for f in range(FILES):
        mine = keys[f].copy()
        pick = np.flatnonzero(rng.random(ROWS) < 0.4)
        mine[pick] = keys[(f + 1) % FILES][rng.integers(0, ROWS, len(pick))]
        table = pa.table({"k": pa.array(mine.tolist(), pa.string()), "v": np.arange(ROWS)})
        pq.write_table(table, folder / f"part-{f:03d}.parquet")
    return folder


@pytest.fixture
def small_budgets(monkeypatch: pytest.MonkeyPatch) -> None:
    """Budgets small enough that the keys spill and the positions would dominate the heap:
    keys logged 64 KB at a time, batches of a few thousand records."""
    monkeypatch.setattr(repeats, "_PLAN_MEMORY", 64 << 10)
    monkeypatch.setattr(repeats, "_PLAN_BATCH", 5_000)
    monkeypatch.setattr(repeats, "_EXACT_BATCH", 2_000)
    monkeypatch.setattr(repeats, "_SHARD_ROWS", 8_192)
    monkeypatch.setattr(boundary, "_INSERT_BYTES", 64 << 10)
    monkeypatch.setattr(repeats, "_FETCH_ROWS", 4_096)


def test_the_plan_stores_superseded_positions_without_holding_them_all(
    db: Any, tmp_path: Path, small_budgets: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """80,289 superseded records: all of them at once would be 321 KB in their final
    form (4 bytes each) and 963 KB while assembled (12 bytes each: the plan of session 8,
    which peaked 1,301 KB here). Stored as they are found, from the end of the plan's last
    pass over the lake its traced heap may not grow by the final form's size; the rows
    stored are exactly ``plan_lake``'s, and a copy that reads them file by file holds a
    few files' rows at once."""
    lake = _lake(tmp_path / "lake")
    schema = RecordSchema(key="k")
    expected = repeats.plan_lake(Lake.open(str(lake)), schema).superseded
    superseded = sum(len(r) for r in expected.values())
    assert superseded > 75_000 and len(expected) == FILES

    opened = Lake.open(str(lake))
    log_keys = repeats._log_keys
    logged: list[int] = []

    def log_and_mark(*args: Any, **kwargs: Any) -> dict[str, int]:
        """A pass's logging of keys (its batches: Python objects by the thousand), left
        out: from its end, what the plan holds is its buckets and its positions."""
        files = log_keys(*args, **kwargs)
        logged.append(tracemalloc.get_traced_memory()[0])
        tracemalloc.reset_peak()
        return files

    monkeypatch.setattr(repeats, "_log_keys", log_and_mark)
    tracemalloc.start()
    try:
        count = boundary.plan_job(db, "job_m", opened, schema, spill=tmp_path / "spill")
        peak = tracemalloc.get_traced_memory()[1] - logged[-1]
        # measured 189 KB with these budgets; the plan of session 8: 1,301 KB
        assert peak < superseded * 4, f"the plan's heap peaked {peak:,} bytes past its logging"
        assert count == superseded

        before = tracemalloc.get_traced_memory()[0]
        windows: list[list[str]] = []

        def fetch(files: list[str]) -> dict[str, np.ndarray]:
            windows.append(files)
            return boundary.load_superseded_rows(db, "job_m", files)

        plan = boundary.load_superseded(db, "job_m", fetch=fetch)
        loaded = tracemalloc.get_traced_memory()[0] - before
        # the copy's view of the plan: the files' names (measured 11 KB), then a window of
        # files' rows at once, read in one query (4,096 rows at most here, or one file's)
        assert loaded < 64_000, f"{loaded:,} bytes held after loading the plan"
        found: dict[str, np.ndarray] = {}
        most = 0
        for file in opened.files:
            rows = plan.within(file, 0, 2**32)
            if len(rows):
                found[file] = rows
            most = max(most, plan.held)
        kept = tracemalloc.get_traced_memory()[0] - before - sum(r.nbytes for r in found.values())
    finally:
        tracemalloc.stop()
    assert most <= 4_096 + ROWS
    assert len(windows) < FILES // 2, f"{len(windows)} queries for {FILES} files"
    assert sorted(f for w in windows for f in w) == sorted(opened.files)  # each read once
    assert kept < 128_000, f"{kept:,} bytes held after reading every file's rows"
    assert found.keys() == expected.keys()
    for file, rows in expected.items():
        assert found[file].tolist() == rows.tolist(), file


def test_the_key_log_keeps_a_few_bytes_per_file_of_how_far_its_records_reach() -> None:
    """The plan logs every file of the lake (20,000 small files: 20,000 entries, in each of
    its two passes): how far the records logged reach in each file costs at most ~32 bytes
    per file (two int64 arrays grown by doubling), where a dict of tuples of Python integers
    took ~110; and it says exactly what was logged."""
    files, rows = 20_000, 20
    log = repeats._KeyLog(None, budget=1 << 40)  # nothing spills
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for first in range(0, files, 1_000):
            numbers = np.repeat(np.arange(first, first + 1_000, dtype=np.int64), rows)
            p = (numbers << 32) | np.tile(np.arange(rows, dtype=np.int64), 1_000)
            log.add(p.astype(np.uint64), pa.array([b"k"] * len(p), pa.large_binary()), p)
            del numbers, p
        log._held = []  # the keys and positions logged (spilled to disk past the budget)
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    per_file = held / files
    print(f"{per_file:.0f} bytes per file")
    assert per_file < 48, f"{per_file:.0f} bytes per file"
    assert log.extent[0] == (rows, rows) and log.extent[files - 1] == (rows, rows)
    assert log.extent[files] == (0, 0)
    bounds = repeats._shard_bounds(log.extent, 50 * rows)
    assert bounds.tolist() == [f << 32 for f in range(0, files + 1, 50)]


def test_the_first_pass_over_many_small_files_holds_a_few_thousand_records_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """2,000 files of 20 unique keys (a lake as Spark writes them): the plan's first pass
    reads and validates their keys a batch at a time, each batch a piece of every file it
    spans, with one batch queued behind it and the next one being assembled. Batches of
    50,000 records (2,500 such files each) held all 40,000 here at once: measured 6.6 MB
    of Python's heap at the pass's peak, against 4.0 MB in batches of 10,000 (and ~10 MB
    less of a 20,000-file copy's peak RSS, issue #27)."""
    folder = tmp_path / "lake"
    folder.mkdir()
    for f in range(2_000):
        keys = [f"TD-{f:05d}-{i:02d}" for i in range(20)]
        pq.write_table(pa.table({"k": keys, "v": np.arange(20)}), folder / f"p-{f:05d}.parquet")
    schema = RecordSchema(key="k")
    repeats.plan_lake(Lake.open(str(folder), keep=["k"]), schema)  # one-time costs
    lake = Lake.open(str(folder), keep=["k"])  # the key columns kept at open, as a job's
    log_keys, peaks = repeats._log_keys, []

    def first_pass(*args: Any, **kwargs: Any) -> dict[str, int]:
        tracemalloc.reset_peak()
        before = tracemalloc.get_traced_memory()[0]
        files = log_keys(*args, **kwargs)
        peaks.append(tracemalloc.get_traced_memory()[1] - before)
        return files

    monkeypatch.setattr(repeats, "_log_keys", first_pass)
    tracemalloc.start()
    try:
        plan = repeats.plan_lake(lake, schema)
    finally:
        tracemalloc.stop()
    assert plan.superseded == {} and plan.refused == {} and len(peaks) == 1
    print(f"{peaks[0] / 2**20:.2f} MB traced at the first pass's peak")
    assert peaks[0] < 5 << 20, f"{peaks[0] / 2**20:.2f} MB"
