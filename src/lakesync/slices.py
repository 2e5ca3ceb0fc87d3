"""The run stage: one batch loop over one slice of a job's plan (plan.py).

A run (a whole job, or one partition of a job) reads its slice of the lake from its
checkpoint and, for each batch: fences (the run still holds its lease), writes the batch,
then commits counters and the new checkpoint in one conditional update on its own
document (boundary.SliceLease). After each commit it stops when the job was cancelled
(the finish stage ends it), or hands the slice back when lakesync stops or the run reached
``LAKESYNC_JOB_TIME_LIMIT``, to be continued from the checkpoint by a later run.

A whole job and a partition take the same path; only their lease differs (which document
they commit to, and whether the job's counters are the sum of its partitions').
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from lakesync import metrics
from lakesync.boundary import SliceLease
from lakesync.copy import CopyEngine
from lakesync.lake import Position
from lakesync.models import Counters, JobStatus
from lakesync.plan import Slice

logger = logging.getLogger(__name__)


class Stopped(Enum):
    """How a run's copy of its slice stopped."""

    DONE = "done"  # copied to its end: the finish stage follows
    CANCELLED = "cancelled"  # the job was cancelled: the finish stage ends it
    HANDED_BACK = "handed back"  # lakesync stops or the time limit: a later run continues


@dataclass
class Clock:
    """When the current run started and how many records it processed (rate, time limit)."""

    started: float = field(default_factory=time.monotonic)
    done: int = 0

    def elapsed(self) -> float:
        return time.monotonic() - self.started


def _progress(status: JobStatus, delta: Counters, run_done: int, elapsed: float) -> dict[str, Any]:
    """percentComplete, rate and ETA after a batch, from the counters before it plus delta."""
    processed = status.processedRecords + delta.processed
    total = max(status.totalRecords, processed)
    rate = run_done / elapsed if elapsed > 0 else 0.0
    return {
        "percentComplete": round(100.0 * processed / total, 2) if total else 100.0,
        "recordsPerSecond": round(rate, 1),
        "etaSeconds": round((total - processed) / rate, 1) if rate > 0 else None,
        "message": f"Copying: {processed:,} of {total:,} records",
    }


def interrupted(
    lease: SliceLease, status: JobStatus, clock: Clock, stop: threading.Event
) -> Stopped | None:
    """After a commit: CANCELLED on a cancel request; on stop or at the time limit, hand the
    slice back (HANDED_BACK); else None: carry on."""
    if status.state.is_final or status.cancelRequested or lease.cancel_seen:
        return Stopped.CANCELLED
    limit = lease.settings.job_time_limit
    if stop.is_set():
        text = (
            f"Paused at record {status.processedRecords:,} (lakesync stopped); "
            "resumes from this checkpoint"
        )
    elif clock.elapsed() >= limit:
        text = (
            f"Run {status.attempt} reached the {limit:g} s time "
            f"limit at record {status.processedRecords:,} of {status.totalRecords:,}; "
            f"continuing in run {status.attempt + 1}"
        )
    else:
        return None
    logger.info("job %s%s: %s", status.jobId, lease.of_where, text)
    lease.hand_back(text)
    return Stopped.HANDED_BACK


def copy_slice(
    lease: SliceLease,
    piece: Slice,
    status: JobStatus,
    clock: Clock,
    stop: threading.Event,
    on_progress: Callable[[JobStatus], None] | None = None,
) -> tuple[Stopped, JobStatus]:
    """Copy batches of the slice from its checkpoint until its end or the run stops.

    Returns how it stopped and the job's status after the last commit.
    """
    store, job_id, lake, where = lease.store, lease.job_id, piece.lake, lease.of_where
    collection = store.jobs.db[piece.op.collection]
    engine = CopyEngine(
        collection,
        store.jobs.copyerrors,
        piece.op.schema_,
        job_id,
        piece.superseded,
        dry_run=piece.dry_run,
    )
    cp = piece.cp
    start = lake.resume_position(Position(cp.fileIndex, cp.row), cp.file)
    # the lake's reader thread validates, encodes and hashes the next batch meanwhile
    for batch in lake.batches(
        piece.batch_size,
        start,
        stop_file=piece.stop_file,
        filter=piece.filter,
        prepare=engine.prepare,
    ):
        lease.fence()
        result = store.write(engine, batch, f"writing batch {cp.batches + 1}{where}")
        end = batch.end
        cp = cp.model_copy(
            update={
                "fileIndex": end.file_index,
                "row": end.row,
                "batches": cp.batches + 1,
                "file": lake.file_name(end.file_index),
            }
        )
        # with a rejected record the delete phase is refused: no need to remember keys
        if piece.seen is not None and status.errorRecords + result.counts.errors == 0:
            store.add_keys(piece.seen, result.keys, cp.batches)
        clock.done += result.counts.processed
        derived = _progress(status, result.counts, clock.done, clock.elapsed())
        status = lease.commit(status, result.counts, cp, derived)  # LeaseLost unless held
        metrics.observe_batch(result.counts, result.write_seconds)
        _log_batch(job_id, lease, cp.batches, result.counts, result.write_seconds)
        if on_progress:
            on_progress(status)
        if (stopped := interrupted(lease, status, clock, stop)) is not None:
            return stopped, status
    return Stopped.DONE, status


def _log_batch(job_id: str, lease: SliceLease, n: int, counts: Counters, seconds: float) -> None:
    """A debug line per batch; its JSON fields: the job's (bound by the runner's
    `job_context`), the partition, the batch, its counts and seconds."""
    extra = {} if lease.index is None else {"partition": lease.index}
    fields = {**extra, "batch": n, **counts.model_dump(), "seconds": round(seconds, 4)}
    logger.debug(
        "job %s%s batch %d: %s in %.3f s",
        job_id,
        lease.of_where,
        n,
        counts.model_dump(),
        seconds,
        extra=fields,
    )
