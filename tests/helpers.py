"""Helpers shared by the test modules: child processes, waiting, contract fields, S3, the
browser page. Fixtures stay in conftest.py; a test module imports from here, never from
another test module."""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import itertools
import json
import logging
import os
import pty
import random
import re
import select
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import termios
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import boto3
import httpx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fastapi.testclient import TestClient
from hypothesis import strategies as st
from moto.server import ThreadedMotoServer
from pymongo import MongoClient
from pymongo.collection import Collection

from lakesync.config import Settings
from lakesync.copy import MARKER
from lakesync.models import JobState, JobStatus, Outcome
from lakesync.runtime import Runtime
from lakesync.schema import TASK_DETAIL, validate

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"

#: The job status document of the contract: the seed's fields and lakesync's additions.
CONTRACT_FIELDS = {
    "jobId": str,
    "status": str,
    "operation": str,
    "totalRecords": int,
    "processedRecords": int,
    "insertedRecords": int,
    "updatedRecords": int,
    "errorRecords": int,
    "percentComplete": (int, float),
    "startTime": str,
    "endTime": (str, type(None)),
    "message": (str, type(None)),
    "error": (str, type(None)),
    "options": dict,
    "unchangedRecords": int,
    "updatedAt": (str, type(None)),
    "heartbeatAt": (str, type(None)),
    "attempt": int,
    "recordsPerSecond": (int, float),
    "etaSeconds": (int, float, type(None)),
    "deletedRecords": int,
}
ISO_Z = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$")


def wait_for(fn: Any, timeout: float = 60, every: float = 0.2) -> Any:
    """Poll fn until it returns something truthy. The first polls are 10 ms apart, the gap
    growing by half each time up to ``every``: a condition met at once costs little more
    than its check, and a long wait polls no more often than ``every``."""
    deadline = time.monotonic() + timeout
    gap = min(0.01, every)
    while time.monotonic() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(gap)
        gap = min(gap * 1.5, every)
    raise AssertionError(f"condition not met within {timeout} s")


def wait_done(client: TestClient, job_id: str) -> dict[str, Any]:
    """The job's status once it has ended, read through the API."""

    def done() -> Any:
        s = client.get(f"/api/jobs/{job_id}").json()
        return s if s["status"] in ("completed", "failed", "cancelled") else None

    result: dict[str, Any] = wait_for(done, timeout=60)
    return result


# -- child processes -------------------------------------------------------------------------


def child_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment of a `lakesync` child on the test's server, database and lake (the
    caller's LAKESYNC_ variables left out); ``extra`` adds or overrides variables."""
    assert settings.mongodb_uri is not None
    env = {k: v for k, v in os.environ.items() if not k.startswith("LAKESYNC_")}
    env.update(
        LAKESYNC_MONGODB_URI=settings.mongodb_uri.get_secret_value(),
        LAKESYNC_DATABASE=settings.database,
        LAKESYNC_DATA_DIR=str(settings.data_dir),
        LAKESYNC_LAKE_URI=str(settings.lake_uri),
        LAKESYNC_EMBEDDED_IDLE="0",  # an embedded server a command starts stops with it
    )
    env.update(extra)
    return env


