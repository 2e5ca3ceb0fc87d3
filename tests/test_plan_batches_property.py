"""The plan of repeated keys against a clean sequential oracle, whatever the batch sizes.

The plan's first pass reads keys in batches (``_PLAN_BATCH``), its second whole records
(``_EXACT_BATCH``); a batch is a piece of each file it spans, and a file may be split
across batches. How far the records reach in each file (``Extent``) cuts the stored plan
into shards (``_SHARD_ROWS``). None of these may change which records lose: the oracle
reads each file whole, in lake order, and the last valid record of each key wins.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from tests.helpers import T0, drawn_files, write_lake

from lakesync import repeats
from lakesync.lake import Lake
from lakesync.schema import TASK_DETAIL, validate


def oracle(lake: Path, filter: pc.Expression | None) -> dict[str, list[int]]:
    """Per file, the rows (numbered after ``filter``) a later valid record replaces."""
    last: dict[str, tuple[str, int]] = {}
    every: list[tuple[str, int]] = []
    for path in sorted(lake.glob("*.parquet")):
        table = pq.read_table(path)
        if filter is not None:
            table = table.filter(filter)
        checked = validate(TASK_DETAIL, table)
        for key, row in zip(checked.keys, checked.rows, strict=True):
            last[key] = (path.name, row)
            every.append((path.name, row))
    winners = set(last.values())
    out: dict[str, list[int]] = {}
    for name, row in every:
        if (name, row) not in winners:
            out.setdefault(name, []).append(row)
    return out


@hsettings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    files=drawn_files(10, 6, rows=(0, 23), files=(1, 7)),
    plan_batch=st.sampled_from([1, 2, 3, 5, 7, 10_000]),
    exact_batch=st.sampled_from([1, 2, 3, 5_000]),
    shard_rows=st.sampled_from([1, 2, 3, 1 << 18]),
    spill=st.booleans(),
    since=st.one_of(st.none(), st.integers(1, 6)),
)
def test_property_the_plan_equals_the_sequential_oracle_whatever_the_batches(
    tmp_path_factory: pytest.TempPathFactory,
    files: Any,
    plan_batch: int,
    exact_batch: int,
    shard_rows: int,
    spill: bool,
    since: int | None,
) -> None:
    root = tmp_path_factory.mktemp("plan")
    lake = write_lake(root / "lake", files)
    filter = None if since is None else pc.field("updatedAt") >= T0 + timedelta(seconds=since)
    expected = oracle(lake, filter)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(repeats, "_PLAN_BATCH", plan_batch)
        mp.setattr(repeats, "_EXACT_BATCH", exact_batch)
        mp.setattr(repeats, "_SHARD_ROWS", shard_rows)
        if spill:
            mp.setattr(repeats, "_PLAN_MEMORY", 64)
        columns = [] if filter is None else ["updatedAt"]
        held = repeats.plan_lake(
            Lake.open(str(lake)), TASK_DETAIL, filter, columns, spill=root / "spill"
        )
        found = {Path(f).name: r.tolist() for f, r in held.superseded.items()}
        assert found == expected
        assert held.refused == {}

        parts: dict[str, list[tuple[int, list[int]]]] = {}

        def store(file: str, part: int, rows: np.ndarray) -> None:
            assert rows.dtype == np.uint32 and rows.tolist() == sorted(rows.tolist())
            parts.setdefault(Path(file).name, []).append((part, rows.tolist()))

        repeats.plan_lake(
            Lake.open(str(lake)), TASK_DETAIL, filter, columns, spill=root / "spill", store=store
        )
    stored = {}
    for name, pieces in parts.items():
        numbers = [n for n, _ in pieces]
        assert len(set(numbers)) == len(numbers), f"{name}: a part number handed twice"
        stored[name] = sorted(r for _, rows in pieces for r in rows)
    assert stored == expected
