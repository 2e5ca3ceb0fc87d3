"""Real-server fixtures: the embedded MongoDB-wire server, demo lakes, `lakesync serve`."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pymongo import MongoClient

from lakesync.config import Settings, load_settings
from lakesync.demo import generate
from lakesync.mongo import EmbeddedServer

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests configure lakesync explicitly; nothing leaks in from the caller's environment."""
    for key in list(os.environ):
        if key.startswith("LAKESYNC_"):
            monkeypatch.delenv(key)
    from lakesync.config import get_settings

    get_settings.cache_clear()


@pytest.fixture(scope="session")
def mongo_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedServer]:
    """One nx-27017 server for the session; each test gets its own database."""
    server = EmbeddedServer(tmp_path_factory.mktemp("mongo")).start()
    yield server
    server.stop()


@pytest.fixture
def mongo_uri(mongo_server: EmbeddedServer) -> str:
    return mongo_server.uri


@pytest.fixture
def database() -> str:
    return "t_" + uuid.uuid4().hex[:12]


@pytest.fixture(scope="session")
def demo_lake(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """5,000 TaskDetail records, 25 of them bad. Read-only: copy it before changing it."""
    out = tmp_path_factory.mktemp("lake") / "tasks"
    generate(out, 5000, bad_rows=25, seed=7)
    return out


@pytest.fixture
def settings(mongo_uri: str, database: str, tmp_path: Path, demo_lake: Path) -> Settings:
    return load_settings(
        mongodb_uri=mongo_uri, database=database, data_dir=tmp_path / "data",
        lake_uri=str(demo_lake), lease_seconds=3, retry_budget_seconds=10,
        allowed_hosts=["127.0.0.1", "localhost", "testserver"],  # TestClient's Host
    )  # fmt: skip


@pytest.fixture
def db(mongo_uri: str, database: str) -> Iterator[Any]:
    client: MongoClient[dict[str, Any]] = MongoClient(mongo_uri, tz_aware=True)
    yield client[database]
    client.drop_database(database)
    client.close()


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
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60) -> ServeProcess:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "lakesync", "serve", "--port", str(self.port)],
                env=self.env, stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"serve exited: {self.log.read_text()[-3000:]}")
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
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


@pytest.fixture
def serve_env(settings: Settings, tmp_path: Path) -> dict[str, str]:
    """Environment for a `lakesync serve` child that uses the test's database and lake.

    Job sources may be the lake or anything under the test's tmp_path (allowed roots).
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("LAKESYNC_")}
    env.update(
        LAKESYNC_MONGODB_URI=settings.mongodb_uri.get_secret_value()
        if settings.mongodb_uri
        else "",
        LAKESYNC_DATABASE=settings.database,
        LAKESYNC_DATA_DIR=str(settings.data_dir),
        LAKESYNC_LAKE_URI=settings.lake_uri or "",
        LAKESYNC_LEASE_SECONDS="3",
        LAKESYNC_RETRY_BUDGET_SECONDS="10",
        LAKESYNC_ALLOWED_ROOTS=json.dumps([settings.lake_uri, str(tmp_path)]),
    )
    return env


@pytest.fixture
def serve(serve_env: dict[str, str], tmp_path: Path) -> Iterator[ServeProcess]:
    """A started `lakesync serve`; tests may change `serve_env` before asking for it."""
    proc = ServeProcess(serve_env, tmp_path / "serve.log").start()
    yield proc
    proc.kill()


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


@pytest.fixture
def slow_database(serve_env: dict[str, str], mongo_server: EmbeddedServer) -> Iterator[SlowLink]:
    """`serve_env` pointed at the test's server through a link adding 10 ms per request."""
    link = SlowLink(("127.0.0.1", mongo_server.port), delay=0.01)
    serve_env["LAKESYNC_MONGODB_URI"] = link.uri
    yield link
    link.close()


def wait_for(fn: Any, timeout: float = 60, every: float = 0.2) -> Any:
    """Poll fn until it returns something truthy."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"condition not met within {timeout} s")
