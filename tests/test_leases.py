"""Leases and resumes of whole jobs and partitions: every resume path, takeovers, faults.

Against the embedded server; the CLI and `serve` run as real processes where the path
under test is theirs.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pyarrow.parquet as pq
import pytest
from pymongo.collection import Collection
from pymongo.database import Database
from pymongo.errors import AutoReconnect
from tests.helpers import ServeProcess, lakesync, wait_for

from lakesync.boundary import SliceLease, Store
from lakesync.config import Settings
from lakesync.demo import generate
from lakesync.errors import StoreError, TransientStoreError
from lakesync.jobstore import JobStore
from lakesync.lease import Leases, kept_dying
from lakesync.mirror import SEEN_PREFIX
from lakesync.models import JobState, Outcome
from lakesync.repeats import Plan
from lakesync.retry import RetryPolicy
from lakesync.runtime import Runtime

#: 10 partitions of about 800 records, 4 batches of 200 each, as 20,000 in partitions of
#: 2,000 and batches of 500 had (the same files, runs and batches, at 2/5 of the records)
ROWS, PARTITION_ROWS, BATCH = 8_000, 800, 200


@pytest.fixture
def lake(tmp_path: Path) -> Path:
    out = tmp_path / "tasks"
    generate(out, ROWS, bad_rows=30, seed=8, files_per_partition=2)
    return out


def stepped(settings: Settings, lake: Path, **more: Any) -> tuple[Runtime, list[tuple[str, int]]]:
    """A runtime whose job and partition runs the test makes itself, one at a time."""
    settings = settings.model_copy(
        update={
            "lake_uri": str(lake),
            "partition_rows": PARTITION_ROWS,
            "batch_size": BATCH,
            **more,
        }
    )
    rt = Runtime(settings, executor="local")
    queued: list[tuple[str, int]] = []
    rt.executor.submit = lambda job_id: None  # type: ignore[method-assign,union-attr]
    rt.runner.partitioned.submit = lambda job_id, i: queued.append((job_id, i))
    return rt, queued


def assert_clean(s: Any, db: Any, total: int = ROWS, bad: int = 30) -> None:
    """The counts and collection of one clean copy into an empty collection."""
    get = s.get if isinstance(s, dict) else lambda k: getattr(s, k)
    assert get("status") == "completed", (get("message"), get("error"))
    parts = sum(get(k) for k in ("insertedRecords", "updatedRecords", "unchangedRecords",
                                 "errorRecords"))  # fmt: skip
    assert get("processedRecords") == parts == get("totalRecords") == total
    assert get("errorRecords") == bad and get("insertedRecords") == total - bad
    assert db.taskdetails.count_documents({}) == total - bad


def failed_partitioned_job(settings: Settings, lake: Path, tmp_path: Path) -> str:
    """A partitioned job that copied two partitions, then failed on a lost file (restored)."""
    rt, queued = stepped(settings, lake)
    with rt:
        job, _ = rt.jobs.start("copy-taskdetail")
        rt.runner.run(job.jobId)
        assert len(queued) >= 5
        parts = rt.runner.partitioned
        for step in queued[:2]:
            assert parts.run(*step) is Outcome.ENDED
        victim = rt.store.db.jobpartitions.find_one({"_id": f"{job.jobId}:{queued[2][1]}"})
        name = victim["files"][-1]  # type: ignore[index]
        parked = tmp_path / "parked.parquet"
        (lake / name).rename(parked)
        parts.run(*queued[2])
        failed = rt.store.get(job.jobId)
        parked.rename(lake / name)
    assert failed.status == JobState.FAILED, failed
    assert 0 < failed.processedRecords < ROWS
    return job.jobId


def cli(env: dict[str, str], *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return lakesync(env, *args, timeout=timeout)  # forked from the zygote: no import to pay


# -- every resume path continues a partitioned job from its partitions ------------------------


@pytest.mark.slow
def test_lakesync_resume_continues_a_failed_partitioned_job_from_its_partitions(
    settings: Settings, serve_env: dict[str, str], db: Any, lake: Path, tmp_path: Path
) -> None:
    job_id = failed_partitioned_job(settings, lake, tmp_path)
    run = cli(dict(serve_env, LAKESYNC_LAKE_URI=str(lake)), "resume", job_id, "--json")
    assert run.returncode == 0, run.stderr[-3000:]
    assert_clean(json.loads(run.stdout), db)
    assert {p["status"] for p in db.jobpartitions.find({"jobId": job_id})} == {"completed"}


@pytest.mark.slow
def test_lakesync_copy_picks_up_a_pending_partitioned_job_and_finishes_its_partitions(
    settings: Settings, serve_env: dict[str, str], db: Any, lake: Path, tmp_path: Path
) -> None:
    job_id = failed_partitioned_job(settings, lake, tmp_path)
    with Runtime(settings) as rt:
        assert rt.jobs.resume(job_id).status == JobState.PENDING  # nobody runs it yet
    run = cli(dict(serve_env, LAKESYNC_LAKE_URI=str(lake)), "copy", "--json")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "resumed from its checkpoint" in run.stderr
    final = json.loads(run.stdout)
    assert final["jobId"] == job_id
    assert_clean(final, db)


@pytest.mark.slow
def test_api_resume_and_recovery_scan_continue_a_partitioned_job(
    settings: Settings, serve_env: dict[str, str], db: Any, lake: Path, tmp_path: Path
) -> None:
    job_id = failed_partitioned_job(settings, lake, tmp_path)
    serve_env.update(LAKESYNC_LAKE_URI=str(lake), LAKESYNC_PARTITION_ROWS=str(PARTITION_ROWS),
                     LAKESYNC_WORKERS="3")  # fmt: skip
    proc = ServeProcess(serve_env, tmp_path / "serve.log").start()
    try:
        r = httpx.post(f"{proc.url}/api/jobs/{job_id}/resume", json={}, timeout=10)
        assert r.status_code == 202, r.text
        final = wait_for(lambda: (s := httpx.get(f"{proc.url}/api/jobs/{job_id}",
                                                 timeout=10).json())["status"]
                         in ("completed", "failed") and s, timeout=180)  # fmt: skip
    finally:
        proc.kill()
    assert_clean(final, db)


@pytest.mark.slow
def test_a_job_whose_last_partition_died_before_ending_it_completes_on_recovery(
    settings: Settings, db: Any, lake: Path
) -> None:
    rt, queued = stepped(settings, lake)
    with rt:
        job, _ = rt.jobs.start("copy-taskdetail")
        rt.runner.run(job.jobId)
        parts = rt.runner.partitioned
        for step in queued[:-1]:
            parts.run(*step)

        def die(*_: Any) -> None:
            raise SystemExit("killed between the last partition and the job's end")

        with pytest.MonkeyPatch.context() as mp, pytest.raises(SystemExit):
            mp.setattr(SliceLease, "end", die)  # the job's end, in the finish stage
            parts.run(*queued[-1])
        stuck = rt.store.get(job.jobId)
    assert stuck.status == JobState.IN_PROGRESS and stuck.partitionsDone == stuck.partitions
    local = settings.model_copy(update={"lake_uri": str(lake), "partition_rows": PARTITION_ROWS})
    with Runtime(local, executor="local") as recovering:  # its recovery scan finds the job
        recovering.start()
        done = wait_for(
            lambda: (s := recovering.store.get(job.jobId)).state.is_final and s, timeout=60
        )
    assert_clean(done, db)
    assert done.failures == 0  # nobody died holding the job document


# -- fenced leases: a takeover while the old owner is mid-batch --------------------------------


class Freezer:
    """Holds the calls one thread makes to chosen collection methods while `frozen` is set."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, names: tuple[str, ...]) -> None:
        self.thread: threading.Thread | None = None
        self.frozen = threading.Event()
        self.waiting = threading.Event()
        self.thaw = threading.Event()
        self.calls: list[str] = []
        for name in names:
            monkeypatch.setattr(Collection, name, self._wrap(getattr(Collection, name), name))

    def _wrap(self, original: Callable[..., Any], name: str) -> Callable[..., Any]:
        def call(coll: Collection[Any] | Database[Any], *args: Any, **kwargs: Any) -> Any:
            if threading.current_thread() is self.thread and coll.name == "taskdetails":
                if self.frozen.is_set():
                    self.waiting.set()
                    self.thaw.wait(60)
                self.calls.append(name)
            return original(coll, *args, **kwargs)

        return call


