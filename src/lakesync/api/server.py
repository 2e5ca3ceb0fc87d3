"""`lakesync serve`: the runtime, the app and uvicorn, with a clean shutdown."""

from __future__ import annotations

import errno
import ipaddress
import logging
import socket

import uvicorn
from fastapi.concurrency import run_in_threadpool

from lakesync.api.app import create_app
from lakesync.api.timeouts import DeadlineH11Protocol
from lakesync.config import Settings
from lakesync.errors import ConfigError
from lakesync.mongo import with_database
from lakesync.runtime import Runtime

logger = logging.getLogger(__name__)

MIN_TOKEN_LENGTH = 16


def is_loopback(host: str) -> bool:
    """True when `host` only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        try:
            return all(
                ipaddress.ip_address(a[4][0]).is_loopback for a in socket.getaddrinfo(host, None)
            )
        except OSError:
            return False


def check_exposure(settings: Settings, host: str) -> None:
    """Refuse a non-loopback address without LAKESYNC_API_TOKEN; warn about a short token."""
    token = settings.api_token
    if token is None and not is_loopback(host):
        raise ConfigError(
            f"Refusing to listen on {host} without an API token: anyone who can reach it could "
            "start or cancel copies. Set LAKESYNC_API_TOKEN to a long random secret (e.g. "
            "`export LAKESYNC_API_TOKEN=$(openssl rand -hex 32)`), or listen on 127.0.0.1."
        )
    if token is not None and len(token.get_secret_value()) < MIN_TOKEN_LENGTH:
        logger.warning(
            "LAKESYNC_API_TOKEN is shorter than %d characters and easy to guess; use e.g. "
            "`openssl rand -hex 32`.",
            MIN_TOKEN_LENGTH,
        )


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before anything says "serving"; a clear error if taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP named: asyncio sets TCP_NODELAY only on connections whose socket says so.
    # Without it every answer on a kept-alive connection waited ~40 ms for a delayed ACK
    # (headers and body are two writes), so polls took 44 ms instead of 2.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        reason = "is already in use" if e.errno == errno.EADDRINUSE else f"cannot be used ({e})"
        raise ConfigError(
            f"Port {port} on {host} {reason}: another lakesync serve or another program "
            f"listens there. Stop it, or choose another port: `lakesync serve --port 8400` "
            f"(with make: `make run PORT=8400`)."
        ) from None
    sock.listen(2048)  # from now on connections wait in the backlog until uvicorn accepts
    return sock


class _Server(uvicorn.Server):
    """uvicorn, with running jobs handed back first, while MongoDB is still up: the next
    start resumes them at once, and event streams end cleanly instead of being cancelled."""

    def __init__(self, config: uvicorn.Config, runtime: Runtime) -> None:
        super().__init__(config)
        self.runtime = runtime

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        await run_in_threadpool(self.runtime.stop_jobs)
        await super().shutdown(sockets)


def serve(settings: Settings, host: str, port: int) -> None:
    """Run until SIGTERM/Ctrl-C; running jobs stop at a batch boundary and stay resumable."""
    check_exposure(settings, host)
    sock = bind(host, port)
    try:
        runtime = Runtime(settings, executor=settings.executor, reads_lake=True)
    except BaseException:
        sock.close()
        raise
    try:
        runtime.start()
        app = create_app(runtime, close_on_shutdown=True)
        config = uvicorn.Config(
            app,
            host=host,
            port=port,
            log_config=None,
            access_log=False,
            timeout_graceful_shutdown=3,
            http=DeadlineH11Protocol,  # slow request heads and bodies are cut off
        )
        server = _Server(config, runtime)
        shown = f"[{host}]" if ":" in host else host
        logger.info(
            "lakesync is serving on http://%s:%d (executor: %s)", shown, port, settings.executor
        )
        print(f"lakesync: open http://{shown}:{port}/ in your browser", flush=True)
        embedded = runtime.mongo.embedded
        if embedded is not None:
            where = with_database(embedded.uri, settings.database)
            print(
                f"lakesync: copied records are in {where} (`lakesync mongo-uri` prints it)",
                flush=True,
            )
        server.run(sockets=[sock])
    finally:
        runtime.close(timeout=5.0)
        sock.close()
