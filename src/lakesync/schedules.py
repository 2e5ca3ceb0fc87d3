"""Schedules and notification targets as declared: cron or interval slots, and webhook URLs.

An operation in lakesync.toml may carry (the built-in one takes them from LAKESYNC_SCHEDULE,
LAKESYNC_SCHEDULE_TIMEZONE, LAKESYNC_SCHEDULE_MODE, LAKESYNC_NOTIFY, LAKESYNC_NOTIFY_ON)::

    schedule = "*/15 * * * *"   # 5-field cron, in `timezone` (default UTC); or
    every = "15m"               # an interval: s, m, h, d, combined as in "1h30m"
    timezone = "Europe/Berlin"
    notify = ["https://hooks.example.com/lakesync"]
    on = ["failed", "completed"]   # outcomes that notify (default: failed)
    allowEmpty = false             # mirror only: what a scheduled run may do to an empty lake

A slot is a point in time a schedule fires at. Every process computes the same slots
(interval slots are multiples of the interval since the epoch, cron slots come from
croniter), so a slot names one run whichever process claims it (see scheduler.py).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import CroniterError, croniter
from pydantic import BaseModel, Field, field_validator

from lakesync.masking import masked

Outcome = Literal["completed", "failed", "cancelled"]

_DURATION = re.compile(r"(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?")
_MISSED_CAP = 1000  # counting missed cron slots stops here
#: the range of `every`: a second at least (the scheduler ticks twice a second), a leap
#: year at most (longer intervals are a cron's job, and are mostly typos)
EVERY_MIN_SECONDS = 1
EVERY_MAX_SECONDS = 366 * 86400
#: a cron whose next (or previous) slot is further away than this never fires: February
#: 30th, or April 31st. Eight years cover every February 29th (none in 2100)
CRON_HORIZON_YEARS = 8


def parse_every(text: str) -> timedelta:
    """A duration such as "15m", "1h30m", "1s" or "2d"; ValueError naming the accepted form."""
    found = _DURATION.fullmatch(text.strip())
    if not text.strip() or found is None:
        raise ValueError(
            f"{text!r} is not a duration; write a number with a unit s, m, h or d, "
            'e.g. "30s", "15m", "1h30m" or "1d"'
        )
    d, h, m, s = (int(g or 0) for g in found.groups())
    seconds = ((d * 24 + h) * 60 + m) * 60 + s  # Python ints: "99999999999999999999d" fits
    if seconds < EVERY_MIN_SECONDS:
        raise ValueError(f"{text!r} is too short; the shortest interval is 1s")
    if seconds > EVERY_MAX_SECONDS:
        raise ValueError(
            f"{text!r} is too long; the longest interval is 366d (use `schedule` with a "
            'cron expression for yearly runs, e.g. "0 3 1 1 *")'
        )
    return timedelta(seconds=seconds)


def check_cron(text: str) -> str:
    """A 5-field cron expression (minute hour day month weekday), or ValueError."""
    fields = text.split()
    if len(fields) != 5:
        raise ValueError(
            f"{text!r} is not a 5-field cron expression (minute hour day-of-month month "
            f'day-of-week), e.g. "*/15 * * * *"; use `every` for intervals in seconds'
        )
    expr = " ".join(fields)
    if not croniter.is_valid(expr):
        raise ValueError(f'{text!r} is not a valid cron expression, e.g. "0 2 * * *"')
    now = datetime.now(UTC)
    try:
        _cron(expr, now).get_next(datetime)
        _cron(expr, now).get_prev(datetime)
    except (CroniterError, OverflowError, ValueError):
        raise ValueError(
            f"{text!r} never fires: no date matches it in the next {CRON_HORIZON_YEARS} years "
            '(e.g. February 31st); check the day and month fields, e.g. "0 0 28 2 *"'
        ) from None
    return expr


def _cron(expr: str, start: datetime) -> croniter:
    """croniter over `expr` from `start`, giving up after CRON_HORIZON_YEARS without a slot."""
    return croniter(expr, start, max_years_between_matches=CRON_HORIZON_YEARS)


def check_timezone(text: str) -> str:
    """An IANA time zone name such as "Europe/Berlin", or ValueError."""
    try:
        ZoneInfo(text)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(
            f'{text!r} is not a known time zone; use an IANA name such as "UTC" or "Europe/Berlin"'
        ) from None
    return text


def check_webhook(url: str) -> str:
    """An http(s) URL with a host (and maybe `user:password@`, sent as Basic auth), or
    ValueError (the password masked)."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - a port that is not a number raises here
        ok = parts.scheme in ("http", "https") and bool(parts.hostname)
    except ValueError:
        ok = False
    if not ok or any(c.isspace() for c in url):
        raise ValueError(
            f"{masked(url)!r} is not an http(s) URL; webhooks are POSTed to http(s) URLs "
            '(credentials as "https://user:password@host/path" are sent as Basic auth)'
        )
    return url


