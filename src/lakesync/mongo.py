"""MongoDB connections, and the embedded nx-27017 server started when no URI is configured.

This is the only module that knows the embedded server exists; everything else gets a
`pymongo.database.Database` and talks the ordinary MongoDB protocol.

Server differences worked around by design elsewhere (see README, "Known limits"):
nx-27017 stores a top-level date given to `$set` as a string, so lakesync writes records
with insert/replace and stamps times with `$currentDate`, which every server keeps as a date.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from lakesync.config import Settings
from lakesync.errors import ConfigError, StoreError
from lakesync.masking import masked

if TYPE_CHECKING:  # pymongo is imported when first used: while the embedded server starts
    from pymongo import MongoClient
    from pymongo.collection import Collection
    from pymongo.database import Database

logger = logging.getLogger(__name__)

CONNECT_TIMEOUT_MS = 5000
WATCH_SECONDS = 1.0  # how often a serve or worker checks that the embedded server answers


DUPLICATE_KEY = 11000  # MongoDB's code for a write refused by a unique index


def insert_new(collection: Collection[dict[str, Any]], docs: list[dict[str, Any]]) -> None:
    """Insert `docs` unordered, keeping those already there (their `_id` or unique key was
    written by an earlier try or run); any other write error, or a write concern error,
    raises."""
    from pymongo.errors import BulkWriteError

    try:
        collection.insert_many(docs, ordered=False)
    except BulkWriteError as e:
        if e.details.get("writeConcernErrors") or any(
            w.get("code") != DUPLICATE_KEY for w in e.details.get("writeErrors", [])
        ):
            raise


def describe_hosts(uri: str) -> str:
    """`host:port` list of a MongoDB URI, for error messages (never the credentials)."""
    from pymongo.uri_parser import parse_uri

    try:
        nodes = parse_uri(uri, warn=True)["nodelist"]
        return ", ".join(f"{h}:{p}" for h, p in nodes) or masked(uri)
    except Exception:
        return masked(uri)


def driver_cause(error: BaseException) -> str:
    """The cause in a driver error, in one line: `[Errno 111] Connection refused` rather
    than its timeouts and topology description; the whole text if it has no such cause."""
    text = masked(str(error)).splitlines()[0] if str(error).strip() else type(error).__name__
    text = re.split(r" \(configured timeouts|, Timeout: |, Topology Description", text)[0]
    if ": [Errno" in text:  # "host:port: [Errno 111] Connection refused"
        text = text[text.index("[Errno") :]
    text = re.sub(r"^\[Errno -?\d+\] ", "", text)
    return text[:300].rstrip(". ") or type(error).__name__


def with_database(uri: str, database: str) -> str:
    """`uri` with `database` as its default database (the path), for mongosh and drivers."""
    scheme, sep, rest = uri.partition("://")
    if not sep:
        return uri
    hosts, _, tail = rest.partition("/")
    path, question, query = tail.partition("?")
    if path:  # the URI names a database already (maybe the auth database): keep it
        return uri
    return f"{scheme}://{hosts}/{database}" + (f"?{query}" if question else "")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


#: The child: nx-27017, plus a thread that ends it (SIGTERM: a clean exit) once lakesync is
#: gone, however it died. Not PR_SET_PDEATHSIG: that fires when the *thread* that started
#: the server ends, which killed servers started from short-lived threads.
_CHILD = """
import os, signal, threading, time
def _watch(parent=os.getppid()):
    while os.getppid() == parent:
        time.sleep(0.2)
    os.kill(os.getpid(), signal.SIGTERM)
threading.Thread(target=_watch, daemon=True).start()
from nx_27017.nx_27017 import main
main()
"""

#: The child a short command leaves running for the next one: nx-27017, plus a thread that
#: ends it once no client has been connected (Linux: /proc/net/tcp) and no lakesync process
#: has attached (the state file's time) for IDLE seconds. It goes away as an owner's stop()
#: does: under the data dir's lock, its state file removed first.
_LINGERING_CHILD = """
import fcntl, json, os, signal, threading, time
def _clients():
    port, n = ":%04X" % PORT, 0
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(name) as table:
                n += sum(1 for row in table if row.split()[1].endswith(port)
                         and row.split()[3] == "01")  # ESTABLISHED to our port
        except (OSError, IndexError):
            pass
    return n
def _unused():
    try:
        touched = time.time() - os.stat(STATE).st_mtime
    except OSError:
        touched = IDLE
    return min(time.monotonic() - _used[0], touched)
