"""Retrying MongoDB calls that fail for reasons that go away: backoff with jitter, in a budget."""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from typing import TypeVar

from pymongo.errors import AutoReconnect, ConnectionFailure, ExecutionTimeout, PyMongoError

from lakesync.errors import StoreError, TransientStoreError
from lakesync.masking import masked

logger = logging.getLogger(__name__)
T = TypeVar("T")

TRANSIENT = (AutoReconnect, ConnectionFailure, ExecutionTimeout)


def server_reason(error: PyMongoError) -> str:
    """The server's own words: a bulk or single write error's `errmsg` (e.g. "database or
    disk is full"), not the driver's wrapper with the failing document; passwords masked."""
    details = getattr(error, "details", None) or {}
    write_errors = details.get("writeErrors") if isinstance(details, dict) else None
    if write_errors:
        first = write_errors[0]
        text = f"{first.get('errmsg', error)} (code {first.get('code')})"
    elif isinstance(details, dict) and details.get("errmsg"):
        text = f"{details['errmsg']} (code {details.get('code', getattr(error, 'code', None))})"
    else:
        text = str(error)
    return masked(text).splitlines()[0][:300] if text.strip() else type(error).__name__


def is_transient(error: BaseException) -> bool:
    """True for errors worth retrying: network, not-primary, timeouts, labelled retryable."""
    if isinstance(error, TRANSIENT):
        return True
    has_label = getattr(error, "has_error_label", None)
    return bool(has_label and has_label("RetryableWriteError"))


class RetryPolicy:
    """Exponential backoff (base * 2^n, capped) with full jitter, stopping after `budget` s."""

    def __init__(
        self,
        budget: float = 60.0,
        base: float = 0.2,
        cap: float = 5.0,
        stop: threading.Event | None = None,
        on_retry: Callable[[], None] | None = None,
    ) -> None:
        self.budget = budget
        self.base = base
        self.cap = cap
        self.stop = stop
        self.on_retry = on_retry

    def call(self, fn: Callable[[], T], what: str) -> T:
        """Run fn, retrying transient MongoDB errors; StoreError when the budget is spent.

        The budget counts from the first failure: it bounds how long MongoDB may stay
        unavailable, not the work of ``fn`` (planning a large lake's repeated keys reads
        it for minutes before the plan's first write)."""
        deadline: float | None = None
        attempt = 0
        while True:
            try:
                return fn()
            except PyMongoError as e:
                reason = server_reason(e)
                if not is_transient(e):  # e.g. a full disk: retrying cannot help, the run fails
                    raise StoreError(f"MongoDB refused {what}: {reason}") from None
                if deadline is None:
                    deadline = time.monotonic() + self.budget
                left = deadline - time.monotonic()
                if left <= 0 or (self.stop is not None and self.stop.is_set()):
                    raise TransientStoreError(
                        f"MongoDB did not recover within the {self.budget:g} s retry budget "
                        f"while {what}: {reason}. The job stopped at its last checkpoint and "
                        "resumes from there once MongoDB is back."
                    ) from None
                delay = min(left, random.uniform(0, min(self.cap, self.base * 2**attempt)))
                attempt += 1
                if self.on_retry is not None:
                    self.on_retry()
                logger.warning("%s failed (%s); retry %d in %.2f s", what, reason, attempt, delay)
                if self.stop is not None:
                    self.stop.wait(delay)
                else:
                    time.sleep(delay)
