"""Delta Lake tables the test writes itself with deltalake, read locally and from S3 (moto)."""

from __future__ import annotations

import re
import sys
from collections import Counter
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from deltalake import DeltaTable, QueryBuilder, write_deltalake
from tests.helpers import REGION, aws_test_env, run_job, s3_client, start_moto_thread

from lakesync.config import Settings
from lakesync.demo import generate
from lakesync.errors import RequestError, SourceError
from lakesync.lake import Lake, Position
from lakesync.models import JobState, Outcome
from lakesync.runtime import Runtime

FIRST, APPENDED = 3000, 1000  # version 0 holds FIRST records, version 1 adds APPENDED


@pytest.fixture(scope="module")
def records(tmp_path_factory: pytest.TempPathFactory) -> pa.Table:
    """4,000 valid TaskDetail records with a projectId column (from the demo generator)."""
    out = tmp_path_factory.mktemp("demo") / "lake"
    generate(out, FIRST + APPENDED, seed=5)
    table = ds.dataset(out, partitioning="hive").to_table()
    return table.sort_by("taskDetailId")


def write_versions(uri: str, records: pa.Table, options: dict[str, str] | None = None) -> None:
    """Version 0: the first 3,000 records; version 1: 1,000 more appended."""
    write_deltalake(
        uri, records.slice(0, FIRST), partition_by=["projectId"], storage_options=options
    )
    write_deltalake(
        uri, records.slice(FIRST), partition_by=["projectId"], mode="append",
        storage_options=options,
    )  # fmt: skip


def ids(lake: Lake, **kwargs: Any) -> list[str]:
    return [k for b in lake.batches(**kwargs) for k in b.table["taskDetailId"].to_pylist()]


@pytest.fixture(scope="module")
def local_table(tmp_path_factory: pytest.TempPathFactory, records: pa.Table) -> Path:
    path = tmp_path_factory.mktemp("delta") / "tasks"
    write_versions(str(path), records)
    return path


def test_reads_the_current_version_and_an_older_one(local_table: Path, records: pa.Table) -> None:
    lake = Lake.open(str(local_table))
    assert lake.format == "delta" and lake.version == 1
    assert lake.count_rows() == FIRST + APPENDED == len(set(ids(lake, batch_size=700)))
    assert sorted(ids(lake, batch_size=1000)) == records["taskDetailId"].to_pylist()
    active = DeltaTable(str(local_table)).file_uris()
    assert sorted(lake.files) == sorted(active) and len(lake.files) > 20
    first = set(DeltaTable(str(local_table), version=0).file_uris())  # commit order
    assert set(lake.files[: len(first)]) == first and lake.file_name(0).startswith("projectId=")
    assert lake.schema.field("projectId").type == pa.string()
    for batch in lake.batches(500):  # partition values come from the log
        for seg in batch.segments:
            rows = batch.table["projectId"].slice(seg.offset, seg.rows).to_pylist()
            assert set(rows) == {seg.file.split("projectId=")[1].split("/")[0]}
    old = Lake.open(str(local_table), version=0)
    assert old.version == 0 and old.count_rows() == FIRST
    assert sorted(ids(old, batch_size=1000)) == records["taskDetailId"].to_pylist()[:FIRST]
    assert Lake.open(str(local_table), format="delta").version == 1
    assert Lake.open(f"file://{local_table}").version == 1


def test_positions_resume_on_a_delta_table(local_table: Path) -> None:
    lake = Lake.open(str(local_table))
    batches = list(lake.batches(256))
    everything = [k for b in batches for k in b.table["taskDetailId"].to_pylist()]
    done = 0
    for i, cut in enumerate(batches):
        done += cut.table.num_rows
        if i % 4 == 0:
            start = lake.resume_position(cut.end, lake.file_name(cut.end.file_index))
            assert ids(lake, batch_size=100, start=start) == everything[done:]
    # The same version read again lists the same files: checkpoints stay valid.
    again = Lake.open(str(local_table), version=1)
    assert again.files == lake.files
    assert ids(again, batch_size=999, start=Position(5, 7)) == ids(
        lake, batch_size=999, start=Position(5, 7)
    )


