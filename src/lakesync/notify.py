"""Job notifications: the final status document POSTed to webhooks when a job ends.

The store calls `Notifier.job_ended` from the one write that ends a job (so each end is
notified once, by the process that wrote it). Delivery runs on a small thread pool: the
job's outcome is recorded before and never depends on it. Each webhook gets:

- the body: the job status document as JSON, with secrets in sources and messages masked;
- `X-Lakesync-Event: job.<status>` and `X-Lakesync-Delivery: <id>` (the same on retries);
- with LAKESYNC_WEBHOOK_SECRET, `X-Lakesync-Signature-256: sha256=<hex>`, the HMAC-SHA256
  of the body under that secret (compare it in constant time).

A timeout, a connection error or an answer 408, 429 or 5xx is retried with exponential
backoff (LAKESYNC_WEBHOOK_RETRIES times); other answers and exhausted retries are logged
with the job id and given up.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import random
import threading
import urllib.error
import urllib.request
import uuid
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any
from urllib.parse import urlsplit

from lakesync import __version__
from lakesync.config import Settings
from lakesync.errors import LakesyncError
from lakesync.logs import job_context
from lakesync.masking import masked
from lakesync.models import JobStatus
from lakesync.operations import OperationRegistry

logger = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Lakesync-Signature-256"
BACKOFF_SECONDS = 0.5  # first retry after about this long, then doubling (with jitter)
_RETRYABLE = {408, 425, 429}


def sign(secret: str, body: bytes) -> str:
    """The signature header's value: `sha256=` + HMAC-SHA256 of the body, in hex."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def payload(status: JobStatus) -> bytes:
    """The status document as sent: the API's JSON with every secret masked."""
    return json.dumps(masked(status.public()), separators=(",", ":")).encode()


def shown(url: str) -> str:
    """A webhook for logs: scheme and host only (paths of chat webhooks hold their token)."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}/..."


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None  # a redirect is an answer (3xx): the body is never re-sent elsewhere


class Notifier:
    """Sends the end of each job to the webhooks its operation (or the settings) names."""

    def __init__(self, settings: Settings, registry: OperationRegistry) -> None:
        self.settings = settings
        self.registry = registry
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="lakesync-notify")
        self._pending: set[Future[None]] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._opener = urllib.request.build_opener(_NoRedirect)

    def targets(self, operation: str, outcome: str) -> list[str]:
        """The webhooks to call when a job of `operation` ends with `outcome`."""
        try:
            op = self.registry.get(operation)
        except LakesyncError:  # no longer declared: the settings' defaults still apply
            op = None
        if op is not None and op.notify:  # the operation's own list replaces the default
            return list(op.notify) if outcome in op.on else []
        return list(self.settings.notify) if outcome in self.settings.notify_on else []

    def job_ended(self, status: JobStatus) -> None:
        """Queue one delivery per webhook for this final status (returns at once)."""
        urls = self.targets(status.operation, status.status.value)
        if not urls or self._stop.is_set():
            return
        body = payload(status)
        for url in urls:
            future = self._pool.submit(self._deliver, url, body, status)
            with self._lock:
                self._pending.add(future)
            future.add_done_callback(self._forget)

    def _forget(self, future: Future[None]) -> None:
        with self._lock:
            self._pending.discard(future)

    def _deliver(self, url: str, body: bytes, status: JobStatus) -> None:
        job_id = status.jobId
        with job_context(job_id, status.operation):
            headers = {
                "Content-Type": "application/json",
                "User-Agent": f"lakesync/{__version__}",
                "X-Lakesync-Event": f"job.{status.status.value}",
                "X-Lakesync-Delivery": uuid.uuid4().hex,
            }
            if self.settings.signing_key is not None:
                headers[SIGNATURE_HEADER] = sign(self.settings.signing_key.get_secret_value(), body)
            attempts = self.settings.webhook_retries + 1
            problem = ""
            for attempt in range(1, attempts + 1):
                retry, problem = self._post(url, body, headers)
                if not problem:
                    logger.info("job %s: notified %s (%s)", job_id, shown(url), status.status.value)
                    return
                if not retry or attempt == attempts:
                    break
                delay = BACKOFF_SECONDS * 2 ** (attempt - 1) * random.uniform(0.8, 1.2)
                logger.warning(
                    "job %s: notifying %s failed (%s); retry %d of %d in %.1f s",
                    job_id,
                    shown(url),
                    problem,
                    attempt,
                    attempts - 1,
                    delay,
                )
                if self._stop.wait(delay):
                    break
            logger.error(
                "job %s: could not notify %s of its end (%s) after %d attempt(s); "
                "gave up (the job's status is unchanged)",
                job_id,
                shown(url),
                problem,
                attempt,
            )

    def _post(self, url: str, body: bytes, headers: dict[str, str]) -> tuple[bool, str]:
        """One attempt: (retryable, problem); problem is "" on a 2xx answer."""
        request = urllib.request.Request(url, data=body, headers=headers, method="POST")
        try:
            with self._opener.open(request, timeout=self.settings.webhook_timeout) as answer:
                answer.read(64 * 1024)
                return False, ""
        except urllib.error.HTTPError as e:
            code = e.code
            return code >= 500 or code in _RETRYABLE, f"HTTP {code}"
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            return True, masked(f"{type(reason).__name__}: {reason}")[:200]

    def close(self, timeout: float = 10.0) -> None:
        """Wait up to `timeout` s for deliveries in flight, then stop retrying the rest."""
        with self._lock:
            pending = list(self._pending)
        if pending:
            _, left = wait(pending, timeout=timeout)
            if left:
                logger.error(
                    "%d job notification(s) still under way were given up at shutdown", len(left)
                )
        self._stop.set()
        self._pool.shutdown(wait=False, cancel_futures=True)
