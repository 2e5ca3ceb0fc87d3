"""Sync modes at their edges: late records at the watermark, lookback, mirrors of part of a
lake, one flight per lake, concurrent Idempotency-Keys, cancel racing completion."""

from __future__ import annotations

import itertools
import json
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import uvicorn
from tests.helpers import ServeProcess, wait_for

from lakesync.api.app import create_app
from lakesync.api.errors import status_of
from lakesync.config import Settings
from lakesync.demo import generate
from lakesync.errors import ConfigError, IdempotencyConflict, JobError, LeaseLost
from lakesync.jobstore import flight_key
from lakesync.models import JobState, JobStatus, Outcome
from lakesync.operations import load_operations, parse_options
from lakesync.runtime import Runtime

# -- incremental: records that land with the watermark's value -------------------------------

#: one watermark column of each kind: its Arrow type, the n-th value, the step the lookback
#: covers (and one it does not), and a lookback as lakesync.toml writes it
KINDS: dict[str, dict[str, Any]] = {
    "date": {
        "type": pa.date32(),
        "value": lambda n: date(2025, 3, 1) + timedelta(days=n),
        "lookback": '"1d"',
    },
    "timestamp_s": {
        "type": pa.timestamp("s", tz="UTC"),
        "value": lambda n: datetime(2025, 3, 1, 12, 0, 0) + timedelta(seconds=n * 3600),
        "lookback": '"1h"',
    },
    "int": {"type": pa.int64(), "value": lambda n: 1000 + 10 * n, "lookback": "10"},
}


def write_part(lake: Path, name: str, kind: str, ids: range, steps: list[int]) -> list[str]:
    """Records `id`, `w` (the watermark) and `v` in a new file; returns their keys."""
    spec = KINDS[kind]
    keys = [f"R-{i:05d}" for i in ids]
    table = pa.table(
        {
            "id": keys,
            "w": pa.array([spec["value"](s) for s in steps], spec["type"]),
            "v": [f"value {i}" for i in ids],
        }
    )
    lake.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, lake / name)
    return keys


def operation_toml(lake: Path, lookback: str | None) -> str:
    extra = f"lookback = {lookback}\n" if lookback else ""
    return (
        f'[operations.late]\nsource = "{lake}"\ncollection = "late"\nkey = "id"\n'
        f'mode = "incremental"\nwatermark = "w"\nbatchSize = 7\n{extra}'
    )


