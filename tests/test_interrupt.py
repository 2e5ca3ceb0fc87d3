"""One Ctrl-C (SIGINT) stops a `make test` run and everything it started (tests/interrupt.py).

A small run of two pytest-xdist workers, each test with a `lakesync serve` (forked from the
zygote, on the embedded server), a child in the worker's process group and one in a
session of its own that no clean-up of the test stops. The run is started as a shell's
background job starts it (SIGINT ignored), and one SIGINT goes to the controller alone.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest
from tests.helpers import ROOT, wait_for

pytestmark = pytest.mark.slow

INNER = """
import subprocess, sys, time

import pytest


@pytest.mark.parametrize("n", range(4))
def test_runs_until_interrupted(n, serve, tmp_path):
    assert serve.proc.poll() is None
    sleeper = [sys.executable, "-c", "import time; time.sleep(600)"]
    subprocess.Popen(sleeper)  # in the worker's process group
    subprocess.Popen(sleeper, start_new_session=True)  # left running by the test
    (tmp_path.parent.parent / f"running-{n}").write_text("")
    time.sleep(600)
"""


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def test_one_sigint_to_the_controller_stops_the_run_and_all_it_started(tmp_path: Path) -> None:
    (tmp_path / "test_inner.py").write_text(textwrap.dedent(INNER))
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PYTEST_", "LAKESYNC_"))}  # fmt: skip
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(ROOT), env.get("PYTHONPATH", "")])
    base = tmp_path / "base"

    def background_job() -> None:  # as `pytest ... &` in a script: SIGINT ignored
        signal.signal(signal.SIGINT, signal.SIG_IGN)

    log = (tmp_path / "run.log").open("wb")
    run = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-p", "tests.conftest", "-p", "no:cacheprovider",
         "-c", os.devnull, "--rootdir", str(tmp_path), "--basetemp", str(base), "-n", "2",
         "-q", str(tmp_path / "test_inner.py")],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        preexec_fn=background_job, start_new_session=True,
    )  # fmt: skip
    controller = psutil.Process(run.pid)
    started: list[psutil.Process] = []
    try:
        # both workers in a test: its serve, embedded server, zygote and children up
        wait_for(lambda: len(list(base.glob("running-*"))) >= 2, timeout=240, every=0.5)
        started = controller.children(recursive=True)
        names = " ".join(" ".join(p.cmdline()) for p in started)
        assert "tests.clifork" in names and "nx_27017" in names, names
        assert sum("time.sleep(600)" in " ".join(p.cmdline()) for p in started) >= 4, names
        run.send_signal(signal.SIGINT)  # once, to the controller alone
        took = time.monotonic()
        code = run.wait(90)
        deadline = time.monotonic() + 30  # the controller is gone: what it left, if anything
        while (left := [p for p in started if _alive(p)]) and time.monotonic() < deadline:
            time.sleep(0.2)
        took = time.monotonic() - took
        left_names = [" ".join(p.cmdline())[:100] for p in left]
    finally:
        for p in [controller, *started]:
            if _alive(p):
                p.kill()
        log.close()
    output = (tmp_path / "run.log").read_text()
    assert not left_names, (left_names, output[-3000:])
    assert code == 2, output[-3000:]  # pytest's "interrupted"
    assert "KeyboardInterrupt" in output, output[-3000:]
    assert took < 90
