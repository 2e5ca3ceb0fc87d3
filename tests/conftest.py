"""Real-server fixtures: the embedded MongoDB-wire server, demo lakes, `lakesync serve`."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import uuid
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr
from pymongo import MongoClient
from tests import interrupt
from tests.helpers import (
    CHROMIUM,
    CHROMIUM_ARGS,
    PageRun,
    ServeProcess,
    SlowLink,
    aws_test_env,
    child_env,
    free_port,
    kill_spawned,
    start_moto_thread,
    stop_cli_zygote,
    wait_for,
)

from lakesync.api.app import create_app
from lakesync.config import Settings, load_settings
from lakesync.demo import generate
from lakesync.mongo import EmbeddedServer
from lakesync.runtime import Runtime

#: The modules whose tests take longest (docs/testing.md, --durations), longest first. They
#: run first, their `slow` tests first: with `make test`'s --maxschedchunk the workers
#: take tests a few at a time, so the long ones spread over them and no worker ends the run
#: alone with a long test (the tests after them are short, and fill in the gaps).
LONGEST_FIRST = [
    "test_partitions.py", "test_faults.py", "test_openapi.py", "test_interrupt.py",
    "test_leases.py", "test_s3.py", "test_netlify_page.py", "test_manyfiles.py", "test_page.py",
    "test_terminal.py", "test_hardening.py", "test_masking.py", "test_encode.py",
]  # fmt: skip


_INTERRUPT = interrupt.Interrupt()


def _controller(config: pytest.Config) -> bool:
    """Whether this process is the controller of pytest-xdist workers."""
    return config.pluginmanager.hasplugin("dsession") and not hasattr(config, "workerinput")


def pytest_configure(config: pytest.Config) -> None:
    """One Ctrl-C stops the run (tests/interrupt.py): SIGINT is taken back where the run
    inherited it ignored; a worker is interrupted once, its clean-up not a second time."""
    interrupt.take_sigint()
    if hasattr(config, "workerinput"):
        signal.signal(signal.SIGINT, interrupt.interrupt_once)
    _INTERRUPT.config = config


def pytest_keyboard_interrupt() -> None:
    """In the xdist controller: its workers are interrupted too (a SIGINT to the controller
    alone left them running their tests until xdist killed them, their clean-up skipped)."""
    if _INTERRUPT.config is not None and _controller(_INTERRUPT.config):
        _INTERRUPT.begin()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_sessionfinish() -> Generator[None, object, object]:
    _INTERRUPT.before_teardown()  # (xdist ends its workers in its own sessionfinish)
    return (yield)


def pytest_unconfigure() -> None:
    """After an interrupt: whatever the workers started and left running is killed."""
    _INTERRUPT.finish()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def weight(item: pytest.Item) -> tuple[int, int]:
        name = item.path.name
        if name not in LONGEST_FIRST:
            return len(LONGEST_FIRST), 0
        return LONGEST_FIRST.index(name), 0 if item.get_closest_marker("slow") else 1

    items.sort(key=weight)  # stable: each module's tests stay together, in their order


@pytest.fixture(scope="session", autouse=True)
def _no_orphans() -> Iterator[None]:
    """When the session ends (Ctrl-C and timeouts included), the `lakesync` command zygote
    is closed, killing the commands still running, and so is every server or worker a test
    started and did not stop (tests.helpers.SPAWNED)."""
    yield
    kill_spawned()
    stop_cli_zygote()


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Tests configure lakesync explicitly; nothing leaks in from the caller's environment."""
    for key in list(os.environ):
        if key.startswith("LAKESYNC_"):
            monkeypatch.delenv(key)
    # never the user's own data folder
    monkeypatch.setenv("LAKESYNC_DATA_DIR", str(tmp_path_factory.getbasetemp() / "user-data"))
    # a short command's embedded server stops with it (none outlives the session); the
    # servers left up for the next command are tested on their own (test_mongo)
    monkeypatch.setenv("LAKESYNC_EMBEDDED_IDLE", "0")
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
    # the retry budget is lakesync's default: a busy machine's slow answers are no outage
    # (10 s ran out under load); the tests about the budget set their own
    return load_settings(
        mongodb_uri=mongo_uri, database=database, data_dir=tmp_path / "data",
        lake_uri=str(demo_lake), lease_seconds=3, retry_budget_seconds=60,
        allowed_hosts=["127.0.0.1", "localhost", "testserver"],  # TestClient's Host
    )  # fmt: skip


@pytest.fixture
def slow_settings(settings: Settings, mongo_server: EmbeddedServer) -> Iterator[Settings]:
    """`settings` reaching MongoDB through a link adding 10 ms per request: for tests that
    need a copy to outlast a time limit whatever the machine's speed."""
    link = SlowLink(("127.0.0.1", mongo_server.port), delay=0.01)
    yield settings.model_copy(update={"mongodb_uri": SecretStr(link.uri)})
    link.close()


