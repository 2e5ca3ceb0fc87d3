"""/metrics: Prometheus text whose counters match finished jobs' counts.

Counters are process-global (other tests add to them), so every check compares a scrape
before with a scrape after.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from pydantic import SecretStr
from pymongo.errors import AutoReconnect
from tests.helpers import free_port, inject, wait_for

from lakesync.api.app import create_app
from lakesync.config import Settings
from lakesync.jobstore import JobStore
from lakesync.models import Outcome
from lakesync.mongo import Mongo
from lakesync.runtime import Runtime

TOKEN = "metrics-test-token-81c4f2"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(client: TestClient) -> Samples:
    r = client.get("/metrics", headers=AUTH)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(r.text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


@pytest.fixture
def served(settings: Settings) -> Iterator[tuple[Runtime, TestClient]]:
    """The app as `lakesync serve` runs it: a token and the local executor."""
    settings = settings.model_copy(update={"api_token": SecretStr(TOKEN)})
    with Runtime(settings, executor="local") as rt, TestClient(create_app(rt)) as client:
        rt.start()
        yield rt, client


def finished(client: TestClient, job_id: str) -> dict[str, Any]:
    def done() -> Any:
        s = client.get(f"/api/jobs/{job_id}", headers=AUTH).json()
        return s if s["status"] in ("completed", "failed", "cancelled") else None

    result: dict[str, Any] = wait_for(done, timeout=60)
    return result


def test_counters_match_a_finished_jobs_counts(served: tuple[Runtime, TestClient]) -> None:
    rt, client = served
    before = scrape(client)
    job_id = client.post("/api/jobs", json={"options": {"batchSize": 1000}}, headers=AUTH).json()
    done = finished(client, job_id["jobId"])
    after = scrape(client)
    assert done["status"] == "completed" and done["insertedRecords"] == 4975
    kinds = {"inserted": "insertedRecords", "updated": "updatedRecords",
             "unchanged": "unchangedRecords", "error": "errorRecords"}  # fmt: skip
    for kind, field in kinds.items():
        assert delta(before, after, "lakesync_records_total", kind=kind) == done[field], kind
    batches = rt.store.get(done["jobId"]).checkpoint.batches  # type: ignore[union-attr]
    assert batches >= 5
    assert delta(before, after, "lakesync_batch_write_seconds_count") == batches
    assert delta(before, after, "lakesync_batch_write_seconds_sum") > 0
    assert value(after, "lakesync_batch_write_seconds_bucket", le="+Inf") == value(
        after, "lakesync_batch_write_seconds_count"
    )
    assert value(after, "lakesync_jobs", status="completed") == 1
    assert value(after, "lakesync_jobs", status="pending") == 0
    assert value(after, "lakesync_active_jobs") == 0
    assert value(after, "lakesync_mongodb_up") == 1

    again = client.post("/api/jobs", json={}, headers=AUTH).json()  # same lake: all unchanged
    assert finished(client, again["jobId"])["unchangedRecords"] == 4975
    last = scrape(client)
    assert delta(after, last, "lakesync_records_total", kind="unchanged") == 4975
    assert delta(after, last, "lakesync_records_total", kind="inserted") == 0
    assert value(last, "lakesync_jobs", status="completed") == 2


def test_resumes_and_retries_are_counted(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = settings.model_copy(
        update={"api_token": SecretStr(TOKEN), "job_time_limit": 0.001, "batch_size": 2000}
    )
    inject(monkeypatch, AutoReconnect("connection reset by peer"), times=1)
    with Runtime(settings) as rt, TestClient(create_app(rt)) as client:
        before = scrape(client)
        job_id = client.post("/api/jobs", json={}, headers=AUTH).json()["jobId"]
        runs = 1
        while rt.runner.run(job_id) is Outcome.CONTINUE:  # the time limit ends each run
            runs += 1
        after = scrape(client)
        done = rt.jobs.get(job_id)
    assert done.status == "completed" and runs >= 3
    assert done.insertedRecords == 4975 and done.errorRecords == 25
    assert delta(before, after, "lakesync_resumes_total") == runs - 1
    assert delta(before, after, "lakesync_retries_total") == 1
    assert delta(before, after, "lakesync_records_total", kind="inserted") == 4975


def test_metrics_answer_while_mongodb_is_down(served: tuple[Runtime, TestClient]) -> None:
    rt, client = served
    assert value(scrape(client), "lakesync_mongodb_up") == 1
    uri = SecretStr(f"mongodb://127.0.0.1:{free_port()}/?directConnection=true")
    dead = Mongo(rt.settings.model_copy(update={"mongodb_uri": uri}))
    alive, rt.store = rt.store, JobStore(dead.db, rt.settings.status_ttl_days)
    try:
        samples = scrape(client)  # still 200, within the probe timeout
    finally:
        rt.store = alive
        dead.close()
    assert value(samples, "lakesync_mongodb_up") == 0
    assert ("lakesync_jobs", (("status", "completed"),)) in samples  # last values kept
