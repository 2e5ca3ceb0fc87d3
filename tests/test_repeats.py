"""Lakes whose keys repeat: one careful sequential copy is the reference for every other way.

The reference is computed here from the lake itself (the last valid record of each key in
lake order wins); the copy in one piece, partitioned copies run in forward, reverse and
random order, and Celery workers must all end with its documents and its counts.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import bson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from pymongo import MongoClient
from tests.conftest import wait_for
from tests.test_partitions import _worker, redis_url  # noqa: F401  (fixture)

from lakesync.config import Settings
from lakesync.copy import MARKER
from lakesync.lake import Lake
from lakesync.models import JobState, JobStatus
from lakesync.repeats import find_superseded
from lakesync.runtime import Runtime
from lakesync.schema import TASK_DETAIL, RecordSchema, validate

TS = pa.timestamp("ms", tz="UTC")
T0 = datetime(2026, 1, 1, tzinfo=UTC)
SCHEMA = pa.schema(
    [
        ("taskDetailId", pa.string()),
        ("taskId", pa.string()),
        ("projectId", pa.string()),
        ("assignee", pa.string()),
        ("status", pa.string()),
        ("hoursLogged", pa.float64()),
        ("estimateHours", pa.float64()),
        ("startedAt", TS),
        ("completedAt", TS),
        ("updatedAt", TS),
        ("tags", pa.list_(pa.string())),
        ("notes", pa.string()),
    ]
)


def record(key: str, version: int, bad: bool = False) -> dict[str, Any]:
    return {
        "taskDetailId": key,
        "taskId": "T-" + key,
        "projectId": "PRJ-001",
        "assignee": None,
        "status": "todo",
        "hoursLogged": -1.0 if bad else float(version),
        "estimateHours": None,
        "startedAt": None,
        "completedAt": None,
        "updatedAt": T0 + timedelta(seconds=version),
        "tags": [f"v{version}"],
        "notes": f"v{version}",
    }


def write_lake(root: Path, files: list[list[dict[str, Any]]]) -> Path:
    root.mkdir(parents=True)
    for i, rows in enumerate(files):
        pq.write_table(pa.Table.from_pylist(rows, SCHEMA), root / f"part-{i:03d}.parquet")
    return root


def versioned_lake(root: Path, keys: int = 600, versions: int = 6, seed: int = 3) -> Path:
    """Files holding versions v1..vN of the same keys (newest last), with repeats inside
    files too, and bad records in several files (a bad newest record loses to the good one
    before it)."""
    rng = random.Random(seed)
    files = []
    for v in range(1, versions + 1):
        picked = [f"K{k:05d}" for k in range(keys) if rng.random() < 0.8]
        rows = [record(k, v, bad=rng.random() < 0.03) for k in picked]
        rows += [record(k, v) for k in rng.sample(picked, 20)]  # same version again, same file
        rng.shuffle(rows)
        files.append(rows)
    return write_lake(root, files)


def reference(lake: Path) -> tuple[dict[str, str], dict[str, int]]:
    """The result of one careful sequential copy into an empty collection."""
    winners: dict[str, str] = {}
    valid = bad = 0
    for path in sorted(lake.glob("*.parquet")):
        table = pq.read_table(path)
        checked = validate(TASK_DETAIL, table)
        bad += len(checked.rejections)
        notes = table.column("notes").to_pylist()
        for key, row in zip(checked.keys, checked.rows, strict=True):
            winners[key] = notes[row]
            valid += 1
    counts = {
        "processedRecords": valid + bad,
        "insertedRecords": len(winners),
        "updatedRecords": 0,
        "unchangedRecords": 0,
        "duplicateRecords": valid - len(winners),
        "errorRecords": bad,
    }
    return winners, counts


def counts_of(s: JobStatus) -> dict[str, int]:
    return {k: getattr(s, k) for k in (
        "processedRecords", "insertedRecords", "updatedRecords", "unchangedRecords",
        "duplicateRecords", "errorRecords")}  # fmt: skip


def stored(db: Any) -> dict[str, str]:
    return {d["_id"]: d["notes"] for d in db.taskdetails.find({}, {"notes": 1})}


def assert_like_reference(s: JobStatus, db: Any, lake: Path) -> None:
    winners, expected = reference(lake)
    assert s.status == JobState.COMPLETED, (s.message, s.error)
    assert counts_of(s) == expected
    assert s.processedRecords == s.totalRecords
    assert stored(db) == winners
    assert db.copyerrors.count_documents({"jobId": s.jobId}) == s.errorRecords
    assert all(d[MARKER]["job"] == s.jobId for d in db.taskdetails.find({}, {MARKER: 1}))


def fresh(settings: Settings, lake: Path, **more: Any) -> Settings:
    return settings.model_copy(
        update={"lake_uri": str(lake), "database": "t_" + uuid.uuid4().hex[:12], **more}
    )


def run_whole(settings: Settings) -> JobStatus:
    with Runtime(settings) as rt:
        job, _ = rt.jobs.start("copy-taskdetail", {}, trusted=True)
        rt.runner.run(job.jobId)
        return rt.jobs.get(job.jobId)


def run_partitioned(settings: Settings, order: str, seed: int = 0) -> JobStatus:
    """Plan the partitions, then run each partition's runs one at a time in ``order``."""
    rt = Runtime(settings, executor="local")
    queued: list[tuple[str, int]] = []
    rt.executor.submit = lambda job_id: None  # type: ignore[method-assign,union-attr]
    rt.runner.partitioned.submit = lambda j, i: queued.append((j, i))  # type: ignore[union-attr]
    with rt:
        job, _ = rt.jobs.start("copy-taskdetail", {}, trusted=True)
        rt.runner.run(job.jobId)
        assert len(queued) >= 3, "the lake should split into several partitions"
        steps = list(queued)
        if order == "reverse":
            steps.reverse()
        elif order == "random":
            random.Random(seed).shuffle(steps)
        for step in steps:
            rt.runner.partitioned.run(*step)  # type: ignore[union-attr]
        return rt.jobs.get(job.jobId)


