"""Record schemas and their validation: an Arrow batch in, valid documents and rejections out.

Validation is vectorised with pyarrow.compute; Python touches a value only when a column
has the wrong Arrow type (to name the bad values) and when documents are built. The copy
engine does not build them: it takes each record's BSON from ``Validated.encoded``, which
writes it column by column (see ``encode.py``).
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cached_property
from typing import Any, Literal

import bson
import pyarrow as pa
import pyarrow.compute as pc
from bson import SON
from bson.datetime_ms import DatetimeMS
from pydantic import BaseModel, Field

from lakesync.encode import encode_rows, writes
from lakesync.errors import SourceError
from lakesync.typemap import (
    INT64_MAX,
    MARKER_RESERVE,
    MAX_DOCUMENT_BYTES,
    MAX_NESTING,
    MONGODB,
    CompositeKey,
    ServerLimits,
    bson_error,
    decoded,
    field_name_problem,
    is_nested,
    python_values,
    stored_key,
    too_deep,
    too_large,
    type_depth,
    value_depth,
    value_type,
)

FieldType = Literal["string", "float", "int", "bool", "timestamp", "list[string]", "any"]

_ARROW: dict[str, pa.DataType] = {
    "string": pa.string(),
    "float": pa.float64(),
    "int": pa.int64(),
    "bool": pa.bool_(),
    "timestamp": pa.timestamp("ms", tz="UTC"),
    "list[string]": pa.list_(pa.string()),
}


class FieldRule(BaseModel):
    """One field of a record schema and the rules its values must follow."""

    name: str
    type: FieldType = "any"
    required: bool = False
    nullable: bool = True
    min: float | None = None
    allowed: list[str] | None = None
    nonEmpty: bool = False


class RecordSchema(BaseModel):
    """The fields of a record, its key field(s), and whether unknown columns are kept.

    A list of key columns makes ``_id`` a subdocument of them, in that order.
    """

    key: str | list[str]
    fields: list[FieldRule] = Field(default_factory=list)
    keepExtra: bool = False

    @property
    def key_columns(self) -> list[str]:
        """The key's column(s), in the declared order."""
        return [self.key] if isinstance(self.key, str) else list(self.key)

    def required_columns(self) -> list[str]:
        """Columns that must exist in the lake."""
        required = [f.name for f in self.fields if f.required]
        return required + [k for k in self.key_columns if k not in required]


TASK_DETAIL = RecordSchema(
    key="taskDetailId",
    fields=[
        FieldRule(name="taskDetailId", type="string", required=True, nullable=False, nonEmpty=True),
        FieldRule(name="taskId", type="string", required=True, nullable=False),
        FieldRule(name="projectId", type="string", required=True, nullable=False),
        FieldRule(name="assignee", type="string"),
        FieldRule(
            name="status",
            type="string",
            required=True,
            nullable=False,
            allowed=["todo", "in_progress", "blocked", "done"],
        ),
        FieldRule(name="hoursLogged", type="float", required=True, nullable=False, min=0),
        FieldRule(name="estimateHours", type="float", min=0),
        FieldRule(name="startedAt", type="timestamp"),
        FieldRule(name="completedAt", type="timestamp"),
        FieldRule(name="updatedAt", type="timestamp", required=True, nullable=False),
        FieldRule(name="tags", type="list[string]"),
        FieldRule(name="notes", type="string"),
    ],
)


@dataclass(frozen=True)
class Rejection:
    """A record that was not written, and why."""

    row: int  # index in the batch
    key: str | None
    reason: str


