"""The job status store against the embedded server: indexes, the status document, its life."""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime
from typing import Any

import pytest
from pymongo.errors import AutoReconnect, DuplicateKeyError
from tests.helpers import CONTRACT_FIELDS, ISO_Z

from lakesync.config import Settings, load_settings
from lakesync.errors import JobNotFound, LeaseLost
from lakesync.jobstore import JobStore
from lakesync.models import Checkpoint, Counters, JobState
from lakesync.runtime import Runtime

JOB_ID = re.compile(r"^job_[0-9a-z]{26,}$")


@pytest.fixture
def store(db: Any) -> JobStore:
    s = JobStore(db, ttl_days=7)
    s.ensure_indexes()
    return s


def indexes(collection: Any) -> dict[tuple[tuple[str, Any], ...], dict[str, Any]]:
    return {tuple(ix["key"].items()): dict(ix) for ix in collection.list_indexes()}


def test_unique_job_id_and_ttl_indexes(
    settings: Settings, db: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LAKESYNC_STATUS_TTL_DAYS", "3")
    assert settings.mongodb_uri is not None
    configured = load_settings(
        mongodb_uri=settings.mongodb_uri.get_secret_value(),
        database=settings.database,
        lake_uri=settings.lake_uri,
    )
    with Runtime(configured):  # start-up creates the indexes
        pass
    store = JobStore(db, ttl_days=3)
    store.ensure_indexes()  # idempotent
    found = indexes(db.jobstatuses)
    assert found[(("jobId", 1),)].get("unique") is True
    assert found[(("expireAt", 1),)]["expireAfterSeconds"] == 0  # set when a job ends
    assert "expireAfterSeconds" not in found.get((("startTime", 1),), {})
    assert indexes(db.copyerrors)[(("time", 1),)]["expireAfterSeconds"] == 3 * 86400

    store.create("copy-taskdetail", {}, flight="f1")
    doc = db.jobstatuses.find_one({}, {"_id": 0})
    with pytest.raises(DuplicateKeyError):
        db.jobstatuses.insert_one({**doc, "flightKey": "another"})
    assert db.jobstatuses.count_documents({}) == 1


def test_statuses_expire_a_ttl_after_they_end_never_while_running(db: Any) -> None:
    # a database of an older version: statuses expired a TTL after their start
    db.jobstatuses.create_index("startTime", expireAfterSeconds=7 * 86400)
    db.jobstatuses.insert_one({"jobId": "job_old", "status": "completed", "operation": "x"})
    store = JobStore(db, ttl_days=0.5)
    store.ensure_indexes()
    ttl = {tuple(ix["key"]): ix.get("expireAfterSeconds") for ix in db.jobstatuses.list_indexes()}
    assert ttl.get(("startTime",)) is None and ttl[("expireAt",)] == 0
    assert db.jobstatuses.find_one({"jobId": "job_old"})["expireAt"]  # ended: expires too

    def expire_at(job_id: str) -> datetime | None:
        value = (db.jobstatuses.find_one({"jobId": job_id}) or {}).get("expireAt")
        return datetime.fromisoformat(value) if isinstance(value, str) else value  # nx-27017

    def data_expiring(job_id: str) -> int:  # the job's partitions and plan go with it
        mine = {"jobId": job_id, "expireAt": {"$exists": True}}
        return sum(db[name].count_documents(mine) for name in ("jobpartitions", "jobplans"))

    job, _ = store.create("copy-taskdetail", {}, flight="f")
    for name in ("jobpartitions", "jobplans"):
        db[name].insert_many([{"jobId": job.jobId, "n": n} for n in range(2)])
    assert expire_at(job.jobId) is None
    store.claim(job.jobId, "me", 30)
    assert expire_at(job.jobId) is None and data_expiring(job.jobId) == 0
    before = datetime.now(UTC)
    store.finish(job.jobId, "me", JobState.FAILED, "Failed", "boom")
    ends = expire_at(job.jobId)
    assert ends is not None and data_expiring(job.jobId) == 4
    ends = ends if ends.tzinfo else ends.replace(tzinfo=UTC)
    assert abs((ends - before).total_seconds() - 43200) < 60
    store.reopen(job.jobId)  # running again: no expiry
    assert expire_at(job.jobId) is None and data_expiring(job.jobId) == 0
    pending, _ = store.create("copy-taskdetail", {}, flight="g")
    store.request_cancel(pending.jobId)
    assert expire_at(pending.jobId) is not None


def test_status_document_through_its_life_matches_the_contract(store: JobStore, db: Any) -> None:
    created, is_new = store.create("copy-taskdetail", {"source": "/lake"}, flight="f")
    assert is_new and JOB_ID.match(created.jobId)
    assert created.status == JobState.PENDING and created.percentComplete == 0
    assert store.create("copy-taskdetail", {}, flight="f") == (created, False)  # single flight

    running = store.claim(created.jobId, "me", lease_seconds=30)
    assert running is not None and running.status == JobState.IN_PROGRESS
    assert running.attempt == 1 and store.claim(created.jobId, "other", 30) is None
    store.update_run(created.jobId, "me", totalRecords=10)
    delta = Counters(processed=10, inserted=6, updated=1, unchanged=2, errors=1)
    progress = {"percentComplete": 100.0, "recordsPerSecond": 5.0, "etaSeconds": 0.0}
    store.commit(created.jobId, "me", delta, Checkpoint(fileIndex=1, row=10, batches=1), progress)
    with pytest.raises(LeaseLost):
        store.commit(created.jobId, "other", delta, Checkpoint(), progress)
    done = store.finish(created.jobId, "me", JobState.COMPLETED, "Copied 10 records")

    public = done.public()
    for field, kind in CONTRACT_FIELDS.items():
        assert field in public, field
        assert isinstance(public[field], kind), (field, public[field])
    assert public["status"] == "completed" and public["options"] == {"source": "/lake"}
    assert (public["totalRecords"], public["processedRecords"]) == (10, 10)
    assert (public["insertedRecords"], public["updatedRecords"]) == (6, 1)
    assert (public["unchangedRecords"], public["errorRecords"]) == (2, 1)
    assert public["percentComplete"] == 100 and public["error"] is None
    for field in ("startTime", "endTime", "updatedAt", "heartbeatAt"):
        assert ISO_Z.match(public[field]), (field, public[field])
    assert "owner" not in public and "flightKey" not in public

    raw = db.jobstatuses.find_one({"jobId": created.jobId})
    for field in ("startTime", "endTime", "updatedAt", "heartbeatAt"):
        assert isinstance(raw[field], datetime), (field, raw[field])  # BSON dates: the TTL works
    assert raw["endTime"] >= raw["startTime"]
    assert "flightKey" not in raw  # the slot is free for the next job
    assert store.create("copy-taskdetail", {}, flight="f")[1]


def test_a_failed_job_keeps_its_error(store: JobStore) -> None:
    job, _ = store.create("copy-taskdetail", {}, flight="f")
    store.claim(job.jobId, "me", 30)
    failed = store.finish(job.jobId, "me", JobState.FAILED, "Failed", error="what and how to fix")
    assert failed.public()["status"] == "failed"
    assert store.get(job.jobId).error == "what and how to fix"


def test_unknown_job_is_not_found_with_a_hint(store: JobStore) -> None:
    with pytest.raises(JobNotFound) as e:
        store.get("job_doesnotexist")
    assert "job_doesnotexist" in str(e.value) and "7 days" in str(e.value)


def test_jobs_are_listed_newest_first(store: JobStore) -> None:
    ids = []
    for i in range(3):
        ids.append(store.create("copy-taskdetail", {}, flight=f"f{i}")[0].jobId)
        time.sleep(0.005)  # distinct start times (milliseconds)
    store.claim(ids[0], "me", 30)
    store.finish(ids[0], "me", JobState.COMPLETED, "done")
    listed = store.list_jobs()
    assert [j.jobId for j in listed] == ids[::-1]
    assert [j.jobId for j in store.list_jobs(limit=2)] == ids[:0:-1]
    assert [j.jobId for j in store.list_jobs(status="completed")] == ids[:1]


class LostReplies:
    """A fake network fault (named as such: it cannot be produced on demand here): every
    counter update reaches the server, but the first answer is lost on the way back."""

    def __init__(self, collection: Any) -> None:
        self.collection = collection
        self.lost = 0

    def find_one_and_update(self, query: Any, update: Any, **kwargs: Any) -> Any:
        result = self.collection.find_one_and_update(query, update, **kwargs)
        if "processedRecords" in update.get("$inc", {}) and self.lost == 0:
            self.lost += 1
            raise AutoReconnect("connection reset by peer (after the update was applied)")
        return result

    def __getattr__(self, name: str) -> Any:
        return getattr(self.collection, name)


def test_a_commit_retried_after_a_lost_reply_counts_the_batch_once(settings: Settings) -> None:
    with Runtime(settings.model_copy(update={"batch_size": 1000})) as rt:
        fault = LostReplies(rt.store.jobs)
        rt.store.jobs = fault  # type: ignore[assignment]
        status, _ = rt.jobs.start("copy-taskdetail")
        rt.runner.run(status.jobId)
        done = rt.jobs.get(status.jobId)
    assert fault.lost == 1
    assert done.status == JobState.COMPLETED, done.error
    assert (done.totalRecords, done.processedRecords) == (5000, 5000)
    assert (done.insertedRecords, done.errorRecords) == (4975, 25)


# -- polls answered from the process's recent copy (RecentStatuses) ---------------------------


def test_every_write_raises_the_revision(store: JobStore) -> None:
    job, _ = store.create("copy-taskdetail", {}, flight="f")
    seen = [job.revision]
    claimed = store.claim(job.jobId, "me", lease_seconds=30)
    assert claimed is not None
    seen.append(claimed.revision)
    seen.append(store.update_run(job.jobId, "me", totalRecords=10).revision)
    cp = Checkpoint(fileIndex=1, row=10, batches=1)
    seen.append(store.commit(job.jobId, "me", Counters(processed=10), cp, {}).revision)
    seen.append(store.heartbeat(job.jobId, "me").revision)
    seen.append(store.request_cancel(job.jobId).revision)
    seen.append(store.finish(job.jobId, "me", JobState.CANCELLED, "Cancelled").revision)
    assert seen == sorted(set(seen)) and len(seen) == 7, seen
    assert "revision" not in store.get(job.jobId).public()


def test_a_poll_is_answered_from_what_this_process_last_wrote(store: JobStore, db: Any) -> None:
    job, _ = store.create("copy-taskdetail", {}, flight="f")
    store.claim(job.jobId, "me", lease_seconds=30)
    cp = Checkpoint(fileIndex=1, row=10, batches=1)
    committed = store.commit(job.jobId, "me", Counters(processed=10, inserted=10), cp, {})
    # another process changes the document: a fresh copy is still answered without a read...
    db.jobstatuses.update_one({"jobId": job.jobId}, {"$set": {"message": "from elsewhere"}})
    assert store.recent(job.jobId, max_age=60) == committed
    # ...and once it is older than max_age, the poll reads the document again
    assert store.recent(job.jobId, max_age=0).message == "from elsewhere"
    assert store.seen.get(job.jobId, 60).message == "from elsewhere"  # kept for the next polls


def test_a_late_reply_never_moves_a_job_back(store: JobStore) -> None:
    job, _ = store.create("copy-taskdetail", {}, flight="f")
    store.claim(job.jobId, "me", lease_seconds=30)
    older = store.heartbeat(job.jobId, "me")
    newer = store.commit(
        job.jobId, "me", Counters(processed=5), Checkpoint(fileIndex=0, row=5, batches=1), {}
    )
    store.seen.put(older)  # e.g. a heartbeat's reply that arrives after the commit's
    assert store.recent(job.jobId, max_age=60) == newer


def test_concurrent_polls_of_a_stale_job_share_one_read(mongo_uri: str, database: str) -> None:
    from threading import Barrier, Thread

    from pymongo import MongoClient, monitoring

    class Finds(monitoring.CommandListener):
        def __init__(self) -> None:
            self.count = 0

        def started(self, event: monitoring.CommandStartedEvent) -> None:
            if event.command_name == "find" and event.command.get("find") == "jobstatuses":
                self.count += 1

        def succeeded(self, event: monitoring.CommandSucceededEvent) -> None: ...

        def failed(self, event: monitoring.CommandFailedEvent) -> None: ...

    finds = Finds()
    client: MongoClient[dict[str, Any]] = MongoClient(mongo_uri, event_listeners=[finds])
    try:
        job, _ = JobStore(client[database]).create("copy-taskdetail", {}, flight="f")
        store = JobStore(client[database])  # another process: it has not seen the job
        barrier = Barrier(20)
        answers: list[str] = []

        def poll() -> None:
            barrier.wait()
            answers.append(store.recent(job.jobId, max_age=60).jobId)

        threads = [Thread(target=poll) for _ in range(20)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert answers == [job.jobId] * 20
        assert finds.count == 1
    finally:
        client.drop_database(database)
        client.close()


def test_hand_backs_after_failures_count_only_in_a_row_without_progress(store: JobStore) -> None:
    job, _ = store.create("copy-taskdetail", {}, flight="f")
    cp = Checkpoint(fileIndex=0, row=10, batches=1)

    def run_then_fail(batch: Checkpoint | None) -> int:
        assert store.claim(job.jobId, "me", lease_seconds=30) is not None
        if batch is not None:
            store.commit(job.jobId, "me", Counters(processed=10, inserted=10), batch, {})
        return store.release(job.jobId, "me", "MongoDB unavailable", failure=True).failures

    assert run_then_fail(None) == 1
    assert run_then_fail(None) == 2  # no progress in between: they add up
    assert run_then_fail(cp) == 1  # this run committed a batch: a new count starts
    assert run_then_fail(None) == 2


def test_an_upgrade_moves_partitions_and_plans_to_expire_with_their_job(db: Any) -> None:
    """Older versions expired them from `createdAt`, even under a job still running."""
    now = datetime.now(UTC)
    db.jobstatuses.insert_many([
        {"jobId": "job_running", "status": "in_progress"},
        {"jobId": "job_ended", "status": "completed"},
    ])  # fmt: skip
    for name in ("jobpartitions", "jobplans"):
        db[name].create_index("createdAt", expireAfterSeconds=3600)
        db[name].insert_many([{"jobId": j, "createdAt": now} for j in
                              ("job_running", "job_ended", "job_gone")])  # fmt: skip
    JobStore(db, ttl_days=7).ensure_indexes()
    for name in ("jobpartitions", "jobplans"):
        ttl = [dict(ix["key"]) for ix in db[name].list_indexes() if "expireAfterSeconds" in ix]
        assert ttl == [{"expireAt": 1}], name
        expiring = {d["jobId"] for d in db[name].find({"expireAt": {"$exists": True}})}
        assert expiring == {"job_ended", "job_gone"}, name  # never under a running job


def test_insert_new_keeps_documents_already_there_and_raises_any_other_write_error(
    db: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A second try of an insert (partitions planned, rejections, a mirror's key set) finds
    its documents there: kept. Any other write error is no duplicate and must not vanish."""
    from pymongo.collection import Collection
    from pymongo.errors import BulkWriteError

    from lakesync.mongo import insert_new

    coll = db["insert_new"]
    docs = [{"_id": f"j:{i}", "index": i} for i in range(3)]
    insert_new(coll, [dict(d) for d in docs])
    insert_new(coll, [dict(d) for d in docs] + [{"_id": "j:3", "index": 3}])
    assert sorted(d["index"] for d in coll.find()) == [0, 1, 2, 3]

    def refused(code: int) -> Any:
        def insert_many(self: Any, documents: Any, ordered: bool = True) -> Any:
            raise BulkWriteError({
                "writeErrors": [
                    {"index": 0, "code": 11000, "errmsg": "E11000 duplicate key"},
                    {"index": 1, "code": code, "errmsg": "Document failed validation"},
                ],
                "writeConcernErrors": [],
            })  # fmt: skip

        return insert_many

    monkeypatch.setattr(Collection, "insert_many", refused(121))
    with pytest.raises(BulkWriteError):
        insert_new(coll, [dict(d) for d in docs])
    monkeypatch.setattr(Collection, "insert_many", refused(11000))
    insert_new(coll, [dict(d) for d in docs])  # duplicates only
