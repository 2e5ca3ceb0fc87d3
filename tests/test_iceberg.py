"""Iceberg tables the test writes itself with pyiceberg (a SQL catalog on SQLite), read
locally and from S3 (moto), checked against pyiceberg's own reader.

The oracle is pyiceberg: ``table.scan(snapshot_id=...).to_arrow()`` for the rows, and its
metadata (``inspect.entries``) for lake order (data sequence number, then manifest order),
read file task by file task. pyiceberg applies no equality deletes (it refuses to scan them);
that table's expected rows are worked out in the test from what it wrote.
"""

from __future__ import annotations

import json
import random
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import hypothesis.strategies as st
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from pyiceberg.catalog.sql import SqlCatalog
from pyiceberg.expressions import AlwaysTrue
from pyiceberg.io.pyarrow import ArrowScan, schema_to_pyarrow
from pyiceberg.table import Table
from pyiceberg.typedef import Record
from pyiceberg.types import IntegerType, StringType
from tests.helpers import (
    REGION,
    T0,
    ServeProcess,
    aws_test_env,
    s3_client,
    start_moto_thread,
    wait_for,
)
from tests.iceberg_tables import equality_delete, position_delete

from lakesync.config import Settings
from lakesync.errors import ConfigError, RequestError, SourceError, TransientSourceError
from lakesync.lake import Lake, Position
from lakesync.models import JobState, JobStatus, Outcome
from lakesync.operations import load_operations
from lakesync.runtime import Runtime
from lakesync.sources.iceberg import CatalogTable, shown

TS = pa.timestamp("us", tz="UTC")
SCHEMA = pa.schema(
    [
        ("taskDetailId", pa.string()),
        ("projectId", pa.string()),
        ("assignee", pa.string()),
        ("hoursLogged", pa.float64()),
        ("updatedAt", TS),
        ("notes", pa.string()),
    ]
)
KEY = "taskDetailId"


def rows(keys: list[str], version: int, project: Callable[[str], str] | None = None) -> pa.Table:
    """Version ``version`` of the records of ``keys``: notes "vN", updatedAt T0 + N s."""
    return pa.Table.from_pylist(
        [
            {
                KEY: k,
                "projectId": project(k) if project else f"P{int(k[1:]) % 3}",
                "assignee": None if version % 2 else f"a{version}",
                "hoursLogged": float(version),
                "updatedAt": T0 + timedelta(seconds=version, microseconds=int(k[1:])),
                "notes": f"v{version}",
            }
            for k in keys
        ],
        SCHEMA,
    )


def add(table: Table, data: pa.Table) -> None:
    """Append ``data`` to the table as its schema is now (renamed and added columns)."""
    table = table.refresh()
    current = schema_to_pyarrow(table.schema(), include_field_ids=False)
    data = data.rename_columns(["owner" if n == "assignee" and "owner" in current.names else n
                                for n in data.column_names])  # fmt: skip
    for f in current:
        if f.name not in data.column_names:
            data = data.append_column(f.name, pa.nulls(data.num_rows, f.type))
    table.append(data.select(current.names).cast(current))


def keys(n: int, start: int = 0) -> list[str]:
    return [f"K{i:05d}" for i in range(start, start + n)]


@pytest.fixture
def catalog(tmp_path: Path) -> SqlCatalog:
    warehouse = tmp_path / "warehouse"
    warehouse.mkdir()
    cat = SqlCatalog(
        "local", uri=f"sqlite:///{tmp_path}/catalog.db", warehouse=f"file://{warehouse}"
    )
    cat.create_namespace("ns")
    return cat


def folder(table: Table) -> str:
    return table.metadata.location.removeprefix("file://")


def files_read(table: Table, snapshot_id: int | None = None) -> dict[str, list[dict[str, Any]]]:
    """pyiceberg's rows of each data file of a snapshot (its deletes applied), by path as
    lakesync names files; checked to be together what ``scan(...).to_arrow()`` returns."""
    scan = table.scan(snapshot_id=snapshot_id or table.metadata.current_snapshot_id)
    out: dict[str, list[dict[str, Any]]] = {}
    for task in scan.plan_files():
        reader = ArrowScan(table.metadata, table.io, scan.projection(), AlwaysTrue())
        out[shown(task.file.file_path)] = reader.to_table([task]).to_pylist()
    assert same_rows([r for rs in out.values() for r in rs], scan.to_arrow().to_pylist())
    return out


def in_order(lake: Lake, table: Table, snapshot_id: int | None = None) -> list[dict[str, Any]]:
    """pyiceberg's rows of each data file, the files in the order lakesync lists them."""
    rows = files_read(table, snapshot_id)
    assert sorted(lake.files) == sorted(rows)
    return [r for f in lake.files for r in rows[f]]


def oracle(table: Table, snapshot_id: int | None = None) -> tuple[dict[str, str], int]:
    """pyiceberg's ``scan().to_arrow()`` of a snapshot: the newest version of every key (by
    updatedAt, which every version written here moves on) and the number of rows."""
    scanned = table.scan(snapshot_id=snapshot_id or table.metadata.current_snapshot_id)
    return newest(scanned.to_arrow().to_pylist()), scanned.to_arrow().num_rows