class CliZygote:
    """`python -m lakesync ARGS` as a child forked from tests/clifork.py, which imported
    lakesync once: a real process (environment, working directory, exit code, signals) that
    skips the 1.5-4 s of imports. One zygote per test process, started on first use."""

    def __init__(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("LAKESYNC_")}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.clifork"], cwd=ROOT, env=env,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=True,
        )  # fmt: skip
        self.ids = itertools.count()
        self.kill_below = 0  # commands with a lower id are to be killed (kill_running)
        self.answers: dict[int, dict[str, int]] = {}
        self.changed = threading.Condition()
        self.write_lock = threading.Lock()
        assert self.proc.stdout is not None
        if not self.proc.stdout.readline():  # {"ready": 1}: lakesync imported
            raise RuntimeError("the clifork zygote exited while importing lakesync")
        threading.Thread(target=self._read, name="clifork-answers", daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            message = json.loads(line)
            with self.changed:
                self.answers.setdefault(message.pop("id"), {}).update(message)
                self.changed.notify_all()
        with self.changed:  # the zygote is gone
            self.changed.notify_all()

    def _wait(self, key: int, field: str, deadline: float) -> int | None:
        """The answer ``field`` for command ``key``, or None at the deadline (and at once for
        the status of a command kill_running killed)."""
        with self.changed:
            while field not in self.answers.get(key, {}):
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    return None
                if field == "status" and key < self.kill_below:
                    return None
                self.changed.wait(min(left, 1.0))
            return self.answers[key][field]

    def _fork(self, request: dict[str, Any]) -> tuple[int, int]:
        """Send one command to the zygote; its id and its pid once forked."""
        key = next(self.ids)
        assert self.proc.stdin is not None
        with self.write_lock:
            self.proc.stdin.write(json.dumps({"id": key, **request}).encode() + b"\n")
            self.proc.stdin.flush()
        pid = self._wait(key, "pid", time.monotonic() + 60)
        if pid is None:
            raise RuntimeError(f"the clifork zygote did not start lakesync {request['args']}")
        return key, pid

    def spawn(self, args: list[str], env: dict[str, str], log: Path) -> Forked:
        """Start `python -m lakesync ARGS` (a server, a worker) and return at once: a handle
        like subprocess.Popen's; its stdout and stderr appended to ``log``."""
        key, pid = self._fork({"args": args, "env": env, "cwd": str(Path.cwd()),
                               "out": str(log), "err": str(log), "append": True})  # fmt: skip
        return Forked(self, key, pid, [sys.executable, "-m", "lakesync", *args])

    def spawn_on_terminal(
        self, args: list[str], env: dict[str, str], tty: str, cwd: Path
    ) -> Forked:
        """Start `python -m lakesync ARGS` on the pseudo-terminal at path ``tty`` (its stdin,
        stdout, stderr and controlling terminal, in a session of its own, as a shell starts
        a command) and return at once."""
        key, pid = self._fork({"args": args, "env": env, "cwd": str(cwd), "tty": tty})
        return Forked(self, key, pid, [sys.executable, "-m", "lakesync", *args])

    def run(
        self, args: list[str], env: dict[str, str], timeout: float, cwd: Path | None = None
    ) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "lakesync", *args]
        with tempfile.TemporaryDirectory(prefix="lakesync-cli-") as tmp:
            out, err = Path(tmp) / "out", Path(tmp) / "err"
            deadline = time.monotonic() + timeout
            key, pid = self._fork({"args": args, "env": env, "cwd": str(cwd or Path.cwd()),
                                   "out": str(out), "err": str(err)})  # fmt: skip
            status, killed = None, False
            try:
                status = self._wait(key, "status", deadline)
            finally:
                if status is None:  # timed out, or the test was interrupted: no orphans
                    with contextlib.suppress(OSError):
                        os.killpg(pid, signal.SIGKILL)
                    killed = True
                    status = self._wait(key, "status", time.monotonic() + 30)
                with self.changed:
                    self.answers.pop(key, None)
            stdout = out.read_text(errors="replace") if out.exists() else ""
            stderr = err.read_text(errors="replace") if err.exists() else ""
        if status is None:
            raise RuntimeError(f"the clifork zygote exited while running {command}: {stderr}")
        if killed:
            raise subprocess.TimeoutExpired(command, timeout, output=stdout, stderr=stderr)
        code = os.waitstatus_to_exitcode(status)
        return subprocess.CompletedProcess(command, code, stdout, stderr)

    def kill_running(self) -> None:
        """SIGKILL every command started so far and still running, including those whose
        fork is not yet confirmed (their callers then return at once)."""
        with self.changed:
            self.kill_below = next(self.ids)
            self.changed.notify_all()
            pids = [a["pid"] for a in self.answers.values() if "pid" in a and "status" not in a]
        for pid in pids:
            with contextlib.suppress(OSError):
                os.killpg(pid, signal.SIGKILL)

    def stop(self) -> None:
        """Close the zygote: it kills the commands still running, then exits."""
        if self.proc.poll() is None:
            with contextlib.suppress(OSError):
                assert self.proc.stdin is not None
                self.proc.stdin.close()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)


