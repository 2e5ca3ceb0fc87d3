"""Partitioned parallel copies: the local executor with 4 workers and Celery workers on Redis."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from tests.helpers import lakesync, start_worker, stop_workers, wait_for

from lakesync.config import Settings
from lakesync.demo import append_records, generate
from lakesync.models import JobState, JobStatus
from lakesync.plan import file_ranges as plan
from lakesync.runtime import Runtime


def test_plan_splits_files_into_ranges_of_about_the_target() -> None:
    assert plan([10] * 10, 30) == [(0, 3), (3, 6), (6, 10)]
    assert plan([100], 30) == [(0, 1)]
    assert plan([10, 10, 10, 20], 20) == [(0, 2), (2, 4)]
    ranges = plan([7] * 40, 50)
    assert ranges[0][0] == 0 and ranges[-1][1] == 40
    assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges))


#: A lake of 40,000 records in partitions of 4,000 (10+) and batches of 500 (8 a partition):
#: more partitions than workers, several batches in each, as 200,000 in partitions of
#: 20,000 had (the copy, a fifth the size, took most of these tests' minutes).
ROWS_4W, PARTITION_4W, BATCH_4W = 40_000, 4_000, 500


@pytest.fixture(scope="module")
def lake_40k(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("lake40k") / "tasks"
    generate(out, ROWS_4W, bad_rows=40, seed=21, files_per_partition=2)
    return out


def assert_exact(s: Any, total: int, bad: int) -> None:
    assert s.status == JobState.COMPLETED, (s.message, s.error)
    parts = s.insertedRecords + s.updatedRecords + s.unchangedRecords + s.errorRecords
    assert s.processedRecords == parts == s.totalRecords == total
    assert s.errorRecords == bad and s.insertedRecords == total - bad


@pytest.mark.slow
def test_local_executor_with_four_workers_copies_partitions_in_parallel(
    settings: Settings, db: Any, lake_40k: Path
) -> None:
    settings = settings.model_copy(
        update={"lake_uri": str(lake_40k), "workers": 4, "partition_rows": PARTITION_4W,
                "batch_size": BATCH_4W}
    )  # fmt: skip
    with Runtime(settings, executor="local") as rt:
        rt.start()
        status, _ = rt.jobs.start("copy-taskdetail")
        done = wait_for(lambda: (s := rt.jobs.get(status.jobId)).state.is_final and s, timeout=300)
        parts = list(db.jobpartitions.find({"jobId": status.jobId}))
        # the partitioned full copy recorded the watermark: nothing new to read after it
        # (the records at the watermark itself are read again, and come out unchanged)
        again, _ = rt.jobs.start("copy-taskdetail", {"mode": "incremental"})
        quiet = wait_for(lambda: (s := rt.jobs.get(again.jobId)).state.is_final and s, timeout=60)
    assert quiet.status == JobState.COMPLETED and 0 < quiet.totalRecords < 10, quiet
    assert quiet.insertedRecords == quiet.updatedRecords == 0, quiet
    assert_exact(done, ROWS_4W, 40)
    assert done.partitions == len(parts) >= 8 and done.partitionsDone == done.partitions
    assert {p["status"] for p in parts} == {"completed"}
    assert sum(p["processedRecords"] for p in parts) == ROWS_4W
    assert db.taskdetails.count_documents({}) == ROWS_4W - 40


@pytest.mark.slow
def test_celery_workers_share_a_job_and_survive_a_killed_worker(
    settings: Settings, serve_env: dict[str, str], db: Any, lake_40k: Path, redis_url: str,
    tmp_path: Path,
) -> None:  # fmt: skip
    env = dict(serve_env)
    env.update(
        LAKESYNC_EXECUTOR="celery", LAKESYNC_BROKER_URL=redis_url,
        LAKESYNC_LAKE_URI=str(lake_40k), LAKESYNC_PARTITION_ROWS=str(PARTITION_4W),
        LAKESYNC_BATCH_SIZE=str(BATCH_4W), LAKESYNC_LEASE_SECONDS="4",
    )  # fmt: skip
    workers = [start_worker(env, tmp_path / f"worker{i}.log") for i in range(2)]
    try:
        api_settings = settings.model_copy(update={
            "executor": "celery", "lake_uri": str(lake_40k), "partition_rows": PARTITION_4W,
            "broker_url": __import__("pydantic").SecretStr(redis_url), "lease_seconds": 4,
        })  # fmt: skip
        with Runtime(api_settings, executor="celery") as rt:
            rt.start()
            status, created = rt.jobs.start("copy-taskdetail")
            assert created
            wait_for(lambda: rt.jobs.get(status.jobId).processedRecords >= 0.3 * ROWS_4W,
                     timeout=180)  # fmt: skip
            os.killpg(workers[0].pid, signal.SIGKILL)  # a worker dies mid-job
            workers[0].wait(10)
            done = wait_for(
                lambda: (s := rt.jobs.get(status.jobId)).state.is_final and s, timeout=300
            )
        parts = list(db.jobpartitions.find({"jobId": status.jobId}))
    finally:
        stop_workers(workers)
    assert_exact(done, ROWS_4W, 40)
    assert done.partitions == len(parts) >= 8
    owners = {run.split(":")[1] for p in parts for run in p["ranBy"]}
    assert len(owners) == 2, owners  # both worker processes did part of the work
    assert db.taskdetails.count_documents({}) == ROWS_4W - 40


def test_worker_refuses_to_start_without_its_broker(serve_env: dict[str, str]) -> None:
    env = dict(serve_env, LAKESYNC_EXECUTOR="celery",
               LAKESYNC_BROKER_URL="redis://user:hunter2@127.0.0.1:1/0")  # fmt: skip
    started = time.monotonic()
    run = lakesync(env, "worker", timeout=60)  # forked from the zygote: no import to pay
    assert run.returncode != 0
    assert time.monotonic() - started < 30
    assert "Cannot reach the Celery broker at redis://user:***@127.0.0.1:1/0" in run.stderr
    assert "hunter2" not in run.stderr + run.stdout


@pytest.mark.slow
def test_celery_worker_on_rabbitmq_runs_a_job(
    settings: Settings, serve_env: dict[str, str], tmp_path: Path, rabbitmq_url: str
) -> None:
    """The same executor on RabbitMQ (the machine's broker at 127.0.0.1:5672, guest/guest)."""
    broker = rabbitmq_url
    env = dict(serve_env, LAKESYNC_EXECUTOR="celery", LAKESYNC_BROKER_URL=broker,
               LAKESYNC_PARTITION_ROWS="2000")  # fmt: skip
    worker = start_worker(env, tmp_path / "worker.log")
    try:
        api_settings = settings.model_copy(update={
            "executor": "celery", "partition_rows": 2000,
            "broker_url": __import__("pydantic").SecretStr(broker),
        })  # fmt: skip
        with Runtime(api_settings, executor="celery") as rt:
            rt.start()
            status, _ = rt.jobs.start("copy-taskdetail")
            done = wait_for(
                lambda: (s := rt.jobs.get(status.jobId)).state.is_final and s, timeout=120
            )
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        try:
            worker.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, signal.SIGKILL)
    assert_exact(done, 5000, 25)
    assert (done.partitions or 0) >= 2


