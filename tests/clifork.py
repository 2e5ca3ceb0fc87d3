"""A zygote for `lakesync` commands run by the tests: it imports lakesync once, then forks
one child per command, which runs `python -m lakesync ARGS` as a fresh interpreter would
(its own environment, working directory, stdin /dev/null, stdout and stderr to files, exit
code, atexit handlers) without paying the import again (1.5-4 s of CPU per command on a
loaded 2-core machine, most of a CLI test's time).

Started by tests.helpers.CliZygote as ``python -m tests.clifork``. Protocol, one JSON
object per line. On stdout, ``{"ready": 1}`` once lakesync is imported; then for each
request read on stdin, ``{"id", "args", "env", "cwd", "out", "err"}`` (and ``"append"``:
open them to append; ``out`` and ``err`` the same file: one file for both; or ``"tty"``,
a pseudo-terminal's path: the child's stdin, stdout, stderr and controlling terminal), the
answers ``{"id", "pid"}`` once forked and ``{"id", "status"}`` (a wait status) once reaped. Each
child leads its own process group, so a kill reaches whatever it started. On EOF (the
test process is gone) the zygote kills its children's groups and exits.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import gc
import importlib
import json
import os
import runpy
import select
import signal
import sys
import termios
import threading
import traceback

#: imported once here, before any fork: what `python -m lakesync` and its commands import,
#: and what `serve` and `worker` import only when they start (uvicorn and the server: 0.3 s
#: a serve start; Celery's worker and kombu's Redis transport: 1 s a worker start, at load 20)
PRELOAD = [
    "lakesync.cli", "lakesync.runtime", "lakesync.api.app", "lakesync.worker",
    "lakesync.api.server", "lakesync.executors.local", "uvicorn.loops.auto",
    "uvicorn.protocols.http.h11_impl", "uvicorn.protocols.websockets.auto",
    "uvicorn.lifespan.on", "celery.apps.worker", "celery.worker.consumer",
    "celery.concurrency.prefork", "kombu.transport.redis", "kombu.transport.pyamqp",
]  # fmt: skip


def child(request: dict[str, object]) -> None:
    """In the forked child: become `python -m lakesync ARGS`, and exit. Never returns."""
    tty = request.get("tty")
    if not tty:
        os.setpgid(0, 0)
    else:  # a session of its own, with the terminal as its controlling terminal
        os.setsid()
    # the dispositions a fresh interpreter starts with: SIGINT raises KeyboardInterrupt,
    # SIGPIPE and SIGXFSZ are ignored (a write to a closed socket raises BrokenPipeError
    # rather than killing a server whose client went away), the others the default
    for sig in (signal.SIGCHLD, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for sig in (signal.SIGPIPE, signal.SIGXFSZ):
        signal.signal(sig, signal.SIG_IGN)
    signal.set_wakeup_fd(-1)
    os.environ.clear()
    os.environ.update(request["env"])  # type: ignore[arg-type]
    os.chdir(str(request["cwd"]))
    if tty:  # stdin, stdout and stderr on the terminal, line-buffered as on a fresh start
        terminal = os.open(str(tty), os.O_RDWR)
        fcntl.ioctl(terminal, termios.TIOCSCTTY, 0)
        for fd in (0, 1, 2):
            os.dup2(terminal, fd)
        os.close(terminal)
        sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    else:
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        # a server's log is appended to, both streams in one file, as `>> log 2>&1` would
        append = os.O_APPEND if request.get("append") else os.O_TRUNC
        flags = os.O_WRONLY | os.O_CREAT | append
        if request["out"] == request["err"]:
            target = os.open(str(request["out"]), flags, 0o600)
            os.dup2(target, 1)
            os.dup2(target, 2)
            os.close(target)
        else:
            for fd, path in ((1, request["out"]), (2, request["err"])):
                target = os.open(str(path), flags, 0o600)
                os.dup2(target, fd)
                os.close(target)
    sys.argv = ["lakesync", *request["args"]]  # type: ignore[misc]
    # module state made from the environment at import (the CLI's consoles read COLUMNS,
    # NO_COLOR, TERM when created): made again from this command's environment
    if "lakesync.cli" in sys.modules:
        importlib.reload(sys.modules["lakesync.cli"])
    code: object = 0
    try:
        runpy.run_module("lakesync", run_name="__main__", alter_sys=True)
    except SystemExit as e:
        code = e.code
    except BaseException:
        traceback.print_exc()
        code = 1
    # the end of an interpreter, without tearing down every module the zygote imported
    # (which would write to, and so copy, all of the memory the child shares with it)
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    if code is not None and not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code or 0)


def serve() -> None:
    requests, answers = sys.stdin.fileno(), sys.stdout.fileno()
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # wakes select through wake_w
    ids: dict[int, object] = {}
    pending = b""

    def answer(message: dict[str, object]) -> None:
        os.write(answers, json.dumps(message).encode() + b"\n")

    while True:
        readable, _, _ = select.select([requests, wake_r], [], [])
        if wake_r in readable:
            os.read(wake_r, 4096)
        while ids:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            answer({"id": ids.pop(pid), "status": status})
        if requests not in readable:
            continue
        chunk = os.read(requests, 1 << 20)
        if not chunk:  # the test process is gone: so are the commands it started
            for pid in ids:
                with contextlib.suppress(OSError):
                    os.killpg(pid, signal.SIGKILL)
            return
        pending += chunk
        while b"\n" in pending:
            line, pending = pending.split(b"\n", 1)
            request = json.loads(line)
            pid = os.fork()
            if pid == 0:
                os.close(wake_r)
                os.close(wake_w)
                child(request)  # never returns normally
            if not request.get("tty"):  # (a terminal's child makes a session: not here)
                with contextlib.suppress(OSError):  # the child may have set it already
                    os.setpgid(pid, pid)
            ids[pid] = request["id"]
            answer({"id": request["id"], "pid": pid})


if __name__ == "__main__":
    for name in PRELOAD:
        with contextlib.suppress(ImportError):
            importlib.import_module(name)
    gc.freeze()  # a child's collections then skip (and do not copy) what the zygote made
    os.write(sys.stdout.fileno(), b'{"ready": 1}\n')
    serve()