class Forked:
    """A `lakesync` process forked by the zygote, as subprocess.Popen shows a child: pid,
    returncode (negative: the signal that ended it), poll, wait, send_signal, kill. It leads
    its own process group. Its wait status comes from the zygote, which reaps it."""

    def __init__(self, zygote: CliZygote, key: int, pid: int, args: list[str]) -> None:
        self.zygote, self.key, self.pid, self.args = zygote, key, pid, args
        self.returncode: int | None = None

    def _reaped(self, timeout: float) -> bool:
        """True once the process has ended (returncode set); safe from several threads (a
        reader polling while the test waits)."""
        zygote, deadline = self.zygote, time.monotonic() + timeout
        with zygote.changed:
            while self.returncode is None:
                status = zygote.answers.get(self.key, {}).get("status")
                if status is not None:
                    self.returncode = os.waitstatus_to_exitcode(status)
                    zygote.answers.pop(self.key, None)
                    break
                left = deadline - time.monotonic()
                if left <= 0 or zygote.proc.poll() is not None:
                    return False
                zygote.changed.wait(min(left, 1.0))
        return True

    def poll(self) -> int | None:
        self._reaped(0)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        limit = 10.0**9 if timeout is None else timeout
        if not self._reaped(limit) or self.returncode is None:
            raise subprocess.TimeoutExpired(self.args, limit)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:  # not yet reaped: the pid is still this process's
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


#: a `lakesync` process a test started: forked by the zygote, or a fresh interpreter
Child = Forked | subprocess.Popen[bytes]

_zygote: CliZygote | None = None
_zygote_lock = threading.Lock()


def cli_zygote() -> CliZygote:
    global _zygote
    with _zygote_lock:
        if _zygote is None or _zygote.proc.poll() is not None:
            _zygote = CliZygote()
            atexit.register(_zygote.stop)
        return _zygote


def stop_cli_zygote() -> None:
    if _zygote is not None:
        _zygote.stop()


