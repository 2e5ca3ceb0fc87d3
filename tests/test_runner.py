"""The job body and the local executor against the embedded server: limits, cancel, leases."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from tests.helpers import wait_for

from lakesync.api.errors import status_of
from lakesync.config import Settings
from lakesync.demo import generate
from lakesync.errors import IdempotencyConflict, JobError
from lakesync.models import JobState, Outcome
from lakesync.runtime import Runtime

VALID = 4975


def finished(rt: Runtime, job_id: str) -> Any:
    s = rt.jobs.get(job_id)
    return s if s.state.is_final else None


def assert_exact(s: Any, total: int = 5000) -> None:
    assert s.status == JobState.COMPLETED, (s.message, s.error)
    assert s.totalRecords == s.processedRecords == total
    assert s.insertedRecords + s.updatedRecords + s.unchangedRecords + s.errorRecords == total


def test_time_limit_continues_in_new_runs_with_exact_counts(
    slow_settings: Settings, db: Any
) -> None:
    # through the slow link: the copy outlasts three time limits on any machine
    settings = slow_settings.model_copy(update={"job_time_limit": 0.3, "batch_size": 200})
    with Runtime(settings, executor="local") as rt:
        rt.start()
        status, created = rt.jobs.start("copy-taskdetail")
        assert created
        done = wait_for(lambda: finished(rt, status.jobId), timeout=120)
    assert_exact(done)
    assert done.insertedRecords == VALID and done.errorRecords == 25
    assert done.attempt >= 3  # several runs
    assert db.taskdetails.count_documents({}) == VALID


def test_cancel_stops_after_current_batch_and_is_idempotent(
    settings: Settings, db: Any, tmp_path: Path
) -> None:
    lake = tmp_path / "big"
    generate(lake, 30000, seed=3)
    settings = settings.model_copy(update={"lake_uri": str(lake), "batch_size": 100})
    with Runtime(settings, executor="local") as rt:
        rt.start()
        status, _ = rt.jobs.start("copy-taskdetail")
        wait_for(lambda: rt.jobs.get(status.jobId).processedRecords > 0, timeout=60)
        rt.jobs.cancel(status.jobId)
        rt.jobs.cancel(status.jobId)  # twice is harmless
        done = wait_for(lambda: finished(rt, status.jobId), timeout=60)
        assert done.status == JobState.CANCELLED
        assert "Cancelled after" in (done.message or "")
        assert done.processedRecords < 30000
        assert db.taskdetails.count_documents({}) == done.insertedRecords
        assert rt.jobs.cancel(status.jobId).status == JobState.CANCELLED  # still harmless
        new, created = rt.jobs.start("copy-taskdetail")  # the flight slot was freed
        assert created and new.jobId != status.jobId


def test_cancel_of_finished_job_is_a_conflict(settings: Settings) -> None:
    with Runtime(settings) as rt:
        status, _ = rt.jobs.start("copy-taskdetail")
        assert rt.runner.run(status.jobId) is Outcome.ENDED
        with pytest.raises(JobError) as info:
            rt.jobs.cancel(status.jobId)
        assert status_of(info.value) == 409 and "completed" in str(info.value)


def test_single_flight_returns_the_running_job(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lake = Path(str(settings.lake_uri))
    link = tmp_path / "link-to-lake"
    link.symlink_to(lake, target_is_directory=True)
    monkeypatch.chdir(lake.parent)
    with Runtime(settings) as rt:  # no executor: the job stays pending
        first, created = rt.jobs.start("copy-taskdetail")
        second, created_again = rt.jobs.start("copy-taskdetail", {"batchSize": 10})
        assert created and not created_again and second.jobId == first.jobId
        # one lake, one flight, however its path is written
        for spelling in (
            f"{lake}/",
            f"{lake}//",
            f"./{lake.name}",
            lake.name,
            str(link),
            f"{link}/",
            f"{lake}/../{lake.name}",
            f"file://{lake}",
        ):
            same, made = rt.jobs.start("copy-taskdetail", {"source": spelling})
            assert (same.jobId, made) == (first.jobId, False), spelling
        assert first.options["source"] == os.path.realpath(lake)  # stored in that one form
        other, created_other = rt.jobs.start("copy-taskdetail", {"source": f"{lake}/*"})
        assert created_other and other.jobId != first.jobId  # another source, another flight


def test_idempotency_key(settings: Settings) -> None:
    with Runtime(settings) as rt:
        a, created = rt.jobs.start("copy-taskdetail", {"batchSize": 500}, idempotency_key="k1")
        rt.runner.run(a.jobId)  # ends: no longer in flight
        b, created_b = rt.jobs.start("copy-taskdetail", {"batchSize": 500}, idempotency_key="k1")
        assert created and not created_b and b.jobId == a.jobId
        with pytest.raises(IdempotencyConflict):
            rt.jobs.start("copy-taskdetail", {"batchSize": 501}, idempotency_key="k1")


def test_expired_lease_is_taken_over_and_resumes_from_checkpoint(
    settings: Settings, db: Any
) -> None:
    settings = settings.model_copy(update={"batch_size": 500})
    with Runtime(settings) as rt:
        status, _ = rt.jobs.start("copy-taskdetail")
        job_id = status.jobId
        seen: list[int] = []

        def die_after_two_batches(s: Any) -> None:
            seen.append(s.processedRecords)
            if s.processedRecords >= 1000:
                raise SystemExit("simulated crash")  # not caught by the runner

        with pytest.raises(SystemExit):
            rt.runner.run(job_id, on_progress=die_after_two_batches)
        crashed = rt.jobs.get(job_id)
        assert crashed.status == JobState.IN_PROGRESS
        assert crashed.processedRecords == seen[-1] >= 1000  # the committed batches
        assert rt.runner.run(job_id) is Outcome.NOT_CLAIMED  # lease still fresh
        time.sleep(settings.lease_seconds + 0.5)
        assert rt.runner.run(job_id) is Outcome.ENDED
        done = rt.jobs.get(job_id)
    assert_exact(done)
    assert done.attempt == 2 and done.failures == 1
    assert done.insertedRecords == VALID
    assert db.taskdetails.count_documents({}) == VALID


def test_gives_up_after_max_attempts(settings: Settings) -> None:
    settings = settings.model_copy(update={"max_attempts": 1})
    with Runtime(settings) as rt:
        status, _ = rt.jobs.start("copy-taskdetail")
        rt.store.jobs.update_one({"jobId": status.jobId}, {"$set": {"failures": 1}})
        rt.runner.run(status.jobId)
        done = rt.jobs.get(status.jobId)
    assert done.status == JobState.FAILED and "LAKESYNC_MAX_ATTEMPTS" in (done.error or "")


def test_a_give_up_that_could_not_be_written_is_recorded_as_a_give_up_later(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The end write of a job whose runs kept dying fails (kept in the runner's memory, the
    job still running); the next run of this process records it: failed, "Gave up"."""
    from lakesync.errors import LakesyncError

    settings = settings.model_copy(update={"max_attempts": 1})
    with Runtime(settings) as rt:
        status, _ = rt.jobs.start("copy-taskdetail")
        rt.store.jobs.update_one({"jobId": status.jobId}, {"$set": {"failures": 1}})
        finish, refused = rt.store.finish, []

        def full_disk(*args: Any, **kwargs: Any) -> Any:
            if not refused:
                refused.append(args)
                raise LakesyncError("the database refused the write (disk full)")
            return finish(*args, **kwargs)

        monkeypatch.setattr(rt.store, "finish", full_disk)
        rt.runner.run(status.jobId)  # kept for later, not raised
        assert refused and rt.jobs.get(status.jobId).status == JobState.IN_PROGRESS
        # its lease expires (no run beats it): the next run of this process ends it
        wait_for(lambda: rt.runner.run(status.jobId) is Outcome.ENDED or None, timeout=60)
        done = rt.jobs.get(status.jobId)
    assert done.status == JobState.FAILED and done.message == "Gave up", done
    assert "LAKESYNC_MAX_ATTEMPTS" in (done.error or "")


