"""The demo data generator: deterministic, the contract's schema, exact bad-row counts."""

from __future__ import annotations

import os
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lakesync import demo
from lakesync.config import Settings
from lakesync.demo import append_records, ensure_demo_lake, generate, touch_records
from lakesync.errors import RequestError, SourceError
from lakesync.lake import Lake

TS = pa.timestamp("ms", tz="UTC")


def records(lake_dir: Path) -> list[dict[str, Any]]:
    lake = Lake.open(str(lake_dir))
    return [r for b in lake.batches(5000) for r in b.table.to_pylist()]


def problem(r: dict[str, Any]) -> str | None:
    """The one contract rule a record breaks (an independent re-statement of the rules)."""
    if r["taskDetailId"] is None:
        return "missing_key"
    if r["taskDetailId"] == "":
        return "empty_key"
    if not isinstance(r["hoursLogged"], float):
        return "wrong_type"
    if r["hoursLogged"] < 0:
        return "negative_hours"
    if r["status"] not in {"todo", "in_progress", "blocked", "done"}:
        return "unknown_status"
    if r["updatedAt"] is None:
        return "null_updated_at"
    return None


def files_of(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_same_seed_gives_identical_bytes(tmp_path: Path) -> None:
    a = generate(tmp_path / "a", 2500, bad_rows=7, seed=42, files_per_partition=2)
    b = generate(tmp_path / "b", 2500, bad_rows=7, seed=42, files_per_partition=2)
    generate(tmp_path / "c", 2500, bad_rows=7, seed=43, files_per_partition=2)
    assert files_of(tmp_path / "a") == files_of(tmp_path / "b") != files_of(tmp_path / "c")
    assert (a.rows, a.bad_rows, a.files, b.out) == (2500, 7, len(files_of(tmp_path / "a")), b.out)


def test_counts_partitions_and_schema(tmp_path: Path) -> None:
    summary = generate(tmp_path / "lake", 4000, seed=5, files_per_partition=3)
    partitions = sorted(p.name for p in (tmp_path / "lake").iterdir())
    assert 15 <= len(partitions) <= 40 and all(p.startswith("projectId=PRJ-") for p in partitions)
    parts = [p for p in (tmp_path / "lake").rglob("*.parquet")]
    assert len(parts) == summary.files and all(
        p.name in {"part-0.parquet", "part-1.parquet", "part-2.parquet"} for p in parts
    )
    schema = pq.read_schema(parts[0])
    expected = {
        "taskDetailId": pa.string(),
        "taskId": pa.string(),
        "assignee": pa.string(),
        "status": pa.string(),
        "hoursLogged": pa.float64(),
        "estimateHours": pa.float64(),
        "startedAt": TS,
        "completedAt": TS,
        "updatedAt": TS,
        "tags": pa.list_(pa.string()),
        "notes": pa.string(),
    }
    assert {f.name: f.type for f in schema} == expected
    rows = records(tmp_path / "lake")
    assert len(rows) == 4000 and len({r["taskDetailId"] for r in rows}) == 4000
    assert {r["status"] for r in rows} == {"todo", "in_progress", "blocked", "done"}
    assert all(problem(r) is None for r in rows)
    assert all((r["completedAt"] is not None) == (r["status"] == "done") for r in rows)
    assert all(r["estimateHours"] is None or r["estimateHours"] >= 0 for r in rows)
    assert all(len(set(r["tags"])) == len(r["tags"]) <= 3 for r in rows)
    assert any(r["tags"] == [] for r in rows) and any(r["assignee"] is None for r in rows)
    assert any(r["notes"] for r in rows) and any(r["notes"] is None for r in rows)


@pytest.mark.parametrize("bad", [1, 6, 13])
def test_bad_rows_break_exactly_one_rule_each(tmp_path: Path, bad: int) -> None:
    summary = generate(tmp_path / "lake", 1500, bad_rows=bad, seed=9)
    rows = records(tmp_path / "lake")
    kinds = Counter(problem(r) for r in rows)
    assert len(rows) == summary.rows == 1500 and kinds[None] == 1500 - bad
    cycle = Counter(demo.BAD_KINDS[k % 6] for k in range(bad))
    assert {k: v for k, v in kinds.items() if k} == cycle
    wrong = list((tmp_path / "lake").rglob("part-bad.parquet"))
    assert len(wrong) == (1 if cycle["wrong_type"] else 0)
    if wrong:
        assert pq.read_schema(wrong[0]).field("hoursLogged").type == pa.string()


def test_rejects_bad_arguments_and_used_directories(tmp_path: Path) -> None:
    with pytest.raises(RequestError):
        generate(tmp_path / "x", 0)
    with pytest.raises(RequestError):
        generate(tmp_path / "x", 5, bad_rows=6)
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "keep.txt").write_text("mine")
    with pytest.raises(SourceError, match="not an empty directory"):
        generate(tmp_path / "used", 5)


