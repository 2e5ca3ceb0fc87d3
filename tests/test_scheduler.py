"""Schedules: slot arithmetic, bad declarations, and several schedulers racing for slots.

The schedulers here run in this process with an injected clock (`Scheduler.clock`), each
with its own Runtime (own MongoDB client, executor and owner), against one database;
test_unattended.py does the same with real `serve` and `worker` processes.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from tests.helpers import lakesync, wait_for, write_operations

from lakesync.config import Settings, load_settings
from lakesync.demo import generate
from lakesync.errors import ConfigError, JobError
from lakesync.operations import load_operations
from lakesync.runtime import Runtime
from lakesync.schedules import Schedule

T0 = datetime(2026, 1, 5, 12, 0, 0, tzinfo=UTC)


def test_cron_slots_follow_the_time_zone_and_intervals_align_to_the_epoch() -> None:
    daily = Schedule(cron="0 2 * * *", timezone="Europe/Berlin")
    now = datetime(2026, 7, 1, 10, 0, tzinfo=UTC)  # summer: Berlin is UTC+2
    assert daily.latest(now) == datetime(2026, 7, 1, 0, 0, tzinfo=UTC)
    assert daily.after(now) == datetime(2026, 7, 2, 0, 0, tzinfo=UTC)
    winter = datetime(2026, 1, 10, 10, 0, tzinfo=UTC)  # UTC+1
    assert daily.latest(winter) == datetime(2026, 1, 10, 1, 0, tzinfo=UTC)
    quarter = Schedule(cron="*/15 * * * *")
    on_slot = datetime(2026, 1, 1, 8, 30, tzinfo=UTC)
    assert quarter.latest(on_slot) == on_slot  # a slot that is due now counts
    assert quarter.after(on_slot) == on_slot + timedelta(minutes=15)
    assert quarter.missed(on_slot - timedelta(hours=1), on_slot) == 3
    every = Schedule.parse("1h30m")
    assert every.every == "1h30m" and every.cron is None
    assert every.latest(T0 + timedelta(minutes=1)).timestamp() % 5400 == 0
    one = Schedule.parse("1s")
    assert one.latest(T0 + timedelta(seconds=5.7)) == T0 + timedelta(seconds=5)
    assert one.missed(T0, T0 + timedelta(seconds=10)) == 9


@pytest.mark.parametrize(
    "cron",
    ["0 12 * * *", "*/15 * * * *", "30 1 * * 1"],  # daily, every quarter, weekly at 01:30
)
def test_a_cron_slot_is_never_due_before_its_time(cron: str) -> None:
    """`latest` once added a second to `now` (so that a slot due now counts) and kept the
    microseconds: at 11:59:59.2 the 12:00 slot was due, 0.8 s early."""
    schedule = Schedule(cron=cron, timezone="Europe/Berlin")
    slot = schedule.after(datetime(2026, 3, 2, 9, 0, tzinfo=UTC))
    before = schedule.latest(slot - timedelta(seconds=1))
    assert before < slot
    for off in (-1.0, -0.8, -0.2, -0.000001):  # just before the slot: the one before it
        assert schedule.latest(slot + timedelta(seconds=off)) == before, off
    for off in (0, 0.000001, 0.2, 0.999999, 1, 59.9):  # at it and just after: the slot
        assert schedule.latest(slot + timedelta(seconds=off)) == slot, off
    start = slot - timedelta(seconds=3)
    for tenth in range(60):  # no slot after now, none skipped between now and the next
        now = start + timedelta(seconds=tenth / 10)
        latest = schedule.latest(now)
        assert latest <= now < schedule.after(latest), now


BAD = [
    ('schedule = "*/15 * * *"', "schedule", "5-field cron"),
    ('schedule = "61 * * * *"', "schedule", "not a valid cron"),
    ('every = "15 minutes"', "every", "not a duration"),
    ('every = "0s"', "every", "too short"),
    ('schedule = "0 0 31 2 *"', "schedule", "never fires"),  # February 31st
    ('schedule = "0 0 30 2 *"', "schedule", "never fires"),
    ('every = "367d"', "every", "too long"),
    ('every = "999999999d"', "every", "too long"),
    ('every = "99999999999999999999d"', "every", "too long"),  # beyond timedelta
    ('every = "1m"\ntimezone = "Mars/Olympus"', "timezone", "not a known time zone"),
    ('every = "1m"\nschedule = "* * * * *"', "either schedule", "not both"),
    ('every = "1m"\nmode = "mirror"', "allowEmpty", "empty"),
    ('notify = ["ftp://example.com/hook"]', "notify", "not an http(s) URL"),
    ('on = ["finished"]', "on", "finished"),
    ("allowEmpty = true", "allowEmpty", "only applies to mode mirror"),
]


@pytest.mark.parametrize(("lines", "field", "problem"), BAD)
def test_bad_declarations_are_refused_naming_file_operation_and_field(
    tmp_path: Path, lines: str, field: str, problem: str
) -> None:
    path = tmp_path / "lakesync.toml"
    path.write_text(f'[operations.nightly]\ncollection = "t"\nkey = "id"\n{lines}\n')
    with pytest.raises(ConfigError) as caught:
        load_operations(path)
    message = str(caught.value)
    assert str(path) in message and "'nightly'" in message
    assert field in message and problem in message, message


@pytest.mark.parametrize(
    ("env", "problem"),
    [({"schedule": "every day"}, "LAKESYNC_SCHEDULE"),
     ({"schedule": "0 0 31 4 *"}, "never fires"),  # April 31st
     ({"schedule": "99999999999999999999d"}, "too long"),
     ({"schedule": "* * * * *", "schedule_timezone": "Nowhere/City"}, "LAKESYNC_SCHEDULE_TIMEZONE"),
     ({"notify": ["mailto:ops@example.com"]}, "LAKESYNC_NOTIFY")],
)  # fmt: skip
def test_bad_settings_are_refused_naming_the_variable(env: dict[str, Any], problem: str) -> None:
    with pytest.raises(ConfigError, match=problem):
        load_settings(**env)


@pytest.mark.parametrize(
    ("line", "field", "problem"),
    [('schedule = "0 25 * * *"', "schedule", "not a valid cron"),
     ('schedule = "0 0 31 2 *"', "schedule", "never fires"),
     ('every = "999999999d"', "every", "too long")],
)  # fmt: skip
def test_serve_refuses_to_start_with_a_bad_schedule(
    serve_env: dict[str, str], tmp_path: Path, line: str, field: str, problem: str
) -> None:
    path = tmp_path / "lakesync.toml"
    path.write_text(f'[operations.nightly]\ncollection = "t"\nkey = "id"\n{line}\n')
    env = dict(serve_env, LAKESYNC_OPERATIONS_FILE=str(path))
    run = lakesync(env, "serve", "--port", "1", timeout=60)
    assert run.returncode == 2, run.stderr
    assert str(path) in run.stderr and "'nightly'" in run.stderr
    assert field in run.stderr and problem in run.stderr and "Traceback" not in run.stderr


def test_a_failing_schedule_is_recorded_on_it_and_never_stops_another(
    settings: Settings, tiny_lake: Path, tmp_path: Path, db: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    fast = {"source": str(tiny_lake), "collection": "fast", "key": "taskDetailId", "every": "1s"}
    broken = dict(fast, collection="broken")
    path = write_operations(tmp_path / "lakesync.toml", {"broken": broken, "fast": fast})
    s = settings.model_copy(update={"operations_file": path})
    clock = FakeClock(T0 + timedelta(milliseconds=500))
    with Runtime(s) as rt:  # no executor: the jobs are created, not run
        from fastapi.testclient import TestClient

        from lakesync.api.app import create_app

        rt.scheduler.clock = clock
        rt.scheduler.ensure_indexes()
        declared = rt.scheduler.schedule_of

        def schedule_of(op: Any) -> Schedule | None:  # what load-time checks now refuse
            return Schedule(cron="0 0 31 2 *") if op.name == "broken" else declared(op)

        monkeypatch.setattr(rt.scheduler, "schedule_of", schedule_of)
        rt.scheduler.tick()
        for k in range(1, 4):
            clock.now = T0 + timedelta(seconds=k, milliseconds=100)
            claimed = rt.scheduler.tick()
            assert [c["operation"] for c in claimed] == ["fast"]  # broken first, fast still runs
            db.jobstatuses.update_many({}, {"$set": {"status": "completed"}, "$unset": {
                "flightKey": ""}})  # fmt: skip
        assert db.jobstatuses.count_documents({"operation": "fast"}) == 3
        state = db.schedules.find_one({"_id": "broken"})
        assert "failed to find" in state["error"] and state["errorAt"]
        with TestClient(create_app(rt), raise_server_exceptions=False) as client:
            r = client.get("/api/operations")
        assert r.status_code == 200, r.text
        listed = {o["name"]: o for o in r.json()["operations"]}
        assert listed["broken"]["nextRun"] is None
        assert "failed to find" in listed["broken"]["schedule"]["error"]
        assert listed["fast"]["nextRun"] == "2026-01-05T12:00:04.000Z"
        assert listed["fast"]["schedule"]["error"] is None
        # the schedule mended (the file fixed, the process restarted): its error is cleared
        monkeypatch.setattr(rt.scheduler, "schedule_of", declared)
        clock.now = T0 + timedelta(seconds=4, milliseconds=100)
        assert {c["operation"] for c in rt.scheduler.tick()} == {"fast", "broken"}
        assert "error" not in db.schedules.find_one({"_id": "broken"})


# -- several schedulers, one database ----------------------------------------------------------


class FakeClock:
    """The injected clock: a time the test moves."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def tiny_lake(tmp_path: Path) -> Path:
    out = tmp_path / "tiny"
    generate(out, 40, seed=3)
    return out


