"""Iceberg rewrites as Spark commits them, in one snapshot: a compaction merging several
data files into one (Spark's is a ``replace``, which pyiceberg 0.12 cannot write: here an
``overwrite`` of the same files, which lakesync takes the same way), and a static
overwrite of a partition (``overwrite``);
and pyiceberg's own overwrite of a partition (a delete and an append). For each: a full
copy, the change, an incremental copy, a full copy again and a rerun, compared with
pyiceberg's ``scan().to_arrow()`` (the newest version of each key) and, where the README
says the table cannot tell which row of a key is newest, with what it says lakesync does."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from pyiceberg.catalog.sql import SqlCatalog
from pyiceberg.table import Table
from pyiceberg.table.snapshots import Operation
from tests.iceberg_tables import rewrite
from tests.test_iceberg import (
    KEY,
    SCHEMA,
    catalog,
    check,
    folder,
    keys,
    last,
    newest,
    operations_file,
    oracle,
    rows,
    run,
)

from lakesync.config import Settings
from lakesync.models import JobState
from lakesync.runtime import Runtime
from lakesync.sources.iceberg import shown

__all__ = ["catalog"]  # the fixture


def _live_files(table: Table) -> list[Any]:
    return [task.file for task in table.refresh().scan().plan_files()]


Step = tuple[Any, dict[str, str]]  # a job's status, and the collection after it


def _copies(
    table: Table, change: Any, settings: Settings, db: Any, tmp_path: Path
) -> tuple[Table, Step, Step, Step]:
    """A full copy, ``change(table)``, then an incremental copy, a full copy and a rerun."""
    ops = operations_file(tmp_path, tmp_path, folder(table))
    settings = settings.model_copy(update={"operations_file": ops, "batch_size": 16})
    steps = []
    with Runtime(settings) as rt:
        first = run(rt, "ice", mode="full")
        check(first, db, table, empty_before=True)
        change(table)
        table = table.refresh()
        for mode in ("incremental", "full", "full"):
            steps.append((run(rt, "ice", mode=mode), _stored(db)))
    return table, steps[0], steps[1], steps[2]


def _exact(step: Step, table: Table) -> None:
    """The job completed exactly, and the collection then held the newest version of every
    key of the table (``check`` of test_iceberg, at that step)."""
    done, stored = step
    assert done.status == JobState.COMPLETED, (done.message, done.error)
    parts = (done.insertedRecords + done.updatedRecords + done.unchangedRecords
             + done.duplicateRecords + done.errorRecords)  # fmt: skip
    assert done.processedRecords == parts == done.totalRecords
    assert done.options["icebergSnapshotId"] == table.metadata.current_snapshot_id
    expected = oracle(table)[0]
    assert {k: stored.get(k) for k in expected} == expected


def _stored(db: Any) -> dict[str, str]:
    return {d["_id"]: d["notes"] for d in db.tasks.find({}, {"notes": 1})}


def test_a_compaction_of_a_table_with_one_row_per_key_is_exact(
    catalog: SqlCatalog, settings: Settings, db: Any, tmp_path: Path
) -> None:
    """Updates by copy-on-write overwrite (one live row per key), then every data file
    merged into one: the copies after it change nothing."""
    table = catalog.create_table("ns.tasks", schema=SCHEMA)
    table.append(rows(keys(60), 1))
    table.append(rows(keys(20, 60), 2))
    table.overwrite(rows(keys(15, 10), 3), overwrite_filter="taskDetailId >= 'K00010' and "
                    "taskDetailId < 'K00025'")  # fmt: skip
    table = table.refresh()
    assert len(_live_files(table)) >= 3

    def compact(t: Table) -> None:
        data = t.scan().to_arrow().sort_by([(KEY, "descending")])
        rewrite(t, _live_files(t), data, Operation.OVERWRITE)

    table, incremental, again, rerun = _copies(table, compact, settings, db, tmp_path)
    assert len(_live_files(table)) == 1
    assert table.metadata.current_snapshot().summary.operation == Operation.OVERWRITE
    for step in (incremental, again, rerun):
        _exact(step, table)
        assert step[0].insertedRecords == step[0].updatedRecords == 0, step[0]
    assert rerun[1] == oracle(table)[0]


def test_a_compaction_of_several_versions_of_a_key_keeps_the_file_order(
    catalog: SqlCatalog, settings: Settings, db: Any, tmp_path: Path
) -> None:
    """Appended versions of the same keys (several live rows per key), merged into one
    file whose writer put each key's newest version first: Iceberg keeps no order of the
    rows inside a file, so a full copy after it takes the last row of each key in the
    file, an older version (the README's limit). The incremental copy reads only rows
    newer than its watermark, none here: it keeps the newest versions."""
    table = catalog.create_table("ns.tasks", schema=SCHEMA)
    table.append(rows(keys(40), 1))
    table.append(rows(keys(20, 30), 2))  # K30-39 updated, K40-49 new
    table.append(rows(keys(10, 0), 3))  # K0-9 updated
    table = table.refresh()

    def compact(t: Table) -> None:
        data = t.scan().to_arrow().sort_by([(KEY, "ascending"), ("updatedAt", "descending")])
        rewrite(t, _live_files(t), data, Operation.OVERWRITE)

    before = oracle(table)[0]
    table, incremental, again, rerun = _copies(table, compact, settings, db, tmp_path)
    (compacted,) = _live_files(table)
    in_file = pq.read_table(shown(compacted.file_path)).to_pylist()
    assert newest(in_file) == before == oracle(table)[0]  # the same rows, merged
    _exact(incremental, table)
    assert incremental[0].insertedRecords == incremental[0].updatedRecords == 0
    # the full copy: the last row of each key in the compacted file
    assert again[0].updatedRecords == 20 and again[0].insertedRecords == 0, again[0]
    stored = again[1]
    assert stored == last(in_file)
    assert {k for k in stored if stored[k] != before[k]} == set(keys(10)) | set(keys(10, 30))
    assert rerun[1] == stored
    assert rerun[0].insertedRecords == rerun[0].updatedRecords == 0, rerun[0]


def _partitioned(catalog: SqlCatalog) -> Table:
    table = catalog.create_table("ns.tasks", schema=SCHEMA)
    with table.update_spec() as update:
        update.add_identity("projectId")
    table = table.refresh()
    table.append(rows(keys(60), 1))
    table.append(rows(keys(30, 45), 2))  # K45-59 updated (every partition), K60-74 new
    return table.refresh()


def test_a_static_overwrite_of_a_partition_in_one_snapshot(
    catalog: SqlCatalog, settings: Settings, db: Any, tmp_path: Path
) -> None:
    """Spark's INSERT OVERWRITE of partition P1: one `overwrite` snapshot removes its data
    files and adds the new rows (newer versions of some of its keys; the others leave the
    table)."""
    table = _partitioned(catalog)

    def overwrite(t: Table) -> None:
        p1 = [f for f in _live_files(t) if f.partition[0] == "P1"]
        assert len(p1) == 2
        written = [k for k in keys(75) if int(k[1:]) % 3 == 1][::2]
        rewrite(t, p1, rows(written, 3), Operation.OVERWRITE)

    table, incremental, again, rerun = _copies(table, overwrite, settings, db, tmp_path)
    assert table.metadata.current_snapshot().summary.operation == Operation.OVERWRITE
    _exact(incremental, table)
    assert incremental[0].insertedRecords == 0 and incremental[0].updatedRecords == 13
    for step in (again, rerun):
        _exact(step, table)
        assert step[0].insertedRecords == step[0].updatedRecords == 0, step[0]


def test_pyicebergs_overwrite_and_dynamic_overwrite_of_a_partition(
    catalog: SqlCatalog, settings: Settings, db: Any, tmp_path: Path
) -> None:
    """pyiceberg's `overwrite(df, overwrite_filter=...)` of a partition and its
    `dynamic_partition_overwrite(df)`: each a delete, then an append of the new rows."""
    table = _partitioned(catalog)

    def overwrite(t: Table) -> None:
        t.overwrite(rows(keys(10, 2)[::3], 3), overwrite_filter="projectId = 'P2'")
        t.refresh().dynamic_partition_overwrite(
            rows([k for k in keys(75) if int(k[1:]) % 3 == 0][:7], 4)
        )

    table, incremental, again, rerun = _copies(table, overwrite, settings, db, tmp_path)
    _exact(incremental, table)
    assert incremental[0].insertedRecords == 0 and incremental[0].updatedRecords == 4 + 7
    for step in (again, rerun):
        _exact(step, table)
        assert step[0].insertedRecords == step[0].updatedRecords == 0, step[0]
    assert pa.types.is_string(table.scan().to_arrow().schema.field(KEY).type)


def test_a_static_overwrite_loses_to_a_newer_version_in_another_partition(
    catalog: SqlCatalog, settings: Settings, db: Any, tmp_path: Path
) -> None:
    """The README's limit, exactly: a key written in P1 (v1), then in P2 (v2, appended),
    then in P1 again by a one-snapshot static overwrite of P1 (v3). The overwrite's file
    takes the place of the newest P1 file it removed, written before v2, so in lake order
    v2 comes last: the incremental copy writes v3 (newer than its watermark), a full copy
    v2 ("1 updated"), a rerun nothing."""
    table = _partitioned(catalog)
    moved = "K00001"  # in P1
    table.append(rows([moved], 2, project=lambda k: "P2"))
    table = table.refresh()

    def overwrite(t: Table) -> None:
        p1 = [f for f in _live_files(t) if f.partition[0] == "P1"]
        written = [k for k in keys(75) if int(k[1:]) % 3 == 1]
        rewrite(t, p1, rows(written, 3), Operation.OVERWRITE)

    table, incremental, again, rerun = _copies(table, overwrite, settings, db, tmp_path)
    assert oracle(table)[0][moved] == "v3"
    _exact(incremental, table)
    assert again[1][moved] == "v2" and again[0].updatedRecords == 1, again[0]
    assert {k: v for k, v in again[1].items() if k != moved} == {
        k: v for k, v in oracle(table)[0].items() if k != moved
    }
    assert rerun[0].insertedRecords == rerun[0].updatedRecords == 0, rerun[0]
