"""Lakes whose keys repeat: one careful sequential copy is the reference for every other way.

The reference is computed here from the lake itself (the last valid record of each key in
lake order wins); the copy in one piece, partitioned copies run in forward, reverse and
random order, and Celery workers must all end with its documents and its counts.
"""

from __future__ import annotations

import json
import random
from datetime import timedelta
from pathlib import Path
from typing import Any

import bson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from bson import Decimal128, Int64, ObjectId
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from tests.helpers import (
    SCHEMA,
    T0,
    assert_like_reference,
    counts_of,
    database_of,
    drawn_files,
    fresh,
    record,
    reference,
    run_partitioned,
    run_whole,
    start_worker,
    stop_workers,
    stored,
    versioned_lake,
    wait_for,
    write_lake,
)

from lakesync import repeats
from lakesync.config import Settings
from lakesync.lake import Lake
from lakesync.models import JobState, JobStatus
from lakesync.repeats import find_superseded
from lakesync.runner import Outcome
from lakesync.runtime import Runtime
from lakesync.schema import TASK_DETAIL, RecordSchema, validate
from lakesync.typemap import MONGODB, NX_27017, ServerLimits


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


def as_mongodb_compares(key: Any) -> Any:
    """Numbers by value (1 == 1.0 == Int64(1)), as MongoDB's _id index compares them."""
    if isinstance(key, float) and key.is_integer():
        return int(key)
    return key


def plan_by_bson(lake: Path, schema: RecordSchema) -> dict[str, list[int]]:
    """The plan worked out record by record: keys compared by their BSON (numbers by
    value), last one wins."""
    last: dict[bytes, tuple[str, int]] = {}
    every: list[tuple[str, int]] = []
    for path in sorted(lake.glob("*.parquet")):
        checked = validate(schema, pq.read_table(path))
        for key, row in zip(checked.keys, checked.rows, strict=True):
            last[bson.encode({"": as_mongodb_compares(key)})] = (path.name, row)
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
        # integers and doubles: 1 and 1.0 are one key for MongoDB, 2.5 is no integer
        [pa.table({"k": [1, 2, 3]}), pa.table({"k": [1.0, 2.5, -0.0]}), pa.table({"k": [0]})],
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
    ids=["ints", "ints-and-strings", "ints-and-doubles", "dates", "strings"],
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
        db = database_of(s)
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
@given(files=drawn_files(8, 4, rows=(1, 9), files=(3, 5)), order_seed=st.integers(0, 1000))
def test_property_partitioned_in_random_order_equals_the_sequential_reference(
    settings: Settings, tmp_path_factory: pytest.TempPathFactory, files: Any, order_seed: int
) -> None:
    lake = write_lake(tmp_path_factory.mktemp("prop") / "lake", files)
    s = fresh(settings, lake, partition_rows=1, batch_size=2)  # a partition per file
    done = run_partitioned(s, "random", seed=order_seed)
    db = database_of(s)
    try:
        assert_like_reference(done, db, lake)
    finally:
        db.client.drop_database(s.database)


