"""The local executor: a pool of threads in this process, plus a recovery loop."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial

from lakesync.runner import JobRunner, Outcome

logger = logging.getLogger(__name__)


class LocalExecutor:
    """Runs jobs in `workers` threads; takes over jobs whose lease expired."""

    name = "local"

    def __init__(self, runner: JobRunner, workers: int, lease_seconds: float) -> None:
        self.runner = runner
        self.workers = workers
        self.scan_every = max(0.5, min(lease_seconds / 2, 15.0))
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="lakesync-job")
        self._inflight: set[str] = set()
        self._partitioned: set[str] = set()  # jobs whose partitions ran here: handed back
        self._lock = threading.Lock()
        self._recovery = threading.Thread(
            target=self._recover_loop, name="lakesync-recovery", daemon=True
        )
        self._started = False

    def start(self) -> None:
        """Start the recovery loop (it also resumes jobs left by a previous process)."""
        self._started = True
        self._recovery.start()

    def submit(self, job_id: str) -> None:
        """Queue a run unless this process already runs or queued the job."""
        self._queue(job_id, partial(self.runner.run, job_id))

    def submit_partition(self, job_id: str, index: int) -> None:
        """Queue a run of one partition of a partitioned job."""
        with self._lock:
            self._partitioned.add(job_id)
        self._queue(f"{job_id}#{index}", partial(self.runner.partitioned.run, job_id, index))

    def _queue(self, key: str, work: Callable[[], Outcome]) -> None:
        with self._lock:
            if key in self._inflight or self.runner.stop.is_set():
                return
            self._inflight.add(key)
        future = self._pool.submit(work)
        future.add_done_callback(partial(self._done, key, work))

    def _done(self, key: str, work: Callable[[], Outcome], future: Future[Outcome]) -> None:
        with self._lock:
            self._inflight.discard(key)
        if future.cancelled():  # queued when the process stopped: it stays resumable
            return
        error = future.exception()
        if error is not None:
            logger.error("%s: run crashed: %s", key, error)
            return
        if future.result() is Outcome.CONTINUE and not self.runner.stop.is_set():
            self._queue(key, work)

    def _recover_loop(self) -> None:
        stop = self.runner.stop
        scans = 0
        while not stop.is_set():
            try:
                for job_id in self.runner.store.stale(self.runner.settings.lease_seconds):
                    logger.debug(
                        "job %s: pending or its lease expired; resuming it",
                        job_id,
                        extra={"jobId": job_id},
                    )
                    self.submit(job_id)
                for job_id, index in self.runner.partitioned.stale():
                    logger.debug(
                        "job %s: resuming partition %d", job_id, index + 1, extra={"jobId": job_id}
                    )
                    self.submit_partition(job_id, index)
            except Exception as e:
                logger.warning("recovery scan failed: %s", e)
            # soon again after the first scan: a job handed back by a process that stopped
            # a moment ago is only taken once it has waited 2 s (store.stale)
            stop.wait(self.scan_every if scans else min(self.scan_every, 2.5))
            scans += 1

    def active(self) -> int:
        """Jobs running or queued in this process."""
        with self._lock:
            return len(self._inflight)

    def shutdown(self, timeout: float) -> None:
        """Ask runs to stop at their next batch boundary and wait for them."""
        self.runner.stop.set()
        self._pool.shutdown(wait=False, cancel_futures=True)
        done = threading.Event()

        def wait() -> None:
            self._pool.shutdown(wait=True)
            done.set()

        threading.Thread(target=wait, daemon=True).start()
        if not done.wait(timeout):
            logger.warning(
                "jobs still running after %.0f s; they resume from their checkpoint", timeout
            )
            return
        partitioned = self.runner.partitioned
        for job_id in sorted(self._partitioned):
            try:  # its partitions here stopped: the job waits, pending, for the next start
                partitioned.hand_back(job_id)
            except Exception as e:
                logger.warning(
                    "job %s: not handed back (%s); it resumes when its lease expires", job_id, e
                )

    def healthy(self) -> tuple[bool, str]:
        """Healthy while started and not stopping."""
        if not self._started or self.runner.stop.is_set():
            return False, "the local executor is not running"
        if not self._recovery.is_alive():
            return False, "the local executor's recovery loop stopped"
        return True, f"local executor, {self.workers} workers, {self.active()} jobs active"