@pytest.fixture
def runtimes(settings: Settings, tiny_lake: Path, tmp_path: Path) -> Iterator[list[Runtime]]:
    fast = {"source": str(tiny_lake), "collection": "fast", "key": "taskDetailId", "every": "1s"}
    ops = write_operations(tmp_path / "lakesync.toml", {"fast": fast})
    s = settings.model_copy(update={"operations_file": ops, "schedule": "1s"})
    made = [Runtime(s, executor="local") for _ in range(3)]
    clock = FakeClock(T0 + timedelta(milliseconds=500))
    for rt in made:
        rt.scheduler.clock = clock
        assert rt.executor is not None
        rt.executor.start()  # the test ticks the schedulers itself, all at once
        rt.scheduler.ensure_indexes()
    yield made
    for rt in made:
        rt.close()


def _tick_all(runtimes: list[Runtime]) -> list[dict[str, Any]]:
    claimed: list[dict[str, Any]] = []
    barrier = threading.Barrier(len(runtimes))

    def tick(rt: Runtime) -> None:
        barrier.wait()
        claimed.extend(rt.scheduler.tick())

    threads = [threading.Thread(target=tick, args=(rt,)) for rt in runtimes]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return claimed


def _ended(rt: Runtime, job_id: str) -> bool:
    return rt.store.get(job_id).state.is_final


