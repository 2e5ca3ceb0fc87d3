"""How far a job's id travels: the modules a job's run reaches, and in which order.

A newcomer follows a job from `JobRunner.run` through the code. Every module the job's id
is handed to is one more to read, so the path is measured: a profiler sees each call into
a module of lakesync, and the call counts when one of its arguments (``self`` included) is
the job's id or carries it (a text holding it, a dict or list with such a value, an object
whose ``jobId`` or ``job_id`` is it). The modules are listed in the order first reached.

Traced: the thread of the job's run and the threads it starts (heartbeat, the lake's
reader). Not counted: what the logging machinery calls (handlers, filters, formatters: the
job's code calls `logging`, not them); errors made with the job's id in their message
(errors.py: they report back up, e.g. a heartbeat that ticks once after its partition
settled, which load makes happen or not); and the process's own services that a job only
wakes (the webhook dispatcher, the job log's writer), which serve and worker start before
any job runs.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

import pytest

import lakesync
from lakesync.config import Settings
from lakesync.models import JobState
from lakesync.runtime import Runtime

PACKAGE = str(Path(lakesync.__file__).parent) + "/"
LOGGING = str(Path(logging.__file__).parent) + "/"

#: the most modules a job's id may reach, whole or partitioned (see the README's layout)
LIMIT = 10


def carries(value: Any, job_id: str, depth: int = 0) -> bool:
    """Whether `value` is the job's id or carries it (one level into containers)."""
    if isinstance(value, str):
        return job_id in value
    if isinstance(value, Mapping):
        return depth == 0 and any(carries(v, job_id, 1) for v in list(value.values())[:50])
    if isinstance(value, list | tuple):
        return depth == 0 and any(carries(v, job_id, 1) for v in value[:50])
    fields = getattr(value, "__dict__", None)
    if not isinstance(fields, dict):
        return False
    return job_id in (fields.get("jobId"), fields.get("job_id"))


class JobPath:
    """A profile function: the modules of lakesync a job's id reaches, in order."""

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        self.reached: dict[str, str] = {}  # module -> the first call that reached it

    def __call__(self, frame: FrameType, event: str, arg: Any) -> None:
        if event != "call":
            return
        code = frame.f_code
        path = code.co_filename
        if not path.startswith(PACKAGE):
            return
        module = path[len(PACKAGE) : -3].replace("/", ".")
        if module in self.reached or isinstance(frame.f_locals.get("self"), BaseException):
            return  # an error naming the job reports back up; it hands the id down to no one
        names = code.co_varnames[: code.co_argcount + code.co_kwonlyargcount]
        for name in names:
            if carries(frame.f_locals.get(name), self.job_id) and not _from_logging(frame):
                self.reached[module] = f"{code.co_name}({name})"
                return

    @contextmanager
    def tracing(self) -> Iterator[JobPath]:
        sys.setprofile(self)
        threading.setprofile(self)  # threads the job starts: heartbeat, the lake's reader
        try:
            yield self
        finally:
            threading.setprofile(None)  # type: ignore[arg-type]
            sys.setprofile(None)

    @property
    def modules(self) -> list[str]:
        return list(self.reached)

    def __str__(self) -> str:
        lines = [f"{len(self.reached)} modules:"]
        lines += [f"  {i}. {m:12} {call}" for i, (m, call) in enumerate(self.reached.items(), 1)]
        return "\n".join(lines)


def _from_logging(frame: FrameType | None) -> bool:
    """Whether the logging machinery made this call (a handler, filter or formatter)."""
    while frame is not None:
        if frame.f_code.co_filename.startswith(LOGGING):
            return True
        frame = frame.f_back
    return False


def assert_down_the_layers(path: JobPath) -> None:
    modules = path.modules
    assert modules[0] == "runner", str(path)
    assert len(modules) <= LIMIT, str(path)
    # plan, then run, then finish: no stage is reached before the one above it
    assert modules.index("plan") < modules.index("slices") < modules.index("finish"), str(path)


def test_a_whole_job_reaches_few_modules_down_the_layers(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="lakesync")  # as serve logs: job lines, joblogs
    with Runtime(settings) as rt:
        rt.notifier.start()  # as serve and worker do before any job runs
        status, _ = rt.jobs.start("copy-taskdetail")
        with JobPath(status.jobId).tracing() as path:
            rt.runner.run(status.jobId)
        assert rt.jobs.get(status.jobId).state is JobState.COMPLETED
    print(path)
    assert_down_the_layers(path)


def test_a_partitioned_job_reaches_few_modules_down_the_layers(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="lakesync")
    with Runtime(settings.model_copy(update={"partition_rows": 1000})) as rt:
        rt.notifier.start()
        queued: list[tuple[str, int]] = []
        rt.runner.partitioned.submit = lambda job_id, i: queued.append((job_id, i))
        status, _ = rt.jobs.start("copy-taskdetail")
        with JobPath(status.jobId).tracing() as path:
            rt.runner.run(status.jobId)  # plans the partitions and dispatches them
            for job_id, index in queued:  # each as an executor's worker runs it
                rt.runner.partitioned.run(job_id, index)
        done = rt.jobs.get(status.jobId)
        assert done.state is JobState.COMPLETED and (done.partitions or 0) >= 2, done
    print(path)
    assert_down_the_layers(path)
