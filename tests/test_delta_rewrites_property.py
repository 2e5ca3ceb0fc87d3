"""Random programs of Delta appends, DELETEs and OPTIMIZEs, copied by lakesync (issue #25).

A delta-rs DELETE or OPTIMIZE writes rows of several versions into one file in its own
order; lakesync traces each row back to the row it was copied from (README, "Delta rewrites
that merge versions, traced"). The plan-level tests check that order; this one checks what
a copy writes: after every copy (full whole, full in partitions run in random order,
incremental, mirror) the collection holds what an independent model says, the counts are
exact, no order-in-doubt warning, and a rerun writes nothing.

The model is the table as a list of rows in commit order (not a dict: a DELETE of a key's
newest row leaves an older one as the newest), checked against deltalake's own reading
after every operation.
"""

from __future__ import annotations

import uuid
from collections import Counter
from datetime import timedelta
from pathlib import Path
from typing import Any, NamedTuple

import hypothesis.strategies as st
import pyarrow as pa
from deltalake import DeltaTable, QueryBuilder, write_deltalake
from hypothesis import HealthCheck, event, given, note
from hypothesis import settings as hsettings
from tests.helpers import SCHEMA, T0, counts_of, database_of, fresh, record, run_partitioned

from lakesync.config import Settings
from lakesync.lake import Lake
from lakesync.models import JobState, JobStatus
from lakesync.runtime import Runtime

KEYS, PARTS = 8, 3


class Row(NamedTuple):
    """One row of the table: its key, partition, version (the append that wrote it) and
    serial (unique, but for a row written twice alike; the watermark grows with it)."""

    key: str
    part: str
    version: int
    serial: int


Stored = dict[str, tuple[str, str, float]]  # key -> (projectId, notes, hoursLogged)


def content(row: Row) -> tuple[str, str, float]:
    return row.part, f"v{row.version}", float(row.serial)


def arrow(rows: list[Row]) -> pa.Table:
    """The rows as TaskDetail records: notes and tags say the version, hoursLogged and
    updatedAt (the watermark) the serial."""
    at = [T0 + timedelta(seconds=r.serial) for r in rows]
    return pa.Table.from_pylist(
        [
            record(r.key, r.version)
            | {"projectId": r.part, "hoursLogged": float(r.serial), "updatedAt": when}
            for r, when in zip(rows, at, strict=True)
        ],
        SCHEMA,
    )


def newest(rows: list[Row]) -> Stored:
    """The newest row of every key: the last in commit order."""
    return {r.key: content(r) for r in rows}


def stored(db: Any) -> Stored:
    docs = db.taskdetails.find({}, {"projectId": 1, "notes": 1, "hoursLogged": 1})
    return {d["_id"]: (d["projectId"], d["notes"], d["hoursLogged"]) for d in docs}


def deltalake_rows(path: Path) -> Counter[tuple[str, str, str, float]]:
    reader = QueryBuilder().register("t", DeltaTable(str(path))).execute("select * from t")
    return Counter(
        (r["taskDetailId"], r["projectId"], r["notes"], r["hoursLogged"])
        for r in pa.table(reader.read_all()).to_pylist()
    )


# -- the program ------------------------------------------------------------------------------

# an append: (key, partition, written twice alike) per row, keys repeating within it
APPEND = st.tuples(
    st.just("append"),
    st.lists(
        st.tuples(st.integers(0, KEYS - 1), st.integers(0, PARTS - 1), st.booleans()),
        min_size=1, max_size=20,
    ),
)  # fmt: skip
_KEYS = st.sets(st.integers(0, KEYS - 1), min_size=1, max_size=3)
_VERSIONS = st.sets(st.integers(1, 4), min_size=1, max_size=2)
DELETE = st.one_of(
    st.tuples(st.just("delete"), st.just("key"), _KEYS),
    st.tuples(st.just("delete"), st.just("version"), _VERSIONS),
    st.tuples(st.just("delete"), st.just("part"), st.sets(st.integers(0, PARTS - 1), max_size=1)),
    st.tuples(st.just("delete"), st.just("key+version"), st.tuples(_KEYS, _VERSIONS)),
)
# target sizes of a few small files (~2-3 KB each here): several bins per partition, or one
OPTIMIZE = st.tuples(
    st.just("optimize"), st.sampled_from([None, 4000, 8000]), st.sampled_from(["compact", "z"])
)
COPY = st.tuples(
    st.just("copy"),
    st.sampled_from(["whole", "partitioned", "incremental", "mirror"]),
    st.integers(0, 99),
)
PROGRAM = st.tuples(
    st.booleans(),  # partitioned by projectId
    st.sampled_from([2, 5, 64]),  # batch size: a key's rows in one batch, or spread over many
    st.lists(APPEND, min_size=2, max_size=3),
    st.lists(st.one_of(APPEND, DELETE, DELETE, OPTIMIZE, COPY), min_size=1, max_size=6),
    st.one_of(DELETE, OPTIMIZE),  # at least one rewrite, then a copy of it
    COPY,
)