def database(settings: Settings) -> Any:
    uri = settings.mongodb_uri.get_secret_value() if settings.mongodb_uri else ""
    client: MongoClient[dict[str, Any]] = MongoClient(uri, tz_aware=True)
    return client[settings.database]


def test_the_plan_finds_the_records_a_later_one_replaces(tmp_path: Path) -> None:
    lake = write_lake(
        tmp_path / "lake",
        [
            [record("A", 1), record("B", 1), record("A", 2)],
            [record("B", 2, bad=True), record("C", 1), record("A", 3)],
        ],
    )
    plan = find_superseded(Lake.open(str(lake)), TASK_DETAIL)
    first = sorted(lake.glob("*.parquet"))[0]
    # A@0 and A@2 lose to A in file 2; B@1 stays (the later B is invalid); nothing in file 2
    assert {Path(f).name: list(rows) for f, rows in plan.items()} == {first.name: [0, 2]}


def plan_by_bson(lake: Path, schema: RecordSchema) -> dict[str, list[int]]:
    """The plan worked out record by record: keys compared by their BSON, last one wins."""
    last: dict[bytes, tuple[str, int]] = {}
    every: list[tuple[str, int]] = []
    for path in sorted(lake.glob("*.parquet")):
        checked = validate(schema, pq.read_table(path))
        for key, row in zip(checked.keys, checked.rows, strict=True):
            last[bson.encode({"": key})] = (path.name, row)
            every.append((path.name, row))
    winners = set(last.values())
    out: dict[str, list[int]] = {}
    for name, row in every:
        if (name, row) not in winners:
            out.setdefault(name, []).append(row)
    return out


@pytest.mark.parametrize(
    "files",
    [
        # integer keys of two widths: compared by value
        [
            pa.table({"k": pa.array([1, 2, 3], pa.int64())}),
            pa.table({"k": pa.array([2, 9], pa.int32())}),
        ],
        # the same column as integers in one file and strings in another: 1 is not "1"
        [pa.table({"k": [1, 2, 2]}), pa.table({"k": ["1", "2", "x"]}), pa.table({"k": [1]})],
        # dates: milliseconds are what is stored, so two microsecond times can be one key
        [
            pa.table(
                {
                    "k": pa.array(
                        [T0, T0 + timedelta(microseconds=10), T0 + timedelta(seconds=1)],
                        pa.timestamp("us", tz="UTC"),
                    )
                }
            ),
            pa.table({"k": pa.array([T0 + timedelta(seconds=1)], pa.timestamp("us", tz="UTC"))}),
        ],
        # strings that differ only past a NUL, and an empty file
        [pa.table({"k": ["a", "a\x00b", "a"]}), pa.table({"k": pa.array([], pa.string())})],
    ],
    ids=["ints", "ints-and-strings", "dates", "strings"],
)
def test_keys_compared_in_arrow_match_keys_compared_by_their_bson(
    tmp_path: Path, files: list[pa.Table]
) -> None:
    lake = tmp_path / "lake"
    lake.mkdir()
    for i, table in enumerate(files):
        table = table.append_column("v", pa.array(range(table.num_rows), pa.int64()))
        pq.write_table(table, lake / f"part-{i:03d}.parquet")
    schema = RecordSchema(key="k")
    plan = find_superseded(Lake.open(str(lake)), schema)
    found = {Path(f).name: list(rows) for f, rows in plan.items()}
    assert found == plan_by_bson(lake, schema)
    assert found  # every case has a repeated key