def same_rows(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> bool:
    as_text = lambda rows: Counter(json.dumps(r, default=str, sort_keys=True) for r in rows)  # noqa: E731
    return as_text(a) == as_text(b)


def newest(rows: list[dict[str, Any]]) -> dict[str, str]:
    """The newest version (latest updatedAt) of each key: key -> notes."""
    best: dict[str, dict[str, Any]] = {}
    for r in rows:
        seen = best.get(r[KEY])
        assert seen is None or seen["updatedAt"] != r["updatedAt"] or seen == r, (seen, r)
        if seen is None or r["updatedAt"] > seen["updatedAt"]:
            best[r[KEY]] = r
    return {k: r["notes"] for k, r in best.items()}


def last(rows: list[dict[str, Any]]) -> dict[str, str]:
    """The last record of each key in the order given: key -> notes."""
    return {r[KEY]: r["notes"] for r in rows}


def read_all(lake: Lake, size: int = 97, start: Position = Position()) -> list[dict[str, Any]]:
    return [r for b in lake.batches(size, start) for r in b.table.to_pylist()]


# -- reading -----------------------------------------------------------------------------------


def history(catalog: SqlCatalog) -> Table:
    """Appended updates of the same keys, an overwrite, a copy-on-write delete, a position
    delete written as Spark writes them, a column added and one renamed."""
    table = catalog.create_table("ns.tasks", schema=SCHEMA)
    table.append(rows(keys(300), 1))
    table.append(rows(keys(100, 250), 2))  # 50 updated, 50 new
    table.append(rows(keys(40, 0)[::2], 3))  # updates again
    table.overwrite(rows(keys(10, 20), 4), overwrite_filter="taskDetailId >= 'K00020' and "
                    "taskDetailId < 'K00030'")  # fmt: skip
    table.delete("taskDetailId >= 'K00100' and taskDetailId < 'K00110'")
    first = sorted(t.file.file_path for t in table.scan().plan_files())[0]
    position_delete(table, first, [0, 5, 6])
    table = catalog.load_table("ns.tasks")
    with table.update_schema() as update:
        update.add_column("priority", IntegerType())
        update.rename_column("assignee", "owner")
    table = catalog.load_table("ns.tasks")
    more = rows(keys(30, 330), 5).rename_columns(
        [("owner" if n == "assignee" else n) for n in SCHEMA.names]
    )
    table.append(more.append_column("priority", pa.array([7] * 30, pa.int32())))
    return catalog.load_table("ns.tasks")


def test_a_table_reads_as_pyiceberg_reads_it_in_lake_order(catalog: SqlCatalog) -> None:
    table = history(catalog)
    lake = Lake.open(folder(table))  # the table's folder: its highest-numbered metadata
    assert lake.format == "iceberg" and lake.version == table.metadata.current_snapshot_id
    assert lake.pins() == {"icebergSnapshotId": table.metadata.current_snapshot_id}
    got = read_all(lake)
    expected = in_order(lake, table)
    assert got == expected  # each file's rows as pyiceberg reads them
    assert last(got) == oracle(table)[0]  # and the files in an order where the newest wins
    assert "owner" in lake.schema.names and "assignee" not in lake.schema.names
    assert {r["owner"] for r in got} >= {"a2", None}  # renamed by field id in old files
    assert lake.count_rows() == len(expected) == sum(lake.file_row_counts())
    assert lake.file_name(0).startswith("data/")
    # the metadata file named directly, and an older one: that snapshot
    assert read_all(Lake.open(table.metadata_location.removeprefix("file://"))) == expected
    for old in table.metadata.snapshots[1:-1]:
        pinned = Lake.open(folder(table), snapshot_id=old.snapshot_id)
        rows = read_all(pinned)
        assert rows == in_order(pinned, table, old.snapshot_id)
        assert last(rows) == oracle(table, old.snapshot_id)[0], old
    old = table.metadata.snapshots[1]
    older = sorted(Path(folder(table), "metadata").glob("00002-*.metadata.json"))[0]
    lake2 = Lake.open(str(older))
    assert lake2.version == old.snapshot_id
    assert read_all(lake2) == in_order(lake2, table, old.snapshot_id)


def test_every_position_resumes_with_exactly_the_rest(catalog: SqlCatalog) -> None:
    table = history(catalog)
    lake = Lake.open(folder(table))
    whole = read_all(lake)
    counts = lake.file_row_counts()
    rng = random.Random(4)
    for index in range(len(counts)):
        for row in {0, counts[index], rng.randrange(counts[index] + 1)}:
            before = sum(counts[:index]) + row
            again = Lake.open(folder(table))  # a new run opens the same snapshot
            start = again.resume_position(Position(index, row), lake.file_name(index))
            assert read_all(again, 13, start) == whole[before:]
    names = [lake.file_name(i) for i in range(len(lake.files))]
    part = lake.only(names[2:4], first_index=2)  # a partition: its own files
    assert read_all(part) == whole[sum(counts[:2]) : sum(counts[:4])]
    assert next(b.ordinal for b in part.batches(10_000)) == 2


def test_equality_deletes_apply_to_older_files_of_their_partition(catalog: SqlCatalog) -> None:
    table = catalog.create_table("ns.eq", schema=SCHEMA)
    with table.update_spec() as update:
        update.add_identity("projectId")  # spec 1; spec 0 stays unpartitioned
    table = catalog.load_table("ns.eq")
    table.append(rows(keys(30), 1))
    first = table.refresh().scan().to_arrow().to_pylist()
    project = {r[KEY]: r["projectId"] for r in first}

    def delete(values: dict[str, list[Any]], spec_id: int = 1, part: str | None = None) -> None:
        equality_delete(table.refresh(), values, spec_id, None if part is None else Record(part))

    delete({KEY: ["K00003", "K00999"]}, part=project["K00003"])
    other = next(p for p in ("P0", "P1", "P2") if p != project["K00006"])
    delete({KEY: ["K00006"]}, part=other)  # another partition's delete: K6 stays
    table.refresh().append(rows(["K00003"], 2))  # added after the delete: it stays
    delete({KEY: ["K00004"], "notes": ["v1"]}, part=project["K00004"])  # on two columns
    delete({"assignee": [None], "projectId": ["P2"]}, spec_id=0)  # global; null matches null
    table = table.refresh()
    with pytest.raises(ValueError, match="equality deletes"):
        table.scan().to_arrow()  # pyiceberg's reader refuses them: the expected rows below
    lake = Lake.open(folder(table))
    got = read_all(lake)
    expected = [
        r
        for r in first
        if r[KEY] not in ("K00003", "K00004") and r["projectId"] != "P2"  # assignee null in v1
    ]
    assert any(r[KEY] == "K00006" for r in expected)
    expected += rows(["K00003"], 2).to_pylist()
    assert same_rows(got, expected)
    assert got[-1][KEY] == "K00003" and got[-1]["notes"] == "v2"  # the later file comes last
    assert lake.count_rows() == len(expected) == sum(lake.file_row_counts())
    assert (
        read_all(lake.only([lake.file_name(1)]))
        == got[lake.file_row_counts()[0] :][: lake.file_row_counts()[1]]
    )


def test_a_format_v1_table_follows_its_history(catalog: SqlCatalog) -> None:
    """v1 tables number no sequence: the snapshot that added a file gives its place."""
    table = catalog.create_table("ns.v1", schema=SCHEMA, properties={"format-version": "1"})
    for version in (1, 2, 3):
        table.append(rows(keys(20, 5 * version), version))
    table = table.refresh()
    assert table.metadata.format_version == 1
    got = read_all(Lake.open(folder(table)))
    assert same_rows(got, table.scan().to_arrow().to_pylist())
    assert [r["notes"] for r in got] == ["v1"] * 20 + ["v2"] * 20 + ["v3"] * 20
    assert last(got)["K00015"] == "v3" and last(got)["K00012"] == "v2"


def test_partition_evolution_and_files_of_every_spec(catalog: SqlCatalog) -> None:
    table = catalog.create_table("ns.parts", schema=SCHEMA)
    with table.update_spec() as update:
        update.add_identity("projectId")
    table = catalog.load_table("ns.parts")
    table.append(rows(keys(60), 1))
    with table.update_spec() as update:
        update.remove_field("projectId")
        update.add_identity("notes")  # (other transforms need pyiceberg-core to write)
        update.add_identity("hoursLogged")
    table = catalog.load_table("ns.parts")
    table.append(rows(keys(30, 40), 2))
    table.delete("taskDetailId = 'K00001'")
    table = catalog.load_table("ns.parts")
    assert len(table.metadata.partition_specs) == 3
    lake = Lake.open(folder(table))
    got = read_all(lake)
    assert got == in_order(lake, table) and last(got) == oracle(table)[0]
    assert last(got)["K00045"] == "v2" and "K00001" not in last(got)


def test_a_file_rewritten_by_a_delete_keeps_its_place(catalog: SqlCatalog) -> None:
    """K = v1 in file A, K = v2 in file B, then a copy-on-write delete of another row of A
    rewrites A as A' (a later snapshot): K is still v2, in a v2 table and a v1 one, and
    after a second rewrite of A' (a rewrite of a rewrite) and a merge-on-read delete."""
    for version in ("2", "1"):
        table = catalog.create_table(f"ns.cow{version}", schema=SCHEMA,
                                     properties={"format-version": version})  # fmt: skip
        table.append(rows(["K00001", "K00002", "K00003"], 1))  # A
        table.append(rows(["K00001", "K00004"], 2))  # B
        table.delete("taskDetailId = 'K00002'")  # A rewritten as A'
        table = table.refresh()
        assert oracle(table)[0]["K00001"] == "v2"
        got = read_all(Lake.open(folder(table)))
        assert same_rows(got, table.scan().to_arrow().to_pylist())
        assert last(got) == oracle(table)[0], version
        table.append(rows(["K00003"], 3))  # C: K3's newest
        table.delete("taskDetailId = 'K00004'")  # B rewritten as B' (K1 = v2 only)
        table.refresh().delete("taskDetailId = 'K00001' and notes = 'v1'")  # A' again
        table = table.refresh()
        got = read_all(Lake.open(folder(table)))
        assert last(got) == oracle(table)[0] == {"K00001": "v2", "K00003": "v3"}, version
    # a delete across files of several ages in one snapshot, each rewritten on its own
    table = catalog.create_table("ns.many", schema=SCHEMA)
    for v in (1, 2, 3):
        table.append(rows(keys(6), v)[v - 1 :])  # each file: the keys from K0000{v-1}
    table.delete("taskDetailId in ('K00003', 'K00004')")  # rewrites all three files
    table = table.refresh()
    assert last(read_all(Lake.open(folder(table)))) == oracle(table)[0]
    position_delete(table, lake_files(table)[-1], [0])  # merge-on-read, on the newest file
    table = table.refresh()
    got = read_all(Lake.open(folder(table)))
    assert same_rows(got, table.scan().to_arrow().to_pylist())
    assert last(got) == oracle(table)[0]


def test_an_unpartitioned_position_delete_applies_to_files_of_every_spec(
    catalog: SqlCatalog,
) -> None:
    """The Iceberg spec: a position delete file of an unpartitioned spec applies to the data
    files of every spec (pyiceberg's planner matched it to files of its own spec only, so a
    file of a later partitioned spec kept the deleted rows)."""
    table = catalog.create_table("ns.global", schema=SCHEMA)
    table.append(rows(keys(5), 1))  # spec 0
    with table.update_spec() as update:
        update.add_identity("projectId")
    table = table.refresh()
    table.append(rows(keys(6, 10), 2))  # spec 1: a file per project
    table = table.refresh()
    target = next(t.file for t in table.scan().plan_files() if t.file.spec_id == 1)
    position_delete(table, target.file_path, [0])  # spec 0, no partition
    table = table.refresh()
    want = table.scan().to_arrow().to_pylist()  # pyiceberg applies it by path to every file
    assert len(want) == 10
    got = read_all(Lake.open(folder(table)))
    assert same_rows(got, want)


_OPS = st.one_of(
    st.tuples(st.just("append"), st.sets(st.integers(0, 11), min_size=1)),
    st.tuples(st.just("delete"), st.sets(st.integers(0, 11), min_size=1, max_size=3)),
    st.tuples(st.just("overwrite"), st.sets(st.integers(0, 11), min_size=1, max_size=4)),
    st.tuples(st.just("drop version"), st.integers(0, 8).map(lambda v: {v})),
    st.tuples(st.just("position"), st.integers(0, 50).map(lambda v: {v})),
    st.tuples(st.just("partition"), st.just(set())),
    st.tuples(st.just("column"), st.just(set())),
)


@hsettings(
    max_examples=8,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(ops=st.lists(_OPS, min_size=2, max_size=6))
def test_random_histories_read_as_pyiceberg_reads_them(tmp_path: Path, ops: list[Any]) -> None:
    """Random sequences of appends, copy-on-write deletes and overwrites, position deletes
    and schema and partition changes, after two appends of the same keys: after each, the
    last record of every key in lake order is pyiceberg's newest version of it, and the
    rows are pyiceberg's."""
    play(tmp_path, ops)


def play(tmp_path: Path, ops: list[Any]) -> None:
    """Write a table by ``ops`` and check lakesync's reading after each."""
    name = f"ns.h{len(list(tmp_path.glob('c*.db')))}"
    cat = SqlCatalog("h", uri=f"sqlite:///{tmp_path}/c{name}.db", warehouse=f"file://{tmp_path}")
    cat.create_namespace("ns")
    table = cat.create_table(name, schema=SCHEMA)
    version = 0
    for op, arg in [("append", set(range(12))), ("append", set(range(0, 12, 2))), *ops]:
        table = table.refresh()
        chosen = " or ".join(f"taskDetailId = 'K{k:05d}'" for k in sorted(arg or ()))
        if op in ("append", "overwrite"):
            version += 1
            data = rows([f"K{k:05d}" for k in sorted(arg)], version)
            if op == "append":
                add(table, data)
            else:
                current = schema_to_pyarrow(table.schema(), include_field_ids=False)
                for f in current:
                    if f.name not in data.column_names:
                        data = data.append_column(f.name, pa.nulls(data.num_rows, f.type))
                table.overwrite(data.select(current.names).cast(current), overwrite_filter=chosen)
        elif op == "delete":
            table.delete(chosen)
        elif op == "drop version" and min(arg) < version:
            table.delete(f"notes = 'v{min(arg) + 1}'")
        elif op == "position" and lake_files(table):
            files, at = lake_files(table), min(arg)
            path = files[at % len(files)]
            data = next(t.file for t in table.scan().plan_files() if t.file.file_path == path)
            # in the data file's own spec and partition, as Spark writes them (pyiceberg's
            # planner leaves an unpartitioned delete out of a partitioned file's deletes)
            position_delete(table, path, [at % pq.read_metadata(shown(path)).num_rows],
                            data.spec_id, data.partition)  # fmt: skip
        elif op == "partition" and table.spec().is_unpartitioned():
            with table.update_spec() as update:
                update.add_identity("projectId")
        elif op == "column" and "extra" not in table.schema().column_names:
            with table.update_schema() as update:
                update.add_column("extra", StringType())
        table = table.refresh()
        got = read_all(Lake.open(folder(table)))
        snapshot = table.scan(snapshot_id=table.metadata.current_snapshot_id)  # its schema
        assert same_rows(got, snapshot.to_arrow().to_pylist()), op
        assert last(got) == oracle(table)[0], (op, arg)


# -- copies ------------------------------------------------------------------------------------


def run(rt: Runtime, operation: str, **options: Any) -> JobStatus:
    status, created = rt.jobs.start(operation, options, trusted=True)
    assert created
    for _ in range(100):
        if rt.runner.run(status.jobId) is not Outcome.CONTINUE:
            break
    return rt.jobs.get(status.jobId)


def operations_file(tmp_path: Path, catalog_dir: Path, source: str | None) -> Path:
    text = '[operations.ice]\ncollection = "tasks"\nkey = "taskDetailId"\nwatermark = "updatedAt"\n'
    if source is None:
        text += 'catalog = "local"\ntable = "ns.tasks"\n'
        text += f'[catalogs.local]\ntype = "sql"\nuri = "sqlite:///{catalog_dir}/catalog.db"\n'
    else:
        text += f"source = {json.dumps(source)}\n"
    path = tmp_path / "lakesync.toml"
    path.write_text(text)
    return path


def check(
    done: JobStatus, db: Any, table: Table, *, empty_before: bool = False, snapshot: int = 0
) -> None:
    """The job completed exactly, and the collection holds the newest version of every key
    of the table (deleted keys may stay: only mirror deletes)."""
    assert done.status == JobState.COMPLETED, (done.message, done.error)
    parts = (done.insertedRecords + done.updatedRecords + done.unchangedRecords
             + done.duplicateRecords + done.errorRecords)  # fmt: skip
    assert done.processedRecords == parts == done.totalRecords
    snapshot = snapshot or table.metadata.current_snapshot_id
    assert done.options["icebergSnapshotId"] == snapshot
    expected = oracle(table, snapshot)[0]
    stored = {d["_id"]: d["notes"] for d in db.tasks.find({}, {"notes": 1})}
    assert {k: stored.get(k) for k in expected} == expected
    if empty_before:
        assert done.insertedRecords == len(expected) == len(stored)


def deletes(t: Table) -> None:
    """A copy-on-write delete rewriting files of several ages (their other rows carried into
    new files), then a position delete of versions a newer one replaces (a delete of a
    key's newest version brings back the one before, which only a full copy writes: the
    README's limit), then an append."""
    t.delete("taskDetailId < 'K00010' or taskDetailId = 'K00251'")
    t = t.refresh()
    newer = oracle(t)[0]
    for path in lake_files(t):
        local = shown(path)
        physical = pq.read_table(local, columns=[KEY, "notes"]).to_pylist()
        version = lambda notes: int(notes[1:])  # noqa: E731
        old = [i for i, r in enumerate(physical)
               if r[KEY] in newer and version(r["notes"]) < version(newer[r[KEY]])]  # fmt: skip
        if len(old) >= 3:
            position_delete(t, path, old[:3])
            break
    else:
        raise AssertionError("no file holds old versions")
    add(t, rows(keys(5, 500), 6))


def schema_change(t: Table) -> None:
    with t.update_schema() as update:
        update.add_column("extra", StringType())
    add(t, rows(keys(10, 5), 6).append_column("extra", pa.array(["x"] * 10)))


def spec_change(t: Table) -> None:
    with t.update_spec() as update:
        update.add_identity("notes")
    add(t, rows(keys(25, 280), 6))


CHANGES: dict[str, Callable[[Table], None]] = {
    "appended updates": lambda t: (
        add(t, rows(keys(120, 200), 6)), add(t, rows(keys(50, 220), 7))
    )[0],
    "deletes": deletes,
    "overwrite": lambda t: t.overwrite(
        rows(keys(20, 40), 6)
        .rename_columns(["owner" if n == "assignee" else n for n in SCHEMA.names])
        .append_column("priority", pa.nulls(20, pa.int32())),
        overwrite_filter="taskDetailId >= 'K00040' and taskDetailId < 'K00060'",
    ),
    "schema evolution": schema_change,
    "partition evolution": spec_change,
}  # fmt: skip


@pytest.mark.parametrize("change", list(CHANGES))
def test_full_incremental_full_and_mirror_copies_follow_the_table(
    change: str, catalog: SqlCatalog, settings: Settings, db: Any, tmp_path: Path
) -> None:
    table = history(catalog)
    ops = operations_file(tmp_path, tmp_path, folder(table))
    settings = settings.model_copy(update={"operations_file": ops, "batch_size": 64})
    with Runtime(settings) as rt:
        first = run(rt, "ice", mode="full")
        check(first, db, table, empty_before=True)
        assert first.duplicateRecords == oracle(table)[1] - first.insertedRecords > 0
        CHANGES[change](table)
        table = table.refresh()
        incremental = run(rt, "ice", mode="incremental")
        check(incremental, db, table)
        assert incremental.options["sinceIcebergSnapshotId"] == first.options["icebergSnapshotId"]
        # a full copy gives what the incremental one gave; only a column added to the table
        # since updates the documents the incremental copy did not write (it is null there)
        lacking = db.tasks.count_documents({"extra": {"$exists": False}})
        again = run(rt, "ice", mode="full")
        check(again, db, table)
        assert again.insertedRecords == 0
        assert again.updatedRecords == (lacking if change == "schema evolution" else 0)
        mirror = run(rt, "ice", mode="mirror")
        check(mirror, db, table)
        assert db.tasks.count_documents({}) == len(oracle(table)[0])
        rerun = run(rt, "ice", mode="full")
        check(rerun, db, table)
        assert rerun.insertedRecords == rerun.updatedRecords == 0
        quiet = run(rt, "ice", mode="incremental")
        assert quiet.insertedRecords == quiet.updatedRecords == 0, quiet


def test_partitioned_in_random_order_and_a_resumed_run(
    catalog: SqlCatalog, settings: Settings, db: Any, tmp_path: Path
) -> None:
    table = catalog.create_table("ns.tasks", schema=SCHEMA)
    for version in range(1, 13):  # twelve files, each updating keys of the ones before
        table.append(rows(keys(150, 40 * version), version))
    table.delete("taskDetailId >= 'K00200' and taskDetailId < 'K00205'")
    table = table.refresh()
    position_delete(table, lake_file(table, 3), [0, 1, 2, 50])
    table = table.refresh()
    ops = operations_file(tmp_path, tmp_path, folder(table))
    base = settings.model_copy(update={"operations_file": ops, "batch_size": 50,
                                       "partition_rows": 300})  # fmt: skip
    for seed in (1, 2):
        db.tasks.drop()
        done = partitioned(base, seed)
        check(done, db, table, empty_before=True)

    db.tasks.drop()
    with Runtime(base.model_copy(update={"partition_rows": 10**6})) as rt:
        job, _ = rt.jobs.start("ice", {}, trusted=True)
        seen: list[int] = []

        def stop_early(s: JobStatus) -> None:
            seen.append(s.processedRecords)
            if s.processedRecords >= 400:
                rt.runner.stop.set()

        rt.runner.run(job.jobId, on_progress=stop_early)
        paused = rt.jobs.get(job.jobId)
        assert paused.status == JobState.PENDING and 0 < paused.processedRecords < 1500
        pinned = table.metadata.current_snapshot_id
        assert paused.options["icebergSnapshotId"] == pinned
        table.append(rows(keys(10, 900), 20))  # a later snapshot: the job keeps its own
        rt.runner.stop.clear()
        for _ in range(10):
            if rt.runner.run(job.jobId) is not Outcome.CONTINUE:
                break
        done = rt.jobs.get(job.jobId)
    check(done, db, table.refresh(), empty_before=True, snapshot=pinned)


def partitioned(settings: Settings, seed: int) -> JobStatus:
    """A partitioned copy of operation "ice", its partitions run one by one in random order."""
    rt = Runtime(settings, executor="local")
    queued: list[tuple[str, int]] = []
    rt.executor.submit = lambda job_id: None  # type: ignore[method-assign,union-attr]
    rt.runner.partitioned.submit = lambda j, i: queued.append((j, i))  # type: ignore[union-attr]
    with rt:
        job, _ = rt.jobs.start("ice", {}, trusted=True)
        rt.runner.run(job.jobId)
        assert len(queued) >= 3
        steps = list(queued)
        random.Random(seed).shuffle(steps)
        parts = rt.runner.partitioned
        assert parts is not None
        for step in steps:
            parts.run(*step)
        done = rt.jobs.get(job.jobId)
    assert done.partitions == len(steps)
    return done


def lake_files(table: Table) -> list[str]:
    """The snapshot's data files, as its manifests name them, by sequence number."""
    entries = table.inspect.entries().to_pylist()
    data = [e for e in entries if e["data_file"]["content"] == 0 and e["status"] != 2]
    data.sort(key=lambda e: e["sequence_number"])
    return [str(e["data_file"]["file_path"]) for e in data]


def lake_file(table: Table, index: int) -> str:
    return lake_files(table)[index]


def test_a_catalog_table_of_lakesync_toml(
    catalog: SqlCatalog, settings: Settings, db: Any, tmp_path: Path
) -> None:
    table = history(catalog)
    ops = operations_file(tmp_path, tmp_path, None)
    (op,) = load_operations(ops)
    assert op.source_uri(settings) == "iceberg://local/ns.tasks"
    settings = settings.model_copy(update={"operations_file": ops})
    with Runtime(settings) as rt:
        done = run(rt, "ice")
        check(done, db, table, empty_before=True)
        assert done.options["source"] == "iceberg://local/ns.tasks"
        add(table, rows(keys(5, 1000), 9))
        table = table.refresh()
        later = run(rt, "ice", mode="incremental")
        check(later, db, table)
        assert later.processedRecords == 5 and later.insertedRecords == 5
        with pytest.raises(RequestError, match="sinceIcebergSnapshotId"):
            rt.jobs.start("ice", {"sinceIcebergSnapshotId": 1})
        missing = run(rt, "ice", source="iceberg://local/ns.nope")
    assert missing.status == JobState.FAILED
    assert "has no table 'ns.nope'" in (missing.error or ""), missing.error


def test_incremental_reads_the_whole_snapshot_when_the_recorded_one_is_gone(
    catalog: SqlCatalog, settings: Settings, db: Any, tmp_path: Path, caplog: Any
) -> None:
    table = catalog.create_table("ns.tasks", schema=SCHEMA)
    table.append(rows(keys(100), 1))
    ops = operations_file(tmp_path, tmp_path, folder(table))
    settings = settings.model_copy(update={"operations_file": ops})
    with Runtime(settings) as rt:
        check(run(rt, "ice", mode="incremental"), db, table, empty_before=True)
        # a snapshot the table no longer has (expired), as the last copy's
        db.syncstate.update_one({"operation": "ice"}, {"$set": {"icebergSnapshotId": 12345}})
        table.append(rows(keys(10, 95), 2))  # 5 updated, 5 new
        table = table.refresh()
        again = run(rt, "ice", mode="incremental")
    assert "since Iceberg snapshot 12345" in caplog.text and "reading the whole" in caplog.text
    check(again, db, table)
    assert "sinceIcebergSnapshotId" not in again.options
    # the whole snapshot, filtered by the watermark: the newer records and the one at it
    assert again.insertedRecords == 5 and again.updatedRecords == 5
    assert db.syncstate.find_one({"operation": "ice"})["icebergSnapshotId"] == (
        table.metadata.current_snapshot_id
    )


def test_file_uris_as_writers_spell_them() -> None:
    assert shown("file:///data/t/x.parquet") == "/data/t/x.parquet"
    assert shown("file:/data/t/x%20y.parquet") == "/data/t/x y.parquet"  # Hadoop's spelling
    assert shown("s3://b/t/x.parquet") == "s3://b/t/x.parquet"


def test_catalog_errors_name_the_catalog(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="no such catalog is declared"):
        Lake.open("iceberg://nope/ns.t")
    wrong = CatalogTable("bad", "ns.t", {"type": "no-such-type"})
    with pytest.raises(SourceError, match=r"Check \[catalogs\.bad\] in lakesync.toml\.") as e:
        Lake.open(wrong.uri, catalog=wrong)
    assert not isinstance(e.value, TransientSourceError)  # a setting: no retry helps
    gone = CatalogTable("far", "ns.t", {"type": "sql", "uri": f"sqlite:///{tmp_path}/no/x.db"})
    with pytest.raises(TransientSourceError, match="that the catalog is reachable"):
        Lake.open(gone.uri, catalog=gone)


@pytest.mark.parametrize(
    ("body", "error"),
    [
        ('catalog = "nope"\ntable = "ns.t"', "catalog 'nope' is not declared"),
        ('catalog = "c"', 'needs table = "namespace.table"'),
        ('table = "ns.t"', "needs a catalog"),
        ('catalog = "c"\ntable = "t"', 'name it as "namespace.table"'),
        ('catalog = "c"\ntable = "ns.t"\nsource = "/x"', "either source"),
        ('catalog = "c"\ntable = "ns.t"\nformat = "delta"', "format 'delta'"),
    ],
)
def test_catalog_settings_are_checked_at_load(tmp_path: Path, body: str, error: str) -> None:
    path = tmp_path / "lakesync.toml"
    path.write_text(
        f'[operations.o]\ncollection = "c"\nkey = "k"\n{body}\n[catalogs.c]\ntype = "sql"\n'
    )
    with pytest.raises(ConfigError, match=error) as raised:
        load_operations(path)
    assert str(path) in str(raised.value) and "operation 'o'" in str(raised.value)
    path.write_text('[catalogs.c]\ntype = "sql"\nnested = { a = 1 }\n')
    with pytest.raises(ConfigError, match="catalog 'c': nested: a pyiceberg catalog property"):
        load_operations(path)


# -- refusals ----------------------------------------------------------------------------------


def test_refusals(catalog: SqlCatalog, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    table = catalog.create_table("ns.tasks", schema=SCHEMA)
    empty = Lake.open(folder(table))  # no snapshot yet: nothing to read
    assert empty.files == [] and empty.count_rows() == 0 and empty.pins() == {}
    table.append(rows(keys(10), 1))
    root = Path(folder(table))
    with pytest.raises(SourceError, match="metadata folder: use its parent folder"):
        Lake.open(str(root / "metadata"))
    with pytest.raises(SourceError, match="snapshots, not Delta versions"):
        Lake.open(str(root), version=0)
    with pytest.raises(SourceError, match="has no snapshot 42"):
        Lake.open(str(root), snapshot_id=42)
    with pytest.raises(SourceError, match="is not an Iceberg table"):
        Lake.open(str(tmp_path), format="iceberg")
    # a second metadata file of the highest number: which is current cannot be told
    (current,) = root.glob("metadata/00001-*.metadata.json")
    (root / "metadata" / "00001-copy.metadata.json").write_bytes(current.read_bytes())
    with pytest.raises(SourceError, match="2 metadata files numbered 1"):
        Lake.open(str(root))
    (root / "metadata" / "version-hint.text").write_text("1")  # names v1.metadata.json
    with pytest.raises(SourceError, match=r"names v1\.metadata\.json, which is not in"):
        Lake.open(str(root))
    (root / "metadata" / "version-hint.text").write_text(current.name)
    assert Lake.open(str(root)).count_rows() == 10
    # a metadata file naming data outside the table's folder (a planted file, a copy)
    elsewhere = tmp_path / "other"
    planted = json.loads(current.read_text())
    planted["location"] = f"file://{elsewhere}"
    (root / "metadata" / "00009-planted.metadata.json").write_text(json.dumps(planted))
    moved = tmp_path / "moved"
    root.rename(moved)
    with pytest.raises(SourceError, match="names a file outside its folder"):
        Lake.open(str(moved / "metadata" / "00009-planted.metadata.json"))
    monkeypatch.setitem(sys.modules, "pyiceberg.table", None)  # as if the extra is missing
    with pytest.raises(SourceError, match=r"pip install 'lakesync\[iceberg\]'"):
        Lake.open(str(moved / "metadata" / current.name))


# -- S3 ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def moto() -> Iterator[str]:
    with aws_test_env():
        server, url = start_moto_thread()
        yield url
        server.stop()


def test_a_table_on_s3(moto: str, settings: Settings, db: Any, tmp_path: Path) -> None:
    with aws_test_env():
        s3_client(moto).create_bucket(Bucket="ice")
        cat = SqlCatalog("s3cat", uri=f"sqlite:///{tmp_path}/s3.db", warehouse="s3://ice/wh",
                         **{"s3.endpoint": moto, "s3.region": REGION})  # fmt: skip
        cat.create_namespace("ns")
        table = cat.create_table("ns.tasks", schema=SCHEMA)
        table.append(rows(keys(200), 1))
        table.append(rows(keys(50, 150), 2))
        table.delete("taskDetailId < 'K00005'")
        table = table.refresh()
        position_delete(table, lake_file(table, 0), [7])
        table = table.refresh()
        s3 = settings.model_copy(update={"s3_endpoint_url": moto, "s3_region": REGION})
        source = table.metadata.location  # s3://ice/wh/ns/tasks
        lake = Lake.open(source, settings=s3)
        assert lake.format == "iceberg" and all(f.startswith("s3://ice/") for f in lake.files)
        got = read_all(lake)
        assert got == in_order(lake, table) and last(got) == oracle(table)[0]
        ops = operations_file(tmp_path, tmp_path, source)
        with Runtime(s3.model_copy(update={"operations_file": ops})) as rt:
            done = run(rt, "ice")
            check(done, db, table, empty_before=True)
        # the same table through its catalog in lakesync.toml (no s3.* properties there:
        # lakesync's own S3 settings reach the catalog's FileIO): the same documents, then
        # an append of updates and a copy-on-write delete on S3, copied incrementally
        text = operations_file(tmp_path, tmp_path, None).read_text()
        ops.write_text(text.replace("catalog.db", "s3.db").replace("local", "s3cat"))
        with Runtime(s3.model_copy(update={"operations_file": ops})) as rt:
            same = run(rt, "ice", mode="full")
            check(same, db, table)
            assert same.options["source"] == "iceberg://s3cat/ns.tasks"
            assert (same.insertedRecords, same.updatedRecords) == (0, 0)
            table.append(rows(keys(20, 190), 3))  # 10 updated, 10 new
            table.refresh().delete("taskDetailId = 'K00100'")  # rewrites the v1 file
            table = table.refresh()
            later = run(rt, "ice", mode="incremental")
            check(later, db, table)
            assert (later.insertedRecords, later.updatedRecords) == (10, 10)
            again = run(rt, "ice", mode="full")
            check(again, db, table)
            assert (again.insertedRecords, again.updatedRecords) == (0, 0)


@pytest.mark.slow
def test_serve_killed_twice_while_copying_a_table_in_partitions(
    catalog: SqlCatalog, serve_env: dict[str, str], db: Any, tmp_path: Path
) -> None:
    table = catalog.create_table("ns.tasks", schema=SCHEMA)
    for version in range(1, 11):  # ten files of 3,000 records, each updating the one before
        table.append(rows(keys(3000, 1500 * version), version))
    table.delete("taskDetailId >= 'K03000' and taskDetailId < 'K03100'")
    table = table.refresh()
    position_delete(table, lake_file(table, 4), list(range(0, 3000, 7)))
    table = table.refresh()
    ops = operations_file(tmp_path, tmp_path, folder(table))
    serve_env.update(
        LAKESYNC_OPERATIONS_FILE=str(ops), LAKESYNC_BATCH_SIZE="250", LAKESYNC_WORKERS="2",
        LAKESYNC_PARTITION_ROWS="4000",
    )  # fmt: skip
    proc = ServeProcess(serve_env, tmp_path / "serve.log").start()
    url = lambda: f"{proc.url}/api/jobs"  # noqa: E731
    try:
        r = httpx.post(url(), json={"operation": "ice"}, timeout=10)
        assert r.status_code == 202, r.text
        job_id = r.json()["jobId"]
        get = lambda: httpx.get(f"{url()}/{job_id}", timeout=10).json()  # noqa: E731
        for target in (6000, 15000):
            wait_for(lambda t=target: get()["processedRecords"] >= t, timeout=180)
            proc.kill()  # SIGKILL: no checkpoint, no hand-back
            proc = ServeProcess(serve_env, tmp_path / "serve.log").start()
        final = wait_for(lambda: (s := get())["status"] in ("completed", "failed") and s, 300)
    finally:
        proc.kill()
    status = JobStatus.model_validate(final)
    check(status, db, table, empty_before=True)
    assert status.attempt >= 2 and (status.partitions or 0) >= 5


def compact(table: Table) -> None:
    """Rewrite all the data files of ``table`` as one, in one snapshot (as a compaction
    does, through pyiceberg's own snapshot producer and file writer)."""
    from pyiceberg.io.pyarrow import _dataframe_to_data_files

    data = table.scan().to_arrow()
    with table.transaction() as tx, tx.update_snapshot().overwrite() as rewrite:
        for task in table.scan().plan_files():
            rewrite.delete_data_file(task.file)
        for f in _dataframe_to_data_files(
            table_metadata=tx.table_metadata, df=data, io=table.io, write_uuid=rewrite.commit_uuid
        ):
            rewrite.append_data_file(f)


def test_rewrites_whose_row_order_is_lost_are_said(catalog: SqlCatalog) -> None:
    """The keys whose newest record the table cannot tell are counted (the job warns of
    them): a compaction that wrote rows of several sequence numbers into one file, and files
    whose snapshots were expired. Rewrites of one file each (pyiceberg's deletes) and tables
    with their whole history give no warning."""
    from lakesync import repeats
    from lakesync.schema import RecordSchema

    schema = RecordSchema(key=KEY)
    assert repeats.plan_lake(Lake.open(folder(history(catalog))), schema).warning() is None
    table = catalog.create_table("ns.compacted", schema=SCHEMA)
    for v in (1, 2, 3):  # three versions of every key
        table.append(rows(keys(50), v))
    compact(table.refresh())  # into one file, in the writer's order
    lake = Lake.open(folder(table.refresh()))
    assert [d.why for d in lake.doubts if d] == ["merged rewrite of sequence numbers 1..3"]
    plan = repeats.plan_lake(lake, schema)
    assert plan.doubted == 50 and plan.example is not None
    assert "merged rewrite of sequence numbers 1..3" in (plan.warning() or "")
    table = catalog.create_table("ns.expired", schema=SCHEMA)
    table.append(rows(keys(5), 1))
    table.append(rows(keys(5), 2))
    table.delete("taskDetailId = 'K00004'")  # both files rewritten, in one snapshot
    table.append(rows(keys(3, 100), 3))
    table = table.refresh()
    assert repeats.plan_lake(Lake.open(folder(table)), schema).warning() is None
    current = table.metadata.current_snapshot_id
    old = [s.snapshot_id for s in table.metadata.snapshots if s.snapshot_id != current]
    table.maintenance.expire_snapshots().by_ids(old).commit()
    lake = Lake.open(folder(table.refresh()))
    assert {d.kind for d in lake.doubts if d} == {"missing"}
    plan = repeats.plan_lake(lake, schema)
    assert plan.doubted == 4 and "history missing" in (plan.warning() or "")
