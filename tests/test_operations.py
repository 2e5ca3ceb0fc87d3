"""Operations declared in lakesync.toml: loading, config errors, the CLI and the API."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fastapi.testclient import TestClient
from tests.helpers import lakesync as run_lakesync
from tests.helpers import wait_done

from lakesync.api.app import create_app
from lakesync.api.errors import status_of
from lakesync.config import Settings
from lakesync.errors import ConfigError, RequestError
from lakesync.operations import OperationRegistry, load_operations
from lakesync.runtime import Runtime

PROJECTS_TOML = """
[operations.copy-projects]
description = "Projects"
source = "projects"
format = "parquet"
collection = "projects"
key = "projectId"
batchSize = 50
mode = "incremental"
watermark = "updatedAt"
[operations.copy-projects.schema.fields]
projectId = { type = "string", required = true }
name = { type = "string", required = true }
budget = { type = "float", min = 0 }
updatedAt = { type = "timestamp", required = true }
"""

BASE = datetime(2025, 3, 1, tzinfo=UTC)


def write_projects(lake: Path, first: int, n: int, *, bad_every: int = 0, day: int = 0) -> None:
    """n projects from number `first` in a new file; every bad_every-th has a negative budget."""
    lake.mkdir(parents=True, exist_ok=True)
    numbers = range(first, first + n)
    table = pa.table({
        "projectId": [f"P-{i:05d}" for i in numbers],
        "name": [f"Project {i}" for i in numbers],
        "budget": [-1.0 if bad_every and i % bad_every == 0 else 1000.0 + i for i in numbers],
        "owner": ["someone"] * n,  # not declared: not copied
        "updatedAt": pa.array([BASE + timedelta(days=day, minutes=i) for i in numbers],
                              pa.timestamp("ms", tz="UTC")),
    })  # fmt: skip
    pq.write_table(table, lake / f"part-{first:05d}.parquet")


def write_config(folder: Path, text: str) -> Path:
    path = folder / "lakesync.toml"
    path.write_text(text)
    return path


def config_error(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as info:
        load_operations(write_config(tmp_path, text))
    return str(info.value)


# -- loading ---------------------------------------------------------------------------------


def test_declared_operation_is_loaded_with_its_schema(settings: Settings, tmp_path: Path) -> None:
    path = write_config(tmp_path, PROJECTS_TOML)
    declared = settings.model_copy(update={"operations_file": path})
    registry = OperationRegistry.from_settings(declared)
    assert registry.names() == ["copy-taskdetail", "copy-projects"]
    op = registry.get("copy-projects")
    assert op.source == str(tmp_path / "projects")  # relative to the file
    assert (op.collection, op.format, op.batchSize) == ("projects", "parquet", 50)
    assert (op.mode, op.watermark, op.schema_.key) == ("incremental", "updatedAt", "projectId")
    rules = {r.name: r for r in op.schema_.fields}
    assert rules["projectId"].required and not rules["projectId"].nullable
    assert rules["budget"].min == 0 and rules["budget"].nullable and not rules["budget"].required
    assert rules["updatedAt"].type == "timestamp" and not rules["updatedAt"].nullable


def test_no_file_means_only_the_built_in_operation(settings: Settings, tmp_path: Path) -> None:
    missing = settings.model_copy(update={"operations_file": tmp_path / "nope.toml"})
    assert OperationRegistry.from_settings(missing).names() == ["copy-taskdetail"]


def test_operation_without_schema_keeps_every_column(tmp_path: Path) -> None:
    (op,) = load_operations(write_config(tmp_path, """
