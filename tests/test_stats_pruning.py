"""An incremental copy's pruning by footer statistics against a full read.

``watermarks.scan`` rules a file out when its statistics say that no row reaches ``since``
(``Lake.rule_out``: the job never opens it), and counts a file whose lowest value reaches
it without reading it. Either is only right when the statistics describe the values the
copy reads: here every case is checked against reading every file with no statistics and
filtering the records ``since <= column`` (the oracle).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from lakesync.errors import SourceError
from lakesync.lake import Lake
from lakesync.models import Watermark
from lakesync.watermarks import _PER_MS, from_millis, lake_filter, lake_kind, scan

_DAY_MS = 86_400_000


def copied(root: Path, since: Watermark) -> tuple[int, list[object]]:
    """What an incremental job counts and reads: ``scan`` (which rules files out), then
    the filtered read of the same lake (a SourceError is loud, and fine)."""
    lake = Lake.open(str(root))
    rows, _ = scan(lake, since.column, since)
    read = [
        v
        for batch in lake.batches(1_000, filter=lake_filter(lake, since, None))
        for v in batch.table.column(since.column).to_pylist()
    ]
    return rows, read


def truth(root: Path, since: Watermark) -> list[object]:
    """Every record read with no statistics, filtered as the job's filter says."""
    lake = Lake.open(str(root))
    table = pa.concat_tables(
        [b.table for b in lake.batches(1_000)], promote_options="permissive"
    ).combine_chunks()
    kept = table.filter(lake_filter(lake, since, None))
    return kept.column(since.column).to_pylist()


def test_a_partition_value_wins_over_the_files_own_column_of_that_name(tmp_path: Path) -> None:
    """A hive partition w=5 whose files also hold a column w (1, 2): the reader gives 5
    (the partition's value wins), so the footer's statistics of w say nothing of what is
    read; they ruled the file out of an incremental copy from w >= 5, and its records were
    never copied."""
    (tmp_path / "w=5").mkdir()
    pq.write_table(pa.table({"k": ["a", "b"], "w": [1, 2]}), tmp_path / "w=5" / "p-0.parquet")
    since = Watermark(column="w", kind="int", value=5)
    assert truth(tmp_path, since) == [5, 5]
    assert copied(tmp_path, since) == (2, [5, 5])


def test_a_nested_fields_statistics_are_not_a_top_level_column_of_the_same_path(
    tmp_path: Path,
) -> None:
    """A struct w with a field x and a column named "w.x": the footer names both "w.x";
    the struct's (1, 2) were taken for the column's (100, 200), which ruled it out."""
    table = pa.table({"w.x": pa.array([100, 200]), "w": pa.array([{"x": 1}, {"x": 2}])})
    pq.write_table(table, tmp_path / "p-0.parquet")
    since = Watermark(column="w.x", kind="int", value=150)
    assert truth(tmp_path, since) == [200]
    assert copied(tmp_path, since) == (1, [200])


@pytest.mark.parametrize(
    ("first", "second", "since"),
    [
        # dates in one file, their days as integers in the other: read as dates
        (pa.array([1000, 1001], pa.date32()), pa.array([1002, 1003], pa.int32()), 1001 * _DAY_MS),
        # integers, then microseconds as a timestamp: read as integers
        (pa.array([10, 20], pa.int64()), pa.array([10**15, 10**15], pa.timestamp("us")), 10**14),
    ],
    ids=["date-then-int", "int-then-timestamp"],
)
def test_a_files_statistics_of_another_type_than_the_lakes_are_not_used(
    tmp_path: Path, first: pa.Array, second: pa.Array, since: int
) -> None:
    """The same column as a date in one file and an integer in another: the second file's
    statistics are integers (days; or a timestamp's milliseconds) compared with the
    watermark of the lake's type (milliseconds; or integers): they ruled the file out
    silently, where reading it copies its records or fails loudly."""
    pq.write_table(pa.table({"k": ["a", "b"], "w": first}), tmp_path / "p-0.parquet")
    pq.write_table(pa.table({"k": ["c", "d"], "w": second}), tmp_path / "p-1.parquet")
    lake = Lake.open(str(tmp_path))
    kind = lake_kind(lake, "w")
    mark = (
        Watermark(column="w", kind="int", value=since)
        if kind == "int"
        else from_millis("w", since, kind=kind)
    )
    ruled = Lake.open(str(tmp_path))
    try:
        scan(ruled, "w", mark)
        rows, read = copied(tmp_path, mark)
    except SourceError as e:  # loud: the file's column cannot be compared with the lake's
        assert "p-1.parquet" in str(e)
        return
    assert 1 not in ruled._ruled_out  # its statistics are not the lake's values
    assert len(read) == rows and read == truth(tmp_path, mark)


