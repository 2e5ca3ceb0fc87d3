"""Tables read as their own engine reads them: Delta in commit order (deltalake's
``QueryBuilder`` is the oracle), table folders never read as loose files, compressed text
and ORC files read as the same data uncompressed (DuckDB is the independent reader)."""

from __future__ import annotations

import bz2
import gzip
import json
import os
import random
import signal
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.orc as orc
import pyarrow.parquet as pq
import pytest
import zstandard
from deltalake import DeltaTable, QueryBuilder, write_deltalake
from tests.helpers import (
    SCHEMA,
    T0,
    child_env,
    counts_of,
    database_of,
    fresh,
    record,
    run_partitioned,
    run_whole,
    stored,
    wait_for,
)

from lakesync.config import Settings
from lakesync.errors import SourceError
from lakesync.lake import Lake
from lakesync.models import JobState, JobStatus
from lakesync.runtime import Runtime

KEYS = 40


# -- Delta: the oracle ------------------------------------------------------------------------


def oracle(table: Path) -> tuple[dict[str, str], int]:
    """deltalake's own reading of the table's live rows: the newest version (by updatedAt,
    which grows with every write here) of every key, and the number of live rows."""
    reader = QueryBuilder().register("t", DeltaTable(str(table))).execute("select * from t")
    rows = pa.table(reader.read_all()).to_pylist()
    newest: dict[str, dict[str, Any]] = {}
    for row in rows:
        seen = newest.get(row["taskDetailId"])
        if seen is None or row["updatedAt"] > seen["updatedAt"]:
            newest[row["taskDetailId"]] = row
    return {k: r["notes"] for k, r in newest.items()}, len(rows)


def versions(rng: random.Random, first: int, last: int, every: bool = True) -> list[pa.Table]:
    """One table per version: a random part of the keys, some of them twice (the same
    version twice in a row, as a file may hold it); with ``every``, every key in the first
    version."""
    out = []
    for v in range(first, last + 1):
        keys = [f"K{k:03d}" for k in range(KEYS) if (every and v == first) or rng.random() < 0.5]
        rows = [record(k, v) for k in keys] + [record(k, v) for k in rng.sample(keys, 3)]
        rng.shuffle(rows)
        out.append(pa.Table.from_pylist(rows, SCHEMA))
    return out


def appended(path: Path, tables: list[pa.Table], **options: Any) -> None:
    for table in tables:
        write_deltalake(str(path), table, mode="append", **options)


def check(done: JobStatus, db: Any, table: Path, *, before: dict[str, str] | None) -> None:
    """The collection is the oracle's newest version of every key; the counts are exact
    against the collection as it was (``before``) and the table's live rows."""
    newest, live = oracle(table)
    assert done.status == JobState.COMPLETED, (done.message, done.error)
    c = counts_of(done)
    parts = sum(c[k] for k in c if k != "processedRecords")
    assert c["processedRecords"] == parts == done.totalRecords
    assert stored(db) == newest
    assert done.options.get("deltaVersion") == DeltaTable(str(table)).version()
    if done.options.get("mode", "full") == "full":
        assert done.totalRecords == live
        assert c["duplicateRecords"] == live - len(newest) and c["errorRecords"] == 0
        if before is not None:
            inserted = sum(1 for k in newest if k not in before)
            updated = sum(1 for k, v in newest.items() if k in before and before[k] != v)
            assert (c["insertedRecords"], c["updatedRecords"]) == (inserted, updated)


def incremental(settings: Settings) -> JobStatus:
    with Runtime(settings) as rt:
        job, _ = rt.jobs.start("copy-taskdetail", {"mode": "incremental"}, trusted=True)
        rt.runner.run(job.jobId)
        return rt.jobs.get(job.jobId)


def full(settings: Settings, how: str, seed: int) -> JobStatus:
    return run_whole(settings) if how == "whole" else run_partitioned(settings, how, seed)


def rerun_changes_nothing(settings: Settings, how: str, db: Any, table: Path) -> None:
    again = full(settings, how, seed=99)
    check(again, db, table, before=stored(db))
    assert (again.insertedRecords, again.updatedRecords) == (0, 0)


