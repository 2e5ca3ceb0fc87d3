"""The `lakesync` command line: serve, copy, status, jobs, cancel, operations, demo-data, worker.

Every command works on a terminal (colours, a progress bar, tables that keep job ids whole at
80 columns) and in a pipe (plain text; `--json` prints one JSON document on stdout, an error
included: `{"error": "..."}`).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperCommand, TyperGroup

from lakesync.errors import ConfigError, JobError, LakesyncError

if TYPE_CHECKING:
    from lakesync.config import Settings
    from lakesync.models import JobStatus

# Start-up: each command imports what it needs when it runs (pydantic settings and models,
# the runtime, rich's progress bar and tables), so `--help` and quick reads start fast.

err = Console(stderr=True)
out = Console()
# in a pipe, text is never wrapped (scripts read whole lines); on a terminal, at words
out.soft_wrap, err.soft_wrap = not out.is_terminal, not err.is_terminal
logger = logging.getLogger(__name__)

JsonFlag = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]


def _flags_as_flags(params: list[Any]) -> list[Any]:
    """Help shows `--json`, not `--json <bool>` as typer does: a flag takes no value."""
    for param in params:
        if getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""
    return params


class _Group(TyperGroup):
    def get_params(self, ctx: Any) -> list[Any]:
        return _flags_as_flags(super().get_params(ctx))

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        command = super().get_command(ctx, cmd_name)
        if type(command) is TyperCommand:  # a command declared without cls=_Command
            command.__class__ = _Command  # same fields: only the two methods differ
        return command


class _Command(TyperCommand):
    """A command with flags shown as flags, and errors as JSON on stdout under `--json`."""

    def get_params(self, ctx: Any) -> list[Any]:
        return _flags_as_flags(super().get_params(ctx))

    def make_context(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().make_context(*args, **kwargs)
        except Exception as e:
            if getattr(e, "exit_code", None) == 2 and _wants_json():  # a usage error
                message = e.format_message() if hasattr(e, "format_message") else str(e)
                _print_json({"error": f"{message} (see `lakesync {self.name} --help`)"})
            raise


app = typer.Typer(
    cls=_Group,
    add_completion=False,
    pretty_exceptions_show_locals=False,  # locals may hold URIs with passwords
    no_args_is_help=True,
    rich_markup_mode=None,  # plain help: rendering it with rich costs more than the command
    help="Copy data-lake records into MongoDB as durable background jobs.",
)


def _wants_json() -> bool:
    """True when the command line asked for JSON: errors then go to stdout as JSON too."""
    return "--json" in sys.argv[1:]


#: `-v`: log what happens (INFO lines), including which data folder and MongoDB are used
_verbose = False


@app.callback()
def _options(
    verbose: Annotated[
        bool,
        typer.Option(
            "--verbose", "-v", help="Say which data folder and MongoDB are used; log each step."
        ),
    ] = False,
) -> None:
    global _verbose
    _verbose = verbose


def _not_a_job_error(record: logging.LogRecord) -> bool:
    """Quiet stderr leaves out a job's errors: the command ends by printing the job's
    error itself (the job's own log keeps the line)."""
    return not (record.levelno >= logging.ERROR and getattr(record, "jobId", None))


def _settings(*, server: bool = False) -> Settings:
    """The settings, with logging configured: quiet (warnings only) for a short command on
    text logs, unless -v or LAKESYNC_LOG_LEVEL asks for more; `server` (serve, worker) logs
    at LAKESYNC_LOG_LEVEL as a service should."""
    from lakesync.config import get_settings, unknown_variables
    from lakesync.logs import configure_logging, json_enabled

    settings = get_settings()
    chosen = "log_level" in settings.model_fields_set
    configure_logging(
        settings.log_format, "INFO" if _verbose and not chosen else settings.log_level
    )
    if not (_verbose or server or chosen or settings.log_format == "json"):
        # stderr shows warnings only; the root level stays, so a job's own log keeps its lines
        for handler in logging.getLogger().handlers:
            handler.setLevel(logging.WARNING)
            handler.addFilter(_not_a_job_error)
    for warning in unknown_variables(os.environ):
        if server or json_enabled():
            logger.warning("%s", warning)
        else:
            err.print(f"[yellow]warning:[/] {escape(warning)}", highlight=False)
    logger.info("data folder %s", settings.data_dir)
    return settings


def _fail(error: Exception, code: int | None = None) -> NoReturn:
    """Print one clear line to stderr and exit with `code`; by default 2 for a bad setting
    (a start-up error) and 1 for anything else. With `--json`, stdout gets `{"error": ...}`."""
    from lakesync.logs import json_enabled

    if _wants_json():
        _print_json({"error": str(error)})
    if json_enabled():
        logger.error("%s", error)
    else:
        # one line in a pipe (for scripts); on a terminal wrapped at spaces, never mid-word
        text = f"[bold red]error:[/] {escape(str(error))}"
        err.print(text, highlight=False, soft_wrap=not err.is_terminal)
    if code is None:
        code = 2 if isinstance(error, ConfigError) else 1
    raise typer.Exit(code)


def _notice(text: str, **fields: str) -> None:
    """A note for the user on stderr (plain text: never read as markup); a log line when
    logs are JSON, so stderr stays JSON."""
    from lakesync.logs import json_enabled

    if json_enabled():
        logger.info("%s", text, extra=fields)
    else:
        err.print(escape(text), highlight=False)


def _print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data) + "\n")


@app.command(cls=_Command)
def serve(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
) -> None:
    """Run the HTTP API, the web page and the job workers."""
    try:
        from lakesync.api.server import serve as run_server

        run_server(_settings(server=True), host, port)
    except LakesyncError as e:
        _fail(e)