# -- the lake changing under a partitioned job, and resuming one ------------------------------


#: 8,000 records in partitions of about 800 and batches of 200: the 10 partitions of 4
#: batches that 20,000 in partitions of 2,000 and batches of 500 made, at 2/5 of the copy
ROWS_STEPPED = 8_000


@pytest.fixture
def lake_8k(tmp_path: Path) -> Path:
    out = tmp_path / "tasks"
    generate(out, ROWS_STEPPED, bad_rows=0, seed=8, files_per_partition=2)
    return out


def stepped(settings: Settings, lake: Path) -> tuple[Runtime, list[tuple[str, int]]]:
    """A runtime whose job and partition runs the test makes itself, one at a time."""
    settings = settings.model_copy(
        update={"lake_uri": str(lake), "partition_rows": 800, "batch_size": 200}
    )
    rt = Runtime(settings, executor="local")
    queued: list[tuple[str, int]] = []
    rt.executor.submit = lambda job_id: None  # type: ignore[method-assign,union-attr]
    rt.runner.partitioned.submit = lambda job_id, i: queued.append((job_id, i))  # type: ignore[union-attr]
    return rt, queued


def reversed_with_a_failure_resumed(
    settings: Settings, db: Any, lake: Path, parked: Path, name: str
) -> JobStatus:
    """Operation `name` in partitions of about a file, run in reverse order: the second one
    run fails its job (one of its files moved to `parked`), then the file is back, the job
    is resumed and its partitions run again in reverse order. The job's last status."""
    rt, queued = stepped(settings, lake)
    rt.settings.partition_rows = 2  # about a file a partition
    with rt:
        job, _ = rt.jobs.start(name)
        rt.runner.run(job.jobId)
        parts = rt.runner.partitioned
        assert parts is not None and len(queued) >= 3, queued
        order = list(reversed(queued))
        parts.run(*order[0])
        victim = db.jobpartitions.find_one({"_id": f"{job.jobId}:{order[1][1]}"})["files"][0]
        (lake / victim).rename(parked)  # this part fails its job
        parts.run(*order[1])
        assert rt.store.get(job.jobId).status == JobState.FAILED
        parked.rename(lake / victim)
        rt.jobs.resume(job.jobId)
        queued.clear()
        rt.runner.run(job.jobId)
        for step in reversed(queued):
            parts.run(*step)
        return rt.store.get(job.jobId)