def key(k: int) -> str:
    return f"K{k}"


def part(p: int) -> str:
    return f"PRJ-{p}"


def predicate(kind: str, values: Any) -> tuple[str, Any]:
    """The DELETE's SQL predicate and the same test on a model row."""

    def listed(column: str, items: list[str]) -> str:
        return f"{column} in ({', '.join(repr(i) for i in items)})"

    if kind == "key":
        keys = sorted(key(k) for k in values)
        return listed("taskDetailId", keys), lambda r: r.key in keys
    if kind == "version":
        vs = sorted(values)
        return listed("notes", [f"v{v}" for v in vs]), lambda r: r.version in vs
    if kind == "part":
        ps = sorted(part(p) for p in values) or ["PRJ-none"]
        return listed("projectId", ps), lambda r: r.part in ps
    keys, vs = sorted(key(k) for k in values[0]), sorted(values[1])
    sql = f"{listed('taskDetailId', keys)} and {listed('notes', [f'v{v}' for v in vs])}"
    return sql, lambda r: r.key in keys and r.version in vs


# -- copies -----------------------------------------------------------------------------------


def run(settings: Settings, how: str, seed: int) -> JobStatus:
    """One copy job: whole, its partitions run one at a time in a random order, incremental
    or mirror."""
    options: dict[str, Any] = {}
    if how == "incremental":
        options = {"mode": "incremental"}
    elif how == "mirror":
        options = {"mode": "mirror", "allowEmpty": True}
    if how != "partitioned":
        with Runtime(settings) as rt:
            job, _ = rt.jobs.start("copy-taskdetail", options, trusted=True)
            rt.runner.run(job.jobId)
            return rt.jobs.get(job.jobId)
    return run_partitioned(settings, "random", seed, least=0)


class Copied:
    """What lakesync has read so far: the watermark (the highest serial any completed copy
    read; it never moves back) and the collection."""

    def __init__(self) -> None:
        self.watermark: int | None = None
        self.collection: Stored = {}


def expect(how: str, rows: list[Row], copied: Copied) -> tuple[Stored, list[Row]]:
    """The collection after a copy of ``how``, and the rows it may read.

    Full and mirror read every row and write each key's newest; a full copy deletes
    nothing (a key whose rows were all deleted keeps its document), a mirror deletes those.
    An incremental copy reads the rows at or after the watermark (README, "Sync modes"),
    in the files added since the version the last copy read, and writes each of their
    keys' newest among them; the serial, hence the watermark, grows with commit order, so
    that is the key's newest row in the table. It deletes nothing and reads no older row:
    a key whose newest version was deleted keeps it until a full copy."""
    if how == "mirror":
        return newest(rows), rows
    if how == "incremental" and copied.watermark is not None:
        w = copied.watermark
        read = [r for r in rows if r.serial >= w]
        return copied.collection | newest(read), read
    return copied.collection | newest(rows), rows


