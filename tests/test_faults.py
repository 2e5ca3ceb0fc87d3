"""Fault injection against real processes: SIGKILL of lakesync, MongoDB down, SIGTERM."""

from __future__ import annotations

import random
import subprocess
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
from pymongo import MongoClient
from tests.helpers import ServeProcess, free_port, wait_for

from lakesync.demo import generate

pytestmark = pytest.mark.slow


def job(url: str, job_id: str) -> dict[str, Any]:
    # generous: a server copying on four workers of a busy 2-core machine answers slowly
    return httpx.get(f"{url}/api/jobs/{job_id}", timeout=60).json()


def reached(url: str, job_id: str, target: int) -> bool:
    return int(job(url, job_id)["processedRecords"]) >= target


def assert_invariant(s: dict[str, Any], total: int) -> None:
    assert s["status"] == "completed", s
    parts = s["insertedRecords"] + s["updatedRecords"] + s["unchangedRecords"] + s["errorRecords"]
    assert s["processedRecords"] == parts == s["totalRecords"] == total, s


def test_sigkill_serve_three_times_job_completes_exactly_once(
    serve_env: dict[str, str], tmp_path: Path, db: Any
) -> None:
    # 40,000 records: 9 partitions across the 4 local workers (as 200,000 in partitions of
    # 15,000 made), 9 batches each, three kills at 8,000-11,000, 16,000-19,000,
    # 24,000-27,000: each mid-job, with partitions done, running and not started
    lake = tmp_path / "lake40k"
    generate(lake, 40_000, seed=11)
    serve_env.update(
        LAKESYNC_LAKE_URI=str(lake),
        LAKESYNC_BATCH_SIZE="500",
        LAKESYNC_WORKERS="4",
        LAKESYNC_PARTITION_ROWS="3000",
    )
    proc = ServeProcess(serve_env, tmp_path / "serve.log").start()
    try:
        r = httpx.post(f"{proc.url}/api/jobs", json={"operation": "copy-taskdetail"}, timeout=10)
        assert r.status_code == 202
        job_id = r.json()["jobId"]
        rng = random.Random(5)
        for round_ in range(3):
            target = (round_ + 1) * 8_000 + rng.randint(0, 3_000)
            # generous: a partition's records count when it commits, and a loaded
            # machine's embedded server copies a few hundred records a second
            wait_for(partial(reached, proc.url, job_id, target), timeout=240)
            proc.kill()  # SIGKILL: no chance to checkpoint or hand back
            proc = ServeProcess(serve_env, tmp_path / "serve.log").start()
        final = wait_for(
            lambda: (s := job(proc.url, job_id))["status"] in ("completed", "failed") and s,
            timeout=240,
        )
    finally:
        proc.kill()
    assert_invariant(final, 40_000)
    assert final["attempt"] >= 2
    assert final["partitions"] >= 8 and final["partitionsDone"] == final["partitions"]
    assert final["insertedRecords"] == 40_000  # replayed batches still count as inserts
    assert db.taskdetails.count_documents({}) == 40_000


def _start_nx(data: Path, port: int) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-c", "from nx_27017.nx_27017 import main; main()", "--data-dir",
           str(data), "-p", str(port), "--log-file", str(data / "nx.log"),
           "--pid-file", str(data / "nx.pid")]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client: MongoClient[dict[str, Any]] = MongoClient(port=port, serverSelectionTimeoutMS=200)
    wait_for(lambda: _ping(client), timeout=20)
    client.close()
    return proc


def _ping(client: MongoClient[dict[str, Any]]) -> bool:
    try:
        client.admin.command("ping")
        return True
    except Exception:
        return False


def test_mongodb_down_for_five_seconds_job_completes_without_restart(
    serve_env: dict[str, str], tmp_path: Path
) -> None:
    data = tmp_path / "nx"
    data.mkdir()
    port = free_port()
    nx = _start_nx(data, port)
    lake = tmp_path / "lake"
    generate(lake, 12_000, seed=2)  # 24 batches: 18 of them left when MongoDB goes down
    serve_env.update(
        LAKESYNC_MONGODB_URI=f"mongodb://127.0.0.1:{port}/?directConnection=true",
        LAKESYNC_LAKE_URI=str(lake), LAKESYNC_BATCH_SIZE="500", LAKESYNC_RETRY_BUDGET_SECONDS="60",
        LAKESYNC_LEASE_SECONDS="30",
    )  # fmt: skip
    proc = ServeProcess(serve_env, tmp_path / "serve.log").start()
    try:
        job_id = httpx.post(f"{proc.url}/api/jobs", json={}, timeout=10).json()["jobId"]
        wait_for(lambda: job(proc.url, job_id)["processedRecords"] >= 3000, timeout=60)
        nx.kill()
        nx.wait()
        assert httpx.get(f"{proc.url}/readyz", timeout=15).status_code == 503
        down = httpx.get(f"{proc.url}/api/jobs/{job_id}", timeout=15)
        assert down.status_code == 503 and "MongoDB" in down.json()["error"]
        time.sleep(5)
        nx = _start_nx(data, port)
        final = wait_for(
            lambda: (s := job(proc.url, job_id))["status"] in ("completed", "failed") and s,
            timeout=120,
        )
        assert httpx.get(f"{proc.url}/readyz", timeout=15).status_code == 200
    finally:
        proc.kill()
        nx.kill()
    assert_invariant(final, 12_000)
    assert final["attempt"] == 1  # the same run rode out the outage
    assert "retry" in (tmp_path / "serve.log").read_text()


def test_sigterm_hands_the_job_back_and_exits_within_ten_seconds(
    serve_env: dict[str, str], tmp_path: Path
) -> None:
    lake = tmp_path / "lake"
    generate(lake, 12_000, seed=4)  # 24 batches: 20 of them left at the SIGTERM
    serve_env.update(LAKESYNC_LAKE_URI=str(lake), LAKESYNC_BATCH_SIZE="500")
    proc = ServeProcess(serve_env, tmp_path / "serve.log").start()
    job_id = httpx.post(f"{proc.url}/api/jobs", json={}, timeout=10).json()["jobId"]
    wait_for(lambda: job(proc.url, job_id)["processedRecords"] >= 2000, timeout=60)
    took = proc.terminate(timeout=15)
    assert took < 10
    client: MongoClient[dict[str, Any]] = MongoClient(serve_env["LAKESYNC_MONGODB_URI"])
    paused = client[serve_env["LAKESYNC_DATABASE"]].jobstatuses.find_one({"jobId": job_id})
    assert paused is not None and paused["status"] == "pending", paused
    assert "resumes" in paused["message"]
    proc = ServeProcess(serve_env, tmp_path / "serve.log").start()  # picks it up at once
    try:
        final = wait_for(
            lambda: (s := job(proc.url, job_id))["status"] in ("completed", "failed") and s,
            timeout=120,
        )
    finally:
        proc.kill()
    assert_invariant(final, 12_000)
    assert final["attempt"] == 2
