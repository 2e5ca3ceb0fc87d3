"""The HTTP API of the contract, in-process (TestClient) and over a real `lakesync serve`."""

from __future__ import annotations

import itertools
import json
import socket
import threading
import time
import weakref
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi.responses import StreamingResponse
from fastapi.testclient import TestClient
from tests.helpers import CONTRACT_FIELDS, ServeProcess, wait_done, wait_for

from lakesync.api import jobs as jobs_api
from lakesync.api.app import create_app
from lakesync.config import Settings
from lakesync.runtime import Runtime


@pytest.fixture
def live(runtime: Runtime) -> Iterator[str]:
    """The app served by uvicorn over a real socket, in a thread of this process, so a test
    can patch module settings; TestClient cannot follow a stream that does not end."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(create_app(runtime), log_config=None, access_log=False,
                            timeout_graceful_shutdown=1)  # fmt: skip
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started or not thread.is_alive(), timeout=10, every=0.01)
        assert server.started, "uvicorn did not start; see the captured log"
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def test_post_answers_202_with_location_then_job_completes(client: TestClient) -> None:
    r = client.post("/api/jobs", json={"operation": "copy-taskdetail", "options": {}})
    assert r.status_code == 202
    body = r.json()
    assert r.headers["location"] == f"/api/jobs/{body['jobId']}"
    assert int(r.headers["retry-after"]) >= 1
    assert body["status"] == "pending" and body["processedRecords"] == 0
    assert body["jobId"].startswith("job_") and len(body["jobId"]) >= 30
    assert set(body) >= CONTRACT_FIELDS.keys()
    done = wait_done(client, body["jobId"])
    assert done["status"] == "completed"
    assert done["insertedRecords"] == 4975 and done["errorRecords"] == 25
    assert done["endTime"].endswith("Z") and done["startTime"].endswith("Z")
    listed = client.get("/api/jobs", params={"status": "completed", "limit": 5}).json()["jobs"]
    assert listed[0]["jobId"] == body["jobId"]
    seed = client.get("/.netlify/functions/simple-status", params={"jobId": body["jobId"]})
    assert seed.status_code == 200 and seed.json()["processedRecords"] == 5000


def test_single_flight_and_idempotency_key(client: TestClient, runtime: Runtime) -> None:
    runtime.executor.shutdown(1)  # type: ignore[union-attr]  # keep jobs pending
    first = client.post("/api/jobs", json={}, headers={"Idempotency-Key": "abc"})
    again = client.post("/api/jobs", json={}, headers={"Idempotency-Key": "abc"})
    same_flight = client.post("/api/jobs", json={"options": {"batchSize": 10}})
    assert first.status_code == 202
    assert again.status_code == 200 and again.json()["jobId"] == first.json()["jobId"]
    assert same_flight.status_code == 200 and same_flight.json()["jobId"] == first.json()["jobId"]
    clash = client.post("/api/jobs", json={"options": {"batchSize": 7}},
                        headers={"Idempotency-Key": "abc"})  # fmt: skip
    assert clash.status_code == 422 and "Idempotency-Key" in clash.json()["error"]


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        ("{not json", 400, "not valid JSON"),
        (json.dumps({"operation": "nope"}), 400, "copy-taskdetail"),
        (json.dumps({"options": {"batchSize": 0}}), 400, "batchSize"),
        (json.dumps({"options": {"batchSize": "many"}}), 400, "batchSize"),
        (json.dumps({"options": {"mode": "sideways"}}), 400, "mode"),
        (json.dumps({"options": {"colour": "red"}}), 400, "colour"),
        (json.dumps({"options": {"source": "/no/such/lake"}}), 400, "outside the allowed roots"),
        (json.dumps({"options": []}), 422, "options"),
    ],
)
def test_bad_requests_get_clear_json_errors(
    client: TestClient, body: str, status: int, needle: str
) -> None:
    r = client.post("/api/jobs", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    assert needle in r.json()["error"]
    assert "Traceback" not in r.text


def test_lookup_errors(client: TestClient) -> None:
    assert client.get("/api/jobs/job_nope").status_code == 404
    assert "error" in client.get("/api/jobs/job_nope").json()
    assert client.get("/.netlify/functions/simple-status").status_code == 400
    assert client.get("/.netlify/functions/simple-status?jobId=job_x").status_code == 404
    assert client.post("/api/jobs/job_nope/cancel").status_code == 404
    assert client.get("/api/jobs", params={"limit": 100000}).status_code == 422
    r = client.post(
        "/api/jobs", content=b"x" * 200_000, headers={"content-type": "application/json"}
    )
    assert r.status_code == 413


def test_cancel_finished_job_is_409(client: TestClient) -> None:
    job_id = client.post("/api/jobs", json={}).json()["jobId"]
    wait_done(client, job_id)
    r = client.post(f"/api/jobs/{job_id}/cancel")
    assert r.status_code == 409 and r.json()["status"] == "completed"
    r = client.post(f"/api/jobs/{job_id}/resume")
    assert r.status_code == 409 and "only failed jobs" in r.json()["error"]


def test_seed_copy_endpoint_is_a_drop_in(client: TestClient) -> None:
    r = client.post("/.netlify/functions/copy-taskdetail")
    assert r.status_code == 202
    assert wait_done(client, r.json()["jobId"])["status"] == "completed"


def test_health_and_metrics(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").status_code == 200
    assert "lakesync_jobs" in client.get("/metrics").text
    assert client.get("/docs").status_code == 200
    assert client.get("/").status_code == 200


def test_post_answers_before_reading_a_large_lake(
    settings: Settings, tmp_path: Any, serve_env: dict[str, str]
) -> None:
    from lakesync.demo import generate

    lake = tmp_path / "million"
    generate(lake, 1_000_000, seed=1)
    serve_env["LAKESYNC_LAKE_URI"] = str(lake)
    proc = ServeProcess(serve_env, tmp_path / "serve.log").start()
    try:
        took = []
        for _ in range(3):
            started = time.perf_counter()
            r = httpx.post(f"{proc.url}/api/jobs", json={"options": {"batchSize": 5000}},
                           timeout=10)  # fmt: skip
            took.append(time.perf_counter() - started)
            assert r.status_code in (200, 202)
        assert r.json()["processedRecords"] == 0
        assert sorted(took)[1] < 1.0  # generous: the point is no data is read first
        httpx.post(f"{proc.url}/api/jobs/{r.json()['jobId']}/cancel", timeout=10)
    finally:
        proc.kill()


def test_events_stream_status_until_the_job_ends(slow_database: Any, request: Any) -> None:
    # through the slow link: the copy lasts long enough for several events on any machine
    serve: ServeProcess = request.getfixturevalue("serve")
    job_id = httpx.post(f"{serve.url}/api/jobs", json={"options": {"batchSize": 500}},
                        timeout=10).json()["jobId"]  # fmt: skip
    events: list[dict[str, Any]] = []
    ended = False
    with httpx.stream("GET", f"{serve.url}/api/jobs/{job_id}/events", timeout=60) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        kind = ""
        for line in r.iter_lines():
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: ") and kind == "status":
                events.append(json.loads(line[6:]))
            elif line.startswith("data: ") and kind == "end":
                ended = True
                break
    assert ended and events[-1]["status"] == "completed"
    processed = [e["processedRecords"] for e in events]
    assert processed == sorted(processed) and len(set(processed)) >= 3


def test_polls_show_another_processs_change_within_the_status_max_age(
    client: TestClient, runtime: Runtime
) -> None:
    from lakesync.service import STATUS_MAX_AGE_SECONDS

    runtime.executor.shutdown(1)  # type: ignore[union-attr]  # keep the job pending
    job_id = client.post("/api/jobs", json={"operation": "copy-taskdetail"}).json()["jobId"]
    assert client.get(f"/api/jobs/{job_id}").json()["status"] == "pending"  # from memory
    # e.g. `lakesync cancel` run on another machine: this process did not see the write
    runtime.store.jobs.update_one({"jobId": job_id}, {"$set": {"message": "changed elsewhere"}})
    wait_for(
        lambda: client.get(f"/api/jobs/{job_id}").json()["message"] == "changed elsewhere",
        timeout=STATUS_MAX_AGE_SECONDS + 5, every=0.05,
    )  # fmt: skip
    # this process's own writes show at once
    cancelled = client.post(f"/api/jobs/{job_id}/cancel").json()
    assert client.get(f"/api/jobs/{job_id}").json() == cancelled


def test_events_keep_a_pending_job_alive_and_stop_when_the_client_leaves(
    live: str, runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(jobs_api, "KEEPALIVE_SECONDS", 0.2)
    monkeypatch.setattr(jobs_api, "POLL_SECONDS", 0.02)
    streams: list[weakref.ref[Any]] = []  # the server-side generators, without keeping them

    class Watched(StreamingResponse):
        def __init__(self, content: Any, *args: Any, **kwargs: Any) -> None:
            streams.append(weakref.ref(content))
            super().__init__(content, *args, **kwargs)

    monkeypatch.setattr(jobs_api, "StreamingResponse", Watched)

    def stopped(ref: weakref.ref[Any]) -> bool:
        generator = ref()
        return generator is None or generator.ag_frame is None  # collected, or returned

    runtime.executor.shutdown(1)  # type: ignore[union-attr]  # keep the job pending
    with httpx.Client(base_url=live, timeout=5) as http:
        job_id = http.post("/api/jobs", json={}).json()["jobId"]
        lines = []
        with http.stream("GET", f"/api/jobs/{job_id}/events") as r:
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("text/event-stream")
            for line in r.iter_lines():  # a read timeout (5 s) fails the test if pings stop
                lines.append(line)
                if lines.count(": ping") == 2:
                    break
        # one status event for the unchanged pending job, then keep-alive comments only
        assert lines[0] == "event: status" and json.loads(lines[1][6:])["status"] == "pending"
        assert [x for x in lines[2:] if x] == [": ping", ": ping"], lines
        assert len(streams) == 1
        wait_for(lambda: stopped(streams[0]), timeout=5, every=0.01)  # the client left

        started = time.monotonic()
        assert http.get("/healthz").status_code == 200
        assert time.monotonic() - started < 2.0  # not held up by the stream that was left

        assert http.post(f"/api/jobs/{job_id}/cancel").json()["status"] == "cancelled"
        with http.stream("GET", f"/api/jobs/{job_id}/events") as r:
            ended = [x for x in r.iter_lines() if x]  # the server ends this stream itself
    assert ended[0] == "event: status" and json.loads(ended[1][6:])["status"] == "cancelled"
    assert ended[2:] == ["event: end", "data: {}"], ended
    wait_for(lambda: stopped(streams[1]), timeout=5, every=0.01)


def test_many_event_streams_share_one_reader_and_each_sees_every_change(
    live: str, runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """20 pages follow a job run elsewhere: its status is read and rendered once per
    interval for all of them (one reader per job), and every stream gets the other
    process's change once, and the final status."""
    from lakesync.models import JobStatus
    from lakesync.service import STATUS_MAX_AGE_SECONDS

    monkeypatch.setattr(jobs_api, "POLL_SECONDS", 0.05)
    rendered: list[str] = []
    public = JobStatus.public

    def counted_public(self: JobStatus) -> dict[str, Any]:
        rendered.append(self.jobId)
        return public(self)

    monkeypatch.setattr(JobStatus, "public", counted_public)
    reads: list[str] = []
    get = runtime.store.get

    def counted(job_id: str) -> Any:
        reads.append(job_id)
        return get(job_id)

    monkeypatch.setattr(runtime.store, "get", counted)
    runtime.executor.shutdown(1)  # type: ignore[union-attr]  # the job stays pending here
    job_id = httpx.post(f"{live}/api/jobs", json={}, timeout=10).json()["jobId"]
    streams = 20
    seen: list[list[dict[str, Any]]] = [[] for _ in range(streams)]
    connected = threading.Barrier(streams + 1, timeout=30)

    def follow(i: int) -> None:
        with httpx.stream("GET", f"{live}/api/jobs/{job_id}/events", timeout=30) as r:
            kind = ""
            for line in r.iter_lines():
                if line.startswith("event: "):
                    kind = line[7:]
                elif line.startswith("data: ") and kind == "status":
                    seen[i].append(json.loads(line[6:]))
                    if len(seen[i]) == 1:
                        connected.wait()
                elif kind == "end":
                    return

    threads = [threading.Thread(target=follow, args=(i,), daemon=True) for i in range(streams)]
    for thread in threads:
        thread.start()
    connected.wait()
    reads.clear()
    rendered.clear()
    started = time.monotonic()
    # another process (e.g. `lakesync cancel` elsewhere) changes the job, then ends it
    elsewhere = {"$set": {"message": "elsewhere"}, "$inc": {"revision": 1}}
    runtime.store.jobs.update_one({"jobId": job_id}, elsewhere)
    wait_for(
        lambda: all(s[-1]["message"] == "elsewhere" for s in seen),
        timeout=STATUS_MAX_AGE_SECONDS + 10,
        every=0.05,
    )
    ended = {"$set": {"status": "cancelled"}, "$inc": {"revision": 1}}
    runtime.store.jobs.update_one({"jobId": job_id}, ended)
    for thread in threads:
        thread.join(STATUS_MAX_AGE_SECONDS + 10)
    elapsed = time.monotonic() - started
    assert not any(thread.is_alive() for thread in threads)
    for events in seen:  # each change once, in order, and no event twice
        states = [(e["status"], e["message"]) for e in events]
        assert states[-2:] == [("pending", "elsewhere"), ("cancelled", "elsewhere")], states
        assert all(a != b for a, b in itertools.pairwise(events)), states
    # at most one read per max age and one rendering per interval, whatever the streams
    assert len(reads) <= elapsed / STATUS_MAX_AGE_SECONDS + 2, (len(reads), elapsed)
    assert len(rendered) <= 2 * elapsed / jobs_api.POLL_SECONDS + 5, (len(rendered), elapsed)


def test_answers_on_a_kept_alive_connection_do_not_wait_for_a_delayed_ack(
    serve: ServeProcess,
) -> None:
    """Browsers and clients keep connections alive. The listening socket must say it is TCP
    so that asyncio sets TCP_NODELAY on each connection: without it, every answer after
    the first waited for the client's delayed ACK (~40 ms on Linux) between its headers
    and its body."""
    from lakesync.api.server import bind

    sock = bind("127.0.0.1", 0)
    try:
        assert sock.proto == socket.IPPROTO_TCP
    finally:
        sock.close()
    with httpx.Client(base_url=serve.url, timeout=10) as http:
        took = []
        for _ in range(21):
            started = time.perf_counter()
            assert http.get("/healthz").status_code == 200
            took.append(time.perf_counter() - started)
    # a delayed ACK makes every answer after the first take >= 0.04 s; a busy machine makes
    # some slow too, but not all twenty of them
    assert min(took[1:]) < 0.03, took
