"""`lakesync worker`: a Celery worker process that runs jobs and partitions.

It builds a Runtime (MongoDB, the job store, the runner), so it lives above both the
runtime and the Celery executor; the executor itself only sends tasks.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from lakesync.config import Settings
from lakesync.executors.celery import PARTITION_TASK, QUEUE, TASK, check_broker, make_celery
from lakesync.models import Outcome
from lakesync.runtime import Runtime

logger = logging.getLogger(__name__)


def run_worker(settings: Settings, concurrency: int | None) -> None:
    """`lakesync worker`: check MongoDB and the broker, then consume jobs until stopped."""
    app = make_celery(settings)
    check_broker(app, settings)
    runtime = Runtime(settings, executor="celery", reads_lake=True)  # submits partitions
    submit = runtime.executor
    partitioned = runtime.runner.partitioned
    assert submit is not None
    stop = threading.Event()

    @app.task(name=TASK, bind=True, acks_late=True, reject_on_worker_lost=True)  # type: ignore[untyped-decorator]
    def run_job(task: Any, job_id: str) -> str:
        outcome = runtime.runner.run(job_id)
        if outcome is Outcome.CONTINUE and not runtime.runner.stop.is_set():
            submit.submit(job_id)
        return outcome.value

    @app.task(name=PARTITION_TASK, bind=True, acks_late=True, reject_on_worker_lost=True)  # type: ignore[untyped-decorator]
    def run_partition(task: Any, job_id: str, index: int) -> str:
        outcome = partitioned.run(job_id, index)
        if outcome is Outcome.CONTINUE and not runtime.runner.stop.is_set():
            submit.submit_partition(job_id, index)
        return outcome.value

    def recover() -> None:
        while not stop.wait(max(1.0, min(settings.lease_seconds / 2, 15.0))):
            try:
                for job_id in runtime.store.stale(settings.lease_seconds):
                    logger.debug("job %s: pending or its lease expired; enqueuing it", job_id)
                    submit.submit(job_id)
                for job_id, index in partitioned.stale():
                    logger.debug("job %s: enqueuing partition %d", job_id, index + 1)
                    submit.submit_partition(job_id, index)
            except Exception as e:
                logger.warning("recovery scan failed: %s", e)

    threading.Thread(target=recover, name="lakesync-recovery", daemon=True).start()
    runtime.mongo.watch()  # the embedded server kept up, whoever started it
    runtime.scheduler.start()
    runtime.notifier.start()  # webhook deliveries of the outbox, whoever put them there
    try:
        app.worker_main(
            [
                "worker",
                "--loglevel",
                settings.log_level,
                "--queues",
                QUEUE,
                "--concurrency",
                str(concurrency or settings.workers),
                "--pool",
                "threads",
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
            ]
        )
    finally:
        stop.set()
        runtime.close()
