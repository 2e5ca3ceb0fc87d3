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
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cached_property
from typing import Any, Literal

import bson
import pyarrow as pa
import pyarrow.compute as pc
from bson.datetime_ms import DatetimeMS
from pydantic import BaseModel, Field

from lakesync.encode import encode_rows
from lakesync.errors import SourceError

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
    """The fields of a record, its key field, and whether unknown columns are kept."""

    key: str
    fields: list[FieldRule] = Field(default_factory=list)
    keepExtra: bool = False

    def required_columns(self) -> list[str]:
        """Columns that must exist in the lake."""
        return [f.name for f in self.fields if f.required] or [self.key]


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
    key: str = ""

    @cached_property
    def keys(self) -> list[Any]:
        """The ``_id`` of each document."""
        return _to_python(self.columns[self.key]) if self.columns else []

    @cached_property
    def documents(self) -> list[dict[str, Any]]:
        """``{"_id": key, field: value, ...}`` for each valid row, BSON-ready values."""
        if not self.columns:
            return []
        names = ("_id", *self.columns)
        values = [_to_python(col) for col in self.columns.values()]
        return [dict(zip(names, row, strict=True)) for row in zip(self.keys, *values, strict=True)]

    def encoded(self) -> list[bytes]:
        """The BSON of each document: ``bson.encode(documents[i])``, byte for byte."""
        if not self.columns:
            return []
        out = None
        if "_id" not in self.columns:
            fields = [("_id", self.columns[self.key]), *self.columns.items()]
            out = encode_rows(fields, len(self.rows))
        if out is None:  # a column type encode.py does not write: one document at a time
            return [bson.encode(doc) for doc in self.documents]
        data, offsets = out
        bounds = offsets.tolist()
        return [data[a:b] for a, b in itertools.pairwise(bounds)]


def check_columns(schema: RecordSchema, columns: list[str], where: str) -> None:
    """Fail the whole job up front when the lake lacks a required column."""
    missing = [c for c in schema.required_columns() if c not in columns]
    if missing:
        raise SourceError(
            f"The lake at {where} lacks required column(s) {', '.join(missing)} "
            f"(it has: {', '.join(columns) or 'none'}). Point the source at TaskDetail "
            "records, or declare the operation's schema in lakesync.toml."
        )
    declared = {f.name for f in schema.fields}
    kept = schema.keepExtra or not schema.fields or "_id" in declared
    if "_id" in columns and schema.key != "_id" and kept:  # it would replace the key as _id
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
            value = json.loads(value) if value.startswith("[") else [
                v.strip() for v in value.split(";") if v.strip()
            ]  # fmt: skip
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ValueError
        return value
    return value


_TYPE_WORDS = {
    "float": "a number", "int": "an integer", "bool": "true or false", "string": "a string",
    "timestamp": "a timestamp", "list[string]": "a list of strings",
}  # fmt: skip


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
        safe = not (pa.types.is_timestamp(column.type) and pa.types.is_timestamp(target))
        return column.cast(target, safe=safe), {}
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
        pass
    values, bad = [], {}
    for i, value in enumerate(column.to_pylist()):
        try:
            values.append(_py_convert(value, rule.type))
        except (ValueError, TypeError, OverflowError):
            values.append(None)
            bad[i] = f"{rule.name} must be {_TYPE_WORDS[rule.type]}, got {value!r:.60}"
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


def _prepare(col: pa.Array) -> pa.Array:
    """A column as it is stored: timestamps and dates in UTC milliseconds, decimals as floats."""
    if pa.types.is_timestamp(col.type):
        return col.cast(pa.timestamp("ms", tz=col.type.tz))
    if pa.types.is_date(col.type):
        return col.cast(pa.timestamp("ms", tz="UTC"))
    if pa.types.is_decimal(col.type):
        return col.cast(pa.float64())
    return col


def _to_python(col: pa.Array) -> list[Any]:
    """A prepared column as BSON-ready Python values, timestamps as cheap DatetimeMS."""
    if pa.types.is_timestamp(col.type):
        millis = col.cast(pa.int64()).to_pylist()
        if col.null_count == 0:
            return list(map(DatetimeMS, millis))
        return [None if m is None else DatetimeMS(m) for m in millis]
    if pa.types.is_floating(col.type) and pc.any(pc.is_nan(col)).as_py():
        return [None if v is None or math.isnan(v) else v for v in col.to_pylist()]
    return list(col.to_pylist())


def validate(schema: RecordSchema, table: pa.Table) -> Validated:
    """Validate a batch: documents (`_id` = key) for good rows, a Rejection for each bad one."""
    n = table.num_rows
    reasons: dict[int, str] = {}
    columns: dict[str, pa.Array] = {}
    rules = schema.fields or [FieldRule(name=schema.key, type="any")]
    names = {r.name for r in rules}
    for rule in rules:
        if rule.name in table.column_names:
            col, bad = _coerce(table.column(rule.name), rule)
        elif rule.required or rule.name == schema.key:
            col, bad = pa.nulls(n), {}
        else:
            continue
        for i, why in bad.items():
            reasons.setdefault(i, why)
        for mask, why in _rule_masks(col, rule, rule.name == schema.key):
            mask = pc.fill_null(mask, False)
            if pc.any(mask).as_py():
                for i in pc.indices_nonzero(mask).to_pylist():
                    if i not in reasons:
                        reasons[i] = why.format(v=repr(col[i].as_py()))
        columns[rule.name] = col
    if schema.keepExtra or not schema.fields:
        for name in table.column_names:
            if name not in names:
                columns[name] = table.column(name).combine_chunks()
    keys = columns[schema.key]
    rejections = [
        Rejection(row=i, key=_key_text(keys[i].as_py()), reason=reasons[i]) for i in sorted(reasons)
    ]
    if reasons:
        keep = pa.array([i not in reasons for i in range(n)])
        columns = {k: pc.filter(v, keep) for k, v in columns.items()}
        rows = [i for i in range(n) if i not in reasons]
    else:
        rows = list(range(n))
    prepared = {k: _prepare(v) for k, v in columns.items()}
    return Validated(rows=rows, rejections=rejections, columns=prepared, key=schema.key)


def _key_text(value: Any) -> str | None:
    if value is None or value == "":
        return None
    return str(value)
