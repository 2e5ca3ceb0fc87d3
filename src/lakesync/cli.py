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
from collections.abc import Iterator
from datetime import UTC
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn
from rich.table import Table
from typer.core import TyperCommand, TyperGroup

from lakesync.config import Settings, get_settings, unknown_variables
from lakesync.errors import ConfigError, JobError, LakesyncError
from lakesync.logs import configure_logging, json_enabled
from lakesync.models import JobState, JobStatus, Outcome, new_job_id

err = Console(stderr=True)
out = Console()
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


def _settings(*, server: bool = False) -> Settings:
    """The settings, with logging configured: quiet (warnings only) for a short command on
    text logs, unless -v or LAKESYNC_LOG_LEVEL asks for more; `server` (serve, worker) logs
    at LAKESYNC_LOG_LEVEL as a service should."""
    settings = get_settings()
    level = settings.log_level
    chosen = "log_level" in settings.model_fields_set
    if _verbose and not chosen:
        level = "INFO"
    elif not (_verbose or server or chosen or settings.log_format == "json"):
        level = "WARNING"
    configure_logging(settings.log_format, level)
    for warning in unknown_variables(os.environ):
        if server or json_enabled():
            logger.warning("%s", warning)
        else:
            err.print(f"[yellow]warning:[/] {escape(warning)}", highlight=False, soft_wrap=True)
    logger.info("data folder %s", settings.data_dir)
    return settings


def _fail(error: Exception, code: int | None = None) -> NoReturn:
    """Print one clear line to stderr and exit with `code`; by default 2 for a bad setting
    (a start-up error) and 1 for anything else. With `--json`, stdout gets `{"error": ...}`."""
    if _wants_json():
        _print_json({"error": str(error)})
    if json_enabled():
        logger.error("%s", error)
    else:
        err.print(f"[bold red]error:[/] {escape(str(error))}", highlight=False, soft_wrap=True)
    if code is None:
        code = 2 if isinstance(error, ConfigError) else 1
    raise typer.Exit(code)


def _notice(text: str, **fields: str) -> None:
    """A note for the user on stderr; a log line when logs are JSON, so stderr stays JSON."""
    if json_enabled():
        logger.info("%s", text, extra=fields)
    else:
        err.print(text, highlight=False)


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


@app.command(cls=_CopyCommand)
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
        with Runtime(settings, executor=None, reads_lake=demo) as rt:
            status, created = rt.jobs.start(operation, options, trusted=True, trigger="cli")
            if not created and status.state is not JobState.PENDING:
                _fail(
                    LakesyncError(
                        f"Job {status.jobId} for {operation} on this source is already "
                        f"{status.status.value}; follow it with "
                        f"`lakesync status {status.jobId}`."
                    ),
                    COPY_FAILED,
                )
            # a pending job of this source (e.g. paused by Ctrl-C) resumes from its checkpoint
            verb = "started" if created else "resumed from its checkpoint"
            _notice(f"job {status.jobId} {verb}", jobId=status.jobId, operation=operation)
            final = _run_foreground(rt, status.jobId, show_bar=err.is_terminal and not as_json)
    except LakesyncError as e:
        _fail(e, COPY_FAILED)
    _finish(final, as_json)


def _finish(final: JobStatus, as_json: bool) -> NoReturn:
    if as_json:
        _print_json(final.public())
    else:
        _print_summary(final)
    raise typer.Exit(0 if final.state is JobState.COMPLETED else 1)


@app.command(cls=_Command)
def resume(job_id: str, as_json: JsonFlag = False) -> None:
    """Continue a failed, paused or abandoned job from its checkpoint, in the foreground;
    exit 1 unless it completes."""
    from lakesync.runtime import Runtime

    try:
        with Runtime(_settings(), executor=None, reads_lake=True) as rt:
            current = rt.jobs.get(job_id)
            if current.state.is_final:
                rt.jobs.resume(job_id)  # refuses completed and cancelled jobs, with the reason
            # a pending job nobody runs (e.g. paused by Ctrl-C), or one whose run died,
            # is claimed as it is; a job another process runs right now is refused below
            _notice(f"job {job_id} resumed from its checkpoint", jobId=job_id)
            final = _run_foreground(rt, job_id, show_bar=err.is_terminal and not as_json)
    except LakesyncError as e:
        _fail(e)
    _finish(final, as_json)