def test_only_active_files_are_read(tmp_path: Path, records: pa.Table) -> None:
    path = str(tmp_path / "tasks")
    write_versions(path, records)
    DeltaTable(path).delete("status = 'blocked'")  # version 2 rewrites files
    blocked = pc.sum(pc.equal(records["status"], "blocked")).as_py()
    lake = Lake.open(path)
    assert lake.version == 2 and lake.count_rows() == FIRST + APPENDED - blocked
    assert "blocked" not in set(pc.unique(pa.concat_tables(b.table for b in lake.batches(5000))
                                          ["status"]).to_pylist())  # fmt: skip
    with pytest.raises(SourceError, match="is a Delta table, read as a table"):
        Lake.open(path, format="parquet")  # never every file on disk, removed ones included
    assert Lake.open(path, version=1).count_rows() == FIRST + APPENDED


def test_typed_partitions_and_an_empty_table(tmp_path: Path) -> None:
    table = pa.table({"id": [1, 2, 3, 4], "year": [2023, 2024, 2024, None]})
    write_deltalake(str(tmp_path / "t"), table, partition_by=["year"])
    lake = Lake.open(str(tmp_path / "t"))
    assert lake.schema.field("year").type == pa.int64()
    got = pa.concat_tables(b.table for b in lake.batches(10)).sort_by("id")
    assert got.to_pydict() == {"id": [1, 2, 3, 4], "year": [2023, 2024, 2024, None]}
    assert lake.count_rows(pc.field("year") == 2024) == 2
    DeltaTable(str(tmp_path / "t")).delete()
    empty = Lake.open(str(tmp_path / "t"))
    assert empty.files == [] and empty.count_rows() == 0 and empty.version == 1
    assert list(empty.batches(10)) == []


