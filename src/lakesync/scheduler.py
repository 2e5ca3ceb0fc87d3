"""The scheduler: starts each due slot of each scheduled operation exactly once, anywhere.

Every `lakesync serve` and every `lakesync worker` runs one. Twice a second it computes,
for each scheduled operation that is not paused, the latest slot at or before now (all
processes compute the same slots, see schedules.py) and claims it by inserting
`{operation, slotMs}` into `scheduleslots`, whose unique index lets exactly one insert win
across processes, restarts and clock skew. The winner starts the job (`trigger:
"schedule"`, `scheduledFor: <slot>`); if the operation is still running, the single-flight
key refuses a second job and the slot is recorded as `skipped`.

A claim that stays `claimed` for CLAIM_STALE_SECONDS (its process died between the claim
and the job's creation) is taken over by compare-and-swap and its job started then; the
job is created under the slot's idempotency key, so the claimer and its rescuer, should
both be alive after all, still make one job.

Only the latest slot is ever claimed: after downtime, the first process up runs one
catch-up (`catchUp: true`, `missed: N`), not one per missed slot. `schedules` keeps each
operation's state: paused or not, the slot it was first seen or unpaused at (earlier slots
never run) and the last slot claimed.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from pymongo import DESCENDING
from pymongo.collection import Collection
from pymongo.errors import DuplicateKeyError

from lakesync.config import Settings
from lakesync.errors import JobError, LakesyncError
from lakesync.jobstore import JobStore
from lakesync.models import utcnow
from lakesync.operations import COPY_TASKDETAIL, Operation, OperationInfo, OperationRegistry
from lakesync.schedules import Schedule, slot_iso, zone_name

if TYPE_CHECKING:
    from lakesync.service import JobService

logger = logging.getLogger(__name__)

TICK_SECONDS = 0.5
CLAIM_STALE_SECONDS = 60  # a claim left this long without its job: its process died

Clock = Callable[[], datetime]


def system_clock() -> datetime:
    """Now, in UTC."""
    return datetime.now(UTC)


def file_clock(path: Any) -> Clock:
    """A clock read from a file holding epoch seconds (LAKESYNC_SCHEDULER_CLOCK_FILE, tests)."""

    def now() -> datetime:
        with open(path) as f:
            return datetime.fromtimestamp(float(f.read().strip()), UTC)

    return now


def _ms(when: datetime) -> int:
    return int(when.timestamp() * 1000)


def _at(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC)


class Scheduler:
    """Claims and starts due slots; pauses, resumes and describes schedules."""

    def __init__(
        self,
        settings: Settings,
        registry: OperationRegistry,
        store: JobStore,
        jobs: JobService,
        clock: Clock | None = None,
        owner: str = "",
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.store = store
        self.jobs = jobs
        if clock is None:
            path = settings.scheduler_clock_file
            clock = system_clock if path is None else file_clock(path)
        self.clock = clock
        self.owner = owner
        self.states: Collection[dict[str, Any]] = store.db["schedules"]
        self.slots: Collection[dict[str, Any]] = store.db["scheduleslots"]
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._errors: dict[str, str] = {}  # the last error logged per schedule

    def schedule_of(self, op: Operation) -> Schedule | None:
        """The operation's schedule (the built-in one's comes from the settings)."""
        s = self.settings
        if op.name == COPY_TASKDETAIL.name and s.schedule is not None:
            return Schedule.parse(s.schedule, s.schedule_timezone, s.schedule_mode)
        if op.schedule is None and op.every is None:
            return None
        return Schedule(
            cron=op.schedule, every=op.every, timezone=op.timezone, allowEmpty=op.allowEmpty
        )

    def scheduled(self) -> list[tuple[Operation, Schedule]]:
        """Every operation that has a schedule, with it."""
        return [(op, s) for op in self.registry.all() if (s := self.schedule_of(op)) is not None]

    # -- running -------------------------------------------------------------------------

    def start(self) -> None:
        """Create the indexes and tick in a background thread (only if anything is scheduled)."""
        if not self.scheduled() or self._thread is not None:
            return
        self.ensure_indexes()
        names = ", ".join(f"{op.name} ({s.text})" for op, s in self.scheduled())
        logger.info("scheduler started: %s", names)
        self._thread = threading.Thread(target=self._loop, name="lakesync-scheduler", daemon=True)
        self._thread.start()

    def ensure_indexes(self) -> None:
        """One run per operation and slot; slot records expire with the job statuses."""
        ttl = int(self.settings.status_ttl_days * 86400)
        self.slots.create_index([("operation", 1), ("slotMs", 1)], unique=True, name="one_run")
        self.slots.create_index("claimedAt", expireAfterSeconds=ttl)

    def stop(self) -> None:
        """Stop ticking (a slot being started finishes first)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception as e:  # MongoDB away, clock file half-written: next tick
                logger.warning("scheduler tick failed: %s", e)
            self._stop.wait(TICK_SECONDS)

    def tick(self) -> list[dict[str, Any]]:
        """One pass: claim and start every due slot; returns the slots this process claimed."""
        scheduled = self.scheduled()
        if not scheduled:
            return []
        now = self.clock()
        names = [op.name for op, _ in scheduled]
        states = {d["_id"]: d for d in self.states.find({"_id": {"$in": names}})}
        claimed = []
        for op, schedule in scheduled:
            if self._stop.is_set():
                break
            try:  # one schedule's trouble is recorded on it and never stops another
                done = self._tick_one(op, schedule, states.get(op.name), now)
            except Exception as e:
                self._failed(op.name, e)
                continue
            if states.get(op.name, {}).get("error"):
                self._recovered(op.name)
            if done is not None:
                claimed.append(done)
        return claimed

    def _tick_one(
        self, op: Operation, schedule: Schedule, state: dict[str, Any] | None, now: datetime
    ) -> dict[str, Any] | None:
        """Claim and start the operation's due slot, if any."""
        state = state or self._state(op.name, now)
        if state.get("paused"):
            return None
        slot = schedule.latest(now)
        since, last = int(state.get("sinceMs", 0)), int(state.get("lastSlotMs", 0))
        if _ms(slot) < since or _ms(slot) <= last:
            return self._rescue(op, schedule, last) if last >= since > 0 else None
        return self._fire(op, schedule, slot, _at(max(since - 1, last)))

    def _failed(self, name: str, error: Exception) -> None:
        """Record a schedule's error on its state (shown by `schedules` and the API), and
        log it once per distinct error rather than twice a second."""
        reason = f"{type(error).__name__}: {error}"[:500]
        if self._errors.get(name) != reason:
            logger.error("schedule of %s: %s (other schedules go on)", name, reason)
        self._errors[name] = reason
        with contextlib.suppress(Exception):  # MongoDB away: the log line says it all
            self.states.update_one(
                {"_id": name}, {"$set": {"error": reason, "errorAt": slot_iso(self.clock())}}
            )

    def _recovered(self, name: str) -> None:
        if self._errors.pop(name, None) is not None:
            logger.info("schedule of %s: working again", name)
        self.states.update_one({"_id": name}, {"$unset": {"error": "", "errorAt": ""}})

    def _state(self, name: str, now: datetime) -> dict[str, Any]:
        """The operation's schedule state, created on first sight: earlier slots never run."""
        doc = {"_id": name, "paused": False, "sinceMs": _ms(now), "lastSlotMs": 0}
        try:
            self.states.insert_one(dict(doc))
            logger.info("schedule of %s: first seen; runs from %s on", name, slot_iso(now))
        except DuplicateKeyError:
            doc = self.states.find_one({"_id": name}) or doc
        return doc

    def _fire(
        self, op: Operation, schedule: Schedule, slot: datetime, previous: datetime
    ) -> dict[str, Any] | None:
        """Claim `slot` of `op`; if this process won it, start the job (or record the skip)."""
        when = slot_iso(slot)
        missed = schedule.missed(previous, slot) if previous.timestamp() > 0 else 0
        claim = {
            "_id": f"{op.name}|{_ms(slot)}",
            "operation": op.name,
            "slotMs": _ms(slot),
            "slot": when,
            "outcome": "claimed",
            "by": self.owner,
            "claimedAt": utcnow(),
            "claimedMs": int(time.time() * 1000),
            "catchUp": missed > 0,
            "missed": missed,
        }
        try:
            self.slots.insert_one(dict(claim))
        except DuplicateKeyError:  # another process has it; it may have died before this:
            self._claimed(op.name, _ms(slot))
            return self._rescue(op, schedule, _ms(slot))
        self._claimed(op.name, _ms(slot))
        return self._start(op, schedule, claim)

    def _claimed(self, name: str, slot_ms: int) -> None:
        """Record that the operation's slots up to `slot_ms` are claimed (never lowered)."""
        self.states.update_one(
            {"_id": name, "lastSlotMs": {"$lt": slot_ms}}, {"$set": {"lastSlotMs": slot_ms}}
        )

    def _rescue(self, op: Operation, schedule: Schedule, slot_ms: int) -> dict[str, Any] | None:
        """Start the job of the operation's latest slot if its claimer died before it could."""
        stale = int(time.time() * 1000) - CLAIM_STALE_SECONDS * 1000
        query = {"operation": op.name, "slotMs": slot_ms, "outcome": "claimed"}
        claim = self.slots.find_one({**query, "claimedMs": {"$lt": stale}})
        if claim is None:
            return None
        taken = {"by": self.owner, "claimedMs": int(time.time() * 1000), "rescued": True}
        won = self.slots.update_one(
            {"_id": claim["_id"], "outcome": "claimed", "claimedMs": claim["claimedMs"]},
            {"$set": taken},
        )
        if won.modified_count != 1:
            return None  # another process rescued it first
        made = self.store.jobs.find_one(
            {"operation": op.name, "trigger": "schedule", "scheduledFor": claim["slot"]},
            {"jobId": 1},
        )
        if made is not None:  # its claimer made the job, then died before saying so
            result = {"outcome": "started", "jobId": made["jobId"]}
            self.slots.update_one({"_id": claim["_id"]}, {"$set": result})
            return {**claim, **taken, **result}
        logger.warning(
            "schedule of %s: slot %s was claimed by %s, which never started its "
            "job (it died?); starting it now",
            op.name,
            claim["slot"],
            claim["by"],
        )
        return self._start(op, schedule, {**claim, **taken})

    def _start(self, op: Operation, schedule: Schedule, claim: dict[str, Any]) -> dict[str, Any]:
        """Start the job of a claimed slot (or record why not) and record the outcome."""
        when, missed = claim["slot"], claim["missed"]
        mode = schedule.mode or op.mode
        options: dict[str, Any] = {"mode": schedule.mode} if schedule.mode else {}
        if mode == "mirror" and schedule.allowEmpty:
            options["allowEmpty"] = True
        result: dict[str, Any]
        try:
            status, created = self.jobs.start(
                op.name,
                options,
                f"schedule|{claim['_id']}",  # one job per slot, rescued too
                trusted=True,
                trigger="schedule",
                scheduled_for=when,
            )
        except Exception as e:  # recorded, so that the slot is not rescued again and again
            logger.error("schedule of %s: slot %s could not start: %s", op.name, when, e)
            result = {"outcome": "error", "reason": str(e)[:1000]}
        else:
            if created:
                late = (
                    f" (catch-up: {missed} slot(s) missed while no process ran)" if missed else ""
                )
                logger.info(
                    "job %s: started by the schedule of %s for slot %s%s",
                    status.jobId,
                    op.name,
                    when,
                    late,
                    extra={"jobId": status.jobId, "operation": op.name},
                )
                result = {"outcome": "started", "jobId": status.jobId}
            elif status.scheduledFor == when and status.trigger == "schedule":
                result = {"outcome": "started", "jobId": status.jobId}  # the claimer made it
            else:
                reason = f"job {status.jobId} was still {status.status.value}"
                logger.warning("schedule of %s: slot %s skipped: %s", op.name, when, reason)
                result = {"outcome": "skipped", "jobId": status.jobId, "reason": reason}
        self.slots.update_one({"_id": claim["_id"]}, {"$set": result})
        return {**claim, **result}

    # -- pausing and showing -------------------------------------------------------------

    def _scheduled_op(self, name: str) -> tuple[Operation, Schedule]:
        op = self.registry.get(name)
        schedule = self.schedule_of(op)
        if schedule is None:
            how = (
                "LAKESYNC_SCHEDULE"
                if name == COPY_TASKDETAIL.name
                else "`schedule` or `every` in lakesync.toml"
            )
            raise JobError(
                f"Operation {name!r} has no schedule to pause or resume; give it one with {how}.",
                operation=name,
            )
        return op, schedule

    def pause(self, name: str) -> dict[str, Any]:
        """Stop starting the operation's slots until unpaused; its description."""
        op, _ = self._scheduled_op(name)
        self._state(name, self.clock())
        self.states.update_one({"_id": name}, {"$set": {"paused": True}})
        logger.info("schedule of %s paused", name)
        return self.describe(op) or {}

    def unpause(self, name: str) -> dict[str, Any]:
        """Start the operation's slots again, from now on (slots passed while paused never run)."""
        op, _ = self._scheduled_op(name)
        now = self.clock()
        self._state(name, now)
        self.states.update_one({"_id": name}, {"$set": {"paused": False, "sinceMs": _ms(now)}})
        logger.info("schedule of %s resumed", name)
        return self.describe(op) or {}

    def describe(self, op: Operation) -> dict[str, Any] | None:
        """The operation's schedule, paused or not, next run, last run, its result and the
        schedule's last error (if it is failing now)."""
        schedule = self.schedule_of(op)
        if schedule is None:
            return None
        state = self.states.find_one({"_id": op.name}) or {}
        try:
            at = schedule.after(self.clock())
            upcoming, zone = slot_iso(at), zone_name(at, schedule.timezone)
        except Exception as e:  # a schedule that cannot say when it fires: shown, not a 500
            upcoming, state["error"] = None, state.get("error") or f"{type(e).__name__}: {e}"
            zone = None
        paused = bool(state.get("paused"))
        last = next(
            iter(
                self.slots.find({"operation": op.name}, {"_id": 0, "claimedAt": 0})
                .sort("slotMs", DESCENDING)
                .limit(1)
            ),
            None,
        )
        if last is not None:
            last.pop("slotMs", None)
            last["result"] = None
            if last.get("jobId"):
                with contextlib.suppress(LakesyncError):  # the job's status may have expired
                    last["result"] = self.store.get(str(last["jobId"])).status.value
        return {
            "schedule": schedule.cron,
            "every": schedule.every,
            "timezone": schedule.timezone,
            "mode": schedule.mode or op.mode,
            "paused": paused,
            "nextRun": None if paused else upcoming,
            # the zone's name at the next run as the CLI prints it (`CET`, not `GMT+1`)
            "nextRunZone": None if paused else zone,
            "lastRun": last,
            "skippedSlots": self.slots.count_documents(
                {"operation": op.name, "outcome": "skipped"}
            ),
            "error": state.get("error"),
        }

    def annotate(self, infos: list[OperationInfo]) -> list[OperationInfo]:
        """Fill in `schedule` and `nextRun` of the operations overview; an operation whose
        schedule cannot be described shows why, and the others are listed all the same."""
        for info in infos:
            try:
                described = self.describe(self.registry.get(info.name))
            except Exception as e:
                logger.warning("schedule of %s cannot be described: %s", info.name, e)
                described = {"error": f"{type(e).__name__}: {e}"[:500], "nextRun": None}
            info.schedule = described
            info.nextRun = described["nextRun"] if described else None
        return infos
