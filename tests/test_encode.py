"""The copy hot path: column-wise BSON equals bson.encode byte for byte, markers, the
insert-first mode, message limits and the lake's reader thread."""

from __future__ import annotations

import itertools
import random
import threading
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import bson
import pyarrow as pa
import pytest

from lakesync import schema as schema_module
from lakesync.copy import MARKER, MAX_MESSAGE_BYTES, CopyEngine, _new_documents, marker_bson
from lakesync.encode import encode_rows
from lakesync.lake import Lake, LakeBatch
from lakesync.schema import TASK_DETAIL, FieldRule, RecordSchema, validate

TS = pa.timestamp("ms", tz="UTC")
WHEN = datetime(2024, 3, 1, 12, 30, 15, 123000, tzinfo=UTC)
ANY = RecordSchema(key="id", fields=[FieldRule(name="id", type="any")], keepExtra=True)


def assert_same_bson(schema: RecordSchema, table: pa.Table, *, columnwise: bool = True) -> None:
    out = validate(schema, table)
    expected = [bson.encode(d) for d in out.documents]
    assert out.encoded() == expected
    assert isinstance(out.key, str)
    fields = [("_id", out.columns[out.key]), *out.columns.items()]
    written = None if out.values else encode_rows(fields, len(out.rows))
    assert (written is not None) is columnwise  # not the fallback
    if written is not None:  # (a batch this small is encoded a row at a time: compared here)
        data, offsets = written
        assert [data[a:b] for a, b in itertools.pairwise(offsets.tolist())] == expected


def test_demo_lake_encodes_as_bson_encode(demo_lake: Path) -> None:
    for batch in Lake.open(str(demo_lake)).batches(700):  # bad rows too: filtered columns
        assert_same_bson(TASK_DETAIL, batch.table)


def _column(rng: random.Random, kind: str, n: int) -> pa.Array:
    def maybe(value: Any) -> Any:
        return None if rng.random() < 0.2 else value

    words = ["", "a", "é€𝄞", "tab\there", "nul\x00inside", "x" * 300]
    if kind == "string":
        return pa.array([maybe(rng.choice(words)) for _ in range(n)], pa.string())
    if kind == "large_string":
        return pa.array([maybe(rng.choice(words)) for _ in range(n)], pa.large_string())
    if kind == "float":
        values = [0.5, -0.0, float("inf"), float("nan"), 1e300, -3.25]
        return pa.array([maybe(rng.choice(values)) for _ in range(n)], pa.float64())
    if kind == "float32":
        return pa.array([maybe(rng.random()) for _ in range(n)], pa.float32())
    if kind in ("int64", "int32", "int8", "uint32"):
        bounds = {
            "int64": [0, -1, 2**31 - 1, 2**31, -(2**31), -(2**31) - 1, 2**62, -(2**63)],
            "int32": [0, 2**31 - 1, -(2**31)],
            "int8": [0, 127, -128],
            "uint32": [0, 2**32 - 1],
        }[kind]
        return pa.array([maybe(rng.choice(bounds)) for _ in range(n)], getattr(pa, kind)())
    if kind == "bool":
        return pa.array([maybe(rng.random() < 0.5) for _ in range(n)], pa.bool_())
    if kind == "timestamp":
        unit = rng.choice(["s", "ms"])
        tz = rng.choice([None, "UTC", "Europe/Berlin"])
        values = [maybe(rng.randrange(-(10**11), 10**11)) for _ in range(n)]
        return pa.array(values, pa.int64()).cast(pa.timestamp(unit, tz=tz))
    if kind == "date":
        return pa.array([maybe(date(2024, 1, 1 + rng.randrange(28))) for _ in range(n)])
    if kind == "tags":
        lists = [maybe([maybe(rng.choice(words)) for _ in range(rng.choice([0, 1, 3, 12]))])
                 for _ in range(n)]  # fmt: skip
        return pa.array(lists, pa.list_(pa.string()))
    if kind == "dictionary":
        return pa.array([maybe(rng.choice(words)) for _ in range(n)]).dictionary_encode()
    if kind == "null":
        return pa.nulls(n)
    raise AssertionError(kind)


KINDS = ["string", "large_string", "float", "float32", "int64", "int32", "int8", "uint32",
         "bool", "timestamp", "date", "tags", "dictionary", "null"]  # fmt: skip