def _watch():
    while True:
        time.sleep(1.0)
        if _clients():
            _used[0] = time.monotonic()
        if _unused() < IDLE:
            continue
        try:
            lock = open(LOCK, "w")
        except OSError:  # the data folder is gone: nothing to keep up
            os.kill(os.getpid(), signal.SIGTERM)
            return
        with lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # an attach touches the state file under it
            if _clients() or _unused() < IDLE:
                continue
            try:
                with open(STATE) as f:
                    if json.load(f)["pid"] == os.getpid():
                        os.unlink(STATE)
            except (OSError, ValueError, KeyError):
                pass
            os.kill(os.getpid(), signal.SIGTERM)  # a clean exit, the lock held until it ends
            time.sleep(10)
            os.kill(os.getpid(), signal.SIGKILL)
_used = [time.monotonic()]
threading.Thread(target=_watch, daemon=True).start()
from nx_27017.nx_27017 import main
main()
"""

#: lingering servers started by this process (kept referenced: they outlive it by design)
_LINGERING: list[subprocess.Popen[bytes]] = []


def _terminate(proc: subprocess.Popen[bytes], timeout: float) -> None:
    """SIGINT (a clean exit), then SIGTERM, then SIGKILL, until the process has ended."""
    for sig, wait in ((signal.SIGINT, timeout), (signal.SIGTERM, 2.0), (signal.SIGKILL, 2.0)):
        if proc.poll() is not None:
            break
        proc.send_signal(sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(wait)


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


@dataclass
class EmbeddedServer:
    """An nx-27017 child process on a free loopback port, files under `<data_dir>/mongo`."""

    data_dir: Path
    port: int = 0
    process: subprocess.Popen[bytes] | None = None
    owned: bool = False
    _state_file: Path = field(init=False)

    def __post_init__(self) -> None:
        self.data_dir = self.data_dir / "mongo"
        self._state_file = self.data_dir / "embedded.json"

    @property
    def uri(self) -> str:
        """The URI pymongo connects to."""
        return f"mongodb://127.0.0.1:{self.port}/?directConnection=true"

    def start(self, timeout: float = 20.0, port: int = 0, idle: float = 0.0) -> EmbeddedServer:
        """Attach to a live server of this data dir, or start one (on `port`, if given and
        free) and wait for its ping. With `idle` > 0 (a short command), a server started here
        is not this process's: it stays up for the next command until unused for `idle`
        seconds (on Linux, where it can see its clients; elsewhere it stops with us).

        Starting and stopping happen under the data dir's lock, and a stopping owner removes
        the state file before it signals the server: a process starting meanwhile waits, then
        starts its own instead of attaching to a server about to go away.
        """
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with open(self.data_dir / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if self._attach():
                return self
            idle = idle if Path("/proc/net/tcp").is_file() else 0.0
            self._spawn(timeout, port if port and _port_free(port) else _free_port(), idle)
        logger.info(
            "embedded MongoDB-wire server (nx-27017) on 127.0.0.1:%d, files in %s%s",
            self.port,
            self.data_dir,
            f"; it stops once unused for {idle:g} s" if idle else "",
        )
        return self

    def _spawn(self, timeout: float, port: int, idle: float = 0.0) -> None:
        """Start the server on `port` and wait for its ping (the caller holds the lock);
        with `idle`, one that outlives this process (see start)."""
        self.port = port
        log = open(self.data_dir / "server.log", "ab")  # noqa: SIM115 - the child keeps it
        child = _CHILD
        if idle:
            lock, state = str(self.data_dir / ".lock"), str(self._state_file)
            child = f"IDLE, PORT, LOCK, STATE = {idle!r}, {port}, {lock!r}, {state!r}"
            child += _LINGERING_CHILD
        cmd = [
            sys.executable,
            "-c",
            child,
            "--data-dir",
            str(self.data_dir),
            "--host",
            "127.0.0.1",
            "-p",
            str(self.port),
            "--log-file",
            str(self.data_dir / "nx.log"),
            "--pid-file",
            str(self.data_dir / "nx.pid"),
        ]
        self.process = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            process_group=0,  # Ctrl-C in a terminal must reach lakesync, not the server
        )
        log.close()
        self.owned = True
        self._wait_ready(timeout)
        self._state_file.write_text(json.dumps({"pid": self.process.pid, "port": self.port}))
        if idle:  # not ours to stop: it stops itself once unused
            _LINGERING.append(self.process)
            self.process, self.owned = None, False

    def _attach(self) -> bool:
        try:
            state = json.loads(self._state_file.read_text())
        except (OSError, ValueError):
            return False
        if not _pid_alive(int(state["pid"])):
            return False
        self.port = int(state["port"])
        if not self._ping(1.0):
            return False
        with contextlib.suppress(OSError):  # in use: a lingering server stays up (see start)
            os.utime(self._state_file)
        logger.info(
            "using the embedded MongoDB-wire server already running on 127.0.0.1:%d, files in %s",
            self.port,
            self.data_dir,
        )
        return True

    def running_uri(self) -> str | None:
        """The URI of a live server of this data dir (started by another process), else None."""
        try:
            state = json.loads(self._state_file.read_text())
            self.port = int(state["port"])
            alive = _pid_alive(int(state["pid"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return self.uri if alive and self._ping(1.0) else None

    def holds(self, database: str) -> bool:
        """Whether the server's files hold `database` (without starting it): nx-27017 keeps
        one SQLite file per database."""
        return (self.data_dir / f"{database}.db").is_file()

    def _ping(self, seconds: float) -> bool:
        from pymongo import MongoClient
        from pymongo.errors import PyMongoError

        client: MongoClient[dict[str, Any]] = MongoClient(
            self.uri, serverSelectionTimeoutMS=int(seconds * 1000), connectTimeoutMS=500
        )
        try:
            client.admin.command("ping")
            return True
        except PyMongoError:
            return False
        finally:
            client.close()

    def _listening(self) -> bool:
        """Whether the server accepts connections yet: a plain connect, far cheaper than a
        driver's ping, whose server selection waits half a second after a refused one."""
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
        except OSError:
            return False
        return True

    def _wait_ready(self, timeout: float) -> None:
        """Wait until the new server answers a ping: its port polled every 20 ms (it takes
        most of a second to import itself), then one ping."""
        import pymongo  # noqa: F401 - imported here, while the server starts in parallel

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process is not None
            if not self._listening() and self.process.poll() is None:
                time.sleep(0.02)
                continue
            if self.process.poll() is not None:
                tail = (self.data_dir / "server.log").read_text(errors="replace")[-2000:]
                raise StoreError(
                    f"The embedded MongoDB-wire server (nx-27017) exited at start-up with code "
                    f"{self.process.returncode}. Its log ({self.data_dir / 'server.log'}) ends "
                    f"with: {tail.strip()[-500:]!r}. Check that {self.data_dir} is writable, or "
                    "set LAKESYNC_MONGODB_URI to use another MongoDB."
                )
            if self._ping(0.5):
                return
            time.sleep(0.1)
        proc, self.process, self.owned = self.process, None, False
        if proc is not None:
            _terminate(proc, 2.0)  # (the caller holds the data dir's lock)
        raise StoreError(
            f"The embedded MongoDB-wire server did not answer within {timeout:.0f} s. "
            "Set LAKESYNC_MONGODB_URI to use another MongoDB."
        )

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the server if this process started it: SIGINT, then SIGTERM, then SIGKILL.

        Under the data dir's lock, its state file removed first: no process attaches to it
        while it goes away, and one starting now waits and then starts its own.
        """
        proc, self.process = self.process, None
        if proc is None or not self.owned:
            return
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with open(self.data_dir / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                if int(json.loads(self._state_file.read_text())["pid"]) == proc.pid:
                    self._state_file.unlink()
            _terminate(proc, timeout)
        self.owned = False
        logger.info("embedded MongoDB-wire server stopped")

    def alive(self) -> bool:
        """Whether the server this process uses still answers (its own child still runs)."""
        if self.owned and self.process is not None and self.process.poll() is not None:
            return False
        return self._ping(1.0)

    def revive(self, timeout: float = 20.0) -> bool:
        """The server stopped answering: if its process is gone (the process that started it
        stopped it, or it died), start one on the same port, under the data dir's lock, so
        that clients connected to it reconnect by themselves. True when a server of this data
        dir runs on our port now (maybe only busy); False to try again later."""
        with open(self.data_dir / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # waits for an owner still stopping its server
            if self.process is not None and self.process.poll() is None:
                return True  # our own child runs: busy, not gone
            self.process, self.owned = None, False
            try:
                state = json.loads(self._state_file.read_text())
                pid, port = int(state["pid"]), int(state["port"])
            except (OSError, ValueError, KeyError, TypeError):
                pid, port = 0, 0
            if pid and _pid_alive(pid):  # a server of this data dir runs (or is going away)
                if port != self.port:
                    logger.error(
                        "the embedded MongoDB-wire server now runs on port %d instead of %d; "
                        "restart this lakesync process to use it",
                        port,
                        self.port,
                    )
                    return False
                return True  # never a second server on the same files
            if not _port_free(self.port):
                return False  # the old one is still letting go of it
            self._spawn(timeout, self.port)
        logger.info("embedded MongoDB-wire server started again on port %d", self.port)
        return True

    def __enter__(self) -> EmbeddedServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class Mongo:
    """A connected client and the lakesync database; owns the embedded server if it started one."""

    def __init__(self, settings: Settings, *, short: bool = False) -> None:
        """`short`: for a short command, which leaves an embedded server it starts up for
        the next one, LAKESYNC_EMBEDDED_IDLE seconds (see EmbeddedServer.start)."""
        self.settings = settings
        self.embedded: EmbeddedServer | None = None
        self._closing = threading.Event()
        self._watcher: threading.Thread | None = None
        secret = settings.mongodb_uri.get_secret_value() if settings.mongodb_uri else None
        if secret is None:  # (pymongo is imported while the server starts)
            idle = settings.embedded_idle if short else 0.0
            self.embedded = EmbeddedServer(settings.data_dir).start(idle=idle)
        from pymongo import MongoClient
        from pymongo.uri_parser import parse_uri

        if secret is None:
            assert self.embedded is not None
            uri = self.embedded.uri
        else:
            uri = secret
            try:
                parse_uri(uri, warn=True)
            except Exception as e:
                raise ConfigError(
                    f"LAKESYNC_MONGODB_URI={masked(uri)} is not a valid MongoDB URI: "
                    f"{masked(str(e))}. Use mongodb://host:port or mongodb+srv://host."
                ) from None
        self.where = describe_hosts(uri)
        if secret is not None:
            logger.info("MongoDB at %s (LAKESYNC_MONGODB_URI)", self.where)
        self.client: MongoClient[dict[str, Any]] = MongoClient(
            uri,
            serverSelectionTimeoutMS=CONNECT_TIMEOUT_MS,
            connectTimeoutMS=CONNECT_TIMEOUT_MS,
            tz_aware=True,
            appname="lakesync",
        )
        self.db: Database[dict[str, Any]] = self.client[settings.database]

    def watch(self, every: float = WATCH_SECONDS) -> None:
        """Keep the embedded server up for this long-lived process (serve, worker): if it
        goes away (the process that started it stopped, or it died), start it again on the
        same port; the client reconnects by itself. No-op with LAKESYNC_MONGODB_URI."""
        if self.embedded is None or self._watcher is not None:
            return
        self._watcher = threading.Thread(
            target=self._watch, args=(self.embedded, every), name="lakesync-embedded", daemon=True
        )
        self._watcher.start()

    def _watch(self, embedded: EmbeddedServer, every: float) -> None:
        misses = 0
        while not self._closing.wait(every):
            try:
                if embedded.alive():
                    misses = 0
                    continue
                misses += 1
                if misses < 2 or self._closing.is_set():  # one missed ping: a busy server
                    continue
                logger.warning(
                    "the embedded MongoDB-wire server on port %d stopped answering; starting "
                    "it again if it is gone",
                    embedded.port,
                )
                if embedded.revive():
                    misses = 0
            except Exception as e:  # e.g. it failed to start: try again at the next check
                logger.error("the embedded MongoDB-wire server could not be restarted: %s", e)

    def ping(self) -> None:
        """Raise StoreError naming the host (password masked) if MongoDB does not answer."""
        try:
            self.client.admin.command("ping")
        except Exception as e:  # the driver can fail with other errors, e.g. on auth replies
            raise StoreError(
                f"Cannot reach MongoDB at {self.where}: {driver_cause(e)}. "
                "Check LAKESYNC_MONGODB_URI (host, port, credentials) and that the server is up."
            ) from None

    def close(self) -> None:
        """Close the client and stop the embedded server if this process owns it."""
        self._closing.set()  # first: stopping our own server is not a server going away
        if self._watcher is not None:
            self._watcher.join(5)
        self.client.close()
        if self.embedded is not None:
            self.embedded.stop()

    def __enter__(self) -> Mongo:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
