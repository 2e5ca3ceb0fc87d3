"""The seed's endpoints with a job id the frontend names itself (`job_<Date.now()>`).

`POST /.netlify/functions/copy-taskdetail` takes `jobId` (JSON body or query string) as the
job's clientJobId; `simple-status?jobId=` answers for it; nothing else does.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from pymongo.errors import DuplicateKeyError
from tests.helpers import ServeProcess, wait_for

from lakesync.api.netlify import CLIENT_JOB_ID_RULE
from lakesync.runtime import Runtime

COPY = "/.netlify/functions/copy-taskdetail"
STATUS = "/.netlify/functions/simple-status"
JSON = {"content-type": "application/json"}


def done(client: TestClient, job_id: str) -> dict[str, Any]:
    def ended() -> Any:
        s = client.get(STATUS, params={"jobId": job_id}).json()
        return s if s["status"] in ("completed", "failed", "cancelled") else None

    result: dict[str, Any] = wait_for(ended, timeout=90)
    return result


BAD_IDS: list[Any] = [
    "", "job_", "job", "jobs_1", "Job_1", "JOB_1", "1732865123456", "job_12 34", " job_1",
    "job_1 ", "job_1\n", "job_1.5", "job_1/2", "job_1?x=1", "job_é1", "job_1%00",
    "job_" + "a" * 65, "job_1;drop", 1732865123456, 1.5, True, ["job_1"], {"id": "job_1"},
]  # fmt: skip


def test_a_client_job_id_that_breaks_the_rule_is_400_with_the_rule(
    client: TestClient, db: Any
) -> None:
    for bad in BAD_IDS:
        r = client.post(COPY, json={"jobId": bad})
        assert r.status_code == 400, (bad, r.text)
        assert r.json()["error"] == CLIENT_JOB_ID_RULE and "1 to 64" in r.json()["error"]
        assert r.json()["rule"] == "job_[A-Za-z0-9_-]{1,64}"
        if isinstance(bad, str):
            q = client.post(COPY, params={"jobId": bad}, json={})
            assert q.status_code == 400 and q.json()["error"] == CLIENT_JOB_ID_RULE, (bad, q.text)
    both = client.post(COPY, params={"jobId": "job_1"}, json={"jobId": "job_2"})
    assert both.status_code == 400 and "differs" in both.json()["error"]
    assert db["jobstatuses"].count_documents({}) == 0, "a refused request started a job"
    # the edges of the rule are accepted: 1 and 64 characters, every allowed character
    for good in ("job_1", "job_" + "Az09_-" * 10 + "abcd"):
        r = client.post(COPY, json={"jobId": good})
        assert r.status_code == 202, r.text
        assert r.json()["clientJobId"] == good
        done(client, good)


def test_the_same_client_id_twice_gives_one_job(client: TestClient, db: Any) -> None:
    first = client.post(COPY, json={"jobId": "job_1732865123456"})
    again = client.post(COPY, params={"jobId": "job_1732865123456"}, json={})  # query string
    assert first.status_code == 202 and again.status_code == 202
    job_id = first.json()["jobId"]
    assert again.json()["jobId"] == job_id
    assert job_id != "job_1732865123456" and len(job_id) == 30  # its own unguessable id
    assert first.json()["clientJobId"] == "job_1732865123456"
    by_client_id = done(client, "job_1732865123456")
    assert by_client_id["jobId"] == job_id and by_client_id["status"] == "completed"
    assert by_client_id["insertedRecords"] == 4975 and by_client_id["errorRecords"] == 25
    by_job_id = client.get(STATUS, params={"jobId": job_id}).json()
    assert by_job_id == by_client_id
    # after the job ended the id still names it: no second copy while its status exists
    later = client.post(COPY, json={"jobId": "job_1732865123456"})
    assert later.status_code == 202 and later.json()["jobId"] == job_id
    assert later.json()["status"] == "completed"
    assert db["jobstatuses"].count_documents({}) == 1
    # a new id starts a new job, which finds nothing to change
    fresh = client.post(COPY, json={"jobId": "job_1732865999999"})
    assert fresh.status_code == 202 and fresh.json()["jobId"] != job_id
    assert done(client, "job_1732865999999")["unchangedRecords"] == 4975
    assert client.post(COPY, json={}).json()["clientJobId"] is None  # still optional
    assert db["jobstatuses"].count_documents({}) == 3


def test_a_client_id_is_read_only_where_the_seed_used_it(client: TestClient) -> None:
    alias = "job_1732865000001"
    job_id = client.post(COPY, json={"jobId": alias}).json()["jobId"]
    done(client, alias)
    assert client.get(f"/api/jobs/{job_id}").status_code == 200
    for method, path in [
        ("GET", f"/api/jobs/{alias}"),
        ("GET", f"/api/jobs/{alias}/events"),
        ("GET", f"/api/jobs/{alias}/errors"),
        ("POST", f"/api/jobs/{alias}/cancel"),
        ("POST", f"/api/jobs/{alias}/resume"),
    ]:
        r = client.request(method, path, json={} if method == "POST" else None)
        assert r.status_code == 404, (method, path, r.text)
        assert job_id not in r.text
    guesses = [f"job_17328650000{n:02d}" for n in range(100) if n != 1]
    for guess in guesses:  # neighbouring timestamps name nothing
        assert client.get(STATUS, params={"jobId": guess}).status_code == 404
    # a client id may not be another job's own id (the two must never name different jobs)
    clash = client.post(COPY, json={"jobId": job_id})
    assert (
        clash.status_code == 409 and "already the jobId of an existing job" in clash.json()["error"]
    )


def test_a_frontend_joining_a_running_copy_polls_its_own_id(
    client: TestClient, runtime: Runtime
) -> None:
    running = client.post("/api/jobs", json={"options": {"batchSize": 10}}).json()
    assert running["clientJobId"] is None
    joined = client.post(COPY, json={"jobId": "job_1732865111111"})
    assert joined.status_code == 202 and joined.json()["jobId"] == running["jobId"]
    seen = client.get(STATUS, params={"jobId": "job_1732865111111"})
    assert seen.status_code == 200 and seen.json()["jobId"] == running["jobId"]
    # a second frontend with its own id cannot share the copy under that id: it is told so
    other = client.post(COPY, json={"jobId": "job_1732865222222"})
    assert other.status_code == 409, other.text
    assert (
        running["jobId"] in other.json()["error"] and "Wait until it ends" in other.json()["error"]
    )
    assert client.get(STATUS, params={"jobId": "job_1732865222222"}).status_code == 404
    client.post(f"/api/jobs/{running['jobId']}/cancel", json={})
    assert done(client, "job_1732865111111")["status"] == "cancelled"


def test_concurrent_starts_with_one_client_id_make_one_job(
    runtime: Runtime, demo_lake: Path, db: Any
) -> None:
    files = sorted(str(p) for p in demo_lake.rglob("*.parquet"))[:8]
    assert len(files) == 8
    got: list[tuple[str, bool]] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(files))

    def start(source: str) -> None:  # different sources: single-flight does not join them
        barrier.wait()
        try:
            status, created = runtime.jobs.start(
                "copy-taskdetail", {"source": source}, client_job_id="job_race"
            )
            got.append((status.jobId, created))
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=start, args=(f,)) for f in files]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert len({job_id for job_id, _ in got}) == 1 and sum(c for _, c in got) == 1, got
    assert db["jobstatuses"].count_documents({}) == 1


def test_the_client_id_index_is_unique_and_sparse(runtime: Runtime, db: Any) -> None:
    on_client_id = [i for i in db["jobstatuses"].list_indexes() if "clientJobId" in i["key"]]
    assert len(on_client_id) == 1 and on_client_id[0]["unique"] is True, on_client_id
    db["jobstatuses"].insert_one({"jobId": "job_a", "clientJobId": "job_x"})
    db["jobstatuses"].insert_one({"jobId": "job_b"})
    db["jobstatuses"].insert_one({"jobId": "job_c"})  # no client id: no collision
    with pytest.raises(DuplicateKeyError):
        db["jobstatuses"].insert_one({"jobId": "job_d", "clientJobId": "job_x"})


def test_the_token_guards_both_seed_endpoints_with_client_ids(
    serve_env: dict[str, str], tmp_path: Path
) -> None:
    token = "seed-token-77c1"
    auth = {"Authorization": f"Bearer {token}"}
    serve_env["LAKESYNC_API_TOKEN"] = token
    proc = ServeProcess(serve_env, tmp_path / "serve.log").start()
    try:
        url = proc.url
        alias = "job_1732865333333"
        refused = httpx.post(f"{url}{COPY}", json={"jobId": alias}, timeout=30)
        assert refused.status_code == 401
        assert httpx.get(f"{url}/api/jobs", headers=auth).json()["jobs"] == []
        bad = httpx.post(f"{url}{COPY}", json={"jobId": "job_1 2"}, headers=auth, timeout=30)
        assert bad.status_code == 400 and bad.json()["error"] == CLIENT_JOB_ID_RULE
        started = httpx.post(f"{url}{COPY}", json={"jobId": alias}, headers=auth, timeout=30)
        assert started.status_code == 202 and started.json()["clientJobId"] == alias
        assert httpx.get(f"{url}{STATUS}", params={"jobId": alias}).status_code == 401
        assert httpx.post(f"{url}{COPY}", json={"jobId": alias}).status_code == 401

        def finished() -> Any:
            r = httpx.get(f"{url}{STATUS}", params={"jobId": alias}, headers=auth)
            return r.json() if r.json()["status"] == "completed" else None

        final = wait_for(finished, timeout=90)
        assert final["jobId"] == started.json()["jobId"] and final["processedRecords"] == 5000
        assert httpx.get(f"{url}/api/jobs/{alias}", headers=auth).status_code == 404
    finally:
        proc.kill()