def lakesync(
    env: dict[str, str], *args: str, timeout: float = 120, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a `lakesync` command to its end (a forked child, see CliZygote); its output as
    text. Raises subprocess.TimeoutExpired, with the output so far, after ``timeout``."""
    return cli_zygote().run(list(args), env, timeout, cwd)


def lakesync_all(
    commands: list[tuple[list[str], dict[str, str]]], timeout: float = 120, parallel: int = 16
) -> list[subprocess.CompletedProcess[str] | subprocess.TimeoutExpired]:
    """Run `lakesync` commands (args, env) ``parallel`` at a time; each one's result in
    order (a TimeoutExpired, with its output so far, for one that outlasted ``timeout``).
    An interrupt or failure cancels the commands not started and kills those running."""

    def one(command: tuple[list[str], dict[str, str]]) -> Any:
        try:
            return lakesync(command[1], *command[0], timeout=timeout)
        except subprocess.TimeoutExpired as e:
            return e

    pool = ThreadPoolExecutor(parallel)
    try:
        return list(pool.map(one, commands))
    except BaseException:  # Ctrl-C, the test's timeout: stop now, not after every command
        pool.shutdown(wait=False, cancel_futures=True)
        cli_zygote().kill_running()
        raise
    finally:
        pool.shutdown(wait=True)


#: servers and workers the tests started, killed (whole process group) at the session's
#: end if a test's own clean-up did not run: a Ctrl-C or a timeout leaves nothing running
SPAWNED: list[Child] = []


def spawned(proc: Child) -> Child:
    SPAWNED[:] = [p for p in SPAWNED if p.poll() is None]
    SPAWNED.append(proc)
    return proc


def kill_spawned() -> None:
    for proc in SPAWNED:
        if proc.poll() is None:
            with contextlib.suppress(OSError):
                if os.getpgid(proc.pid) == proc.pid:  # it leads its own group: all of it
                    os.killpg(proc.pid, signal.SIGKILL)
                else:
                    proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
    SPAWNED.clear()


atexit.register(kill_spawned)


def start_lakesync(args: list[str], env: dict[str, str], log: Path) -> Child:
    """`python -m lakesync ARGS` (a server, a worker) in its own process group, its output
    appended to ``log``, killed at the session's end if the test did not stop it.

    Forked from the zygote (see CliZygote; 1.5-8 s of imports saved a start): a real
    process that can be signalled, killed and crash. A fresh interpreter where the
    environment changes how Python starts (a PYTHON* variable of its own: PYTHONPATH
    bringing a sitecustomize, say), which a fork would not honour."""
    log.touch()  # a forked child opens it later: a test may read it before then
    python = {k: v for k, v in env.items() if k.startswith("PYTHON")}
    if python == {k: v for k, v in os.environ.items() if k.startswith("PYTHON")}:
        return spawned(cli_zygote().spawn(args, env, log))
    with open(log, "ab") as out:
        return spawned(subprocess.Popen(
            [sys.executable, "-m", "lakesync", *args], env=env, stdout=out,
            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        ))  # fmt: skip


def start_worker(env: dict[str, str], log: Path) -> Child:
    """A `lakesync worker` (Celery) in its own process group, its output in ``log``."""
    return start_lakesync(["worker", "--concurrency", "2"], env, log)


def stop_workers(workers: list[Child]) -> None:
    """SIGTERM each worker's process group (a warm shutdown), SIGKILL any still up after 15 s."""
    for w in workers:
        if w.poll() is None:
            os.killpg(w.pid, signal.SIGTERM)
    for w in workers:
        try:
            w.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(w.pid, signal.SIGKILL)


#: colours and cursor moves a terminal interprets
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07|\x1b[()][A-Z0-9]")


def visible(raw: str) -> list[str]:
    """The lines a person sees: colours and cursor moves removed, each redraw its own line."""
    return [line.rstrip() for line in re.split(r"\r\n|\r|\n", ANSI.sub("", raw))]


@dataclass
class Terminal:
    """A `lakesync` command on a pseudo-terminal of 80 x 24, as its controlling terminal.

    Forked from the zygote (CliZygote.spawn_on_terminal: a real process on a real terminal,
    without 1-4 s of imports); ``fresh``: a fresh `python -m lakesync` instead, where how a
    new interpreter starts on a terminal and takes the keyboard's Ctrl-C is the point."""

    args: list[str]
    env: dict[str, str]
    columns: int = 80
    fresh: bool = False
    raw: bytearray = field(default_factory=bytearray)
    proc: Child | None = None
    _fd: int = -1
    _slave: int = -1
    _reader: threading.Thread | None = None

    def start(self) -> Terminal:
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, self.columns, 0, 0))
        env = {k: v for k, v in self.env.items() if k not in ("COLUMNS", "LINES")}
        env["TERM"] = "xterm-256color"

        def controlling_tty() -> None:  # in the child: a session of its own, this pty its tty
            os.setsid()
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)

        if self.fresh:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "lakesync", *self.args], env=env, cwd=ROOT,
                stdin=slave, stdout=slave, stderr=slave, preexec_fn=controlling_tty,
            )  # fmt: skip
            os.close(slave)
        else:  # the slave stays open here until the end: the child opens it after the fork
            self.proc = cli_zygote().spawn_on_terminal(self.args, env, os.ttyname(slave), ROOT)
            self._slave = slave
        self._fd = master
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        return self

    def _read(self) -> None:
        while True:
            ready, _, _ = select.select([self._fd], [], [], 0.05)
            if not ready:
                if self.proc is not None and self.proc.poll() is not None:
                    # the child is gone; drain what is left
                    ready, _, _ = select.select([self._fd], [], [], 0.05)
                    if not ready:
                        return
                continue
            try:
                chunk = os.read(self._fd, 65536)
            except OSError:  # EIO: every end of the slave is closed
                return
            if not chunk:
                return
            self.raw.extend(chunk)

    @property
    def text(self) -> str:
        return bytes(self.raw).decode("utf-8", "replace")

    @property
    def lines(self) -> list[str]:
        return visible(self.text)

    def type(self, keys: str) -> None:
        os.write(self._fd, keys.encode())

    def ctrl_c(self) -> None:
        """What the keyboard sends: the line discipline turns it into SIGINT to the
        terminal's foreground process group."""
        self.type("\x03")

    def wait_for_text(self, text: str, timeout: float = 60) -> None:
        wait_for(lambda: text in "\n".join(self.lines), timeout=timeout, every=0.05)

    def wait(self, timeout: float = 120) -> int:
        assert self.proc is not None and self._reader is not None
        try:
            code = self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
        self._reader.join(10)
        os.close(self._fd)
        if self._slave >= 0:
            os.close(self._slave)
        return code