@pytest.mark.slow
def test_one_piece_and_partitions_in_any_order_give_the_same_collection_and_counts(
    settings: Settings, tmp_path: Path
) -> None:
    lake = versioned_lake(tmp_path / "lake")
    results = []
    for name in ("whole", "forward", "reverse", "random"):
        s = fresh(settings, lake, partition_rows=400, batch_size=100)
        done = run_whole(s) if name == "whole" else run_partitioned(s, name, seed=11)
        db = database(s)
        assert_like_reference(done, db, lake)
        if name != "whole":
            assert (done.partitions or 0) >= 3
        results.append((counts_of(done), stored(db)))
        # a rerun over the unchanged lake: nothing inserted, nothing updated
        again = run_whole(s) if name == "whole" else run_partitioned(s, name, seed=12)
        winners, expected = reference(lake)
        assert again.status == JobState.COMPLETED, again.error
        assert (again.insertedRecords, again.updatedRecords) == (0, 0)
        assert again.unchangedRecords == expected["insertedRecords"]
        assert again.duplicateRecords == expected["duplicateRecords"]
        assert again.errorRecords == expected["errorRecords"]
        assert stored(db) == winners
        db.client.drop_database(s.database)
    assert all(r == results[0] for r in results)


@hsettings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    data=st.lists(
        st.lists(
            st.tuples(st.integers(0, 7), st.integers(1, 4), st.booleans()), min_size=1, max_size=9
        ),
        min_size=3,
        max_size=5,
    ),
    order_seed=st.integers(0, 1000),
)
def test_property_partitioned_in_random_order_equals_the_sequential_reference(
    settings: Settings, tmp_path_factory: pytest.TempPathFactory, data: Any, order_seed: int
) -> None:
    files = [[record(f"K{k}", v, bad=b and v % 2 == 0) for k, v, b in rows] for rows in data]
    lake = write_lake(tmp_path_factory.mktemp("prop") / "lake", files)
    s = fresh(settings, lake, partition_rows=1, batch_size=2)  # a partition per file
    done = run_partitioned(s, "random", seed=order_seed)
    db = database(s)
    try:
        assert_like_reference(done, db, lake)
    finally:
        db.client.drop_database(s.database)


@pytest.mark.slow
def test_two_celery_workers_give_the_reference_result(
    settings: Settings,
    serve_env: dict[str, str],
    tmp_path: Path,
    redis_url: str,  # noqa: F811
) -> None:
    lake = versioned_lake(tmp_path / "lake", keys=1500)
    s = fresh(settings, lake, partition_rows=1000, batch_size=200)
    env = dict(
        serve_env,
        LAKESYNC_EXECUTOR="celery",
        LAKESYNC_BROKER_URL=redis_url,
        LAKESYNC_LAKE_URI=str(lake),
        LAKESYNC_DATABASE=s.database,
        LAKESYNC_PARTITION_ROWS="1000",
        LAKESYNC_BATCH_SIZE="200",
    )
    workers = [_worker(env, tmp_path / f"worker{i}.log") for i in range(2)]
    try:
        api = s.model_copy(
            update={"executor": "celery", "broker_url": __import__("pydantic").SecretStr(redis_url)}
        )
        with Runtime(api, executor="celery") as rt:
            rt.start()
            job, _ = rt.jobs.start("copy-taskdetail")
            done = wait_for(lambda: (x := rt.jobs.get(job.jobId)).state.is_final and x, 240)
    finally:
        for w in workers:
            os.killpg(w.pid, signal.SIGTERM)
        for w in workers:
            try:
                w.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(w.pid, signal.SIGKILL)
    db = database(s)
    assert (done.partitions or 0) >= 3
    assert_like_reference(done, db, lake)
    db.client.drop_database(s.database)


def test_incremental_copy_of_repeated_keys_keeps_the_last_new_version(
    settings: Settings, tmp_path: Path
) -> None:
    lake = write_lake(tmp_path / "lake", [[record(f"K{k}", 1) for k in range(50)]])
    s = fresh(settings, lake, batch_size=7)
    first = run_whole(s)
    assert first.insertedRecords == 50
    # later files: keys 0-19 changed twice (v2 then v3), key 5 once more but invalid (v4)
    more = [[record(f"K{k}", 2) for k in range(20)], [record(f"K{k}", 3) for k in range(20)]]
    more[1].append(record("K5", 4, bad=True))
    for i, rows in enumerate(more, start=1):
        pq.write_table(pa.Table.from_pylist(rows, SCHEMA), lake / f"part-{i:03d}.parquet")
    with Runtime(s) as rt:
        job, _ = rt.jobs.start("copy-taskdetail", {"mode": "incremental"}, trusted=True)
        rt.runner.run(job.jobId)
        done = rt.jobs.get(job.jobId)
    db = database(s)
    assert done.status == JobState.COMPLETED, done.error
    # read >= the watermark: the 50 v1 records (updatedAt equal to it) are read again; those
    # of keys 0-19 are replaced by v2, which v3 replaces: 40 duplicates
    counts = (done.updatedRecords, done.unchangedRecords, done.duplicateRecords)
    assert counts == (20, 30, 40) and done.errorRecords == 1 and done.insertedRecords == 0
    assert done.processedRecords == done.totalRecords == 91
    assert stored(db) == {f"K{k}": ("v3" if k < 20 else "v1") for k in range(50)}
    db.client.drop_database(s.database)
