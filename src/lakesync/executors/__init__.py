"""Where and when jobs run: one interface, an in-process pool and Celery behind it."""

from __future__ import annotations

from typing import Protocol


class Executor(Protocol):
    """Runs submitted jobs somewhere; the job body is always `JobRunner.run`."""

    name: str

    def start(self) -> None:
        """Begin accepting and recovering jobs."""

    def submit(self, job_id: str) -> None:
        """Schedule a run of the job (harmless if it is already running)."""

    def submit_partition(self, job_id: str, index: int) -> None:
        """Schedule a run of one partition of a partitioned job."""

    def shutdown(self, timeout: float) -> None:
        """Stop taking work; let running jobs reach a batch boundary and hand them back."""

    def healthy(self) -> tuple[bool, str]:
        """Whether jobs can run now, and why not."""
