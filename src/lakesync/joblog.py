"""A job's own log: the INFO-and-above lines its runs log, kept in `joblogs` beside the job.

`JobLogHandler` sits on the root logger of every process that runs jobs. A line logged
inside `job_context` (or with a `jobId` extra) is queued and written by one background
thread, so a batch never waits for its log line. Each job keeps at most `MAX_LINES`
lines (the first ones, then the warnings and errors, then one line saying how many were
left out); the lines expire with the job statuses (a TTL index on `time`).
"""

from __future__ import annotations

import contextlib
import logging
import queue
import re
import threading
from datetime import UTC, datetime
from typing import Any

from pymongo import ASCENDING
from pymongo.collection import Collection
from pymongo.database import Database
from pymongo.errors import PyMongoError

from lakesync.logs import JobFields
from lakesync.masking import masked

#: a run's owner id (lease.run_owner: host:pid:suffix:thread:suffix), or a process's
_OWNER = re.compile(r"[\w.-]+:\d+:[0-9a-f]{6}(?::\d+:[0-9a-f]{4})?")

MAX_LINES = 500
#: after MAX_LINES, warnings and errors still go in, up to this many in all
MAX_LINES_HARD = 1000
FLUSH_SECONDS = 0.25
_QUIET = ("pymongo", "lakesync.joblog")


def log_collection(db: Database[dict[str, Any]]) -> Collection[dict[str, Any]]:
    """The `joblogs` collection."""
    return db["joblogs"]


def ensure_indexes(db: Database[dict[str, Any]], ttl_days: float) -> None:
    """Lines by job in order; they expire with the statuses (LAKESYNC_STATUS_TTL_DAYS)."""
    coll = log_collection(db)
    coll.create_index([("jobId", ASCENDING), ("seq", ASCENDING)])
    seconds = int(ttl_days * 86400)
    for index in coll.list_indexes():
        if dict(index["key"]) == {"time": 1} and index.get("expireAfterSeconds") != seconds:
            coll.drop_index(index["name"])
    coll.create_index("time", expireAfterSeconds=seconds)


def read_lines(
    db: Database[dict[str, Any]], job_id: str, limit: int = MAX_LINES_HARD
) -> list[dict[str, Any]]:
    """The job's lines in the order they were logged: time (ISO, Z), level, message..."""
    found = (
        log_collection(db)
        .find({"jobId": job_id}, {"_id": 0, "seq": 0})
        .sort([("time", ASCENDING), ("seq", ASCENDING)])
        .limit(limit)
    )
    out = []
    for doc in found:
        when = doc.get("time")
        if isinstance(when, datetime):
            if when.tzinfo is None:
                when = when.replace(tzinfo=UTC)
            doc["time"] = when.isoformat(timespec="milliseconds").replace("+00:00", "Z")
        doc["message"] = tidy(str(doc.get("message", "")), job_id)
        if doc.get("cause"):
            doc["cause"] = tidy(str(doc["cause"]), job_id, capital=False)
        out.append(doc)
    return out


def tidy(message: str, job_id: str, *, capital: bool = True) -> str:
    """A line of one job's own log, told without what every line of it would repeat: the
    job's id (`job X: run 1 started` is `Run 1 started`) and the owner ids of its runs."""
    text = message
    for prefix in (f"job {job_id}: ", f"job {job_id} "):
        if text.startswith(prefix):
            text = text[len(prefix) :]
            break
    text = text.replace(f" of job {job_id}", "").replace(f" of Job {job_id}", "")
    text = text.replace(f"Job {job_id}", "The job").replace(f"job {job_id}", "the job")
    text = _OWNER.sub("this run", text)
    head, colon, rest = text.partition(": ")
    if colon and rest.strip().rstrip(".").lower() == head.lower():  # "failed: Failed"
        text = head
    return text[:1].upper() + text[1:] if capital else text


class JobLogHandler(logging.Handler):
    """Copies the job lines of this process into `joblogs` (bounded per job, never blocking)."""

    def __init__(self, db: Database[dict[str, Any]], level: int = logging.INFO) -> None:
        super().__init__(level)
        self.coll = log_collection(db)
        self.addFilter(JobFields())
        self._queue: queue.SimpleQueue[dict[str, Any] | None] = queue.SimpleQueue()
        self._counts: dict[str, int] = {}
        self._thread = threading.Thread(target=self._write, name="joblog", daemon=True)
        self._thread.start()

    def emit(self, record: logging.LogRecord) -> None:
        job_id = getattr(record, "jobId", None)
        if not isinstance(job_id, str) or record.name.startswith(_QUIET):
            return
        try:
            line: dict[str, Any] = {
                "jobId": job_id,
                "time": datetime.fromtimestamp(record.created, UTC),
                "level": record.levelname.lower(),
                "logger": record.name,
                "message": masked(record.getMessage())[:4000],
                "process": record.process,
                "thread": record.threadName,
            }
            if record.exc_info and record.exc_info[1] is not None:
                cause = record.exc_info[1]
                line["cause"] = masked(f"{type(cause).__name__}: {cause}")[:2000]
            self._queue.put(line)
        except Exception:
            self.handleError(record)

    def _write(self) -> None:
        stop = False
        while not stop:
            first = self._queue.get()
            lines = []
            if first is None:
                stop = True
            else:
                lines.append(first)
            while True:
                try:
                    more = self._queue.get(timeout=FLUSH_SECONDS if not stop else 0.01)
                except queue.Empty:
                    break
                if more is None:
                    stop = True
                    continue
                lines.append(more)
                if len(lines) >= 200:
                    break
            if lines:
                self._insert(lines)

    def _insert(self, lines: list[dict[str, Any]]) -> None:
        kept = []
        for line in lines:
            job_id = line["jobId"]
            if job_id not in self._counts:
                try:  # other processes' runs of the job count towards its bound too
                    self._counts[job_id] = self.coll.count_documents({"jobId": job_id})
                except PyMongoError:
                    self._counts[job_id] = 0
            n = self._counts[job_id]
            important = line["level"] in ("warning", "error", "critical")
            if n >= MAX_LINES_HARD or (n >= MAX_LINES and not important):
                continue
            if n == MAX_LINES - 1:
                line = {
                    **line,
                    "level": "warning",
                    "logger": "lakesync.joblog",
                    "message": f"{line['message']} (the log keeps {MAX_LINES} lines of a "
                    "job; later ones are left out except warnings and errors)",
                }
            self._counts[job_id] = n + 1
            line["seq"] = n + 1
            kept.append(line)
        if len(self._counts) > 10_000:
            self._counts.clear()
        if kept:
            # the log is best effort: the job's own status is what counts
            with contextlib.suppress(PyMongoError):
                self.coll.insert_many(kept, ordered=False)

    def close(self) -> None:
        """Write what is queued, then stop the writer (at most a few seconds)."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join(5.0)
        super().close()


def install(db: Database[dict[str, Any]]) -> JobLogHandler:
    """Add a handler for `db` to the root logger; `uninstall` removes it."""
    handler = JobLogHandler(db)
    logging.getLogger().addHandler(handler)  # the root level (configure_logging) still applies
    return handler


def uninstall(handler: JobLogHandler) -> None:
    """Remove the handler and write what it still holds."""
    logging.getLogger().removeHandler(handler)
    handler.close()