@dataclass
class Validated:
    """The outcome of validating one batch.

    ``columns`` hold the valid rows, converted as they are stored (see ``_prepare``);
    ``documents`` (Python dicts) and ``encoded`` (their BSON) are built from them on demand.
    """

    rows: list[int]  # batch row index of each document
    rejections: list[Rejection]
    columns: dict[str, pa.Array] = field(default_factory=dict)
    key: str | list[str] = ""
    #: columns encode.py does not write, as BSON-ready values of the valid rows
    values: dict[str, list[Any]] = field(default_factory=dict)
    #: the Arrow type of each column as validated (those in ``values`` too, whose
    #: ``columns`` entry only holds nulls)
    types: dict[str, pa.DataType] = field(default_factory=dict)
    bodies: list[bytes] | None = None  # the BSON of each document, once encoded

    def column_values(self, name: str) -> list[Any]:
        """The BSON-ready values of one column, for the valid rows."""
        if name in self.values:
            return self.values[name]
        return _to_python(self.columns[name])

    @cached_property
    def ids(self) -> list[Any]:
        """The ``_id`` of each document as it is written (composite keys as SON)."""
        if not self.columns:
            return []
        if isinstance(self.key, str):
            return self.column_values(self.key)
        parts = [self.column_values(k) for k in self.key]
        return [SON(zip(self.key, row, strict=True)) for row in zip(*parts, strict=True)]

    @cached_property
    def keys(self) -> list[Any]:
        """The ``_id`` of each document as the server answers it (hashable, comparable)."""
        if not self.columns:
            return []
        if isinstance(self.key, str):
            kind = self.columns[self.key].type
            if self.key not in self.values and (
                pa.types.is_string(kind) or pa.types.is_integer(kind)
            ):  # the common keys are answered as they are sent
                return self.ids
            return [stored_key(v) for v in self.ids]
        return [CompositeKey((k, stored_key(v)) for k, v in doc.items()) for doc in self.ids]

    @cached_property
    def documents(self) -> list[dict[str, Any]]:
        """``{"_id": key, field: value, ...}`` for each valid row, BSON-ready values."""
        if not self.columns:
            return []
        names = ("_id", *self.columns)
        values = [self.column_values(name) for name in self.columns]
        return [dict(zip(names, row, strict=True)) for row in zip(self.ids, *values, strict=True)]

    def encoded(self) -> list[bytes]:
        """The BSON of each document: ``bson.encode(documents[i])``, byte for byte."""
        if self.bodies is None:
            self.bodies = self._encode()
        return self.bodies

    def _encode(self) -> list[bytes]:
        if not self.columns:
            return []
        out = None
        if (
            len(self.rows) >= COLUMNWISE_ROWS
            and "_id" not in self.columns
            and not self.values
            and isinstance(self.key, str)
        ):
            fields = [("_id", self.columns[self.key]), *self.columns.items()]
            out = encode_rows(fields, len(self.rows))
        if out is None:  # few rows, or a column type encode.py does not write
            return self._encode_by_rows()
        data, offsets = out
        bounds = offsets.tolist()
        return [data[a:b] for a, b in itertools.pairwise(bounds)]

    def _encode_by_rows(self) -> list[bytes]:
        """``bson.encode(documents[i])`` for each row, a group of ``FIELD_GROUP`` fields at
        a time: a document's BSON is its elements in order, so each group is encoded as a
        document of its own and the groups' elements are joined. Only one group's Python
        values exist at once (a batch of 100,000 fields held ~30 MB of them as documents)."""
        names = list(dict.fromkeys(("_id", *self.columns)))  # a later "_id" takes its value
        groups = [names[i : i + FIELD_GROUP] for i in range(0, len(names), FIELD_GROUP)]
        parts: list[list[bytes]] = [[] for _ in self.rows]
        for group in groups:
            values = [self.column_values(n) if n in self.columns else self.ids for n in group]
            for part, row in zip(parts, zip(*values, strict=True), strict=True):
                part.append(bson.encode(dict(zip(group, row, strict=True))))
        if len(groups) == 1:
            return [part[0] for part in parts]
        return [_join_documents(part) for part in parts]


#: batches of fewer rows are encoded a document at a time: ``encode_rows`` spends a few
#: numpy calls per column (~0.5 ms), which pays only over a few hundred rows (a batch of
#: 3 rows of 100,000 columns took 65 s and 150 MB that way, against 1 s one row at a time)
COLUMNWISE_ROWS = 256
#: fields encoded together by ``Validated._encode_by_rows``
FIELD_GROUP = 1000


