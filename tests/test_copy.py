"""The copy engine and whole copy jobs against the embedded server (real wire protocol)."""

from __future__ import annotations

import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lakesync.config import Settings
from lakesync.copy import MARKER, CopyEngine
from lakesync.demo import touch_records
from lakesync.errors import LakesyncError, RequestError, SourceError
from lakesync.lake import LakeBatch, Segment
from lakesync.models import Counters, JobState, JobStatus
from lakesync.repeats import Superseded
from lakesync.runtime import Runtime
from lakesync.schema import TASK_DETAIL, RecordSchema

TS = pa.timestamp("ms", tz="UTC")
WHEN = datetime(2024, 3, 1, 12, 30, 15, 123000, tzinfo=UTC)
VALID, BAD = 4975, 25  # the session's demo lake


def task_table(keys: list[str | None], notes: list[str | None] | None = None) -> pa.Table:
    """Valid TaskDetail rows with these keys (and notes, to make versions differ)."""
    n = len(keys)
    return pa.table(
        {
            "taskDetailId": pa.array(keys, pa.string()),
            "taskId": ["TSK-1"] * n,
            "projectId": ["PRJ-1"] * n,
            "assignee": pa.array(["ana"] + [None] * (n - 1), pa.string()),
            "status": ["in_progress"] * n,
            "hoursLogged": [2.5] * n,
            "estimateHours": pa.array([None] * n, pa.float64()),
            "startedAt": pa.array([WHEN] * n, TS),
            "completedAt": pa.array([None] * n, TS),
            "updatedAt": pa.array([WHEN] * n, TS),
            "tags": pa.array([["backend", "bug"]] + [[]] * (n - 1), pa.list_(pa.string())),
            "notes": pa.array(notes or [None] * n, pa.string()),
        }
    )


def batch(table: pa.Table, file_index: int = 0, start_row: int = 0) -> LakeBatch:
    return LakeBatch(table, f"/lake/part-{file_index}.parquet", file_index, start_row)


def engine(db: Any, job_id: str = "job_a") -> CopyEngine:
    return CopyEngine(db.taskdetails, db.copyerrors, TASK_DETAIL, job_id)


def counts(result: Any) -> tuple[int, int, int, int]:
    c = result.counts
    assert c.processed == c.inserted + c.updated + c.unchanged + c.duplicates + c.errors
    return c.inserted, c.updated, c.unchanged, c.errors


# -- the engine ---------------------------------------------------------------------------


def test_insert_keys_by_task_detail_id_and_keeps_bson_types(db: Any) -> None:
    assert counts(engine(db).write(batch(task_table(["TD-1", "TD-2"])))) == (2, 0, 0, 0)
    doc = db.taskdetails.find_one({"_id": "TD-1"})
    assert doc["taskDetailId"] == "TD-1"  # `_id` is the key, and the field is kept
    assert isinstance(doc["startedAt"], datetime) and doc["startedAt"] == WHEN
    assert isinstance(doc["updatedAt"], datetime)
    assert doc["completedAt"] is None and doc["estimateHours"] is None
    assert doc["tags"] == ["backend", "bug"] and doc["assignee"] == "ana"
    assert db.taskdetails.find_one({"_id": "TD-2"})["tags"] == []
    assert doc[MARKER]["job"] == "job_a"


def test_replay_of_a_batch_by_the_same_job_counts_as_the_first_time(db: Any) -> None:
    db.taskdetails.insert_one({"_id": "TD-2", "taskDetailId": "TD-2", "old": True})
    table = task_table(["TD-1", "TD-2", "TD-3", None])
    engine(db, "job_old").write(batch(table.slice(2, 1)))  # TD-3 as it is in the batch
    b = batch(table, file_index=2, start_row=1000)
    first = counts(engine(db).write(b))
    assert first == (1, 1, 1, 1)
    snapshot = list(db.taskdetails.find().sort("_id"))
    for _ in range(2):  # crashed after writing, before the checkpoint: written again
        assert counts(engine(db).write(b)) == first
    assert list(db.taskdetails.find().sort("_id")) == snapshot
    assert db.copyerrors.count_documents({}) == 1  # rejections are not stored twice


def test_same_data_in_a_new_job_is_unchanged_and_not_written(db: Any) -> None:
    b = batch(task_table(["TD-1", "TD-2"]))
    engine(db, "job_a").write(b)
    assert counts(engine(db, "job_b").write(b)) == (0, 0, 2, 0)
    assert {d[MARKER]["job"] for d in db.taskdetails.find()} == {"job_a"}