[operations.raw]
source = "s3://bucket/raw/"
collection = "raw"
key = "id"
"""))  # fmt: skip
    assert op.schema_.fields == [] and op.schema_.key == "id" and op.watermark is None
    assert op.source == "s3://bucket/raw/" and op.mode == "full"


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ('[operations.copy-projects]\nkey = "projectId"\n',
         "lakesync.toml: operation 'copy-projects': collection is required"),
        ('[operations.p]\ncollection = "p"\n', "operation 'p': key is required"),
        ('[operations.p]\ncollection = "p"\nkey = "k"\ncolection = "x"\n',
         "operation 'p': unknown field 'colection'"),
        ('[operations.p]\ncollection = "p"\nkey = "k"\nbatchSize = 0\n',
         "operation 'p': batchSize: input should be greater than or equal to 1"),
        ('[operations.p]\ncollection = "p"\nkey = "k"\nmode = "sideways"\n',
         "operation 'p': mode: input should be 'full', 'incremental' or 'mirror'"),
        ('[operations.p]\ncollection = "p"\nkey = "k"\nmode = "incremental"\n',
         "operation 'p': watermark is required when mode is incremental"),
        ('[operations.p]\ncollection = "p"\nkey = "k"\nwatermark = "w"\n'
         '[operations.p.schema.fields]\nw = { type = "string" }\n',
         "operation 'p': watermark 'w' is a string field"),
        ('[operations.p]\ncollection = "p"\nkey = "k"\n'
         '[operations.p.schema.fields]\nn = { type = "number" }\n',
         "operation 'p': schema.fields.n.type: input should be"),
        ('[operations.p]\ncollection = "p"\nkey = "k"\n'
         '[operations.p.schema.fields]\nn = { type = "string", min = 0 }\n',
         "schema.fields.n: min only applies to float and int fields"),
        ('[operations.p]\ncollection = "jobstatuses"\nkey = "k"\n',
         "collection 'jobstatuses' is used by lakesync itself"),
        ('[operations.p]\ncollection = "a$b"\nkey = "k"\n', "collection 'a$b' is not a valid"),
        ('[operations.copy-taskdetail]\ncollection = "p"\nkey = "k"\n', "is built in"),
        ('[operation.p]\ncollection = "p"\n', "unknown top-level key 'operation'"),
        ('[operations.p]\ncollection = "p"\nkey = \n', "lakesync.toml: not valid TOML"),
    ],
)  # fmt: skip
def test_config_errors_name_the_file_operation_and_field(
    tmp_path: Path, body: str, expected: str
) -> None:
    message = config_error(tmp_path, body)
    assert expected in message
    assert message.startswith(str(tmp_path / "lakesync.toml") + ": ")


def test_config_error_stops_start_up(settings: Settings, tmp_path: Path) -> None:
    path = write_config(tmp_path, '[operations.p]\nkey = "k"\n')
    with pytest.raises(ConfigError, match="operation 'p': collection is required"):
        Runtime(settings.model_copy(update={"operations_file": path}))


def test_cli_lists_operations_and_stops_on_a_config_error(
    settings: Settings, tmp_path: Path
) -> None:
    assert settings.mongodb_uri is not None
    write_config(tmp_path, PROJECTS_TOML)
    env = {k: v for k, v in os.environ.items() if not k.startswith("LAKESYNC_")}
    env.update(LAKESYNC_MONGODB_URI=settings.mongodb_uri.get_secret_value(),
               LAKESYNC_DATABASE=settings.database, LAKESYNC_DATA_DIR=str(settings.data_dir),
               LAKESYNC_LAKE_URI=str(settings.lake_uri), COLUMNS="200")  # fmt: skip

    def lakesync(*args: str) -> subprocess.CompletedProcess[str]:
        return run_lakesync(env, *args, cwd=tmp_path)

    listed = lakesync("operations", "--json")
    assert listed.returncode == 0, listed.stderr
    ops = json.loads(listed.stdout)["operations"]
    assert [o["name"] for o in ops] == ["copy-taskdetail", "copy-projects"]
    assert ops[1]["source"] == str(tmp_path / "projects") and ops[1]["lastJob"] is None
    assert ops[1]["watermarkColumn"] == "updatedAt" and ops[1]["watermark"] is None
    table = lakesync("operations")
    assert table.returncode == 0 and "copy-projects" in table.stdout
    assert "updatedAt >= (none yet)" in table.stdout

    write_config(tmp_path, '[operations.p]\nkey = "k"\n')
    broken = lakesync("operations")
    assert broken.returncode == 2
    assert "lakesync.toml: operation 'p': collection is required" in broken.stderr
    assert "Traceback" not in broken.stderr


# -- running declared operations ------------------------------------------------------------


@pytest.fixture
def projects_runtime(settings: Settings, tmp_path: Path) -> Iterator[Runtime]:
    write_projects(tmp_path / "projects", 1, 200, bad_every=50)
    write_projects(tmp_path / "projects", 201, 100)
    path = write_config(tmp_path, PROJECTS_TOML)
    with Runtime(settings.model_copy(update={"operations_file": path}), executor="local") as rt:
        rt.start()
        yield rt


def test_declared_operation_copies_its_dataset_through_the_api(
    projects_runtime: Runtime, db: Any, tmp_path: Path
) -> None:
    with TestClient(create_app(projects_runtime), raise_server_exceptions=False) as client:
        listed = client.get("/api/operations").json()["operations"]
        assert [o["name"] for o in listed] == ["copy-taskdetail", "copy-projects"]
        assert listed[1]["description"] == "Projects" and listed[1]["mode"] == "incremental"

        r = client.post("/api/jobs", json={"operation": "copy-projects"})
        assert r.status_code == 202, r.text
        done = wait_done(client, r.json()["jobId"])
        assert done["status"] == "completed", done
        assert done["options"]["mode"] == "incremental"  # the operation's default, pinned
        counts = (done["totalRecords"], done["insertedRecords"], done["errorRecords"])
        assert counts == (300, 296, 4)
        doc = db.projects.find_one({"_id": "P-00007"})
        assert doc["name"] == "Project 7" and doc["budget"] == 1007.0
        assert doc["updatedAt"] == BASE + timedelta(minutes=7)
        assert "owner" not in doc  # not in the declared schema
        rejected = db.copyerrors.find_one({"jobId": done["jobId"], "key": "P-00050"})
        assert "budget must be >= 0" in rejected["reason"]
        assert db.taskdetails.count_documents({}) == 0

        listed = client.get("/api/operations").json()["operations"]
        projects = listed[1]
        assert projects["lastJob"]["jobId"] == done["jobId"]
        assert projects["watermark"]["value"] == "2025-03-01T05:00:00.000Z"  # project 300
        assert projects["watermark"]["source"] == str(tmp_path / "projects")

        write_projects(tmp_path / "projects", 301, 20, day=30)  # newer: only these are read
        r = client.post("/api/jobs", json={"operation": "copy-projects"})
        again = wait_done(client, r.json()["jobId"])  # and project 300, at the watermark
        assert (again["totalRecords"], again["insertedRecords"]) == (21, 20)
        assert again["unchangedRecords"] == 1
        full = client.post("/api/jobs", json={"operation": "copy-projects",
                                              "options": {"mode": "full"}})  # fmt: skip
        everything = wait_done(client, full.json()["jobId"])
        assert everything["totalRecords"] == 320 and everything["unchangedRecords"] == 316
    assert db.projects.count_documents({}) == 316


def test_declared_operation_with_a_missing_watermark_column_fails_clearly(
    settings: Settings, tmp_path: Path
) -> None:
    write_projects(tmp_path / "projects", 1, 10)
    path = write_config(tmp_path, PROJECTS_TOML.replace('watermark = "updatedAt"',
                                                        'watermark = "changedAt"'))  # fmt: skip
    with Runtime(settings.model_copy(update={"operations_file": path})) as rt:
        status, _ = rt.jobs.start("copy-projects")
        rt.runner.run(status.jobId)
        failed = rt.jobs.get(status.jobId)
        assert failed.status == "failed"
        assert "watermark column 'changedAt' is not in the lake" in (failed.error or "")
        full, _ = rt.jobs.start("copy-projects", {"mode": "full"})  # full copies need none
        rt.runner.run(full.jobId)
        assert rt.jobs.get(full.jobId).status == "completed"


def test_incremental_needs_a_declared_watermark(settings: Settings, tmp_path: Path) -> None:
    write_projects(tmp_path / "projects", 1, 10)
    path = write_config(tmp_path, PROJECTS_TOML.replace('mode = "incremental"\n', "").replace(
        'watermark = "updatedAt"\n', ""))  # fmt: skip
    with Runtime(settings.model_copy(update={"operations_file": path})) as rt:
        with pytest.raises(RequestError, match="has no watermark column") as info:
            rt.jobs.start("copy-projects", {"mode": "incremental"})
        assert status_of(info.value) == 400
        assert rt.jobs.list() == []  # refused before a job existed
