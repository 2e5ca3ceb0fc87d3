"""The plan stage: what a job copies, decided once and kept in MongoDB.

A job's first run resolves its operation, opens the source, scans the watermark column,
plans the repeated keys (repeats.py), decides the partitions and persists all of it: the
files' listing and the repeats plan (`jobplans`), the partitions (`jobpartitions`), and the
total, checkpoint and pinned options on the job document. A resumed run, or a partition's
run, reopens the same source from that plan (no footer read, the same files and versions).

What a run copies is a `Slice` of the plan: a whole job is one slice, each partition is one.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import pyarrow.compute as pc

from lakesync import metrics, mirror
from lakesync.boundary import COUNTERS, SliceLease, Store, now_ms
from lakesync.config import Settings
from lakesync.errors import SourceError, TransientSourceError
from lakesync.lake import Lake, Listing
from lakesync.mirror import MirrorSet, key_type
from lakesync.models import Checkpoint, JobState, JobStatus
from lakesync.operations import Mode, Operation, OperationRegistry, ResolvedJob
from lakesync.repeats import Superseded
from lakesync.schema import check_columns
from lakesync.watermarks import lake_filter, later, reach_back, scan, shown, watermark_column

logger = logging.getLogger(__name__)

#: how the `message` of a job being planned starts (the contract fixes the `status` values:
#: a job plans `in_progress`, and says so here); the CLI's bar and the page read it
PLANNING = "Planning: "


@dataclass
class Slice:
    """What one run copies: the whole job, or one partition of it."""

    op: Operation
    lake: Lake
    #: where the run starts: its last committed checkpoint
    cp: Checkpoint
    batch_size: int
    superseded: Superseded
    stop_file: int | None = None
    filter: pc.Expression | None = None
    dry_run: bool = False
    #: a mirror job's key set (the keys it read)
    seen: MirrorSet | None = None


def file_ranges(rows_per_file: list[int], target_rows: int) -> list[tuple[int, int]]:
    """Consecutive file ranges [start, stop) of about `target_rows` records each."""
    ranges: list[tuple[int, int]] = []
    start, rows = 0, 0
    for i, n in enumerate(rows_per_file):
        rows += n
        if rows >= target_rows:
            ranges.append((start, i + 1))
            start, rows = i + 1, 0
    if start < len(rows_per_file):
        if ranges and rows < target_rows // 2:
            ranges[-1] = (ranges[-1][0], len(rows_per_file))  # fold a small tail in
        else:
            ranges.append((start, len(rows_per_file)))
    return ranges


def open_source(
    job: ResolvedJob,
    settings: Settings,
    only: list[str] | None = None,
    first_index: int = 0,
    known: Listing | None = None,
    keep: list[str] | None = None,
    since_read_at: int | None = None,
) -> Lake:
    """The job's lake, at the Delta version or Iceberg snapshot (and from the version or
    snapshot) the job pinned; with ``only``, just those of its files; ``known``: the files'
    facts the job kept; ``keep``: columns of small files to read at open; ``since_read_at``:
    when the copy that read the version it starts from ended (``Lake.open``)."""
    return Lake.open(
        job.source,
        format=job.op.format,
        settings=settings,
        version=job.options.deltaVersion,
        since_version=job.options.sinceDeltaVersion,
        snapshot_id=job.options.icebergSnapshotId,
        since_snapshot_id=job.options.sinceIcebergSnapshotId,
        catalog=job.op.catalog_for(job.source),
        only=only,
        first_index=first_index,
        known=known,
        keep=keep,
        csv=job.op.csv_options(),
        since_read_at=since_read_at,
    )


@dataclass
class Planner:
    """Plans jobs and opens the slices their runs copy."""

    settings: Settings
    store: Store
    registry: OperationRegistry

    def plan(
        self,
        lease: SliceLease,
        status: JobStatus,
        split: bool,
        on_progress: Callable[[JobStatus], None] | None = None,
    ) -> tuple[JobStatus, Slice | None]:
        """A whole job's run: plan it (first run) or reopen its plan (a resumed run).

        Returns the job's status and its one slice; with `split`, a new full copy may be
        planned as partitions instead (`status.partitions`, no slice here): their own runs
        copy them (`partition`). A first run says in the job's `message` what it plans
        (`Planning: ...`, see PLANNING), and tells `on_progress`.
        """
        job = self.registry.resolve(status.operation, status.options, self.settings)
        op, options = job.op, job.options
        dry_run = options.mode == "dry-run"  # a full copy's counts, written nowhere
        mode: Mode = "full" if options.mode == "dry-run" else options.mode or op.mode
        mirror.check_source(op, options, job.source, self.settings)  # the lake setting may change
        first = status.checkpoint is None
        if first:  # seconds on a large lake, before any record is copied: say so
            status = self._say(lease, status, f"{PLANNING}listing the lake's files", on_progress)
        # a resumed run reads the files' facts its first run kept: no footers
        known = None if first else self.store.load_listing(status.jobId)
        lake = self._open(job, mode, first, known)
        check_columns(op.schema_, lake.schema, lake.uri)
        seen = None
        if mode == "mirror":
            kind = key_type(op.schema_, lake)
            seen = MirrorSet(
                self.store.jobs.db, op.collection, status.jobId, kind, options.allowEmpty
            )
        if first:
            status = self._first(lease, status, job, lake, mode, dry_run, seen, split, on_progress)
            if status.partitions:
                return status, None
        elif status.attempt > 1:  # a run after a pause, a crash or a time limit
            metrics.RESUMES.inc()
            status = self.store.update_run(
                status.jobId,
                lease.owner,
                message=f"Resumed (run {status.attempt}) at record "
                f"{status.processedRecords:,} of {status.totalRecords:,}",
            )
        cp = status.checkpoint or Checkpoint()
        # A Delta version's files never change, so its range needs no upper bound; that also
        # keeps records above `until`'s last whole millisecond, which files added later
        # cannot bring back
        reading = lake_filter(lake, cp.since, cp.until if lake.version is None else None)
        superseded = self.store.superseded(status.jobId)
        piece = Slice(op, lake, cp, job.batch_size, superseded, None, reading, dry_run, seen)
        return status, piece

    def _first(
        self,
        lease: SliceLease,
        status: JobStatus,
        job: ResolvedJob,
        lake: Lake,
        mode: Mode,
        dry_run: bool,
        seen: MirrorSet | None,
        split: bool,
        on_progress: Callable[[JobStatus], None] | None,
    ) -> JobStatus:
        """The first run's plan: watermark range, total, repeated keys, listing, partitions."""
        op, job_id = job.op, status.jobId
        cp, total = self._range(job, lake, mode)
        keys = f"{PLANNING}finding repeated keys in {total:,} records"
        status = self._say(lease, status, keys, on_progress)
        # which records a later record of the same key replaces: skipped by every run
        planned = lake_filter(lake, cp.since, cp.until if lake.version is None else None)
        by = [cp.since.column] if cp.since is not None else []
        spill = self.settings.data_dir / "plans"  # where a large plan waits
        self.store.plan_repeats(job_id, lake, op.schema_, planned, by, op.collection, spill)
        lake.drop_kept()  # the plan's columns read at open: the copy reads whole records
        # each file's size, rows and schema: partitions and resumed runs read no footer
        self.store.save_listing(job_id, lake.listing())
        if split and mode == "full" and not dry_run:
            parted = self._partitions(lease, status, job.source, lake, total, cp)
            if parted is not None:
                return parted
        # a resumed run keeps mode and version
        pinned = {**status.options, "mode": "dry-run" if dry_run else mode, "source": job.source}
        pinned |= lake.pins()
        if seen is not None:
            self.store.sweep_key_sets()
            self.store.begin_keys(seen)
        what = f"{total:,} records" + (f" changed since {shown(cp.since)}" if cp.since else "")
        return self.store.update_run(
            job_id,
            lease.owner,
            totalRecords=total,
            checkpoint=cp.model_dump(),
            options=pinned,
            message=f"Copying {what}",
        )

    def _say(
        self,
        lease: SliceLease,
        status: JobStatus,
        message: str,
        on_progress: Callable[[JobStatus], None] | None,
    ) -> JobStatus:
        """Set the job's message (what the run does now) and tell `on_progress`."""
        status = self.store.update_run(status.jobId, lease.owner, message=message)
        if on_progress:
            on_progress(status)
        return status

    def _range(self, job: ResolvedJob, lake: Lake, mode: Mode) -> tuple[Checkpoint, int]:
        """The watermark range a first run copies (pinned in its checkpoint) and its total."""
        op = job.op
        column = watermark_column(op, lake, mode)
        saved = since = until = None
        changed = 0
        if column is not None:
            if mode == "incremental":
                saved = self.store.watermark(op.name, job.source, column)
                # of the files a table version added since the last copy (Delta,
                # Iceberg), only the newer records: a rewrite's files carry old rows
                since = reach_back(saved, op.lookback)
            changed, until = scan(lake, column, since)
            until = later(until, saved)  # a watermark never moves back
        # the file it starts in: named if the reader crashes before the first commit
        cp = Checkpoint(since=since, until=until, file=lake.file_name(0) if lake.files else None)
        total = changed if column is not None else lake.count_rows()  # scan counted them
        return cp, total

    def _partitions(
        self,
        lease: SliceLease,
        status: JobStatus,
        source: str,
        lake: Lake,
        total: int,
        cp: Checkpoint,
    ) -> JobStatus | None:
        """Plan the job's partitions (`jobpartitions`); None when one partition is enough.

        `cp` carries the watermark the copy reaches (`until`), saved at completion.
        """
        counts = lake.file_row_counts()
        ranges = file_ranges(counts, self.settings.partition_rows)
        if len(ranges) < 2:
            return None
        docs = [
            {
                "_id": f"{status.jobId}:{i}",
                "jobId": status.jobId,
                "index": i,
                "fileStart": a,
                "fileStop": b,
                "rows": sum(counts[a:b]),
                "files": [lake.file_name(f) for f in range(a, b)],
                "status": JobState.PENDING.value,
                "leaseBeat": 0,
                "attempt": 0,
                "createdAt": status.startTime,
                **{k: 0 for k in COUNTERS},
            }
            for i, (a, b) in enumerate(ranges)
        ]
        self.store.insert_parts(docs)
        return self.store.update_run(
            status.jobId,
            lease.owner,
            totalRecords=total,
            partitions=len(ranges),
            partitionsDone=0,
            partitionedAtMs=now_ms(),
            checkpoint=cp.model_dump(),
            options={**status.options, "mode": "full", "source": source} | lake.pins(),
            message=f"Copying {total:,} records in {len(ranges)} partitions",
        )

    def _open(self, job: ResolvedJob, mode: str, first_run: bool, known: Listing | None) -> Lake:
        """The job's lake. An incremental copy of a Delta (or Iceberg) table opens only the
        files added since the version (snapshot) the last completed copy read: neither format
        changes a file in place, so every record added or changed since then lies in them, and
        the other files are not even opened. The first run looks that version up; it is pinned
        in the options (`sinceDeltaVersion`, `sinceIcebergSnapshotId`), so a resumed run opens
        the same files. When it can no longer be listed (its log was cleaned up, the table was
        recreated, the source is no Delta table), or it was committed after the copy that
        recorded it ended (the table was recreated and has reached that version number
        again), the whole version is read, with the watermark filter as for plain files.

        The first run reads the columns the plan of repeated keys needs (the keys and the
        watermark) from small files in the same pass as their footers (``Lake.open``'s
        ``keep``): the plan then costs no request for them.
        """
        op = job.op
        since = job.options.sinceDeltaVersion
        since_snapshot = job.options.sinceIcebergSnapshotId
        keep = [*op.schema_.key_columns, *([op.watermark] if op.watermark else [])]
        keep_first = keep if first_run else None
        read_at = None  # checked on the first run; a resumed run keeps what it decided
        if first_run and mode == "incremental" and op.watermark:
            since, since_snapshot, read_at = self.store.watermark_versions(
                op.name, job.source, op.watermark
            )
        if since is not None or since_snapshot is not None:
            pins = {"sinceDeltaVersion": since, "sinceIcebergSnapshotId": since_snapshot}
            narrowed = replace(job, options=job.options.model_copy(update=pins))
            try:
                return open_source(
                    narrowed, self.settings, known=known, keep=keep_first, since_read_at=read_at
                )
            except TransientSourceError:
                raise
            except SourceError as e:
                what = f"Delta version {since}"
                if since is None:
                    what = f"Iceberg snapshot {since_snapshot}"
                logger.warning(
                    "%s: cannot list the files added to %s since %s (%s); reading the whole table",
                    op.name,
                    job.source,
                    what,
                    e,
                )
        whole = job.options.model_copy(
            update={"sinceDeltaVersion": None, "sinceIcebergSnapshotId": None}
        )
        return open_source(replace(job, options=whole), self.settings, known=known, keep=keep_first)

    def partition(self, job: JobStatus, part: dict[str, Any]) -> Slice:
        """A partition's slice: its files, as the job's first run listed them."""
        resolved = self.registry.resolve(job.operation, job.options, self.settings)
        # each file's size, rows and schema as the job's first run found them: no footers
        known = self.store.load_listing(job.jobId)
        stop = None
        if part.get("files") is not None:  # the files it was planned with, whatever changed
            files, first_file = part["files"], int(part["fileStart"])
            lake = open_source(resolved, self.settings, files, first_file, known)
            first = 0
        else:  # planned before partitions recorded their files: a range of the file list
            lake = open_source(resolved, self.settings, known=known)
            first, stop = int(part["fileStart"]), int(part["fileStop"])
        superseded = self.store.superseded(job.jobId, lake.files)
        cp = Checkpoint.model_validate(part.get("checkpoint") or {"fileIndex": first})
        return Slice(resolved.op, lake, cp, resolved.batch_size, superseded, stop)