@pytest.mark.parametrize("how", ["whole", "reverse", "random"])
def test_delta_appends_deletes_overwrites_and_new_columns_copy_as_deltalake_reads_them(
    settings: Settings, tmp_path: Path, how: str
) -> None:
    """Ten appends of the same keys (delta-rs names files part-00000-<uuid>: their names
    say nothing of their order), then a full copy, a rerun, changes to the table, an
    incremental copy, and a full copy again: each time the collection equals deltalake's
    newest version of every key, in one piece or in partitions run in any order."""
    rng = random.Random(len(how))
    table = tmp_path / "t"
    appended(table, versions(rng, 1, 10), partition_by=["projectId"])
    s = fresh(settings, table, partition_rows=20, batch_size=16)
    db = database_of(s)
    first = full(s, how, seed=1)
    check(first, db, table, before={})
    if how != "whole":
        assert (first.partitions or 0) >= 3
    rerun_changes_nothing(s, how, db, table)

    # deletes of old versions (delta-rs rewrites the files holding them: the rows carried
    # over must not come after newer versions), then more appends
    # of a few keys (the file keeps the other keys' old versions), and only versions a
    # newer one replaces (without mirror mode a copy deletes nothing); one version's file
    # (a rewrite merging files of several versions is the README's limit)
    newest, live = oracle(table)
    old = sorted(k for k, v in newest.items() if v != "v2")[:5]
    keys = ", ".join(f"'{k}'" for k in old)
    DeltaTable(str(table)).delete(f"notes = 'v2' and taskDetailId in ({keys})")
    assert oracle(table)[0] == newest and oracle(table)[1] < live
    done = incremental(s)  # the rewritten files hold no new version
    assert done.status == JobState.COMPLETED, done.error
    assert (done.insertedRecords, done.updatedRecords) == (0, 0) and stored(db) == newest
    after_delete = full(s, how, seed=4)
    check(after_delete, db, table, before=stored(db))
    assert (after_delete.insertedRecords, after_delete.updatedRecords) == (0, 0)
    appended(table, versions(rng, 11, 12, every=False), partition_by=["projectId"])
    before = stored(db)
    done = incremental(s)
    assert done.status == JobState.COMPLETED, done.error
    newest, _ = oracle(table)
    assert stored(db) == newest
    assert done.insertedRecords == 0 and done.updatedRecords == sum(
        1 for k, v in newest.items() if before.get(k) != v
    )
    again = full(s, how, seed=2)  # a full copy after an incremental one: the same collection
    check(again, db, table, before=stored(db))
    assert (again.insertedRecords, again.updatedRecords) == (0, 0)

    # an overwrite with a new column (schema evolution), then appends of the new schema
    wide = versions(rng, 20, 21)
    wide = [t.append_column("priority", pa.array([i % 3 for i in range(len(t))])) for t in wide]
    write_deltalake(
        str(table), pa.concat_tables(wide), mode="overwrite", schema_mode="merge",
        partition_by=["projectId"],
    )  # fmt: skip
    appended(table, versions(rng, 22, 24), schema_mode="merge", partition_by=["projectId"])
    before = stored(db)
    done = incremental(s)
    assert done.status == JobState.COMPLETED, done.error
    assert stored(db) == oracle(table)[0]
    final = full(s, how, seed=3)
    check(final, db, table, before=stored(db))
    assert (final.insertedRecords, final.updatedRecords) == (0, 0)
    rerun_changes_nothing(s, how, db, table)
    db.client.drop_database(s.database)


def upsert(path: Path, table: pa.Table) -> None:
    """A MERGE of ``table`` on the key: matched rows updated (their files rewritten),
    others inserted; the table keeps one row per key."""
    (
        DeltaTable(str(path))
        .merge(table, "t.taskDetailId = s.taskDetailId", source_alias="s", target_alias="t")
        .when_matched_update_all()
        .when_not_matched_insert_all()
        .execute()
    )


def one_per_key(t: pa.Table) -> pa.Table:
    return pa.Table.from_pylist(
        list({r["taskDetailId"]: r for r in t.to_pylist()}.values()), SCHEMA
    )


