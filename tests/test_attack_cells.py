"""Declared CSV cells tried from outside (an attack on issue #25, "CSV as written"): a
cell's verdict is its own, not its batch's. DuckDB's ``read_csv`` with the declared types
is the oracle, as in ``tests/test_csv.py``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import duckdb

from lakesync.config import Settings
from lakesync.models import JobState
from lakesync.runtime import Runtime

TOML = """[operations.cells]
source = "{lake}"
collection = "cells"
key = "id"
format = "csv"
[operations.cells.schema.fields]
id = {{type = "string", required = true}}
b = {{type = "bool", nullable = true}}
n = {{type = "int", nullable = true}}
"""


def _copy(
    settings: Settings, db: Any, config: Path, batch_size: int
) -> tuple[dict[str, Any], list[str]]:
    """The collection (id: (b, n)) and the rejected keys of one full copy."""
    with Runtime(settings.model_copy(update={"operations_file": config})) as rt:
        job, _ = rt.jobs.start("cells", {"batchSize": batch_size}, trusted=True)
        rt.runner.run(job.jobId)
        done = rt.jobs.get(job.jobId)
        assert done.status == JobState.COMPLETED, (done.message, done.error)
    docs = {d["id"]: (d.get("b"), d.get("n")) for d in db.cells.find()}
    rejected = sorted(e["key"] for e in db.copyerrors.find({"jobId": done.jobId}))
    db.cells.drop()
    return docs, rejected


def test_a_declared_cell_is_read_alike_whatever_else_its_batch_holds(
    settings: Settings, db: Any, tmp_path: Path
) -> None:
    """A bool cell "1" and an int cell "0x10" are what DuckDB reads (true, 16), and Arrow's
    cast of a clean column gives them so; one bad cell in the same batch (here of another
    file) sent the whole batch to the per-record fallback, which rejected them: the first
    file's records were rejected with the default batch size and copied with
    ``batchSize`` 1. The same lake must give the same collection in any batching."""
    lake = tmp_path / "lake"
    lake.mkdir()
    (lake / "a.csv").write_text("id,b,n\nA1,1,0x10\nA2,0,7\nA3,true,8\n")
    (lake / "b.csv").write_text("id,b,n\nB1,1,0x10\nB2,0,7\nB3,maybe,9\n")
    config = tmp_path / "lakesync.toml"
    config.write_text(TOML.format(lake=lake))
    types = {"id": "VARCHAR", "b": "BOOLEAN", "n": "BIGINT"}
    query = f"SELECT id, b, n FROM read_csv({[str(lake / f) for f in ('a.csv', 'b.csv')]!r}, "
    query += f"columns = {types!r}, allow_quoted_nulls = false, ignore_errors = true)"
    oracle = {r[0]: (r[1], r[2]) for r in duckdb.sql(query).fetchall()}
    whole = _copy(settings, db, config, 1000)
    assert whole == _copy(settings, db, config, 1)
    assert whole == (oracle, ["B3"])
