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
from tests.test_partitions import reversed_with_a_failure_resumed

from lakesync.config import Settings
from lakesync.models import JobState
from lakesync.sources.base import Position


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
    parts = settings.model_copy(update={"operations_file": config})
    done = reversed_with_a_failure_resumed(parts, db, lake, tmp_path / "parked", "events")
    assert done.status == JobState.COMPLETED, (done.message, done.error)
    assert _docs(db) == _oracle(lake)
    assert (done.insertedRecords, done.duplicateRecords, done.errorRecords) == (7, 4, 2), done


def _mixed_lake(root: Path) -> Path:
    """Key columns mixing numbers, strings and values that cannot be keys, as three tools
    write them."""
    lake = root / "mixed"
    lake.mkdir()
    # DuckDB, from a JSON column: numbers, strings, an integer beyond int64, an object
    duckdb.sql(
        "COPY (SELECT * FROM (VALUES ('1'::JSON, 1), ('\"a\"'::JSON, 2), "
        "('18446744073709551617'::JSON, 3), ('{\"k\": 1}'::JSON, 4), ('\"b\"'::JSON, 5), "
        f"('3'::JSON, 6)) t(id, v)) TO '{lake / 'a.ndjson'}' (FORMAT JSON)"
    )
    # by hand: an array as a key, repeats, an integer next to decimals, a blank line,
    # and a value column that changes type too
    (lake / "b.ndjson").write_text(
        '{"id": "x", "v": 7}\n{"id": 4, "v": 8}\n\n{"id": [1], "v": 9}\n'
        '{"id": 4, "v": 10}\n{"id": "a", "v": "eleven"}\n{"id": 2.5, "v": 12}\n'
        '{"id": 5, "v": 13}\n{"id": 5.5, "v": 14}\n'
    )
    # Python's json module, as a JSON array
    (lake / "c.json").write_text(json.dumps([{"id": 6, "v": 15}, {"id": "6x", "v": 16}]))
    return lake


def _records(lake: Path) -> list[dict[str, Any]]:
    out = []
    for path in sorted(lake.iterdir()):
        text = path.read_text()
        if text.lstrip().startswith("["):
            out += json.loads(text)
        else:
            out += [json.loads(line) for line in text.splitlines() if line.strip()]
    return out


def test_a_key_column_mixing_numbers_and_strings_is_read_as_written(
    settings: Settings, db: Any, tmp_path: Path
) -> None:
    """Arrow's reader failed the whole file ("changed from number to string"), and made
    every key of a file holding 2.5 or 2**64 a double. Now each key keeps the type it is
    written with; a key that cannot be one is rejected with its reason, the rest copied."""
    lake = _mixed_lake(tmp_path)
    done = _copy(settings, tmp_path, _toml("mixed", lake), "mixed")
    records = _records(lake)
    # the oracle: Python's json, the last record of each key; nx-27017 cannot store a
    # Decimal128 nor find a double _id, so those are rejected there (README)
    expected: dict[tuple[type, Any], Any] = {}
    for r in records:
        key = r["id"]
        if isinstance(key, str) or (isinstance(key, int) and -(2**63) <= key < 2**63):
            expected[(type(key), key)] = r["v"]
    docs = {(type(d["_id"]), d["_id"]): d["v"] for d in db["mixed"].find()}
    assert docs == expected
    assert docs[(int, 5)] == 13 and docs[(str, "a")] == "eleven"
    reasons = {e["reason"] for e in db.copyerrors.find({"jobId": done.jobId})}
    assert any("the key is an object" in r for r in reasons), reasons
    assert any("the key is an array" in r for r in reasons), reasons
    assert any("18446744073709551617 needs Decimal128" in r for r in reasons), reasons
    assert sum("is a double" in r for r in reasons) == 2, reasons  # 2.5 and 5.5
    assert (done.insertedRecords, done.duplicateRecords, done.errorRecords) == (9, 2, 5), done
    again = _copy(settings, tmp_path, _toml("mixed", lake), "mixed")
    assert (again.insertedRecords, again.updatedRecords, again.unchangedRecords) == (0, 0, 9)


def test_mixed_keys_as_a_mongodb_server_gets_them(tmp_path: Path) -> None:
    """On MongoDB (no nx-27017 limits): 2**64 + 1 is an exact Decimal128, 2.5 a double, and
    the integers beside them stay integers."""
    from bson import Decimal128

    from lakesync.schema import RecordSchema, validate
    from lakesync.sources.lake import Lake
    from lakesync.sources.text import CsvOptions
    from lakesync.typemap import MONGODB

    lake = _mixed_lake(tmp_path)
    opened = Lake.open(str(lake), csv=CsvOptions(text=frozenset({"id"}), keys=("id",)))
    assert opened.count_rows() == sum(opened.file_row_counts()) == len(_records(lake)) == 16
    ids: list[Any] = []
    rejected = []
    for batch in opened.batches(4):
        out = validate(RecordSchema(key="id"), batch.table, MONGODB, refused=batch.refused)
        ids += out.ids
        rejected += [r.reason for r in out.rejections]
    written = [r["id"] for r in _records(lake) if not isinstance(r["id"], dict | list)]
    assert ids == [Decimal128(str(v)) if isinstance(v, int) and v >= 2**63 else v for v in written]
    assert [type(i) for i in ids] == [
        Decimal128 if isinstance(v, int) and v >= 2**63 else type(v) for v in written
    ]
    assert len(rejected) == 2, rejected  # the object and the array
    # a resumed read from the middle of the first file gives the same rows from there
    whole = [r for b in opened.batches(16) for r in b.table.to_pylist()]
    resumed = [r for b in opened.batches(3, start=Position(0, 2)) for r in b.table.to_pylist()]
    assert resumed == whole[2:]


def test_a_record_refused_after_arrow_gave_up_midway_is_the_one_rejected(
    settings: Settings, db: Any, tmp_path: Path
) -> None:
    """Arrow's reader streams a large file block by block and gives up on the first block
    holding a key of another type; the file is then read as written from the row it gave
    up at. A record refused there is rejected by its row in the whole file: the reason once
    landed as many rows early as Arrow had given (on a valid record, or on none), and the
    bad record went on unrefused."""
    lake = tmp_path / "late"
    lake.mkdir()
    rows, bad = 20_000, 15_000  # ~4.6 MB: the bad row is blocks past Arrow's first
    pad = "x" * 200
    lines = [json.dumps({"id": i, "v": i, "pad": pad}) for i in range(rows)]
    lines[bad] = json.dumps({"id": [bad], "v": bad, "pad": pad})  # Arrow: number -> array
    (lake / "a.ndjson").write_text("\n".join(lines) + "\n")
    done = _copy(settings, tmp_path, _toml("late", lake), "late")
    errors = list(db.copyerrors.find({"jobId": done.jobId}))
    assert [(Path(e["file"]).name, e["row"]) for e in errors] == [("a.ndjson", bad)], [
        {k: e.get(k) for k in ("file", "row", "key", "reason")} for e in errors
    ]
    assert "the key is an array ([15000])" in errors[0]["reason"], errors[0]["reason"]
    assert {d["_id"]: d["v"] for d in db["late"].find()} == {i: i for i in range(rows) if i != bad}
    assert (done.insertedRecords, done.errorRecords) == (rows - 1, 1), done