def test_two_runners_never_run_the_same_job(settings: Settings) -> None:
    with Runtime(settings) as rt:
        status, _ = rt.jobs.start("copy-taskdetail")
        outcomes: list[Outcome] = []
        threads = [
            threading.Thread(target=lambda: outcomes.append(rt.runner.run(status.jobId)))
            for _ in range(3)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(o.value for o in outcomes).count("ended") == 1
        assert_exact(rt.jobs.get(status.jobId))


def test_malformed_job_document_is_reported_not_crashed_on(settings: Settings) -> None:
    with Runtime(settings) as rt:
        status, _ = rt.jobs.start("copy-taskdetail")
        rt.store.jobs.update_one({"jobId": status.jobId}, {"$set": {"status": "exploded"}})
        with pytest.raises(JobError) as info:
            rt.store.get(status.jobId)  # a read (rt.jobs.get may answer from memory for 1 s)
        assert "malformed" in str(info.value)
        assert rt.runner.run(status.jobId) is Outcome.NOT_CLAIMED
        assert rt.jobs.list() == []  # skipped with a warning, the list still answers


def test_file_lost_mid_copy_fails_naming_it_then_resumes_exactly(
    settings: Settings, db: Any, tmp_path: Path
) -> None:
    import shutil

    lake = tmp_path / "lake"
    shutil.copytree(settings.lake_uri or "", lake)
    victim = sorted(lake.rglob("*.parquet"))[-5]
    parked = tmp_path / "parked.parquet"
    settings = settings.model_copy(update={"lake_uri": str(lake), "batch_size": 100})
    with Runtime(settings) as rt:
        status, _ = rt.jobs.start("copy-taskdetail")

        def lose_file(s: Any) -> None:
            if s.processedRecords and victim.exists():
                victim.rename(parked)

        assert rt.runner.run(status.jobId, on_progress=lose_file) is Outcome.ENDED
        failed = rt.jobs.get(status.jobId)
        assert failed.status == JobState.FAILED
        assert victim.name in (failed.error or ""), failed.error
        committed = failed.insertedRecords + failed.errorRecords
        assert failed.processedRecords == committed < 5000
        assert db.taskdetails.count_documents({}) == failed.insertedRecords
        parked.rename(victim)  # the operator restores the file
        reopened = rt.jobs.resume(status.jobId)
        assert reopened.status == JobState.PENDING and reopened.error is None
        with pytest.raises(JobError):
            rt.jobs.resume(status.jobId)  # only failed jobs
        assert rt.runner.run(status.jobId) is Outcome.ENDED
        done = rt.jobs.get(status.jobId)
    assert_exact(done)
    assert done.insertedRecords == VALID and done.errorRecords == 25
    assert db.taskdetails.count_documents({}) == VALID