def test_racing_schedulers_start_each_slot_once_then_skip_then_catch_up_once(
    runtimes: list[Runtime], db: Any
) -> None:
    clock = runtimes[0].scheduler.clock
    assert isinstance(clock, FakeClock)
    assert _tick_all(runtimes) == []  # first sight: the slot already begun is not run
    for k in range(1, 6):
        clock.now = T0 + timedelta(seconds=k, milliseconds=100)
        claimed = _tick_all(runtimes)
        assert len(claimed) == 2  # one slot each of fast and of copy-taskdetail
        assert {c["outcome"] for c in claimed} == {"started"}
        for c in claimed:
            wait_for(lambda c=c: _ended(runtimes[0], c["jobId"]), timeout=60)
        assert _tick_all(runtimes) == []  # the same slot again: nothing
    jobs = list(db.jobstatuses.find({"operation": "fast"}))
    assert len(jobs) == 5
    assert {j["trigger"] for j in jobs} == {"schedule"}
    slots = sorted(j["scheduledFor"] for j in jobs)
    assert slots == [f"2026-01-05T12:00:0{k}.000Z" for k in range(1, 6)]
    # the operation still running: the slot is claimed and recorded as skipped
    db.jobstatuses.insert_one({"jobId": "job_x", "status": "in_progress", "operation": "fast",
                               "flightKey": f"fast|{runtimes[0].registry.get('fast').source}",
                               "startTime": datetime.now(UTC), "heartbeatMs": 2**52})  # fmt: skip
    clock.now = T0 + timedelta(seconds=6)
    claimed = [c for c in _tick_all(runtimes) if c["operation"] == "fast"]
    assert [(c["outcome"], c["jobId"]) for c in claimed] == [("skipped", "job_x")]
    assert db.scheduleslots.find_one({"operation": "fast", "slot": "2026-01-05T12:00:06.000Z"})[
        "outcome"] == "skipped"  # fmt: skip
    db.jobstatuses.delete_one({"jobId": "job_x"})
    # downtime: 50 slots pass with no scheduler ticking; the next tick runs one catch-up
    clock.now = T0 + timedelta(seconds=57, milliseconds=300)
    claimed = [c for c in _tick_all(runtimes) if c["operation"] == "fast"]
    assert len(claimed) == 1 and claimed[0]["outcome"] == "started"
    assert claimed[0]["catchUp"] is True and claimed[0]["missed"] == 50
    assert _tick_all(runtimes) == []
    assert db.jobstatuses.count_documents({"operation": "fast"}) == 6
    wait_for(lambda: _ended(runtimes[0], claimed[0]["jobId"]), timeout=60)