def test_a_partitioned_job_copies_the_files_it_planned_while_the_lake_changes(
    settings: Settings, db: Any, lake_8k: Path
) -> None:
    rt, queued = stepped(settings, lake_8k)
    with rt:
        job, _ = rt.jobs.start("copy-taskdetail")
        rt.runner.run(job.jobId)
        assert rt.runner.partitioned is not None and len(queued) >= 5
        rt.runner.partitioned.run(*queued[0])
        # a new file sorts before every planned one: list positions all shift by one
        new = append_records(lake_8k, 700, start_id=900_000)
        first = sorted(lake_8k.glob("projectId=*"))[0]
        (first / "part-0000-added.parquet").write_bytes((lake_8k / new_file(lake_8k)).read_bytes())
        (lake_8k / new_file(lake_8k)).unlink()
        for step in queued[1:]:
            rt.runner.partitioned.run(*step)
        done = rt.store.get(job.jobId)
    assert_exact(done, ROWS_STEPPED, 0)  # exactly what was planned: the new file waits
    assert db.taskdetails.count_documents({}) == ROWS_STEPPED
    assert db.taskdetails.count_documents({"_id": {"$in": new}}) == 0


def new_file(lake: Path) -> str:
    (path,) = lake.glob("projectId=*/part-append-*.parquet")
    return str(path.relative_to(lake))


def test_a_lost_file_fails_the_partitioned_job_and_resume_finishes_it_exactly(
    settings: Settings, db: Any, lake_8k: Path, tmp_path: Path
) -> None:
    rt, queued = stepped(settings, lake_8k)
    with rt:
        job, _ = rt.jobs.start("copy-taskdetail")
        rt.runner.run(job.jobId)
        assert rt.runner.partitioned is not None
        parts = rt.runner.partitioned
        for step in queued[:2]:
            parts.run(*step)
        victim_index = queued[2][1]
        victim = db.jobpartitions.find_one({"_id": f"{job.jobId}:{victim_index}"})["files"][-1]
        parked = tmp_path / "parked.parquet"
        (lake_8k / victim).rename(parked)
        parts.run(*queued[2])
        failed = rt.store.get(job.jobId)
        assert failed.status == JobState.FAILED and victim in (failed.error or ""), failed.error
        assert "Restore the file and resume the job" in (failed.error or "")

        parked.rename(lake_8k / victim)  # the cause is fixed: resume from the checkpoints
        rt.jobs.resume(job.jobId)
        queued.clear()
        rt.runner.run(job.jobId)
        assert (job.jobId, victim_index) in queued
        for step in list(queued):
            parts.run(*step)
        done = rt.store.get(job.jobId)
    assert_exact(done, ROWS_STEPPED, 0)
    assert db.taskdetails.count_documents({}) == ROWS_STEPPED
    assert {p["status"] for p in db.jobpartitions.find({"jobId": job.jobId})} == {"completed"}
