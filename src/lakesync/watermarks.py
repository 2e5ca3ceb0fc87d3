"""Watermarks: how far an operation has read a lake, so incremental copies read only changes.

An operation's watermark is the highest value of its watermark column (e.g. ``updatedAt``)
in the last completed copy of a source. It lives in ``syncstate``, one document per
operation and source, which the store boundary reads and writes (``boundary.WatermarkStore``:
this module computes watermarks and never sees a job)::

    {_id: "op|source", operation, source, jobId, mode, updatedAt,
     watermark: {column, kind, value, iso}}

The value is a number (epoch milliseconds for timestamps and dates) inside a nested
document: nx-27017 turns a top-level date given to ``$set`` into a string and cannot
range-query dates written by ``$currentDate``, while numbers behave alike on every server.

At its start a job scans the watermark column alone (with pyarrow filter pushdown, so
Parquet row groups and files whose statistics rule them out are not read) for the rows at
or above the watermark (``since``, less the operation's ``lookback``) and their highest
value (``until``), and pins both in its checkpoint. The watermark's own value is read again:
a record that lands later with exactly that value (same day, same second, same
millisecond) is then found by the next copy instead of never; the records already copied
come out unchanged, a read and no write. An incremental job reads
``since <= column <= until``: a resumed run reads with
the same filter, so checkpoint positions (counted in filtered rows) stay valid, and a
record rewritten while the job runs is newer than ``until`` and read by the next copy
instead of being skipped. A job that reads a Delta table pins its version, whose files
cannot change, and reads ``since <= column`` with no upper bound; the next incremental
copy then opens only the files added after that version (``plan.Planner._open``). A
completed job, of any mode, moves the watermark to ``until`` (and records the Delta
version it read); a failed or cancelled one leaves it where it was.

A CSV or JSON lake's watermark cells are filtered and scanned as the copy's validation
reads them (``sources.text.Compared``, ``Lake.as_compared``): a file whose cells are in two
formats is text to Arrow's reader, yet its values count, and a cell that cannot be read is
kept by the filter (validation rejects it with the reason), never dropped.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Literal

import pyarrow as pa
import pyarrow.compute as pc

from lakesync.errors import RequestError, SourceError
from lakesync.lake import Lake
from lakesync.models import Watermark
from lakesync.operations import Mode, Operation, duration_ms

logger = logging.getLogger(__name__)

Kind = Literal["timestamp", "date", "int"]
_DAY_MS = 86_400_000
_SCAN_ROWS = 65_536  # rows per batch of the watermark scan (one column)
_PER_MS = {"s": (1000, 1), "ms": (1, 1), "us": (1, 1000), "ns": (1, 1_000_000)}
_INT64 = (-(2**63), 2**63 - 1)


def kind_of(arrow_type: pa.DataType) -> Kind | None:
    """The watermark kind of an Arrow type (None when it cannot be a watermark)."""
    if pa.types.is_timestamp(arrow_type):
        return "timestamp"
    if pa.types.is_date(arrow_type):
        return "date"
    if pa.types.is_integer(arrow_type):
        return "int"
    return None


def lake_kind(lake: Lake, column: str) -> Kind:
    """The kind of the lake's watermark column; SourceError if it is missing or unusable."""
    if not lake.has_column(column):
        raise SourceError(
            f"The watermark column {column!r} is not in the lake at {lake.uri} (it has: "
            f"{', '.join(lake.schema.names)}). Incremental copies need it: fix the "
            "operation's `watermark` in lakesync.toml, or run a full copy (mode full).",
            column=column,
        )
    arrow_type = lake.schema.field(column).type
    kind = kind_of(arrow_type)
    if kind is None:
        text = ""
        if lake.format in ("csv", "json") and pa.types.is_string(arrow_type):
            text = (
                " If its cells are times or integers written as text, declare the field's "
                f'type ({column} = {{type = "timestamp"}} or "int" in the operation\'s '
                "[schema.fields]): they are then compared as validation reads them."
            )
        raise SourceError(
            f"The watermark column {column!r} in the lake at {lake.uri} is {arrow_type}; "
            "a watermark must be a timestamp, date or integer column. Fix the operation's "
            f"`watermark` in lakesync.toml, or run a full copy (mode full).{text}",
            column=column,
        )
    return kind