def test_pause_and_unpause_skip_the_slots_in_between(runtimes: list[Runtime], db: Any) -> None:
    rt = runtimes[0]
    clock = rt.scheduler.clock
    assert isinstance(clock, FakeClock)
    _tick_all(runtimes)
    shown = rt.scheduler.pause("fast")
    assert shown["paused"] is True and shown["nextRun"] is None
    for k in range(1, 4):
        clock.now = T0 + timedelta(seconds=k)
        assert all(c["operation"] != "fast" for c in _tick_all(runtimes))
    clock.now = T0 + timedelta(seconds=3, milliseconds=500)
    shown = runtimes[1].scheduler.unpause("fast")  # another process resumes it
    assert shown["paused"] is False and shown["nextRun"] == "2026-01-05T12:00:04.000Z"
    assert all(c["operation"] != "fast" for c in _tick_all(runtimes))  # 3 s passed while paused
    clock.now = T0 + timedelta(seconds=4)
    claimed = [c for c in _tick_all(runtimes) if c["operation"] == "fast"]
    assert len(claimed) == 1 and claimed[0]["missed"] == 0
    wait_for(lambda: _ended(rt, claimed[0]["jobId"]), timeout=60)
    info = rt.scheduler.describe(rt.registry.get("fast"))
    assert info is not None
    assert info["lastRun"]["outcome"] == "started" and info["lastRun"]["result"] == "completed"
    rt.scheduler.settings = rt.settings.model_copy(update={"schedule": None})
    with pytest.raises(JobError, match="has no schedule"):
        rt.scheduler.pause("copy-taskdetail")


def test_scheduled_jobs_carry_the_schedule_mode_and_allow_empty(
    settings: Settings, tiny_lake: Path, tmp_path: Path, db: Any
) -> None:
    mirrored = {
        "source": str(tiny_lake),
        "collection": "mirrored",
        "key": "taskDetailId",
        "mode": "mirror",
        "allowEmpty": True,
        "every": "1m",
    }
    path = write_operations(tmp_path / "mirror.toml", {"mirrored": mirrored})
    s = settings.model_copy(
        update={"operations_file": path, "schedule": "1m", "schedule_mode": "incremental"}
    )
    clock = FakeClock(T0 + timedelta(seconds=1))
    with Runtime(s) as rt:  # no executor: the jobs are created, not run
        rt.scheduler.clock = clock
        rt.scheduler.ensure_indexes()
        assert rt.scheduler.tick() == []
        clock.now = T0 + timedelta(minutes=1, seconds=2)
        claimed = {c["operation"]: c["outcome"] for c in rt.scheduler.tick()}
        listed = rt.scheduler.annotate(
            rt.registry.overview(rt.settings, rt.store, rt.runner.watermarks)
        )
    assert claimed == {"mirrored": "started", "copy-taskdetail": "started"}
    jobs = {j["operation"]: j for j in db.jobstatuses.find()}
    assert jobs["mirrored"]["options"]["allowEmpty"] is True
    assert jobs["copy-taskdetail"]["options"]["mode"] == "incremental"
    assert {j["scheduledFor"] for j in jobs.values()} == {"2026-01-05T12:01:00.000Z"}
    shown = {i.name: i for i in listed}
    assert shown["mirrored"].nextRun == "2026-01-05T12:02:00.000Z"
    assert shown["copy-taskdetail"].schedule is not None
    assert shown["copy-taskdetail"].schedule["mode"] == "incremental"
    assert shown["mirrored"].schedule is not None
    assert shown["mirrored"].schedule["lastRun"]["result"] == "pending"


