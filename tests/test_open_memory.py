"""What an opened lake keeps per file (issue #27): its facts, not Arrow objects. Opening the
3,200 files of the 10M lake cost ~1.3 KB per file of glibc's heap in session 8 (Arrow
scalars of each file's statistics, a partition expression per file); measured here in the
bytes glibc and Python hold, not in time or RSS."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import tracemalloc
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lakesync.lake import Lake

FOLDERS, PER_FOLDER = 10, 100


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                     "uordblks", "fordblks", "keepcost")
    ]  # fmt: skip


def _malloc_in_use() -> int:
    """glibc's bytes in use, all arenas (Arrow's C++ objects; not Python's small objects)."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    libc.mallinfo2.restype = _MallInfo2
    info = libc.mallinfo2()
    return int(info.uordblks + info.hblkhd)


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


def test_an_opened_lake_keeps_under_a_kilobyte_or_so_per_file(tmp_path: Path) -> None:
    """1,000 files: measured 84 bytes per file of glibc's heap and 833 of Python's (the
    facts, the statistics as raw values, the path), where session 8's lake kept 1,216 and
    953 (an Arrow scalar for each minimum and maximum, a partition expression per file)."""
    try:
        _malloc_in_use()
    except (OSError, AttributeError):
        pytest.skip("glibc's mallinfo2 is not available here")
    lake = _lake(tmp_path / "lake")
    Lake.open(str(lake))  # the one-time costs: imports, pools, caches
    gc.collect()
    before = _malloc_in_use()
    opened = Lake.open(str(lake))
    gc.collect()
    in_c = _malloc_in_use() - before
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
    assert kept < 1_300, f"{kept:,.0f} bytes kept per file opened"
