"""Failure modes an attacker or bad luck finds against `lakesync serve`: a lake `_id`
column, a full disk, statuses expiring under running jobs."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tests.helpers import ServeProcess, wait_for

from lakesync.demo import generate


def status(url: str, job_id: str) -> httpx.Response:
    return httpx.get(f"{url}/api/jobs/{job_id}")


def start(url: str, body: dict[str, Any] | None = None) -> str:
    r = httpx.post(f"{url}/api/jobs", json=body or {})
    assert r.status_code == 202, r.text
    job_id: str = r.json()["jobId"]
    return job_id


def test_a_lake_id_column_never_replaces_the_declared_key(
    serve_env: dict[str, str], tmp_path: Path, db: Any
) -> None:
    lake = tmp_path / "things"
    lake.mkdir()
    table = pa.table({"_id": [f"lake-{i % 2}" for i in range(6)],
                      "thingId": [f"T{i}" for i in range(6)], "n": list(range(6))})  # fmt: skip
    pq.write_table(table, lake / "part-0.parquet")
    config = tmp_path / "lakesync.toml"
    config.write_text(f'[operations.things]\nsource = "{lake}"\ncollection = "things"\n'
                      'key = "thingId"\n')  # fmt: skip
    serve_env["LAKESYNC_OPERATIONS_FILE"] = str(config)
    serve_env["LAKESYNC_ALLOWED_ROOTS"] = json.dumps([str(tmp_path)])
    proc = ServeProcess(serve_env, tmp_path / "serve.log").start()
    try:
        job_id = start(proc.url, {"operation": "things"})
        done = wait_for(lambda: (s := status(proc.url, job_id).json())["status"] != "pending"
                        and s["status"] != "in_progress" and s, timeout=60)  # fmt: skip
        assert done["status"] == "failed", done
        assert "column named _id" in done["error"] and "thingId" in done["error"]
        assert db.things.count_documents({}) == 0  # refused before anything was written
        # with the column gone, the declared key is the _id
        pq.write_table(table.drop_columns(["_id"]), lake / "part-0.parquet")
        job_id = start(proc.url, {"operation": "things"})
        wait_for(lambda: status(proc.url, job_id).json()["status"] == "completed", timeout=60)
        assert sorted(d["_id"] for d in db.things.find()) == [f"T{i}" for i in range(6)]
    finally:
        proc.kill()


def test_a_running_jobs_status_outlives_its_ttl_and_expires_after_it_ends(
    serve_env: dict[str, str], slow_database: Any, request: Any
) -> None:
    ttl = 2.0
    serve_env["LAKESYNC_STATUS_TTL_DAYS"] = repr(ttl / 86400)
    serve_env["LAKESYNC_BATCH_SIZE"] = "20"  # 250 batches on the slow link: well past the TTL
    serve = request.getfixturevalue("serve")
    job_id = start(serve.url)
    started = time.monotonic()
    seen = []
    while True:
        r = status(serve.url, job_id)
        assert r.status_code == 200, (time.monotonic() - started, r.text)
        seen.append(r.json()["status"])
        if r.json()["status"] not in ("pending", "in_progress"):
            break
        assert time.monotonic() - started < 240
        time.sleep(0.3)
    assert seen[-1] == "completed"
    assert time.monotonic() - started > ttl * 2, "the job ended before its TTL: test proves nothing"
    # ended: it expires a TTL later (nx-27017 purges when the collection is next written)
    second = start(serve.url)
    wait_for(lambda: status(serve.url, job_id).status_code == 404, timeout=120, every=0.5)
    assert status(serve.url, second).status_code == 200


@pytest.fixture
def small_disk(tmp_path: Path) -> Any:
    """A 6 MB tmpfs (root only): the embedded server's files fill it."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(disk)],
                             capture_output=True, text=True)  # fmt: skip
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def test_a_full_disk_fails_the_job_with_the_servers_reason(
    serve_env: dict[str, str], tmp_path: Path, small_disk: Path
) -> None:
    lake = tmp_path / "big-lake"
    generate(lake, 30_000, seed=3)
    ballast = small_disk / "ballast"  # what an admin deletes to free space
    ballast.write_bytes(b"\0" * 1_500_000)
    serve_env.update(
        LAKESYNC_MONGODB_URI="", LAKESYNC_DATA_DIR=str(small_disk), LAKESYNC_LAKE_URI=str(lake),
        LAKESYNC_ALLOWED_ROOTS=json.dumps([str(lake)]), LAKESYNC_MAX_ATTEMPTS="3",
    )  # fmt: skip
    log = tmp_path / "serve.log"
    proc = ServeProcess(serve_env, log).start()
    try:
        url = proc.url
        job_id = start(url)
        not_ready = wait_for(lambda: (r := httpx.get(url + "/readyz", timeout=10)).status_code
                             == 503 and r.json(), timeout=180, every=1)  # fmt: skip
        assert "MongoDB is not writable" in not_ready["error"], not_ready
        time.sleep(8)  # leases expire meanwhile: no run copies into the full disk again
        assert log.read_text().count(f"job {job_id}: run ") == 1, log.read_text()[-3000:]
        assert status(url, job_id).json()["status"] != "completed"
        ballast.unlink()  # space again: the failure is recorded, the copy is not retried
        done = wait_for(lambda: (s := status(url, job_id).json())["status"] == "failed" and s,
                        timeout=120, every=0.5)  # fmt: skip
        assert "disk is full" in done["error"], done
        assert "MongoDB refused writing batch" in done["error"]
        assert done["attempt"] <= 3 and done["processedRecords"] < 30_000
        assert log.read_text().count(f"job {job_id}: run ") <= 3
        assert httpx.get(url + "/readyz").status_code == 200
    finally:
        proc.kill()
        time.sleep(1)  # the embedded server follows its parent out