_UNITS = ["s", "ms", "us", "ns"]


@hsettings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    kind=st.sampled_from(["int64", "int32", "date32", *(f"ts-{u}" for u in _UNITS)]),
    tz=st.sampled_from([None, "UTC"]),
    files=st.lists(
        st.lists(st.one_of(st.none(), st.integers(-3, 3)), max_size=5), min_size=1, max_size=4
    ),
    stats=st.lists(st.booleans(), min_size=4, max_size=4),
    base=st.sampled_from([-(2**40), -5_000, 0, 86_400 * 365 * 55]),
    pick=st.integers(0, 30),
    shift=st.sampled_from([-1, 0, 1]),
)
def test_property_statistics_prune_exactly_at_the_boundaries(
    tmp_path_factory: pytest.TempPathFactory,
    kind: str,
    tz: str | None,
    files: list[list[int | None]],
    stats: list[bool],
    base: int,
    pick: int,
    shift: int,
) -> None:
    """Files of integers, dates or timestamps of every unit (before and after 1970, with
    and without a time zone), with statistics or without, some of only nulls, and a
    watermark at a value of the lake (== since), just below or above it: what the job
    counts and reads is what a full read filters."""
    root = tmp_path_factory.mktemp("stats")
    shutil.rmtree(root)
    root.mkdir()
    if kind != "int64" and kind != "int32" and base == -(2**40):
        base = -86_400 * 365 * 100  # 1870
    if kind.startswith("ts-"):
        unit = kind[3:]
        arrow_type: pa.DataType = pa.timestamp(unit, tz=None if unit == "s" else tz)
        scale = {"s": 1, "ms": 1_000, "us": 1_000_000, "ns": 1_000_000_000}[unit]
        step = max(1, scale // 2000)  # sub-millisecond values where the unit has them
        values = [[None if v is None else base * scale + v * step for v in f] for f in files]
    elif kind == "date32":
        arrow_type, values = (
            pa.date32(),
            [[None if v is None else base // 86_400 + v for v in f] for f in files],
        )
    else:
        arrow_type = pa.int64() if kind == "int64" else pa.int32()
        lo = -(2**63) if kind == "int64" else -(2**31)
        edge = {-(2**40): lo + 3, -5_000: -5_000, 0: 0}.get(base, -lo - 4)
        values = [[None if v is None else edge + v for v in f] for f in files]
    for i, column in enumerate(values):
        table = pa.table(
            {"k": [str(j) for j in range(len(column))], "w": pa.array(column, arrow_type)}
        )
        pq.write_table(table, root / f"p-{i}.parquet", write_statistics=stats[i])
    present = sorted(v for f in values for v in f if v is not None)
    if not present:
        return
    at = present[pick % len(present)]
    if kind.startswith("ts-"):
        mul, div = _PER_MS[arrow_type.unit]
        mark = from_millis("w", at * mul // div + shift)
    elif kind == "date32":
        mark = from_millis("w", (at + shift) * _DAY_MS, kind="date")
    else:  # (a watermark past the column's type: a raw ArrowInvalid, left as it is)
        bits = 63 if kind == "int64" else 31
        inside = -(2**bits) <= at + shift < 2**bits
        mark = Watermark(column="w", kind="int", value=at + shift if inside else at)
    expected = truth(root, mark)
    rows, read = copied(root, mark)
    assert read == expected
    assert rows == len(expected)