class _Died(BaseException):
    """The process dies between claiming a slot and creating its job."""


def test_a_slot_whose_claimer_died_before_starting_its_job_is_started_once_by_another(
    runtimes: list[Runtime], db: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lakesync import scheduler as scheduler_module

    clock = runtimes[0].scheduler.clock
    assert isinstance(clock, FakeClock)
    for rt in runtimes:  # only `fast` is scheduled here
        rt.scheduler.settings = rt.settings.model_copy(update={"schedule": None})
    _tick_all(runtimes)  # first sight
    clock.now = T0 + timedelta(seconds=1, milliseconds=100)
    dying = runtimes[0]

    def die(*args: Any, **kwargs: Any) -> Any:
        raise _Died

    monkeypatch.setattr(dying.jobs, "start", die)
    with pytest.raises(_Died):
        dying.scheduler.tick()
    monkeypatch.undo()
    slot = "2026-01-05T12:00:01.000Z"
    assert {d["outcome"] for d in db.scheduleslots.find({"slot": slot})} == {"claimed"}
    assert _tick_all(runtimes) == []  # a fresh claim is left to its claimer
    assert db.jobstatuses.count_documents({}) == 0
    # past CLAIM_STALE_SECONDS the others see it was never started: one of them starts it
    monkeypatch.setattr(scheduler_module, "CLAIM_STALE_SECONDS", 0)
    time.sleep(0.01)
    rescued = _tick_all(runtimes)
    # (with no grace at all, a second rescuer may follow the first: still the same job)
    assert rescued and {(c["outcome"], c["jobId"]) for c in rescued} == {
        ("started", rescued[0]["jobId"])
    }, rescued
    assert all(c["rescued"] and c["slot"] == slot for c in rescued)
    assert {d["outcome"] for d in db.scheduleslots.find({"slot": slot})} == {"started"}
    for c in rescued:
        wait_for(lambda c=c: _ended(runtimes[0], c["jobId"]), timeout=60)
    assert _tick_all(runtimes) == []  # started: nothing left to rescue
    # a claimer alive but slow and its rescuers racing: still one job per slot
    for k in range(2, 6):
        clock.now = T0 + timedelta(seconds=k, milliseconds=100)
        _tick_all(runtimes)
        _tick_all(runtimes)
        for doc in db.jobstatuses.find({"operation": "fast"}):
            wait_for(lambda j=doc["jobId"]: _ended(runtimes[0], j), timeout=60)
    for k in range(1, 6):
        slot = f"2026-01-05T12:00:0{k}.000Z"
        assert db.jobstatuses.count_documents({"operation": "fast", "scheduledFor": slot}) == 1
    # a claimer that made its job, then died before recording it or moving `lastSlotMs` on
    clock.now = T0 + timedelta(seconds=6, milliseconds=100)
    slot, slot_ms = "2026-01-05T12:00:06.000Z", int((T0 + timedelta(seconds=6)).timestamp() * 1000)
    made, _ = runtimes[0].jobs.start("fast", {}, trusted=True, trigger="schedule",
                                     scheduled_for=slot)  # fmt: skip
    wait_for(lambda: _ended(runtimes[0], made.jobId), timeout=60)
    db.scheduleslots.insert_one({"_id": f"fast|{slot_ms}", "operation": "fast", "slotMs": slot_ms,
                                 "slot": slot, "outcome": "claimed", "by": "dead", "missed": 0,
                                 "catchUp": False, "claimedMs": 0})  # fmt: skip
    rescued = _tick_all(runtimes)
    assert rescued and {(c["outcome"], c["jobId"]) for c in rescued} == {("started", made.jobId)}
    assert db.jobstatuses.count_documents({"operation": "fast", "scheduledFor": slot}) == 1
    assert db.schedules.find_one({"_id": "fast"})["lastSlotMs"] == slot_ms