def scan(lake: Lake, column: str, since: Watermark | None) -> tuple[int, Watermark | None]:
    """Rows whose watermark is at or above ``since`` (None: all rows), and their highest value.

    Parquet statistics answer first, with no file opened: a file whose highest value is
    below ``since`` holds no such row (and is ruled out for every later read of the job's
    filter, see ``Lake.rule_out``), a file whose lowest value is at or above it holds all of
    its non-null rows, and in a full scan a file's rows and highest value are in its footer.
    Only the other files (no statistics, or values on both sides of ``since``) are read,
    the watermark column alone, several at a time.
    """
    rows, high = 0, None
    above = None if since is None else _at_least(lake, since)
    unread, below = [], []
    for index in range(len(lake.files)):
        known = lake.file_stats(index, column)
        if known is None:
            unread.append(index)
            continue
        (low_value, high_value, nulls), count = known
        top = None if high_value is None else _watermark_of(high_value, column)
        if since is None:
            rows, high = rows + count, later(high, top)
        elif top is None or top.value < since.value:
            below.append(index)  # nothing at or above the watermark: never opened
        elif (bottom := _watermark_of(low_value, column)) is not None and (
            bottom.value >= since.value
        ):
            rows, high = rows + count - nulls, later(high, top)
        else:
            unread.append(index)
    if since is not None:
        lake.rule_out(below)
    if unread:
        rest = lake.only([lake.file_name(i) for i in unread])
        for batch in rest.batches(_SCAN_ROWS, filter=above, columns=[column]):
            rows += batch.table.num_rows
            # a text lake's cells as its filter compares them (``Lake.as_compared``)
            high = later(high, batch_max(lake.as_compared(batch.table), column))
    return rows, high


def _watermark_of(value: pa.Scalar | None, column: str) -> Watermark | None:
    """A statistic (min or max) as a watermark, sub-milliseconds dropped as ``batch_max``
    drops them: comparisons with a watermark of whole milliseconds stay exact."""
    if value is None:
        return None
    return batch_max(pa.table({column: pa.array([value])}), column)


def lake_filter(
    lake: Lake, since: Watermark | None, until: Watermark | None
) -> pc.Expression | None:
    """The pushdown filter of an incremental job: ``since <= column <= until`` (None: all;
    no upper bound without ``until``)."""
    if since is None:
        return None
    above = _at_least(lake, since)
    return above if until is None else above & _at_most(lake, until)


def _at_least(lake: Lake, since: Watermark) -> pc.Expression:
    """``column >= since``. A ``since`` below the least value the column's type holds (a
    lookback reaching past an int32's -2**31, a timestamp[ns]'s 1677) is no bound: every
    value (nulls stay out, as any comparison leaves them); one above its greatest, none."""
    field = pc.field(since.column)
    low, high = _type_range(lake, since)
    if since.value < low:
        return field.is_valid()
    if since.value > high:
        return field.is_valid() & pc.scalar(False)
    return field >= _scalar(lake, since)


def _at_most(lake: Lake, until: Watermark) -> pc.Expression:
    """``column <= until``, with no bound past the type's greatest value (see ``_at_least``)."""
    field = pc.field(until.column)
    low, high = _type_range(lake, until)
    if until.value > high:
        return field.is_valid()
    if until.value < low:
        return field.is_valid() & pc.scalar(False)
    return field <= _scalar(lake, until)


def reach_back(saved: Watermark | None, lookback: str | int | None) -> Watermark | None:
    """Where an incremental copy starts reading: the saved watermark, less the operation's
    ``lookback`` (a duration for timestamps and dates, a number for integers).

    A date goes back to the start of its day, so a lookback shorter than a day reads the
    day before too. SourceError when the lookback does not fit the column's kind.
    """
    if saved is None or not lookback:
        return saved
    if saved.kind == "int":
        if isinstance(lookback, str):
            raise SourceError(
                f"The operation's lookback {lookback!r} is a duration, but its watermark column "
                f"{saved.column!r} holds integers. Set lookback to a number in lakesync.toml "
                "(e.g. lookback = 100).",
                column=saved.column,
            )
        # no integer column holds less than int64's least value, which MongoDB can store
        # in the checkpoint (a Python int below it cannot be)
        return saved.model_copy(update={"value": max(saved.value - lookback, _INT64[0])})
    if not isinstance(lookback, str):
        raise SourceError(
            f"The operation's lookback {lookback} is a number, but its watermark column "
            f"{saved.column!r} holds {saved.kind}s. Set lookback to a duration in lakesync.toml "
            '(e.g. lookback = "2h").',
            column=saved.column,
        )
    millis = saved.value - (duration_ms(lookback) or 0)
    if saved.kind == "date":
        millis = millis // _DAY_MS * _DAY_MS
    return from_millis(saved.column, millis, kind=saved.kind)