def write_operations(path: Path, operations: dict[str, dict[str, Any]]) -> Path:
    """A lakesync.toml declaring ``operations`` (name -> its keys and values)."""
    tables = [
        f"[operations.{name}]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in keys.items())
        for name, keys in operations.items()
    ]
    path.write_text("\n".join(tables))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServeProcess:
    """`lakesync serve` in a child process, with its environment and log."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.env = env
        self.log = log
        self.port = free_port()
        self.proc: Child | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60) -> ServeProcess:
        self.proc = start_lakesync(["serve", "--port", str(self.port)], self.env, self.log)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"serve exited ({self.proc.returncode}): {self.log.read_text()[-3000:]}"
                )
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.05)  # a start takes 0.5-2 s: a short poll, not a fifth of it
        raise RuntimeError(f"serve did not start: {self.log.read_text()[-3000:]}")

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def terminate(self, timeout: float = 15) -> float:
        """SIGTERM and wait; returns how long the exit took."""
        assert self.proc is not None
        started = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout)
        return time.monotonic() - started


class SlowLink:
    """A TCP proxy to the test's MongoDB server that delays every request by `delay` seconds.

    Tests that must see a copy mid-way (progress on a page, a restart during a copy) use it
    instead of counting on the machine being slow: with 10 ms per request, a copy of 5,000
    records in batches of 20 lasts several seconds on any machine.
    """

    def __init__(self, upstream: tuple[str, int], delay: float) -> None:
        self.upstream, self.delay = upstream, delay
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def uri(self) -> str:
        return f"mongodb://127.0.0.1:{self.port}/?directConnection=true"

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.upstream)
            for src, dst, delay in ((client, server, self.delay), (server, client, 0.0)):
                threading.Thread(target=self._pump, args=(src, dst, delay), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket, delay: float) -> None:
        try:
            while chunk := src.recv(1 << 16):
                if delay:
                    time.sleep(delay)
                dst.sendall(chunk)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.listener.close()


# -- faults ---------------------------------------------------------------------------------


def inject(monkeypatch: pytest.MonkeyPatch, error: Exception, times: int = 10**6) -> None:
    """Make reads and writes of `taskdetails` raise `error` (a driver error that echoes the
    URI), whichever calls the copy engine uses."""
    left = [times]

    def failing(name: str) -> Any:
        real = getattr(Collection, name)

        def call(self: Collection[Any], *args: Any, **kwargs: Any) -> Any:
            if self.name == "taskdetails" and left[0] > 0:
                left[0] -= 1
                raise error
            return real(self, *args, **kwargs)

        return call

    for name in ("bulk_write", "insert_many", "find", "delete_many"):
        monkeypatch.setattr(Collection, name, failing(name))


# -- S3 (moto) ------------------------------------------------------------------------------

REGION = "us-east-1"


@contextlib.contextmanager
def aws_test_env() -> Iterator[None]:
    """Test credentials; the caller's AWS profile, config and instance role stay out."""
    with pytest.MonkeyPatch.context() as mp:
        for key in [k for k in os.environ if k.startswith("AWS_")]:
            mp.delenv(key)
        mp.setenv("AWS_ACCESS_KEY_ID", "testing")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        mp.setenv("AWS_CONFIG_FILE", os.devnull)
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
        mp.setenv("AWS_EC2_METADATA_DISABLED", "true")
        yield


def start_moto_thread() -> tuple[ThreadedMotoServer, str]:
    """moto in this process on a free loopback port (its request log silenced)."""
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    return server, f"http://{host}:{port}"


def s3_client(url: str) -> Any:
    return boto3.client("s3", endpoint_url=url, region_name=REGION)


