"""Declared CSV cells tried from outside (an attack on issue #25, "CSV as written"): a
cell's verdict is its own, not its batch's. DuckDB's ``read_csv`` with the declared types
is the oracle, as in ``tests/test_csv.py``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import duckdb
from tests.helpers import child_env, lakesync

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


def test_inspect_samples_the_first_records_of_files_whose_types_differ(
    settings: Settings, tmp_path: Path
) -> None:
    """A batch ends where the files' schemas differ (a JSON field an integer in one file and
    an object in the next, a CSV column read as numbers in one file and text in the next):
    `lakesync inspect` sampled that first batch only, "the first 2 records" of a lake of 7,
    missing the rejections and repeated keys of the rest of its first 1,000 records."""
    lake = tmp_path / "lake"
    lake.mkdir()
    (lake / "a.ndjson").write_text('{"id": 1, "x": 1}\n{"id": 2, "x": 2}\n')
    (lake / "b.ndjson").write_text('{"id": 1, "x": {"a": 1}}\n')
    (lake / "c.ndjson").write_text('{"id": 2, "x": 3}\n{"x": 4}\n')
    config = tmp_path / "lakesync.toml"
    config.write_text(f'[operations.j]\nsource = "{lake}"\ncollection = "j"\nkey = "id"\n')
    env = child_env(settings, LAKESYNC_OPERATIONS_FILE=str(config))
    run = lakesync(env, "inspect", "j", "--json")
    assert run.returncode == 0, run.stderr
    p = json.loads(run.stdout)
    assert p["rows"] == 5 and p["sampleRows"] == 5, p
    assert p["repeatedKeys"] == {"keys": 2, "records": 2, "among": "the first 5 records"}
    assert p["sampleRejected"] == 1 and p["rejections"][0]["file"].endswith("c.ndjson")
    assert p["rejections"][0]["row"] == 1
    assert [d["_id"] for d in p["documents"]] == [1, 2, 1, 2]


def test_a_byte_the_declared_encoding_does_not_define_rejects_its_record(
    settings: Settings, db: Any, tmp_path: Path
) -> None:
    """cp1252 leaves 0x81, 0x8d, 0x8f, 0x90 and 0x9d undefined. With ``encoding =
    "cp1252"`` one such byte in the second record failed the job with "The header of a.csv
    is not valid cp1252 (byte 0x81 in it)": the header was valid, and the README's rule is
    that text not valid in the file's encoding rejects its record (as with UTF-8)."""
    lake = tmp_path / "lake"
    lake.mkdir()
    (lake / "a.csv").write_bytes(b"id;name\n007;Zo\xeb \x80\n7;x\x81y\n8;ok\n")
    config = tmp_path / "lakesync.toml"
    config.write_text(
        f'[operations.cells]\nsource = "{lake}"\nformat = "csv"\ncollection = "cells"\n'
        'key = "id"\nencoding = "cp1252"\ndelimiter = ";"\n'
    )
    with Runtime(settings.model_copy(update={"operations_file": config})) as rt:
        job, _ = rt.jobs.start("cells", {}, trusted=True)
        rt.runner.run(job.jobId)
        done = rt.jobs.get(job.jobId)
    assert done.status == JobState.COMPLETED, done.error
    assert {d["_id"]: d["name"] for d in db.cells.find()} == {"007": "Zoë €", "8": "ok"}
    (rejected,) = db.copyerrors.find({"jobId": done.jobId})
    assert rejected["key"] == "7" and "0x81" in rejected["reason"], rejected


def test_a_json_record_of_megabytes_is_copied_whole(
    settings: Settings, db: Any, tmp_path: Path
) -> None:
    """A record may be as large as a document: a 5 MB string in an NDJSON file (plain,
    gzipped, or a JSON array) failed the whole job with Arrow's "straddling object
    straddles two block boundaries" (its default block is 1 MB), as a CSV cell did before."""
    import gzip

    lake = tmp_path / "lake"
    lake.mkdir()
    big = "z" * 5_000_000
    lines = f'{{"id": "1", "s": "a"}}\n{{"id": "2", "s": "{big}"}}\n{{"id": "3", "s": "c"}}\n'
    (lake / "a.ndjson").write_text(lines)
    with gzip.open(lake / "b.ndjson.gz", "wt") as f:
        f.write(lines.replace('"id": "', '"id": "b'))
    (lake / "c.json").write_text(f'[{{"id": "c1", "s": "{big}"}},\r\n {{"id": "c2", "s": "x"}}]')
    config = tmp_path / "lakesync.toml"
    config.write_text(f'[operations.j]\nsource = "{lake}"\ncollection = "j"\nkey = "id"\n')
    with Runtime(settings.model_copy(update={"operations_file": config})) as rt:
        job, _ = rt.jobs.start("j", {}, trusted=True)
        rt.runner.run(job.jobId)
        done = rt.jobs.get(job.jobId)
    assert done.status == JobState.COMPLETED, done.error
    sizes = {d["_id"]: len(d["s"]) for d in db.j.find()}
    assert sizes == {"1": 1, "2": 5_000_000, "3": 1, "b1": 1, "b2": 5_000_000, "b3": 1,
                     "c1": 5_000_000, "c2": 1}  # fmt: skip


def test_a_header_that_repeats_a_name_is_named_as_duckdb_names_it(
    settings: Settings, db: Any, tmp_path: Path
) -> None:
    """A header repeating a name (``a,a,a,a_1``, and two empty names) failed the job with
    Arrow's "CSV file contained multiple columns named a"; DuckDB's ``read_csv`` names them
    ``a``, ``a_1``, ``a_2``, ``a_1_1``, and the empty ones ``column<i>`` (suffixed too)."""
    lake = tmp_path / "lake"
    lake.mkdir()
    (lake / "a.csv").write_text("id,a,a,a,a_1,,column5,\n1,w,x,y,z,u,v,t\n")
    config = tmp_path / "lakesync.toml"
    config.write_text(
        f'[operations.dup]\nsource = "{lake}"\nformat = "csv"\ncollection = "dup"\nkey = "id"\n'
    )
    with Runtime(settings.model_copy(update={"operations_file": config})) as rt:
        job, _ = rt.jobs.start("dup", {}, trusted=True)
        rt.runner.run(job.jobId)
        done = rt.jobs.get(job.jobId)
    assert done.status == JobState.COMPLETED, done.error
    relation = duckdb.sql(f"SELECT * FROM read_csv('{lake / 'a.csv'}', all_varchar = true)")
    (row,) = relation.fetchall()
    (doc,) = db.dup.find({}, {"_id": 0, "_lakesync": 0})
    assert doc == dict(zip(relation.columns, row, strict=True))
    assert list(doc) == ["id", "a", "a_1", "a_2", "a_1_1", "column5", "column5_1", "column7"]
