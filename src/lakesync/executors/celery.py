"""The Celery executor: the API submits, `lakesync worker` processes run jobs.

Tasks are acknowledged late and rejected when the worker is lost, so the broker redelivers
a killed worker's job; the job is claimed atomically in MongoDB, so a duplicate delivery
finds it owned and returns at once, and the new run resumes from the checkpoint.

A job or partition is sent once per pending state: sending marks its document `queued`
(atomically, so two workers' recovery scans cannot both send it) and a claim or a
hand-back clears the mark. The recovery scan therefore does not send again what waits in
the queue, unless no run claimed it within max(60 s, two leases) and no run holds a live
lease (workers idle): on Redis a message a
killed worker had received stays unacknowledged for the visibility timeout (12 h), so
the mark alone could keep the document pending that long (lease.QUEUED_TRUST_SECONDS).
"""

from __future__ import annotations

import logging

from celery import Celery

from lakesync.boundary import partition_leases
from lakesync.config import Settings
from lakesync.errors import ConfigError, StoreError
from lakesync.jobstore import JobStore
from lakesync.masking import masked
from lakesync.models import PARTITIONS

logger = logging.getLogger(__name__)

TASK = "lakesync.run_job"
PARTITION_TASK = "lakesync.run_partition"
QUEUE = "lakesync"


def _broker(settings: Settings) -> str:
    if settings.broker_url is None:
        raise ConfigError(
            "LAKESYNC_EXECUTOR=celery needs LAKESYNC_BROKER_URL, e.g. redis://127.0.0.1:6379/0 "
            "or amqp://guest:guest@127.0.0.1:5672//."
        )
    return settings.broker_url.get_secret_value()


def make_celery(settings: Settings) -> Celery:
    """A Celery app for lakesync's one task, configured for at-least-once delivery."""
    app = Celery("lakesync", broker=_broker(settings))
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_default_queue=QUEUE,
        task_serializer="json",
        accept_content=["json"],
        broker_connection_retry_on_startup=False,
        broker_transport_options={"visibility_timeout": 12 * 3600},
        worker_hijack_root_logger=False,
        result_backend=None,
        task_ignore_result=True,
    )
    return app


def check_broker(app: Celery, settings: Settings, timeout: float = 5.0) -> None:
    """Raise StoreError naming the broker (password masked) if it cannot be reached."""
    where = masked(_broker(settings))
    try:
        with app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=timeout)
    except Exception as e:
        raise StoreError(
            f"Cannot reach the Celery broker at {where}: {masked(str(e))[:200]}. Check "
            "LAKESYNC_BROKER_URL and that Redis or RabbitMQ is running."
        ) from None


class CeleryExecutor:
    """Submits jobs as Celery tasks; the API process runs nothing itself."""

    name = "celery"

    def __init__(self, settings: Settings, store: JobStore) -> None:
        self.settings = settings
        self.app = make_celery(settings)
        self.store = store
        self.parts = partition_leases(store.db[PARTITIONS])
        self._started = False

    def start(self) -> None:
        """Check the broker answers."""
        check_broker(self.app, self.settings)
        self._started = True

    def submit(self, job_id: str) -> None:
        """Enqueue one run of the job, unless one waits in the queue already."""
        if self.store.leases.mark_queued(job_id):
            self.app.send_task(TASK, args=[job_id], queue=QUEUE)

    def submit_partition(self, job_id: str, index: int) -> None:
        """Enqueue one run of a partition (any worker may take it), unless one waits."""
        if self.parts.mark_queued(f"{job_id}:{index}"):
            self.app.send_task(PARTITION_TASK, args=[job_id, index], queue=QUEUE)

    def shutdown(self, timeout: float) -> None:
        """Nothing runs here; workers keep going."""
        self._started = False

    def healthy(self) -> tuple[bool, str]:
        """Healthy when the broker answers."""
        try:
            check_broker(self.app, self.settings, timeout=2.0)
        except StoreError as e:
            return False, str(e)
        return True, "celery executor, broker reachable"