def _failed_only() -> list[Outcome]:
    return ["failed"]


class Unattended(BaseModel):
    """The schedule and notification fields an operation may declare."""

    schedule: str | None = None
    every: str | None = None
    timezone: str = "UTC"
    allowEmpty: bool | None = None
    notify: list[str] = Field(default_factory=list)
    on: list[Outcome] = Field(default_factory=_failed_only)

    @field_validator("schedule")
    @classmethod
    def _cron(cls, value: str | None) -> str | None:
        return None if value is None else check_cron(value)

    @field_validator("every")
    @classmethod
    def _every(cls, value: str | None) -> str | None:
        if value is not None:
            parse_every(value)
        return value

    @field_validator("timezone")
    @classmethod
    def _zone(cls, value: str) -> str:
        return check_timezone(value)

    @field_validator("notify")
    @classmethod
    def _urls(cls, value: list[str]) -> list[str]:
        return [check_webhook(url) for url in value]


def check_unattended(cfg: Any, fail: Callable[[str], Exception]) -> None:
    """Combinations pydantic cannot see field by field (`cfg` is an OperationConfig)."""
    if cfg.schedule is not None and cfg.every is not None:
        raise fail("declare either schedule (cron) or every (interval), not both.")
    scheduled = cfg.schedule is not None or cfg.every is not None
    if scheduled and cfg.mode == "mirror" and cfg.allowEmpty is None:
        raise fail(
            "allowEmpty: a scheduled mirror deletes every record when the lake turns up "
            "empty only with allowEmpty = true; declare allowEmpty = false (refuse and fail "
            "the run) or true (an empty lake empties the collection)."
        )
    if cfg.allowEmpty is not None and cfg.mode != "mirror":
        raise fail(f"allowEmpty only applies to mode mirror; this operation's mode is {cfg.mode}.")


@dataclass(frozen=True)
class Schedule:
    """When an operation runs by itself: a cron expression or an interval, in a time zone."""

    cron: str | None = None
    every: str | None = None
    timezone: str = "UTC"
    mode: str | None = None  # the options.mode of scheduled jobs (None: the operation's)
    allowEmpty: bool | None = None

    @classmethod
    def parse(cls, text: str, timezone: str = "UTC", mode: str | None = None) -> Schedule:
        """LAKESYNC_SCHEDULE: a duration ("15m") or a cron expression."""
        if _DURATION.fullmatch(text.strip()) and text.strip():
            parse_every(text)
            return cls(every=text.strip(), timezone=timezone, mode=mode)
        return cls(cron=check_cron(text), timezone=timezone, mode=mode)

    @property
    def text(self) -> str:
        """The schedule as declared, e.g. "*/15 * * * *" or "every 15m"."""
        return self.cron if self.cron is not None else f"every {self.every}"

    def latest(self, now: datetime) -> datetime:
        """The most recent slot at or before `now` (UTC)."""
        if self.every is not None:
            step = int(parse_every(self.every).total_seconds())
            epoch = int(now.timestamp())
            return datetime.fromtimestamp(epoch - epoch % step, UTC)
        # croniter's previous slot is strictly before its start: a second past `now`, whole
        # seconds only (cron slots are), so that a slot due exactly now counts and one due
        # in 0.8 s does not
        local = now.astimezone(ZoneInfo(self.timezone)).replace(microsecond=0)
        local += timedelta(seconds=1)
        found: datetime = _cron(str(self.cron), local).get_prev(datetime)
        return found.astimezone(UTC)

    def after(self, slot: datetime) -> datetime:
        """The first slot strictly after `slot` (UTC)."""
        if self.every is not None:
            return self.latest(slot) + parse_every(self.every)
        local = slot.astimezone(ZoneInfo(self.timezone))
        found: datetime = _cron(str(self.cron), local).get_next(datetime)
        return found.astimezone(UTC)

    def missed(self, since: datetime, slot: datetime) -> int:
        """Slots strictly between `since` and `slot` (a count, capped for cron)."""
        if slot <= since:
            return 0
        if self.every is not None:
            step = parse_every(self.every).total_seconds()
            return max(0, int((slot - self.latest(since)).total_seconds() // step) - 1)
        count, current = 0, self.after(since)
        while current < slot and count < _MISSED_CAP:
            count, current = count + 1, self.after(current)
        return count


def slot_iso(slot: datetime) -> str:
    """A slot as the contract writes times: ISO 8601 UTC ending in Z."""
    return slot.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def zone_name(at: datetime, zone: str) -> str:
    """The name a person reads for `zone` at the time `at`: its abbreviation as the time
    zone database has it (`CET` in winter, `CEST` in summer for Europe/Berlin; `-03` where
    the zone has none), the zone itself if it has no name. The CLI prints it and the API
    gives it (`nextRunZone`) to the page, whose browser may only know `GMT+1`."""
    return at.astimezone(ZoneInfo(zone)).tzname() or zone
