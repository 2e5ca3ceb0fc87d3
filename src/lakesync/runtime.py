"""Wires one process together: settings -> MongoDB -> store -> runner -> executor -> service."""

from __future__ import annotations

import logging
from types import TracebackType

from lakesync import joblog, rejections
from lakesync.boundary import ensure_plan_indexes
from lakesync.config import Settings
from lakesync.executors import Executor
from lakesync.jobstore import JobStore
from lakesync.mongo import Mongo
from lakesync.notify import Notifier
from lakesync.operations import OperationRegistry
from lakesync.runner import JobRunner
from lakesync.scheduler import Scheduler
from lakesync.service import JobService

logger = logging.getLogger(__name__)


class Runtime:
    """Everything a lakesync process needs; `executor` is "local", "celery" or None (inline)."""

    def __init__(
        self,
        settings: Settings,
        executor: str | None = None,
        *,
        reads_lake: bool = False,
        short: bool = False,
    ) -> None:
        """`short`: a short command's (see Mongo)."""
        self.settings = settings
        self.registry = OperationRegistry.from_settings(settings)
        self.mongo = Mongo(settings, short=short)
        try:
            self.mongo.ping()
            self.store = JobStore(self.mongo.db, settings.status_ttl_days)
            self.store.ensure_indexes()
            ensure_plan_indexes(self.mongo.db)
            joblog.ensure_indexes(self.mongo.db, settings.status_ttl_days)
            rejections.ensure_indexes(self.store.copyerrors)
            if reads_lake and settings.lake_uri is None:
                from lakesync.demo import ensure_demo_lake

                ensure_demo_lake(settings)
            self.runner = JobRunner(settings, self.store, self.registry)
            self.executor: Executor | None = self._executor(executor)
            if self.executor is not None:  # else a job's run copies its partitions itself
                self.runner.partitioned.submit = self.executor.submit_partition
            self.runner.partitioned.ensure_indexes()
            self.runner.watermarks.canonicalise()
            self.notifier = Notifier(settings, self.registry, self.mongo.db, self.runner.owner)
            self.notifier.ensure_indexes()  # the webhook outbox (notifications)
        except BaseException:
            self.mongo.close()
            raise
        self.jobs = JobService(settings, self.store, self.registry, self.executor)
        self.store.on_end = self.notifier.job_ended
        self.notifier.ended_here = self.store.ended_here  # the ends this process wrote
        self.scheduler = Scheduler(
            settings, self.registry, self.store, self.jobs, owner=self.runner.owner
        )
        self.job_log = joblog.install(self.mongo.db)  # each job's own log lines (joblogs)
        self._closed = self._stopped = False

    def _executor(self, kind: str | None) -> Executor | None:
        if kind is None:
            return None
        if kind == "celery":
            from lakesync.executors.celery import CeleryExecutor

            celery: Executor = CeleryExecutor(self.settings, self.store)
            return celery
        from lakesync.executors.local import LocalExecutor

        return LocalExecutor(self.runner, self.settings.workers, self.settings.lease_seconds)

    def start(self) -> Runtime:
        """Start the executor (and with it, recovery of jobs left running)."""
        if self.executor is not None:
            self.mongo.watch()  # the embedded server kept up, whoever started it
            self.executor.start()
            self.scheduler.start()
            self.notifier.start()  # deliveries of the outbox, whoever put them there
        return self

    @property
    def stopping(self) -> bool:
        """True once the process shuts down: event streams then end."""
        return self._stopped

    def stop_jobs(self, timeout: float = 8.0) -> None:
        """Hand running jobs back at a batch boundary, while MongoDB is still up, so the
        next start (of this or another process) resumes them at once."""
        if self._stopped:
            return
        self._stopped = True
        if self.executor is not None:
            logger.info("shutting down: handing running jobs back at a batch boundary")
        self.runner.stop.set()
        self.scheduler.stop()
        if self.executor is not None:
            self.executor.shutdown(timeout)
            logger.info("running jobs handed back")

    def close(self, timeout: float = 8.0) -> None:
        """Hand running jobs back, then disconnect (and stop the embedded server)."""
        if self._closed:
            return
        self._closed = True
        self.stop_jobs(timeout)
        self.notifier.close(timeout, drain=self.executor is None)
        joblog.uninstall(self.job_log)
        self.mongo.close()

    def __enter__(self) -> Runtime:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