def test_changed_record_counts_as_updated_and_dates_stay_dates(db: Any) -> None:
    engine(db, "job_a").write(batch(task_table(["TD-1", "TD-2"])))
    changed = task_table(["TD-1", "TD-2"], notes=["revised", None])
    assert counts(engine(db, "job_b").write(batch(changed))) == (0, 1, 1, 0)
    doc = db.taskdetails.find_one({"_id": "TD-1"})
    assert doc["notes"] == "revised"
    for field in ("startedAt", "updatedAt"):  # nx-27017 would turn dates given to $set into text
        assert isinstance(doc[field], datetime), (field, doc[field])
        assert doc[field] == WHEN
    assert isinstance(db.taskdetails.find_one({"_id": "TD-2"})["startedAt"], datetime)
    assert db.taskdetails.count_documents({"startedAt": {"$gte": WHEN}}) == 2  # compared as dates


def test_duplicate_keys_in_one_batch_last_wins_and_replay_counts_the_same(db: Any) -> None:
    b = batch(task_table(["TD-1", "TD-2", "TD-1", "TD-1"], notes=["v1", None, "v2", "v3"]))
    result = engine(db).write(b)
    assert counts(result) == (2, 0, 0, 0)  # one record per key: the last one wins
    assert result.counts.duplicates == 2
    assert db.taskdetails.find_one({"_id": "TD-1"})["notes"] == "v3"
    assert db.taskdetails.count_documents({}) == 2
    again = engine(db).write(b)  # a replay counts as the first time
    assert counts(again) == (2, 0, 0, 0) and again.counts.duplicates == 2


def test_repeats_count_against_the_collection_before_the_job(db: Any) -> None:
    engine(db, "job_a").write(batch(task_table(["TD-X", "TD-1"], notes=["x", "v1"])))
    b = batch(task_table(["TD-X", "TD-1", "TD-1"], notes=["x", "v2", "v1"]))  # v2, then v1 again
    first = engine(db, "job_b").write(b)
    assert counts(first) == (0, 0, 2, 0) and first.counts.duplicates == 1
    assert db.taskdetails.find_one({"_id": "TD-1"})["notes"] == "v1"


def test_plan_superseded_rows_are_skipped_as_duplicates(db: Any) -> None:
    plan = Superseded(
        {"/lake/part-0.parquet": np.array([0, 1]), "/lake/part-1.parquet": np.array([9])}
    )
    e = CopyEngine(db.taskdetails, db.copyerrors, TASK_DETAIL, "job_a", plan)
    first = e.write(batch(task_table(["TD-1", "TD-2", "TD-3"], notes=["old", "old", "x"])))
    assert counts(first) == (1, 0, 0, 0) and first.counts.duplicates == 2
    later = e.write(batch(task_table(["TD-1", "TD-2"], notes=["new", "new"]), 1, start_row=4))
    assert counts(later) == (2, 0, 0, 0) and later.counts.duplicates == 0  # rows 4-5, not 9
    assert db.taskdetails.count_documents({}) == 3


def test_date_keys_are_found_again_on_a_rerun(db: Any) -> None:
    schema = RecordSchema(key="day", fields=[])
    table = pa.table({"day": pa.array([WHEN, WHEN.replace(day=2)], TS), "v": [1, 2]})
    first = CopyEngine(db.days, db.copyerrors, schema, "job_a").write(batch(table))
    assert counts(first) == (2, 0, 0, 0)
    second = CopyEngine(db.days, db.copyerrors, schema, "job_b").write(batch(table))
    assert counts(second) == (0, 0, 2, 0)


def test_positions_count_files_as_the_whole_lake_does(db: Any) -> None:
    """Two partitions whose first files are files 0 and 3 of the lake: no replay confusion."""
    e = engine(db)
    e.write(LakeBatch(task_table(["TD-1"], notes=["a"]), "/lake/a.parquet", 0, 0, 0))
    other = LakeBatch(task_table(["TD-1"], notes=["a"]), "/lake/d.parquet", 0, 0, 3)
    assert counts(e.write(other)) == (0, 0, 1, 0)  # not taken for a replay of file 0