@pytest.mark.parametrize("seed", range(40))
def test_random_columns_encode_as_bson_encode(seed: int) -> None:
    rng = random.Random(seed)
    n = rng.choice([1, 2, 7, 60])
    ids = rng.choice([pa.array(range(n)), pa.array([f"k{i}" for i in range(n)])])
    columns = {"id": ids, **{f"c{i}_{k}": _column(rng, k, n) for i, k in enumerate(KINDS)}}
    table = pa.table(columns)
    if rng.random() < 0.5:  # slices and chunks, as a lake batch has them
        start = rng.randrange(n)
        table = pa.concat_tables([table.slice(start), table.slice(0, start)])
    assert_same_bson(ANY, table)
    rules = [FieldRule(name="id", type="any"), FieldRule(name="c0_string", nonEmpty=True)]
    schema = RecordSchema(key="id", fields=rules, keepExtra=True)
    assert_same_bson(schema, table)  # some rows rejected: filtered columns


def test_unsupported_columns_fall_back_to_bson_encode() -> None:
    table = pa.table({
        "id": [1, 2],
        "blob": pa.array([b"\x00\x01", None], pa.binary()),
        "nested": pa.array([{"a": 1}, None]),
        "ints": pa.array([[1, 2], []]),
    })  # fmt: skip
    assert_same_bson(ANY, table, columnwise=False)
    assert_same_bson(ANY, table.select(["id", "ints"]), columnwise=False)


def test_wide_short_batches_are_encoded_a_group_of_fields_at_a_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rng = random.Random(7)
    columns = {"id": pa.array(["a", "b", "c"])}
    columns.update({f"c{i}_{k}": _column(rng, k, 3) for i, k in enumerate(KINDS * 3)})
    columns["blob"] = pa.array([b"\x00", None, b"z"], pa.binary())  # not written column-wise
    monkeypatch.setattr(schema_module, "FIELD_GROUP", 4)  # 44 fields: 11 groups
    for table in (pa.table(columns), pa.table(columns).drop_columns(["blob"])):
        out = validate(ANY, table)
        assert len(out.rows) == 3 and out.encoded() == [bson.encode(d) for d in out.documents]
    monkeypatch.setattr(schema_module, "COLUMNWISE_ROWS", 1)  # the column-wise encoder
    assert_same_bson(ANY, pa.table(columns).drop_columns(["blob"]))


def test_marker_bson_is_bson_encode() -> None:
    for h, job, op, at in [
        ("0" * 24, "job_a", "i", (0, 5)),
        ("f" * 24, "jöb €", "u", (3, 2**31)),
        ("short", "j", "n", (2**31 - 1, -(2**31))),
        ("a" * 24, "j", "i", (2**40, 1)),
    ]:
        assert marker_bson(h, job, op, at) == bson.encode({"h": h, "job": job, "op": op,
                                                           "at": list(at)})  # fmt: skip


@pytest.mark.parametrize("start_row", [0, 2**31 - 3])  # rows past int32: the general way
def test_documents_of_new_records_are_the_record_and_its_marker(start_row: int) -> None:
    records = [{"_id": "a", "v": 1}, {"_id": "b", "w": "x" * 50, "t": None}]
    bodies = [bson.encode(r) for r in records]
    b = batch(table_of(["a"]), 3, start_row)
    docs = _new_documents("job_q", b, [0, 7], bodies, ["a" * 24, "b" * 24])
    for doc, record, row, h in zip(docs, records, [0, 7], ["a" * 24, "b" * 24], strict=True):
        marker = {"h": h, "job": "job_q", "op": "i", "at": [3, start_row + row]}
        assert doc.raw == bson.encode({**record, MARKER: marker})


# -- the engine's insert-first mode ----------------------------------------------------------


def table_of(keys: list[str], note: str | None = None) -> pa.Table:
    n = len(keys)
    return pa.table({
        "taskDetailId": keys, "taskId": ["T"] * n, "projectId": ["P"] * n,
        "status": ["todo"] * n, "hoursLogged": [1.0] * n,
        "updatedAt": pa.array([WHEN] * n, TS), "notes": pa.array([note] * n, pa.string()),
    })  # fmt: skip


def batch(table: pa.Table, file_index: int, start_row: int = 0) -> LakeBatch:
    return LakeBatch(table, f"/lake/part-{file_index}.parquet", file_index, start_row)


def counts(result: Any) -> tuple[int, int, int, int]:
    c = result.counts
    assert c.processed == c.inserted + c.updated + c.unchanged + c.errors
    return c.inserted, c.updated, c.unchanged, c.errors