def _run_foreground(rt: Any, job_id: str, show_bar: bool) -> JobStatus:
    """Run the job in this thread until it ends; Ctrl-C pauses it at a batch boundary.

    Raises JobError when another process runs the job right now.
    """
    previous = signal.getsignal(signal.SIGINT)

    def interrupt(*_: object) -> None:
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
    with Progress(*columns, console=err, disable=not show_bar) as bar, _logs_above_the_bar():
        # the total is unknown (None) until the job's first run counted the lake
        task = bar.add_task("copying", total=None, counts="", rate="")

        def progress(s: JobStatus) -> None:
            total = s.totalRecords or None
            counts = f"{s.processedRecords:,}" + (f"/{total:,}" if total else "") + " records"
            bar.update(
                task,
                total=total,
                completed=s.processedRecords,
                counts=counts,
                rate=f"{s.recordsPerSecond:,.0f}/s",
            )

        first = True
        while True:
            outcome = rt.runner.run(job_id, on_progress=progress)
            if first and outcome is Outcome.NOT_CLAIMED:
                now = rt.store.get(job_id)
                if not now.state.is_final:
                    raise JobError(
                        f"Job {job_id} is {now.status.value} and another process runs it "
                        f"right now; follow it with `lakesync status {job_id}`, or cancel it "
                        f"with `lakesync cancel {job_id}`.",
                        status=now.status.value,
                    )
            first = False
            if outcome is not Outcome.CONTINUE or rt.runner.stop.is_set():
                break
    final: JobStatus = rt.store.get(job_id)
    return final


@contextlib.contextmanager
def _logs_above_the_bar() -> Iterator[None]:
    """Log lines go through the progress bar's stderr (rich redirects it while the bar is
    drawn), so they print above the bar instead of through it."""
    swapped = []
    if sys.stderr is not sys.__stderr__:  # the bar is drawn
        for handler in logging.getLogger().handlers:
            if type(handler) is logging.StreamHandler and handler.stream is sys.__stderr__:
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
    colour = {"completed": "green", "failed": "red", "cancelled": "yellow"}.get(s.status, "cyan")
    out.print(f"[bold {colour}]{s.status.value}[/] {s.jobId}: {s.message or ''}", highlight=False)
    if s.error:
        out.print(f"[red]{s.error}[/]", highlight=False)
    if s.state is JobState.PENDING:
        out.print(
            f"Continue it with `lakesync resume {s.jobId}` (or run `lakesync copy` again, "
            "or `lakesync serve`): it resumes from its checkpoint.",
            highlight=False,
        )


@app.command(cls=_Command)
def status(job_id: str, as_json: JsonFlag = False) -> None:
    """Show one job's status."""
    from lakesync.runtime import Runtime

    try:
        with Runtime(_settings()) as rt:
            s = rt.jobs.get(job_id)
    except LakesyncError as e:
        _fail(e)
    if as_json:
        _print_json(s.public())
        return
    table = Table(show_header=False, box=None)
    table.add_column(no_wrap=True)
    table.add_column(overflow="fold")
    for key, value in s.public().items():
        if value not in (None, {}, "", []):
            table.add_row(f"[bold]{key}[/]", escape(_shown(key, value)))
    out.print(table)


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
    from lakesync.runtime import Runtime

    try:
        with Runtime(_settings()) as rt:
            found = rt.jobs.list(limit=limit)
    except LakesyncError as e:
        _fail(e)
    if as_json:
        _print_json({"jobs": [j.public() for j in found]})
        return
    if not found:
        out.print(
            "No jobs yet. Start one with `lakesync copy` or from the page of `lakesync serve`."
        )
        return
    # job ids never wrap nor shrink, so they can be pasted into `lakesync status`; the
    # other columns fold when the terminal is narrow (80 columns fit them all)
    table = Table(box=None, pad_edge=False, header_style="bold")
    table.add_column("jobId", no_wrap=True, min_width=max(len(j.jobId) for j in found))
    table.add_column("status", overflow="fold")
    table.add_column("operation", overflow="fold")
    table.add_column("records", justify="right", overflow="fold")
    table.add_column("started UTC", overflow="fold")
    for j in found:
        started = j.startTime.astimezone(UTC).strftime("%m-%d %H:%M")
        table.add_row(
            j.jobId, j.status.value, escape(j.operation), f"{j.processedRecords:,}", started
        )
    out.print(table)