def upload(url: str, local: Path, bucket: str, prefix: str) -> None:
    s3 = s3_client(url)
    if bucket not in [b["Name"] for b in s3.list_buckets()["Buckets"]]:
        s3.create_bucket(Bucket=bucket)
    for path in sorted(local.rglob("*")):
        if path.is_file():
            s3.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(local).as_posix()}")


def s3_settings(settings: Settings, url: str, **update: Any) -> Settings:
    return settings.model_copy(
        update={"lake_uri": "s3://lake/tasks", "s3_endpoint_url": url, "s3_region": REGION} | update
    )


def run_job(rt: Runtime, source: str, **options: Any) -> Any:
    """Start a copy and run it inline, run after run, until it ends; return its status."""
    status, created = rt.jobs.start("copy-taskdetail", {"source": source, **options}, trusted=True)
    assert created
    for _ in range(100):
        if rt.runner.run(status.jobId) is not Outcome.CONTINUE:
            break
    return rt.jobs.get(status.jobId)


# -- the web page in Chromium ---------------------------------------------------------------

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

# Records every aria-valuenow of #progress, every transport mode the page goes through, and
# the record counts shown in the jobs table's rows of running jobs.
RECORDER = """
window.__progress = [];
window.__transport = [];
window.__rows = [];
document.addEventListener("DOMContentLoaded", () => {
  const bar = document.getElementById("progress");
  const transport = document.getElementById("transport");
  new MutationObserver(() => {
    for (const tr of document.querySelectorAll('#jobs-body tr[data-status="in_progress"]'))
      window.__rows.push(tr.querySelector(".c-num").textContent);
  }).observe(document.getElementById("jobs-body"),
             { subtree: true, childList: true, characterData: true, attributes: true });
  new MutationObserver(() => {
    const v = bar.getAttribute("aria-valuenow");
    if (v !== null) window.__progress.push(Number(v));
  }).observe(bar, { attributes: true, attributeFilter: ["aria-valuenow"] });
  new MutationObserver(() => window.__transport.push(transport.dataset.mode))
    .observe(transport, { attributes: true, attributeFilter: ["data-mode"] });
});
"""


class PageRun:
    """One browser context + page, collecting uncaught script errors."""

    def __init__(self, browser: Any, width: int = 1280, height: int = 900) -> None:
        self.context = browser.new_context(viewport={"width": width, "height": height})
        self.context.add_init_script(RECORDER)
        self.page = self.context.new_page()
        self.page.set_default_timeout(30_000)  # a generous wait: the machine may be busy
        self.errors: list[str] = []
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))

    def shot(self, name: str) -> Path:
        ARTIFACTS.mkdir(exist_ok=True)
        path = ARTIFACTS / f"page-{name}.png"
        self.page.evaluate("window.scrollTo(0, 0)")  # the sticky header stays on top
        self.page.screenshot(path=str(path), full_page=True)
        return path

    def close(self) -> None:
        self.context.close()
        assert not self.errors, f"script errors on the page: {self.errors}"


# -- lakes whose keys repeat (test_repeats, test_manyfiles) ---------------------------------

TS = pa.timestamp("ms", tz="UTC")
T0 = datetime(2026, 1, 1, tzinfo=UTC)
SCHEMA = pa.schema(
    [
        ("taskDetailId", pa.string()),
        ("taskId", pa.string()),
        ("projectId", pa.string()),
        ("assignee", pa.string()),
        ("status", pa.string()),
        ("hoursLogged", pa.float64()),
        ("estimateHours", pa.float64()),
        ("startedAt", TS),
        ("completedAt", TS),
        ("updatedAt", TS),
        ("tags", pa.list_(pa.string())),
        ("notes", pa.string()),
    ]
)


def record(key: str, version: int, bad: bool = False) -> dict[str, Any]:
    return {
        "taskDetailId": key,
        "taskId": "T-" + key,
        "projectId": "PRJ-001",
        "assignee": None,
        "status": "todo",
        "hoursLogged": -1.0 if bad else float(version),
        "estimateHours": None,
        "startedAt": None,
        "completedAt": None,
        "updatedAt": T0 + timedelta(seconds=version),
        "tags": [f"v{version}"],
        "notes": f"v{version}",
    }


