"""The one batch loop of whole jobs and partitions: fence, write, checkpoint, commit.

A run (a whole job, or one partition of a job) reads its lake from a position and, for
each batch: checks that it still holds its lease, writes the batch, then commits counters
and the new checkpoint in one conditional update on its own document. What differs
between a whole job and a partition (which document it commits to, what it does after a
commit) is the `Run` it passes.

Fencing. Before each write the run makes sure it still holds its lease, and its commit
after the write applies only while it does (lease.py). Making sure is a read of the run's
own document (`Run.fence`), except within `FENCE_TRUST_SECONDS` of sending the last commit
that succeeded: no process may take a lease over before `MIN_LEASE_SECONDS` of silence on
the server's clock, twice as long, so the lease is still held and the read would only cost
a round trip per batch. In a copy that keeps up, only a run's first batch reads; after a
stall (a slow read of the lake, a retry, a paused process) the read is made.

So a run that lost its lease writes at most the one batch it had already started: a
takeover that lands after the fence and before the end of that write lets the write land,
but it writes exactly the records the new owner writes for the same positions, and its
commit is refused, so the counters never count it. After that the run writes nothing more.
The trust window assumes the server's clock does not jump forward by half a second within
it; if it did, the same at-most-one-batch rule would hold.
"""

from __future__ import annotations

import logging
import math
import time
from functools import partial
from typing import TYPE_CHECKING, Any, Protocol

from lakesync import metrics
from lakesync.copy import BatchResult, CopyEngine
from lakesync.lease import FENCE_TRUST_SECONDS
from lakesync.models import Checkpoint, JobStatus, Outcome
from lakesync.retry import RetryPolicy

if TYPE_CHECKING:
    import pyarrow.compute as pc

    from lakesync.jobstore import JobStore
    from lakesync.lake import Lake, Position
    from lakesync.operations import Operation
    from lakesync.repeats import Superseded

logger = logging.getLogger(__name__)


def summary(s: JobStatus) -> str:
    """The human message of a finished copy (or of a dry run: what a copy would do)."""
    noun = "record" if s.processedRecords == 1 else "records"
    verb = "Dry run, nothing written: a copy of" if s.options.get("mode") == "dry-run" else "Copied"
    text = (
        f"{verb} {s.processedRecords:,} {noun}: {s.insertedRecords:,} inserted, "
        f"{s.updatedRecords:,} updated, {s.unchangedRecords:,} unchanged, "
    )
    if s.duplicateRecords:
        text += f"{s.duplicateRecords:,} duplicate{'' if s.duplicateRecords == 1 else 's'}, "
    text += f"{s.errorRecords:,} rejected"
    if s.deletedRecords:
        text += f", {s.deletedRecords:,} deleted"
    return text


class Run(Protocol):
    """What a whole job or a partition does around each batch of the loop."""

    #: named in retry messages, e.g. "" or " of partition 3 of 8"
    where: str
    #: added to each batch's log line (e.g. the partition's index)
    log_extra: dict[str, Any]

    def fence(self) -> None:
        """LeaseLost unless this run still holds its lease (read before a data write)."""

    def written(self, result: BatchResult, cp: Checkpoint) -> None:
        """After the write, before the commit (e.g. a mirror job remembers the keys)."""

    def commit(self, result: BatchResult, cp: Checkpoint) -> Outcome | None:
        """Commit the batch's counters and checkpoint; an Outcome stops the loop."""


def copy_batches(
    run: Run,
    store: JobStore,
    op: Operation,
    job_id: str,
    lake: Lake,
    start: Position,
    cp: Checkpoint,
    *,
    batch_size: int,
    policy: RetryPolicy,
    stop_file: int | None = None,
    filter: pc.Expression | None = None,
    superseded: Superseded | None = None,
    dry_run: bool = False,
) -> tuple[Outcome | None, Checkpoint]:
    """Copy batches from `start` until the lake (or `stop_file`) ends or the run stops.

    `superseded` are the records a later record of the same key replaces (repeats.py),
    skipped by the engine. Returns how the run stopped (None: the range was copied to its
    end) and the last committed checkpoint.
    """
    engine = CopyEngine(
        store.db[op.collection], store.copyerrors, op.schema_, job_id, superseded, dry_run=dry_run
    )
    held_at = -math.inf  # when the last commit that proved the lease held was sent
    # the lake's reader thread validates, encodes and hashes the next batch meanwhile
    for batch in lake.batches(
        batch_size, start, stop_file=stop_file, filter=filter, prepare=engine.prepare
    ):
        if time.monotonic() - held_at >= FENCE_TRUST_SECONDS:
            policy.call(run.fence, "checking the lease")
        result = policy.call(
            partial(engine.write, batch), f"writing batch {cp.batches + 1}{run.where}"
        )
        end = batch.end
        cp = cp.model_copy(
            update={
                "fileIndex": end.file_index,
                "row": end.row,
                "batches": cp.batches + 1,
                "file": lake.file_name(end.file_index),
            }
        )
        run.written(result, cp)
        sent = time.monotonic()
        outcome = run.commit(result, cp)  # LeaseLost unless the lease is still held
        held_at = sent
        metrics.observe_batch(result.counts, result.write_seconds)
        logger.debug(
            "job %s%s batch %d: %s in %.3f s",
            job_id,
            run.where,
            cp.batches,
            result.counts.model_dump(),
            result.write_seconds,
            extra={
                "jobId": job_id,
                **run.log_extra,
                "batch": cp.batches,
                **result.counts.model_dump(),
                "seconds": round(result.write_seconds, 4),
            },
        )
        if outcome is not None:
            return outcome, cp
    return None, cp
