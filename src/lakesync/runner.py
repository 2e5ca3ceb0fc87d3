"""The job body: claim a job, then plan, run and finish it.

Every executor calls `JobRunner.run` (and `PartitionedJobs.run` for one partition);
executors only decide where and when it runs. A job goes down three stages, each owned by
one module: plan.py (what to copy, persisted once), slices.py (one batch loop over a slice
of the plan), finish.py (mirror deletes, counters, final status, watermark). Every MongoDB
call goes through the store boundary (boundary.py), which retries and fences it. The job's
id is bound once in the log context (`job_context`): the stages log without passing it.

Whole jobs and partitioned jobs differ only in how many slices they have and who runs
them. A whole job is one slice, copied by the job's own run. A large full copy is planned
as partitions (file ranges, `jobpartitions`), one slice each, which the executor's workers
copy in parallel (`PartitionedJobs`), or the job's own run copies one after another when
no executor runs them (`lakesync copy`, `lakesync resume`). Each partition's run takes
the same path as a whole job's: claim, give up if its runs kept dying (`gave_up`), then
under the lease's heartbeat (`drive`) run and finish the slice (`run_and_finish`). The
job document takes the sums of its partitions with `$max`: counters only grow, so a slow
writer with older sums can never move them back, and a replayed update changes
nothing. The partition that finds all others done completes the job; a partition that
fails fails the job, naming itself; a partition MongoDB or the lake cannot serve within
the retry budget is handed back and resumed later. Whatever resumes a partitioned job (the
API, `lakesync resume`, `lakesync copy` picking it up, the recovery scan) continues its
partitions from their checkpoints; a job whose partitions are all done is completed by the
next run of the job.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from pymongo.collection import Collection

from lakesync import finish, metrics
from lakesync.boundary import SliceLease, Store, Unrecorded, WatermarkStore, progress
from lakesync.config import Settings
from lakesync.errors import LakesyncError, LeaseLost, TransientSourceError, TransientStoreError
from lakesync.finish import summary
from lakesync.jobstore import JobStore
from lakesync.lease import Alone, Leases, kept_dying, new_owner, run_owner
from lakesync.logs import job_context
from lakesync.masking import masked
from lakesync.models import JobState, JobStatus, Outcome
from lakesync.operations import OperationRegistry
from lakesync.plan import Planner, Slice
from lakesync.slices import Clock, copy_slice

__all__ = ["JobRunner", "Outcome", "PartitionedJobs", "new_owner", "summary"]

logger = logging.getLogger(__name__)


class Running:
    """The jobs and runs executing in this process (`lakesync_active_jobs`, `_runs`): the
    partitions of one job running side by side here are one job and several runs."""

    def __init__(self) -> None:
        self._runs: Counter[str] = Counter()
        self._lock = threading.Lock()

    def started(self, job_id: str) -> None:
        with self._lock:
            self._runs[job_id] += 1
            self._show()

    def ended(self, job_id: str) -> None:
        with self._lock:
            self._runs[job_id] -= 1
            if self._runs[job_id] <= 0:
                del self._runs[job_id]
            self._show()

    def _show(self) -> None:
        metrics.ACTIVE.set(len(self._runs))
        metrics.ACTIVE_RUNS.set(sum(self._runs.values()))

    @contextlib.contextmanager
    def run(self, job_id: str) -> Iterator[None]:
        self.started(job_id)
        try:
            yield
        finally:
            self.ended(job_id)


#: this process's runs, whichever runner runs them
RUNNING = Running()


def drive(
    lease: SliceLease, status: JobStatus, copy: Callable[[], Outcome], unrecorded: Unrecorded
) -> Outcome:
    """Run `copy` (a slice's stages) under the lease's heartbeat, and turn what stops it
    into the run's outcome: a lost lease or MongoDB or the lake unavailable past the retry
    budget hands the slice back (resumed from its checkpoint by a later run, up to
    LAKESYNC_MAX_ATTEMPTS); any other error fails the job."""
    where = f" {lease.where}" if lease.where else ""
    with RUNNING.run(lease.job_id):
        try:
            with lease.heartbeat():
                return copy()
        except LeaseLost as e:
            logger.warning("job %s%s: %s", lease.job_id, where, e, exc_info=True)
            return Outcome.NOT_CLAIMED
        except (TransientStoreError, TransientSourceError) as e:
            logger.error("job %s%s: %s", lease.job_id, where, e)
            lease.hand_back_failed(e, lake=isinstance(e, TransientSourceError))
            return Outcome.NOT_CLAIMED
        except LakesyncError as e:
            lease.fail(status, str(e), unrecorded)
            return Outcome.ENDED
        except Exception as e:
            logger.exception("job %s%s: unexpected error", lease.job_id, where)
            text = masked(f"Unexpected error: {type(e).__name__}: {e}")[:2000]
            lease.fail(status, text, unrecorded)
            return Outcome.ENDED


def run_and_finish(
    lease: SliceLease,
    status: JobStatus,
    piece: Slice,
    stop: threading.Event,
    on_progress: Callable[[JobStatus], None] | None,
) -> Outcome:
    """The run and finish stages of one slice, a whole job's or a partition's: copy it from
    its checkpoint, then end the run (cancelled, handed back) or complete the slice and, if
    it was the job's last, the job."""
    clock = Clock()
    stopped, status = copy_slice(lease, piece, status, clock, stop, on_progress)
    if (ended := finish.ended(stopped, lease, status)) is not None:
        return ended
    return finish.complete(lease, status, clock, stop, piece.seen, on_progress)


def gave_up(
    lease: SliceLease,
    status: JobStatus,
    slice_doc: dict[str, Any],
    before: str,
    unrecorded: Unrecorded,
    error: str | None = None,
) -> bool:
    """Fail the job whose slice (the job document, or a partition's) kept dying in its
    runs, with the reason (``error``, when the job recorded why its runs failed); True if
    it did."""
    reason = kept_dying(slice_doc, lease.settings.max_attempts, before)
    if reason is None:
        return False
    lease.fail(status, error or reason, unrecorded, "Gave up")
    return True


@dataclass
class PartitionedJobs:
    """Runs the partitions of jobs: dispatched to the executor, or here, one by one.

    `submit` hands a partition to the executor; without one (`lakesync copy`, `lakesync
    resume`), the job's run copies its partitions itself, one after another.
    """

    store: Store
    planner: Planner
    owner: str
    stop: threading.Event
    #: failures that could not be written: job -> (message, error) (the runner's)
    unrecorded: Unrecorded = field(default_factory=dict)
    submit: Callable[[str, int], None] | None = None

    @property
    def parts(self) -> Collection[dict[str, Any]]:
        """The `jobpartitions` collection."""
        return self.store.parts

    @property
    def leases(self) -> Leases:
        """The lease primitive on partition documents."""
        return self.store.part_leases

    @property
    def plans(self) -> bool:
        """Whether new full copies are split (only where an executor runs partitions)."""
        return self.submit is not None

    def ensure_indexes(self) -> None:
        """Index partitions by job (they expire with their job: JobStore.finish)."""
        self.parts.create_index("jobId")
        self.parts.create_index("status")  # the recovery scan

    def stale(self) -> list[tuple[str, int]]:
        """Partitions to run: pending ones and those whose lease expired (handed back
        first), of jobs that are running."""
        pending, expired = self.leases.scan(self.store.settings.lease_seconds)
        found = list(pending)
        for doc in expired:
            # a run that died holding it counts, in the write that hands it back
            if self.leases.reap(doc["_id"], doc, count_death=True) is not None:
                found.append(doc)
        out, running = [], {}
        for doc in found:
            job_id, index = str(doc["_id"]).rsplit(":", 1)
            if job_id not in running:
                job = self.store.jobs.jobs.find_one({"jobId": job_id}, {"status": 1})
                running[job_id] = job is not None and job.get("status") == "in_progress"
            if running[job_id]:
                out.append((job_id, int(index)))
        return out[:200]

    def hand_back(self, job_id: str) -> None:
        """After this process stopped its partitions of the job: if none runs anywhere, the
        job goes back to pending, and the next start dispatches them again at once."""
        if self.parts.count_documents({"jobId": job_id, "status": JobState.IN_PROGRESS.value}):
            return  # another process runs some: the job stays with them
        done = self.parts.count_documents({"jobId": job_id, "status": JobState.COMPLETED.value})
        total = self.parts.count_documents({"jobId": job_id})
        if self.store.jobs.hand_back_unowned(
            job_id,
            f"Paused with {done} of {total} partitions done (lakesync stopped); "
            "resumes from the partitions' checkpoints",
        ):
            logger.info("job %s: handed back; the next start resumes it", job_id)

    # -- the job's run: dispatch its partitions, or copy them here ------------------------

    def resume(
        self,
        status: JobStatus,
        lease: SliceLease,
        on_progress: Callable[[JobStatus], None] | None,
    ) -> Outcome:
        """Continue a partitioned job: dispatch its partitions, or copy them here."""
        job_id, owner = status.jobId, lease.owner
        try:
            if self.submit is not None:
                self._dispatch(job_id, owner)
                return Outcome.ENDED
            with lease.heartbeat():
                return self._run_inline(job_id, owner, on_progress)
        except LeaseLost as e:
            logger.warning("%s", e)
            return Outcome.NOT_CLAIMED
        except LakesyncError as e:  # MongoDB gone past the budget: its lease expires
            logger.error("job %s: could not continue its partitions: %s", job_id, e)
            with contextlib.suppress(Exception):
                self.store.jobs.release(job_id, owner, f"MongoDB unavailable: {e}", failure=True)
            return Outcome.NOT_CLAIMED

    def _dispatch(self, job_id: str, owner: str) -> None:
        """Hand every unfinished partition to the executor and let go of the job document;
        complete the job if none is left (its last partition's run died before ending it)."""
        left = self.store.unfinished(job_id)
        if not left:
            self._complete_if_done(job_id, owner)
        assert self.submit is not None
        for index in left:
            self.submit(job_id, index)
        with contextlib.suppress(LeaseLost):
            self.store.let_go(job_id, owner)
        logger.info("job %s: %d partitions dispatched", job_id, len(left))

    def _run_inline(
        self, job_id: str, owner: str, on_progress: Callable[[JobStatus], None] | None
    ) -> Outcome:
        """Copy the job's unfinished partitions in this thread (no executor runs them)."""
        for index in self.store.unfinished(job_id):
            outcome = Outcome.CONTINUE
            while outcome is Outcome.CONTINUE and not self.stop.is_set():
                outcome = self.run(job_id, index, on_progress)
            job = self.store.get(job_id)
            if job.state.is_final:
                return Outcome.ENDED
            if self.stop.is_set():
                text = (
                    f"Paused at record {job.processedRecords:,} (lakesync stopped); "
                    "resumes from its partitions' checkpoints"
                )
                self.store.release(job_id, owner, text)
                return Outcome.CONTINUE
        self._complete_if_done(job_id, owner)
        with contextlib.suppress(LeaseLost):  # another process may hold a partition: it ends
            self.store.let_go(job_id, owner)  # the job (a no-op once this run ended it)
        return Outcome.ENDED

    def _complete_if_done(self, job_id: str, owner: str) -> None:
        lease = SliceLease(self.store, job_id, owner, partitioned=True)
        finish.complete(lease, self.store.get(job_id), Clock(), self.stop)

    # -- one partition ---------------------------------------------------------------------

    def run(
        self, job_id: str, index: int, on_progress: Callable[[JobStatus], None] | None = None
    ) -> Outcome:
        """Copy one partition from its checkpoint until it ends, yields or is taken over."""
        owner = run_owner(self.owner)
        try:
            job = self.store.get(job_id)
            if job.state.is_final:
                return Outcome.ENDED
            alone = self.store.part_suspect(f"{job_id}:{index}")
        except LakesyncError as e:
            logger.error("job %s partition %d cannot be run: %s", job_id, index + 1, e)
            return Outcome.NOT_CLAIMED
        with job_context(job_id, job.operation), Alone(alone):
            return self._claimed(job, index, owner, on_progress)

    def _claimed(
        self,
        job: JobStatus,
        index: int,
        owner: str,
        on_progress: Callable[[JobStatus], None] | None,
    ) -> Outcome:
        job_id, pid = job.jobId, f"{job.jobId}:{index}"
        try:
            part = self.store.claim_part(pid, owner)
            if part is None:
                return Outcome.NOT_CLAIMED
            self.store.ran_by(pid, self.owner)
        except LakesyncError as e:
            logger.error("job %s partition %d cannot be claimed: %s", job_id, index + 1, e)
            return Outcome.NOT_CLAIMED
        where = (
            f"partition {index + 1} of {job.partitions} (files {part['fileStart'] + 1}"
            f"-{part['fileStop']})"
        )
        lease = SliceLease(self.store, job_id, owner, index, where)
        first = (part.get("files") or [where])[0]  # read before its first checkpoint
        if gave_up(lease, job, part, first, self.unrecorded):
            return Outcome.ENDED

        def copy() -> Outcome:
            piece = self.planner.partition(job, part)
            return run_and_finish(lease, job, piece, self.stop, on_progress)

        return drive(lease, job, copy, self.unrecorded)


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
    #: failures that could not be written (the database refused every write)
    unrecorded: Unrecorded = field(default_factory=dict)

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
        job_id, extra = status.jobId, {"owner": lease.owner}
        if status.processedRecords:  # a run after a pause, a crash or a time limit
            done, total = f"{status.processedRecords:,}", f"{status.totalRecords:,}"
            text = f"job {job_id}: run {status.attempt} resumed at record {done} of {total}"
            logger.info("%s", text, extra=extra)
        else:
            logger.info("job %s: run %d started", job_id, status.attempt, extra=extra)
        if self._ended_before(status, lease):
            return Outcome.ENDED
        if status.partitions:  # continued from its partitions, whatever resumed it
            return self.partitioned.resume(status, lease, on_progress)
        return drive(lease, status, lambda: self._copy(status, lease, on_progress), self.unrecorded)

    def _ended_before(self, status: JobStatus, lease: SliceLease) -> bool:
        """End a job that must not be copied again: its failure was not recorded, its runs
        kept dying, or it was cancelled while no run held it; True if it ended."""
        kept = self._kept_failure(status)
        if kept is not None and not status.cancelRequested:
            # its failure could not be written (e.g. a full disk): record it, do not copy again
            message, error = kept
            lease.fail(status, error, self.unrecorded, message)
            return True
        source = status.options.get("source") or "its lake"
        doc = status.model_dump(include={"failures", "attempt", "checkpoint", "processedRecords"})
        before = f"{source} (before a checkpoint)"
        if kept is None and gave_up(lease, status, doc, before, self.unrecorded, status.error):
            return True
        if status.cancelRequested:
            if kept is not None:  # the user's request wins over a failure nobody saw
                logger.warning(
                    "job %s: an earlier run here failed (%s) but could not record it; "
                    "a cancel was requested since, so the job ends cancelled",
                    status.jobId,
                    kept[1],
                )
            lease.end(status, JobState.CANCELLED, f"Cancelled; {finish.lowered(summary(status))}")
            return True
        return False

    def _kept_failure(self, status: JobStatus) -> tuple[str, str] | None:
        """(message, error) of this process's failure of the job that could not be written,
        if it is still the job's: this claim is the next after the failed run's, and the job
        stands where that run left it. Another run that copied since, or only claimed the
        job (planned and stopped before its first commit), makes it stale: logged, dropped."""
        if (unrecorded := self.unrecorded.pop(status.jobId, None)) is None:
            return None
        message, error, then, attempt = unrecorded
        if progress(status) == then and status.attempt == attempt + 1:
            return message, error
        logger.warning(
            "job %s: an earlier run here failed (%s) but could not record it; the job "
            "has been run or progressed since (to record %s), so it goes on",
            status.jobId,
            error,
            f"{status.processedRecords:,}",
        )
        return None

    def _copy(
        self,
        status: JobStatus,
        lease: SliceLease,
        on_progress: Callable[[JobStatus], None] | None,
    ) -> Outcome:
        """Plan the job (or reopen its plan), then run and finish its one slice."""
        status, piece = self.planner.plan(lease, status, self.partitioned.plans, on_progress)
        if piece is None:  # planned as partitions: the executor runs them
            return self.partitioned.resume(status, lease, on_progress)
        if on_progress:
            on_progress(status)
        return run_and_finish(lease, status, piece, self.stop, on_progress)
