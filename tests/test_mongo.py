"""MongoDB connections: clear errors for unreachable servers, and the embedded nx-27017 server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest
from pymongo import MongoClient
from tests.helpers import cli_zygote, lakesync

from lakesync.config import load_settings
from lakesync.errors import ConfigError, StoreError
from lakesync.masking import masked
from lakesync.mongo import (
    EmbeddedServer,
    Mongo,
    describe_hosts,
    with_database,
)

UNREACHABLE = "mongodb://user:secret@127.0.0.1:1/?authSource=admin"


def test_masked_hides_every_password() -> None:
    text = "a mongodb://u:p%40ss@h:1/db and redis://:hunter2@r:6379/0 and mongodb://h:2"
    shown = masked(text)
    assert "p%40ss" not in shown and "hunter2" not in shown
    assert "mongodb://u:***@h:1/db" in shown and "redis://:***@r:6379/0" in shown
    assert shown.endswith("mongodb://h:2")
    assert masked("mongodb://token:pw@h:1/db") == "mongodb://token:***@h:1/db"  # not a key=value


def test_with_database_puts_the_database_in_the_path_unless_one_is_named() -> None:
    assert with_database("mongodb://127.0.0.1:5/?directConnection=true", "lakesync") == (
        "mongodb://127.0.0.1:5/lakesync?directConnection=true"
    )
    assert (
        with_database("mongodb+srv://u:p@c.example.net", "db")
        == "mongodb+srv://u:p@c.example.net/db"
    )
    assert with_database("mongodb://h/admin?authSource=admin", "db") == (
        "mongodb://h/admin?authSource=admin"  # a named (auth) database is kept
    )
    running = EmbeddedServer(Path("/nonexistent-lakesync-dir")).running_uri()
    assert running is None  # no server of that data dir: nothing to print


def test_describe_hosts_lists_hosts_without_credentials() -> None:
    assert describe_hosts("mongodb://u:secret@a:1,b:2/db") == "a:1, b:2"
    assert "secret" not in describe_hosts("mongodb://u:secret@[bad")


def test_unreachable_server_fails_fast_naming_the_host_not_the_password(
    tmp_path: Path,
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LAKESYNC_")}
    env |= {"LAKESYNC_MONGODB_URI": UNREACHABLE, "LAKESYNC_LAKE_URI": str(tmp_path)}
    cli_zygote()  # lakesync imported: what is timed is the command, not the import
    pool = ThreadPoolExecutor(1)  # the same through the CLI, in parallel to keep it short
    cli = pool.submit(lakesync, env, "jobs", "--json", cwd=tmp_path, timeout=60)
    pool.shutdown(wait=False)
    started = time.monotonic()
    settings = load_settings(mongodb_uri=UNREACHABLE, data_dir=tmp_path)
    with pytest.raises(StoreError) as e, Mongo(settings) as mongo:
        mongo.ping()
    assert time.monotonic() - started < 6.5
    message = str(e.value)
    assert "127.0.0.1:1" in message and "LAKESYNC_MONGODB_URI" in message
    assert "secret" not in message

    done = cli.result()
    stdout, stderr = done.stdout, done.stderr
    assert time.monotonic() - started < 9
    assert done.returncode == 1 and "127.0.0.1:1" in json.loads(stdout)["error"]  # --json
    assert "127.0.0.1:1" in stderr and "secret" not in stderr + stdout
    assert "Traceback" not in stderr


def test_invalid_uri_is_a_config_error_with_the_password_masked(tmp_path: Path) -> None:
    settings = load_settings(mongodb_uri="mongodb://user:secret@host:99999", data_dir=tmp_path)
    with pytest.raises(ConfigError) as e:
        Mongo(settings)
    assert "LAKESYNC_MONGODB_URI" in str(e.value) and "secret" not in str(e.value)


def processes(server: EmbeddedServer) -> list[psutil.Process]:
    assert server.process is not None
    parent = psutil.Process(server.process.pid)
    return [parent, *parent.children(recursive=True)]


def gone(procs: list[psutil.Process], timeout: float = 10) -> bool:
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    return not alive


def test_embedded_server_stops_cleanly_and_its_data_persists(tmp_path: Path) -> None:
    first = EmbeddedServer(tmp_path).start()
    procs = processes(first)
    with MongoClient(first.uri, serverSelectionTimeoutMS=5000) as client:
        client.lakesync.things.insert_one({"_id": 1, "name": "kept"})

    again = EmbeddedServer(tmp_path).start()  # a second user of the same data dir attaches
    assert (again.port, again.owned) == (first.port, False)
    again.stop()  # and does not stop a server it does not own
    assert first._ping(2)

    first.stop()
    assert gone(procs), "the server (or a child of it) outlived stop()"
    assert not (tmp_path / "mongo" / "embedded.json").exists()

    with EmbeddedServer(tmp_path) as restarted:
        assert restarted.owned
        with MongoClient(restarted.uri, serverSelectionTimeoutMS=5000) as client:
            assert client.lakesync.things.find_one({"_id": 1}) == {"_id": 1, "name": "kept"}


def test_mongo_without_uri_starts_and_stops_the_embedded_server(tmp_path: Path) -> None:
    with Mongo(load_settings(data_dir=tmp_path, database="d")) as mongo:
        assert mongo.embedded is not None
        procs = processes(mongo.embedded)
        mongo.db.things.insert_one({"_id": 1})
        assert mongo.where.startswith("127.0.0.1:")
    assert gone(procs)


def test_embedded_server_dies_with_its_parent(tmp_path: Path) -> None:
    """A lakesync killed with SIGKILL leaves no server behind."""
    code = textwrap.dedent(
        f"""
        import sys, time
        from pathlib import Path
        from lakesync.mongo import EmbeddedServer
        server = EmbeddedServer(Path({str(tmp_path)!r})).start()
        print(server.process.pid, flush=True)
        time.sleep(60)
        """
    )
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None
        server = psutil.Process(int(parent.stdout.readline()))
        procs = [server, *server.children(recursive=True)]
    finally:
        parent.kill()
        parent.wait(10)
    assert gone(procs), "the embedded server outlived a killed lakesync"


def test_embedded_server_started_from_a_thread_outlives_the_thread(tmp_path: Path) -> None:
    """Workers and web frameworks may connect from a short-lived thread."""
    box: dict[str, EmbeddedServer] = {}
    starter = threading.Thread(target=lambda: box.setdefault("s", EmbeddedServer(tmp_path).start()))
    starter.start()
    starter.join()
    server = box["s"]
    try:
        time.sleep(1.0)
        assert server.process is not None and server.process.poll() is None
        assert server._ping(2)
    finally:
        procs = processes(server) if server.process and server.process.poll() is None else []
        server.stop()
    assert gone(procs)


def test_a_short_commands_server_serves_the_next_one_and_stops_itself_once_unused(
    tmp_path: Path,
) -> None:
    """`lakesync jobs` then `lakesync status`: the second finds the server the first started
    (no second start-up); nobody connected or attached for LAKESYNC_EMBEDDED_IDLE seconds, it
    stops by itself, as an owner stops it (state file first), and its data persists."""
    settings = load_settings(data_dir=tmp_path, database="d", embedded_idle=2)
    state = tmp_path / "mongo" / "embedded.json"
    with Mongo(settings, short=True) as first:
        first.db.things.insert_one({"_id": 1})
    server = psutil.Process(json.loads(state.read_text())["pid"])
    procs = [server, *server.children(recursive=True)]
    assert server.is_running() and server.status() != psutil.STATUS_ZOMBIE
    with Mongo(settings, short=True) as second:  # attaches: the same server, not its own
        assert second.embedded is not None and not second.embedded.owned
        assert second.embedded.port == json.loads(state.read_text())["port"]
        with pytest.raises(psutil.TimeoutExpired):  # connected: it stays up past its idle time
            server.wait(timeout=5)
        assert second.db.things.find_one({"_id": 1}) == {"_id": 1}
    assert gone(procs, timeout=30), "the lingering server did not stop once unused"
    assert not state.exists()
    with Mongo(load_settings(data_dir=tmp_path, database="d")) as again:
        assert again.embedded is not None and again.embedded.owned
        assert again.db.things.find_one({"_id": 1}) == {"_id": 1}
