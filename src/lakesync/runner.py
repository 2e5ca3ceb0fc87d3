"""The job body: claim a job, then plan, run and finish it.

Every executor calls `JobRunner.run`; executors only decide where and when it runs. A job
goes down three stages, each owned by one module: plan.py (what to copy, persisted once),
slices.py (one batch loop over a slice of the plan), finish.py (mirror deletes, counters,
final status, watermark). A whole job is one slice its own run copies; a partitioned job's
slices are its partitions, run by the executor (partitions.py). Every MongoDB call goes
through the store boundary (boundary.py), which retries and fences it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from lakesync import finish
from lakesync.boundary import SliceLease, Store
from lakesync.config import Settings
from lakesync.errors import LakesyncError
from lakesync.finish import summary
from lakesync.jobstore import JobStore
from lakesync.lease import Alone, died_reason, new_owner, run_owner
from lakesync.logs import job_context
from lakesync.models import JobState, JobStatus, Outcome
from lakesync.operations import OperationRegistry
from lakesync.partitions import PartitionedJobs
from lakesync.plan import Planner
from lakesync.slices import Clock, copy_slice, drive
from lakesync.watermarks import WatermarkStore

__all__ = ["JobRunner", "Outcome", "new_owner", "summary"]

logger = logging.getLogger(__name__)


@dataclass
class JobRunner:
    """Runs jobs against one database; shared by all executor threads of a process."""

    settings: Settings
    store: JobStore
    registry: OperationRegistry
    owner: str = field(default_factory=new_owner)
    stop: threading.Event = field(default_factory=threading.Event)
    #: partitions of partitioned jobs; its `submit` is set when an executor runs them
    partitioned: PartitionedJobs = field(init=False)
    #: failures that could not be written (the database refused every write): job -> error
    unrecorded: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.boundary = Store(self.settings, self.store, self.stop)
        self.planner = Planner(self.settings, self.boundary, self.registry)
        self.partitioned = PartitionedJobs(
            self.boundary, self.planner, self.owner, self.stop, self.unrecorded
        )

    @property
    def watermarks(self) -> WatermarkStore:
        """The operations' watermarks (`syncstate`)."""
        return self.boundary.watermarks

    def run(self, job_id: str, on_progress: Callable[[JobStatus], None] | None = None) -> Outcome:
        """Run one job from its checkpoint until it ends, yields or loses its lease."""
        owner = run_owner(self.owner)
        try:
            alone = self.boundary.job_suspect(job_id)
        except LakesyncError as e:
            logger.error("job %s cannot be run: %s", job_id, e)
            return Outcome.NOT_CLAIMED
        with Alone(alone):
            try:
                status = self.boundary.claim(job_id, owner)
            except LakesyncError as e:
                logger.error("job %s cannot be run: %s", job_id, e)
                return Outcome.NOT_CLAIMED
            if status is None:
                return Outcome.NOT_CLAIMED
            with job_context(job_id, status.operation):
                return self._claimed(status, SliceLease(self.boundary, job_id, owner), on_progress)

    def _claimed(
        self,
        status: JobStatus,
        lease: SliceLease,
        on_progress: Callable[[JobStatus], None] | None,
    ) -> Outcome:
        job_id = status.jobId
        log = logging.LoggerAdapter(logger, {"jobId": job_id, "operation": status.operation})
        extra = {"owner": lease.owner}
        if status.processedRecords:  # a run after a pause, a crash or a time limit
            done, total = f"{status.processedRecords:,}", f"{status.totalRecords:,}"
            text = f"job {job_id}: run {status.attempt} resumed at record {done} of {total}"
            log.info("%s", text, extra=extra)
        else:
            log.info("job %s: run %d started", job_id, status.attempt, extra=extra)
        if (ended := self._ended_before(status, lease)) is not None:
            return ended
        if status.partitions:  # continued from its partitions, whatever resumed it
            return self.partitioned.resume(status, lease, on_progress)
        return drive(lease, status, lambda: self._copy(status, lease, on_progress), self.unrecorded)

    def _ended_before(self, status: JobStatus, lease: SliceLease) -> Outcome | None:
        """End a job that must not be copied again: its failure was not recorded, its runs
        kept dying, or it was cancelled while no run held it."""
        job_id = status.jobId
        if (unrecorded := self.unrecorded.pop(job_id, None)) is not None:
            # its failure could not be written (e.g. a full disk): record it, do not copy again
            lease.fail(status, unrecorded, self.unrecorded)
            return Outcome.ENDED
        if status.failures >= self.settings.max_attempts:
            cp = status.checkpoint
            source = status.options.get("source") or "its lake"
            reading = (cp.file if cp is not None else None) or f"{source} (before a checkpoint)"
            reason = status.error or died_reason(
                status.attempt - 1,
                status.failures,
                reading,
                status.processedRecords,
                self.settings.max_attempts,
            )
            lease.end(status, JobState.FAILED, "Gave up", reason)
            return Outcome.ENDED
        if status.cancelRequested:
            lease.end(status, JobState.CANCELLED, f"Cancelled; {finish.lowered(summary(status))}")
            return Outcome.ENDED
        return None

    def _copy(
        self,
        status: JobStatus,
        lease: SliceLease,
        on_progress: Callable[[JobStatus], None] | None,
    ) -> Outcome:
        """Plan the job (or reopen its plan), copy its one slice, finish it."""
        status, piece = self.planner.plan(lease, status, split=self.partitioned.plans)
        if piece is None:  # planned as partitions: the executor runs them
            return self.partitioned.resume(status, lease, on_progress)
        if on_progress:
            on_progress(status)
        clock = Clock()
        stopped, status = copy_slice(lease, piece, status, clock, self.stop, on_progress)
        if (ended := finish.ended(stopped, lease, status)) is not None:
            return ended
        return finish.complete(lease, status, clock, self.stop, piece.seen, on_progress)
