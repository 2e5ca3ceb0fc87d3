"""Logging set-up, done once when a process starts: human text or one JSON object per line.

Every line is masked (passwords in URIs become ``***``). Job code runs inside
`job_context`, so each line it logs, whichever module logs it, carries ``jobId`` (and
``operation``) as JSON fields; `extra={...}` adds more fields (batch, counts, seconds).
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import os
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

from lakesync.masking import masked

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}
_JOB: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar("job", default=None)
_format = "text"


@contextlib.contextmanager
def job_context(job_id: str, operation: str | None = None) -> Iterator[None]:
    """Tag every record logged in this context (thread or task) with the job's id."""
    fields = {"jobId": job_id} | ({"operation": operation} if operation else {})
    token = _JOB.set(fields)
    try:
        yield
    finally:
        _JOB.reset(token)


class JobFields(logging.Filter):
    """Adds the `job_context` fields to a record that does not carry them already."""

    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in (_JOB.get() or {}).items():
            if not hasattr(record, key):
                setattr(record, key, value)
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and any `extra` fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": masked(record.getMessage()),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_") and key not in out:
                out[key] = masked(value)
        if record.exc_info:
            out["exception"] = masked(self.formatException(record.exc_info))
        if record.stack_info:
            out["stack"] = masked(self.formatStack(record.stack_info))
        return json.dumps(out, default=lambda v: masked(str(v)))


class MaskingFormatter(logging.Formatter):
    """The human format, with passwords in URIs masked."""

    def format(self, record: logging.LogRecord) -> str:
        return masked(super().format(record))


def wrap_at_spaces(text: str, width: int) -> str:
    """A log line for a terminal: wrapped at its spaces, the rest indented under its time; a
    word (a path, a URI) is never split, even one longer than the line. Each line of a
    multi-line text (a traceback) is wrapped on its own."""
    import textwrap

    return "\n".join(
        textwrap.fill(
            line, width=width, subsequent_indent="  ", break_long_words=False,
            break_on_hyphens=False, drop_whitespace=True,
        ) if len(line) > width else line
        for line in text.split("\n")
    )  # fmt: skip


def terminal_width(stream: Any) -> int | None:
    """The columns of the terminal `stream` writes to; None for a pipe or a file."""
    # while a progress bar is drawn rich replaces sys.stderr with a proxy (an io.TextIOBase,
    # whose isatty() is False) that prints above the bar: the terminal is the file behind it
    stream = getattr(stream, "rich_proxied_file", stream)
    try:
        if not stream.isatty():
            return None
        return os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, OSError, ValueError):
        return None


class WrappingHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The stderr handler: on a terminal each line wraps at its spaces (as errors, tables
    and `lakesync logs` do); in a pipe or a file it stays one line, for grep and scripts."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if isinstance(self.formatter, JsonFormatter):
            return text
        width = terminal_width(self.stream)
        return text if width is None else wrap_at_spaces(text, width)


def configure_logging(fmt: str = "text", level: str = "INFO") -> None:
    """Install one stderr handler on the root logger (replacing earlier ones)."""
    global _format
    handler = WrappingHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(MaskingFormatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    handler.addFilter(JobFields())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    for noisy in ("pymongo", "urllib3", "botocore", "celery", "kombu", "amqp"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLevelName(level)))
    logging.captureWarnings(True)  # warnings become (JSON, masked) log lines, not raw stderr
    _format = fmt


def json_enabled() -> bool:
    """Whether stderr carries JSON lines only (then the CLI logs its notices instead)."""
    return _format == "json"
