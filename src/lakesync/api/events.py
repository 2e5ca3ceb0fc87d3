"""Job status feeds: one reader per followed job, fanned out to every event stream.

A page follows a job with ``GET /api/jobs/{id}/events``. With a hundred pages on one job,
each stream reading and rendering the status on its own timer meant a hundred reads, a
hundred JSON renderings and a hundred event-loop wake-ups per interval, spread over the
interval, all competing with the copy's threads for the GIL (status polls waited behind
them). A ``Feed`` reads the job once per interval (from the process's newest copy of the
status, else MongoDB: see ``store.RecentStatuses``), renders it once, and wakes all its
streams together; a stream only writes the text it is handed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable, Iterator

from lakesync.errors import JobNotFound
from lakesync.models import JobStatus

logger = logging.getLogger(__name__)

Reader = Callable[[str], Awaitable[JobStatus]]


def render(status: JobStatus) -> str:
    """The status as an event's data: the API's JSON document on one line."""
    return json.dumps(status.public())


class Feed:
    """The newest status of one job, as rendered text, and a way to wait for the next."""

    def __init__(self, job_id: str, first: JobStatus) -> None:
        self.job_id = job_id
        self.payload = render(first)
        self.revision = first.revision
        self.final = first.state.is_final
        self.version = 0  # counts the payloads that differed from the one before
        self.gone = False  # the job's status no longer exists (expired, deleted)
        self.stopped = False  # the server stops: streams end, clients reconnect later
        self.subscribers = 0
        self.task: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()

    def publish(self, status: JobStatus) -> None:
        """Take ``status`` unless a newer revision was taken already; wake the streams if
        the rendered text changed or the job ended."""
        if status.revision < self.revision:
            return  # a reply that arrived late
        payload = render(status)
        self.revision = status.revision
        changed = payload != self.payload
        if changed:
            self.payload, self.version = payload, self.version + 1
        if changed or status.state.is_final:
            self.final = status.state.is_final
            self._wake()

    def end(self, *, gone: bool = False, stopped: bool = False) -> None:
        """End every stream: the job is gone, or the server stops."""
        self.gone, self.stopped = self.gone or gone, self.stopped or stopped
        self._wake()

    def _wake(self) -> None:
        event, self._changed = self._changed, asyncio.Event()
        event.set()

    async def wait(self, version: int, timeout: float) -> bool:
        """Wait until the payload is newer than ``version`` (True) or ``timeout`` passed."""
        if self.version != version or self.final or self.gone or self.stopped:
            return True
        event = self._changed
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await event.wait()
                return True
        return False


class Feeds:
    """The feeds of the jobs followed in this process (one event loop)."""

    def __init__(self) -> None:
        self._feeds: dict[str, Feed] = {}

    def __len__(self) -> int:
        return len(self._feeds)

    @contextlib.contextmanager
    def follow(
        self,
        first: JobStatus,
        read: Reader,
        interval: Callable[[], float],
        stopping: Callable[[], bool],
    ) -> Iterator[Feed]:
        """The job's feed, started by its first follower and stopped after its last.

        ``first`` is the status the follower just read: a newer revision than the feed's
        is published to every follower (a resumed job moves on from its final state).
        """
        feed = self._feeds.get(first.jobId)
        if feed is None or feed.gone or feed.stopped:
            feed = self._feeds[first.jobId] = Feed(first.jobId, first)
        else:
            feed.publish(first)
        feed.subscribers += 1
        if feed.task is None or feed.task.done():
            feed.task = asyncio.get_running_loop().create_task(
                self._read(feed, read, interval, stopping), name=f"feed-{feed.job_id}"
            )
        try:
            yield feed
        finally:
            feed.subscribers -= 1
            if feed.subscribers == 0:
                if self._feeds.get(feed.job_id) is feed:
                    del self._feeds[feed.job_id]
                if feed.task is not None:
                    feed.task.cancel()

    @staticmethod
    async def _read(
        feed: Feed, read: Reader, interval: Callable[[], float], stopping: Callable[[], bool]
    ) -> None:
        """Read the job every ``interval()`` seconds while it has followers and runs."""
        while feed.subscribers and not feed.final:
            await asyncio.sleep(interval())
            if stopping():
                feed.end(stopped=True)
                return
            try:
                status = await read(feed.job_id)
            except JobNotFound:
                feed.end(gone=True)
                return
            except Exception:  # MongoDB away for a moment: the next read may succeed
                logger.warning(
                    "reading job %s for its event streams failed", feed.job_id, exc_info=True
                )
                continue
            feed.publish(status)