@app.command(cls=_Command)
def cancel(
    job_id: str,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
) -> None:
    """Cancel a job; a running one stops after its current batch. Exit 1 if it already ended.

    On a terminal it asks first (--yes does not); in a pipe or a script it never asks.
    """
    from lakesync.runtime import Runtime

    try:
        with Runtime(_settings()) as rt:
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
                    err.print(f"Not cancelled; job {job_id} goes on.", highlight=False)
                    raise typer.Exit(1)
            s = rt.jobs.cancel(job_id)
    except LakesyncError as e:
        _fail(e)
    except typer.Abort:  # Ctrl-C or end of input at the question
        err.print(f"\nNot cancelled; job {job_id} goes on.", highlight=False)
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
    out.print(escape(text), highlight=False, soft_wrap=True)


@app.command("mongo-uri", cls=_Command)
def mongo_uri(
    show_password: Annotated[
        bool, typer.Option("--show-password", help="Print the password instead of ***.")
    ] = False,
    as_json: JsonFlag = False,
) -> None:
    """Print the MongoDB URI lakesync uses (e.g. for `mongosh "$(lakesync mongo-uri)"`).

    With no LAKESYNC_MONGODB_URI that is the embedded server of `lakesync serve`, which
    listens only while serve (or another lakesync command) runs.
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
        _notice(
            f"(the embedded server of `lakesync serve`, files in {escape(str(settings.data_dir))})"
        )
    else:
        _notice("(from LAKESYNC_MONGODB_URI)")


@app.command(cls=_Command)
def errors(
    job_id: str,
    as_csv: Annotated[
        bool, typer.Option("--csv", help="Print CSV (key,file,row,reason,time).")
    ] = False,
    limit: Annotated[int, typer.Option(min=1, help="At most this many records.")] = 100,
) -> None:
    """List a job's rejected records: key, file, row and reason, in lake order."""
    from lakesync import rejections
    from lakesync.runtime import Runtime

    try:
        with Runtime(_settings()) as rt:
            job = rt.jobs.get(job_id)
            found = list(itertools.islice(rejections.every(rt.store.copyerrors, job_id), limit))
    except LakesyncError as e:
        _fail(e)
    if as_csv:
        sys.stdout.write(rejections.csv_header() + "".join(map(rejections.to_csv, found)))
        return
    if not found:
        out.print(f"Job {job_id} rejected no records.", highlight=False)
        return
    table = Table("key", "file", "row", "reason")
    for doc in found:
        table.add_row(
            escape(str(doc["key"] or "")),
            escape(str(doc["file"] or "")),
            str(doc["row"]),
            escape(str(doc["reason"] or "")),
        )
    out.print(table)
    if job.errorRecords > len(found):
        err.print(
            f"Showing {len(found):,} of {job.errorRecords:,} rejected records; "
            f"use --limit or --csv for more.",
            highlight=False,
        )


@app.command(cls=_Command)
def logs(job_id: str) -> None:
    """Print a job's own log lines (runs, takeovers, retries, hand-backs, failures)."""
    from lakesync import joblog
    from lakesync.runtime import Runtime

    try:
        with Runtime(_settings()) as rt:
            rt.jobs.get(job_id)
            lines = joblog.read_lines(rt.store.db, job_id)
    except LakesyncError as e:
        _fail(e)
    if not lines:
        err.print(f"Job {job_id} has no log lines yet.", highlight=False)
    for line in lines:
        text = f"{line['time']} {line['level'].upper():<7} {line['message']}"
        if line.get("cause"):
            text += f" ({line['cause']})"
        sys.stdout.write(text + "\n")


@app.command(cls=_Command)
def operations(as_json: JsonFlag = False) -> None:
    """List the declared operations with their last job and watermark."""
    from lakesync.runtime import Runtime
    from lakesync.watermarks import WatermarkStore

    try:
        with Runtime(_settings()) as rt:
            listed = rt.registry.overview(rt.settings, rt.store, WatermarkStore(rt.store.db))
            rt.scheduler.annotate(listed)
    except LakesyncError as e:
        _fail(e)
    if as_json:
        _print_json({"operations": [op.model_dump(mode="json") for op in listed]})
        return
    names = max((len(op.name) for op in listed), default=0)
    columns = ("operation", "source -> collection", "watermark", "last job")
    table = _table(*columns, widths={"operation": names})
    for op in listed:
        mark = (
            "-"
            if op.watermarkColumn is None
            else f"{op.watermarkColumn} >= "
            + (str(op.watermark["value"]) if op.watermark else "(none yet)")
        )
        if op.lookback is not None:
            mark += f" - {op.lookback}"
        last = "-" if op.lastJob is None else f"{op.lastJob['status']}\n{op.lastJob['jobId']}"
        table.add_row(
            f"[bold]{escape(op.name)}[/]\nmode {op.mode}\n{escape(op.description)}",
            escape(f"{op.source} -> {op.collection}"),
            escape(mark),
            escape(last),
        )
    out.print(table)