def write_lake(root: Path, files: list[list[dict[str, Any]]]) -> Path:
    root.mkdir(parents=True)
    for i, rows in enumerate(files):
        pq.write_table(pa.Table.from_pylist(rows, SCHEMA), root / f"part-{i:03d}.parquet")
    return root


def drawn_files(
    keys: int, versions: int, rows: tuple[int, int], files: tuple[int, int]
) -> st.SearchStrategy[list[list[dict[str, Any]]]]:
    """Files of records for a property test: keys K0.. repeated within and across files,
    versions 1.. in any order, and some records bad (a drawn flag, on even versions)."""
    drawn = st.tuples(st.integers(0, keys - 1), st.integers(1, versions), st.booleans())
    lake = st.lists(
        st.lists(drawn, min_size=rows[0], max_size=rows[1]), min_size=files[0], max_size=files[1]
    )
    return lake.map(
        lambda data: [[record(f"K{k}", v, bad=b and v % 2 == 0) for k, v, b in f] for f in data]
    )


def versioned_lake(root: Path, keys: int = 600, versions: int = 6, seed: int = 3) -> Path:
    """Files holding versions v1..vN of the same keys (newest last), with repeats inside
    files too, and bad records in several files (a bad newest record loses to the good one
    before it)."""
    rng = random.Random(seed)
    files = []
    for v in range(1, versions + 1):
        picked = [f"K{k:05d}" for k in range(keys) if rng.random() < 0.8]
        rows = [record(k, v, bad=rng.random() < 0.03) for k in picked]
        rows += [record(k, v) for k in rng.sample(picked, 20)]  # same version again, same file
        rng.shuffle(rows)
        files.append(rows)
    return write_lake(root, files)


def reference(lake: Path) -> tuple[dict[str, str], dict[str, int]]:
    """The result of one careful sequential copy into an empty collection."""
    winners: dict[str, str] = {}
    valid = bad = 0
    for path in sorted(lake.glob("*.parquet")):
        table = pq.read_table(path)
        checked = validate(TASK_DETAIL, table)
        bad += len(checked.rejections)
        notes = table.column("notes").to_pylist()
        for key, row in zip(checked.keys, checked.rows, strict=True):
            winners[key] = notes[row]
            valid += 1
    counts = {
        "processedRecords": valid + bad,
        "insertedRecords": len(winners),
        "updatedRecords": 0,
        "unchangedRecords": 0,
        "duplicateRecords": valid - len(winners),
        "errorRecords": bad,
    }
    return winners, counts


def counts_of(s: JobStatus) -> dict[str, int]:
    return {k: getattr(s, k) for k in (
        "processedRecords", "insertedRecords", "updatedRecords", "unchangedRecords",
        "duplicateRecords", "errorRecords")}  # fmt: skip


def stored(db: Any) -> dict[str, str]:
    return {d["_id"]: d["notes"] for d in db.taskdetails.find({}, {"notes": 1})}


def assert_like_reference(s: JobStatus, db: Any, lake: Path) -> None:
    winners, expected = reference(lake)
    assert s.status == JobState.COMPLETED, (s.message, s.error)
    assert counts_of(s) == expected
    assert s.processedRecords == s.totalRecords
    assert stored(db) == winners
    assert db.copyerrors.count_documents({"jobId": s.jobId}) == s.errorRecords
    assert all(d[MARKER]["job"] == s.jobId for d in db.taskdetails.find({}, {MARKER: 1}))


def fresh(settings: Settings, lake: Path, **more: Any) -> Settings:
    return settings.model_copy(
        update={"lake_uri": str(lake), "database": "t_" + uuid.uuid4().hex[:12], **more}
    )


def run_whole(settings: Settings) -> JobStatus:
    with Runtime(settings) as rt:
        job, _ = rt.jobs.start("copy-taskdetail", {}, trusted=True)
        rt.runner.run(job.jobId)
        return rt.jobs.get(job.jobId)


