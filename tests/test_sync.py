"""Sync modes against the embedded server: incremental copies by watermark, mirror deletes."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from lakesync import metrics, mirror
from lakesync.api.errors import status_of
from lakesync.boundary import WatermarkStore
from lakesync.config import Settings
from lakesync.demo import FILE_SCHEMA, append_records, generate, touch_records
from lakesync.errors import RequestError
from lakesync.models import JobState, JobStatus, Outcome
from lakesync.runtime import Runtime

VALID = 4975


@pytest.fixture
def lake(demo_lake: Path, tmp_path: Path) -> Path:
    """A writable copy of the 5,000-record demo lake (25 bad records)."""
    return Path(shutil.copytree(demo_lake, tmp_path / "lake"))


@pytest.fixture
def clean_lake(tmp_path: Path) -> Path:
    """3,000 valid records in several files, for mirror."""
    out = tmp_path / "clean"
    generate(out, 3000, seed=11)
    return out


def run(rt: Runtime, options: dict[str, Any] | None = None, **kw: Any) -> JobStatus:
    status, created = rt.jobs.start("copy-taskdetail", options or {})
    assert created
    rt.runner.run(status.jobId, **kw)
    return rt.jobs.get(status.jobId)


def assert_exact(s: JobStatus, total: int) -> None:
    assert s.status == JobState.COMPLETED, (s.message, s.error)
    assert s.totalRecords == s.processedRecords == total
    assert s.insertedRecords + s.updatedRecords + s.unchangedRecords + s.errorRecords == total


def lake_max_ms(lake: Path) -> int:
    tops = [pc.max(pq.read_table(f, columns=["updatedAt"])["updatedAt"]) for f in
            sorted(lake.rglob("*.parquet"))]  # fmt: skip
    return max(int(t.value) for t in tops if t.is_valid)


def rows_at(lake: Path, millis: int) -> int:
    """Records whose updatedAt is exactly ``millis``: an incremental copy reads them again."""
    at = pa.scalar(millis, type=pa.timestamp("ms", tz="UTC"))
    return sum(
        int(pc.sum(pc.equal(pq.read_table(f, columns=["updatedAt"])["updatedAt"], at)).as_py() or 0)
        for f in lake.rglob("*.parquet")
    )


def watermark_of(db: Any, source: Path, op: str = "copy-taskdetail") -> Any:
    return WatermarkStore(db).get(op, str(source), "updatedAt")


def test_incremental_reads_only_changed_and_new_records(
    settings: Settings, db: Any, lake: Path
) -> None:
    settings = settings.model_copy(update={"lake_uri": str(lake)})
    with Runtime(settings) as rt:
        full = run(rt)
        assert_exact(full, 5000)
        first = watermark_of(db, lake)
        assert first is not None and first.value == lake_max_ms(lake)
        # stored as numbers and text inside a nested document, and read back as written
        raw = db.syncstate.find_one({"operation": "copy-taskdetail"})
        assert raw["watermark"]["value"] == first.value and raw["watermark"]["iso"].endswith("Z")
        assert raw["source"] == str(lake) and raw["jobId"] == full.jobId

        at_first = rows_at(lake, first.value)  # read again: the watermark's value is included
        assert at_first >= 1
        touched = touch_records(lake, 100)
        added = append_records(lake, 50, start_id=900_000)
        inc = run(rt, {"mode": "incremental"})
        assert_exact(inc, 150 + at_first)
        assert (inc.updatedRecords, inc.insertedRecords) == (100, 50)
        assert (inc.unchangedRecords, inc.errorRecords) == (at_first, 0)
        assert inc.options["mode"] == "incremental"
        assert inc.checkpoint is not None and inc.checkpoint.since == first
        assert inc.checkpoint.until is not None and inc.checkpoint.until.value > first.value
        assert "changed since" in (inc.message or "")
        second = watermark_of(db, lake)
        assert second is not None and second.value == lake_max_ms(lake) > first.value
        ids = touched + added
        assert db.taskdetails.count_documents({"_id": {"$in": ids}, "_lakesync.job": inc.jobId})
        assert db.taskdetails.count_documents({}) == VALID + 50

        again = run(rt, {"mode": "incremental"})  # nothing changed: the 50 at the mark are
        assert_exact(again, 50)  # read again, and come out unchanged without a write
        assert again.unchangedRecords == 50
        assert (
            db.taskdetails.count_documents({"_id": {"$in": added}, "_lakesync.job": inc.jobId})
            == 50
        )
        assert watermark_of(db, lake) == second
        # the next job's commits land on its own document, not on this one
        # (nx-27017 once applied a first commit to another job's: see JobStore.commit)
        touch_records(lake, 5, seed=9)
        last = run(rt, {"mode": "incremental"})
        assert_exact(last, 55)
        assert (last.updatedRecords, last.unchangedRecords) == (5, 50)
        assert rt.jobs.get(again.jobId).processedRecords == 50


def test_first_incremental_run_is_a_full_copy(settings: Settings, db: Any) -> None:
    with Runtime(settings) as rt:
        s = run(rt, {"mode": "incremental"})
    assert_exact(s, 5000)
    assert s.insertedRecords == VALID and s.checkpoint is not None and s.checkpoint.since is None
    assert watermark_of(db, Path(str(settings.lake_uri))) is not None


def test_failed_incremental_run_does_not_move_the_watermark(
    settings: Settings, db: Any, lake: Path
) -> None:
    settings = settings.model_copy(update={"lake_uri": str(lake), "batch_size": 20})
    with Runtime(settings) as rt:
        run(rt)
        before = watermark_of(db, lake)
        touch_records(lake, 100)

        def explode(s: JobStatus) -> None:
            if s.processedRecords >= 40:
                raise RuntimeError("disk on fire")

        failed = run(rt, {"mode": "incremental"}, on_progress=explode)
        assert failed.status == JobState.FAILED and "disk on fire" in (failed.error or "")
        assert failed.processedRecords >= 40
        assert watermark_of(db, lake) == before  # committed batches did not move it
        retry = run(rt, {"mode": "incremental"})  # reads the same changes again
        assert_exact(retry, 100 + rows_at(lake, before.value))
        assert watermark_of(db, lake).value == lake_max_ms(lake)  # type: ignore[union-attr]


def test_resumed_incremental_run_reads_what_its_first_run_pinned(
    settings: Settings, db: Any, lake: Path
) -> None:
    settings = settings.model_copy(update={"lake_uri": str(lake), "batch_size": 30})
    with Runtime(settings) as rt:
        run(rt)
        touch_records(lake, 100)
        append_records(lake, 50, start_id=900_000)
        status, _ = rt.jobs.start("copy-taskdetail", {"mode": "incremental"})

        def die_after_two_batches(s: JobStatus) -> None:
            if s.processedRecords >= 60:
                raise SystemExit("simulated crash")  # not caught by the runner

        with pytest.raises(SystemExit):
            rt.runner.run(status.jobId, on_progress=die_after_two_batches)
        crashed = rt.jobs.get(status.jobId)
        assert crashed.status == JobState.IN_PROGRESS and crashed.checkpoint is not None
        pinned = crashed.checkpoint.until
        assert pinned is not None and pinned.value == lake_max_ms(lake)
        # written while the job runs, newer than what it pinned: left for the next copy
        later_keys = append_records(lake, 10, start_id=950_000)
        time.sleep(settings.lease_seconds + 0.5)
        assert rt.runner.run(status.jobId) is Outcome.ENDED
        done = rt.jobs.get(status.jobId)
        assert_exact(done, 150 + rows_at(lake, crashed.checkpoint.since.value))  # type: ignore[union-attr]
        assert done.attempt == 2 and (done.updatedRecords, done.insertedRecords) == (100, 50)
        assert watermark_of(db, lake) == pinned
        assert db.taskdetails.count_documents({"_id": {"$in": later_keys}}) == 0
        following = run(rt, {"mode": "incremental"})
    assert_exact(following, 10 + 50)  # and the 50 appended at the watermark, unchanged
    assert (following.insertedRecords, following.unchangedRecords) == (10, 50)


def test_incremental_needs_a_usable_watermark_column(
    settings: Settings, tmp_path: Path, db: Any
) -> None:
    lake = tmp_path / "textual"
    (lake / "projectId=PRJ-001").mkdir(parents=True)
    table = pq.read_table(next(Path(str(settings.lake_uri)).rglob("part-0.parquet")))
    text = pc.cast(table["updatedAt"], pa.string())  # ISO text: not comparable as a watermark
    pq.write_table(table.set_column(8, "updatedAt", text), lake / "projectId=PRJ-001/p.parquet")
    settings = settings.model_copy(update={"lake_uri": str(lake)})
    with Runtime(settings) as rt:
        s = run(rt, {"mode": "incremental"})
        assert s.status == JobState.FAILED
        assert "watermark column 'updatedAt'" in (s.error or "")
        assert "timestamp, date or integer" in (s.error or "")
        assert db.taskdetails.count_documents({}) == 0  # refused before writing anything
        with pytest.raises(RequestError) as info:
            rt.jobs.start("copy-taskdetail", {"allowEmpty": True})
        assert status_of(info.value) == 400 and "mirror" in str(info.value)


def test_watermark_survives_as_numbers_on_the_embedded_server(db: Any) -> None:
    from lakesync.watermarks import from_millis

    store = WatermarkStore(db)
    mark = from_millis("updatedAt", 1_717_171_717_171)
    store.save("op", "/lake", mark, "job_x", "full")
    assert store.get("op", "/lake", "updatedAt") == mark
    assert store.get("op", "/lake", "changedAt") is None  # another column: start over
    assert store.get("op", "/other", "updatedAt") is None
    assert mark.iso == "2024-05-31T16:08:37.171Z"
    assert [s.source for s in store.for_operation("op")] == ["/lake"]


# -- mirror ------------------------------------------------------------------------------


def file_keys(path: Path) -> list[str]:
    return list(pq.read_table(path, columns=["taskDetailId"])["taskDetailId"].to_pylist())


def test_mirror_deletes_exactly_the_records_gone_from_the_lake(
    settings: Settings, db: Any, clean_lake: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(mirror, "PAGE", 200)  # several delete steps
    settings = settings.model_copy(update={"lake_uri": str(clean_lake), "batch_size": 500})
    with Runtime(settings) as rt:
        assert_exact(run(rt), 3000)
        db.taskdetails.insert_one({"_id": 42, "note": "not a lake key type: left alone"})
        files = sorted(clean_lake.rglob("*.parquet"), key=lambda f: -f.stat().st_size)
        removed = file_keys(files[0]) + file_keys(files[1])
        for f in files[:2]:
            f.unlink()
        kept = 3000 - len(removed)

        def deleted_metric() -> float:
            value = metrics.REGISTRY.get_sample_value("lakesync_records_total", {"kind": "deleted"})
            return value or 0.0

        before = deleted_metric()
        s = run(rt, {"mode": "mirror"})
        assert_exact(s, kept)
        assert s.unchangedRecords == kept and s.deletedRecords == len(removed)
        assert deleted_metric() - before == len(removed)  # lakesync_records_total
        assert f"{len(removed):,} deleted" in (s.message or "")
        assert db.taskdetails.count_documents({"_id": {"$in": removed}}) == 0
        assert db.taskdetails.count_documents({}) == kept + 1
        assert not [n for n in db.list_collection_names() if n.startswith("mirrorseen_")]

        again = run(rt, {"mode": "mirror"})
        assert_exact(again, kept)
        assert again.deletedRecords == 0


def test_mirror_counts_deletions_exactly_across_a_crash(
    settings: Settings, db: Any, clean_lake: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(mirror, "PAGE", 100)
    settings = settings.model_copy(update={"lake_uri": str(clean_lake)})
    with Runtime(settings) as rt:
        run(rt)
        gone = sorted(clean_lake.rglob("*.parquet"), key=lambda f: -f.stat().st_size)[0]
        removed = file_keys(gone)
        gone.unlink()
        status, _ = rt.jobs.start("copy-taskdetail", {"mode": "mirror"})

        def die_mid_delete(s: JobStatus) -> None:
            if s.deletedRecords > 0:
                raise SystemExit("simulated crash")

        with pytest.raises(SystemExit):
            rt.runner.run(status.jobId, on_progress=die_mid_delete)
        assert f"mirrorseen_{status.jobId}" in db.list_collection_names()  # survives the crash
        time.sleep(settings.lease_seconds + 0.5)
        assert rt.runner.run(status.jobId) is Outcome.ENDED
        done = rt.jobs.get(status.jobId)
    assert_exact(done, 3000 - len(removed))
    assert done.deletedRecords == len(removed)
    assert db.taskdetails.count_documents({}) == 3000 - len(removed)


def test_failed_mirror_job_keeps_its_keys_and_resumes_exactly(
    settings: Settings, db: Any, clean_lake: Path
) -> None:
    settings = settings.model_copy(update={"lake_uri": str(clean_lake), "batch_size": 500})
    with Runtime(settings) as rt:
        run(rt)
        gone = sorted(clean_lake.rglob("*.parquet"), key=lambda f: -f.stat().st_size)[0]
        removed = file_keys(gone)
        gone.unlink()

        def explode(s: JobStatus) -> None:
            if s.processedRecords >= 1000:
                raise RuntimeError("lake hiccup")

        failed = run(rt, {"mode": "mirror"}, on_progress=explode)
        assert failed.status == JobState.FAILED and failed.deletedRecords == 0
        assert f"mirrorseen_{failed.jobId}" in db.list_collection_names()  # kept for a resume
        rt.jobs.resume(failed.jobId)
        assert rt.runner.run(failed.jobId) is Outcome.ENDED
        done = rt.jobs.get(failed.jobId)
    assert_exact(done, 3000 - len(removed))
    assert done.deletedRecords == len(removed)  # the keys read before the failure were kept
    assert db.taskdetails.count_documents({}) == 3000 - len(removed)


def test_mirror_refuses_when_its_keys_were_lost(
    settings: Settings, db: Any, clean_lake: Path
) -> None:
    settings = settings.model_copy(update={"lake_uri": str(clean_lake), "batch_size": 500})
    with Runtime(settings) as rt:
        run(rt)
        status, _ = rt.jobs.start("copy-taskdetail", {"mode": "mirror"})

        def crash(s: JobStatus) -> None:
            if s.processedRecords >= 1000:
                raise SystemExit("simulated crash")

        with pytest.raises(SystemExit):
            rt.runner.run(status.jobId, on_progress=crash)
        db.drop_collection(f"mirrorseen_{status.jobId}")  # e.g. dropped by hand
        time.sleep(settings.lease_seconds + 0.5)
        rt.runner.run(status.jobId)
        done = rt.jobs.get(status.jobId)
    assert done.status == JobState.FAILED and "were lost" in (done.error or "")
    assert db.taskdetails.count_documents({}) == 3000


def test_mirror_refuses_to_delete_after_rejected_records(
    settings: Settings, db: Any, lake: Path
) -> None:
    settings = settings.model_copy(update={"lake_uri": str(lake)})
    with Runtime(settings) as rt:
        run(rt)
        gone = next(lake.rglob("part-0.parquet"))
        gone.unlink()
        s = run(rt, {"mode": "mirror"})
    assert s.status == JobState.FAILED and s.errorRecords == 25
    assert "Mirror deletions refused" in (s.error or "") and "25 records" in (s.error or "")
    assert "nothing deleted" in (s.message or "") and s.deletedRecords == 0
    assert db.taskdetails.count_documents({}) == VALID  # the removed file's records stay
    assert not [n for n in db.list_collection_names() if n.startswith("mirrorseen_")]


def test_mirror_of_an_unreadable_lake_deletes_nothing(
    settings: Settings, db: Any, clean_lake: Path
) -> None:
    settings = settings.model_copy(update={"lake_uri": str(clean_lake)})
    with Runtime(settings) as rt:
        run(rt)
        broken = sorted(clean_lake.rglob("*.parquet"))[-1]
        broken.write_bytes(b"PAR1 this is not a parquet file")
        s = run(rt, {"mode": "mirror"})
    assert s.status == JobState.FAILED and s.deletedRecords == 0
    assert broken.name in (s.error or "")
    assert db.taskdetails.count_documents({}) == 3000


def test_mirror_of_an_empty_lake_needs_allow_empty(
    settings: Settings, db: Any, clean_lake: Path, tmp_path: Path
) -> None:
    with Runtime(settings.model_copy(update={"lake_uri": str(clean_lake)})) as rt:
        run(rt)
    empty = tmp_path / "empty"
    (empty / "projectId=PRJ-001").mkdir(parents=True)  # files, but no records
    pq.write_table(FILE_SCHEMA.empty_table(), empty / "projectId=PRJ-001" / "part-0.parquet")
    with Runtime(settings.model_copy(update={"lake_uri": str(empty)})) as rt:
        refused = run(rt, {"mode": "mirror"})
        assert refused.status == JobState.FAILED
        assert "allowEmpty" in (refused.error or "") and "taskdetails" in (refused.error or "")
        assert db.taskdetails.count_documents({}) == 3000
        emptied = run(rt, {"mode": "mirror", "allowEmpty": True})
    assert_exact(emptied, 0)
    assert emptied.deletedRecords == 3000
    assert db.taskdetails.count_documents({}) == 0


def test_a_dry_run_counts_as_a_copy_would_and_writes_nothing(
    settings: Settings, db: Any, lake: Path
) -> None:
    """Dry runs before the first copy, after it and after records changed: the counts a copy
    would make against the collection as it is, no document written, no watermark moved."""
    settings = settings.model_copy(update={"lake_uri": str(lake), "batch_size": 700})
    with Runtime(settings) as rt:
        dry = run(rt, {"mode": "dry-run"})
        assert_exact(dry, VALID + 25)
        assert (dry.insertedRecords, dry.updatedRecords, dry.errorRecords) == (VALID, 0, 25)
        assert dry.message.startswith("Dry run, nothing written"), dry.message
        assert dry.options["mode"] == "dry-run"
        assert db.taskdetails.count_documents({}) == 0
        assert watermark_of(db, lake) is None
        assert db.copyerrors.count_documents({"jobId": dry.jobId}) == 25  # the rejections
        copied = run(rt)
        assert (copied.insertedRecords, copied.errorRecords) == (VALID, 25)
        mark = watermark_of(db, lake)
        before = list(db.taskdetails.find({}, sort=[("_id", 1)]))
        touched = touch_records(lake, 10)
        again = run(rt, {"mode": "dry-run"})
        assert_exact(again, VALID + 25)
        assert (again.insertedRecords, again.updatedRecords, again.unchangedRecords) == (
            0,
            10,
            VALID - 10,
        )
        assert list(db.taskdetails.find({}, sort=[("_id", 1)])) == before
        assert watermark_of(db, lake) == mark
        assert all(not d["notes"] or not d["notes"].startswith("Revised") for d in
                   db.taskdetails.find({"_id": {"$in": touched}}))  # fmt: skip
