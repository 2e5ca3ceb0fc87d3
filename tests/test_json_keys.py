"""An undeclared key of NDJSON and JSON-array files has the type its JSON value has, in
every file: a string key stays the string it is written as (Arrow's reader would make
"2024-01-02" a date in a file whose keys all look like dates, and a string elsewhere), so
the plan of repeated keys and the written ``_id``s agree across files, whole, partitioned
in any order and resumed. Python's ``json`` module is the oracle."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import duckdb
from tests.test_csv import _copy, _toml
from tests.test_partitions import stepped

from lakesync.config import Settings
from lakesync.models import JobState


def _lake(root: Path) -> Path:
    lake = root / "events"
    lake.mkdir()
    # by hand: every key looks like a date (Arrow inferred timestamps for the column)
    (lake / "a.ndjson").write_text(
        '{"id": "2024-01-02", "v": 1}\n{"id": "2024-01-02T00:00:00", "v": 2}\n'
        '{"id": "2024-01-03", "v": 3}\n'
    )
    # written by DuckDB: the same keys among keys that are not dates (strings here)
    duckdb.sql(
        "COPY (SELECT * FROM (VALUES ('2024-01-02', 4), ('x', 5), ('2024-01-03 00:00:00', 6))"
        f" t(id, v)) TO '{lake / 'b.ndjson'}' (FORMAT JSON)"
    )
    # a JSON array of objects with numbers as keys
    (lake / "c.json").write_text(
        json.dumps([{"id": 8, "v": 7}, {"id": 9, "v": 8}, {"id": 9, "v": 9}])
    )
    (lake / "d.ndjson").write_text('{"id": null, "v": 10}\n{"id": null, "v": 11}\n')  # no key
    (lake / "e.ndjson").write_text('{"id": 9, "v": 12}\n')
    (lake / "f.ndjson").write_text('{"id": "2024-01-02", "v": 13}\n')
    return lake


def _oracle(lake: Path) -> dict[Any, int]:
    """The last record of each key (compared as MongoDB compares _id: 8 and "8" are two),
    read with Python's json module in lake order."""
    out: dict[tuple[bool, Any], int] = {}
    for path in sorted(lake.iterdir()):
        text = path.read_text()
        rows = json.loads(text) if text.lstrip().startswith("[") else [
            json.loads(line) for line in text.splitlines() if line.strip()
        ]  # fmt: skip
        for row in rows:
            if row["id"] is not None:
                out[(isinstance(row["id"], str), row["id"])] = row["v"]
    return {key: v for (_, key), v in out.items()}


def _docs(db: Any) -> dict[Any, int]:
    return {d["_id"]: d["v"] for d in db["events"].find()}


def test_a_string_key_is_one_key_in_every_file_whatever_the_others_look_like(
    settings: Settings, db: Any, tmp_path: Path
) -> None:
    lake = _lake(tmp_path)
    done = _copy(settings, tmp_path, _toml("events", lake), "events")
    expected = _oracle(lake)
    assert _docs(db) == expected
    assert expected["2024-01-02"] == 13 and expected["2024-01-02T00:00:00"] == 2
    assert all(isinstance(k, str) for k in expected if k not in (8, 9))
    assert (done.insertedRecords, done.duplicateRecords, done.errorRecords) == (7, 4, 2), done
    again = _copy(settings, tmp_path, _toml("events", lake), "events")
    assert (again.insertedRecords, again.updatedRecords, again.unchangedRecords) == (0, 0, 7)


def test_a_number_key_and_its_text_are_never_one_key(
    settings: Settings, db: Any, tmp_path: Path
) -> None:
    lake = tmp_path / "events"
    lake.mkdir()
    (lake / "a.ndjson").write_text('{"id": 7, "v": 1}\n')
    (lake / "b.ndjson").write_text('{"id": "7", "v": 2}\n')
    done = _copy(settings, tmp_path, _toml("events", lake), "events")
    docs = _docs(db)
    if len(docs) == 2:  # MongoDB: two keys
        assert docs == {7: 1, "7": 2}
    else:  # nx-27017 keeps them as one: the later is refused, saying why
        assert docs == {7: 1} and done.errorRecords == 1, done
        error = db.copyerrors.find_one({"jobId": done.jobId})
        assert 'cannot tell _id "7" from 7' in error["reason"], error


def test_partitioned_in_reverse_order_and_resumed_the_keys_agree(
    settings: Settings, db: Any, tmp_path: Path
) -> None:
    lake = _lake(tmp_path)
    config = tmp_path / "events.toml"
    config.write_text(_toml("events", lake))
    rt, queued = stepped(settings.model_copy(update={"operations_file": config}), lake)
    rt.settings.partition_rows = 2  # about a file a partition
    with rt:
        job, _ = rt.jobs.start("events")
        rt.runner.run(job.jobId)
        parts = rt.runner.partitioned
        assert parts is not None and len(queued) >= 3, queued
        order = list(reversed(queued))
        parts.run(*order[0])
        victim = db.jobpartitions.find_one({"_id": f"{job.jobId}:{order[1][1]}"})["files"][0]
        parked = tmp_path / "parked"
        (lake / victim).rename(parked)  # this part fails its job
        parts.run(*order[1])
        assert rt.store.get(job.jobId).status == JobState.FAILED
        (parked).rename(lake / victim)
        rt.jobs.resume(job.jobId)
        queued.clear()
        rt.runner.run(job.jobId)
        for step in reversed(queued):
            parts.run(*step)
        done = rt.store.get(job.jobId)
    assert done.status == JobState.COMPLETED, (done.message, done.error)
    assert _docs(db) == _oracle(lake)
    assert (done.insertedRecords, done.duplicateRecords, done.errorRecords) == (7, 4, 2), done
