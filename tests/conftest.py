"""Real-server fixtures: the embedded MongoDB-wire server, demo lakes, `lakesync serve`."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
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


def wait_for(fn: Any, timeout: float = 60, every: float = 0.2) -> Any:
    """Poll fn until it returns something truthy."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"condition not met within {timeout} s")