def test_rejections_are_stored_with_position_and_reason(db: Any) -> None:
    table = task_table(["TD-1", "", "TD-3"])
    table = table.set_column(5, "hoursLogged", pa.array([1.0, 1.0, -2.0]))
    result = engine(db).write(batch(table, file_index=4, start_row=500))
    assert counts(result) == (1, 0, 0, 2)
    stored = sorted(db.copyerrors.find({}, {"_id": 0}), key=lambda d: d["row"])
    assert [set(d) for d in stored] == [{"jobId", "key", "file", "row", "reason", "time"}] * 2
    assert [(d["key"], d["row"]) for d in stored] == [(None, 501), ("TD-3", 502)]
    assert stored[0]["reason"] == "taskDetailId must not be empty"
    assert stored[1]["reason"] == "hoursLogged must be >= 0, got -2.0"
    assert all(d["jobId"] == "job_a" and d["file"] == "/lake/part-4.parquet" for d in stored)
    assert all(isinstance(d["time"], datetime) for d in stored)


def test_records_inserted_by_another_writer_meanwhile_become_updates(db: Any) -> None:
    """A race the engine cannot see coming: its plan says insert, the server says duplicate."""
    e = engine(db)
    b = batch(task_table(["TD-1", "TD-2"]))
    ready = e.prepare(b)
    c = Counters(processed=2)
    rejected: list[dict[str, Any]] = []
    plan = e._classify(
        ready.keys, ready.rows, ready.bodies, ready.digests, ready.kdigests, {}, b, c, rejected
    )
    db.taskdetails.insert_many([{"_id": "TD-1", "x": 1}, {"_id": "TD-2", "x": 2}])  # the race
    e._execute(plan, c, rejected, b)
    assert (c.inserted, c.updated, rejected) == (0, 2, [])
    assert db.taskdetails.find_one({"_id": "TD-1"})["taskDetailId"] == "TD-1"


# -- whole jobs ---------------------------------------------------------------------------


def run_job(rt: Runtime, options: dict[str, Any] | None = None) -> JobStatus:
    status, created = rt.jobs.start("copy-taskdetail", options or {}, trusted=True)
    assert created
    rt.runner.run(status.jobId)
    return rt.jobs.get(status.jobId)


def assert_completed(s: JobStatus, inserted: int, updated: int, unchanged: int) -> None:
    assert s.status == JobState.COMPLETED, (s.message, s.error)
    assert s.totalRecords == s.processedRecords == VALID + BAD
    assert (s.insertedRecords, s.updatedRecords, s.unchangedRecords, s.errorRecords) == (
        inserted,
        updated,
        unchanged,
        BAD,
    )
    assert s.percentComplete == 100 and s.endTime is not None and s.error is None


def test_demo_lake_copy_resync_and_touched_records(
    settings: Settings, db: Any, demo_lake: Path, tmp_path: Path
) -> None:
    lake = tmp_path / "lake"
    shutil.copytree(demo_lake, lake)
    settings = settings.model_copy(update={"lake_uri": str(lake), "batch_size": 700})
    with Runtime(settings) as rt:
        first = run_job(rt)
        assert_completed(first, VALID, 0, 0)
        assert first.insertedRecords + first.errorRecords == first.totalRecords
        assert db.taskdetails.count_documents({}) == VALID
        errors = list(db.copyerrors.find({"jobId": first.jobId}))
        assert len(errors) == BAD
        assert all(e["reason"] and e["file"].endswith(".parquet") for e in errors)
        assert all(isinstance(e["row"], int) and e["row"] >= 0 for e in errors)
        raw = db.jobstatuses.find_one({"jobId": first.jobId})
        for field in ("startTime", "endTime", "updatedAt", "heartbeatAt"):
            assert isinstance(raw[field], datetime), (field, raw[field])  # not text: TTL works
        assert_completed(run_job(rt), 0, 0, VALID)
        touched = touch_records(lake, 10)
        third = run_job(rt)
        assert_completed(third, 0, 10, VALID - 10)
    for doc in db.taskdetails.find({"_id": {"$in": touched}}):
        assert doc["notes"].startswith("Revised") and doc[MARKER]["job"] == third.jobId
        assert isinstance(doc["updatedAt"], datetime)
        assert doc["startedAt"] is None or isinstance(doc["startedAt"], datetime)


# -- bad input: one clear message, the job (if any) failed, nothing copied is touched ---------


