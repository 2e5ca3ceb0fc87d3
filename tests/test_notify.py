"""Webhook deliveries through the outbox: Standard Webhooks signatures checked by the
`standardwebhooks` package, Basic auth from URL credentials, deliveries that survive a lost
outbox write and a process killed mid-request, one receiver that hangs delaying no other;
and a soak of 3 serves with hanging, flaky and working receivers and a kill -9.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import random
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from standardwebhooks import Webhook
from tests.helpers import ServeProcess, wait_for, write_operations

from lakesync.config import Settings, load_settings
from lakesync.demo import generate
from lakesync.errors import ConfigError
from lakesync.lease import IN_PROGRESS
from lakesync.notify import LEASE_SECONDS, Notifier, delivery_id, receiver_key, signing_key
from lakesync.runtime import Runtime


class Hooks:
    """A local webhook receiver: /ok answers 200, /flaky fails about half the time (500 or a
    dropped connection) and is sometimes slow, /hang holds the request `hang` seconds, /down
    answers 500."""

    def __init__(self, hang: float = 30.0) -> None:
        self.calls: list[tuple[str, dict[str, str], bytes, float]] = []
        self.lock = threading.Lock()
        self.hanging = 0
        hooks = self
        rng = random.Random(7)

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                headers = {k.lower(): v for k, v in self.headers.items()}
                with hooks.lock:
                    hooks.calls.append((self.path, headers, body, time.time()))
                    flip = rng.random()
                if self.path == "/hang":
                    with hooks.lock:
                        hooks.hanging += 1
                    time.sleep(hang)
                    with hooks.lock:
                        hooks.hanging -= 1
                if self.path == "/flaky" and flip < 0.25:
                    self.connection.close()  # no answer at all
                    return
                if self.path == "/flaky" and flip > 0.8:
                    time.sleep(1.0)  # slow, but in time
                fail = self.path == "/down" or (self.path == "/flaky" and flip < 0.5)
                self.send_response(500 if fail else 200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def got(self, path: str) -> list[tuple[dict[str, str], bytes, float]]:
        with self.lock:
            return [(h, b, t) for p, h, b, t in self.calls if p == path]

    def by_job(self, path: str) -> dict[str, list[tuple[dict[str, str], bytes, float]]]:
        out: dict[str, list[tuple[dict[str, str], bytes, float]]] = {}
        for h, b, t in self.got(path):
            out.setdefault(json.loads(b)["jobId"], []).append((h, b, t))
        return out

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hooks() -> Iterator[Hooks]:
    h = Hooks(hang=5.0)
    yield h
    h.close()


SECRET = "whsec_" + base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()


def _cancelled(rt: Runtime) -> str:
    """A job ended at once: started without an executor (pending), then cancelled."""
    status, _ = rt.jobs.start("copy-taskdetail", trigger="cli")
    rt.jobs.cancel(status.jobId)
    return status.jobId


def test_deliveries_are_signed_as_standard_webhooks_and_credentials_go_as_basic_auth(
    settings: Settings, hooks: Hooks, db: Any, caplog: pytest.LogCaptureFixture
) -> None:
    with_login = hooks.url.replace("http://", "http://ops%40corp:s3cr%3At@") + "/ok"
    s = settings.model_copy(
        update={
            "notify": [with_login, f"{hooks.url}/down"],
            "notify_on": ["cancelled"],
            "signing_key": load_settings(signing_key=SECRET).signing_key,
            "webhook_retries": 1,
        }
    )
    caplog.set_level(logging.INFO, logger="lakesync")
    with Runtime(s) as rt:
        job_id = _cancelled(rt)
        got = wait_for(lambda: hooks.got("/ok"), timeout=30)
        wait_for(lambda: len(hooks.got("/down")) == 2, timeout=30)  # 1 + 1 retry, given up
        wait_for(lambda: rt.notifier.pending() == 0, timeout=30)
    headers, body, _ = got[0]
    doc = Webhook(SECRET).verify(body, headers)  # another implementation's verifier
    assert doc["jobId"] == job_id and doc["status"] == "cancelled"
    assert headers["webhook-id"] == delivery_id(job_id, db.jobstatuses.find_one(
        {"jobId": job_id})["endTime"].replace(tzinfo=UTC), with_login)  # fmt: skip
    assert headers["authorization"] == "Basic " + base64.b64encode(b"ops@corp:s3cr:t").decode()
    down = hooks.got("/down")
    assert {h["webhook-id"] for h, _, _ in down} == {down[0][0]["webhook-id"]}  # same id
    assert down[0][0]["webhook-id"] != headers["webhook-id"]  # one id per receiver
    for h, b, _ in down:  # each attempt signed with its own timestamp
        Webhook(SECRET).verify(b, h)
    outbox = list(db.notifications.find())
    assert sorted(d["status"] for d in outbox) == ["delivered", "given_up"]
    assert all("s3cr" not in json.dumps(d, default=str) for d in outbox)
    assert "s3cr" not in caplog.text and "ops%40corp" not in caplog.text
    assert "could not notify http://127.0.0.1" in caplog.text and job_id in caplog.text
    assert db.jobstatuses.count_documents({"notifyDue": 1}) == 0


@pytest.mark.parametrize(
    ("env", "problem"),
    [({"signing_key": "whsec_not base64!"}, "LAKESYNC_WEBHOOK_SECRET"),
     ({"notify": ["https://u:hunter22@[bad/x"]}, "not an http\\(s\\) URL")],
)  # fmt: skip
def test_a_bad_secret_or_webhook_is_refused_at_load_without_showing_it(
    env: dict[str, Any], problem: str
) -> None:
    with pytest.raises(ConfigError, match=problem) as caught:
        load_settings(**env)
    assert "hunter22" not in str(caught.value) and "not base64!" not in str(caught.value)


def test_secret_forms() -> None:
    assert signing_key("plain text") == b"plain text"
    assert signing_key("whsec_" + base64.b64encode(b"\x00\xffkey").decode()) == b"\x00\xffkey"
    assert signing_key("whsec_AAE") == b"\x00\x01"  # unpadded base64 is accepted
    with pytest.raises(ValueError, match="base64"):
        signing_key("whsec_")


def test_an_end_whose_outbox_write_was_lost_and_a_delivery_whose_process_died_are_sent(
    settings: Settings, hooks: Hooks, db: Any
) -> None:
    s = settings.model_copy(update={"notify": [f"{hooks.url}/ok"], "notify_on": ["cancelled"]})
    with Runtime(s) as dying:
        dying.store.on_end = None  # the process dies right after the job's end write
        lost = _cancelled(dying)
    assert db.jobstatuses.find_one({"jobId": lost})["notifyDue"] == 1
    assert db.notifications.count_documents({}) == 0
    # a delivery claimed by a process that then died mid-request (its lease goes silent)
    with Runtime(s) as other:
        other.store.on_end = None
        orphan = _cancelled(other)
        made = other.notifier.enqueue(other.store.get(orphan))
        db.jobstatuses.update_one({"jobId": orphan}, {"$unset": {"notifyDue": ""}})
    dead = {"status": IN_PROGRESS, "owner": "dead:1:x", "attempts": 1, "leaseBeat": 3}
    dead["heartbeatMs"] = int(time.time() * 1000)
    db.notifications.update_one(
        {"_id": made[0]}, {"$set": dead, "$currentDate": {"heartbeatAt": True}}
    )
    with Runtime(s, executor="local") as rt:
        rt.start()  # a serve: its dispatcher sweeps the flagged end and takes over the orphan

        def both() -> dict[str, Any] | None:
            seen = {j: v for j, v in hooks.by_job("/ok").items() if j in (lost, orphan)}
            return seen if len(seen) == 2 else None

        got = wait_for(both, timeout=60)
        wait_for(lambda: rt.notifier.pending() == 0, timeout=30)
    assert got[orphan][0][0]["webhook-id"] == made[0]  # the same id as the dead attempt's
    taken = db.notifications.find_one({"_id": made[0]})
    assert taken["status"] == "delivered" and taken["attempts"] == 2
    assert db.jobstatuses.count_documents({"notifyDue": 1}) == 0
    assert len(hooks.by_job("/ok")[lost]) == 1


def test_a_short_command_waits_only_for_the_ends_it_made(settings: Settings, db: Any) -> None:
    """A command that ends a job (here with no webhook for its end) exits without waiting on
    another process's end its dispatcher found flagged: that one's receiver hangs."""
    from lakesync.models import JobState

    hooks = Hooks(hang=120.0)
    s = settings.model_copy(update={"notify": [f"{hooks.url}/hang"], "notify_on": ["cancelled"]})
    try:
        with Runtime(s) as dying:
            dying.store.on_end = None  # its process died before putting its end in the outbox
            _cancelled(dying)
        rt = Runtime(s)  # a short command (no executor)
        status, _ = rt.jobs.start("copy-taskdetail", trigger="cli")
        rt.store.finish(status.jobId, None, JobState.FAILED, "Failed", "no webhook on failed")
        closing = threading.Thread(target=rt.close, kwargs={"timeout": 60})
        closing.start()
        closing.join(30)
        assert not closing.is_alive(), "the command waited for another process's delivery"
    finally:
        hooks.close()
    assert db.notifications.count_documents({"status": IN_PROGRESS}) == 0  # handed back


def test_a_hanging_receiver_delays_no_other(settings: Settings, hooks: Hooks, db: Any) -> None:
    s = settings.model_copy(
        update={
            "notify": [f"{hooks.url}/hang", f"{hooks.url}/ok"],
            "notify_on": ["cancelled"],
            "webhook_timeout": 30,
        }
    )
    with Runtime(s) as rt:  # its dispatcher starts with the first job end
        jobs = [_cancelled(rt) for _ in range(8)]
        assert len(set(jobs)) == 8
        # every /ok delivery arrives while the hanging receiver still holds its first two
        wait_for(lambda: set(hooks.by_job("/ok")) == set(jobs), timeout=30)
        assert len(hooks.got("/hang")) <= 2  # its own slots only; none of /ok's
        assert db.notifications.count_documents({"receiver": receiver_key(
            f"{hooks.url}/hang"), "status": "pending"}) >= 6  # fmt: skip
        rt.notifier.close(0)
        assert db.notifications.count_documents({"status": IN_PROGRESS}) == 0  # handed back


# -- soak: 3 serves, a hanging, a flaky and a working receiver, and a kill -9 ---------------------


@pytest.mark.slow
def test_soak_three_serves_kill_9_mid_delivery_every_end_reaches_each_working_receiver(
    serve_env: dict[str, str], db: Any, tmp_path: Path
) -> None:
    hooks = Hooks(hang=60.0)
    tiny = tmp_path / "tiny"
    generate(tiny, 20, seed=11)
    tick = {
        "source": str(tiny),
        "collection": "tick",
        "key": "taskDetailId",
        "every": "2s",
        "notify": [f"{hooks.url}/hang", f"{hooks.url}/flaky", f"{hooks.url}/ok"],
        "on": ["completed", "failed", "cancelled"],
    }
    # refused at start-up, naming the file, the operation and the field
    bad = tmp_path / "bad.toml"
    for line, problem in (('schedule = "0 0 31 2 *"', "never fires"),
                          ('every = "999999999d"', "too long")):  # fmt: skip
        bad.write_text(f'[operations.nightly]\ncollection = "t"\nkey = "id"\n{line}\n')
        refused = ServeProcess(dict(serve_env, LAKESYNC_OPERATIONS_FILE=str(bad)), tmp_path / "b")
        with pytest.raises(RuntimeError, match=problem) as caught:
            refused.start(timeout=60)
        assert str(bad) in str(caught.value) and "'nightly'" in str(caught.value)
    ops = write_operations(tmp_path / "lakesync.toml", {"tick": tick})
    env = dict(serve_env, LAKESYNC_OPERATIONS_FILE=str(ops), LAKESYNC_WEBHOOK_SECRET=SECRET,
               LAKESYNC_WEBHOOK_TIMEOUT="3", LAKESYNC_WEBHOOK_RETRIES="8")  # fmt: skip
    serves = [ServeProcess(env, tmp_path / f"serve{i}.log") for i in range(3)]
    try:
        for s in serves:
            s.start(timeout=120)
        began = datetime.now(UTC)
        wait_for(lambda: db.jobstatuses.count_documents({"status": "completed"}) >= 3, 120)
        victim = serves[0]
        assert victim.proc is not None
        prefix = f":{victim.proc.pid}:"

        def mid_delivery() -> bool:  # the victim holds a delivery to a working receiver
            working = [receiver_key(f"{hooks.url}/{p}") for p in ("ok", "flaky")]
            return any(prefix in str(d.get("owner")) for d in db.notifications.find(
                {"status": IN_PROGRESS, "receiver": {"$in": working}}))  # fmt: skip

        wait_for(mid_delivery, timeout=120, every=0.02)
        os.kill(victim.proc.pid, 9)
        victim.proc.wait(10)
        wait_for(lambda: db.jobstatuses.count_documents({"status": "completed"}) >= 10, 180)
        db.schedules.update_many({}, {"$set": {"paused": True}})  # no more: the last jobs end
        wait_for(lambda: db.jobstatuses.count_documents(
            {"status": {"$in": ["pending", "in_progress"]}}) == 0, timeout=120)  # fmt: skip
        ended = {d["jobId"]: d for d in db.jobstatuses.find({"operation": "tick"})}
        working = ("/ok", "/flaky")
        wait_for(lambda: all(set(hooks.by_job(p)) >= set(ended) for p in working), timeout=180)
        for path in working:
            seen = hooks.by_job(path)
            for job_id, doc in ended.items():
                ids = {h["webhook-id"] for h, _, _ in seen[job_id]}
                assert len(ids) == 1, (path, job_id, ids)  # de-duplication leaves exactly one
                for h, body, _ in seen[job_id]:
                    assert Webhook(SECRET).verify(body, h)["status"] == doc["status"]
        # the hanging receiver delayed no one: each end reached /ok soon after it, while
        # /hang had held its slots of every serve all along
        for job_id, doc in ended.items():
            first = min(t for _, _, t in hooks.by_job("/ok")[job_id])
            end = doc["endTime"].replace(tzinfo=UTC).timestamp()
            assert first - end < 60, (job_id, first - end)
        assert hooks.hanging >= 2
        # an operation whose webhooks hang or fail still ran on time: slots were started
        slots = list(db.scheduleslots.find({"operation": "tick"}))
        span = (datetime.now(UTC) - began) / timedelta(seconds=2)
        assert len(slots) >= span / 3, (len(slots), span)
        assert {s["outcome"] for s in slots} <= {"started", "skipped"}
    finally:
        for s in serves:
            s.kill()
        hooks.close()


def test_the_notifier_dispatches_only_receivers_it_knows(settings: Settings, db: Any) -> None:
    """A delivery for a receiver no longer declared is left alone (another process may know
    it), rather than sent somewhere else, and given up once it is as old as statuses get."""
    with Runtime(settings) as rt:
        n = Notifier(settings, rt.registry, rt.mongo.db, "test:1:x")
        db.notifications.insert_one({"_id": "msg_x", "receiver": "unknown", "status": "pending",
                                     "nextAtMs": 0, "jobId": "job_x", "event": "job.failed",
                                     "body": "{}", "attempts": 0})  # fmt: skip
        assert n.dispatch() == 0
        assert db.notifications.find_one({"_id": "msg_x"})["status"] == "pending"
        # ... until it has waited as long as job statuses are kept: then it is given up
        db.notifications.update_one({"_id": "msg_x"}, {"$set": {"createdMs": 1}})
        n._swept = 0.0  # the periodic checks run at the next pass
        assert n.dispatch() == 0
        given_up = db.notifications.find_one({"_id": "msg_x"})
        assert given_up["status"] == "given_up" and "not sent within" in given_up["lastError"]
        n.close(0)
    assert LEASE_SECONDS >= 1