def _join_documents(parts: list[bytes]) -> bytes:
    """One BSON document of the elements of the documents ``parts``, in order."""
    size = 5 + sum(len(p) - 5 for p in parts)
    return b"".join([size.to_bytes(4, "little"), *(p[4:-1] for p in parts), b"\x00"])


def check_columns(schema: RecordSchema, columns: list[str] | pa.Schema, where: str) -> None:
    """Fail the whole job up front when the lake lacks a required column or has an unusable
    key column (a list, struct or map: it cannot be compared as an ``_id``)."""
    names = list(columns.names) if isinstance(columns, pa.Schema) else list(columns)
    missing = [c for c in schema.required_columns() if c not in names]
    if missing:
        hint = (
            "Point the source at TaskDetail records, or declare the operation's schema in "
            "lakesync.toml."
            if schema is TASK_DETAIL
            else "Point the source at a lake that has them, or fix the operation's key and "
            "schema in lakesync.toml."
        )
        raise SourceError(
            f"The lake at {where} lacks required column(s) {', '.join(missing)} "
            f"(it has: {', '.join(names) or 'none'}). {hint}"
        )
    if isinstance(columns, pa.Schema):
        for name in schema.key_columns:
            kind = columns.field(name).type
            if is_nested(kind):
                raise SourceError(
                    f"The key column {name!r} of the lake at {where} is of type {kind}: a "
                    "list, struct or map cannot be a key. Choose scalar key columns (several "
                    'make a composite key: key = ["a", "b"]).',
                    column=name,
                )
    declared = {f.name for f in schema.fields}
    kept = schema.keepExtra or not schema.fields or "_id" in declared
    if (
        "_id" in names and "_id" not in schema.key_columns and kept
    ):  # it would replace the key as _id
        raise SourceError(
            f"The lake at {where} has a column named _id. lakesync stores every record under "
            f"its declared key ({schema.key}) as _id, and that column would silently replace "
            "it. Rename or drop the _id column in the lake, declare the operation's key as "
            "_id if that column is the key, or declare a [schema] that does not keep it "
            "(keepExtra = false)."
        )


def _py_convert(value: Any, ftype: str) -> Any:
    """Convert one value of a mistyped column; raise ValueError naming the problem."""
    if value is None:
        return None
    if ftype == "float":
        if isinstance(value, bool):
            raise ValueError
        out = float(value)
        if math.isnan(out):
            raise ValueError
        return out
    if ftype == "int":
        if isinstance(value, str):  # CSV text: "7", or "7.0" as pandas writes a column with NaN
            try:
                return int(value)
            except ValueError:
                value = float(value)
        if isinstance(value, float) and not value.is_integer():
            raise ValueError
        return int(value)
    if ftype == "bool":
        if isinstance(value, str) and value.lower() in {"true", "false"}:
            return value.lower() == "true"
        if isinstance(value, bool):
            return value
        raise ValueError
    if ftype == "string":
        if isinstance(value, (dict, list)):
            raise ValueError
        return str(value)
    if ftype == "timestamp":
        if isinstance(value, datetime):
            return value if value.tzinfo else value.replace(tzinfo=UTC)
        if isinstance(value, str):
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
            return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
        raise ValueError
    if ftype == "list[string]":
        if isinstance(value, str):
            value = (
                json.loads(value)
                if value.startswith("[")
                else [v.strip() for v in value.split(";") if v.strip()]
            )
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ValueError
        return value
    return value


#: a cell that the column's cast cannot read either (see ``_cast_alone``)
_NOT_CAST = object()