def test_ensure_demo_lake_generates_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = Settings(data_dir=tmp_path / "data", demo_rows=2000)
    stale = tmp_path / "data" / ".demo-lake.tmp-old"
    stale.mkdir(parents=True)
    (stale / "half.parquet").write_text("")
    old = datetime(2020, 1, 1).timestamp()
    os.utime(stale, (old, old))
    lake_dir = ensure_demo_lake(settings)
    assert lake_dir == settings.demo_lake_dir and Lake.open(str(lake_dir)).count_rows() == 2000
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["demo-lake"]

    def boom(*args: object, **kwargs: object) -> None:
        raise AssertionError("must not regenerate")

    monkeypatch.setattr(demo, "generate", boom)
    assert ensure_demo_lake(settings) == lake_dir


def test_interrupted_generation_leaves_no_lake(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = Settings(data_dir=tmp_path, demo_rows=100)

    def interrupted(out: Path, *args: object, **kwargs: object) -> None:
        (out / "projectId=PRJ-001").mkdir()
        (out / "projectId=PRJ-001" / "part-0.parquet").write_text("half")
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "generate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ensure_demo_lake(settings)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    assert Lake.open(str(ensure_demo_lake(settings))).count_rows() == 100


def test_touch_records(tmp_path: Path) -> None:
    generate(tmp_path / "lake", 3000, bad_rows=12, seed=3, files_per_partition=2)
    before = {r["taskDetailId"]: r for r in records(tmp_path / "lake")}
    newest = max(r["updatedAt"] for r in before.values() if r["updatedAt"])
    touched = touch_records(tmp_path / "lake", 40, seed=4)
    assert len(set(touched)) == 40
    after = {r["taskDetailId"]: r for r in records(tmp_path / "lake")}
    assert len(after) == len(before) and not list((tmp_path / "lake").rglob(".*"))
    for key, row in after.items():
        if key in touched:
            assert problem(before[key]) is None and row["updatedAt"] > newest
            assert row["notes"] != before[key]["notes"]
            assert {**row, "notes": 0, "updatedAt": 0} == {
                **before[key],
                "notes": 0,
                "updatedAt": 0,
            }
        else:
            assert row == before[key]
    again = touch_records(tmp_path / "lake", 40, seed=4)
    assert again == touched  # same seed, same records
    assert min(r["updatedAt"] for k, r in records_by_key(tmp_path).items() if k in again) > max(
        after[k]["updatedAt"] for k in touched
    )


def records_by_key(tmp_path: Path) -> dict[str, dict[str, Any]]:
    return {r["taskDetailId"]: r for r in records(tmp_path / "lake")}


def test_append_records(tmp_path: Path) -> None:
    generate(tmp_path / "lake", 1000, seed=3)
    newest = max(r["updatedAt"] for r in records(tmp_path / "lake"))
    added = append_records(tmp_path / "lake", 25, start_id=5001, seed=1)
    assert added == [f"TD-{i:08d}" for i in range(5001, 5026)]
    rows = records_by_key(tmp_path)
    assert len(rows) == 1025
    assert all(problem(rows[k]) is None and rows[k]["updatedAt"] > newest for k in added)
    assert len({rows[k]["projectId"] for k in added}) == 1
    files = Lake.open(str(tmp_path / "lake")).files
    assert files[-1].endswith("/part-append-00005001.parquet")  # earlier file indexes unchanged
    with pytest.raises(RequestError, match="already exists"):
        append_records(tmp_path / "lake", 1, start_id=5001, seed=1)
