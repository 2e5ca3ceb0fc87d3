"""Job notifications: a durable outbox of webhook deliveries, sent by any lakesync process.

When a job ends, the write that ends it also sets `notifyDue` on its status (jobstore.py):
that flag is how a job's end reaches the outbox, so the job's path never hands its status
here. The process that ended it wakes its dispatcher (`Notifier.job_ended`), which at once
turns every flagged end into one `notifications` document per receiver (the outbox), then
clears the flag. A process that dies in between leaves the flag set: every dispatcher also
sweeps flagged jobs into the outbox every few seconds, so no end goes unnotified. A
delivery's id is derived from the job, the end and the receiver, so writing it twice makes
one document.

Every serve and worker runs a dispatcher (other processes start one when they end a job).
It claims due deliveries with the lease primitive (lease.py): `pending` -> `in_progress`
(owned, heartbeating while the request runs) -> `delivered` | `given_up`, or back to
`pending` with the next retry time. A delivery whose process died mid-request is taken over
once its lease is silent, so each is sent at least once, always under the same id. Each
receiver has its own queue and RECEIVER_CONCURRENCY slots: a hanging receiver holds only its
own slots.

Each POST carries the job's final status (secrets masked) and, as Standard Webhooks have it,
`webhook-id` (the delivery id, the same on every retry), `webhook-timestamp` (Unix seconds of
this attempt) and, with LAKESYNC_WEBHOOK_SECRET, `webhook-signature`: `v1,` + base64 of
HMAC-SHA256(secret, f"{id}.{timestamp}.{body}"); a secret `whsec_<base64>` is the decoded
bytes, any other text its UTF-8 bytes. Credentials in a webhook URL (`https://user:pw@host/`)
are sent as HTTP Basic auth and never shown. A timeout, a connection error or an answer 408,
425, 429 or 5xx is retried with exponential backoff (LAKESYNC_WEBHOOK_RETRIES times); any
other answer, or the last failure, gives the delivery up, logged with the job id.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import http.client
import json
import logging
import random
import ssl
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

from pymongo import ASCENDING
from pymongo.collection import Collection
from pymongo.database import Database
from pymongo.errors import DuplicateKeyError

from lakesync import __version__
from lakesync.config import Settings
from lakesync.errors import LakesyncError, LeaseLost
from lakesync.lease import IN_PROGRESS, PENDING, Heartbeat, Leases, run_owner
from lakesync.logs import job_context
from lakesync.masking import masked
from lakesync.models import FINAL_STATES, JobStatus, utcnow
from lakesync.operations import OperationRegistry
from lakesync.signing import sign, signing_key

logger = logging.getLogger(__name__)

NOTIFICATIONS = "notifications"
DELIVERED, GIVEN_UP = "delivered", "given_up"
BACKOFF_SECONDS = 0.5  # first retry after about this long, then doubling (with jitter)
BACKOFF_CAP_SECONDS = 300.0
RECEIVER_CONCURRENCY = 2  # requests in flight per receiver and process
LEASE_SECONDS = 5.0  # a delivery silent this long (its process died) is taken over
POLL_SECONDS = 0.5  # while deliveries are under way (retries come due)
IDLE_POLL_SECONDS = 2.0  # with nothing under way here (a job ending here wakes it at once)
SWEEP_SECONDS = 3.0  # how often ended jobs whose outbox write was lost are looked for
_RETRYABLE = {408, 425, 429}
_BASE32 = "0123456789abcdefghjkmnpqrstvwxyz"
_TLS = ssl.create_default_context()


def payload(status: JobStatus) -> bytes:
    """The status document as sent: the API's JSON with every secret masked."""
    return json.dumps(masked(status.public()), separators=(",", ":")).encode()


def shown(url: str) -> str:
    """A webhook for logs: scheme and host only (paths of chat webhooks hold their token)."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}/..."


def receiver_key(url: str) -> str:
    """A receiver's name in the outbox: a digest of its URL (which may hold credentials)."""
    return hashlib.sha256(url.encode()).hexdigest()[:24]


