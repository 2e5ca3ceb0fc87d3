"""Prometheus metrics of this process: records by kind, batch latency, runs, resumes, retries.

Counters are per process (reset when it restarts); `lakesync_jobs` is read from the status
store at each scrape, so every process reports the same, shared numbers. Each stage records
its own: the runner the runs and jobs executing here (runner.RUNNING), the batch loop and
the mirror's deletes each batch, the plan the resumes, the store boundary the retries.
"""

from __future__ import annotations

from collections.abc import Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from lakesync.models import Counters, JobState

REGISTRY = CollectorRegistry(auto_describe=True)

RECORDS = Counter(
    "lakesync_records",
    "Records handled by copy jobs, by outcome "
    "(inserted, updated, unchanged, duplicate, error, deleted)",
    ["kind"],
    registry=REGISTRY,
)
BATCH_SECONDS = Histogram(
    "lakesync_batch_write_seconds",
    "Time to write one batch to MongoDB",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
    registry=REGISTRY,
)
ACTIVE = Gauge(
    "lakesync_active_jobs", "Jobs with a run executing in this process", registry=REGISTRY
)
ACTIVE_RUNS = Gauge(
    "lakesync_active_runs",
    "Runs executing in this process (a partitioned job has one per partition running)",
    registry=REGISTRY,
)
RESUMES = Counter(
    "lakesync_resumes", "Job runs that continued from a checkpoint", registry=REGISTRY
)
RETRIES = Counter(
    "lakesync_retries", "MongoDB calls retried after a transient error", registry=REGISTRY
)
JOBS = Gauge("lakesync_jobs", "Jobs in the status store, by status", ["status"], registry=REGISTRY)
MONGODB_UP = Gauge(
    "lakesync_mongodb_up", "1 if MongoDB answered the last scrape, else 0", registry=REGISTRY
)

for _kind in ("inserted", "updated", "unchanged", "duplicate", "error"):
    RECORDS.labels(kind=_kind)  # present (at 0) from the first scrape, so rate() works


def observe_batch(counts: Counters, write_seconds: float) -> None:
    """Record one committed batch."""
    RECORDS.labels(kind="inserted").inc(counts.inserted)
    RECORDS.labels(kind="updated").inc(counts.updated)
    RECORDS.labels(kind="unchanged").inc(counts.unchanged)
    RECORDS.labels(kind="duplicate").inc(counts.duplicates)
    RECORDS.labels(kind="error").inc(counts.errors)
    if counts.deleted:
        RECORDS.labels(kind="deleted").inc(counts.deleted)
    BATCH_SECONDS.observe(write_seconds)


def set_job_counts(counts: Mapping[str, int]) -> None:
    """Set `lakesync_jobs` from the store's count per status (absent statuses are 0)."""
    for state in JobState:
        JOBS.labels(status=state.value).set(counts.get(state.value, 0))