def _scalar(lake: Lake, since: Watermark) -> pa.Scalar:
    """A watermark as an Arrow scalar comparable with the lake's column."""
    if not lake.has_column(since.column):
        lake_kind(lake, since.column)  # raises, naming the column
    arrow_type = lake.schema.field(since.column).type
    kind = kind_of(arrow_type)
    if kind != since.kind:
        raise SourceError(
            f"The watermark column {since.column!r} in the lake at {lake.uri} is now "
            f"{arrow_type}, but the last copy recorded a {since.kind} watermark. Run a full "
            "copy (mode full) to record a new watermark.",
            column=since.column,
        )
    if kind == "timestamp":  # the comparison casts to the column's unit
        return pa.scalar(since.value, type=pa.timestamp("ms", tz=arrow_type.tz))
    if kind == "date":
        return pa.scalar(since.value // _DAY_MS, type=pa.date32())
    return pa.scalar(since.value, type=arrow_type)


def _type_range(lake: Lake, w: Watermark) -> tuple[int, int]:
    """The least and greatest watermark values (``Watermark.value``'s units) that compare
    with the lake's column without overflowing its type (checked by ``_scalar``)."""
    arrow_type = lake.schema.field(w.column).type
    if pa.types.is_integer(arrow_type):
        bits = arrow_type.bit_width
        if pa.types.is_signed_integer(arrow_type):
            return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        return 0, 2**bits - 1
    if pa.types.is_timestamp(arrow_type):
        # the comparison casts the millisecond scalar to a finer column unit (us, ns)
        per = _PER_MS[arrow_type.unit][1]
        return -(2**63 // per), (2**63 - 1) // per
    if pa.types.is_date(arrow_type):  # compared as date32: days in an int32
        return -(2**31) * _DAY_MS, 2**31 * _DAY_MS - 1
    return _INT64


def batch_max(table: pa.Table, column: str) -> Watermark | None:
    """The highest watermark in a batch (None if the batch has no usable value).

    Sub-millisecond digits are dropped (rounding down): a copy may read again a record of
    the same millisecond, never skip one.
    """
    if column not in table.column_names:
        return None
    values = table.column(column)
    if pa.types.is_dictionary(values.type):
        values = values.cast(values.type.value_type)
    kind = kind_of(values.type)
    if kind is None or len(values) == 0:
        return None
    top = pc.max(values)
    if not top.is_valid:
        return None
    if kind == "timestamp":
        mul, div = _PER_MS[values.type.unit]
        return from_millis(column, int(top.value) * mul // div)
    if kind == "date":
        raw = int(top.value)  # date32: days, date64: milliseconds
        days = raw if pa.types.is_date32(values.type) else raw // _DAY_MS
        return from_millis(column, days * _DAY_MS, kind="date")
    return Watermark(column=column, kind="int", value=int(top.as_py()))


def from_millis(column: str, millis: int, kind: Kind = "timestamp") -> Watermark:
    """A timestamp (or date) watermark from epoch milliseconds, with its ISO form."""
    try:
        when = datetime.fromtimestamp(millis / 1000, tz=UTC)
    except (ValueError, OverflowError, OSError):  # before year 1 or after 9999 (a lookback)
        return Watermark(column=column, kind=kind, value=millis)
    text = when.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    return Watermark(column=column, kind=kind, value=millis, iso=text)


def later(a: Watermark | None, b: Watermark | None) -> Watermark | None:
    """The higher of two watermarks of one column (either may be None)."""
    if a is None or b is None:
        return a or b
    return b if b.value > a.value else a


def shown(w: Watermark | None) -> str:
    """A watermark for messages: its ISO time, or its number."""
    if w is None:
        return "none"
    return w.iso or str(w.value)


def watermark_column(op: Operation, lake: Lake, mode: Mode) -> str | None:
    """The column a job of this mode tracks (None: none); incremental needs a usable one."""
    if op.watermark is None:
        if mode == "incremental":
            raise RequestError(
                f"Operation {op.name!r} has no watermark column, so it cannot "
                "copy incrementally. Use mode full."
            )
        return None
    if mode == "incremental":
        lake_kind(lake, op.watermark)  # SourceError when missing or of the wrong type
        return op.watermark
    usable = lake.has_column(op.watermark) and kind_of(lake.schema.field(op.watermark).type)
    return op.watermark if usable else None
