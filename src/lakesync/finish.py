"""The finish stage: what happens once a job's slices are copied, or the job stops for good.

The last slice's run completes the job: a mirror's delete phase (the documents the lake no
longer holds, a page per commit), the job's counters (its partitions' sums), its final
status and message (`JobStore.finish`, which in the same write flags it for the webhook
outbox: notify.py) and, once completed, the operation's watermark (`syncstate`). A
cancel, a failure or a run that gave up end the job here too.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from lakesync import metrics, mirror
from lakesync.boundary import SliceLease
from lakesync.errors import LakesyncError
from lakesync.models import Checkpoint, Counters, JobState, JobStatus, Outcome
from lakesync.slices import Clock, Stopped, interrupted
from lakesync.watermarks import shown

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


def lowered(text: str) -> str:
    return text[0].lower() + text[1:]


def cancel(lease: SliceLease, status: JobStatus) -> Outcome:
    """End a job whose cancel was seen after a commit (a partition's run stops its own)."""
    lease.settle(JobState.CANCELLED)
    if status.state.is_final:  # another run ended it
        return Outcome.ENDED
    if lease.partitioned:
        status = lease.store.aggregate(status)  # the latest sums of all partitions
    lease.end(
        status,
        JobState.CANCELLED,
        f"Cancelled after {status.processedRecords:,} of {status.totalRecords:,} records; "
        + lowered(summary(status)),
    )
    return Outcome.ENDED


def ended(stopped: Stopped, lease: SliceLease, status: JobStatus) -> Outcome | None:
    """The outcome of a run its slice's copy stopped before the end; None when DONE."""
    if stopped is Stopped.CANCELLED:
        return cancel(lease, status)
    if stopped is Stopped.HANDED_BACK:
        return Outcome.CONTINUE
    return None


def complete(
    lease: SliceLease,
    status: JobStatus,
    clock: Clock,
    stop: threading.Event,
    seen: mirror.MirrorSet | None = None,
    on_progress: Callable[[JobStatus], None] | None = None,
) -> Outcome:
    """After a slice was copied to its end: settle it and, if it was the job's last,
    complete the job (mirror deletes, counters, status, watermark)."""
    lease.settle(JobState.COMPLETED)
    final = lease.totals(status)
    if final.state.is_final or final.partitionsDone != final.partitions:
        if on_progress:  # another partition's run ends the job
            on_progress(final)
        return Outcome.ENDED
    if seen is not None:
        stopped = _mirror(lease, final, seen, clock, stop, on_progress)
        if stopped is not None:
            return stopped
        final = lease.store.get(lease.job_id)
    cp = final.checkpoint or Checkpoint()
    message = summary(final)
    if cp.since is not None:
        message += f" (records changed since {shown(cp.since)})"
    if (warning := lease.store.order_warning(lease.job_id)) is not None:
        message += f". {warning}"
    done = lease.end(final, JobState.COMPLETED, message)  # or cancelled: JobStore.finish
    mode = str(final.options.get("mode") or "full")
    if done is not None and done.state is JobState.COMPLETED and cp.until and mode != "dry-run":
        _save_watermark(lease, final, cp, mode)
    if on_progress:
        on_progress(done or final)
    return Outcome.ENDED


def _save_watermark(lease: SliceLease, job: JobStatus, cp: Checkpoint, mode: str) -> None:
    """Move the operation's watermark (with the Delta version or Iceberg snapshot read,
    pinned in the job's options); a failure only makes the next copy read more."""
    assert cp.until is not None
    pins = {
        k: int(job.options[k])
        for k in ("deltaVersion", "icebergSnapshotId")
        if job.options.get(k) is not None
    }
    source = str(job.options.get("source", ""))
    try:
        lease.store.save_watermark(job.operation, source, cp.until, job.jobId, mode, pins)
        logger.info("job %s: watermark of %s is now %s", job.jobId, job.operation, shown(cp.until))
    except LakesyncError as e:
        logger.error(
            "job %s: could not record the watermark %s (%s); the next "
            "incremental copy reads from the previous one",
            job.jobId,
            shown(cp.until),
            e,
        )


def _mirror(
    lease: SliceLease,
    final: JobStatus,
    seen: mirror.MirrorSet,
    clock: Clock,
    stop: threading.Event,
    on_progress: Callable[[JobStatus], None] | None,
) -> Outcome | None:
    """Mirror's delete phase, unless refused; an Outcome if the run ends before its end."""
    store = lease.store
    refused = mirror.refusal(final, seen.target.name, seen.allow_empty)
    if refused is None and not store.keys_intact(seen):
        refused = mirror.LOST
    if refused is not None:
        lease.end(final, JobState.FAILED, f"{summary(final)}; nothing deleted", refused)
        store.drop_key_set(lease.job_id)  # a resumed run would refuse again: not needed
        return Outcome.ENDED
    status, cp = final, final.checkpoint or Checkpoint()
    if cp.mirrorPending:  # counted by a run that died before deleting them
        store.delete(seen, cp.mirrorPending)
    while (page := store.missing_page(seen, cp.mirrorAfter)) is not None:
        last, gone = page
        cp = cp.model_copy(
            update={"batches": cp.batches + 1, "mirrorAfter": last, "mirrorPending": gone}
        )
        derived = {
            "message": "Deleting records the lake no longer holds: "
            f"{status.deletedRecords + len(gone):,} so far"
        }
        status = lease.commit(status, Counters(deleted=len(gone)), cp, derived)
        started = time.perf_counter()
        store.delete(seen, gone)
        metrics.observe_batch(Counters(deleted=len(gone)), time.perf_counter() - started)
        if on_progress:
            on_progress(status)
        if (stopped := interrupted(lease, status, clock, stop)) is not None:
            return ended(stopped, lease, status)
    return None