@pytest.fixture
def db(mongo_uri: str, database: str) -> Iterator[Any]:
    client: MongoClient[dict[str, Any]] = MongoClient(mongo_uri, tz_aware=True)
    yield client[database]
    client.drop_database(database)
    client.close()


@pytest.fixture
def serve_env(settings: Settings, tmp_path: Path) -> dict[str, str]:
    """Environment for a `lakesync serve` child that uses the test's database and lake.

    Job sources may be the lake or anything under the test's tmp_path (allowed roots).
    """
    return child_env(
        settings,
        LAKESYNC_LEASE_SECONDS="3",
        LAKESYNC_RETRY_BUDGET_SECONDS="60",
        LAKESYNC_ALLOWED_ROOTS=json.dumps([settings.lake_uri, str(tmp_path)]),
    )


@pytest.fixture
def serve(serve_env: dict[str, str], tmp_path: Path) -> Iterator[ServeProcess]:
    """A started `lakesync serve`; tests may change `serve_env` before asking for it."""
    proc = ServeProcess(serve_env, tmp_path / "serve.log").start()
    yield proc
    proc.kill()


@pytest.fixture
def slow_database(serve_env: dict[str, str], mongo_server: EmbeddedServer) -> Iterator[SlowLink]:
    """`serve_env` pointed at the test's server through a link adding 10 ms per request."""
    link = SlowLink(("127.0.0.1", mongo_server.port), delay=0.01)
    serve_env["LAKESYNC_MONGODB_URI"] = link.uri
    yield link
    link.close()


@pytest.fixture
def runtime(settings: Settings) -> Iterator[Runtime]:
    """A started Runtime with the in-process executor, on the test's database."""
    with Runtime(settings, executor="local") as rt:
        rt.start()
        yield rt


@pytest.fixture
def client(runtime: Runtime) -> Iterator[TestClient]:
    """The API of `runtime`, in-process; server errors come back as 500 answers."""
    with TestClient(create_app(runtime), raise_server_exceptions=False) as c:
        yield c


def missing_service(what: str, install: str) -> None:
    """Skip the test, saying what to install; under CI (CI=true) fail it instead: CI must
    not pass without the service (`make test` installs it as root: tests/services.sh)."""
    message = f"{what} is not available here: {install}"
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    """A redis-server of this test's own, on a free port."""
    import redis

    if shutil.which("redis-server") is None:
        missing_service("redis-server", "sudo apt-get install redis-server")
    port = free_port()
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    client = redis.Redis(port=port)
    wait_for(lambda: _redis_up(client), timeout=10)
    yield f"redis://127.0.0.1:{port}/0"
    proc.terminate()
    proc.wait(5)


def _redis_up(client: Any) -> bool:
    try:
        return bool(client.ping())
    except Exception:
        return False


@pytest.fixture
def rabbitmq_url() -> Iterator[str]:
    """The machine's RabbitMQ (127.0.0.1:5672, guest/guest), which tests/services.sh starts.

    Where rabbitmqctl works (root), the test gets a virtual host of its own: lakesync's
    queue has one name, and another test run on the machine must not take this one's tasks.
    """
    try:
        socket.create_connection(("127.0.0.1", 5672), timeout=5).close()
    except OSError:
        missing_service(
            "RabbitMQ on 127.0.0.1:5672",
            "sudo apt-get install rabbitmq-server (it then runs as a service)",
        )
    vhost = "t_" + uuid.uuid4().hex[:12]

    def ctl(*args: str) -> bool:
        try:
            done = subprocess.run(["rabbitmqctl", *args], capture_output=True, timeout=120)
        except (OSError, subprocess.TimeoutExpired):
            return False
        return done.returncode == 0

    added = ctl("add_vhost", vhost)
    if added and ctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*"):
        yield f"amqp://guest:guest@127.0.0.1:5672/{vhost}"
    else:
        yield "amqp://guest:guest@127.0.0.1:5672//"
    if added:
        ctl("delete_vhost", vhost)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Headless Chromium (Debian's /usr/bin/chromium) driven by Playwright, one a module."""
    sync_api = pytest.importorskip("playwright.sync_api")
    if not CHROMIUM.exists():
        missing_service("Chromium", "sudo apt-get install chromium")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def run(browser: Any) -> Iterator[Any]:
    """Make PageRuns (browser context + page) that are closed, and checked for script
    errors, when the test ends."""
    runs: list[PageRun] = []

    def make(**kw: Any) -> PageRun:
        r = PageRun(browser, **kw)
        runs.append(r)
        return r

    yield make
    for r in runs:
        r.close()


# -- S3: moto in this process (module scope: one server per test module) --------------------


@pytest.fixture(scope="module")
def aws_env() -> Iterator[None]:
    with aws_test_env():
        yield


@pytest.fixture(scope="module")
def s3_url(aws_env: None) -> Iterator[str]:
    server, url = start_moto_thread()
    yield url
    server.stop()
