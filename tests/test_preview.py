"""The preview (`lakesync inspect`, POST /api/preview): what a lake holds and what a copy would
write, from metadata and a sample, with nothing written."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from fastapi.testclient import TestClient
from tests.helpers import aws_test_env, child_env, free_port, lakesync, s3_settings

from lakesync.api.app import create_app
from lakesync.config import Settings
from lakesync.runtime import Runtime


def test_preview_of_the_demo_lake_answers_what_a_copy_would_write(
    client: TestClient, db: Any
) -> None:
    answer = client.post("/api/preview", json={"operation": "copy-taskdetail"})
    assert answer.status_code == 200, answer.text
    p = answer.json()
    assert p["format"] == "parquet" and p["rows"] == 5000 and p["rowsFrom"] == "file footers"
    assert p["files"] >= 2 and p["deltaVersion"] is None
    types = {c["name"]: c["bsonType"] for c in p["schema"]}
    assert types["updatedAt"] == "date" and types["tags"] == "array of string"
    assert types["hoursLogged"] == "double" and types["taskDetailId"] == "string"
    assert len(p["documents"]) == 10
    first = p["documents"][0]
    assert first["_id"] == first["taskDetailId"] and "$date" in first["updatedAt"]
    assert p["sampleRejected"] == len(p["rejections"]) or len(p["rejections"]) == 10
    assert all(r["reason"] and r["file"].endswith(".parquet") for r in p["rejections"])
    assert db.taskdetails.count_documents({}) == 0 and db.jobstatuses.count_documents({}) == 0


def test_preview_names_repeated_keys_and_rejections_of_a_sample(
    client: TestClient, settings: Settings, tmp_path: Path
) -> None:
    lake = tmp_path / "lake"  # outside the allowed roots of the API (the operation's lake)
    (lake / "projectId=PRJ-1").mkdir(parents=True)
    rows = pq.read_table(next(Path(str(settings.lake_uri)).rglob("*.parquet")))
    repeated = pa.concat_tables([rows.slice(0, 3), rows.slice(0, 3)])
    pq.write_table(repeated, lake / "projectId=PRJ-1" / "part-0.parquet")
    refused = client.post("/api/preview", json={"options": {"source": str(lake)}})
    assert refused.status_code in (400, 403), refused.text  # outside the allowed roots
    assert "allowed roots" in refused.json()["error"]
    env = child_env(settings)
    run = lakesync(env, "inspect", "--source", str(lake), "--json")
    assert run.returncode == 0, run.stderr
    p = json.loads(run.stdout)
    valid = 3 - sum(1 for r in p["rejections"] if r["row"] < 3)
    assert p["rows"] == 6 and p["repeatedKeys"]["keys"] == valid
    assert p["repeatedKeys"]["records"] == valid


def test_inspect_of_a_delta_table_names_its_version(settings: Settings, tmp_path: Path) -> None:
    from tests.test_types import _fixtures

    table = _fixtures() / "table_with_deletion_logs"
    config = tmp_path / "lakesync.toml"
    config.write_text(
        f'[operations.people]\nsource = "{table}"\ncollection = "people"\nkey = "id"\n'
    )
    env = child_env(settings, COLUMNS="80", LAKESYNC_OPERATIONS_FILE=str(config))
    run = lakesync(env, "inspect", "people", "--json")
    assert run.returncode == 0, run.stderr
    p = json.loads(run.stdout)
    assert p["format"] == "delta" and p["deltaVersion"] is not None
    assert p["rows"] == 98  # the live rows: deletion vectors applied
    assert {c["name"]: c["bsonType"] for c in p["schema"]}["id"] == "int or long"
    shown = lakesync(env, "inspect", "people")
    assert f"Delta version {p['deltaVersion']}" in shown.stdout, shown.stdout
    assert "not a TaskDetail" not in shown.stdout and "Traceback" not in shown.stderr
    fake = child_env(settings, COLUMNS="80")  # the TaskDetail operation on that table
    refused = lakesync(fake, "inspect", "--source", str(table))
    assert refused.returncode == 1 and "lacks required column" in refused.stderr


def test_the_openapi_document_names_the_preview_and_the_destination(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    assert "post" in paths["/api/preview"] and "get" in paths["/api/destination"]


def test_preview_rejects_the_records_the_reader_refused_with_their_reason(
    settings: Settings, tmp_path: Path
) -> None:
    """A JSON record nested too deep and a CSV cell its encoding cannot decode: the preview
    rejects them with the copy's reason (not as a record missing its key, nor as a valid
    record with the cell made null)."""
    from lakesync.operations import OperationRegistry
    from lakesync.preview import preview
    from lakesync.typemap import NX_27017

    deep, latin = tmp_path / "deep", tmp_path / "latin"
    deep.mkdir()
    latin.mkdir()
    nested = "[" * 150 + "]" * 150
    (deep / "a.ndjson").write_text(f'{{"id": 1}}\n{{"id": 2, "v": {nested}}}\n{{"id": 3}}\n')
    (latin / "a.csv").write_bytes("id,name\n1,plain\n2,café\n".encode("latin-1"))
    config = tmp_path / "lakesync.toml"
    config.write_text(
        f'[operations.deep]\nsource = "{deep}"\nformat = "json"\ncollection = "d"\nkey = "id"\n'
        f'[operations.latin]\nsource = "{latin}"\nformat = "csv"\ncollection = "l"\nkey = "id"\n'
    )
    s = settings.model_copy(update={"operations_file": config})
    registry = OperationRegistry.from_settings(s)
    p = preview(s, registry, "deep", limits=NX_27017, trusted=True)
    assert [(r["row"], r["reason"][:40]) for r in p["rejections"]] == [
        (1, "the record nests arrays or objects more ")
    ]
    p = preview(s, registry, "latin", limits=NX_27017, trusted=True)
    assert [d["_id"] for d in p["documents"]] == ["1"]
    assert [r["row"] for r in p["rejections"]] == [1]
    assert "not valid utf-8" in p["rejections"][0]["reason"]


def test_preview_of_an_iceberg_table_names_its_snapshot_not_a_delta_version(
    settings: Settings, tmp_path: Path, capsys: Any
) -> None:
    from pyiceberg.catalog.sql import SqlCatalog

    from lakesync.cli import _print_preview
    from lakesync.operations import OperationRegistry
    from lakesync.preview import preview
    from lakesync.typemap import NX_27017

    (tmp_path / "wh").mkdir()
    catalog = SqlCatalog(
        "local", uri=f"sqlite:///{tmp_path}/c.db", warehouse=f"file://{tmp_path}/wh"
    )
    catalog.create_namespace("ns")
    table = catalog.create_table("ns.t", schema=pa.schema([("id", pa.string())]))
    table.append(pa.table({"id": ["a", "b"]}))
    snapshot = table.metadata.current_snapshot_id
    config = tmp_path / "lakesync.toml"
    config.write_text(
        f'[operations.ice]\nsource = "{table.metadata.location.removeprefix("file://")}"\n'
        'format = "iceberg"\ncollection = "ice"\nkey = "id"\n'
    )
    s = settings.model_copy(update={"operations_file": config})
    p = preview(s, OperationRegistry.from_settings(s), "ice", limits=NX_27017, trusted=True)
    assert p["deltaVersion"] is None and p["icebergSnapshotId"] == snapshot
    _print_preview(p)
    shown = capsys.readouterr().out
    assert "Delta version" not in shown and f"Iceberg snapshot {snapshot}" in shown, shown


def test_preview_of_an_unreachable_s3_endpoint_says_so_and_speaks_of_no_job(
    settings: Settings, db: Any
) -> None:
    """A preview creates no job: its error names the endpoint and what to check, not a job's
    checkpoint; the API answers 503 (try again later), not 400 (a bad request)."""
    endpoint = f"127.0.0.1:{free_port()}"  # nothing listens there
    settings = s3_settings(settings, f"http://{endpoint}", allowed_roots=["s3://lake"])
    with aws_test_env():
        env = child_env(settings, LAKESYNC_S3_ENDPOINT_URL=f"http://{endpoint}")
        run = lakesync(env, "inspect")
        with Runtime(settings, executor="local") as rt, TestClient(create_app(rt)) as client:
            answer = client.post("/api/preview", json={"operation": "copy-taskdetail"})
    assert run.returncode == 1, run.stderr
    said = " ".join(run.stderr.split())
    assert f"The S3 endpoint {endpoint} is unreachable while reading s3://lake/tasks" in said
    assert said.endswith("Check LAKESYNC_S3_ENDPOINT_URL and that the server is running and "
                         "reachable."), said  # fmt: skip
    assert answer.status_code == 503, answer.text
    error = answer.json()["error"]
    assert f"The S3 endpoint {endpoint} is unreachable" in error
    for shown in (said, error):
        assert "job" not in shown and "checkpoint" not in shown, shown
    assert db.jobstatuses.count_documents({}) == 0


def test_inspect_names_the_files_whose_row_order_a_rewrite_merged(
    settings: Settings, tmp_path: Path
) -> None:
    """A delta-rs DELETE that rewrote files of several versions into one, and vacuum removed
    the files it read: the preview says which files' row order the table cannot tell (a
    plain table, or the rewrite while those files are there, says nothing)."""
    from deltalake import DeltaTable, write_deltalake

    table = tmp_path / "updates"
    for v in range(3):
        write_deltalake(str(table), pa.table({"k": range(100), "v": [v] * 100}), mode="append")
    config = tmp_path / "lakesync.toml"
    config.write_text(
        f'[operations.kv]\nsource = "{table}"\ncollection = "kv"\nkey = "k"\n'
    )  # fmt: skip
    env = child_env(settings, COLUMNS="80", LAKESYNC_OPERATIONS_FILE=str(config))
    before = json.loads(lakesync(env, "inspect", "kv", "--json").stdout)
    assert before["orderInDoubt"] == {"files": 0, "examples": []}
    DeltaTable(str(table)).delete("k % 9 = 0")  # the rows it copied can still be traced
    traced = json.loads(lakesync(env, "inspect", "kv", "--json").stdout)
    assert traced["orderInDoubt"] == {"files": 0, "examples": []}
    DeltaTable(str(table)).vacuum(
        retention_hours=0, enforce_retention_duration=False, dry_run=False
    )
    after = json.loads(lakesync(env, "inspect", "kv", "--json").stdout)
    assert after["orderInDoubt"]["files"] >= 1
    assert "merged rewrite of versions 0..2" in after["orderInDoubt"]["examples"][0]
    shown = lakesync(env, "inspect", "kv")
    assert "lake order" in shown.stdout and "older version" in shown.stdout, shown.stdout