def test_optimize_after_merges_copies_the_newest_of_every_key(
    settings: Settings, tmp_path: Path
) -> None:
    """OPTIMIZE (delta-rs ``optimize.compact``) merges the live rows of files of many
    versions into one file, with no per-row version left. A table updated by MERGE holds one
    live row per key, so the compacted file holds only the newest version of each: full,
    incremental and full copies again equal deltalake's reading, and reruns change nothing."""
    rng = random.Random(11)
    table = tmp_path / "t"
    first, *later = versions(rng, 1, 8)
    write_deltalake(str(table), one_per_key(first), partition_by=["projectId"])
    for v, t in enumerate(later[:4], 2):  # keys updated (files rewritten), others appended
        upsert(table, one_per_key(t))
        new = [record(f"N{v}{k}", v) for k in range(5)]
        write_deltalake(str(table), pa.Table.from_pylist(new, SCHEMA), mode="append")
    s = fresh(settings, table, partition_rows=15, batch_size=8)
    db = database_of(s)
    check(run_whole(s), db, table, before={})
    assert oracle(table)[1] == len(oracle(table)[0])  # one live row per key
    files_before = len(DeltaTable(str(table)).file_uris())
    DeltaTable(str(table)).optimize.compact()
    assert len(DeltaTable(str(table)).file_uris()) < files_before
    done = incremental(s)  # the compacted file holds no new version
    assert done.status == JobState.COMPLETED, done.error
    assert (done.insertedRecords, done.updatedRecords) == (0, 0) and stored(db) == oracle(table)[0]
    rerun_changes_nothing(s, "whole", db, table)  # (one file now: one partition)
    for t in later[4:]:  # updates after the compaction, then compacted again
        upsert(table, one_per_key(t))
    done = incremental(s)
    assert done.status == JobState.COMPLETED, done.error
    assert stored(db) == oracle(table)[0]
    DeltaTable(str(table)).optimize.compact()
    check(run_whole(s), db, table, before=stored(db))
    db.client.drop_database(s.database)


def appended_updates(path: Path, rng: random.Random, first: int, last: int) -> dict[str, set[int]]:
    """Versions ``first``..``last`` appended, each a newer version of a random part of 120
    keys (all of them in the first), the keys spread over three partitions; the versions
    written of each key, tracked here (deltalake's reading is a bag of rows)."""
    written: dict[str, set[int]] = {}
    for v in range(first, last + 1):
        keys = [k for k in range(120) if v == first or rng.random() < 0.6]
        rows = [record(f"K{k:03d}", v) | {"projectId": f"PRJ-{k % 3}"} for k in keys]
        write_deltalake(
            str(path), pa.Table.from_pylist(rows, SCHEMA), mode="append",
            partition_by=["projectId"],
        )  # fmt: skip
        for k in keys:
            written.setdefault(f"K{k:03d}", set()).add(v)
    return written


def newest_of(written: dict[str, set[int]]) -> dict[str, str]:
    return {k: f"v{max(vs)}" for k, vs in written.items()}


