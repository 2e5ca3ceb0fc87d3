"""What an opened lake keeps per file (issue #27): its facts, not Arrow objects. Opening the
3,200 files of the 10M lake cost ~1.3 KB per file of glibc's heap in session 8 (Arrow
scalars of each file's statistics, a partition expression per file); measured here in the
bytes glibc and Python hold, not in time or RSS."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tests.mallinfo import malloc_in_use

from lakesync.lake import Lake

FOLDERS, PER_FOLDER = 10, 100


def _lake(folder: Path) -> Path:
    """FOLDERS hive folders of PER_FOLDER files: a key, an integer and a timestamp column
    (the two have footer statistics, as the TaskDetail lake's do)."""
    for p in range(FOLDERS):
        part = folder / f"projectId=P{p:02d}"
        part.mkdir(parents=True)
        for f in range(PER_FOLDER):
            n = p * PER_FOLDER + f
            table = pa.table({
                "k": [f"K{n}-{i}" for i in range(5)],
                "n": np.arange(5) + n,
                "t": pa.array(np.arange(5) + n * 1000, pa.timestamp("us")),
            })  # fmt: skip
            pq.write_table(table, part / f"part-{f:04d}.parquet")
    return folder


def test_an_opened_lake_keeps_well_under_a_kilobyte_per_file(tmp_path: Path) -> None:
    """1,000 files: measured 80 bytes per file of glibc's heap and 524 of Python's (the
    facts, the statistics packed, the path), where the statistics as dicts of tuples of
    Python integers kept 74 + 833 (the largest part of a 20,000-file copy's growth, issue
    #27) and session 8's lake 1,216 + 953 (an Arrow scalar for each minimum and maximum, a
    partition expression per file)."""
    try:
        malloc_in_use()
    except (OSError, AttributeError):
        pytest.skip("glibc's mallinfo2 is not available here")
    lake = _lake(tmp_path / "lake")
    Lake.open(str(lake))  # the one-time costs: imports, pools, caches
    gc.collect()
    before = malloc_in_use()
    opened = Lake.open(str(lake))
    gc.collect()
    in_c = malloc_in_use() - before
    del opened
    gc.collect()
    tracemalloc.start()  # apart: its own records are malloc'd
    try:
        before = tracemalloc.get_traced_memory()[0]
        opened = Lake.open(str(lake))
        gc.collect()
        in_python = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    files = FOLDERS * PER_FOLDER
    assert len(opened.files) == files
    assert opened.file_stats(0, "n") is not None  # the statistics are still there
    low, high, nulls = opened.file_stats(0, "n")[0]
    assert (low.as_py(), high.as_py(), nulls) == (0, 4, 0)
    print(f"{in_c / files:,.0f} + {in_python / files:,.0f} bytes per file")
    kept = (in_c + in_python) / files
    assert kept < 750, f"{kept:,.0f} bytes kept per file opened"


def test_packed_statistics_give_the_footers_values(tmp_path: Path) -> None:
    """Each file's statistics, packed at open, are what its footer says: integers at both
    ends of int64, dates, timestamps of every unit, a column of nulls only (min and max
    unknown), and no statistics for a column whose footer has none or a type lakesync does
    not prune on."""
    big, small = 2**63 - 1, -(2**63)
    table = pa.table({
        "i": pa.array([small, 0, big], pa.int64()),
        "i32": pa.array([-5, None, 7], pa.int32()),
        "d": pa.array([3, 1, 2], pa.date32()),
        "ts": pa.array([10, None, 30], pa.timestamp("us")),
        "tn": pa.array([1, 2, 3], pa.timestamp("ns")),
        "none": pa.array([None, None, None], pa.int64()),
        "s": ["a", "b", "c"],
        "f": [0.5, 1.5, 2.5],
    })  # fmt: skip
    folder = tmp_path / "lake"
    folder.mkdir()
    pq.write_table(table, folder / "a.parquet")
    pq.write_table(table.slice(0, 1), folder / "b.parquet", write_statistics=["s"])
    lake = Lake.open(str(folder))

    def stats(index: int, column: str) -> tuple[object, object, int] | None:
        found = lake.file_stats(index, column)
        if found is None:
            return None
        (low, high, nulls), rows = found
        assert rows == (3 if index == 0 else 1)
        kind = table.schema.field(column).type
        kind = pa.int64() if pa.types.is_integer(kind) else kind  # raw integers as int64

        def value(scalar: pa.Scalar | None) -> object:
            if scalar is None:
                return None
            assert scalar.type == kind
            return scalar.value if pa.types.is_timestamp(kind) else scalar.as_py()

        return (value(low), value(high), nulls)

    assert stats(0, "i") == (small, big, 0)
    assert stats(0, "i32") == (-5, 7, 1)
    assert stats(0, "d") == (*pa.array([1, 3], pa.date32()).to_pylist(), 0)
    assert stats(0, "ts") == (10, 30, 1)
    assert stats(0, "tn") == (1, 3, 0)
    assert stats(0, "none") == (None, None, 3)
    assert stats(0, "s") is None and stats(0, "f") is None and stats(0, "nope") is None
    assert stats(1, "i") is None  # written without statistics: read to be known


@pytest.mark.parametrize("pyarrow_first", [False, True])
def test_arrow_allocates_from_the_system_pool_whoever_imported_pyarrow_first(
    pyarrow_first: bool,
) -> None:
    """lakesync chose the system allocator by setting ARROW_DEFAULT_MEMORY_POOL, which
    pyarrow reads when it is imported: a program (a benchmark, a worker, a notebook) that
    imported pyarrow first kept mimalloc, whose freed pages stay resident (docs/performance.md,
    "Memory at lake scale"). A pool the environment names is kept."""
    imports = "import pyarrow, lakesync" if pyarrow_first else "import lakesync, pyarrow"
    code = f"{imports}; print(pyarrow.default_memory_pool().backend_name)"
    env = {k: v for k, v in os.environ.items() if k != "ARROW_DEFAULT_MEMORY_POOL"}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert run.stdout.strip() == "system", run.stderr
    named = {**env, "ARROW_DEFAULT_MEMORY_POOL": "jemalloc"}
    run = subprocess.run([sys.executable, "-c", code], env=named, capture_output=True, text=True)
    assert run.stdout.strip() in ("jemalloc", "mimalloc", "system"), run.stderr  # if built in
    assert run.stdout.strip() == subprocess.run(
        [sys.executable, "-c", "import pyarrow; print(pyarrow.default_memory_pool().backend_name)"],
        env=named, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