#: The contract: `lakesync copy` exits 0 when the job completed and 1 otherwise, whatever
#: went wrong (bad arguments and bad settings included), so scripts test a single code.
COPY_FAILED = 1


class _CopyCommand(_Command):
    """`copy` with argument errors (unknown option, non-integer value) exiting 1, not 2."""

    def make_context(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().make_context(*args, **kwargs)
        except Exception as e:
            # click's UsageError carries exit code 2; matched by that code, not by class,
            # because recent typer versions bundle their own copy of click
            if getattr(e, "exit_code", None) == 2:
                setattr(e, "exit_code", COPY_FAILED)  # noqa: B010
            raise


@app.command(cls=_CopyCommand, short_help="Copy a lake into MongoDB now, with a progress bar.")
def copy(
    operation: Annotated[str, typer.Argument(help="Operation to run.")] = "copy-taskdetail",
    source: Annotated[str | None, typer.Option(help="Lake URI (dir, file, glob, s3://).")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Records per bulk write.")] = None,
    mode: Annotated[
        str | None,
        typer.Option(help="full, incremental, mirror, or dry-run (count, write nothing)."),
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """Run a copy job in the foreground with a progress bar; exit 1 unless it completes."""
    from lakesync.runtime import Runtime

    if batch_size is not None and not 1 <= batch_size <= 100_000:
        _fail(
            LakesyncError(
                f"--batch-size {batch_size} is out of range: give the number of "
                "records per bulk write, from 1 to 100000."
            ),
            COPY_FAILED,
        )
    options = {
        k: v
        for k, v in {"source": source, "batchSize": batch_size, "mode": mode}.items()
        if v is not None
    }
    try:
        from lakesync.operations import OperationRegistry, parse_options

        parse_options(options)  # e.g. a bad --mode, refused before any server starts
        settings = _settings()
        ops = OperationRegistry.from_settings(settings)  # the demo lake only if this copy reads it
        demo = source is None and operation in ops.names() and ops.get(operation).source is None
        with Runtime(settings, executor=None, reads_lake=demo, short=True) as rt:
            status, created = rt.jobs.start(operation, options, trusted=True, trigger="cli")
            # a job of this source already there: a pending one (e.g. paused by Ctrl-C), or
            # an abandoned one whose lease expired, resumes here from its checkpoint; one
            # another process runs is followed
            verb = "started" if created else "resumed from its checkpoint"
            final = _run_foreground(
                rt, status.jobId, show_bar=err.is_terminal and not as_json, verb=verb
            )
    except LakesyncError as e:
        _fail(e, COPY_FAILED)
    _finish(final, as_json)


def _finish(final: JobStatus, as_json: bool) -> NoReturn:
    from lakesync.models import JobState

    if as_json:
        _print_json(final.public())
    else:
        _print_summary(final)
    raise typer.Exit(0 if final.state is JobState.COMPLETED else 1)


@app.command(cls=_Command, short_help="Continue a failed, paused or abandoned job.")
def resume(job_id: str, as_json: JsonFlag = False) -> None:
    """Continue a failed, paused or abandoned job from its checkpoint, in the foreground;
    exit 1 unless it completes."""
    from lakesync.runtime import Runtime

    try:
        with Runtime(_settings(), executor=None, reads_lake=True, short=True) as rt:
            current = rt.jobs.get(job_id)
            if current.state.is_final:
                rt.jobs.resume(job_id)  # refuses completed and cancelled jobs, with the reason
            # a pending job nobody runs (e.g. paused by Ctrl-C), or one whose run died,
            # is claimed as it is; a job another process runs right now is followed
            final = _run_foreground(
                rt,
                job_id,
                show_bar=err.is_terminal and not as_json,
                verb="resumed from its checkpoint",
            )
    except LakesyncError as e:
        _fail(e)
    _finish(final, as_json)


def _run_foreground(rt: Any, job_id: str, show_bar: bool, verb: str) -> JobStatus:
    """Run the job in this thread until it ends; Ctrl-C pauses it at a batch boundary.

    A job another process runs right now (a `lakesync serve`, a worker) is followed
    instead, until it ends (Ctrl-C then stops following, not the job). Raises JobError when
    this run had to give the job back (the lake or MongoDB unavailable past the retries),
    with the cause.
    """
    from rich.progress import (
        BarColumn,
        Progress,
        TaskProgressColumn,
        TextColumn,
        TimeRemainingColumn,
    )

    from lakesync.models import JobState, Outcome
    from lakesync.plan import PLANNING

    previous = signal.getsignal(signal.SIGINT)
    following = threading.Event()

    def interrupt(*_: object) -> None:
        if following.is_set():
            _notice("stopped following; the job goes on in the other process")
        else:
            _notice("stopping after the current batch (Ctrl-C again to force)...")
        rt.runner.stop.set()
        signal.signal(signal.SIGINT, previous)

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, interrupt)
        signal.signal(signal.SIGTERM, interrupt)
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        TextColumn("{task.fields[counts]}  {task.fields[rate]}"),
        TimeRemainingColumn(),
    )
    told = False
    with Progress(*columns, console=err, disable=not show_bar) as bar, _logs_above_the_bar():
        # the total is unknown (None) until the job's first run counted the lake
        task = bar.add_task("copying", total=None, counts="", rate="")

        def progress(s: JobStatus) -> None:
            nonlocal told
            if not told:  # said once this process runs the job (or follows it)
                told = True
                what = "followed" if following.is_set() else verb
                _notice(f"job {job_id} {what}", jobId=job_id)
            message = s.message or ""
            if s.state is JobState.IN_PROGRESS and message.startswith(PLANNING):
                # before the first record: `planning ━━━ finding repeated keys`, not 0%
                phase = message.removeprefix(PLANNING).split(" in ")[0]
                bar.update(task, description="planning", total=None, counts=phase, rate="")
                bar.refresh()  # each phase drawn, however short
                return
            total = s.totalRecords or None
            counts = f"{s.processedRecords:,}" + (f"/{total:,}" if total else "") + " records"
            bar.update(
                task,
                description="copying",
                total=total,
                completed=s.processedRecords,
                counts=counts,
                rate=f"{s.recordsPerSecond:,.0f}/s",
            )

        tries = 0
        while not rt.runner.stop.is_set():
            before = rt.store.get(job_id)
            if before.state.is_final:
                break
            outcome = rt.runner.run(job_id, on_progress=progress)
            if outcome is Outcome.NOT_CLAIMED:
                now = rt.store.get(job_id)
                if now.state.is_final:
                    break
                if now.state is JobState.IN_PROGRESS and now.owner is not None:
                    # another process runs it (or took it over): follow it to its end; if
                    # it goes silent past its lease (its process died), take it over here
                    if not following.is_set():
                        _notice(
                            f"Job {job_id} is run by another process (such as `lakesync "
                            "serve`); following it here. Ctrl-C stops following, not the job."
                        )
                        following.set()
                    _follow(rt, job_id, progress)
                    continue
                if now.attempt > before.attempt:  # this process's run gave it back
                    cause = str(now.error or now.message).rstrip(". ")
                    raise JobError(
                        f"Job {job_id} stopped at record {now.processedRecords:,}: {cause}. "
                        f"Continue it with `lakesync resume {job_id}` once that is fixed.",
                        status=now.status.value,
                    )
                tries += 1  # pending again between our look and our claim: claim again
                if tries > 50:
                    raise JobError(
                        f"Job {job_id} could not be claimed: other processes keep taking it. "
                        f"Follow it with `lakesync status {job_id}`.",
                        status=now.status.value,
                    )
                time.sleep(0.2)
                continue
            if outcome is not Outcome.CONTINUE:
                break
    final: JobStatus = rt.store.get(job_id)
    return final


def _follow(rt: Any, job_id: str, progress: Callable[[JobStatus], None]) -> None:
    """Show the progress of a job another process runs until it ends, Ctrl-C, or it is
    silent for longer than a lease (its run may have died: the caller then claims it,
    which takes it over only if its lease really expired)."""
    from lakesync.models import JobState

    started = time.monotonic()
    lease = rt.settings.lease_seconds
    while True:
        s: JobStatus = rt.store.get(job_id)
        progress(s)
        if s.state is not JobState.IN_PROGRESS or rt.runner.stop.wait(0.5):
            return
        beat = s.heartbeatAt or s.updatedAt
        silent = beat is None or (datetime.now(UTC) - beat).total_seconds() > lease
        if silent and time.monotonic() - started > min(lease, 1.0):
            return


@contextlib.contextmanager
def _logs_above_the_bar() -> Iterator[None]:
    """Log lines go through the progress bar's stderr (rich redirects it while the bar is
    drawn), so they print above the bar instead of through it."""
    swapped = []
    if sys.stderr is not sys.__stderr__:  # the bar is drawn
        for handler in logging.getLogger().handlers:
            if isinstance(handler, logging.StreamHandler) and handler.stream is sys.__stderr__:
                swapped.append((handler, handler.setStream(sys.stderr)))
    try:
        yield
    finally:
        for handler, stream in swapped:
            handler.setStream(stream)


def _plural(n: int, word: str) -> str:
    """`1 record`, `2 records` (with thousands separators)."""
    return f"{n:,} {word}" + ("" if n == 1 else "s")


def _print_summary(s: JobStatus) -> None:
    from lakesync.models import JobState

    colour = {"completed": "green", "failed": "red", "cancelled": "yellow"}.get(s.status, "cyan")
    head = f"[bold {colour}]{s.status.value}[/] {escape(s.jobId)}"
    message = (s.message or "").strip()
    if message and message.lower() not in (s.status.value, "failed"):  # "failed job_x: Failed"
        head += f": {escape(message)}"
    out.print(head, highlight=False)
    if s.error:
        out.print(f"[red]{escape(s.error)}[/]", highlight=False)
    if s.state is JobState.PENDING:
        text = (
            f"It keeps its checkpoint. A running `lakesync serve` of the same database takes "
            f"it over by itself "
            f"within seconds: follow it with `lakesync status {s.jobId}`. Otherwise continue "
            f"it here with `lakesync resume {s.jobId}`."
        )
        out.print(escape(text), highlight=False)
    elif s.state is JobState.IN_PROGRESS:
        text = f"It goes on in another process: follow it with `lakesync status {s.jobId}`."
        out.print(escape(text), highlight=False)


@app.command(cls=_Command)
def status(job_id: str, as_json: JsonFlag = False) -> None:
    """Show one job's status."""
    try:
        settings = _settings()
        if _nothing_stored(settings):
            from lakesync.errors import JobNotFound

            raise JobNotFound(
                f"No job {job_id!r}: no job has run with the data folder {settings.data_dir} "
                "(its embedded server is not running and holds no database)."
            )
        with _statuses(settings) as store:
            s = store.get(job_id)
    except LakesyncError as e:
        _fail(e)
    if as_json:
        _print_json(s.public())
        return
    from rich.table import Table

    table = Table(show_header=False, box=None)
    table.add_column(no_wrap=True)
    table.add_column(overflow="fold")
    shown = s.public()
    if s.partitions is not None and shown.get("checkpoint"):
        # each partition keeps its own checkpoint; the job's position stays at its start
        # (file 0, row 0) whatever the copy has done: what it keeps is its watermarks
        where = ("fileIndex", "row", "batches", "file")
        done = f"{s.partitionsDone or 0:,} of {s.partitions:,} done"
        kept = {k: v for k, v in shown["checkpoint"].items() if k not in where}
        shown["checkpoint"] = {"partitions": done, **kept}
    for key, value in shown.items():
        if value not in (None, {}, "", []):
            table.add_row(f"[bold]{key}[/]", escape(_shown(key, value)))
    out.print(table)


def _nothing_stored(settings: Settings) -> bool:
    """True when there is nothing to read and no reason to start a server to read it: no
    LAKESYNC_MONGODB_URI, the embedded server not running, and its files without our
    database (no job ever ran with this data folder)."""
    if settings.mongodb_uri is not None:
        return False
    from lakesync.mongo import EmbeddedServer

    server = EmbeddedServer(settings.data_dir)
    return not server.holds(settings.database) and server.running_uri() is None


@contextlib.contextmanager
def _statuses(settings: Settings) -> Iterator[Any]:
    """The job statuses alone, for commands that only read them: no runtime (executor,
    lake readers, index builds) behind it, so they answer at once."""
    from lakesync.jobstore import JobStore
    from lakesync.mongo import Mongo

    with Mongo(settings, short=True) as mongo:
        mongo.ping()
        yield JobStore(mongo.db, settings.status_ttl_days)


def _shown(key: str, value: Any) -> str:
    """A status field for people: counts with separators, options and checkpoint as
    `name: value` lines (never a Python dict)."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int) and key.endswith(("Records", "partitions", "Done")):
        return f"{value:,}"
    if isinstance(value, dict):
        if {"column", "value"} <= value.keys():  # a watermark
            return f"{value['column']} = {value.get('iso') or value['value']}"
        lines = [f"{k}: {_shown(k, v)}" for k, v in value.items() if v not in (None, {}, "", [])]
        return "\n".join(lines) or "-"
    if isinstance(value, list):
        return ", ".join(str(v) for v in value)
    return str(value)


@app.command(cls=_Command)
def jobs(
    limit: Annotated[int, typer.Option(min=1, max=1000, help="How many jobs.")] = 20,
    as_json: JsonFlag = False,
) -> None:
    """List recent jobs, newest first."""
    try:
        settings = _settings()
        found = []
        if not _nothing_stored(settings):
            with _statuses(settings) as store:
                found = store.list_jobs(limit=limit)
    except LakesyncError as e:
        _fail(e)
    if as_json:
        _print_json({"jobs": [j.public() for j in found]})
        return
    if not found:
        out.print(
            "No jobs yet. Start one with `lakesync copy` or from the page of `lakesync serve`.",
        )
        return
    # job ids never wrap nor shrink, so they can be pasted into `lakesync status`; each
    # job's source and result go on a line of their own below, shortened to the terminal
    rows = [
        (j.jobId, j.status.value, j.operation, j.startTime.astimezone(UTC).strftime("%m-%d %H:%M"))
        for j in found
    ]
    head = ("jobId", "status", "operation", "started UTC")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(4)]
    width = out.width if out.is_terminal else None
    if width is not None:  # the operation's name gives way (with …), never the others
        widths[2] = max(9, min(widths[2], width - widths[0] - widths[1] - widths[3] - 6))

    def line(cells: tuple[str, ...]) -> str:
        fitted = [
            c if len(c) <= w else c[: w - 1] + "…" for c, w in zip(cells, widths, strict=True)
        ]
        return "  ".join(c.ljust(w) for c, w in zip(fitted, widths, strict=True)).rstrip()

    out.print(f"[bold]{escape(line(head))}[/]", highlight=False)
    for j, row in zip(found, rows, strict=True):
        out.print(escape(line(row)), highlight=False)
        out.print(f"[dim]{escape(_job_line(j, width))}[/]", highlight=False)


def _job_line(j: JobStatus, width: int | None) -> str:
    """`  source  result` of a job, shortened to `width` (None: whole): the source from the
    left (its end names the lake), the result at a word."""
    result = _result(j)
    source = str(j.options.get("source") or "")
    if width is None:
        return f"  {source}  {result}"
    room = max(width - 4 - len(result), 24)
    source = _shorten_left(source, min(room, max(24, width // 2)))
    return _shorten_words(f"  {source}  {result}", width)


def _result(j: JobStatus) -> str:
    """A job's outcome in a few words: counts when completed, the error when failed."""
    from lakesync.models import JobState

    if j.state is JobState.FAILED:
        return f"failed: {j.error or j.message or ''}".strip()
    if j.state is JobState.COMPLETED:
        dry = "would be " if j.options.get("mode") == "dry-run" else ""
        parts = [f"{j.insertedRecords:,} {dry}inserted", f"{j.updatedRecords:,} updated"]
        parts.append(f"{j.unchangedRecords:,} unchanged")
        if j.duplicateRecords:
            parts.append(f"{j.duplicateRecords:,} duplicate")
        if j.errorRecords:
            parts.append(f"{j.errorRecords:,} rejected")
        if j.deletedRecords:
            parts.append(f"{j.deletedRecords:,} deleted")
        return ", ".join(parts)
    done = f"{j.processedRecords:,}" + (f" of {j.totalRecords:,}" if j.totalRecords else "")
    return f"{done} records" + (f"; {j.message}" if j.state is JobState.CANCELLED else "")


def _shorten_left(text: str, width: int) -> str:
    """`…/lake/part-0.parquet`: a path kept whole from a `/`, its start left out."""
    if len(text) <= width:
        return text
    tail = text[-(width - 1) :]
    cut = tail.find("/")
    return "…" + (tail[cut:] if 0 <= cut < len(tail) - 1 else tail)


def _shorten_words(text: str, width: int) -> str:
    """`text` cut at the last space that fits `width`, with `…` (never inside a word)."""
    if len(text) <= width:
        return text
    cut = text.rfind(" ", 0, width - 1)
    return (text[:cut] if cut > 2 else text[: width - 1]).rstrip(" ,;:") + "…"


@app.command(cls=_Command, short_help="Cancel a job (after its current batch).")
def cancel(
    job_id: str,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
) -> None:
    """Cancel a job; a running one stops after its current batch. Exit 1 if it already ended.

    On a terminal it asks first (--yes does not); in a pipe or a script it never asks.
    """
    from lakesync.models import JobState
    from lakesync.runtime import Runtime

    try:
        with Runtime(_settings(), short=True) as rt:
            before = rt.jobs.get(job_id)  # to tell "cancelled now" from "was cancelled"
            if not yes and not before.state.is_final and sys.stdin.isatty():
                done = (
                    f"{before.processedRecords:,} of {before.totalRecords:,}"
                    if before.totalRecords
                    else f"{before.processedRecords:,}"
                )
                question = (
                    f"Cancel job {job_id} ({before.operation}, {before.status.value}, "
                    f"{done} records copied)?"
                )
                if not typer.confirm(question, default=False, err=True):
                    err.print(escape(f"Not cancelled; job {job_id} goes on."), highlight=False)
                    raise typer.Exit(1)
            s = rt.jobs.cancel(job_id)
    except LakesyncError as e:
        _fail(e)
    except typer.Abort:  # Ctrl-C or end of input at the question
        err.print(escape(f"\nNot cancelled; job {job_id} goes on."), highlight=False)
        raise typer.Exit(1) from None
    if before.state is JobState.CANCELLED:
        text = f"Job {job_id} was already cancelled; nothing to do."
    elif s.state is JobState.CANCELLED:
        text = f"Job {job_id} cancelled; {_plural(s.processedRecords, 'record')} had been copied."
    else:
        text = (
            f"Cancellation of job {job_id} requested; it stops after its current batch. "
            f"Follow it with `lakesync status {job_id}`."
        )
    out.print(escape(text), highlight=False)


@app.command("mongo-uri", cls=_Command, short_help="Print the MongoDB URI (for mongosh, drivers).")
def mongo_uri(
    show_password: Annotated[
        bool, typer.Option("--show-password", help="Print the password instead of ***.")
    ] = False,
    as_json: JsonFlag = False,
) -> None:
    """Print the MongoDB URI lakesync uses (e.g. for `mongosh "$(lakesync mongo-uri)"`).

    With no LAKESYNC_MONGODB_URI that is the embedded server, which listens while `lakesync
    serve` runs, and after another command until unused for LAKESYNC_EMBEDDED_IDLE seconds.
    """
    from lakesync.masking import masked
    from lakesync.mongo import EmbeddedServer, with_database

    settings = _settings()
    embedded = settings.mongodb_uri is None
    if settings.mongodb_uri is not None:
        uri = with_database(settings.mongodb_uri.get_secret_value(), settings.database)
        if not show_password:
            uri = masked(uri)
    else:
        running = EmbeddedServer(settings.data_dir).running_uri()
        if running is None:
            _fail(
                LakesyncError(
                    f"The embedded MongoDB-wire server of {settings.data_dir} is not running: it "
                    "listens while `lakesync serve` runs. Start `lakesync serve` (e.g. `make run`) "
                    "and ask again, or set LAKESYNC_MONGODB_URI to use your own MongoDB."
                )
            )
        uri = with_database(running, settings.database)
    if as_json:
        _print_json(
            {
                "uri": uri,
                "database": settings.database,
                "embedded": embedded,
                "dataDir": str(settings.data_dir) if embedded else None,
            }
        )
        return
    sys.stdout.write(uri + "\n")
    if embedded:  # on stderr: `mongosh "$(lakesync mongo-uri)"` gets the URI alone
        _notice(f"(the embedded server, files in {settings.data_dir})")
    else:
        _notice("(from LAKESYNC_MONGODB_URI)")


def shown_key(key: Any, missing: str = "(none)") -> str:
    """A rejected record's key for a reader: quoted where its text would hide what it is
    (empty, or spaces or control characters at its ends: "7 " is not 7); 0 is a key."""
    if key is None:
        return missing
    if isinstance(key, str) and (
        not key or key != key.strip() or not key.isprintable() or key == missing
    ):
        # characters that print as nothing or break the line (a zero-width space, U+2028)
        # escaped too: JSON escapes only the ASCII control characters
        text = json.dumps(key, ensure_ascii=False)
        return "".join(c if c.isprintable() else f"\\u{ord(c):04x}" for c in text)
    return str(key)


@app.command(cls=_Command, short_help="List a job's rejected records and why.")
def errors(
    job_id: str,
    as_csv: Annotated[
        bool, typer.Option("--csv", help="Print CSV (key,file,row,reason,time).")
    ] = False,
    limit: Annotated[int, typer.Option(min=1, help="At most this many records.")] = 100,
) -> None:
    """List a job's rejected records: key, file, row and reason, in lake order."""
    from rich.padding import Padding
    from rich.table import Table

    from lakesync import rejections

    try:
        with _statuses(_settings()) as store:
            job = store.get(job_id)
            found = list(itertools.islice(rejections.every(store.copyerrors, job_id), limit))
    except LakesyncError as e:
        _fail(e)
    if as_csv:
        sys.stdout.write(rejections.csv_header() + "".join(map(rejections.to_csv, found)))
        return
    if not found:
        out.print(escape(f"Job {job_id} rejected no records."), highlight=False)
        return
    # the files' common folder once, above; each file by its path below it, kept whole
    files = [str(doc["file"] or "") for doc in found]
    folder = os.path.commonpath(files) if all(f.startswith("/") for f in files) else ""
    if folder in files:  # one file: its folder
        folder = os.path.dirname(folder)
    if folder:
        out.print(escape(f"files under {folder}/"), highlight=False)
    rows = [
        (
            shown_key(doc["key"]),
            f"{file[len(folder) + 1 :] if folder else file}:{doc['row']}",
            str(doc["reason"] or ""),
        )
        for doc, file in zip(found, files, strict=True)
    ]
    key_width = max(len(word) for key, _, _ in rows for word in key.split() or [""])
    if key_width + max(len(place) for _, place, _ in rows) + 4 + 24 <= out.width:
        table = Table(box=None, pad_edge=False, header_style="bold")
        table.add_column("key", overflow="fold")
        table.add_column("file:row", no_wrap=True)
        table.add_column("reason", overflow="fold")  # wraps at its spaces
        for key, place, reason in rows:
            table.add_row(escape(key), escape(place), escape(reason))
        out.print(table, highlight=False)
    else:  # a table would squeeze the key and the reason beside a long path (a Delta file,
        # part-00000-<uuid>-c000.snappy.parquet): one block each, the reason below
        for key, place, reason in rows:
            out.print(f"[bold]{escape(key)}[/]  {escape(place)}", highlight=False)
            out.print(Padding(escape(reason), (0, 0, 0, 2), expand=False), highlight=False)
    if job.errorRecords > len(found):
        err.print(
            f"Showing {len(found):,} of {job.errorRecords:,} rejected records; "
            f"use --limit or --csv for more.",
            highlight=False,
        )


@app.command(cls=_Command, short_help="Print a job's own log.")
def logs(job_id: str) -> None:
    """Print a job's own log lines (runs, takeovers, retries, hand-backs, failures)."""
    from lakesync import joblog

    try:
        with _statuses(_settings()) as store:
            store.get(job_id)
            lines = joblog.read_lines(store.db, job_id)
    except LakesyncError as e:
        _fail(e)
    if not lines:
        err.print(escape(f"Job {job_id} has no log lines yet."), highlight=False)
    texts = []
    for line in lines:
        text = line["message"] + (f" ({line['cause']})" if line.get("cause") else "")
        texts.append((line["time"], line["level"].upper(), text))
    if not out.is_terminal:  # one line per log line, for grep and scripts
        for when, level, text in texts:
            sys.stdout.write(f"{when} {level:<7} {text}\n")
        return
    from lakesync.logs import wrap_at_spaces

    # on a terminal a line wraps at its spaces, as the -v log lines on stderr do
    for when, level, text in texts:
        sys.stdout.write(wrap_at_spaces(f"{when} {level:<7} {text}", out.width) + "\n")


@app.command(cls=_Command, short_help="List the operations, their last job and schedule.")
def operations(as_json: JsonFlag = False) -> None:
    """List the declared operations with their last job and watermark."""
    from rich.table import Table

    from lakesync.runtime import Runtime

    try:
        with Runtime(_settings(), short=True) as rt:
            listed = rt.registry.overview(rt.settings, rt.store, rt.runner.watermarks)
            rt.scheduler.annotate(listed)
    except LakesyncError as e:
        _fail(e)
    if as_json:
        _print_json({"operations": [op.model_dump(mode="json") for op in listed]})
        return
    width = out.width if out.is_terminal else 10_000
    for i, op in enumerate(listed):
        if i:
            out.print()
        last = (
            "no job yet" if op.lastJob is None else f"{op.lastJob['status']} {op.lastJob['jobId']}"
        )
        head = f"[bold]{escape(op.name)}[/]  mode {escape(op.mode)}"
        out.print(head, highlight=False)
        lines = [
            ("source", _shorten_left(op.source, width - 16)),
            ("collection", f"{op.collection} (_id = {op.key})"),
        ]
        if op.watermarkColumn is not None:
            mark = op.watermark.get("iso") or op.watermark["value"] if op.watermark else None
            shown = f"{op.watermarkColumn} >= {mark if mark is not None else '(none yet)'}"
            lines.append(("watermark", shown + (f" - {op.lookback}" if op.lookback else "")))
        if op.schedule is not None:
            lines.append(("schedule", _schedule_text(op.schedule)))
        lines.append(("last job", last))
        if op.description:
            lines.append(("about", op.description))
        table = Table(show_header=False, box=None, pad_edge=False, padding=(0, 2, 0, 2))
        table.add_column(no_wrap=True, style="dim")
        table.add_column(overflow="fold")  # wraps at spaces; a long word alone is folded
        for name, value in lines:
            table.add_row(name, escape(str(value)))
        out.print(table, highlight=False)


def _schedule_text(s: dict[str, Any]) -> str:
    """`30 7 * * * Europe/Berlin, next 12-07 07:30 CET` (or paused)."""
    when = s["schedule"] or f"every {s['every']}"
    if s["schedule"]:
        when += f" {s['timezone']}"
    if s["paused"]:
        return f"{when}, paused"
    return f"{when}, next {_local_time(s['nextRun'], s['timezone'])}"


def _local_time(iso: str | None, zone: str) -> str:
    """An ISO UTC time as `12-07 07:30 CET` in the schedule's time zone, never split."""
    if not iso:
        return "-"
    from zoneinfo import ZoneInfo

    from lakesync.schedules import zone_name

    at = datetime.fromisoformat(iso.replace("Z", "+00:00")).astimezone(ZoneInfo(zone))
    return at.strftime("%m-%d %H:%M ") + zone_name(at, zone)


@app.command(cls=_Command, short_help="Preview what a copy would read and write.")
def inspect(
    operation: Annotated[str, typer.Argument(help="Operation to preview.")] = "copy-taskdetail",
    source: Annotated[str | None, typer.Option(help="Lake URI (dir, file, glob, s3://).")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Preview a copy without copying: files, format, version, schema and the BSON types it
    becomes, rows, repeated keys, sample documents and rejections. Writes nothing."""
    from lakesync.operations import OperationRegistry
    from lakesync.preview import preview
    from lakesync.typemap import MONGODB, NX_27017

    try:
        settings = _settings()
        registry = OperationRegistry.from_settings(settings)
        if source is None and settings.lake_uri is None and registry.get(operation).source is None:
            from lakesync.demo import ensure_demo_lake

            ensure_demo_lake(settings)
        # the embedded server's gaps when it is the server; a configured one is assumed MongoDB
        limits = NX_27017 if settings.mongodb_uri is None else MONGODB
        options = {"source": source} if source else {}
        shown = preview(settings, registry, operation, options, limits=limits, trusted=True)
    except LakesyncError as e:
        _fail(e)
    if as_json:
        _print_json(shown)
        return
    _print_preview(shown)


def _print_preview(p: dict[str, Any]) -> None:
    """The preview for people: facts, then schema, samples and rejections, at 80 columns."""
    from rich.table import Table

    version = f", Delta version {p['deltaVersion']}" if p["deltaVersion"] is not None else ""
    if p.get("icebergSnapshotId") is not None:
        version = f", Iceberg snapshot {p['icebergSnapshotId']}"
    facts = [
        ("source", p["source"]),
        ("format", f"{p['format']}{version}, {_plural(p['files'], 'file')}"),
        ("rows", f"{p['rows']:,} (from {p['rowsFrom']})"),
        ("writes to", f"collection {p['collection']}, _id = {p['key']}, mode {p['mode']}"),
        ("sample", f"the first {_plural(p['sampleRows'], 'record')}: "
         f"{p['sampleRejected']:,} rejected, "
         f"{_plural(p['repeatedKeys']['keys'], 'key')} repeated "
         f"({_plural(p['repeatedKeys']['records'], 'record')} a later one replaces)"),
    ]  # fmt: skip
    doubt = p.get("orderInDoubt") or {}
    if doubt.get("files"):
        facts.append(("lake order", f"{_plural(doubt['files'], 'file')} whose rows' order the "
                      f"table cannot tell (e.g. {doubt['examples'][0]}): a key repeated in "
                      "them may be copied at an older version"))  # fmt: skip
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(no_wrap=True, style="bold")
    table.add_column(overflow="fold")
    for name, value in facts:
        table.add_row(name, escape(str(value)))
    out.print(table)
    columns = Table(box=None, pad_edge=False, header_style="bold", title_justify="left")
    columns.add_column("column", overflow="fold")
    columns.add_column("Arrow type", overflow="fold")
    columns.add_column("BSON type", overflow="fold")
    for c in p["schema"]:
        name = c["name"] + (" (key)" if c["key"] else "")
        columns.add_row(
            escape(name), escape(c["arrowType"]), escape(c["bsonType"] or "not written")
        )
    out.print()
    out.print(columns)
    if p["documents"]:
        out.print(f"\n[bold]{len(p['documents'])} sample documents as written[/]")
        for doc in p["documents"]:
            out.print(escape(json.dumps(doc, ensure_ascii=False)), highlight=False)
    if p["rejections"]:
        out.print(f"\n[bold]{_plural(len(p['rejections']), 'sample rejection')}[/]")
        for r in p["rejections"]:
            where = f"{Path(r['file']).name} row {r['row']}"
            text = f"{shown_key(r['key'], '(no key)')} ({where}): {r['reason']}"
            out.print(escape(text), highlight=False)


@app.command("demo-data", cls=_Command, short_help="Write a TaskDetail demo lake (Parquet).")
def demo_data(
    rows: Annotated[int, typer.Option(min=1, help="Records to write.")],
    out_dir: Annotated[Path, typer.Option("--out", help="Directory to write.")],
    bad_rows: Annotated[int, typer.Option(min=0, help="Records breaking schema rules.")] = 0,
    seed: Annotated[int, typer.Option(help="Random seed (same seed, same data).")] = 0,
) -> None:
    """Write a realistic TaskDetail demo lake (Parquet, partitioned by projectId)."""
    from lakesync.demo import generate

    if bad_rows > rows:
        _fail(LakesyncError(f"--bad-rows {bad_rows} is more than --rows {rows}."), 2)
    try:
        made = generate(out_dir, rows, bad_rows=bad_rows, seed=seed)
    except LakesyncError as e:
        _fail(e)
    text = (
        f"wrote {_plural(made.rows, 'record')} ({made.bad_rows:,} bad) in "
        f"{_plural(made.files, 'file')} to {made.out}"
    )
    out.print(escape(text), highlight=False)


@app.command(cls=_Command, short_help="Run a Celery worker (LAKESYNC_EXECUTOR=celery).")
def worker(
    concurrency: Annotated[int | None, typer.Option(min=1, help="Parallel jobs.")] = None,
) -> None:
    """Run a Celery worker that runs jobs (LAKESYNC_EXECUTOR=celery)."""
    try:
        from lakesync.worker import run_worker

        run_worker(_settings(server=True), concurrency)
    except LakesyncError as e:
        _fail(e)


@app.command(cls=_Command, short_help="List scheduled operations and their next run.")
def schedules(as_json: JsonFlag = False) -> None:
    """List scheduled operations: schedule, paused or not, next run, last run and result."""
    from rich.measure import Measurement
    from rich.padding import Padding
    from rich.table import Table

    from lakesync.models import new_job_id
    from lakesync.runtime import Runtime

    try:
        with Runtime(_settings(), short=True) as rt:
            listed = [
                {"operation": op.name, **(rt.scheduler.describe(op) or {})}
                for op, _ in rt.scheduler.scheduled()
            ]
    except LakesyncError as e:
        _fail(e)
    if as_json:
        _print_json({"schedules": listed})
        return
    if not listed:
        out.print(
            "No operation has a schedule (set LAKESYNC_SCHEDULE, or `schedule` or "
            "`every` in lakesync.toml).",
        )
        return
    whens = [s["schedule"] or f"every {s['every']}" for s in listed]
    whens = [
        f"{when} {s['timezone']}" if s["schedule"] and s["timezone"] != "UTC" else when
        for s, when in zip(listed, whens, strict=True)
    ]
    ids = any((s["lastRun"] or {}).get("jobId") for s in listed)
    rows = [_schedule_row(s) for s in listed]
    table = Table(box=None, pad_edge=False, header_style="bold")
    table.add_column("operation", no_wrap=True, overflow="ellipsis")
    # wraps at its spaces, never inside a word (a time zone, a cron field)
    table.add_column("schedule", min_width=max(len(w) for when in whens for w in when.split()))
    table.add_column("next run", no_wrap=True)
    table.add_column("last run", no_wrap=True, min_width=len(new_job_id()) if ids else None)
    for (name, upcoming, last), when in zip(rows, whens, strict=True):
        table.add_row(escape(name), escape(when), upcoming, escape("\n".join(last)))
    if Measurement.get(out, out.options.update_width(10_000), table).maximum <= out.width:
        out.print(table, highlight=False)
    else:  # a table would squeeze its columns (names, times cut): one block per schedule
        for i, ((name, upcoming, last), when) in enumerate(zip(rows, whens, strict=True)):
            block = Table(show_header=False, box=None, pad_edge=False, padding=(0, 1, 0, 0))
            block.add_column(no_wrap=True, style="dim")
            block.add_column(overflow="fold")  # wraps at spaces; a long word alone is folded
            block.add_row("schedule:", escape(when))
            block.add_row("next run:", upcoming)
            block.add_row("last run:", escape(" ".join(last)))
            if i:
                out.print()
            out.print(f"[bold]{escape(name)}[/]", highlight=False)
            out.print(Padding(block, (0, 0, 0, 2)), highlight=False)
    for s in listed:  # below the table, at the terminal's width: an error can be long
        if s["error"]:
            out.print(
                f"[red]schedule of {escape(s['operation'])} failing:[/] {escape(s['error'])}",
                highlight=False,
            )


def _schedule_row(s: dict[str, Any]) -> tuple[str, str, list[str]]:
    """A schedule's name, next run (markup: paused, failing) and last run (its lines)."""
    last = s["lastRun"]
    shown = ["-"]
    if last is not None:
        shown = [f"{_local_time(last['slot'], s['timezone'])} {last['outcome']}"]
        if last.get("jobId"):
            shown += [last["jobId"], *([last["result"]] if last["result"] else [])]
    upcoming = _local_time(s["nextRun"], s["timezone"])
    return (
        s["operation"],
        "paused" if s["paused"] else upcoming if s["nextRun"] else "[red]failing[/]",
        shown,
    )


def _pause(name: str, paused: bool) -> None:
    from lakesync.runtime import Runtime

    try:
        with Runtime(_settings(), short=True) as rt:
            scheduled = (op for op, _ in rt.scheduler.scheduled() if op.name == name)
            before = next((rt.scheduler.describe(op) for op in scheduled), None) or {}
            s = rt.scheduler.pause(name) if paused else rt.scheduler.unpause(name)
    except LakesyncError as e:
        _fail(e)
    already = "was already" if bool(before.get("paused")) == paused else "is now"
    text = (
        f"Schedule of {name} {already} paused; running jobs go on."
        if paused
        else f"Schedule of {name} {already} running; next run "
        f"{_local_time(s['nextRun'], s['timezone'])}."
    )
    out.print(escape(text), highlight=False)


@app.command(cls=_Command, short_help="Pause an operation's schedule.")
def pause(operation: str) -> None:
    """Pause an operation's schedule (its running job, if any, goes on)."""
    _pause(operation, True)


@app.command(cls=_Command, short_help="Resume an operation's schedule.")
def unpause(operation: str) -> None:
    """Resume an operation's schedule; slots passed while paused are not run."""
    _pause(operation, False)


def _verbose_first(args: list[str]) -> list[str]:
    """`lakesync jobs -v` as `lakesync -v jobs`: -v is the group's option, typed anywhere."""
    if "--" in args:
        return args
    flags = [a for a in args if a in ("-v", "--verbose")]
    return flags + [a for a in args if a not in ("-v", "--verbose")]


# Commands that only read and print. Their process ends as soon as the answer is written:
# at interpreter exit pymongo joins its monitor threads, each of which notices the client's
# close only when it wakes from its half-second sleep (pymongo.periodic_executor), which
# added up to 0.5 s to every such command with nothing left to do.
_READ_COMMANDS = frozenset({"jobs", "status", "errors", "logs", "operations", "schedules"})


def main() -> None:
    """Entry point: settings errors become one clear line and exit code 2."""
    args = _verbose_first(sys.argv[1:])
    try:
        try:
            app(args=args, prog_name="lakesync")
        except LakesyncError as e:
            _fail(e, 2)
    except SystemExit as e:
        command = next((a for a in args if not a.startswith("-")), None)
        if command in _READ_COMMANDS:
            _exit_now(e.code)
        raise


def _exit_now(code: object) -> NoReturn:
    """End a read command's process once its output is out (see _READ_COMMANDS)."""
    if code is not None and not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code or 0)