def delivery_id(job_id: str, ended: datetime | None, url: str) -> str:
    """`webhook-id`: one per job end and receiver, whichever process computes it."""
    end_ms = int(ended.timestamp() * 1000) if ended is not None else 0
    digest = hashlib.sha256(f"{job_id}|{end_ms}|{url}".encode()).digest()
    number = int.from_bytes(digest[:17], "big")
    return "msg_" + "".join(_BASE32[(number >> (5 * i)) & 31] for i in range(26))


def split_credentials(url: str) -> tuple[str, str | None]:
    """(the URL without `user:password@`, the Basic `Authorization` value or None)."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url, None
    userinfo, _, host = parts.netloc.rpartition("@")
    user, _, password = userinfo.partition(":")
    token = base64.b64encode(f"{unquote(user)}:{unquote(password)}".encode()).decode()
    return urlunsplit(parts._replace(netloc=host)), f"Basic {token}"


@dataclass
class _Receiver:
    """One webhook URL: its own pool, so a hanging receiver holds only its own slots."""

    url: str
    pool: ThreadPoolExecutor
    busy: int = 0


class Notifier:
    """Puts the end of each job in the outbox and delivers the outbox's due deliveries."""

    def __init__(
        self,
        settings: Settings,
        registry: OperationRegistry,
        db: Database[dict[str, Any]],
        owner: str,
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.owner = owner
        self.outbox: Collection[dict[str, Any]] = db[NOTIFICATIONS]
        self.jobs: Collection[dict[str, Any]] = db["jobstatuses"]
        self.leases = Leases(self.outbox, "_id")
        secret = settings.signing_key
        self.key = None if secret is None else signing_key(secret.get_secret_value())
        self._receivers: dict[str, _Receiver] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._due = threading.Event()  # a job ended here: collect its end from its flag
        self._collecting = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._mine: set[str] = set()  # deliveries of the ends of jobs this process ended
        #: jobs ended here whose end is not collected yet (the store's `ended_here`)
        self.ended_here: set[str] = set()
        self._inflight: dict[str, str] = {}  # delivery id -> the owner of its attempt
        self._swept = 0.0

    # -- the outbox ------------------------------------------------------------------------

    def ensure_indexes(self) -> None:
        """Due deliveries per receiver; ended ones expire with job statuses; flagged ends."""
        self.outbox.create_index([("receiver", ASCENDING), ("status", ASCENDING), ("nextAtMs", 1)])
        self.outbox.create_index("expireAt", expireAfterSeconds=0)
        self.jobs.create_index("notifyDue", sparse=True)

    def targets(self, operation: str, outcome: str) -> list[str]:
        """The webhooks to call when a job of `operation` ends with `outcome`."""
        try:
            op = self.registry.get(operation)
        except LakesyncError:  # no longer declared: the settings' defaults still apply
            op = None
        if op is not None and op.notify:  # the operation's own list replaces the default
            return list(op.notify) if outcome in op.on else []
        return list(self.settings.notify) if outcome in self.settings.notify_on else []

    def known(self) -> dict[str, str]:
        """Every webhook this process can deliver to, by receiver key."""
        urls = list(self.settings.notify)
        for op in self.registry.all():
            urls.extend(op.notify)
        return {receiver_key(url): url for url in urls}

    def job_ended(self) -> None:
        """A job ended in this process (its end write set `notifyDue`): the dispatcher puts
        its deliveries in the outbox at once, and sends them (returns at once)."""
        self._due.set()
        self.start()
        self._wake.set()

    def _collect(self, lost: bool = False) -> int:
        """Put the flagged ends in the outbox (``lost``: ends whose process died before it
        could); those of jobs that ended here are this process's deliveries (a short command
        drains those only, not another process's found flagged beside them); how many ends
        were found."""
        with self._collecting:
            before = set(self.ended_here)
            found = list(
                self.jobs.find(
                    {"notifyDue": 1, "status": {"$in": list(FINAL_STATES)}}, {"_id": 0}
                ).limit(100)
            )
            for doc in found:
                try:
                    status = JobStatus.model_validate(doc)
                except ValueError:
                    continue
                if lost:
                    logger.info(
                        "job %s: its end was not in the outbox yet; adding it", status.jobId
                    )
                made = self.enqueue(status)
                with self._lock:
                    if status.jobId in self.ended_here:
                        self.ended_here.discard(status.jobId)
                        self._mine.update(made)
                self.jobs.update_one(
                    {"jobId": status.jobId, "status": status.status.value, "notifyDue": 1},
                    {"$unset": {"notifyDue": ""}},
                )
            if len(found) < 100:  # every flagged end: ours not found were collected elsewhere
                self.ended_here.difference_update(before)
            return len(found)

    def enqueue(self, status: JobStatus) -> list[str]:
        """The outbox documents of one job end (idempotent: ids are derived); their ids."""
        urls = self.targets(status.operation, status.status.value)
        if not urls:
            return []
        body = payload(status).decode()
        ids = []
        for url in dict.fromkeys(urls):
            msg_id = delivery_id(status.jobId, status.endTime, url)
            doc: dict[str, Any] = {
                "_id": msg_id,
                "jobId": status.jobId,
                "operation": status.operation,
                "event": f"job.{status.status.value}",
                "receiver": receiver_key(url),
                "target": shown(url),
                "body": body,
                "status": PENDING,
                "attempts": 0,
                "nextAtMs": int(time.time() * 1000),
                "createdAt": utcnow(),
                "createdMs": int(time.time() * 1000),
            }
            with contextlib.suppress(DuplicateKeyError):  # another process wrote it first
                self.outbox.insert_one(doc)
            ids.append(msg_id)
        return ids

    def sweep(self) -> int:
        """Put in the outbox the ends whose process died before it could; how many."""
        return self._collect(lost=True)

    # -- dispatching -----------------------------------------------------------------------

    def start(self) -> None:
        """Run the dispatcher in a background thread (once)."""
        with self._lock:
            if self._thread is not None or self._stop.is_set():
                return
            self._thread = threading.Thread(target=self._loop, name="lakesync-notify", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        busy_until = 0.0
        while not self._stop.is_set():
            try:
                if self.dispatch():
                    busy_until = time.monotonic() + 30  # retries may come due soon
            except Exception as e:  # MongoDB away: try again at the next poll
                logger.warning("webhook dispatcher: %s", masked(str(e))[:300])
            with self._lock:
                busy = bool(self._inflight) or time.monotonic() < busy_until
            self._wake.wait(POLL_SECONDS if busy else IDLE_POLL_SECONDS)
            self._wake.clear()

    def dispatch(self) -> int:
        """One pass: sweep lost ends, take over dead deliveries, claim due ones; how many
        deliveries this pass started."""
        if self._due.is_set():  # a job ended here
            with self._collecting:
                self._due.clear()
                try:
                    if self._collect() == 100:
                        self._due.set()  # more than a pass takes
                except Exception:
                    self._due.set()  # MongoDB away: at the next pass
                    raise
        now = time.monotonic()
        if now - self._swept >= SWEEP_SECONDS:
            self._swept = now
            self.sweep()
            self._take_over()
            self._abandon()
        started = 0
        for key, url in self.known().items():
            receiver = self._receiver(key, url)
            free = RECEIVER_CONCURRENCY - receiver.busy
            if free <= 0:
                continue
            due = self.outbox.find(
                {"receiver": key, "status": PENDING, "nextAtMs": {"$lte": int(time.time() * 1000)}},
                {"_id": 1},
            )
            for found in due.sort("nextAtMs", ASCENDING).limit(free):
                if self._stop.is_set():
                    return started
                owner = run_owner(self.owner)
                doc = self.leases.claim(found["_id"], owner, {"$inc": {"attempts": 1}})
                if doc is None:
                    continue  # another process claimed it first
                with self._lock:
                    receiver.busy += 1
                    self._inflight[found["_id"]] = owner
                receiver.pool.submit(self._attempt, receiver, doc, owner)
                started += 1
        return started

    def _receiver(self, key: str, url: str) -> _Receiver:
        with self._lock:
            found = self._receivers.get(key)
            if found is None:
                pool = ThreadPoolExecutor(RECEIVER_CONCURRENCY, f"lakesync-notify-{key[:6]}")
                found = self._receivers[key] = _Receiver(url, pool)
            return found

    def _take_over(self) -> None:
        """Hand back (pending) the deliveries whose process died mid-request."""
        keys = list(self.known())
        fields = {"_id": 1, "status": 1, "leaseBeat": 1, "heartbeatAt": 1, "heartbeatMs": 1}
        running = list(self.outbox.find({"status": IN_PROGRESS, "receiver": {"$in": keys}}, fields))
        if not running:
            return
        now = self.leases.server_now()
        for doc in running:
            if Leases.expired(doc, LEASE_SECONDS, now) and self.leases.reap(doc["_id"], doc):
                logger.warning(
                    "webhook delivery %s: its process went silent; retrying it", doc["_id"]
                )

    def _abandon(self) -> None:
        """Give up deliveries that stayed pending as long as job statuses are kept: their
        receiver is declared by no running process any more."""
        days = self.settings.status_ttl_days
        old = int((time.time() - days * 86400) * 1000)
        query = {"status": PENDING, "createdMs": {"$lt": old}}
        for doc in list(self.outbox.find(query, {"_id": 1, "jobId": 1, "target": 1}).limit(100)):
            self.outbox.update_one(
                {"_id": doc["_id"], "status": PENDING},
                self._ended({"status": GIVEN_UP, "lastError": f"not sent within {days:g} day(s)"}),
            )
            logger.error(
                "job %s: gave up notifying %s: no process that knows this webhook ran for "
                "%g day(s)",
                doc.get("jobId"),
                doc.get("target"),
                days,
            )

    def _attempt(self, receiver: _Receiver, doc: dict[str, Any], owner: str) -> None:
        """One delivery attempt of a claimed document, and its outcome in the outbox."""
        try:
            with job_context(str(doc.get("jobId")), str(doc.get("operation"))):
                self._attempt_claimed(receiver.url, doc, owner)
        except LeaseLost:
            logger.info("webhook delivery %s: taken over by another process", doc["_id"])
        except Exception as e:  # MongoDB away: the lease expires and another attempt follows
            level = logging.DEBUG if self._stop.is_set() else logging.WARNING  # shut down
            logger.log(level, "webhook delivery %s: %s", doc["_id"], masked(str(e))[:300])
        finally:
            with self._lock:
                receiver.busy -= 1
                self._inflight.pop(doc["_id"], None)
            self._wake.set()

    def _attempt_claimed(self, url: str, doc: dict[str, Any], owner: str) -> None:
        msg_id, job_id, attempt = str(doc["_id"]), doc["jobId"], int(doc["attempts"])
        renew = lambda: bool(self.leases.renew(msg_id, owner)) and False  # noqa: E731
        with Heartbeat(renew, LEASE_SECONDS / 5, f"lakesync-notify-beat-{msg_id[-6:]}"):
            retry, problem = self._post(url, msg_id, doc["event"], doc["body"].encode())
        attempts = self.settings.webhook_retries + 1
        if not problem:
            self.leases.settle(msg_id, owner, DELIVERED, self._ended({"deliveredAt": utcnow()}))
            logger.info("job %s: notified %s (%s)", job_id, shown(url), doc["event"])
        elif retry and attempt < attempts:
            delay = min(BACKOFF_SECONDS * 2 ** (attempt - 1), BACKOFF_CAP_SECONDS)
            delay *= random.uniform(0.8, 1.2)
            update = {"$set": {"nextAtMs": int((time.time() + delay) * 1000), "lastError": problem}}
            self.leases.release(msg_id, owner, update)
            logger.warning(
                "job %s: notifying %s failed (%s); retry %d of %d in %.1f s",
                job_id,
                shown(url),
                problem,
                attempt,
                attempts - 1,
                delay,
            )
        else:
            self.leases.settle(msg_id, owner, GIVEN_UP, self._ended({"lastError": problem}))
            logger.error(
                "job %s: could not notify %s of its end (%s) after %d attempt(s); "
                "gave up (the job's status is unchanged)",
                job_id,
                shown(url),
                problem,
                attempt,
            )

    def _ended(self, fields: dict[str, Any]) -> dict[str, Any]:
        """A final delivery is kept as long as job statuses are, then expires."""
        days = self.settings.status_ttl_days
        return {"$set": {**fields, "expireAt": utcnow() + timedelta(days=days)}}

    def _post(self, url: str, msg_id: str, event: str, body: bytes) -> tuple[bool, str]:
        """One POST: (retryable, problem); problem is "" on a 2xx answer."""
        plain, basic = split_credentials(url)
        timestamp = int(time.time())
        headers = {
            "Content-Type": "application/json",
            "User-Agent": f"lakesync/{__version__}",
            "webhook-id": msg_id,
            "webhook-timestamp": str(timestamp),
            "X-Lakesync-Event": event,
        }
        if self.key is not None:
            headers["webhook-signature"] = sign(self.key, msg_id, timestamp, body)
        if basic is not None:
            headers["Authorization"] = basic
        parts = urlsplit(plain)
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        timeout = self.settings.webhook_timeout
        connection: http.client.HTTPConnection
        if parts.scheme == "https":
            connection = http.client.HTTPSConnection(
                str(parts.hostname), parts.port, timeout=timeout, context=_TLS
            )
        else:
            connection = http.client.HTTPConnection(
                str(parts.hostname), parts.port, timeout=timeout
            )
        try:  # http.client: headers go as written (lower case) and redirects are not followed
            connection.request("POST", path, body=body, headers=headers)
            answer = connection.getresponse()
            answer.read(64 * 1024)
            code = answer.status
        except (OSError, http.client.HTTPException, ValueError) as e:
            return True, masked(f"{type(e).__name__}: {e}")[:200]
        finally:
            connection.close()
        if 200 <= code < 300:
            return False, ""
        return code >= 500 or code in _RETRYABLE, f"HTTP {code}"

    def pending(self, ids: set[str] | None = None) -> int:
        """Deliveries not delivered nor given up yet (of `ids`, or all)."""
        query: dict[str, Any] = {"status": {"$in": [PENDING, IN_PROGRESS]}}
        if ids is not None:
            query["_id"] = {"$in": sorted(ids)}
        return self.outbox.count_documents(query)

    def close(self, timeout: float = 10.0, *, drain: bool = False) -> None:
        """Stop dispatching. With `drain` (a short-lived process), first give the deliveries
        this process put in the outbox up to `timeout` s; the others stay in the outbox for
        the next process, and attempts in flight are handed back at once."""
        with self._collecting:  # after the dispatcher's collection under way, if any
            if drain and self._due.is_set():  # ends the dispatcher has not collected yet
                self._due.clear()
                with contextlib.suppress(Exception):
                    self._collect()
            with self._lock:
                mine = set(self._mine)
        deadline = time.monotonic() + timeout
        if drain and mine and self._thread is not None:
            while time.monotonic() < deadline:
                with contextlib.suppress(Exception):
                    if self.pending(mine) == 0:
                        break
                time.sleep(0.1)
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(max(0.5, min(2.0, deadline - time.monotonic())))
        for receiver in list(self._receivers.values()):
            receiver.pool.shutdown(wait=False, cancel_futures=True)
        with contextlib.suppress(Exception):
            self._hand_back()

    def _hand_back(self) -> None:
        """Attempts still in flight at shutdown go back to the outbox for another process."""
        with self._lock:
            left = dict(self._inflight)
        for msg_id, owner in left.items():
            with contextlib.suppress(LeaseLost):
                self.leases.release(msg_id, owner, {"$set": {"nextAtMs": 0}})
        if left:
            logger.info(
                "%d webhook delivery(ies) in flight handed back to the outbox: another "
                "lakesync process, or the next start, sends them",
                len(left),
            )