def _cast_alone(column: pa.Array, i: int, target: pa.DataType) -> Any:
    """Cell ``i`` read alone by the cast that read clean columns (``_NOT_CAST``: it cannot
    be). A cell that cast reads ("1" as true, "0x10" as 16, "nan") is read so in a batch
    whose column failed the cast too: a cell's verdict must not depend on the other cells
    of its batch, the batch size or a partition's bounds. Only cells ``_py_convert`` refused
    come here (a cast per cell costs ~60 us, 170 times the Python conversion)."""
    try:
        return column.slice(i, 1).cast(target).to_pylist()[0]
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
        return _NOT_CAST


_TYPE_WORDS = {
    "float": "a number",
    "int": "an integer",
    "bool": "true or false",
    "string": "a string",
    "timestamp": "a timestamp",
    "list[string]": "a list of strings",
}


def read_as(
    column: pa.ChunkedArray | pa.Array, ftype: FieldType, name: str
) -> tuple[pa.Array, dict[int, str]]:
    """``column`` read as validation reads a field declared ``ftype`` (one rule: a text
    lake's watermark cells are filtered and scanned as they are validated, see
    ``sources.text.Compared``); a value it cannot read is null, with its reason."""
    return _coerce(column, FieldRule(name=name, type=ftype))


def _coerce(column: pa.ChunkedArray | pa.Array, rule: FieldRule) -> tuple[pa.Array, dict[int, str]]:
    """Cast a column to the rule's type; values that cannot be cast become null + a reason."""
    col, bad = _cast(column, rule)
    if pa.types.is_floating(col.type):  # NaN means "missing" (pandas): null, so rules see it
        col = pc.if_else(pc.is_nan(col), pa.scalar(None, col.type), col)
    return col, bad


def _cast(column: pa.ChunkedArray | pa.Array, rule: FieldRule) -> tuple[pa.Array, dict[int, str]]:
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    target = _ARROW.get(rule.type)
    if target is None or column.type == target:
        return column, {}
    if pa.types.is_dictionary(column.type):
        column = column.dictionary_decode()
    try:
        if rule.type == "list[string]" and pa.types.is_null(column.type):
            return pa.nulls(len(column), target), {}
        # timestamps: sub-millisecond digits are dropped (BSON dates hold milliseconds)
        if pa.types.is_timestamp(column.type) and pa.types.is_timestamp(target):
            return _prepare(column).cast(target), {}  # to milliseconds, as undeclared ones
        return column.cast(target), {}
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
        pass
    values: list[Any] = []
    bad: dict[int, str] = {}
    for i, value in enumerate(column.to_pylist()):
        try:
            converted = _py_convert(value, rule.type)
        except (ValueError, TypeError, OverflowError):
            converted = _cast_alone(column, i, target)
        if converted is _NOT_CAST:
            values.append(None)
            bad[i] = f"{rule.name} must be {_TYPE_WORDS[rule.type]}, got {value!r:.60}"
            continue
        if (
            rule.type == "int"
            and converted is not None
            and not -INT64_MAX - 1 <= converted <= INT64_MAX
        ):
            values.append(None)  # never a double: a key would be another number
            bad[i] = (
                f"{rule.name}: {converted} is beyond a 64-bit integer, which is what a field "
                'declared {type = "int"} is stored as; declare it {type = "string"} to keep '
                "it as text, or leave it undeclared (JSON: stored exactly, as Decimal128)"
            )
            continue
        values.append(converted)
    return pa.array(values, type=target), bad


def _rule_masks(col: pa.Array, rule: FieldRule, is_key: bool) -> list[tuple[pa.Array, str]]:
    """(mask of rows breaking a rule, reason template) for each rule of the field."""
    masks: list[tuple[pa.Array, str]] = []
    if not rule.nullable or is_key:
        masks.append((pc.is_null(col), f"{rule.name} is required but missing"))
    if (rule.nonEmpty or is_key) and pa.types.is_string(col.type):
        masks.append((pc.equal(pc.utf8_length(col), 0), f"{rule.name} must not be empty"))
    if rule.min is not None and (pa.types.is_floating(col.type) or pa.types.is_integer(col.type)):
        masks.append((pc.less(col, rule.min), f"{rule.name} must be >= {rule.min:g}, got {{v}}"))
    if rule.allowed is not None:
        allowed = pa.array(rule.allowed, type=col.type) if pa.types.is_string(col.type) else None
        if allowed is not None:
            bad = pc.invert(pc.is_in(col, value_set=allowed))
            masks.append((bad, f"{rule.name} must be one of {', '.join(rule.allowed)}, got {{v}}"))
    return masks