@pytest.mark.slow
def test_two_celery_workers_give_the_reference_result(
    settings: Settings,
    serve_env: dict[str, str],
    tmp_path: Path,
    redis_url: str,
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
    workers = [start_worker(env, tmp_path / f"worker{i}.log") for i in range(2)]
    try:
        api = s.model_copy(
            update={"executor": "celery", "broker_url": __import__("pydantic").SecretStr(redis_url)}
        )
        with Runtime(api, executor="celery") as rt:
            rt.start()
            job, _ = rt.jobs.start("copy-taskdetail")
            done = wait_for(lambda: (x := rt.jobs.get(job.jobId)).state.is_final and x, 240)
    finally:
        stop_workers(workers)
    db = database_of(s)
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
    db = database_of(s)
    assert done.status == JobState.COMPLETED, done.error
    # read >= the watermark: the 50 v1 records (updatedAt equal to it) are read again; those
    # of keys 0-19 are replaced by v2, which v3 replaces: 40 duplicates
    counts = (done.updatedRecords, done.unchangedRecords, done.duplicateRecords)
    assert counts == (20, 30, 40) and done.errorRecords == 1 and done.insertedRecords == 0
    assert done.processedRecords == done.totalRecords == 91
    assert stored(db) == {f"K{k}": ("v3" if k < 20 else "v1") for k in range(50)}
    db.client.drop_database(s.database)


def test_a_jobs_partitions_and_plan_expire_with_its_status_never_while_it_runs(
    settings: Settings, tmp_path: Path
) -> None:
    lake = versioned_lake(tmp_path / "lake", keys=150, versions=3)
    s = fresh(settings, lake, partition_rows=100, batch_size=50)
    rt = Runtime(s, executor="local")
    queued: list[tuple[str, int]] = []
    rt.executor.submit = lambda job_id: None  # type: ignore[method-assign,union-attr]
    rt.runner.partitioned.submit = lambda j, i: queued.append((j, i))  # type: ignore[union-attr]
    db = database_of(s)
    with rt:
        job, _ = rt.jobs.start("copy-taskdetail", {}, trusted=True)
        rt.runner.run(job.jobId)  # plans the repeats and the partitions
        mine = {"jobId": job.jobId}
        assert db.jobplans.count_documents(mine) >= 1 and len(queued) >= 3
        for name in ("jobpartitions", "jobplans"):  # no TTL can remove them while it runs
            assert db[name].count_documents({**mine, "expireAt": {"$exists": True}}) == 0
            ttl = [ix for ix in db[name].list_indexes() if "expireAfterSeconds" in ix]
            assert [dict(ix["key"]) for ix in ttl] == [{"expireAt": 1}]
        for step in queued:
            rt.runner.partitioned.run(*step)  # type: ignore[union-attr]
        assert rt.jobs.get(job.jobId).status == JobState.COMPLETED
    status = db.jobstatuses.find_one(mine)
    assert status is not None and status.get("expireAt") is not None
    for name in ("jobpartitions", "jobplans"):
        docs = list(db[name].find(mine))
        assert docs and all(d.get("expireAt") == status["expireAt"] for d in docs), name
    db.client.drop_database(s.database)


def test_a_plan_past_its_memory_budget_waits_on_disk_and_finds_the_same_records(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = random.Random(5)
    lake = tmp_path / "lake"
    lake.mkdir()
    for i in range(6):  # 2,000 records per file, their keys drawn from 3,000 names
        keys = [f"key-{rng.randrange(3000)}" for _ in range(2000)]
        keys[:3] = ["", "é" * 40_000, "x" * 70_000]  # empty, and longer than a hash chunk
        table = pa.table({"k": keys, "v": pa.array(range(len(keys)), pa.int64())})
        pq.write_table(table, lake / f"part-{i:03d}.parquet")
    schema = RecordSchema(key="k")
    in_memory = find_superseded(Lake.open(str(lake)), schema)
    runs: list[int] = []
    write_run = repeats._KeyLog._write_run

    def counted(log: Any) -> None:
        runs.append(1)
        write_run(log)

    monkeypatch.setattr(repeats, "_PLAN_MEMORY", 20_000)
    monkeypatch.setattr(repeats._KeyLog, "_write_run", counted)
    spill = tmp_path / "data" / "plans"
    spilled = find_superseded(Lake.open(str(lake)), schema, spill=spill)
    assert len(runs) >= 2  # it did wait on disk, in more than one run
    assert list(spill.iterdir()) == []  # and cleaned up
    as_lists = {Path(f).name: list(r) for f, r in spilled.items()}
    assert as_lists == {Path(f).name: list(r) for f, r in in_memory.items()}
    assert as_lists == plan_by_bson(lake, schema)


@pytest.mark.parametrize(
    "values",
    [
        [0, 1, -1, 2**63 - 1, -(2**63), 10**12],
        ["", "a", "é", "ab" * 50_000, "a\x00b", "1"],
    ],
    ids=["integers", "strings"],
)
@pytest.mark.parametrize("limits", [MONGODB, NX_27017], ids=["mongodb", "nx"])
def test_a_key_hashes_alike_whether_read_column_wise_or_value_by_value(
    values: list[Any], limits: ServerLimits
) -> None:
    kind = pa.int64() if isinstance(values[0], int) else pa.large_string()
    fast = (
        repeats._int_keys(pa.array(values, kind), limits)
        if kind == pa.int64()
        else repeats._str_keys(pa.array(values, kind))
    )
    slow = repeats._value_keys(values, limits)
    assert list(fast[0]) == list(slow[0])
    assert fast[1].to_pylist() == slow[1].to_pylist()
    assert len(set(fast[0].tolist())) == len(values)  # no two of these share a hash


def test_keys_as_mongodb_compares_them() -> None:
    same = [1, 1.0, Int64(1), Decimal128("1"), Decimal128("1.000")]
    assert len({repeats._value_keys([k], MONGODB)[1][0].as_py() for k in same}) == 1
    apart = [1, True, "1", 1.5, Decimal128("1.5000001"), None, {"a": 1}, {"a": "1"}]
    found = {repeats._value_keys([k], MONGODB)[1][0].as_py() for k in apart}
    assert len(found) == len(apart)
    # past int64: decimals stay exact, and meet a double only where it is that very number
    big = [Decimal128(str(2**64 - 1)), Decimal128(str(2**64 - 2)), Decimal128(str(2**64))]
    assert len({repeats._value_keys([k], MONGODB)[1][0].as_py() for k in big}) == 3
    assert repeats.canonical_key(big[2]) == repeats.canonical_key(2.0**64)
    # composite keys compare their values by value too
    assert repeats.canonical_key({"a": 1.0, "b": "x"}) == {"a": 1, "b": "x"}


def test_the_embedded_server_refuses_the_later_of_two_keys_it_cannot_tell_apart(
    tmp_path: Path,
) -> None:
    lake = tmp_path / "lake"
    lake.mkdir()
    oid = ObjectId()
    files = [
        [1, 2],  # 1 replaced by the 1 of the last file
        ["1", "x", "2", str(oid)],  # "1" is now the earlier key; "2" comes after 2
        [1],
    ]
    for i, keys in enumerate(files):
        pq.write_table(pa.table({"k": keys}), lake / f"part-{i}.parquet")
    pq.write_table(pa.table({"k": pa.array([oid.binary], pa.binary(12))}), lake / "part-3.parquet")
    schema = RecordSchema(key="k")
    on_mongodb = repeats.plan_lake(Lake.open(str(lake)), schema, limits=MONGODB)
    assert {Path(f).name: list(r) for f, r in on_mongodb.superseded.items()} == {
        "part-0.parquet": [0]
    }
    assert on_mongodb.refused == {}
    on_nx = repeats.plan_lake(Lake.open(str(lake)), schema, limits=NX_27017)
    assert on_mongodb.superseded.keys() == on_nx.superseded.keys()
    refused = {Path(f).name: r for f, r in on_nx.refused.items()}
    assert {f: [row for row, _ in r] for f, r in refused.items()} == {
        "part-1.parquet": [2],
        "part-2.parquet": [0],
    }
    assert refused["part-1.parquet"][0][1].startswith(
        'nx-27017 cannot tell _id "2" from 2, the key of an earlier record'
    )
    assert refused["part-2.parquet"][0][1].startswith('nx-27017 cannot tell _id 1 from "1"')


def _copy(settings: Settings, lake: Path, fmt: str) -> tuple[JobStatus, Any]:
    """A copy of ``lake`` keyed by its ``id`` column (every other column kept)."""
    ops = settings.data_dir.parent / f"ops-{fmt}.toml"
    ops.write_text(
        f'[operations.ids]\nsource = "{lake}"\nformat = "{fmt}"\ncollection = "things"\n'
        'key = "id"\n[operations.ids.schema]\nkeepExtra = true\n'
    )
    with Runtime(settings.model_copy(update={"operations_file": ops})) as rt:
        status, _ = rt.jobs.start("ids", {}, trusted=True)
        for _ in range(100):
            if rt.runner.run(status.jobId) is not Outcome.CONTINUE:
                break
        final = rt.jobs.get(status.jobId)
        reasons = [e["reason"] for e in rt.store.copyerrors.find({"jobId": status.jobId})]
    return final, reasons


def _written(lake: Path, fmt: str, files: list[list[tuple[Any, str]]]) -> None:
    lake.mkdir()
    for i, rows in enumerate(files):
        path = lake / f"part-{i}.{fmt}"
        if fmt == "csv":
            path.write_text("id,v\n" + "".join(f"{k},{v}\n" for k, v in rows))
        elif fmt == "json":
            path.write_text("".join(json.dumps({"id": k, "v": v}) + "\n" for k, v in rows))
        else:
            ids = [k for k, _ in rows]
            kind = pa.int64() if isinstance(ids[0], int) else pa.string()
            pq.write_table(pa.table({"id": pa.array(ids, kind), "v": [v for _, v in rows]}), path)


@pytest.mark.parametrize(
    ("fmt", "files", "documents", "refused"),
    [
        # CSV and NDJSON type each file by itself: 1 in the first file, "1" in the second
        ("csv", [[(1, "a")], [("1", "c"), ("x", "d")]], {1: "a", "x": "d"}, 1),
        ("json", [[(1, "a")], [("1", "c"), ("x", "d")]], {1: "a", "x": "d"}, 1),
        (
            "parquet",
            [
                [(k, f"int {k}") for k in range(1, 7)],
                [(str(k), f"text {k}") for k in range(4, 9)],
            ],
            {
                **{k: f"int {k}" for k in range(1, 7)},
                **{str(k): f"text {k}" for k in range(7, 9)},
            },
            3,  # "4", "5" and "6"
        ),
    ],
    ids=["csv", "ndjson", "parquet"],
)
def test_keys_of_mixed_types_settle_on_the_embedded_server(
    settings: Settings,
    tmp_path: Path,
    fmt: str,
    files: list[list[tuple[Any, str]]],
    documents: dict[Any, str],
    refused: int,
) -> None:
    lake = tmp_path / "lake"
    _written(lake, fmt, files)
    db = database_of(settings)
    try:
        first, reasons = _copy(settings, lake, fmt)
        assert first.status == JobState.COMPLETED, first.error
        stored = {d["_id"]: d["v"] for d in db.things.find()}
        if fmt == "csv":  # an undeclared CSV key is read as text in every file: 1 is "1"
            assert stored == {"1": "c", "x": "d"}
            assert (first.insertedRecords, first.duplicateRecords) == (2, 1)
        else:
            assert stored == documents
            assert (first.insertedRecords, first.errorRecords) == (len(documents), refused)
            assert len(reasons) == refused
            assert all(r.startswith("nx-27017 cannot tell _id ") for r in reasons), reasons
        for _ in range(2):  # every rerun over the unchanged lake writes nothing
            again, _ = _copy(settings, lake, fmt)
            assert again.status == JobState.COMPLETED, again.error
            assert (again.insertedRecords, again.updatedRecords) == (0, 0)
            assert again.unchangedRecords == first.insertedRecords
            assert again.errorRecords == first.errorRecords
            assert {d["_id"]: d["v"] for d in db.things.find()} == stored
    finally:
        db.client.drop_database(settings.database)


def test_the_columns_kept_at_open_stop_at_their_budget_and_read_the_same(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lakesync.sources import parquet as lake_module

    root = tmp_path / "lake"
    root.mkdir()
    for i in range(6):
        keys = [f"K{i}-{n}" for n in range(1000)]
        pq.write_table(pa.table({"k": keys, "v": range(1000)}), root / f"part-{i}.parquet")
    whole = [b.table for b in Lake.open(str(root)).batches(700, columns=["k"])]
    monkeypatch.setattr(lake_module, "_KEEP_BYTES", 20_000)  # about two files' keys
    lake = Lake.open(str(root), keep=["k"])
    assert lake._kept is not None and 1 <= len(lake._kept._where) < 6
    kept = [b.table for b in lake.batches(700, columns=["k"])]
    assert pa.concat_tables(kept).equals(pa.concat_tables(whole))
    assert find_superseded(lake, RecordSchema(key="k")) == {}


def test_plan_assembly_holds_twelve_bytes_per_superseded_record() -> None:
    """The superseded positions of every bucket, per file: sorted rows, equal to sorting them
    all at once, with at most 12 bytes per position allocated at once beyond the buckets'
    own lists (issue #27: the concatenate, sort and split it replaced took 28 more)."""
    import tracemalloc

    import numpy as np

    rng = np.random.default_rng(7)
    n, files = 400_000, 300
    positions = (rng.integers(0, files, n).astype(np.int64) << 32) | rng.integers(0, 9000, n)
    names = [f"part-{i}.parquet" for i in range(files + 5)]  # some files supersede nothing
    every = np.sort(positions)
    expected = {
        names[f]: (every[every >> 32 == f] & 0xFFFFFFFF).astype(np.uint32)
        for f in np.unique(every >> 32).tolist()
    }
    losers = [np.sort(part) for part in np.array_split(positions, 40)]
    del positions, every
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        got = repeats._by_file(losers, names)
        peak = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    assert losers == []
    assert got.keys() == expected.keys()
    for name, rows in expected.items():
        assert got[name].dtype == np.uint32
        assert np.array_equal(got[name], rows)
    assert peak <= 12.5 * n, f"{peak / n:.1f} bytes per superseded record at once"