@pytest.mark.parametrize("pause", ["between_batches", "in_the_write"])
@pytest.mark.parametrize("kind", ["job", "partition"])
def test_takeover_while_the_old_owner_is_mid_batch_refuses_its_later_writes(
    settings: Settings, db: Any, lake: Path, monkeypatch: pytest.MonkeyPatch, pause: str,
    kind: str,
) -> None:  # fmt: skip
    from lakesync.copy import CopyEngine

    freezer = Freezer(monkeypatch, ("insert_many", "bulk_write", "find"))
    starts: list[float] = []
    write = CopyEngine.write

    def counted(engine: CopyEngine, batch: Any) -> Any:
        if threading.current_thread() is freezer.thread:
            starts.append(time.monotonic())
        return write(engine, batch)

    monkeypatch.setattr(CopyEngine, "write", counted)
    # the old owner renews every 900 s: to the new one it looks dead after 1 s of silence
    old_rt, queued = stepped(settings, lake, lease_seconds=3600)
    new_rt, _ = stepped(settings, lake, lease_seconds=1)
    outcome: list[Outcome] = []
    with old_rt, new_rt:
        job, _ = old_rt.jobs.start("copy-taskdetail")
        if kind == "partition":
            old_rt.runner.run(job.jobId)  # plans the partitions
            target = queued[0]

            def old_run() -> Outcome:
                return old_rt.runner.partitioned.run(*target, on_progress=progress)

            def new_run() -> Outcome:
                return new_rt.runner.partitioned.run(*target)
        else:
            old_rt.runner.partitioned.submit = None  # copied in one piece

            def old_run() -> Outcome:
                return old_rt.runner.run(job.jobId, on_progress=progress)

            def new_run() -> Outcome:
                return new_rt.runner.run(job.jobId)

        def progress(s: Any) -> None:
            if s.processedRecords >= 2 * BATCH and not freezer.frozen.is_set():
                freezer.frozen.set()
                if pause == "between_batches":  # the old owner stalls right after a commit
                    freezer.waiting.set()
                    freezer.thaw.wait(60)

        old = threading.Thread(target=lambda: outcome.append(old_run()))
        freezer.thread = old
        old.start()
        assert freezer.waiting.wait(60)
        time.sleep(1.3)  # the old owner's lease expires (on the server's clock)
        assert new_run() is Outcome.ENDED
        writes_before, starts_before = len(freezer.calls), len(starts)
        freezer.thaw.set()
        old.join(60)
        later, later_starts = freezer.calls[writes_before:], starts[starts_before:]
        if kind == "partition":
            for step in queued[1:]:
                new_rt.runner.partitioned.run(*step)
        done = new_rt.store.get(job.jobId)
    assert outcome == [Outcome.NOT_CLAIMED]
    # after the takeover the old owner starts no batch: paused between batches it writes
    # nothing at all; paused inside a write, only that write's own calls complete
    assert later_starts == []
    if pause == "between_batches":
        assert later == []
    assert_clean(done, db)
    assert db.copyerrors.count_documents({"jobId": job.jobId}) == 30


