"""Failure modes an attacker or bad luck finds against `lakesync serve`: a lake `_id`
column, a full disk, statuses expiring under running jobs."""

from __future__ import annotations

import contextlib
import json
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tests.helpers import ServeProcess, lakesync, wait_for

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


# -- malformed input, formulas, cross-site headers, slow clients ------------------------------

MALFORMED = ["http://[bad", "s3://[bad", "x://[::1", "file://[x]", "s3://b:port/x", "s3://[::1]:x/"]


@pytest.mark.parametrize("source", MALFORMED)
def test_a_malformed_source_answers_400_not_500(client: Any, source: str) -> None:
    for path in ("/api/jobs", "/api/jobs?x=1"):
        r = client.post(path, json={"operation": "copy-taskdetail", "options": {"source": source}})
        assert r.status_code == 400, (path, r.status_code, r.text)
        assert "not a valid URI" in r.json()["error"] and "Traceback" not in r.text
    assert client.get("/api/jobs").json()["jobs"] == []


def test_the_cli_refuses_a_malformed_source_without_a_traceback(serve_env: dict[str, str]) -> None:
    run = lakesync(serve_env, "copy", "--source", "http://[bad")
    assert run.returncode != 0 and "not a valid URI" in run.stderr + run.stdout
    assert "Traceback" not in run.stderr


@pytest.mark.parametrize(
    ("cell", "written"),
    [("=1+1", "'=1+1"), ("+1+1", "'+1+1"), ("-1+1", "'-1+1"), ("@SUM(A1)", "'@SUM(A1)"),
     ("\t=1+1", "'\t=1+1"), ("\r=1+1", '"\'\r=1+1"'), (" =1+1", "' =1+1"),
     ("  @x", "'  @x"), ("\u3000=1", "'\u3000=1"), ("-5", "-5"), ("+1.5", "+1.5"),
     ("plain = text", "plain = text"), (" spaced", " spaced")],
)  # fmt: skip
def test_csv_cells_a_spreadsheet_would_run_are_neutralised(cell: str, written: str) -> None:
    from lakesync import rejections

    line = rejections.to_csv({"key": "k", "file": "f", "row": 1, "reason": cell, "time": "t"})
    assert line == f"k,f,1,{written},t\r\n", line


def test_slow_clients_are_cut_off_and_do_not_hold_the_server(serve: ServeProcess) -> None:
    """2,000 connections that never finish their request head (and a few that trickle it,
    and one whose body never comes) are closed well before 30 s; the server answers all along."""
    import selectors
    import socket
    import threading

    opened: list[socket.socket] = []
    peer = ("127.0.0.1", serve.port)
    source = ("127.0.0.2", 0)  # (ports of 127.0.0.2: other tests' free ports stay free)
    try:
        for i in range(2000):
            s = socket.create_connection(peer, timeout=10, source_address=source)
            s.sendall(b"GET /api/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\n" if i % 2 else b"G")
            opened.append(s)
        body = socket.create_connection(peer, timeout=10, source_address=source)
        body.sendall(b"POST /api/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                     b"application/json\r\nContent-Length: 100\r\n\r\n{")  # fmt: skip
        opened.append(body)
        began = time.monotonic()
        trickling = opened[:5]
        stop = threading.Event()

        def trickle() -> None:  # one more header byte a second: never a whole head
            while not stop.wait(1.0):
                for s in trickling:
                    with contextlib.suppress(OSError):
                        s.sendall(b"X")

        threading.Thread(target=trickle, daemon=True).start()
        assert httpx.get(f"{serve.url}/healthz", timeout=10).status_code == 200
        selector = selectors.DefaultSelector()
        for s in opened:
            s.setblocking(False)
            selector.register(s, selectors.EVENT_READ)
        left = set(opened)
        while left and time.monotonic() - began < 30:  # heads: 10 s, the body: 20 s
            for key, _ in selector.select(timeout=1):
                s = key.fileobj
                assert isinstance(s, socket.socket)
                try:
                    data = s.recv(4096)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if not data:  # closed by the server
                    selector.unregister(s)
                    left.discard(s)
        stop.set()
        assert not left, f"{len(left)} slow connection(s) still open after 30 s"
        assert httpx.get(f"{serve.url}/api/jobs", timeout=10).status_code == 200
        # healthy clients are not cut: a kept-alive connection with pauses between requests,
        # and a head sent in pieces within the limit
        with socket.create_connection(peer, timeout=10, source_address=source) as s:
            whole = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
            for pieces in ([whole], [whole[:22], whole[22:40], whole[40:]]):
                for piece in pieces:
                    s.sendall(piece)
                    time.sleep(1.5)
                answer = s.recv(4096)
                assert answer.startswith(b"HTTP/1.1 200"), answer
    finally:
        for s in opened:
            s.close()
