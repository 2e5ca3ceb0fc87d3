"""Whole-row hashes (``lakesync.hashing``): what a Delta rewrite's rows are traced by."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import numpy as np
import pyarrow as pa

from lakesync.hashing import hash_rows

ROWS = pa.table(
    {
        "id": pa.array([1, 2, None, 1, 3], pa.int64()),
        "name": ["a", "b", None, "a", ""],
        "tags": [["x"], [], None, ["x"], [""]],
        "score": [1.5, 2.0, None, 1.5, -0.0],
        "at": pa.array([datetime(2026, 1, 1, tzinfo=UTC)] * 5, pa.timestamp("us", tz="UTC")),
        "point": [{"x": 1}, {"x": 2}, None, {"x": 1}, {"x": None}],
        "attrs": pa.array(
            [[("k", 1)], [], None, [("k", 1)], [("k", None)]], pa.map_(pa.string(), pa.int64())
        ),
        "amount": pa.array(
            [Decimal("1.10"), None, Decimal("0"), Decimal("1.10"), None], pa.decimal128(6, 2)
        ),
        "flag": [True, False, None, True, False],
        "blob": [b"\x00", b"", None, b"\x00", b"\x01"],
    }
)


def hashes(table: pa.Table, seed: int = 0) -> list[int]:
    return hash_rows([c.combine_chunks() for c in table.columns], seed).tolist()


def test_equal_rows_hash_alike_and_different_rows_apart() -> None:
    """Rows 0 and 3 are equal in every column (lists, structs, maps, decimals...): one
    hash; every other row has its own, nulls and empty values told apart."""
    h = hashes(ROWS)
    assert h[0] == h[3]
    assert len(set(h)) == 4


def test_a_row_hashes_alike_in_any_batch() -> None:
    """A row's hash does not depend on where its batch starts or how it is chunked (a
    rewrite's file is read in other batches than the files it came from)."""
    whole = hashes(ROWS)
    for start in range(1, 5):
        assert hashes(ROWS.slice(start)) == whole[start:]
    chunked = pa.concat_tables([ROWS.slice(0, 2), ROWS.slice(2)])
    assert hash_rows(list(chunked.columns)).tolist() == whole


def test_the_seed_and_each_column_count() -> None:
    """Two files' rows equal in their data but in other partitions (the seed), and a value
    moved to another column, hash apart."""
    assert hashes(ROWS, seed=1) != hashes(ROWS, seed=2)
    two = pa.table({"a": ["x", "y"], "b": ["y", "x"]})
    assert len(set(hashes(two))) == 2


def test_many_distinct_rows_do_not_collide() -> None:
    rng = np.random.default_rng(3)
    n = 200_000
    table = pa.table(
        {
            "k": pa.array(np.arange(n) % 1000, pa.int64()),
            "v": pa.array(np.arange(n) // 1000, pa.int64()),
            "s": pa.array([f"s{i % 7}" for i in range(n)]),
            "f": pa.array(rng.random(n)),
        }
    )
    assert len(set(hashes(table))) == n