def test_no_lease_expires_before_a_second_of_silence_whatever_it_is_configured_to() -> None:
    from lakesync.lease import FENCE_TRUST_SECONDS, MIN_LEASE_SECONDS, Leases

    beat = datetime(2026, 1, 1, tzinfo=UTC)
    doc = {"heartbeatAt": beat}
    # a run skips its fence read for FENCE_TRUST_SECONDS after a commit: nobody may take
    # the lease over within that time, even with a shorter lease configured
    assert FENCE_TRUST_SECONDS < MIN_LEASE_SECONDS == 1.0
    assert not Leases.expired(doc, 0.1, beat + timedelta(seconds=0.9))
    assert Leases.expired(doc, 0.1, beat + timedelta(seconds=1))
    assert not Leases.expired(doc, 3, beat + timedelta(seconds=2.9))
    assert Leases.expired(doc, 3, beat + timedelta(seconds=3))


def test_a_copy_that_keeps_up_reads_its_lease_once_not_before_every_batch(
    settings: Settings, db: Any, lake: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lakesync.lease import Leases

    checks: list[str] = []
    check = Leases.check
    monkeypatch.setattr(Leases, "check", lambda self, v, o: checks.append(v) or check(self, v, o))
    rt, _ = stepped(settings, lake)
    with rt:
        rt.runner.partitioned.submit = None  # copied in one piece
        job, _ = rt.jobs.start("copy-taskdetail")
        assert rt.runner.run(job.jobId) is Outcome.ENDED
        done = rt.store.get(job.jobId)
    assert_clean(done, db)
    batches = ROWS // BATCH
    # each commit proves the lease for the next batch's fence; a stall of half a second
    # (a loaded machine) brings the read back, hence the margin
    assert 1 <= len(checks) <= batches // 4, (len(checks), batches)


# -- no transient error fails a job ----------------------------------------------------------

JOB_PATH = ("runner.py", "boundary.py", "plan.py", "slices.py", "finish.py", "lease.py",
            "jobstore.py", "copy.py", "mirror.py", "watermarks.py", "repeats.py")  # fmt: skip
METHODS = ("find_one", "find_one_and_update", "update_one", "update_many", "insert_one",
           "insert_many", "find", "bulk_write", "delete_many", "drop", "count_documents",
           "create_index", "aggregate", "replace_one")  # fmt: skip
#: the database-level calls of the job path: the lease's clock read (``server_now``), the
#: drop and the sweep of mirror key sets
DATABASE_METHODS = ("command", "drop_collection", "list_collection_names")


class FaultInjector:
    """Raises AutoReconnect at each call site of the job path: the first time a site runs,
    before the call reaches MongoDB; the second time, after MongoDB applied it (the reply
    was lost). Then the site is left alone.

    A call site is the innermost line of lakesync that calls a collection method (or a
    database's: a command, a collection dropped or listed); calls
    from the test itself (starting jobs, reading them) are left alone. A site reached on
    several paths is faulted on each: the path is the lines of lakesync from the site out
    to the first, the retry machinery left out (``Leases._update`` alone serves the claims,
    commits, settles and hand-backs of jobs and partitions alike, and one fault there would
    leave the rest untried; a commit of the copy and one of a mirror's deletes differ only
    beyond the store boundary).
    """

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.hit: dict[tuple[str, int], int] = {}
        self.function: dict[tuple[str, int], str] = {}  # site -> the function it is in
        self.paths: dict[tuple[tuple[str, int], ...], int] = {}  # faults go by call path
        self.via: set[str] = set()  # the store boundary's methods whose calls were faulted
        self.calls: set[tuple[str, str]] = set()  # (function of a faulted site, method)
        self.armed = False
        self.lock = threading.Lock()
        for name in METHODS:
            monkeypatch.setattr(Collection, name, self._wrap(getattr(Collection, name), name))
        for name in DATABASE_METHODS:
            monkeypatch.setattr(Database, name, self._wrap(getattr(Database, name), name))

    def _site(self) -> tuple[tuple[str, int], ...] | None:
        """The call path: the site first, then the lines of lakesync that led to it (but
        those of the store boundary's retry wrapper and policy)."""
        frame = sys._getframe(2)
        path: list[tuple[str, int]] = []
        last, retried = "", False
        while frame is not None:
            name = frame.f_code.co_filename
            if "/lakesync/" in name and "/tests/" not in name:
                if frame.f_code.co_qualname.startswith("retried.") or name.endswith("retry.py"):
                    if path and not retried:  # the store boundary's retried method
                        self.via.add(last)
                    retried = True
                    frame = frame.f_back  # type: ignore[assignment]
                    continue
                last = frame.f_code.co_qualname
                if not path:
                    if not name.endswith(JOB_PATH):
                        return None
                    self.function[(name.rsplit("/", 1)[-1], frame.f_lineno)] = (
                        frame.f_code.co_qualname
                    )
                path.append((name.rsplit("/", 1)[-1], frame.f_lineno))
            frame = frame.f_back  # type: ignore[assignment]
        return tuple(path) or None

    def _wrap(self, original: Callable[..., Any], name: str) -> Callable[..., Any]:
        def call(coll: Collection[Any] | Database[Any], *args: Any, **kwargs: Any) -> Any:
            path = self._site() if self.armed else None
            if path is not None and threading.current_thread().name.startswith("heartbeat"):
                path = None  # a missed beat is retried at the next tick anyway
            if path is None:
                return original(coll, *args, **kwargs)
            site = path[0]
            with self.lock:
                self.hit[site] = self.hit.get(site, 0) + 1
                self.calls.add((self.function[site], name))
                seen = self.paths.get(path, 0)
                self.paths[path] = seen + 1
            if seen == 0:
                raise AutoReconnect(f"injected before {site[0]}:{site[1]} ({name})")
            result = original(coll, *args, **kwargs)
            if seen == 1:
                raise AutoReconnect(f"injected after {site[0]}:{site[1]} ({name})")
            return result

        return call


def quick_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """Retries 20x sooner: the backoff (0.2 s doubling, with jitter) is not what the fault
    tests are about, and at about 0.3 s a call site it was most of their time (two faults
    at each of some hundred sites). Every fault is still retried by the same policy."""
    original = RetryPolicy.__init__

    def init(policy: RetryPolicy, *args: Any, **kwargs: Any) -> None:
        original(policy, *args, **kwargs)
        policy.base = 0.01

    monkeypatch.setattr(RetryPolicy, "__init__", init)


def run_armed(rt: Runtime, faults: FaultInjector, options: dict[str, Any]) -> Any:
    """Start a job, run it to its end with faults armed, return its final status."""
    job, _ = rt.jobs.start("copy-taskdetail", options)
    faults.armed = True
    try:
        while rt.runner.run(job.jobId) is Outcome.CONTINUE:
            pass
    finally:
        faults.armed = False
    return rt.store.get(job.jobId)


def test_a_transient_error_at_each_call_of_the_job_path_fails_no_job(
    settings: Settings, db: Any, lake: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    faults = FaultInjector(monkeypatch)
    quick_retries(monkeypatch)
    # every plan keeps an order warning for the job's final message (a Delta or Iceberg
    # table's rewrites may leave the order of a key's records in doubt)
    doubt = "Lake order in doubt (injected)."
    monkeypatch.setattr(Plan, "warning", lambda plan: doubt)
    rt, queued = stepped(settings, lake, retry_budget_seconds=30)
    with rt:
        # a partitioned full copy, each partition run as an executor would
        job, _ = rt.jobs.start("copy-taskdetail")
        faults.armed = True
        rt.runner.run(job.jobId)
        for step in queued:
            assert rt.runner.partitioned.run(*step) is Outcome.ENDED
        faults.armed = False
        partitioned = rt.store.get(job.jobId)
        assert partitioned.partitions and partitioned.partitions >= 5
        assert_clean(partitioned, db)
        # the same lake again, in one piece, then an incremental copy
        rt.runner.partitioned.submit = None
        finals = [run_armed(rt, faults, options) for options in ({}, {"mode": "incremental"})]
        # a mirror of a lake without bad rows (a rejected record refuses the deletions)
        db.drop_collection("taskdetails")
        generate(tmp_path / "clean", 3000, seed=9)
        clean = rt.settings.model_copy(update={"lake_uri": str(tmp_path / "clean")})
    # the key set a mirror job that ended left (its drop failed): the next mirror sweeps it
    leftover = f"{SEEN_PREFIX}gone_job"
    db[leftover].insert_one({"_id": 1})
    with Runtime(clean) as mirror_rt:
        finals.append(run_armed(mirror_rt, faults, {"mode": "mirror"}))
    for s in [partitioned, *finals]:
        assert s.status == JobState.COMPLETED, (s.message, s.error)
        assert s.message.count(doubt) == 1, s.message
    # the mirror's key set dropped at its end, the leftover swept: none is left behind
    assert not [n for n in db.list_collection_names() if n.startswith(SEEN_PREFIX)]
    full, incremental, mirrored = finals
    assert full.totalRecords == full.processedRecords == ROWS
    assert full.unchangedRecords == ROWS - 30 and full.errorRecords == 30
    # reads from the watermark on (records at it again): nothing new, nothing changed
    assert incremental.totalRecords == incremental.processedRecords < 100
    assert incremental.insertedRecords == incremental.updatedRecords == 0
    assert mirrored.insertedRecords == mirrored.totalRecords == 3000
    assert mirrored.deletedRecords == 0
    assert db.taskdetails.count_documents({}) == 3000
    sites = sorted(faults.hit)
    assert len(sites) >= 20, sites  # every kind of call was hit once, and retried
    assert {f for f, _ in sites} >= {"boundary.py", "jobstore.py", "lease.py", "copy.py",
                                     "mirror.py"}, sites  # fmt: skip
    # the watermark (syncstate) and the plan (jobplans): the store boundary keeps both
    # (plan_job removes a dead run's plan, then stores the rows as the plan finds them)
    functions = {faults.function[site] for site in sites}
    assert {f for f in functions if f.startswith("WatermarkStore.")}, functions
    plans = {"plan_job", "order_warning", "save_listing", "load_listing", "load_superseded"}
    assert functions >= plans, functions
    # the order warning stored; the key sets dropped and swept (database-level calls)
    wanted = {("plan_job", "insert_one"), ("drop_seen", "drop_collection"),
              ("sweep", "list_collection_names"), ("sweep", "find_one"),
              ("sweep", "drop_collection")}  # fmt: skip
    assert faults.calls >= wanted, wanted - faults.calls


def test_a_transient_error_at_each_call_of_hand_backs_repeats_and_mirror_deletes(
    settings: Settings, db: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The calls the test above does not reach: hand-backs of jobs and partitions (a run
    reaching its time limit), a plan of repeated keys stored and read back, a mirror's
    deletes. Each is faulted before and after MongoDB applied it, on each call path."""
    lake = tmp_path / "lake"
    generate(lake, 3000, bad_rows=0, seed=9, files_per_partition=2)
    first = sorted(lake.rglob("*.parquet"))[0]
    again = lake / "projectId=PRJ-999" / "part-9999-again.parquet"  # last in lake order
    again.parent.mkdir()
    again.write_bytes(first.read_bytes())  # its keys repeat: the earlier rows are superseded
    repeated = pq.ParquetFile(first).metadata.num_rows
    faults = FaultInjector(monkeypatch)
    quick_retries(monkeypatch)
    rt, queued = stepped(settings, lake, retry_budget_seconds=30, job_time_limit=0.001)
    with rt:
        job, _ = rt.jobs.start("copy-taskdetail")
        faults.armed = True
        rt.runner.run(job.jobId)
        old = datetime.now(UTC) - timedelta(hours=1)  # a run died holding the first one:
        dead = {"status": "in_progress", "owner": "host:1:dead", "heartbeatAt": old,
                "heartbeatMs": int(old.timestamp() * 1000)}  # fmt: skip
        db.jobpartitions.update_one({"_id": f"{job.jobId}:{queued[0][1]}"}, {"$set": dead})
        for step in queued:  # every batch reaches the time limit: handed back, run again
            while (outcome := rt.runner.partitioned.run(*step)) is Outcome.CONTINUE:
                pass
            assert outcome is Outcome.ENDED
        faults.armed = False
        partitioned = rt.store.get(job.jobId)
        db.taskdetails.insert_many([{"_id": f"gone-{i}", "taskDetailId": f"gone-{i}"}
                                    for i in range(450)])  # fmt: skip
        rt.runner.partitioned.submit = None
        mirrored = run_armed(rt, faults, {"mode": "mirror"})
    for s in (partitioned, mirrored):
        assert s.status == JobState.COMPLETED, (s.message, s.error)
        assert s.processedRecords == s.totalRecords == 3000 + repeated
        assert s.duplicateRecords == repeated and s.errorRecords == 0
    assert partitioned.insertedRecords == 3000 and partitioned.partitions >= 3
    assert mirrored.unchangedRecords == 3000 and mirrored.deletedRecords == 450
    assert db.taskdetails.count_documents({}) == 3000
    wanted = {"Store.release", "Store.release_part", "Store.plan_repeats",
              "Store.superseded_rows", "Store.delete", "Store.missing_page"}  # fmt: skip
    assert faults.via >= wanted, wanted - faults.via
    # the takeover of the dead run's partition reads the server's clock (a command)
    assert ("Leases.take_over", "find_one") in faults.calls
    assert ("Leases.server_now", "command") in faults.calls


def test_a_partition_mongodb_cannot_serve_is_named_as_the_partition_in_the_error(
    settings: Settings, db: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the error of a spent retry budget is the partition's error and a line of the job's
    # own log: it names the partition as people count them, not the job's id
    quick = settings.model_copy(update={"retry_budget_seconds": 0})
    store = Store(quick, JobStore(db), threading.Event())

    def down(*_: Any, **__: Any) -> Any:
        raise AutoReconnect("connection reset by peer")

    monkeypatch.setattr(Leases, "settle", down)
    monkeypatch.setattr(Leases, "release", down)
    lease = SliceLease(store, "job_x", "me", 2, "partition 3 of 8 (files 5-7)")
    with pytest.raises(TransientStoreError) as settled:
        lease.settle(JobState.COMPLETED)
    with pytest.raises(TransientStoreError) as handed:
        lease.hand_back("Paused")
    assert "while recording partition 3 completed:" in str(settled.value)
    assert "while handing back partition 3 of 8 (files 5-7):" in str(handed.value)
    assert "job_x" not in str(settled.value) + str(handed.value)


def test_a_key_set_mongodb_will_not_drop_is_left_to_the_next_sweep_and_fails_nothing(
    settings: Settings, db: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the drop and the sweep are retried (the fault test above); past the budget they are
    # housekeeping: the job's end stands, and the next mirror job's sweep drops the set
    quick = settings.model_copy(update={"retry_budget_seconds": 0})
    store = Store(quick, JobStore(db), threading.Event())
    db[f"{SEEN_PREFIX}job_x"].insert_one({"_id": 1})
    drop = Database.drop_collection

    def down(*_: Any, **__: Any) -> Any:
        raise AutoReconnect("connection reset by peer")

    monkeypatch.setattr(Database, "drop_collection", down)
    store.drop_key_set("job_x")  # logged, not raised
    store.sweep_key_sets()
    monkeypatch.setattr(Database, "drop_collection", drop)
    assert f"{SEEN_PREFIX}job_x" in db.list_collection_names()
    store.sweep_key_sets()  # job_x has no document: it ended
    assert f"{SEEN_PREFIX}job_x" not in db.list_collection_names()


# -- the Celery recovery scan sends a waiting job or partition once ---------------------------


def test_celery_sends_a_pending_job_or_partition_once_while_it_waits(
    settings: Settings, lake: Path, redis_url: str
) -> None:
    import redis
    from pydantic import SecretStr

    from lakesync.executors.celery import QUEUE, CeleryExecutor

    settings = settings.model_copy(update={"broker_url": SecretStr(redis_url)})
    queue = redis.Redis.from_url(redis_url)
    rt, queued = stepped(settings, lake)
    with rt:
        celery = CeleryExecutor(settings, rt.store)
        job, _ = rt.jobs.start("copy-taskdetail")
        for _ in range(3):  # the API's submit, then two recovery scans
            for job_id in rt.store.stale(settings.lease_seconds):
                celery.submit(job_id)
        assert queue.llen(QUEUE) == 1
        owner = "worker-1"
        assert rt.store.claim(job.jobId, owner, settings.lease_seconds) is not None
        rt.store.release(job.jobId, owner, "time limit")  # handed back: sent once more
        for _ in range(2):
            for job_id in rt.store.stale(settings.lease_seconds):
                celery.submit(job_id)
        assert queue.llen(QUEUE) == 2
        rt.runner.run(job.jobId)  # plans partitions (kept in `queued`, not sent)
        for _ in range(2):
            for job_id, index in rt.runner.partitioned.stale():
                celery.submit_partition(job_id, index)
        assert queue.llen(QUEUE) == 2 + len(queued)


def test_celery_sends_again_a_job_or_partition_whose_message_a_killed_worker_took(
    settings: Settings, lake: Path, redis_url: str
) -> None:
    """A worker killed after Redis delivered it a message, before it claimed the document,
    leaves the message unacknowledged for the 12 h visibility timeout: the document stays
    pending and marked queued. Once the mark is older than it may be trusted, the recovery
    scan sends the document again, once (as a killed Celery worker left a partition in
    test_partitions, and its job never ended)."""
    import redis
    from pydantic import SecretStr

    from lakesync.executors.celery import QUEUE, CeleryExecutor
    from lakesync.models import PARTITIONS

    settings = settings.model_copy(update={"broker_url": SecretStr(redis_url)})
    queue = redis.Redis.from_url(redis_url)
    long_ago = datetime.now(UTC).replace(tzinfo=None) - timedelta(hours=1)  # as stored (UTC)
    rt, queued = stepped(settings, lake)
    with rt:
        celery = CeleryExecutor(settings, rt.store)

        def scan_jobs() -> None:
            for job_id in rt.store.stale(settings.lease_seconds):
                celery.submit(job_id)

        def scan_parts() -> None:
            for job_id, index in rt.runner.partitioned.stale():
                celery.submit_partition(job_id, index)

        job, _ = rt.jobs.start("copy-taskdetail")
        scan_jobs()
        assert queue.llen(QUEUE) == 1
        queue.delete(QUEUE)  # taken by a worker that was killed before it claimed the job
        scan_jobs()
        assert queue.llen(QUEUE) == 0  # a fresh mark is trusted: the message may still wait
        rt.store.jobs.update_one({"jobId": job.jobId}, {"$set": {"queuedAt": long_ago}})
        scan_jobs()
        scan_jobs()
        assert queue.llen(QUEUE) == 1  # sent again, once
        queue.delete(QUEUE)
        rt.runner.run(job.jobId)  # plans partitions (kept in `queued`, not sent)
        scan_parts()
        assert queue.llen(QUEUE) == len(queued) >= 3
        queue.delete(QUEUE)  # the same for partitions
        scan_parts()
        assert queue.llen(QUEUE) == 0
        rt.store.db[PARTITIONS].update_many({"jobId": job.jobId}, {"$set": {"queuedAt": long_ago}})
        # while a run holds a live lease the queue may just be long (workers busy): not sent
        busy = {"_id": f"{job.jobId}:0"}
        held = rt.store.db[PARTITIONS].find_one(busy)
        assert held is not None
        beat = {"$set": {"status": "in_progress"}, "$currentDate": {"heartbeatAt": True}}
        rt.store.db[PARTITIONS].update_one(busy, beat)
        scan_parts()
        assert queue.llen(QUEUE) == 0
        rt.store.db[PARTITIONS].replace_one(busy, held)  # the run ended: nothing at work
        scan_parts()
        scan_parts()
        assert queue.llen(QUEUE) == len(queued)


# -- a death is counted before anyone can claim the document again ----------------------------


def test_a_reaped_partition_or_job_is_claimable_only_with_its_death_counted(
    settings: Settings, db: Any, lake: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The recovery scan hands back a partition (and a job) whose holder died. Once it is
    pending another run may claim it at once and crash the process on the same record
    before a later write counts the first death: under load a partition that crashes the
    reader ran a 4th time where 3 deaths end it (test_reader_safety's flake). So the death
    counts in the write that hands it back: whenever the document is pending again, its
    failures include the death."""
    old = datetime.now(UTC) - timedelta(hours=1)
    dead = {"status": "in_progress", "owner": "host:1:dead", "leaseBeat": 7, "heartbeatAt": old,
            "processedRecords": 400, "failures": 1, "failedAtRecord": 400}  # fmt: skip
    db.jobstatuses.insert_one({"jobId": "j1", **dead})
    db.jobpartitions.insert_one({"_id": "j1:0", "jobId": "j1", "index": 0, **dead})
    db.jobpartitions.insert_one(
        {"_id": "j1:1", "jobId": "j1", "index": 1, **dead, "processedRecords": 600}
    )  # a new spot: counting restarts
    first = {k: v for k, v in dead.items() if k not in ("failures", "failedAtRecord")}
    db.jobpartitions.insert_one({"_id": "j1:2", "jobId": "j1", "index": 2, **first})
    seen: list[tuple[str, Any]] = []  # (document, failures) whenever a write left it pending
    for name in ("find_one_and_update", "update_one"):
        original = getattr(Collection, name)

        def watched(
            coll: Collection[Any], query: Any, *a: Any, _o: Any = original, **k: Any
        ) -> Any:
            out = _o(coll, query, *a, **k)
            if coll.name in ("jobpartitions", "jobstatuses"):
                for doc in coll.find({"status": "pending"}, {"failures": 1, "jobId": 1}):
                    seen.append((str(doc.get("_id", doc.get("jobId"))), doc.get("failures")))
            return out

        monkeypatch.setattr(Collection, name, watched)
    rt, _ = stepped(settings, lake)
    with rt:
        assert sorted(rt.runner.partitioned.stale()) == [("j1", 0), ("j1", 1), ("j1", 2)]
        db.jobstatuses.update_one({"jobId": "j1"}, {"$set": {"status": "in_progress"}})
        assert rt.store.stale(settings.lease_seconds) == ["j1"]
    parts = {d["_id"]: d for d in db.jobpartitions.find()}
    job = db.jobstatuses.find_one({"jobId": "j1"})
    assert (parts["j1:0"]["failures"], parts["j1:0"]["failedAtRecord"]) == (2, 400)
    assert (parts["j1:1"]["failures"], parts["j1:1"]["failedAtRecord"]) == (1, 600)
    assert (parts["j1:2"]["failures"], parts["j1:2"]["failedAtRecord"]) == (1, 400)  # its first
    assert job is not None and (job["failures"], job["status"]) == (2, "pending")
    expected = {"j1:0": 2, "j1:1": 1, "j1:2": 1}
    assert seen and all(failures == expected.get(what, 2) for what, failures in seen), seen


def test_a_takeover_whose_reply_was_lost_counts_the_death_as_one_that_got_through(
    settings: Settings, db: Any, lake: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A takeover counts the dead run in `failures`: one more at the same record, or the
    first at a new one. When MongoDB applies the takeover and the reply is lost, the retry
    finds the document held by this run already; the death must still count as a first at
    the new record, not as one more of an old streak (2 deaths at record 400, then progress
    to 800: a third death there is not a third in a row, and must not give the job up)."""
    old = datetime.now(UTC) - timedelta(hours=1)
    dead = {"status": "in_progress", "owner": "host:1:dead", "leaseBeat": 7, "heartbeatAt": old,
            "heartbeatMs": int(old.timestamp() * 1000), "processedRecords": 800, "failures": 2,
            "failedAtRecord": 400}  # fmt: skip
    db.jobpartitions.insert_one({"_id": "j3:0", "jobId": "j3", "index": 0, **dead})
    original = Collection.find_one_and_update
    lost: list[str] = []

    def reply_lost(coll: Collection[Any], query: Any, *a: Any, **k: Any) -> Any:
        out = original(coll, query, *a, **k)
        if "leaseBeat" in query and "owner" not in query and coll.name not in lost:
            lost.append(coll.name)  # the takeover (a compare-and-swap on the beat), once
            raise AutoReconnect("connection reset after the takeover was applied")
        return out

    monkeypatch.setattr(Collection, "find_one_and_update", reply_lost)
    rt, _ = stepped(settings, lake)
    with rt:
        job, _ = rt.jobs.start("copy-taskdetail")
        db.jobstatuses.update_one({"jobId": job.jobId}, {"$set": dead})
        store = Store(rt.settings, rt.store, threading.Event())  # the job path's boundary
        part = store.claim_part("j3:0", "host:2:me")
        claimed = store.claim(job.jobId, "host:2:me")
    assert lost == ["jobpartitions", "jobstatuses"]
    assert part is not None and claimed is not None
    for doc in (db.jobpartitions.find_one({"_id": "j3:0"}), db.jobstatuses.find_one(
            {"jobId": job.jobId})):  # fmt: skip
        assert doc is not None and doc["owner"] == "host:2:me"
        assert (doc["failures"], doc["failedAtRecord"]) == (1, 800), doc
        assert kept_dying(doc, 3, "the first file") is None  # (3 at 400 gave it up)
    assert (part["failures"], claimed.failures) == (1, 1)


def test_the_retry_budget_counts_from_the_failure_not_from_a_long_unit_of_work() -> None:
    """Some units the store boundary retries work long before their first MongoDB write:
    ``Store.plan_repeats`` reads the lake's keys (a minute or more for ten million records)
    and stores the plan as it goes. The budget is how long MongoDB may stay unavailable,
    so a transient error after the budget's worth of work is still retried."""
    calls: list[int] = []

    def long_plan() -> str:
        calls.append(1)
        time.sleep(0.3)  # the work, past the whole budget
        if len(calls) == 1:
            raise AutoReconnect("connection reset while storing the plan")
        return "planned"

    policy = RetryPolicy(budget=0.2, base=0.01)
    assert policy.call(long_plan, "planning repeated keys") == "planned"
    assert len(calls) == 2
    down = RetryPolicy(budget=0.2, base=0.01)  # MongoDB that stays down: still bounded

    def never() -> None:
        raise AutoReconnect("connection refused")

    with pytest.raises(TransientStoreError, match=r"within the 0\.2 s retry budget"):
        down.call(never, "reading the job")


def test_a_failure_kept_unrecorded_is_dropped_once_another_run_has_progressed(
    settings: Settings, db: Any, lake: Path
) -> None:
    """A run whose job was taken over, then failed (its lake read, say), cannot end the
    job: the new owner holds it, and the failure is kept for this process's next claim.
    If the new owner copied meanwhile and handed the job back (a stop, a time limit), that
    failure is stale: the next run here goes on and completes the job. A failure nobody
    moved past (MongoDB refused it: a full disk) is still recorded."""
    old_rt, _ = stepped(settings, lake)
    new_rt, _ = stepped(settings, lake)
    with old_rt, new_rt:
        for rt in (old_rt, new_rt):
            rt.runner.partitioned.submit = None  # copied in one piece
        job, _ = old_rt.jobs.start("copy-taskdetail")
        old, store = old_rt.runner, old_rt.runner.boundary
        assert store.claim(job.jobId, "host:1:old") is not None
        taken = {"$set": {"owner": "host:2:new"}, "$inc": {"leaseBeat": 1}}
        db.jobstatuses.update_one({"jobId": job.jobId}, taken)  # taken over meanwhile
        SliceLease(store, job.jobId, "host:1:old").fail(job, "file gone", old.unrecorded)
        assert job.jobId in old.unrecorded  # not written: kept for the next claim
        pending = {"$set": {"status": JobState.PENDING.value}, "$unset": {"owner": ""}}
        db.jobstatuses.update_one({"jobId": job.jobId}, pending)  # handed back

        def stop_after_two_batches(s: Any) -> None:
            if s.processedRecords >= 2 * BATCH:
                new_rt.runner.stop.set()

        assert new_rt.runner.run(job.jobId, on_progress=stop_after_two_batches) in (
            Outcome.CONTINUE,
            Outcome.NOT_CLAIMED,
            Outcome.ENDED,
        )
        handed = new_rt.store.get(job.jobId)
        assert handed.status == JobState.PENDING and handed.processedRecords >= 2 * BATCH
        old.run(job.jobId)
        assert old.unrecorded == {}
        assert_clean(old_rt.store.get(job.jobId), db)

        # nobody moved past it: the kept failure is recorded by the next claim here
        job2, _ = old_rt.jobs.start("copy-taskdetail")
        claimed2 = store.claim(job2.jobId, "host:1:old")
        assert claimed2 is not None  # the status its run fails with: the claimed one
        refused = StoreError("MongoDB refused ending the job: disk full")
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(Store, "finish", lambda *_, **__: (_ for _ in ()).throw(refused))
            lease = SliceLease(store, job2.jobId, "host:1:old")
            lease.fail(claimed2, "file gone", old.unrecorded)
        db.jobstatuses.update_one({"jobId": job2.jobId}, pending)
        old.run(job2.jobId)
        ended = old_rt.store.get(job2.jobId)
        assert ended.status == JobState.FAILED and ended.error == "file gone", ended


def test_a_cancel_requested_beats_a_failure_kept_unrecorded(
    settings: Settings, db: Any, lake: Path
) -> None:
    """A failure this process could not record (a full disk) is recorded by its next
    claim; but if the user asked to cancel the job meanwhile, the user's request wins: the
    job ends Cancelled, not Failed with the old error."""
    old_rt, _ = stepped(settings, lake)
    with old_rt:
        old_rt.runner.partitioned.submit = None  # copied in one piece
        old, store = old_rt.runner, old_rt.runner.boundary
        job, _ = old_rt.jobs.start("copy-taskdetail")
        claimed = store.claim(job.jobId, "host:1:old")
        assert claimed is not None
        refused = StoreError("MongoDB refused ending the job: disk full")
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(Store, "finish", lambda *_, **__: (_ for _ in ()).throw(refused))
            SliceLease(store, job.jobId, "host:1:old").fail(claimed, "file gone", old.unrecorded)
        assert job.jobId in old.unrecorded  # not written: kept for the next claim
        pending = {
            "$set": {"status": JobState.PENDING.value, "cancelRequested": True},
            "$unset": {"owner": ""},
        }
        db.jobstatuses.update_one({"jobId": job.jobId}, pending)  # cancel asked meanwhile
        old.run(job.jobId)
        ended = old_rt.store.get(job.jobId)
        assert ended.status == JobState.CANCELLED, ended
        assert old.unrecorded == {}
        assert ended.processedRecords == 0  # not copied again


def test_a_failure_kept_before_any_commit_is_dropped_once_another_run_has_claimed_the_job(
    settings: Settings, db: Any, lake: Path
) -> None:
    """A run that failed before its first commit, its job taken over meanwhile: its mark is
    (0 records, 0 batches). The run that took it over planned the job and was stopped
    before its first commit (a shutdown during a long plan), handing the job back where
    it stood: the kept failure looked current, and ended a job another run had claimed
    and got on with since. A claim by another run (the job's attempt moved past this
    process's next claim) makes the kept failure stale."""
    old_rt, _ = stepped(settings, lake)
    with old_rt:
        old_rt.runner.partitioned.submit = None  # copied in one piece
        job, _ = old_rt.jobs.start("copy-taskdetail")
        old, store = old_rt.runner, old_rt.runner.boundary
        claimed = store.claim(job.jobId, "host:1:old")
        assert claimed is not None and claimed.checkpoint is None
        taken = {"$set": {"owner": "host:2:new"}, "$inc": {"leaseBeat": 1, "attempt": 1}}
        db.jobstatuses.update_one({"jobId": job.jobId}, taken)  # taken over meanwhile
        SliceLease(store, job.jobId, "host:1:old").fail(claimed, "file gone", old.unrecorded)
        assert job.jobId in old.unrecorded  # not written: kept for the next claim
        # the new owner planned (an empty checkpoint) and was stopped before a commit
        planned = {"$set": {"checkpoint": {"batches": 0}, "status": JobState.PENDING.value}}
        db.jobstatuses.update_one({"jobId": job.jobId}, {**planned, "$unset": {"owner": ""}})
        old.run(job.jobId)
        assert old.unrecorded == {}
        assert_clean(old_rt.store.get(job.jobId), db)
