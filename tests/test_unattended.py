"""Unattended runs with real processes: 3 `serve` and 2 `worker` against one MongoDB share a
schedule, driven by a fake clock (LAKESYNC_SCHEDULER_CLOCK_FILE, two of them skewed); and
webhooks of a local HTTP receiver get the end of each job, signed, retried when they fail.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from tests.helpers import ServeProcess, lakesync, start_worker, wait_for, write_operations

from lakesync.demo import generate

T0 = 1_900_000_000  # the fake clock's start, in epoch seconds (a whole second: a slot)


def _slot(k: int) -> str:
    from datetime import UTC, datetime

    when = datetime.fromtimestamp(T0 + k, UTC)
    return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class Clock:
    """Two clock files: the second one runs `skew` seconds ahead (another machine's clock)."""

    def __init__(self, where: Path, skew: float = 0.3) -> None:
        self.files = [where / "clock-a", where / "clock-b"]
        self.skew = skew

    def set(self, seconds: float) -> None:
        for path, offset in zip(self.files, (0.0, self.skew), strict=True):
            tmp = path.with_suffix(".tmp")
            tmp.write_text(str(T0 + seconds + offset))
            os.replace(tmp, path)  # atomic: a process never reads half a number


def _stop_worker(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def _claimed(db: Any, op: str, k: int) -> dict[str, Any] | None:
    doc = db.scheduleslots.find_one({"operation": op, "slot": _slot(k)})
    return doc if doc is not None and doc["outcome"] != "claimed" else None


def _ended(db: Any, job_id: str) -> bool:
    doc = db.jobstatuses.find_one({"jobId": job_id}, {"status": 1})
    return doc is not None and doc["status"] in ("completed", "failed", "cancelled")


@pytest.mark.slow
def test_three_serves_and_two_workers_run_each_slot_once(
    serve_env: dict[str, str],
    db: Any,
    demo_lake: Path,
    tmp_path: Path,
    redis_url: str,
) -> None:
    tiny = tmp_path / "tiny"
    generate(tiny, 40, seed=5)
    fast = {"source": str(tiny), "collection": "fast", "key": "taskDetailId", "every": "1s"}
    slow = {
        "source": str(demo_lake),
        "collection": "slow",
        "key": "taskDetailId",
        "batchSize": 5,
        "every": "1s",
    }
    ops = write_operations(tmp_path / "lakesync.toml", {"fast": fast, "slow": slow})
    clock = Clock(tmp_path)
    clock.set(0.5)  # half-way through slot 0: no process runs a slot it did not see begin
    base = dict(serve_env, LAKESYNC_OPERATIONS_FILE=str(ops))
    envs = [dict(base, LAKESYNC_SCHEDULER_CLOCK_FILE=str(f)) for f in clock.files]
    celery = {"LAKESYNC_EXECUTOR": "celery", "LAKESYNC_BROKER_URL": redis_url}
    serves = [ServeProcess(envs[i % 2], tmp_path / f"serve{i}.log") for i in range(3)]
    workers: list[subprocess.Popen[bytes]] = []
    try:
        for s in serves:
            s.start(timeout=120)
        workers = [start_worker(dict(envs[i % 2], **celery), tmp_path / f"worker{i}.log")
                   for i in range(2)]  # fmt: skip
        wait_for(lambda: all("scheduler started" in (tmp_path / f"worker{i}.log").read_text()
                             for i in range(2)), timeout=120)  # fmt: skip
        paused = lakesync(envs[0], "pause", "slow", timeout=60)
        assert paused.returncode == 0 and "paused" in paused.stdout, paused.stderr

        # 20 slots of `fast`: each one started exactly once, by whichever process won it
        for k in range(1, 21):
            clock.set(k + 0.25)
            slot = wait_for(lambda k=k: _claimed(db, "fast", k), timeout=60)
            assert slot["outcome"] == "started", slot
            wait_for(lambda slot=slot: _ended(db, slot["jobId"]), timeout=60)
        jobs = list(db.jobstatuses.find({"operation": "fast"}))
        assert len(jobs) == 20
        assert {j["trigger"] for j in jobs} == {"schedule"}
        assert sorted(j["scheduledFor"] for j in jobs) == [_slot(k) for k in range(1, 21)]
        assert {j["status"] for j in jobs} == {"completed"}
        slots = list(db.scheduleslots.find({"operation": "fast"}))
        assert len(slots) == 20
        assert len({s["by"] for s in slots}) >= 2  # several processes won slots
        assert db.scheduleslots.count_documents({"operation": "slow"}) == 0  # paused by the CLI

        # pause and unpause through the API; a slow job makes the next slots skip
        api = serves[1].url
        r = httpx.post(f"{api}/api/operations/fast/pause", timeout=30)
        assert r.status_code == 200 and r.json()["paused"] is True
        r = httpx.post(f"{api}/api/operations/slow/unpause", timeout=30)
        assert r.status_code == 200 and r.json()["paused"] is False
        listed = {o["name"]: o for o in httpx.get(f"{api}/api/operations").json()["operations"]}
        assert listed["fast"]["schedule"]["paused"] is True and listed["fast"]["nextRun"] is None
        assert listed["slow"]["schedule"]["every"] == "1s"
        assert listed["slow"]["nextRun"] == _slot(21)
        outcomes = []
        for k in range(21, 25):
            clock.set(k + 0.25)
            outcomes.append(wait_for(lambda k=k: _claimed(db, "slow", k), timeout=60))
        started = [o for o in outcomes if o["outcome"] == "started"]
        skipped = [o for o in outcomes if o["outcome"] == "skipped"]
        assert outcomes[0]["outcome"] == "started" and len(skipped) >= 1
        running = {o["jobId"] for o in started}
        assert all(o["jobId"] in running and "still" in o["reason"] for o in skipped)
        assert db.jobstatuses.count_documents({"operation": "slow"}) == len(started)
        assert db.scheduleslots.count_documents({"operation": "fast", "slotMs": {
            "$gt": (T0 + 20) * 1000}}) == 0  # fmt: skip
        listed = {o["name"]: o for o in httpx.get(f"{api}/api/operations").json()["operations"]}
        last = listed["slow"]["schedule"]["lastRun"]
        assert last["slot"] == _slot(24) and listed["slow"]["schedule"]["skippedSlots"] >= 1
        if last["outcome"] == "skipped":
            assert last["result"] in ("pending", "in_progress")
        shown = lakesync(envs[0], "schedules", "--json", timeout=60)
        assert shown.returncode == 0, shown.stderr
        table = {s["operation"]: s for s in json.loads(shown.stdout)["schedules"]}
        assert table["fast"]["paused"] is True and table["slow"]["lastRun"]["slot"] == _slot(24)
        for job_id in running:
            httpx.post(f"{api}/api/jobs/{job_id}/cancel", timeout=30)
        httpx.post(f"{api}/api/operations/slow/pause", timeout=30)
        for job_id in running:
            wait_for(lambda job_id=job_id: _ended(db, job_id), timeout=120)
        resumed = lakesync(envs[1], "unpause", "fast", timeout=60)
        assert resumed.returncode == 0 and "is now running" in resumed.stdout, resumed.stderr

        # downtime: every process stops, slots 25..39 pass, then two come back
        for s in serves:
            s.kill()
        for w in workers:
            _stop_worker(w)
        clock.set(40.25)
        back = [ServeProcess(envs[0], tmp_path / "back0.log").start(timeout=120),
                ServeProcess(envs[1], tmp_path / "back1.log").start(timeout=120)]  # fmt: skip
        serves.extend(back)
        catch_up = wait_for(lambda: _claimed(db, "fast", 40), timeout=60)
        assert catch_up["outcome"] == "started" and catch_up["catchUp"] is True
        assert catch_up["missed"] == 15
        time.sleep(2)  # several more ticks of both processes: nothing else starts
        assert db.scheduleslots.count_documents({"operation": "fast"}) == 21
        assert db.jobstatuses.count_documents({"operation": "fast"}) == 21
        assert db.scheduleslots.count_documents({"operation": "slow", "slotMs": {
            "$gt": (T0 + 24) * 1000}}) == 0  # fmt: skip
    finally:
        for s in serves:
            s.kill()
        for w in workers:
            _stop_worker(w)


# -- notifications -----------------------------------------------------------------------------


class Receiver:
    """A local webhook receiver: /ok answers 200, /flaky 500 twice then 200, /down always
    500, /hang takes longer than the sender's timeout."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, str], bytes]] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with receiver.lock:
                    receiver.calls.append((self.path, dict(self.headers.items()), body))
                    seen = sum(1 for p, _, _ in receiver.calls if p == self.path)
                if self.path == "/hang":
                    time.sleep(2.5)
                fail = self.path == "/down" or (self.path == "/flaky" and seen <= 2)
                self.send_response(500 if fail else 200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def received(self, path: str, job_id: str) -> list[tuple[dict[str, str], bytes]]:
        with self.lock:
            return [
                (h, b) for p, h, b in self.calls if p == path and json.loads(b)["jobId"] == job_id
            ]

    def close(self) -> None:
        self.server.shutdown()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


SECRET = "whsec-test-0123456789"
TOKEN = "api-token-abcdefghijklmnop"


def test_each_ended_job_is_notified_once_signed_and_retried(
    serve_env: dict[str, str], receiver: Receiver, tmp_path: Path
) -> None:
    tiny = tmp_path / "tiny"
    generate(tiny, 30, seed=9)
    hook = receiver.url
    good = {
        "source": str(tiny),
        "collection": "good",
        "key": "taskDetailId",
        "notify": [f"{hook}/ok", f"{hook}/flaky"],
        "on": ["completed", "failed"],
    }
    broken = {
        "source": str(tiny),
        "collection": "broken",
        "key": "noSuchColumn",
        "notify": [f"{hook}/ok", f"{hook}/down", f"{hook}/hang"],
    }
    ops = write_operations(tmp_path / "lakesync.toml", {"good": good, "broken": broken})
    env = dict(serve_env, LAKESYNC_OPERATIONS_FILE=str(ops), LAKESYNC_WEBHOOK_SECRET=SECRET,
               LAKESYNC_API_TOKEN=TOKEN, LAKESYNC_WEBHOOK_TIMEOUT="1",
               LAKESYNC_WEBHOOK_RETRIES="2", LAKESYNC_NOTIFY=json.dumps([f"{hook}/ok"]),
               LAKESYNC_NOTIFY_ON='["cancelled"]')  # fmt: skip
    serve = ServeProcess(env, tmp_path / "serve.log").start(timeout=120)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    try:
        ids = {}
        for op in ("good", "broken", "copy-taskdetail"):
            r = httpx.post(f"{serve.url}/api/jobs", json={"operation": op}, headers=auth)
            assert r.status_code == 202, r.text
            ids[op] = r.json()["jobId"]
        final = {}
        for op, job_id in ids.items():
            final[op] = wait_for(lambda job_id=job_id: (
                (s := httpx.get(f"{serve.url}/api/jobs/{job_id}", headers=auth).json())
                ["status"] in ("completed", "failed", "cancelled") and s), timeout=120)  # fmt: skip
        assert final["good"]["status"] == "completed"  # a flaky receiver changes nothing
        assert final["broken"]["status"] == "failed"  # nor do a failing and a hanging one
        assert final["copy-taskdetail"]["status"] == "completed"
        assert final["good"]["trigger"] == "api"

        wait_for(lambda: len(receiver.received("/flaky", ids["good"])) == 3, timeout=30)
        wait_for(lambda: len(receiver.received("/hang", ids["broken"])) == 3, timeout=30)
        wait_for(lambda: "could not notify http://127.0.0.1" in serve.log.read_text()
                 and ids["broken"] in serve.log.read_text(), timeout=30)  # fmt: skip
        time.sleep(1.5)  # late duplicates would arrive now
        for path, job, outcome in [("/ok", "good", "completed"), ("/ok", "broken", "failed")]:
            got = receiver.received(path, ids[job])
            assert len(got) == 1, (path, job, len(got))  # exactly one per ended job
            headers, body = got[0]
            signed = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.".encode() + body
            digest = hmac.new(SECRET.encode(), signed, hashlib.sha256).digest()  # raw text key
            expected = "v1," + base64.b64encode(digest).decode()
            assert hmac.compare_digest(headers["webhook-signature"], expected)
            assert abs(int(headers["webhook-timestamp"]) - time.time()) < 300
            assert headers["X-Lakesync-Event"] == f"job.{outcome}"
            doc = json.loads(body)
            assert doc["status"] == outcome and doc["jobId"] == ids[job]
            assert doc == {k: v for k, v in final[job].items() if k in doc}
            assert SECRET not in body.decode() and TOKEN not in body.decode()
        flaky = receiver.received("/flaky", ids["good"])
        assert len({h["webhook-id"] for h, _ in flaky}) == 1  # one delivery, retried
        assert len({h["webhook-timestamp"] + h["webhook-signature"] for h, _ in flaky}) >= 2
        assert len(receiver.received("/down", ids["broken"])) == 3  # 1 + 2 retries, given up
        # not configured: a completed copy-taskdetail (default list: on cancelled only)
        assert receiver.received("/ok", ids["copy-taskdetail"]) == []
        assert receiver.received("/flaky", ids["broken"]) == []
        assert httpx.get(f"{serve.url}/api/jobs/{ids['broken']}", headers=auth).json()[
            "status"] == "failed"  # fmt: skip
    finally:
        serve.kill()


def test_a_cancelled_job_notifies_the_default_webhooks_unsigned_without_a_secret(
    settings: Any, receiver: Receiver
) -> None:
    from lakesync.runtime import Runtime

    s = settings.model_copy(
        update={"notify": [f"{receiver.url}/ok"], "notify_on": ["cancelled", "failed"]}
    )
    with Runtime(s) as rt:  # no executor: the job stays pending until cancelled
        status, _ = rt.jobs.start("copy-taskdetail", trigger="cli")
        rt.jobs.cancel(status.jobId)
        got = wait_for(lambda: receiver.received("/ok", status.jobId), timeout=30)
    headers, body = got[0]
    assert len(got) == 1 and headers["X-Lakesync-Event"] == "job.cancelled"
    assert "webhook-signature" not in headers and headers["webhook-id"].startswith("msg_")
    doc = json.loads(body)
    assert doc["status"] == "cancelled" and doc["trigger"] == "cli"