def write_file(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


HEADER = "taskDetailId,taskId,projectId,status,hoursLogged,updatedAt\n"


def bad_sources(tmp_path: Path) -> dict[str, tuple[str, str]]:
    """name -> (source, words the error must contain)."""
    narrow = tmp_path / "narrow" / "part-0.parquet"
    narrow.parent.mkdir()
    pq.write_table(pa.table({"taskDetailId": ["TD-1"], "notes": ["x"]}), narrow)
    return {
        "not parquet": (
            str(write_file(tmp_path / "junk" / "part-0.parquet", b"PAR1 this is not parquet")),
            "not a valid parquet file",
        ),
        "not json": (
            str(write_file(tmp_path / "json" / "a.json", '{"taskDetailId": "TD-1", "taskId": ')),
            "a.json",
        ),
        "schema lacks columns": (str(narrow.parent), "lacks required column(s)"),
    }


def test_bad_sources_fail_the_job_and_leave_copied_data_alone(
    settings: Settings, db: Any, tmp_path: Path
) -> None:
    with Runtime(settings) as rt:
        assert_completed(run_job(rt, {"batchSize": 5000}), VALID, 0, 0)
        before = list(db.taskdetails.find().sort("_id"))
        for name, (source, words) in bad_sources(tmp_path).items():
            failed = run_job(rt, {"source": source})
            assert failed.status == JobState.FAILED, name
            assert failed.error is not None and words in failed.error, (name, failed.error)
            assert source.rsplit("/", 1)[-1] in failed.error  # names the file or directory
            assert "Traceback" not in failed.error and failed.endTime is not None
            assert failed.insertedRecords == failed.updatedRecords == 0
        # a CSV record of fewer cells than the header is one bad record, not a bad file (#25)
        ragged = write_file(tmp_path / "csv" / "a.csv", HEADER + "TD-1,T,P,todo,1\n")
        done = run_job(rt, {"source": str(ragged)})
        assert done.status == JobState.COMPLETED, (done.message, done.error)
        assert (done.totalRecords, done.errorRecords, done.insertedRecords) == (1, 1, 0), done
        assert list(db.taskdetails.find().sort("_id")) == before
        assert rt.jobs.get(run_job(rt).jobId).unchangedRecords == VALID  # still all there


@pytest.mark.parametrize(
    ("operation", "options", "error", "words"),
    [
        ("copy-taskdetail", {"source": "/no/such/lake"}, SourceError, "/no/such/lake"),
        ("copy-taskdetails", {}, RequestError, "Valid operations: copy-taskdetail"),
        ("copy-taskdetail", {"batchSize": 0}, RequestError, "batchSize"),
        ("copy-taskdetail", {"batchSize": 100_001}, RequestError, "batchSize"),
        ("copy-taskdetail", {"batchsize": 10}, RequestError, "not an accepted option"),
    ],
)
def test_requests_that_cannot_work_create_no_job(
    settings: Settings, db: Any, operation: str, options: dict[str, Any], error: type, words: str
) -> None:
    with Runtime(settings) as rt, pytest.raises(LakesyncError) as e:
        rt.jobs.start(operation, options)
    assert type(e.value) is error and words in str(e.value)
    assert db.jobstatuses.count_documents({}) == 0 and db.taskdetails.count_documents({}) == 0


def test_a_batch_spanning_files_keeps_each_records_own_position(db: Any) -> None:
    """Rows 0-1 are rows 8-9 of file 3, rows 2-4 rows 0-2 of file 4 (a lake of small files)."""
    table = task_table(["TD-1", "TD-2", "TD-3", "", "TD-2"], notes=["a", "old", "b", None, "new"])
    segments = [
        Segment("/lake/f3.parquet", 3, 3, 8, 2, 0),
        Segment("/lake/f4.parquet", 4, 4, 0, 3, 2),
    ]
    b = LakeBatch(table, "/lake/f3.parquet", 3, 8, 3, segments=segments)
    plan = Superseded({"/lake/f3.parquet": np.array([9])})  # TD-2 "old": replaced in file 4
    e = CopyEngine(db.taskdetails, db.copyerrors, TASK_DETAIL, "job_a", plan)
    first = e.write(b)
    assert counts(first) == (3, 0, 0, 1) and first.counts.duplicates == 1
    ats = {d["_id"]: d[MARKER]["at"] for d in db.taskdetails.find({}, {MARKER: 1})}
    assert ats == {"TD-1": [3, 8], "TD-3": [4, 0], "TD-2": [4, 2]}
    (rejected,) = db.copyerrors.find({})
    assert (rejected["_id"], rejected["file"], rejected["row"]) == (
        "job_a:4:1",
        "/lake/f4.parquet",
        1,
    )
    again = e.write(b)  # a replay: counted as the first time, nothing rejected twice
    assert counts(again) == (3, 0, 0, 1) and db.copyerrors.count_documents({}) == 1
