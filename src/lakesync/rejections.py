"""Reading a job's rejected records (`copyerrors`) page by page, in lake order."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

from pymongo import ASCENDING
from pymongo.collection import Collection

from lakesync.errors import RequestError

FIELDS = ("key", "file", "row", "reason", "time")
ORDER = [("file", ASCENDING), ("row", ASCENDING)]


def ensure_indexes(coll: Collection[dict[str, Any]]) -> None:
    """A job's rejections in lake order (the pages follow it)."""
    coll.create_index([("jobId", ASCENDING), ("file", ASCENDING), ("row", ASCENDING)])


def parse_cursor(after: str, job_id: str) -> tuple[str, int]:
    """(file, row) of an `after` cursor: `<row>:<file>` as `page` returns it; RequestError
    (400) for anything else."""
    row, sep, file = after.partition(":")
    if not sep or not (row.isascii() and row.isdigit()):
        raise RequestError(
            f"after={after!r} is not a cursor of job {job_id}'s errors; pass the `next` value "
            "of the previous page (or leave it out for the first page)."
        )
    return file, int(row)


def cursor_of(doc: dict[str, Any]) -> str:
    """The `after` value that continues past this rejection."""
    return f"{doc.get('row', 0)}:{doc.get('file') or ''}"


def page(
    coll: Collection[dict[str, Any]], job_id: str, limit: int, after: str | None = None
) -> tuple[list[dict[str, Any]], str | None]:
    """Up to `limit` rejections after the cursor, and the cursor of the next page (or None)."""
    query: dict[str, Any] = {"jobId": job_id}
    if after:
        file, row = parse_cursor(after, job_id)
        query["$or"] = [{"file": {"$gt": file}}, {"file": file, "row": {"$gt": row}}]
    docs = [public(d) for d in coll.find(query, {"_id": 0}).sort(ORDER).limit(limit + 1)]
    more = len(docs) > limit
    docs = docs[:limit]
    return docs, (cursor_of(docs[-1]) if more and docs else None)


def every(coll: Collection[dict[str, Any]], job_id: str) -> Iterator[dict[str, Any]]:
    """All of the job's rejections in lake order, streamed."""
    for doc in coll.find({"jobId": job_id}, {"_id": 0}).sort(ORDER).batch_size(1000):
        yield public(doc)


def public(doc: dict[str, Any]) -> dict[str, Any]:
    """One rejection as the API shows it: key, file, row, reason, time (ISO, Z)."""
    when = doc.get("time")
    if isinstance(when, datetime):
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        when = when.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    key = doc.get("key")
    return {
        "key": key if key is None or isinstance(key, str | int | float) else str(key),
        "file": doc.get("file"),
        "row": doc.get("row"),
        "reason": doc.get("reason"),
        "time": when,
    }


def csv_header() -> str:
    """The CSV download's first line."""
    return to_csv(dict(zip(FIELDS, FIELDS, strict=True)))


def to_csv(doc: dict[str, Any]) -> str:
    """One CSV line (RFC 4180 quoting; cells that a spreadsheet would run as formulas are
    prefixed with a quote)."""
    buf = io.StringIO()
    cells = ["" if doc.get(f) is None else str(doc.get(f)) for f in FIELDS]
    cells = ["'" + c if _formula(c) else c for c in cells]
    csv.writer(buf, lineterminator="\r\n").writerow(cells)
    return buf.getvalue()


#: what starts a formula in a spreadsheet (OWASP, "CSV Injection"): = + - @, and a tab or a
#: carriage return, which some spreadsheets skip before reading the cell
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _formula(cell: str) -> bool:
    """Whether a spreadsheet could run `cell` as a formula: it starts with one of
    _FORMULA_START, also after leading blanks (" =1+1"); plain numbers ("-5") are data."""
    if cell.startswith(("\t", "\r")):
        return True
    if cell.startswith(_FORMULA_START):
        return not _number(cell)
    stripped = cell.lstrip(" \n\x0b\x0c\u00a0\u3000")
    return stripped != cell and stripped.startswith(_FORMULA_START)


def _number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def to_ndjson(doc: dict[str, Any]) -> str:
    """One NDJSON line."""
    return json.dumps(doc) + "\n"