def _table(*columns: str, widths: dict[str, int] | None = None) -> Table:
    """A table whose last column holds job ids: kept whole (ids are 30 characters) at 80
    columns; the others wrap rather than cut their text, each at least `widths` wide (so
    that, say, operation names stay on one line)."""
    table = Table(box=None, pad_edge=False, header_style="bold")
    for name in columns[:-1]:
        table.add_column(name, overflow="fold", min_width=(widths or {}).get(name))
    table.add_column(columns[-1], no_wrap=True, min_width=len(new_job_id()))
    return table


@app.command(cls=_Command)
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
    version = f", Delta version {p['deltaVersion']}" if p["deltaVersion"] is not None else ""
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
            out.print(escape(json.dumps(doc, ensure_ascii=False)), highlight=False, soft_wrap=True)
    if p["rejections"]:
        out.print(f"\n[bold]{len(p['rejections'])} sample rejections[/]")
        for r in p["rejections"]:
            where = f"{Path(r['file']).name} row {r['row']}"
            text = f"{r['key'] or '(no key)'} ({where}): {r['reason']}"
            out.print(escape(text), highlight=False, soft_wrap=True)


@app.command("demo-data", cls=_Command)
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
    out.print(
        f"wrote {_plural(made.rows, 'record')} ({made.bad_rows:,} bad) in "
        f"{_plural(made.files, 'file')} to {made.out}"
    )


@app.command(cls=_Command)
def worker(
    concurrency: Annotated[int | None, typer.Option(min=1, help="Parallel jobs.")] = None,
) -> None:
    """Run a Celery worker that runs jobs (LAKESYNC_EXECUTOR=celery)."""
    try:
        from lakesync.worker import run_worker

        run_worker(_settings(server=True), concurrency)
    except LakesyncError as e:
        _fail(e)


@app.command(cls=_Command)
def schedules(as_json: JsonFlag = False) -> None:
    """List scheduled operations: schedule, paused or not, next run, last run and result."""
    from lakesync.runtime import Runtime

    try:
        with Runtime(_settings()) as rt:
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
            "`every` in lakesync.toml)."
        )
        return
    names = max((len(s["operation"]) for s in listed), default=0)
    table = _table("operation", "schedule", "next run", "last run", widths={"operation": names})
    for s in listed:
        when = s["schedule"] or f"every {s['every']}"
        if s["schedule"] and s["timezone"] != "UTC":
            when += f" ({s['timezone']})"
        last = s["lastRun"]
        shown = (
            "-"
            if last is None
            else f"{last['slot']}\n{last['outcome']}"
            + (f" {last['result'] or ''}\n{last['jobId']}" if last.get("jobId") else "")
        )
        table.add_row(
            escape(s["operation"]),
            escape(when),
            "paused" if s["paused"] else str(s["nextRun"]),
            escape(shown),
        )
    out.print(table)


def _pause(name: str, paused: bool) -> None:
    from lakesync.runtime import Runtime

    try:
        with Runtime(_settings()) as rt:
            s = rt.scheduler.pause(name) if paused else rt.scheduler.unpause(name)
    except LakesyncError as e:
        _fail(e)
    text = (
        f"Schedule of {name} paused; running jobs go on."
        if paused
        else f"Schedule of {name} resumed; next run {s['nextRun']}."
    )
    out.print(escape(text), highlight=False, soft_wrap=True)


@app.command(cls=_Command)
def pause(operation: str) -> None:
    """Pause an operation's schedule (its running job, if any, goes on)."""
    _pause(operation, True)


@app.command(cls=_Command)
def unpause(operation: str) -> None:
    """Resume an operation's schedule; slots passed while paused are not run."""
    _pause(operation, False)


def _verbose_first(args: list[str]) -> list[str]:
    """`lakesync jobs -v` as `lakesync -v jobs`: -v is the group's option, typed anywhere."""
    if "--" in args:
        return args
    flags = [a for a in args if a in ("-v", "--verbose")]
    return flags + [a for a in args if a not in ("-v", "--verbose")]


def main() -> None:
    """Entry point: settings errors become one clear line and exit code 2."""
    try:
        app(args=_verbose_first(sys.argv[1:]), prog_name="lakesync")
    except LakesyncError as e:
        _fail(e, 2)