def test_delta_errors(tmp_path: Path, local_table: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(SourceError, match=r"Version 9 of the Delta table .*the latest is 1"):
        Lake.open(str(local_table), version=9)
    write_deltalake(str(tmp_path / "dv"), pa.table({"a": [1, 2]}),
                    configuration={"delta.enableDeletionVectors": "true"})  # fmt: skip
    assert Lake.open(str(tmp_path / "dv")).count_rows() == 2  # read since deletion vectors are
    nested = [{"x": 1, "y": [{"z": "q"}]}, None]  # mapped names inside structs and lists too
    write_deltalake(str(tmp_path / "cm"), pa.table({"a": [1, 2], "s": nested}),
                    configuration={"delta.columnMapping.mode": "name"})  # fmt: skip
    mapped = Lake.open(str(tmp_path / "cm"))
    assert [b.table.to_pydict() for b in mapped.batches(10)] == [{"a": [1, 2], "s": nested}]
    with pytest.raises(SourceError, match="is a Delta log: use its parent folder"):
        Lake.open(str(local_table / "_delta_log"))
    monkeypatch.setitem(sys.modules, "deltalake", None)  # as if the extra is not installed
    with pytest.raises(SourceError, match=re.escape("pip install 'lakesync[delta]'")):
        Lake.open(str(local_table))


def test_copies_a_delta_table(settings: Settings, db: Any, local_table: Path) -> None:
    settings = settings.model_copy(update={"lake_uri": str(local_table), "batch_size": 700})
    with Runtime(settings) as rt:
        done = run_job(rt, str(local_table))
    assert done.status == JobState.COMPLETED, (done.message, done.error)
    assert done.totalRecords == done.processedRecords == done.insertedRecords == 4000
    assert done.options["deltaVersion"] == 1
    assert db.taskdetails.count_documents({}) == 4000
    with Runtime(settings) as rt:  # an older version, asked for; kept on resume
        old = run_job(rt, str(local_table), deltaVersion=0, batchSize=500)
    assert old.status == JobState.COMPLETED and old.totalRecords == 3000
    assert old.unchangedRecords == 3000 and old.options["deltaVersion"] == 0
    assert old.checkpoint is not None and old.checkpoint.file is not None
    doc = db.taskdetails.find_one({"_id": "TD-00000001"})
    assert doc is not None and doc["projectId"].startswith("PRJ-")


@pytest.fixture(scope="module")
def s3_delta(records: pa.Table) -> Iterator[str]:
    """The two-version table written to s3://delta-lake/tasks on a moto server."""
    with aws_test_env():
        server, url = start_moto_thread()
        s3_client(url).create_bucket(Bucket="delta-lake")
        options = {
            "AWS_ENDPOINT_URL": url, "AWS_ALLOW_HTTP": "true", "AWS_REGION": REGION,
            "AWS_S3_ALLOW_UNSAFE_RENAME": "true",
        }  # fmt: skip
        write_versions("s3://delta-lake/tasks", records, options)
        yield url
        server.stop()


def test_delta_table_on_s3(s3_delta: str, local_table: Path, settings: Settings, db: Any) -> None:
    with aws_test_env():
        settings = settings.model_copy(update={
            "lake_uri": "s3://delta-lake/tasks", "s3_endpoint_url": s3_delta,
            "s3_region": REGION, "batch_size": 1000,
        })  # fmt: skip
        lake = Lake.open("s3://delta-lake/tasks", settings=settings)
        local = Lake.open(str(local_table))
        assert lake.format == "delta" and lake.version == 1 and lake.count_rows() == 4000
        assert all(f.startswith("s3://delta-lake/tasks/projectId=PRJ-") for f in lake.files)
        assert sorted(ids(lake, batch_size=1000)) == sorted(ids(local, batch_size=1000))
        assert Lake.open("s3://delta-lake/tasks", settings=settings, version=0).count_rows() == 3000
        with pytest.raises(SourceError, match="Version 5 of the Delta table s3://delta-lake"):
            Lake.open("s3://delta-lake/tasks", settings=settings, version=5)
        with Runtime(settings) as rt:
            done = run_job(rt, "s3://delta-lake/tasks")
        assert done.status == JobState.COMPLETED, (done.message, done.error)
        assert done.totalRecords == done.insertedRecords == 4000
        assert db.taskdetails.count_documents({}) == 4000


def test_a_delete_that_merges_versions_on_s3_is_traced(s3_delta: str, settings: Settings) -> None:
    """The files a DELETE removed are looked for and read on S3 as locally: the plan keeps
    the newest version of every key and warns of nothing."""
    from lakesync import repeats
    from lakesync.schema import RecordSchema

    with aws_test_env():
        options = {
            "AWS_ENDPOINT_URL": s3_delta, "AWS_ALLOW_HTTP": "true", "AWS_REGION": REGION,
            "AWS_S3_ALLOW_UNSAFE_RENAME": "true",
        }  # fmt: skip
        uri = "s3://delta-lake/updates"
        for v in range(3):
            rows = pa.table({"k": range(v * 10, v * 10 + 100), "v": [v] * 100})
            write_deltalake(uri, rows, mode="append", storage_options=options)
        DeltaTable(uri, storage_options=options).delete("k % 9 = 0")
        settings = settings.model_copy(update={
            "s3_endpoint_url": s3_delta, "s3_region": REGION, "lake_uri": uri,
        })  # fmt: skip
        lake = Lake.open(uri, settings=settings)
        assert [d.kind for d in lake.doubts if d] == ["rebuilt"]
        plan = repeats.plan_lake(lake, RecordSchema(key="k"))
        assert plan.warning() is None
        newest = {k: min(k // 10, 2) for k in range(120) if k % 9}
        assert _winners(lake, plan) == newest


def test_incremental_copies_read_only_the_files_added_since_the_last_copy(
    settings: Settings, db: Any, tmp_path: Path, records: pa.Table
) -> None:
    path = tmp_path / "tasks"
    write_deltalake(str(path), records.slice(0, FIRST), partition_by=["projectId"])  # version 0
    settings = settings.model_copy(update={"lake_uri": str(path)})
    with Runtime(settings) as rt:
        first = run_job(rt, str(path), mode="incremental")  # no watermark yet: everything
    assert first.status == JobState.COMPLETED, (first.message, first.error)
    assert first.insertedRecords == FIRST and "sinceDeltaVersion" not in first.options
    assert db.syncstate.find_one({"operation": "copy-taskdetail"})["deltaVersion"] == 0

    # version 1 adds newer records; then every file of version 0 is broken, so a copy that
    # still opened them (even only their footers) would fail
    old_files = list(path.rglob("*.parquet"))
    # newer by a minute, in steps of 250 µs: the highest values lie between two milliseconds
    added = records.slice(FIRST)
    latest = pc.max(records["updatedAt"]).as_py() + timedelta(minutes=1)
    newer = pa.array([latest + timedelta(microseconds=250 * i) for i in range(added.num_rows)],
                     type=pa.timestamp("us", tz="UTC"))  # fmt: skip
    added = added.set_column(added.schema.get_field_index("updatedAt"), "updatedAt", newer)
    write_deltalake(str(path), added, partition_by=["projectId"], mode="append")
    for f in old_files:
        f.write_bytes(b"not Parquet any more")
    with Runtime(settings) as rt:
        second = run_job(rt, str(path), mode="incremental")
        assert second.status == JobState.COMPLETED, (second.message, second.error)
        assert second.processedRecords == second.insertedRecords == APPENDED
        assert second.options["sinceDeltaVersion"] == 0 and second.options["deltaVersion"] == 1
        third = run_job(rt, str(path), mode="incremental")  # nothing added since version 1
        assert third.status == JobState.COMPLETED and third.processedRecords == 0
        assert third.options["sinceDeltaVersion"] == 1
        # the option is lakesync's own: a request may not set it
        with pytest.raises(RequestError, match="sinceDeltaVersion"):
            rt.jobs.start("copy-taskdetail", {"mode": "incremental", "sinceDeltaVersion": 0})
    assert db.taskdetails.count_documents({}) == FIRST + APPENDED


def test_incremental_reads_the_whole_table_when_the_recorded_version_cannot_be_listed(
    settings: Settings, db: Any, tmp_path: Path, records: pa.Table
) -> None:
    path = tmp_path / "tasks"
    write_versions(str(path), records)
    settings = settings.model_copy(update={"lake_uri": str(path)})
    with Runtime(settings) as rt:
        assert run_job(rt, str(path), mode="full").status == JobState.COMPLETED
    # a version the table does not have (it was recreated), like one whose log was cleaned up
    db.syncstate.update_one({"operation": "copy-taskdetail"}, {"$set": {"deltaVersion": 7}})
    with Runtime(settings) as rt:
        again = run_job(rt, str(path), mode="incremental")
    assert again.status == JobState.COMPLETED, (again.message, again.error)
    assert "sinceDeltaVersion" not in again.options
    # the whole table, filtered: only the record at the watermark, read again, unchanged
    assert again.processedRecords == again.unchangedRecords == 1


def test_a_delta_file_linked_from_outside_the_table_is_refused(
    tmp_path: Path, records: pa.Table
) -> None:
    path = tmp_path / "tasks"
    write_deltalake(str(path), records.slice(0, 100))
    (victim,) = path.glob("*.parquet")
    outside = tmp_path / "outside.parquet"
    victim.rename(outside)
    victim.symlink_to(outside)
    with pytest.raises(SourceError, match="does not follow links out of the lake"):
        Lake.open(str(path))


def test_a_resumed_incremental_run_reads_the_whole_table_once_the_old_log_is_gone(
    settings: Settings, db: Any, tmp_path: Path, records: pa.Table, caplog: Any
) -> None:
    path = tmp_path / "tasks"
    write_deltalake(str(path), records.slice(0, FIRST))  # version 0, one file
    (v0_file,) = (p.name for p in path.glob("*.parquet"))
    settings = settings.model_copy(update={"lake_uri": str(path), "batch_size": 100})
    with Runtime(settings) as rt:
        assert run_job(rt, str(path), mode="incremental").status == JobState.COMPLETED
    added = records.slice(FIRST)
    latest = pc.max(records["updatedAt"]).as_py() + timedelta(minutes=1)
    newer = pa.array([latest] * added.num_rows, type=pa.timestamp("us", tz="UTC"))
    added = added.set_column(added.schema.get_field_index("updatedAt"), "updatedAt", newer)
    write_deltalake(str(path), added.slice(0, 500), mode="append")  # version 1
    write_deltalake(str(path), added.slice(500), mode="append")  # version 2
    with Runtime(settings) as rt:
        job, _ = rt.jobs.start("copy-taskdetail", {"mode": "incremental"}, trusted=True)
        rt.runner.run(job.jobId, on_progress=lambda s: s.processedRecords and rt.runner.stop.set())
        paused = rt.store.get(job.jobId)
        assert paused.status == JobState.PENDING and 0 < paused.processedRecords < APPENDED
        assert paused.options["sinceDeltaVersion"] == 0
        # log retention removes the commits before a checkpoint: version 0 cannot be listed
        DeltaTable(str(path)).create_checkpoint()
        for commit in ("00000000000000000000.json", "00000000000000000001.json"):
            (path / "_delta_log" / commit).unlink()
        rt.runner.stop.clear()
        assert rt.runner.run(job.jobId) is Outcome.ENDED
        assert "since Delta version 0" in caplog.text and "reading the whole table" in caplog.text
        done = rt.store.get(job.jobId)
    assert done.status == JobState.COMPLETED, (done.message, done.error)
    assert done.insertedRecords == APPENDED  # nothing twice, none lost
    # The resumed run reads the whole table from the checkpoint's file (version 1's), which
    # keeps its place by name. In commit order version 0's file (holding the record at the
    # watermark) comes before it (files known only from the checkpoint are ordered by
    # modification time): the run skips it, copied whole by the copy that set the watermark.
    assert done.unchangedRecords == 0
    assert paused.checkpoint.file != v0_file
    assert done.processedRecords == APPENDED + done.unchangedRecords
    assert db.taskdetails.count_documents({}) == FIRST + APPENDED


def _appended_updates(path: Path, versions: int = 4, keys: int = 400) -> None:
    """Every version appends a new value of the same keys (updates written as appends)."""
    for v in range(versions):
        rows = pa.table({"k": pa.array(range(keys), pa.int64()), "v": [v] * keys})
        write_deltalake(str(path), rows, mode="append")


def _winners(lake: Lake, plan: Any) -> dict[int, int]:
    """What a copy keeps: each key's record that the plan does not skip (its ``v``)."""
    out = {}
    for batch in lake.batches(1000):
        keys, values = batch.table["k"].to_pylist(), batch.table["v"].to_pylist()
        for r in range(batch.table.num_rows):
            seg = batch.segment_of(r)
            skipped = plan.superseded.get(seg.file, np.empty(0, np.uint32))
            if seg.file_row(r) not in set(skipped.tolist()):
                assert keys[r] not in out, "a key kept twice"
                out[keys[r]] = values[r]
    return out


def test_a_delete_that_merges_versions_is_traced_to_the_rows_it_copied(tmp_path: Path) -> None:
    """A delta-rs DELETE rewrites the files of several versions into one file in its own
    row order, and OPTIMIZE then merges those: while the files they rewrote are still there,
    each row takes the place of the row it was copied from (a whole-row hash found among
    their rows), so the plan keeps the newest version of every key and warns of nothing."""
    from lakesync import repeats
    from lakesync.schema import RecordSchema

    path = tmp_path / "updates"
    newest = {}
    for v in range(5):  # each version a newer value of a different part of the keys
        keys = [k for k in range(600) if v == 0 or (k * 7 + v) % 3 != 0]
        write_deltalake(str(path), pa.table({"k": keys, "v": [v] * len(keys)}), mode="append")
        newest |= dict.fromkeys(keys, v)
    DeltaTable(str(path)).delete("k % 97 = 0")
    newest = {k: v for k, v in newest.items() if k % 97}
    for compact in (False, True):
        if compact:
            DeltaTable(str(path)).optimize.compact()
        lake = Lake.open(str(path))
        assert [d.kind for d in lake.doubts if d] == ["rebuilt"]
        plan = repeats.plan_lake(lake, RecordSchema(key="k"))
        assert plan.warning() is None and plan.doubted == 0
        assert _winners(lake, plan) == newest


def test_a_traced_rewrite_is_stored_as_planned(tmp_path: Path, db: Any) -> None:
    """A job's plan is stored file by file as its buckets are settled (boundary.plan_job,
    its rows read back per file): for a DELETE traced row by row, the rows stored are the
    ones the plan finds by the rewrite's order, and a copy skipping them keeps every key's
    newest version."""
    from types import SimpleNamespace

    from lakesync import boundary, repeats
    from lakesync.schema import RecordSchema

    path = tmp_path / "updates"
    _appended_updates(path)
    DeltaTable(str(path)).delete("k % 97 = 0")
    lake = Lake.open(str(path))
    assert [d.kind for d in lake.doubts if d] == ["rebuilt"]
    held = repeats.plan_lake(lake, RecordSchema(key="k")).superseded
    count = boundary.plan_job(db, "job_traced", lake, RecordSchema(key="k"), spill=tmp_path)
    assert count == sum(len(r) for r in held.values()) > 0
    plan = boundary.load_superseded(db, "job_traced")
    stored = {f: plan.within(f, 0, 2**32).astype(np.uint32) for f in lake.files}
    stored = {f: rows for f, rows in stored.items() if len(rows)}
    assert {f: r.tolist() for f, r in stored.items()} == {f: r.tolist() for f, r in held.items()}
    newest = {k: 3 for k in range(400) if k % 97}
    assert _winners(lake, SimpleNamespace(superseded=stored)) == newest


def test_a_rewrite_after_a_new_column_is_traced(tmp_path: Path) -> None:
    """Files written before a column was added lack it; the DELETE writes it as null for
    their rows: those rows are still found where they came from (a missing column hashes
    as null), partitioned or not."""
    from lakesync import repeats
    from lakesync.schema import RecordSchema

    for partitioned in (False, True):
        path = tmp_path / f"evolved-{partitioned}"
        by = {"partition_by": ["p"]} if partitioned else {}
        newest = {}
        for v in range(4):
            keys = [k for k in range(300) if v == 0 or (k + v) % 2]
            rows = pa.table({"k": keys, "v": [v] * len(keys), "p": [k % 2 for k in keys]})
            if v >= 2:
                rows = rows.append_column("note", pa.array([f"n{v}"] * len(keys)))
            write_deltalake(str(path), rows, mode="append", schema_mode="merge", **by)
            newest |= dict.fromkeys(keys, v)
        DeltaTable(str(path)).delete("k % 11 = 0")
        newest = {k: v for k, v in newest.items() if k % 11}
        lake = Lake.open(str(path))
        assert {d.kind for d in lake.doubts if d} == {"rebuilt"}
        plan = repeats.plan_lake(lake, RecordSchema(key="k"))
        assert plan.warning() is None and _winners(lake, plan) == newest


def test_a_compaction_of_a_file_with_a_deletion_vector_is_traced(tmp_path: Path) -> None:
    """Spark's table whose file has a deletion vector, two appends of newer versions of
    some of its keys, then delta-rs OPTIMIZE: the rewrite read the file's live rows as of
    the version it read (its deletion vector then), and each row of the compacted file is
    traced to its source: every key ends at its newest version, with no warning."""
    import shutil

    from tests.test_types import _fixtures

    from lakesync import repeats
    from lakesync.schema import RecordSchema

    path = tmp_path / "spark"
    shutil.copytree(_fixtures() / "table_with_deletion_logs", path)
    query = "select * from t order by id"
    live = pa.table(QueryBuilder().register("t", DeltaTable(str(path))).execute(query).read_all())
    newest = dict(zip(live["id"].to_pylist(), live["name"].to_pylist(), strict=True))
    schema = pa.schema(DeltaTable(str(path)).schema().to_arrow())
    at = live.schema.get_field_index("name")
    for v in range(2):
        part = live.slice(v * 30, 40)
        part = part.set_column(at, "name", pa.array([f"v{v}"] * part.num_rows, pa.string()))
        write_deltalake(str(path), part.cast(schema), mode="append")
        newest |= dict.fromkeys(part["id"].to_pylist(), f"v{v}")
    DeltaTable(str(path)).optimize.compact()
    lake = Lake.open(str(path))
    assert [d.kind for d in lake.doubts if d] == ["rebuilt"]
    plan = repeats.plan_lake(lake, RecordSchema(key="id"))
    assert plan.warning() is None
    kept = {}
    for batch in lake.batches(1000):
        keys, names = batch.table["id"].to_pylist(), batch.table["name"].to_pylist()
        for r, (key, name) in enumerate(zip(keys, names, strict=True)):
            seg = batch.segment_of(r)
            if seg.file_row(r) not in plan.superseded.get(seg.file, np.empty(0)).tolist():
                kept[key] = name
    assert kept == newest


def test_a_rewrite_whose_rows_are_not_found_stays_in_doubt(tmp_path: Path) -> None:
    """A file the DELETE read was replaced since by other rows (it is there, so the table
    looks traceable when opened): the plan finds a row of the rewrite nowhere, keeps the
    file in doubt and warns, as without tracing."""
    from lakesync import repeats
    from lakesync.schema import RecordSchema

    path = tmp_path / "updates"
    _appended_updates(path)
    before = {str(p) for p in path.glob("*.parquet")}
    DeltaTable(str(path)).delete("k % 97 = 0")
    lake = Lake.open(str(path))
    assert [d.kind for d in lake.doubts if d] == ["rebuilt"]
    removed = sorted(before - {f.removeprefix("file://") for f in lake.files})
    pq.write_table(pa.table({"k": [1, 2], "v": [9, 9]}), removed[0])
    plan = repeats.plan_lake(lake, RecordSchema(key="k"))
    warning = plan.warning()
    assert plan.doubted > 0 and warning is not None
    assert "merged rewrite of versions 0..3)" in warning


def test_an_update_or_vanished_files_leave_a_merged_rewrite_in_doubt(tmp_path: Path) -> None:
    """An UPDATE changes the rows it rewrites (they cannot be found where they came from),
    and vacuum removes the files a DELETE read: the doubt stays."""
    updated = tmp_path / "updated"
    _appended_updates(updated)
    DeltaTable(str(updated)).update(predicate="k % 97 = 0", updates={"v": "v + 10"})
    assert [d.kind for d in Lake.open(str(updated)).doubts if d] == ["merged"]
    deleted = tmp_path / "deleted"
    _appended_updates(deleted)
    DeltaTable(str(deleted)).delete("k % 97 = 0")
    assert [d.kind for d in Lake.open(str(deleted)).doubts if d] == ["rebuilt"]
    DeltaTable(str(deleted)).vacuum(
        retention_hours=0, enforce_retention_duration=False, dry_run=False
    )
    assert [d.kind for d in Lake.open(str(deleted)).doubts if d] == ["merged"]


def test_a_delete_that_merges_versions_into_one_file_is_said_not_silent(
    tmp_path: Path, db: Any
) -> None:
    """A delta-rs DELETE rewrites the files of several versions into one file in its own
    row order; once vacuum has removed the files it read, which record of a key is newest
    cannot be told any more. The plan counts the keys so left in doubt (here: every key the
    files still hold twice or more in one file), and the job keeps a warning saying so and
    what to do."""
    from lakesync import boundary, repeats
    from lakesync.schema import RecordSchema

    path = tmp_path / "updates"
    _appended_updates(path)
    DeltaTable(str(path)).delete("k % 97 = 0")
    DeltaTable(str(path)).vacuum(retention_hours=0, enforce_retention_duration=False, dry_run=False)
    lake = Lake.open(str(path))
    merged = [d for d in lake.doubts if d is not None]
    assert merged and all(d.kind == "merged" for d in merged)
    assert "merged rewrite of versions 0..3" in {d.why for d in merged}
    # the keys held more than once whose last record is in a merged file: what is flagged
    where: dict[int, int] = {}
    held: Counter[int] = Counter()
    for i, file in enumerate(lake.files):
        for k in pq.read_table(file.removeprefix("file://"), columns=["k"])["k"].to_pylist():
            where[k], held[k] = i, held[k] + 1
    expected = sum(1 for k, n in held.items() if n > 1 and lake.doubts[where[k]] is not None)
    assert expected > 0
    plan = repeats.plan_lake(lake, RecordSchema(key="k"))
    assert plan.doubted == expected and plan.example is not None
    warning = plan.warning()
    assert warning is not None and f"for {expected:,} keys" in warning
    assert "merged rewrite of versions" in warning
    # what helps: copying first, or a table that can tell (one row per key, or versions
    # appended in order); not an incremental copy, which reads the rows in the same order
    assert "before compacting it" in warning and "keep one row per key" in warning, warning
    assert "appends in the order of a column that orders" in warning, warning
    assert "watermark" not in warning and "incrementally" not in warning, warning
    boundary.plan_job(db, "job_doubt", lake, RecordSchema(key="k"))
    assert boundary.order_warning(db, "job_doubt") == warning


def test_tables_whose_order_is_known_give_no_warning(tmp_path: Path) -> None:
    """No false alarm: appended updates never rewritten, a table of unique keys rewritten by
    a DELETE, and a MERGE-upsert table (one row per key) rewritten by a DELETE."""
    from lakesync import repeats
    from lakesync.schema import RecordSchema

    schema = RecordSchema(key="k")
    plain = tmp_path / "plain"
    _appended_updates(plain)
    assert repeats.plan_lake(Lake.open(str(plain)), schema).warning() is None
    unique = tmp_path / "unique"
    for v in range(4):
        write_deltalake(str(unique), pa.table({"k": range(v * 100, v * 100 + 100)}), mode="append")
    DeltaTable(str(unique)).delete("k % 7 = 0")
    assert repeats.plan_lake(Lake.open(str(unique)), schema).warning() is None
    upserted = tmp_path / "upserted"
    write_deltalake(str(upserted), pa.table({"k": range(300), "v": [0] * 300}))
    for v in range(1, 4):
        source = pa.table({"k": range(v * 50, v * 50 + 300), "v": [v] * 300})
        (
            DeltaTable(str(upserted))
            .merge(source, "t.k = s.k", source_alias="s", target_alias="t")
            .when_matched_update_all()
            .when_not_matched_insert_all()
            .execute()
        )
    DeltaTable(str(upserted)).delete("k % 7 = 0")
    plan = repeats.plan_lake(Lake.open(str(upserted)), schema)
    assert plan.warning() is None and plan.doubted == 0


def test_a_copy_of_a_merged_rewrite_completes_and_says_so(
    settings: Settings, db: Any, tmp_path: Path, records: pa.Table
) -> None:
    """The job itself, once vacuum removed the files the DELETE read: it completes, every
    key copied once, and its final message (and its log) warns of the keys whose newest
    record the table cannot tell, with what to do."""
    path = tmp_path / "tasks"
    plain = records.set_column(
        records.schema.get_field_index("projectId"),
        "projectId",
        records["projectId"].cast(pa.string()),
    )
    at = plain.schema.get_field_index("hoursLogged")
    some = plain.slice(0, 500)
    for v in range(3):  # updates appended: hoursLogged is the version that wrote it
        hours = pa.array([float(v)] * some.num_rows)
        write_deltalake(str(path), some.set_column(at, "hoursLogged", hours), mode="append")
    DeltaTable(str(path)).delete("taskDetailId LIKE '%7'")
    DeltaTable(str(path)).vacuum(retention_hours=0, enforce_retention_duration=False, dry_run=False)
    settings = settings.model_copy(update={"lake_uri": str(path), "batch_size": 200})
    with Runtime(settings) as rt:
        done = run_job(rt, str(path))
    assert done.status == JobState.COMPLETED, (done.message, done.error)
    kept = [k for k in some["taskDetailId"].to_pylist() if not k.endswith("7")]
    assert done.duplicateRecords == 2 * len(kept)
    assert db.taskdetails.count_documents({}) == len(kept)
    assert "Warning: for " in done.message and "merged rewrite of versions" in done.message
    assert "keep one row per key" in done.message and "watermark" not in done.message


def test_keys_across_files_whose_commits_were_cleaned_up_are_said(tmp_path: Path) -> None:
    """A DELETE rewrote an old file after a newer version of one of its keys was appended;
    then the log was cleaned up after a checkpoint: both files are placed by modification
    time, the rewrite's old row wins, and the plan counts that key as in doubt."""
    from lakesync import repeats
    from lakesync.schema import RecordSchema

    path = tmp_path / "cleaned"
    write_deltalake(str(path), pa.table({"id": [0, 1], "v": ["old", "old"]}))
    write_deltalake(str(path), pa.table({"id": [0], "v": ["new"]}), mode="append")
    DeltaTable(str(path)).delete("id = 1")
    schema = RecordSchema(key="id")
    assert repeats.plan_lake(Lake.open(str(path)), schema).warning() is None
    DeltaTable(str(path)).create_checkpoint()
    for v in range(3):
        (path / "_delta_log" / f"{v:020d}.json").unlink()
    lake = Lake.open(str(path))
    assert {d.kind for d in lake.doubts if d} == {"missing"}
    plan = repeats.plan_lake(lake, schema)
    assert plan.doubted == 1 and plan.example is not None and plan.example[0] == "0"
    assert "history missing" in (plan.warning() or "")


def test_a_copy_of_a_delete_that_merged_versions_writes_the_newest_of_every_key(
    settings: Settings, db: Any, tmp_path: Path
) -> None:
    """The plan's traced order, not a key's last row in the batch, picks the winner: delta-rs
    writes a merged file's newest rows first, so the batch's last row of a key is one the
    plan superseded (the copy once wrote nothing: 0 inserted, 245 duplicates)."""
    path = tmp_path / "appends"
    for v in range(1, 6):
        write_deltalake(
            path, pa.table({"k": [f"K{i}" for i in range(50)], "v": [v] * 50}), mode="append"
        )
    DeltaTable(path).delete("k = 'K7'")
    toml = tmp_path / "lakesync.toml"
    toml.write_text(
        f'[operations.appends]\nsource = "{path}"\nformat = "delta"\n'
        'collection = "appends"\nkey = "k"\n'
    )
    settings = settings.model_copy(update={"operations_file": toml})
    with Runtime(settings) as rt:
        status, _ = rt.jobs.start("appends", {}, trusted=True)
        rt.runner.run(status.jobId)
        final = rt.jobs.get(status.jobId)
    assert (final.insertedRecords, final.duplicateRecords) == (49, 196), final.message
    assert {d["_id"]: d["v"] for d in db["appends"].find()} == {
        f"K{i}": 5 for i in range(50) if i != 7
    }