def test_deletes_and_compactions_that_merge_versions_keep_the_newest_of_every_key(
    settings: Settings, tmp_path: Path
) -> None:
    """A delta-rs DELETE, then OPTIMIZE, write rows of many versions into one file per
    partition, in their own order. The files they rewrote are still there (no vacuum), so
    each row is traced to the row it was copied from and takes that row's place: full,
    incremental and full copies (whole and partitioned) hold the newest version of every
    key that is left, with no warning. Once vacuum removes those files, the warning is
    back."""
    rng = random.Random(25)
    table = tmp_path / "t"
    written = appended_updates(table, rng, 1, 6)
    s = fresh(settings, table, partition_rows=40, batch_size=16)
    db = database_of(s)
    check(run_whole(s), db, table, before={})
    assert stored(db) == newest_of(written)

    # the even versions of every 7th key: where it was the newest, an older one is now
    sevens = [f"K{k:03d}" for k in range(0, 120, 7)]
    keys = ", ".join(repr(k) for k in sevens)
    DeltaTable(str(table)).delete(f"taskDetailId in ({keys}) and notes in ('v2', 'v4', 'v6')")
    for k in sevens:
        written[k] -= {2, 4, 6}
    assert oracle(table)[0] == newest_of(written)  # deltalake's newest is the one tracked
    assert {d.kind for d in Lake.open(str(table)).doubts if d} == {"rebuilt"}  # traceable
    for how in ("whole", "random"):
        before = stored(db)
        done = full(s, how, seed=5)
        check(done, db, table, before=before)
        assert stored(db) == newest_of(written) and "Warning" not in (done.message or "")

    for k, vs in appended_updates(table, rng, 7, 7).items():
        written[k] |= vs
    done = incremental(s)
    assert done.status == JobState.COMPLETED, done.error
    assert stored(db) == newest_of(written) and "Warning" not in (done.message or "")
    DeltaTable(str(table)).optimize.compact()  # rewrites the DELETE's files and the new ones
    assert len(DeltaTable(str(table)).file_uris()) == 3
    assert oracle(table)[0] == newest_of(written)
    done = incremental(s)  # the compacted files hold no new version
    assert done.status == JobState.COMPLETED, done.error
    assert (done.insertedRecords, done.updatedRecords) == (0, 0)
    assert stored(db) == newest_of(written)
    for how in ("whole", "random"):
        before = stored(db)
        done = full(s, how, seed=6)
        check(done, db, table, before=before)
        assert (done.insertedRecords, done.updatedRecords) == (0, 0)
        assert stored(db) == newest_of(written) and "Warning" not in (done.message or "")

    # vacuum removes the files the rewrites read: their rows cannot be traced any more
    DeltaTable(str(table)).vacuum(
        retention_hours=0, enforce_retention_duration=False, dry_run=False
    )
    assert {d.kind for d in Lake.open(str(table)).doubts if d} == {"merged"}
    done = run_whole(s)
    assert done.status == JobState.COMPLETED, done.error
    message = done.message or ""
    assert "Warning: for " in message and "merged rewrite of versions 0..7" in message
    db.client.drop_database(s.database)


def test_ten_appends_of_one_key_end_with_the_tenth(settings: Settings, tmp_path: Path) -> None:
    """The issue's case: v1..v10 of K appended, the copy holds v10 with 9 duplicates; after
    an incremental copy of v11, a full copy changes nothing."""
    table = tmp_path / "t"
    for v in range(1, 11):
        write_deltalake(str(table), pa.Table.from_pylist([record("K", v)], SCHEMA), mode="append")
    s = fresh(settings, table)
    db = database_of(s)
    done = run_whole(s)
    assert stored(db) == {"K": "v10"} and done.duplicateRecords == 9
    write_deltalake(str(table), pa.Table.from_pylist([record("K", 11)], SCHEMA), mode="append")
    assert incremental(s).updatedRecords == 1 and stored(db) == {"K": "v11"}
    again = run_whole(s)
    assert (again.insertedRecords, again.updatedRecords, again.unchangedRecords) == (0, 0, 1)
    assert stored(db) == {"K": "v11"}
    db.client.drop_database(s.database)


def test_files_known_only_from_a_checkpoint_come_first_by_modification_time(
    settings: Settings, tmp_path: Path
) -> None:
    """A log cleaned up after a checkpoint: the files whose commit JSON is gone are read
    before those still in a commit, by modification time (the README's fallback)."""
    table = tmp_path / "t"
    rng = random.Random(7)
    for t in versions(rng, 1, 6):
        write_deltalake(str(table), t, mode="append")
        os.utime(table, None)
    DeltaTable(str(table)).create_checkpoint()
    for v in range(0, 5):  # commits 0-4 gone, as log retention leaves it
        (table / "_delta_log" / f"{v:020d}.json").unlink()
    appended(table, versions(rng, 7, 8))
    lake = Lake.open(str(table))
    assert lake.version == 7
    s = fresh(settings, table)
    db = database_of(s)
    check(run_whole(s), db, table, before={})
    db.client.drop_database(s.database)