def run_partitioned(settings: Settings, order: str, seed: int = 0, least: int = 3) -> JobStatus:
    """Plan the partitions (at least ``least``), then run each partition's runs one at a time
    in ``order``."""
    rt = Runtime(settings, executor="local")
    queued: list[tuple[str, int]] = []
    rt.executor.submit = lambda job_id: None  # type: ignore[method-assign,union-attr]
    rt.runner.partitioned.submit = lambda j, i: queued.append((j, i))  # type: ignore[union-attr]
    with rt:
        job, _ = rt.jobs.start("copy-taskdetail", {}, trusted=True)
        rt.runner.run(job.jobId)
        assert len(queued) >= least, "the lake should split into several partitions"
        steps = list(queued)
        if order == "reverse":
            steps.reverse()
        elif order == "random":
            random.Random(seed).shuffle(steps)
        for step in steps:
            rt.runner.partitioned.run(*step)  # type: ignore[union-attr]
        return rt.jobs.get(job.jobId)


def database_of(settings: Settings) -> Any:
    """A handle on the database of ``settings`` (a new client: close it with the database)."""
    uri = settings.mongodb_uri.get_secret_value() if settings.mongodb_uri else ""
    client: MongoClient[dict[str, Any]] = MongoClient(uri, tz_aware=True)
    return client[settings.database]


CORPUS_NS = 1_700_000_000_123_456_789  # ns: 2023-11-14T22:13:20.123456789Z


def write_corpus(lake: Path) -> pa.Table:
    """Every type nx-27017 stores, nulls at every level, and rows it cannot store (last)."""
    lake.mkdir(parents=True)
    n = 6
    base = datetime(2024, 1, 1, tzinfo=UTC)
    table = pa.table({
        "id": pa.array(range(n), pa.int64()),
        "day": pa.array([date(2024, 1, 1) + timedelta(days=i) for i in range(n)]),
        "at": pa.array([CORPUS_NS + i * 1_000_001_001 for i in range(n)], pa.timestamp("ns")),
        "at_us": pa.array([None, *(CORPUS_NS // 1000 + i for i in range(1, n))],
                          pa.timestamp("us", tz="America/New_York")),
        "time": pa.array([i * 1_000_001 for i in range(n)], pa.time64("us")),
        "dur": pa.array([i for i in range(n)], pa.duration("ms")),
        "u64": pa.array([2**63 - 1 - i for i in range(n - 1)] + [2**64 - 1], pa.uint64()),
        "f32": pa.array([0.25 * i for i in range(n)], pa.float32()),
        "bin": pa.array([bytes([i]) * i for i in range(n)]),
        "tags": pa.array([[str(i), None] if i % 2 else None for i in range(n)]),
        "smap": pa.array([[(f"k{i}", i), ("n", None)] for i in range(n)],
                         pa.map_(pa.string(), pa.int32())),
        "imap": pa.array([[(i, "v")] for i in range(n)], pa.map_(pa.int64(), pa.string())),
        "rows": pa.array([[{"a": i, "b": [base + timedelta(hours=i), None]}, None]
                          for i in range(n)],
                         pa.list_(pa.struct([("a", pa.int64()),
                                             ("b", pa.list_(pa.timestamp("ms", tz="UTC")))]))),
        "struct": pa.array([{"x": None if i == 2 else {"y": float(i)}} for i in range(n)]),
        "dec": pa.array([None] * (n - 2) + [Decimal("1.25"), None], pa.decimal128(6, 2)),
        "nan": pa.array([1.0] * (n - 3) + [float("nan"), 1.0, 1.0]),
    })  # fmt: skip
    pq.write_table(table.slice(0, 3), lake / "a.parquet")
    # int96, as Spark and Impala write it: 9999-12-31T03:00Z must not wrap to 1816
    late = datetime(9999, 12, 31, 3, tzinfo=UTC)
    pq.write_table(table.slice(3), lake / "b.parquet", use_deprecated_int96_timestamps=True)
    spark = pa.table({"id": pa.array([100], pa.int64()),
                      "at": pa.array([late], pa.timestamp("us", tz="UTC"))})  # fmt: skip
    pq.write_table(spark, lake / "c.parquet", use_deprecated_int96_timestamps=True)
    return table