def check(done: JobStatus, how: str, rows: list[Row], copied: Copied, db: Any) -> None:
    assert done.status == JobState.COMPLETED, (how, done.message, done.error)
    assert "Warning" not in (done.message or ""), done.message  # no order in doubt
    expected, read = expect(how, rows, copied)
    got = stored(db)
    assert got == expected, (how, sorted(set(got.items()) ^ set(expected.items())))
    before = copied.collection
    c = counts_of(done)
    assert (
        c["processedRecords"]
        == done.totalRecords
        == sum(c[k] for k in c if k != "processedRecords")
    ), c
    assert c["errorRecords"] == 0, c
    winners = newest(read)
    inserted = sum(1 for k in winners if k not in before)
    updated = sum(1 for k, v in winners.items() if k in before and before[k] != v)
    assert (c["insertedRecords"], c["updatedRecords"]) == (inserted, updated), (how, c)
    if how == "incremental" and copied.watermark is not None:
        # a row at the watermark itself is read again only if a rewrite moved it to a new file
        w = copied.watermark
        assert sum(r.serial > w for r in rows) <= done.totalRecords <= len(read), c
    else:
        assert done.totalRecords == len(rows), c
        assert c["duplicateRecords"] == len(rows) - len(winners), c
    if how == "mirror":
        assert done.deletedRecords == len(set(before) - set(winners)), done.deletedRecords
    copied.collection = got
    if rows:
        top = max(r.serial for r in rows)
        copied.watermark = top if copied.watermark is None else max(copied.watermark, top)


def play(settings: Settings, tmp_path: Path, program: Any) -> None:
    partitioned, batch_size, first, ops, rewrite, last = program
    note(f"partitioned={partitioned}, batch_size={batch_size}")
    note(f"program={[*first, *ops, rewrite, last]}")
    path = tmp_path / uuid.uuid4().hex  # (tmp_path is one for all examples)
    s = fresh(settings, path, partition_rows=3, batch_size=batch_size)
    db = database_of(s)
    rows: list[Row] = []
    copied = Copied()
    versions = 0
    try:
        for op in [*first, *ops, rewrite, last]:
            if op[0] == "append":
                versions += 1
                batch: list[Row] = []
                parts: dict[str, str] = {}
                for k, p, twice in op[1]:
                    # a key keeps one partition within an append: files of one commit have no
                    # order between them that a model could follow
                    place = parts.setdefault(key(k), part(p))
                    row = Row(key(k), place, versions, len(rows) + len(batch) + 1)
                    batch += [row, row] if twice else [row]
                write_deltalake(
                    str(path), arrow(batch), mode="append",
                    partition_by=["projectId"] if partitioned else None,
                )  # fmt: skip
                rows += batch
            elif op[0] == "delete":
                sql, matches = predicate(op[1], op[2])
                left = [r for r in rows if not matches(r)]
                DeltaTable(str(path)).delete(sql)
                event(f"delete by {op[1]}: {'some' if len(left) < len(rows) else 'no'} rows")
                rows = left
            elif op[0] == "optimize":
                table = DeltaTable(str(path))
                if op[2] == "z":
                    table.optimize.z_order(["taskDetailId"], target_size=op[1])
                else:
                    table.optimize.compact(target_size=op[1])
            else:
                how, seed = op[1], op[2]
                doubts = {d.kind for d in Lake.open(str(path)).doubts if d}
                event(f"copy {how} of a table with {sorted(doubts) or 'no'} rewrites")
                done = run(s, how, seed)
                if how == "partitioned":
                    event(f"partitions: {'several' if (done.partitions or 0) > 1 else 'one'}")
                check(done, how, rows, copied, db)
                again = run(s, how, seed + 1)  # a rerun writes nothing
                assert again.status == JobState.COMPLETED, (again.message, again.error)
                assert (again.insertedRecords, again.updatedRecords) == (0, 0), (how, again)
                assert (again.deletedRecords or 0) == 0 and stored(db) == copied.collection
                continue
            model = Counter((r.key, r.part, f"v{r.version}", float(r.serial)) for r in rows)
            assert deltalake_rows(path) == model, op  # the model is the table deltalake reads
    finally:
        db.client.drop_database(s.database)
        db.client.close()


@hsettings(
    max_examples=25,
    derandomize=True,  # the same programs every run: a failure is always found again
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(program=PROGRAM)
def test_copies_of_random_appends_deletes_and_compactions_hold_the_newest_of_every_key(
    settings: Settings, tmp_path: Path, program: Any
) -> None:
    """Appends of repeating keys (within an append too), DELETEs by key, version and
    partition, OPTIMIZE compact and z-order with small targets, on partitioned and
    unpartitioned tables; after each copy the collection is the model's."""
    play(settings, tmp_path, program)