def test_a_killed_copy_of_a_delta_table_resumes_in_commit_order(
    slow_settings: Settings, settings: Settings, tmp_path: Path
) -> None:
    """SIGKILL in the middle of a copy (batches of 5 through a slow link), then the job is
    taken over and finished: the collection is deltalake's newest of every key."""
    table = tmp_path / "t"
    appended(table, versions(random.Random(3), 1, 8))
    s = fresh(slow_settings, table)
    env = child_env(s, LAKESYNC_LEASE_SECONDS="2", LAKESYNC_BATCH_SIZE="5")
    child = subprocess.Popen(
        [sys.executable, "-m", "lakesync", "copy", "--json"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    db = database_of(s)
    try:
        job = wait_for(
            lambda: db.jobstatuses.find_one({"processedRecords": {"$gte": 40}}), timeout=120
        )
        child.send_signal(signal.SIGKILL)
        child.wait(30)
    finally:
        child.kill()
    assert job["processedRecords"] < job["totalRecords"]
    resumed = settings.model_copy(
        update={"database": s.database, "lake_uri": str(table), "lease_seconds": 2}
    )
    with Runtime(resumed) as rt:

        def finished() -> bool:
            rt.runner.run(job["jobId"])
            return rt.jobs.get(job["jobId"]).status == JobState.COMPLETED

        wait_for(finished, timeout=120, every=0.5)
        done = rt.jobs.get(job["jobId"])
    check(done, db, table, before=None)
    assert done.insertedRecords == KEYS
    db.client.drop_database(s.database)


def test_spark_deletion_vectors_keep_their_files_place(tmp_path: Path) -> None:
    """A Spark table whose deletes wrote deletion vectors (the same file added again): the
    lake's rows are deltalake's live rows, each file where its first add put it."""
    from tests.test_types import _fixtures

    table = _fixtures() / "table_with_deletion_logs"
    lake = Lake.open(str(table))
    reader = QueryBuilder().register("t", DeltaTable(str(table))).execute("select * from t")
    want = pa.table(reader.read_all())
    got = pa.concat_tables(b.table for b in lake.batches(1000))
    assert got.num_rows == want.num_rows == lake.count_rows() == 98

    def rows(t: pa.Table) -> list[str]:
        return sorted(json.dumps(r, default=str, sort_keys=True) for r in t.to_pylist())

    assert rows(got) == rows(want.select(got.column_names))


# -- table folders are never loose files --------------------------------------------------------


def test_table_folders_are_read_as_tables_or_refused(tmp_path: Path) -> None:
    delta = tmp_path / "lake" / "orders"
    write_deltalake(str(delta), pa.table({"id": [1, 2]}), partition_by=None)
    write_deltalake(str(delta), pa.table({"id": [3]}), mode="append")
    DeltaTable(str(delta)).delete("id = 1")
    iceberg = tmp_path / "lake" / "events"
    (iceberg / "metadata").mkdir(parents=True)
    (iceberg / "data").mkdir()
    (iceberg / "metadata" / "00001-abc.metadata.json").write_text('{"format-version": 2}')
    pq.write_table(pa.table({"id": [1]}), iceberg / "data" / "00000-0-abc.parquet")
    (tmp_path / "lake" / "loose.parquet").parent.mkdir(exist_ok=True)
    pq.write_table(pa.table({"id": [9]}), tmp_path / "lake" / "loose.parquet")

    assert Lake.open(str(delta)).count_rows() == 2  # the table, its live rows
    for source in (f"{delta}/*.parquet", f"{delta}/**/*.parquet", f"{delta}/**"):
        with pytest.raises(SourceError, match=f"files of the Delta table {delta} as loose"):
            Lake.open(source)
    one = next(p for p in delta.glob("*.parquet"))
    with pytest.raises(SourceError, match="Delta table"):
        Lake.open(str(one))
    # read as an Iceberg table (tests/test_iceberg.py), whose metadata here is not valid
    with pytest.raises(SourceError, match=r"Iceberg table metadata .* cannot be read"):
        Lake.open(str(iceberg))
    with pytest.raises(SourceError, match=r"Iceberg table metadata .* cannot be read"):
        Lake.open(str(iceberg), format="iceberg")
    for source in (f"{iceberg}/data/*.parquet", f"{iceberg}/data", f"{iceberg}/**/*.parquet"):
        with pytest.raises(SourceError, match=f"Iceberg table {iceberg}") as e:
            Lake.open(source)
        assert "*" not in str(e.value).replace(source, "")  # no glob into it suggested
    for source in (str(tmp_path / "lake"), f"{tmp_path}/lake/**/*.parquet"):
        with pytest.raises(SourceError, match=r"holds the (Delta|Iceberg) table"):
            Lake.open(source)
    assert Lake.open(f"{tmp_path}/lake/*.parquet").count_rows() == 1  # beside the tables
    with pytest.raises(SourceError, match="not an Iceberg table"):
        Lake.open(f"{tmp_path}/lake/loose.parquet", format="iceberg")


# -- compressed text and ORC --------------------------------------------------------------------


def _records(n: int) -> pa.Table:
    rows = [record(f"K{i:04d}", i % 7) for i in range(n)]
    for i, r in enumerate(rows):
        r["notes"] = f'note {i}, with a comma and "quotes"' if i % 5 else f"é {i}"
        r["updatedAt"] = T0 + timedelta(seconds=i)
    return pa.Table.from_pylist(rows, SCHEMA).drop_columns(["tags"])


def _compress(data: bytes, codec: str) -> bytes:
    if codec == "gz":
        return gzip.compress(data)
    if codec == "bz2":
        return bz2.compress(data)
    return zstandard.ZstdCompressor().compress(data)


def test_compressed_text_and_orc_read_as_the_same_data_uncompressed(tmp_path: Path) -> None:
    """Each compressed CSV/NDJSON/JSON-array file reads as its uncompressed original (which
    DuckDB reads independently), and ORC as the Parquet file of the same table."""
    import duckdb

    table = _records(2500)
    plain_csv, plain_json = tmp_path / "plain.csv", tmp_path / "plain.ndjson"
    pacsv.write_csv(table, plain_csv)
    lines = [json.dumps(r, default=str) for r in table.to_pylist()]
    plain_json.write_text("\n".join(lines) + "\n")
    array = ("[" + ",\n".join(lines) + "]").encode()
    want_csv = duckdb.sql(f"select * from read_csv('{plain_csv}')").fetch_arrow_table()
    assert want_csv.num_rows == 2500

    def rows(uri: str) -> list[dict[str, Any]]:
        lake = Lake.open(uri)
        got = [r for b in lake.batches(333) for r in b.table.to_pylist()]
        assert len(got) == lake.count_rows()
        return got

    csv_rows, json_rows = rows(str(plain_csv)), rows(str(plain_json))
    assert [r["taskDetailId"] for r in csv_rows] == want_csv["taskDetailId"].to_pylist()
    assert [r["notes"] for r in csv_rows] == want_csv["notes"].to_pylist()
    assert [r["hoursLogged"] for r in csv_rows] == want_csv["hoursLogged"].to_pylist()
    for codec in ("gz", "zst", "bz2"):
        for name, data, want in (
            (f"a.csv.{codec}", plain_csv.read_bytes(), csv_rows),
            (f"a.ndjson.{codec}", plain_json.read_bytes(), json_rows),
            (f"a.jsonl.{codec}", plain_json.read_bytes(), json_rows),
            (f"arr.json.{codec}", array, json_rows),
        ):
            folder = tmp_path / codec / name.replace(".", "_")
            folder.mkdir(parents=True)
            (folder / name).write_bytes(_compress(data, codec))
            assert rows(str(folder / name)) == want, name  # named as the source
            assert rows(str(folder)) == want, name  # found in a folder
    orc.write_table(table, tmp_path / "t.orc", stripe_size=64 << 10)
    pq.write_table(table, tmp_path / "t.parquet")
    orc_lake = Lake.open(str(tmp_path / "t.orc"))
    assert orc_lake.format == "orc"
    as_orc, as_parquet = rows(str(tmp_path / "t.orc")), rows(str(tmp_path / "t.parquet"))
    assert as_orc == as_parquet  # ORC keeps timestamps as ns: the same instants
    assert duckdb.sql(f"select count(*) from read_csv('{tmp_path}/gz/a_csv_gz/a.csv.gz')")


def test_compressed_text_in_capitals_reads_decompressed(tmp_path: Path) -> None:
    """DATA.CSV.GZ (as Windows tools name files) is compressed as data.csv.gz is: pyarrow
    knows a codec by its lower-case extension only, and read such a file raw."""
    for codec in ("gz", "zst", "bz2", "zstd"):
        folder = tmp_path / codec
        folder.mkdir()
        data = _compress(b"id,n\n007,1\n", "zst" if codec == "zstd" else codec)
        (folder / f"A.CSV.{codec.upper()}").write_bytes(data)
        (folder / f"b.json.{codec.upper()}").write_bytes(
            _compress(b'[{"id": "008", "n": 2}]', "zst" if codec == "zstd" else codec)
        )
        for name, want in ((f"A.CSV.{codec.upper()}", 1), (f"b.json.{codec.upper()}", 2)):
            lake = Lake.open(str(folder / name))
            assert [r["n"] for b in lake.batches(10) for r in b.table.to_pylist()] == [want]


def test_unsupported_extensions_are_refused_by_name(tmp_path: Path) -> None:
    for name in ("book.xlsx", "events.avro", "a.csv.lz4", "a.parquet.gz", "a.json.xz"):
        (tmp_path / name).write_bytes(b"data")
        with pytest.raises(SourceError, match=r"is a \.[a-z.0-9]+ file.*It reads \.parquet") as e:
            Lake.open(str(tmp_path / name))
        assert name.split(".", 1)[1] in str(e.value)
        (tmp_path / name).unlink()
    (tmp_path / "a.csv").write_text("id\n1\n")
    (tmp_path / "b.csv.lz4").write_bytes(b"data")  # in a folder: not silently left out
    with pytest.raises(SourceError, match=r"b\.csv\.lz4 is a \.csv\.lz4 file"):
        Lake.open(str(tmp_path))
    (tmp_path / "b.csv.lz4").unlink()
    (tmp_path / "notes.txt").write_text("id\n2\n3\n")
    assert Lake.open(str(tmp_path)).count_rows() == 1  # other files in a folder: skipped
    assert Lake.open(str(tmp_path / "notes.txt"), format="csv").count_rows() == 2  # as told


def test_an_operation_reads_orc_and_compressed_csv(settings: Settings, tmp_path: Path) -> None:
    """format = "orc" in lakesync.toml, and a folder of .csv.gz files: the documents of the
    same records."""
    table = _records(300)
    (tmp_path / "orc").mkdir()
    orc.write_table(table.slice(0, 200), tmp_path / "orc" / "part-0.orc")
    orc.write_table(table.slice(200), tmp_path / "orc" / "part-1.orc")
    (tmp_path / "gz").mkdir()
    for i in (0, 1):
        pacsv.write_csv(table.slice(i * 150, 150), tmp_path / "part.csv")
        data = (tmp_path / "part.csv").read_bytes()
        (tmp_path / "gz" / f"part-{i}.csv.gz").write_bytes(gzip.compress(data))
    toml = tmp_path / "lakesync.toml"
    toml.write_text(
        f'[operations.from-orc]\nsource = "{tmp_path}/orc"\nformat = "orc"\n'
        'collection = "orders"\nkey = "taskDetailId"\n'
        f'[operations.from-gz]\nsource = "{tmp_path}/gz"\nformat = "csv"\n'
        'collection = "fromgz"\nkey = "taskDetailId"\n'
    )
    s = fresh(settings, tmp_path / "orc", operations_file=toml)
    want = dict(zip(table["taskDetailId"].to_pylist(), table["notes"].to_pylist(), strict=True))
    db = database_of(s)
    with Runtime(s) as rt:
        for operation, collection in (("from-orc", "orders"), ("from-gz", "fromgz")):
            job, _ = rt.jobs.start(operation, {}, trusted=True)
            rt.runner.run(job.jobId)
            done = rt.jobs.get(job.jobId)
            assert done.status == JobState.COMPLETED, done.error
            assert (done.insertedRecords, done.processedRecords) == (300, 300)
            got = {d["_id"]: d.get("notes") for d in db[collection].find({}, {"notes": 1})}
            assert got == want
    db.client.drop_database(s.database)