def test_insert_first_batches_meet_existing_records(db: Any) -> None:
    other = CopyEngine(db.taskdetails, db.copyerrors, TASK_DETAIL, "job_old")
    other.write(batch(table_of(["K-5", "K-6"]), 9))  # written before, same content
    db.taskdetails.insert_one({"_id": "K-7", "taskDetailId": "K-7"})  # not written by lakesync
    engine = CopyEngine(db.taskdetails, db.copyerrors, TASK_DETAIL, "job_new")
    assert counts(engine.write(batch(table_of(["K-1", "K-2"]), 0))) == (2, 0, 0, 0)
    assert engine._assume_new  # nothing existed: the next batch is inserted without a read
    mixed = batch(table_of(["K-3", "K-5", "K-6", "K-7"]), 1)
    mixed.table = mixed.table.set_column(6, "notes", pa.array([None, None, "new", None]))
    assert counts(engine.write(mixed)) == (1, 2, 1, 0)  # K-6 and K-7 changed, K-5 unchanged
    assert not engine._assume_new
    assert counts(engine.write(mixed)) == (1, 2, 1, 0)  # a replay counts as it did
    stored = {d["_id"]: d for d in db.taskdetails.find()}
    assert stored["K-5"][MARKER]["job"] == "job_old"
    assert stored["K-6"]["notes"] == "new" and stored["K-6"][MARKER]["op"] == "u"
    assert stored["K-7"]["taskId"] == "T" and stored["K-3"][MARKER]["op"] == "i"


def test_insert_first_batch_written_twice_counts_once(db: Any) -> None:
    engine = CopyEngine(db.taskdetails, db.copyerrors, TASK_DETAIL, "job_a")
    engine.write(batch(table_of(["K-1"]), 0))
    second = batch(table_of(["K-2", "K-3"]), 0, 1)
    assert counts(engine.write(second)) == (2, 0, 0, 0)
    assert engine._assume_new
    assert counts(engine.write(second)) == (2, 0, 0, 0)  # retried after a lost reply
    assert db.taskdetails.count_documents({}) == 3


class _Recorder:
    """A collection that records the documents of each bulk call (nothing is stored)."""

    def __init__(self) -> None:
        self.calls: list[list[Any]] = []

    def find(self, *args: Any, **kwargs: Any) -> list[Any]:
        return []

    def with_options(self, **kwargs: Any) -> _Recorder:
        return self

    def insert_many(self, docs: list[Any], ordered: bool = True) -> None:
        self.calls.append(list(docs))

    def bulk_write(self, ops: list[Any], ordered: bool = True) -> Any:
        self.calls.append([op._doc for op in ops])
        return type("Result", (), {"bulk_api_result": {"nInserted": len(ops)}})()


def test_bulk_messages_stay_under_the_size_limit() -> None:
    big = "x" * (3 * 1024 * 1024)  # 3 MiB a record: 20 records do not fit in one message
    recorder = _Recorder()
    engine = CopyEngine(recorder, recorder, TASK_DETAIL, "job_a")  # type: ignore[arg-type]
    for first in (0, 20):  # the first batch is classified, the second inserted at once
        keys = [f"K-{first + i}" for i in range(20)]
        recorder.calls.clear()
        assert engine.write(batch(table_of(keys, big), 0, first)).counts.inserted == 20
        sizes = [sum(len(d.raw) for d in call) for call in recorder.calls]
        assert len(sizes) >= 2 and max(sizes) <= MAX_MESSAGE_BYTES
        assert sum(len(c) for c in recorder.calls) == 20
    assert engine._assume_new


# -- the reader thread ------------------------------------------------------------------------


def test_prepared_batches_and_an_early_stop(demo_lake: Path) -> None:
    lake = Lake.open(str(demo_lake))
    seen: list[int] = []

    def prepare(b: LakeBatch) -> int:
        if b.end.file_index == len(lake.files) - 1:
            raise ValueError("prepare may fail: the consumer then does the work itself")
        seen.append(b.file_index)
        return b.table.num_rows

    before = threading.active_count()
    batches = lake.batches(100, prepare=prepare)
    first = [next(batches) for _ in range(3)]
    assert [b.prepared for b in first] == [b.table.num_rows for b in first]
    rest = list(batches)
    assert any(b.prepared is None for b in rest)
    assert sum(b.table.num_rows for b in first + rest) == lake.count_rows()
    early = lake.batches(100)
    next(early)
    early.close()  # the consumer stops: the reader thread ends too
    for _ in range(50):
        if threading.active_count() <= before:
            break
        threading.Event().wait(0.02)
    assert threading.active_count() <= before