def copy(rt: Runtime, name: str = "late") -> JobStatus:
    status, created = rt.jobs.start(name)
    assert created
    rt.runner.run(status.jobId)
    done = rt.jobs.get(status.jobId)
    assert done.status == JobState.COMPLETED, (done.message, done.error)
    assert done.processedRecords == done.totalRecords
    counted = done.insertedRecords + done.updatedRecords + done.unchangedRecords
    assert counted + done.errorRecords == done.totalRecords
    return done


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("with_lookback", [False, True], ids=["no-lookback", "lookback"])
def test_late_records_at_the_watermark_are_copied_by_the_next_incremental_copy(
    settings: Settings, db: Any, tmp_path: Path, kind: str, with_lookback: bool
) -> None:
    lake = tmp_path / "lake"
    write_part(lake, "a.parquet", kind, range(0, 30), [i // 3 for i in range(30)])  # 0..9
    config = tmp_path / "lakesync.toml"
    config.write_text(operation_toml(lake, KINDS[kind]["lookback"] if with_lookback else None))
    settings = settings.model_copy(update={"operations_file": config})
    with Runtime(settings) as rt:
        first = copy(rt)
        assert first.insertedRecords == 30
        # the case: late records with exactly the watermark's value (step 9)
        late = write_part(lake, "b.parquet", kind, range(100, 120), [9] * 20)
        # and records one step below it (late by less than the lookback), two steps below
        within = write_part(lake, "c.parquet", kind, range(200, 205), [8] * 5)
        outside = write_part(lake, "d.parquet", kind, range(300, 305), [7] * 5)
        second = copy(rt)
        assert db.late.count_documents({"_id": {"$in": late}}) == 20
        assert second.insertedRecords == 20 + (5 if with_lookback else 0)
        # the 3 records already copied at the watermark (and with lookback the 3 a step
        # below) are read again: unchanged, not written
        assert second.unchangedRecords == (6 if with_lookback else 3)
        assert second.updatedRecords == 0
        assert db.late.count_documents({"_id": {"$in": within}}) == (5 if with_lookback else 0)
        assert db.late.count_documents({"_id": {"$in": outside}}) == 0  # older than any lookback
        assert db.late.count_documents({"_lakesync.job": second.jobId}) == second.insertedRecords

        third = copy(rt)  # nothing new: the records at the watermark come out unchanged
        assert third.insertedRecords == third.updatedRecords == 0
        assert third.unchangedRecords == (3 + 20) + (8 if with_lookback else 0)
        assert db.late.count_documents({"_lakesync.job": third.jobId}) == 0  # a read, no write
        stored = db.syncstate.find_one({"operation": "late"})
        assert stored["jobId"] == third.jobId and stored["source"] == str(lake.resolve())
        # what GET /api/operations and `lakesync operations` show
        listed = rt.registry.overview(rt.settings, rt.store, rt.runner.watermarks)
        (shown,) = [o for o in listed if o.name == "late"]
        expected = KINDS[kind]["lookback"].strip('"') if with_lookback else None
        assert shown.lookback == (int(expected) if kind == "int" and expected else expected)


def test_a_lookback_of_the_wrong_kind_fails_the_job_before_writing(
    settings: Settings, db: Any, tmp_path: Path
) -> None:
    lake = tmp_path / "lake"
    write_part(lake, "a.parquet", "timestamp_s", range(0, 5), [0, 1, 2, 3, 4])
    config = tmp_path / "lakesync.toml"
    config.write_text(operation_toml(lake, "5"))  # a number, but the column holds timestamps
    with Runtime(settings.model_copy(update={"operations_file": config})) as rt:
        copy(rt)  # the first copy has no watermark yet: nothing to reach back from
        write_part(lake, "b.parquet", "timestamp_s", range(10, 15), [4] * 5)
        status, _ = rt.jobs.start("late")
        assert rt.runner.run(status.jobId) is Outcome.ENDED
        failed = rt.jobs.get(status.jobId)
    assert failed.status == JobState.FAILED
    assert "lookback 5 is a number" in (failed.error or "") and '"2h"' in (failed.error or "")
    assert failed.processedRecords == 0 and db.late.count_documents({}) == 5


@pytest.mark.parametrize(
    ("lookback", "fields", "expected"),
    [
        ('"2 hours"', "", "lookback '2 hours' is not a duration"),
        ('"-2h"', "", "is not a duration"),
        ("-3", "", "lookback -3 is negative"),
        ("1.5", "", "lookback"),
        ("5", 'w = { type = "timestamp" }', "is a timestamp field: give a duration"),
        ('"1d"', 'w = { type = "int" }', "is an int field: give a number"),
    ],
)
def test_lookback_mistakes_stop_start_up(
    tmp_path: Path, lookback: str, fields: str, expected: str
) -> None:
    text = operation_toml(tmp_path / "lake", lookback)
    if fields:
        text += f'[operations.late.schema.fields]\nid = {{ type = "string" }}\n{fields}\n'
    (tmp_path / "lakesync.toml").write_text(text)
    with pytest.raises(ConfigError) as info:
        load_operations(tmp_path / "lakesync.toml")
    assert "operation 'late'" in str(info.value) and expected in str(info.value)


def test_lookback_needs_a_watermark(tmp_path: Path) -> None:
    (tmp_path / "lakesync.toml").write_text(
        '[operations.p]\ncollection = "p"\nkey = "k"\nlookback = "1h"\n'
    )
    with pytest.raises(ConfigError, match="lookback needs a watermark column"):
        load_operations(tmp_path / "lakesync.toml")
    (tmp_path / "lakesync.toml").write_text(
        '[operations.p]\ncollection = "p"\nkey = "k"\nwatermark = "w"\nlookback = "1h30m"\n'
    )
    assert load_operations(tmp_path / "lakesync.toml")[0].lookback == "1h30m"


# -- mirror of part of a lake ----------------------------------------------------------------


@pytest.fixture
def clean_lake(tmp_path: Path) -> Path:
    """3,000 valid records in one folder per project."""
    out = tmp_path / "clean"
    generate(out, 3000, seed=11)
    return out


def test_mirror_of_part_of_the_lake_is_refused_by_api_and_cli_and_deletes_nothing(
    serve_env: dict[str, str], clean_lake: Path, tmp_path: Path, db: Any
) -> None:
    serve_env.update(
        LAKESYNC_LAKE_URI=str(clean_lake), LAKESYNC_ALLOWED_ROOTS=json.dumps([str(tmp_path)])
    )
    proc = ServeProcess(serve_env, tmp_path / "serve.log").start()
    try:
        with httpx.Client(base_url=proc.url, timeout=30) as http:
            full = http.post("/api/jobs", json={}).json()["jobId"]
            done = wait_for(lambda: _final(http, full), timeout=120)
            assert done["status"] == "completed" and done["insertedRecords"] == 3000
            part = f"{clean_lake}/projectId=PRJ-00[1]/*.parquet"  # the example
            for source in (part, f"{clean_lake}/projectId=PRJ-001", str(tmp_path)):
                r = http.post("/api/jobs", json={"options": {"mode": "mirror", "source": source}})
                assert r.status_code == 400, r.text
                error = r.json()["error"]
                assert "whole lake" in error and str(clean_lake) in error, error
                assert "mode full or incremental" in error
            assert [j["jobId"] for j in http.get("/api/jobs").json()["jobs"]] == [full]
            # the whole lake, however it is written, may be mirrored
            mirror = {"options": {"mode": "mirror", "source": f"{clean_lake}/"}}
            whole = http.post("/api/jobs", json=mirror)
            assert whole.status_code == 202, whole.text
            mirrored = wait_for(lambda: _final(http, whole.json()["jobId"]), timeout=120)
            assert mirrored["status"] == "completed" and mirrored["deletedRecords"] == 0
    finally:
        proc.kill()
    assert db.taskdetails.count_documents({}) == 3000

    cli = subprocess.run(
        [
            sys.executable,
            "-m",
            "lakesync",
            "copy",
            "--mode",
            "mirror",
            "--source",
            f"{clean_lake}/projectId=PRJ-00[1]/*.parquet",
            "--json",
        ],
        env=serve_env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert cli.returncode == 1, cli.stderr
    assert "Traceback" not in cli.stderr  # --json: the error is JSON on stdout too
    assert "whole lake" in json.loads(cli.stdout)["error"]
    assert "whole lake" in cli.stderr and "would be deleted" in cli.stderr
    assert db.taskdetails.count_documents({}) == 3000
    assert db.jobstatuses.count_documents({}) == 2  # the refused ones never became jobs


def test_queued_mirror_of_part_of_the_lake_fails_before_reading(
    settings: Settings, db: Any, clean_lake: Path
) -> None:
    """A mirror job stored before the check (or before the lake setting changed) is
    refused by the runner too."""
    settings = settings.model_copy(update={"lake_uri": str(clean_lake)})
    with Runtime(settings) as rt:
        status, _ = rt.jobs.start("copy-taskdetail")
        rt.runner.run(status.jobId)
        part = f"{clean_lake}/projectId=PRJ-00[1]/*.parquet"
        queued, _ = rt.store.create(
            "copy-taskdetail",
            {"mode": "mirror", "source": part},
            flight_key("copy-taskdetail", part),
        )
        assert rt.runner.run(queued.jobId) is Outcome.ENDED
        failed = rt.jobs.get(queued.jobId)
    assert failed.status == JobState.FAILED and "whole lake" in (failed.error or "")
    assert failed.processedRecords == 0 and db.taskdetails.count_documents({}) == 3000


def _final(http: httpx.Client, job_id: str) -> dict[str, Any] | None:
    s: dict[str, Any] = http.get(f"/api/jobs/{job_id}").json()
    return s if s["status"] in ("completed", "failed", "cancelled") else None


# -- one flight per lake ---------------------------------------------------------------------


def test_s3_prefixes_have_one_flight_whatever_the_slashes() -> None:
    forms = ["s3://b/p", "s3://b/p/", "s3://b//p", "s3://b/p//"]
    assert len({flight_key("op", f) for f in forms}) == 1
    assert flight_key("op", "s3://b/p") != flight_key("op", "s3://b/pp")


def test_lake_lake_slash_and_a_symlink_share_one_flight_over_http(
    serve_env: dict[str, str], tmp_path: Path, db: Any
) -> None:
    lake = Path(serve_env["LAKESYNC_LAKE_URI"])
    link = tmp_path / "link"
    link.symlink_to(lake, target_is_directory=True)
    proc = ServeProcess(serve_env, tmp_path / "serve.log").start()
    try:
        with httpx.Client(base_url=proc.url, timeout=30) as http:
            sources = [str(lake), f"{lake}/", str(link), f"{link}/", f"{lake}/../{lake.name}"]
            with ThreadPoolExecutor(len(sources)) as pool:
                answers = list(
                    pool.map(
                        lambda s: http.post(
                            "/api/jobs", json={"options": {"mode": "full", "source": s}}
                        ),
                        sources,
                    )
                )
            ids = {a.json()["jobId"] for a in answers}
            # one job, unless it ended before a later request came (then that one is new)
            assert all(a.status_code in (200, 202) for a in answers), [a.text for a in answers]
            for job_id in ids:
                wait_for(lambda j=job_id: _final(http, j), timeout=120)
    finally:
        proc.kill()
    jobs = list(db.jobstatuses.find({}, {"_id": 0}))
    assert {j["options"]["source"] for j in jobs} == {str(lake.resolve())}
    spans = sorted((j["startTime"], j["endTime"]) for j in jobs)
    for (_, ended), (started, _) in itertools.pairwise(spans):
        assert started >= ended  # never two copies of the lake at once


# -- Idempotency-Key: 20 concurrent requests, one key, two bodies ----------------------------


def test_concurrent_requests_with_one_key_create_exactly_one_job(
    serve: ServeProcess, db: Any
) -> None:
    lake = serve.env["LAKESYNC_LAKE_URI"]
    for round_ in range(5):  # a few rounds: the race must not be won by luck
        key = f"key-{round_}"
        # two bodies of two flights (a part of the lake each), so single-flight cannot hide
        # a second job
        sources = [f"{lake}/projectId=PRJ-{2 * round_ + n:03d}*/*.parquet" for n in (1, 2)]
        bodies = [{"options": {"source": source}} for source in sources]
        barrier = threading.Barrier(20)

        def post(i: int, bodies: Any = bodies, key: str = key, barrier: Any = barrier) -> Any:
            with httpx.Client(base_url=serve.url, timeout=60) as http:
                barrier.wait()
                return http.post("/api/jobs", json=bodies[i % 2], headers={"Idempotency-Key": key})

        with ThreadPoolExecutor(20) as pool:
            answers = list(pool.map(post, range(20)))
        jobs = list(db.jobstatuses.find({"options.source": {"$in": sources}}, {"_id": 0}))
        assert len(jobs) == 1, (round_, [j["options"]["source"] for j in jobs])
        winner = sources.index(jobs[0]["options"]["source"])
        for i, r in enumerate(answers):
            if i % 2 == winner:  # the winner's body: its job
                assert r.status_code in (200, 202), r.text
                assert r.json()["jobId"] == jobs[0]["jobId"]
            else:  # the other body: refused, and no job of its own
                assert r.status_code == 422, r.text
                assert "Idempotency-Key" in r.json()["error"]
        assert sum(r.status_code == 202 for r in answers) == 1
        assert db.idempotencykeys.find_one({"_id": key})["jobId"] == jobs[0]["jobId"]
    assert db.jobstatuses.count_documents({}) == 5


# -- cancel racing completion ----------------------------------------------------------------


@pytest.fixture
def inline(settings: Settings, tmp_path: Path) -> Iterator[tuple[Runtime, str]]:
    """A runtime whose jobs this test runs itself, and its API over a real socket."""
    lake = tmp_path / "small"
    generate(lake, 120, seed=5)
    settings = settings.model_copy(update={"lake_uri": str(lake), "batch_size": 40})
    with Runtime(settings) as rt:  # no executor: the test runs each job
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        server = uvicorn.Server(uvicorn.Config(create_app(rt), log_config=None, access_log=False))
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        try:
            wait_for(lambda: server.started or not thread.is_alive(), timeout=10, every=0.01)
            assert server.started
            yield rt, f"http://127.0.0.1:{sock.getsockname()[1]}"
        finally:
            server.should_exit = True
            thread.join(10)
            sock.close()


def test_cancel_racing_completion_never_contradicts_the_final_status(
    inline: tuple[Runtime, str], db: Any
) -> None:
    rt, url = inline
    # when the cancel is sent, after the last batch was committed: at once from inside
    # the run (before it ends, always), or from another thread a little later
    delays = [None, 0.0, 0.002, 0.005, 0.01, 0.02, 0.05, 0.3]
    seen: dict[int, int] = {}
    with httpx.Client(base_url=url, timeout=30) as http:
        for i in range(50):
            delay = delays[i % len(delays)]
            job_id = http.post("/api/jobs", json={}).json()["jobId"]
            answer: list[httpx.Response] = []
            last_batch = threading.Event()

            def cancel(job_id: str = job_id, answer: list[httpx.Response] = answer) -> None:
                answer.append(http.post(f"/api/jobs/{job_id}/cancel"))

            def progress(
                s: JobStatus, last_batch: threading.Event = last_batch, delay: Any = delay
            ) -> None:
                ended = s.totalRecords and s.processedRecords == s.totalRecords
                if s.state is JobState.IN_PROGRESS and ended and not last_batch.is_set():
                    last_batch.set()
                    if delay is None:
                        cancel()

            def later(last_batch: threading.Event = last_batch, delay: Any = delay) -> None:
                if last_batch.wait(30) and delay is not None:
                    threading.Event().wait(delay)
                    cancel()

            sender = threading.Thread(target=later)
            sender.start()
            assert rt.runner.run(job_id, on_progress=progress) is Outcome.ENDED
            sender.join(30)
            final = http.get(f"/api/jobs/{job_id}").json()
            assert len(answer) == 1, i
            r = answer[0]
            seen[r.status_code] = seen.get(r.status_code, 0) + 1
            if r.status_code == 202:  # accepted: the job must not have completed
                assert r.json()["status"] in ("pending", "in_progress", "cancelled"), r.text
                assert final["status"] == "cancelled", (i, delay, final["message"])
                assert db.syncstate.find_one({"jobId": job_id}) is None  # watermark not moved
            else:  # too late: the answer says how it ended, and that is how it ended
                assert r.status_code == 409, r.text
                assert r.json()["status"] == final["status"] == "completed", (i, r.text)
                assert r.json()["job"]["jobId"] == job_id
                assert "already ended with status completed" in r.json()["error"]
    assert seen.get(202, 0) >= 7 and seen.get(409, 0) >= 6, seen  # both sides of the race


def test_a_flagged_job_never_completes_whoever_ends_it(settings: Settings, db: Any) -> None:
    with Runtime(settings) as rt:
        store = rt.store
        for owner in ("run-1", None):  # a run of the job, or its last partition
            job, _ = store.create("copy-taskdetail", {}, f"f-{owner}")
            assert store.claim(job.jobId, "run-1", lease_seconds=60) is not None
            assert store.request_cancel(job.jobId).cancelRequested
            ended = store.finish(job.jobId, owner, JobState.COMPLETED, "Copied 0 records")
            assert ended.status == JobState.CANCELLED
            assert ended.message == "Cancelled as the copy ended; copied 0 records"
            if owner:  # the same run retrying a finish whose reply was lost: its own result
                again = store.finish(job.jobId, owner, JobState.COMPLETED, "again")
                assert again.status == JobState.CANCELLED and again.message == ended.message
            with pytest.raises(LeaseLost):  # anyone else: it ended, nobody ends it again
                store.finish(job.jobId, "run-2" if owner else None, JobState.COMPLETED, "again")
            assert store.request_cancel(job.jobId).status == JobState.CANCELLED


def test_an_idempotency_key_left_without_a_job_is_waited_for_then_taken_over(
    settings: Settings, db: Any
) -> None:
    body = {
        "operation": "copy-taskdetail",
        "options": parse_options({}).model_dump(exclude_none=True),
    }
    with Runtime(settings) as rt:
        store = rt.store
        assert store.claim_idempotency("k", body) is None  # taken, no job yet
        with pytest.raises(JobError, match="still being carried out") as info:
            store.claim_idempotency("k", body, wait=0.3)  # its request is still at work
        assert status_of(info.value) == 409
        with pytest.raises(IdempotencyConflict):
            store.claim_idempotency("k", {"operation": "copy-taskdetail", "options": {"x": 1}})
        # its request died: after IDEMPOTENCY_CLAIM_SECONDS the next request takes it over
        db.idempotencykeys.update_one({"_id": "k"}, {"$set": {"claimedMs": 0}})
        job, created = rt.jobs.start("copy-taskdetail", {}, idempotency_key="k")
        assert created
        again, created_again = rt.jobs.start("copy-taskdetail", {}, idempotency_key="k")
        assert (again.jobId, created_again) == (job.jobId, False)
    assert db.jobstatuses.count_documents({}) == 1


def test_watermarks_stored_under_another_spelling_are_found_after_an_upgrade(
    settings: Settings, db: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Versions before canonical sources keyed watermarks by the source as typed."""
    lake = tmp_path / "lake"
    write_part(lake, "a.parquet", "int", range(0, 30), list(range(30)))
    config = tmp_path / "lakesync.toml"
    config.write_text(operation_toml(lake, None))
    settings = settings.model_copy(update={"operations_file": config})
    with Runtime(settings) as rt:
        assert copy(rt).insertedRecords == 30
    canonical = str(lake.resolve())
    doc = db.syncstate.find_one({"operation": "late"})
    assert doc["source"] == canonical
    old = f"{tmp_path}/./lake/"  # as an older version stored it: absolute, not canonical
    db.syncstate.delete_one({"_id": doc["_id"]})
    db.syncstate.insert_one({**doc, "_id": f"late|{old}", "source": old})
    # a relative spelling meant the writer's working directory: it is left alone
    db.syncstate.insert_one({**doc, "_id": "late|lake/", "source": "lake/", "updatedAtMs": 1})
    monkeypatch.chdir(tmp_path)
    with Runtime(settings) as rt:  # start-up re-keys the absolute one
        again = copy(rt)
    assert again.processedRecords == again.unchangedRecords == 1  # from the watermark on
    assert sorted(d["_id"] for d in db.syncstate.find()) == [f"late|{canonical}", "late|lake/"]


#: watermark columns whose values sit near their type's minimum, so the watermark less the
#: lookback falls below what the column can hold: (Arrow type, first value, one step,
#: lookback as lakesync.toml writes it)
NEAR_THE_EDGE: dict[str, tuple[pa.DataType, Any, Any, str]] = {
    "int32": (pa.int32(), -(2**31) + 5, 1, "100"),
    "int64": (pa.int64(), -(2**63) + 5, 1, "100"),
    "uint32": (pa.uint32(), 3, 1, "100"),
    "timestamp_ns": (
        pa.timestamp("ns", tz="UTC"),
        datetime(1677, 9, 22, 1, 0, 0),
        timedelta(hours=1),
        '"30d"',
    ),
    # the lookback reaches before year 1, which Python's datetime cannot show
    "timestamp_ms": (
        pa.timestamp("ms", tz="UTC"),
        datetime(1, 1, 2, 1, 0, 0),
        timedelta(hours=1),
        '"30d"',
    ),
}


@pytest.mark.parametrize("kind", list(NEAR_THE_EDGE))
def test_a_lookback_reaching_below_the_watermark_column_type_reads_from_the_start(
    settings: Settings, db: Any, tmp_path: Path, kind: str
) -> None:
    """The watermark less the lookback is below the least value the column's type holds
    (an int32 near -2**31, an int64 near -2**63, a timestamp[ns] in 1677), or before year
    1: no bound on that side, the copy exact, instead of an overflow from the filter."""
    arrow_type, first, step, lookback = NEAR_THE_EDGE[kind]
    lake = tmp_path / "lake"
    lake.mkdir()

    def part(name: str, ids: range, steps: list[int | None]) -> None:
        values = [None if s is None else first + step * s for s in steps]
        table = pa.table(
            {
                "id": [f"R-{i:05d}" for i in ids],
                "w": pa.array(values, arrow_type),
                "v": [f"value {i}" for i in ids],
            }
        )
        pq.write_table(table, lake / name)

    part("a.parquet", range(0, 10), list(range(10)))
    config = tmp_path / "lakesync.toml"
    config.write_text(operation_toml(lake, lookback))
    with Runtime(settings.model_copy(update={"operations_file": config})) as rt:
        assert copy(rt).insertedRecords == 10
        part("b.parquet", range(100, 105), [0, 3, 9, 12, None])  # late, at and above it
        second = copy(rt)
    # what a full read finds, filtered in Python: every row with a watermark (the lookback
    # reaches below the type, so from the start)
    whole = pq.read_table(lake).to_pylist()
    wanted = {r["id"] for r in whole if r["w"] is not None}
    assert second.totalRecords == len(wanted)
    assert second.insertedRecords == 4 and second.unchangedRecords == 10
    assert {d["_id"] for d in db.late.find({}, {"_id": 1})} == wanted
