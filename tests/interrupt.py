"""One Ctrl-C (SIGINT) stops the whole test run: the pytest-xdist controller, its workers
and everything they started. Hooked in by tests/conftest.py (both in the controller and in
each worker).

Why one SIGINT did not stop a run:

- A run started as a background job of a non-interactive shell (`pytest ... &` in a script,
  a CI step, a tool's shell) inherits SIGINT *ignored*, and Python leaves an ignored SIGINT
  ignored: the controller and its workers (which inherit the disposition) never saw it.
  The run now takes SIGINT back (``take_sigint``).
- A SIGINT sent to the controller alone (`kill -INT PID`, a runner that signals one
  process) ended the controller's loop, but the workers went on with their tests until
  xdist killed them 10 s later with SIGKILL, so no clean-up ran and what they had started
  in sessions of their own (a fresh `python -m lakesync`, a server a test starts itself)
  outlived the run. The controller now passes the SIGINT on to its workers, whose fixtures
  then stop what they started, and after the workers are gone it kills whatever they had
  started that is still running (``Interrupt``).
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from types import FrameType
from typing import Any

import psutil


def take_sigint() -> None:
    """SIGINT raises KeyboardInterrupt, also where the run was started with it ignored."""
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def interrupt_once(signum: int, frame: FrameType | None) -> None:
    """A worker's SIGINT handler: the first one interrupts the test; a second one (a Ctrl-C
    in a terminal reaches the worker and the controller, which passes its own on) must not
    interrupt the clean-up that the first one started."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise KeyboardInterrupt


class Interrupt:
    """In the xdist controller: on Ctrl-C, the workers are interrupted too (``begin``), and
    once xdist has ended them, whatever they started and left running is killed
    (``finish``): the processes below the controller, noted at the interrupt and again
    before xdist ends its workers."""

    def __init__(self) -> None:
        self.config: Any = None  # set by conftest's pytest_configure
        self.interrupted = False
        self.left: dict[int, psutil.Process] = {}

    def _note(self) -> list[psutil.Process]:
        me = psutil.Process()
        with contextlib.suppress(psutil.Error):
            for p in me.children(recursive=True):
                self.left.setdefault(p.pid, p)
        return me.children()

    def begin(self) -> None:
        if self.interrupted:
            return
        self.interrupted = True
        for worker in self._note():
            with contextlib.suppress(psutil.Error):
                worker.send_signal(signal.SIGINT)

    def before_teardown(self) -> None:
        if self.interrupted:
            self._note()

    def finish(self, timeout: float = 10) -> None:
        """Kill what is left (each process that leads a group: its whole group)."""
        if not self.interrupted:
            return
        procs = list(self.left.values())
        _wait(procs, 3)  # what the workers' clean-up is still stopping
        for p in procs:
            with contextlib.suppress(psutil.Error, OSError):
                if _running(p):
                    if os.getpgid(p.pid) == p.pid and p.pid != os.getpgid(0):
                        os.killpg(p.pid, signal.SIGKILL)  # a group of its own: all of it
                    else:
                        p.kill()
        _wait(procs, timeout)


def _running(p: psutil.Process) -> bool:
    """Still running: the same process (psutil compares its start time), not a zombie (an
    orphan's exit that nobody has reaped yet)."""
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _wait(procs: list[psutil.Process], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while any(_running(p) for p in procs) and time.monotonic() < deadline:
        time.sleep(0.1)