_PER_MS = {"s": 1000, "ms": 1, "us": -1000, "ns": -1_000_000}


def _prepare(col: pa.Array) -> pa.Array:
    """A column as encode.py writes it: timestamps and dates as UTC milliseconds.

    Timestamps are truncated to milliseconds (towards the past, as BSON dates are), never
    refused for their sub-millisecond digits; a value in seconds whose milliseconds do not
    fit in int64 becomes null here, and ``_storable`` rejects its row.
    """
    col = decoded(col)
    if pa.types.is_timestamp(col.type) and col.type.unit != "ms":
        per = _PER_MS[col.type.unit]
        ints = col.cast(pa.int64())
        if per > 0:
            fits = pc.less_equal(pc.abs(ints), INT64_MAX // per)
            ms = pc.multiply(pc.if_else(fits, ints, pa.scalar(None, pa.int64())), per)
        else:  # floor division: pyarrow divides towards zero
            q = pc.divide(ints, -per)
            ms = pc.if_else(pc.greater(pc.multiply(q, -per), ints), pc.subtract(q, 1), q)
        return ms.cast(pa.timestamp("ms", tz=col.type.tz))
    if pa.types.is_date32(col.type):
        return pc.multiply(col.cast(pa.int32()).cast(pa.int64()), 86_400_000).cast(
            pa.timestamp("ms", tz="UTC")
        )
    if pa.types.is_date64(col.type):
        return col.cast(pa.int64()).cast(pa.timestamp("ms", tz="UTC"))
    return col


def _storable(
    name: str, col: pa.Array, limits: ServerLimits
) -> tuple[pa.Array | list[Any], dict[int, str]]:
    """A column as it is stored (prepared Arrow, or BSON-ready values), and why rows cannot be."""
    if not writes(value_type(col.type)) and not (
        pa.types.is_timestamp(value_type(col.type)) or pa.types.is_date(value_type(col.type))
    ):
        values, bad = python_values(col, limits)
        if 1 + type_depth(col.type) > MAX_NESTING:  # the document is level 1
            for i, value in enumerate(values):
                depth = 1 + value_depth(value)
                if depth > MAX_NESTING and i not in bad:
                    bad[i] = too_deep(depth)
        return values, {i: f"{name}: {why}" for i, why in bad.items()}
    prepared = _prepare(col)
    bad = {}
    kind = prepared.type
    if pa.types.is_timestamp(kind):
        if prepared.null_count != col.null_count:  # seconds whose milliseconds overflow
            lost = pc.and_(prepared.is_null(), col.is_valid())
            for i in pc.indices_nonzero(lost).to_pylist():
                bad[i] = f"{name}: {_show(col[i])} is beyond the range of a BSON date"
        low, high = limits.date_range or (None, None)
        if low is not None and high is not None:
            ms = prepared.cast(pa.int64())
            span = pc.min_max(ms).as_py()
            if span["min"] is not None and (span["min"] < low or span["max"] > high):
                out = pc.or_(pc.less(ms, low), pc.greater(ms, high))
                for i in pc.indices_nonzero(pc.fill_null(out, False)).to_pylist():
                    why = f"the date {ms[i].as_py()} ms from 1970 is outside the years 1-9999"
                    bad.setdefault(i, f"{name}: {limits.refuse(why)}")
    elif pa.types.is_floating(kind) and not limits.non_finite:
        finite = pc.fill_null(pc.is_finite(prepared), True)
        if not pc.all(finite).as_py():
            for i in pc.indices_nonzero(pc.invert(finite)).to_pylist():
                why = f"{prepared[i].as_py()} is not a finite number"
                bad[i] = f"{name}: {limits.refuse(why)}"
    return prepared, bad


def _to_python(col: pa.Array) -> list[Any]:
    """A prepared column as BSON-ready Python values, timestamps as cheap DatetimeMS."""
    if pa.types.is_timestamp(col.type):
        millis = col.cast(pa.int64()).to_pylist()
        if col.null_count == 0:
            return list(map(DatetimeMS, millis))
        return [None if m is None else DatetimeMS(m) for m in millis]
    return list(col.to_pylist())


def validate(
    schema: RecordSchema,
    table: pa.Table,
    limits: ServerLimits = MONGODB,
    encode: bool = True,
    refused: Mapping[int, str] | None = None,
) -> Validated:
    """Validate a batch: documents (`_id` = key) for good rows, a Rejection for each bad one.

    A row is also rejected when one of its values cannot be stored (see ``typemap.py``),
    with the column and the reason; ``limits`` are those of the server written to. The
    documents are encoded here (``Validated.encoded``), and one bson refuses rejects its
    record; without ``encode`` that last check is skipped (for readers of a few columns
    that need no BSON, such as repeats.py's first pass). ``refused`` rows (by their row in
    the table) are those the lake's reader refused, rejected with its reason.
    """
    n = table.num_rows
    reasons: dict[int, str] = dict(refused or {})
    columns: dict[str, pa.Array] = {}
    key_columns = schema.key_columns
    rules = schema.fields or [FieldRule(name=k, type="any") for k in key_columns]
    rules += [
        FieldRule(name=k, type="any") for k in key_columns if k not in {r.name for r in rules}
    ]
    names = {r.name for r in rules}
    for rule in rules:
        if rule.name in table.column_names:
            col, bad = _coerce(table.column(rule.name), rule)
        elif rule.required or rule.name in key_columns:
            col, bad = pa.nulls(n), {}
        else:
            continue
        for i, why in bad.items():
            reasons.setdefault(i, why)
        for mask, why in _rule_masks(col, rule, rule.name in key_columns):
            mask = pc.fill_null(mask, False)
            if pc.any(mask).as_py():
                for i in pc.indices_nonzero(mask).to_pylist():
                    if i not in reasons:
                        reasons[i] = why.format(v=repr(col[i].as_py()))
        columns[rule.name] = col
    if schema.keepExtra or not schema.fields:
        for name, chunked in zip(table.column_names, table.columns, strict=True):
            if name not in names:  # (by place: table.column(name) looks the name up)
                columns[name] = (
                    chunked.chunk(0) if chunked.num_chunks == 1 else chunked.combine_chunks()
                )
    composite = not isinstance(schema.key, str)
    for name in columns:  # MongoDB's field name rules: the name is in every record
        problem = field_name_problem(name, top=True, in_id=composite and name in key_columns)
        if name == "_id" and schema.key != "_id":
            problem = (
                "is _id, which would take the place of the key as the document's _id; "
                'rename the column, or make it the key (key = "_id")'
            )
        if problem:
            for i in range(n):
                reasons.setdefault(i, f"{name!r:.80}: the field name {problem}")
    stored: dict[str, pa.Array | list[Any]] = {}
    for name, col in columns.items():
        stored[name], bad = _storable(name, col, limits)
        for i, why in bad.items():
            reasons.setdefault(i, why)
    for name in key_columns:
        _check_keys(name, stored[name], limits, reasons)
    keys = columns[key_columns[0]] if len(key_columns) == 1 else None
    rejections = [
        Rejection(row=i, key=_row_key(keys, columns, key_columns, i), reason=reasons[i])
        for i in sorted(reasons)
    ]
    rows = [i for i in range(n) if i not in reasons] if reasons else list(range(n))
    if reasons:
        keep = pa.array([i not in reasons for i in range(n)])
        stored = {
            k: pc.filter(v, keep) if isinstance(v, pa.Array) else [v[i] for i in rows]
            for k, v in stored.items()
        }
    arrays = {k: v if isinstance(v, pa.Array) else pa.nulls(len(rows)) for k, v in stored.items()}
    values = {k: v for k, v in stored.items() if isinstance(v, list)}
    types = {k: c.type for k, c in columns.items()}
    out = Validated(rows, rejections, columns=arrays, key=schema.key, values=values, types=types)
    return _encode_or_reject(out) if encode else out


def _check_keys(
    name: str, stored: pa.Array | list[Any], limits: ServerLimits, reasons: dict[int, str]
) -> None:
    """Reject rows whose key the server could not find again (a rerun could not compare it)."""
    if isinstance(stored, pa.Array):
        kind = stored.type
        if not (
            (pa.types.is_boolean(kind) and bool in limits.unfindable_keys)
            or (pa.types.is_floating(kind) and float in limits.unfindable_keys)
        ):
            return
        values = stored.to_pylist()
    else:
        values = stored
    for i, value in enumerate(values):
        if value is not None and type(value) in limits.unfindable_keys and i not in reasons:
            reasons[i] = (
                f"{name}: the key {value!r:.60} is a {_TYPE_NAMES.get(type(value), type(value))}"
                f", and the server ({limits.name}) cannot find documents by such an _id, so "
                "it could not compare the record on the next copy"
            )


_TYPE_NAMES = {bool: "boolean", bytes: "binary value", float: "double"}


def _encode_or_reject(out: Validated) -> Validated:
    """Encode the documents; a document bson.encode refuses, or one larger than MongoDB
    stores (``typemap.MAX_DOCUMENT_BYTES``, with room for the marker), rejects its record."""
    failed: dict[int, str] = {}
    try:
        bodies = out.encoded()
    except Exception:  # one bad document: find it, encode the others
        bodies = []
        for j, doc in enumerate(out.documents):
            try:
                bodies.append(bson.encode(doc))
            except Exception as e:  # InvalidDocument, OverflowError, ...
                failed[j] = bson_error(e)
                bodies.append(b"")
    limit = MAX_DOCUMENT_BYTES - MARKER_RESERVE
    if bodies and max(map(len, bodies)) > limit:
        failed.update({j: too_large(len(b)) for j, b in enumerate(bodies) if len(b) > limit})
    if not failed:
        out.bodies = bodies
        return out
    keys = out.keys
    rejections = out.rejections + [
        Rejection(row=out.rows[j], key=_key_text(keys[j]), reason=why) for j, why in failed.items()
    ]
    keep = [j for j in range(len(out.rows)) if j not in failed]
    kept = Validated(
        rows=[out.rows[j] for j in keep],
        rejections=sorted(rejections, key=lambda r: r.row),
        columns={k: v.take(pa.array(keep, pa.int64())) for k, v in out.columns.items()},
        key=out.key,
        values={k: [v[j] for j in keep] for k, v in out.values.items()},
        types=out.types,
        bodies=[bodies[j] for j in keep],
    )
    return kept


def _row_key(
    single: pa.Array | None, columns: dict[str, pa.Array], key_columns: list[str], i: int
) -> str | None:
    """The key of a rejected row as text (composite: its fields as JSON-ish text)."""
    if single is not None:
        return _key_text(_show(single[i]))
    parts = {k: _show(columns[k][i]) for k in key_columns}
    if all(v is None for v in parts.values()):
        return None
    return "{" + ", ".join(f"{k}: {v!s}" for k, v in parts.items()) + "}"


def _show(scalar: pa.Scalar) -> Any:
    """A scalar's Python value, or for one Python cannot hold (e.g. a timestamp in the year
    100000) its integer with the unit."""
    try:
        return scalar.as_py()
    except (OverflowError, ValueError, pa.ArrowException):
        unit = getattr(scalar.type, "unit", "")
        return f"{scalar.cast(pa.int64()).as_py()} {unit} from 1970".strip()


def _key_text(value: Any) -> str | None:
    if value is None or value == "":
        return None
    return str(value)
