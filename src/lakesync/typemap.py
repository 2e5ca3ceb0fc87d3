"""The type mapping: Arrow values to the BSON values MongoDB stores (README "Types").

Columns of the common types are written by ``encode.py`` without Python objects; this
module handles every other type, value by value, and says why a value cannot be stored
(`Unstorable`): the record is then rejected, never the job. ``ServerLimits`` holds what the
server behind the target collection cannot store or find (nx-27017, measured), so such
records are refused before they are sent, with the limit named.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import bson
import pyarrow as pa
import pyarrow.compute as pc
from bson import SON, Decimal128, ObjectId
from bson.codec_options import CodecOptions, DatetimeConversion
from bson.datetime_ms import DatetimeMS
from bson.errors import InvalidDocument

INT64_MAX = 2**63 - 1
MS_PER_DAY = 86_400_000
#: milliseconds per unit, or units per millisecond (as a negative divisor)
_PER_MS = {"s": 1000, "ms": 1, "us": -1000, "ns": -1_000_000}
#: BSON dates Python's datetime can show (years 1..9999); others stay DatetimeMS
DATETIME_MIN_MS, DATETIME_MAX_MS = -62_135_596_800_000, 253_402_300_799_999

Convert = Callable[[Any], Any]


class Unstorable(ValueError):
    """A value that has no BSON form (or that the server cannot store); the message says why."""


@dataclass(frozen=True)
class ServerLimits:
    """What the MongoDB-wire server cannot store or find by ``_id`` (all of it on MongoDB)."""

    name: str = "MongoDB"
    decimal128: bool = True
    non_finite: bool = True  # NaN, Infinity
    date_range: tuple[int, int] | None = None  # milliseconds it can store
    #: key value types it cannot find documents by (a rerun could not compare them)
    unfindable_keys: tuple[type, ...] = ()
    #: composite ``_id``: find and replace documents by ``_lakesync.k``, an indexed digest of
    #: the ``_id``'s BSON, instead of by the subdocument (see ``uses_key_digest``)
    key_digest: bool = False
    #: key types the server keeps as their text, one key with the string of that text (the
    #: plan of repeated keys refuses the later of two such keys: repeats.py)
    text_keys: tuple[type, ...] = ()

    def refuse(self, what: str) -> Unstorable:
        """The rejection for a value this server cannot take."""
        return Unstorable(f"{what}, which the server ({self.name}) cannot store")


MONGODB = ServerLimits()
#: measured against nx-27017 (tests/test_types.py): Decimal128, NaN and +-Infinity are
#: refused ("Invalid JSON document"), dates outside years 1-9999 break the connection,
#: documents cannot be found by a boolean, binary or double _id; a subdocument _id is
#: compared in Python, a scan of the collection per query, and cannot be a replace's filter
#: an integer or ObjectId _id is one key with its text (inserting "1" after 1 fails as a
#: duplicate, a find for one returns the other)
NX_27017 = ServerLimits(
    name="nx-27017, the embedded server",
    decimal128=False,
    non_finite=False,
    date_range=(DATETIME_MIN_MS, DATETIME_MAX_MS),
    unfindable_keys=(bool, bytes, float),
    key_digest=True,
    text_keys=(int, ObjectId),
)


def server_limits(collection: Any) -> ServerLimits:
    """The limits of the server behind ``collection`` (pymongo): nx-27017's, or MongoDB's."""
    try:
        info = collection.database.client.admin.command("buildInfo")
    except Exception:  # the first write reports an unreachable server with its own retries
        return MONGODB
    return NX_27017 if str(info.get("process", "")).startswith("nx_27017") else MONGODB


#: how lakesync reads keys back: datetimes of any year, and documents as hashable keys
KEY_CODEC: CodecOptions[Any] = CodecOptions(
    tz_aware=True, datetime_conversion=DatetimeConversion.DATETIME_AUTO
)


class CompositeKey(SON[str, Any]):
    """A composite ``_id`` ({a: ..., b: ...} in the declared order) usable as a dict key."""

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(tuple((k, _hashable(v)) for k, v in self.items()))


class DecimalKey(Decimal128):
    """A Decimal128 ``_id`` usable as a dict key (Decimal128 itself is unhashable)."""

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(self.bid)


def _hashable(value: Any) -> Any:
    if isinstance(value, Decimal128) and not isinstance(value, DecimalKey):
        return DecimalKey(value.to_decimal())
    return value


def lookup_key(value: Any) -> Any:
    """An ``_id`` as read back from the server, in the form ``Validated.keys`` holds it."""
    if isinstance(value, dict):
        return CompositeKey((k, _hashable(v)) for k, v in value.items())
    return _hashable(value)


def stored_key(value: Any) -> Any:
    """A converted key value as the server answers it: in-range dates as datetimes."""
    if isinstance(value, DatetimeMS):
        ms = int(value)
        if DATETIME_MIN_MS <= ms <= DATETIME_MAX_MS:
            return value.as_datetime(KEY_CODEC)
        return value
    return _hashable(value)


#: the field of the marker (copy.MARKER) that holds a composite key's digest, where used
KEY_DIGEST_FIELD = "_lakesync.k"


def uses_key_digest(key: str | list[str], limits: ServerLimits) -> bool:
    """Whether documents of this key are found by their key digest on this server.

    The one place lakesync's data model bends to a server: on nx-27017 a query on a
    subdocument ``_id`` scans the collection in Python (a re-sync of N records would cost
    N/batch scans: quadratic) and a replace cannot name one, so each document with a
    composite key also carries ``_lakesync.k``, the digest of its ``_id``'s BSON, indexed,
    and is found by an equality on it (the one query nx-27017 answers from that index: an
    ``$in`` on a field other than ``_id`` scans the collection in SQL). The digest only
    narrows the search: a document found by it is matched to the record by its ``_id``
    (``lookup_key``), so a lookup stays exact. On MongoDB the ``_id`` index answers
    ``_id: {$in: [...]}`` directly and no digest is stored.
    """
    return limits.key_digest and not isinstance(key, str)


def key_digest(id_element: bytes) -> str:
    """The digest of a document's ``_id``: a hash of its BSON element, field order included."""
    return hashlib.blake2b(id_element, digest_size=12).hexdigest()


def id_digest(value: Any) -> str:
    """``key_digest`` of an ``_id`` value (as read back, or as validated)."""
    raw = bson.encode({"_id": value}, codec_options=KEY_CODEC)
    return key_digest(raw[4:-1])


def key_filter(keys: list[Any]) -> dict[str, Any]:
    """The query that finds the documents of these keys by ``_id`` (one indexed read)."""
    return {"_id": {"$in": keys}}


def digest_filter(digest: str) -> dict[str, Any]:
    """The filter of the document whose key has this digest (``uses_key_digest``)."""
    return {KEY_DIGEST_FIELD: digest}


# -- Arrow types ----------------------------------------------------------------------------


def describe(kind: pa.DataType) -> str:
    """An Arrow type as users read it in messages."""
    return str(kind)


def is_nested(kind: pa.DataType) -> bool:
    """Whether values of this type are lists, structs or maps (not usable as keys)."""
    kind = value_type(kind)
    return bool(
        pa.types.is_list(kind)
        or pa.types.is_large_list(kind)
        or pa.types.is_fixed_size_list(kind)
        or pa.types.is_list_view(kind)
        or pa.types.is_large_list_view(kind)
        or pa.types.is_struct(kind)
        or pa.types.is_map(kind)
        or pa.types.is_union(kind)
    )


def value_type(kind: pa.DataType) -> pa.DataType:
    """The type a column's values have: dictionary and run-end encodings removed."""
    if pa.types.is_dictionary(kind):
        return value_type(kind.value_type)
    if pa.types.is_run_end_encoded(kind):
        return value_type(kind.value_type)
    if isinstance(kind, pa.ExtensionType):
        return value_type(kind.storage_type)
    return kind


def decoded(array: pa.Array) -> pa.Array:
    """The array with dictionary and run-end encodings (and extension types) removed."""
    kind = array.type
    if pa.types.is_dictionary(kind):
        return decoded(array.dictionary_decode())
    if pa.types.is_run_end_encoded(kind):
        return decoded(pc.run_end_decode(array))
    if isinstance(array, pa.ExtensionArray):
        return decoded(array.storage)
    return array


def _physical(kind: pa.DataType) -> pa.DataType:
    """The type whose Python values ``converter`` takes: times as their integers."""
    kind = value_type(kind)
    if pa.types.is_date32(kind) or pa.types.is_time32(kind):
        return pa.int32()
    if (
        pa.types.is_timestamp(kind)
        or pa.types.is_date(kind)
        or pa.types.is_time(kind)
        or pa.types.is_duration(kind)
    ):
        return pa.int64()
    if pa.types.is_float16(kind) or pa.types.is_float32(kind):
        return pa.float64()
    if pa.types.is_list(kind) or pa.types.is_large_list(kind):
        return pa.list_(_physical(kind.value_type))
    if pa.types.is_fixed_size_list(kind):
        return pa.list_(_physical(kind.value_type))
    if pa.types.is_struct(kind):
        return pa.struct([f.with_type(_physical(f.type)) for f in kind])
    if pa.types.is_map(kind):
        return pa.map_(_physical(kind.key_type), _physical(kind.item_type))
    return kind


def python_values(array: pa.Array, limits: ServerLimits) -> tuple[list[Any], dict[int, str]]:
    """BSON-ready values of a column, and a reason for each row whose value cannot be stored."""
    array = decoded(array)
    convert = converter(array.type, limits)
    target = _physical(array.type)
    raw = array.cast(target) if target != array.type else array
    values: list[Any] = []
    bad: dict[int, str] = {}
    for i, value in enumerate(raw.to_pylist()):
        try:
            values.append(None if value is None else convert(value))
        except Unstorable as e:
            values.append(None)
            bad[i] = str(e)
    return values, bad


def converter(kind: pa.DataType, limits: ServerLimits) -> Convert:
    """A function from a (physical, non-null) Python value of ``kind`` to its BSON value."""
    return _rule(kind, limits)[1]


def bson_type_name(kind: pa.DataType) -> str:
    """The BSON type values of this Arrow type are written as (README, "Types"), named as
    `lakesync inspect` shows it: from the converter's own rule, so the two cannot differ."""
    return _rule(kind, MONGODB)[0]


def _rule(kind: pa.DataType, limits: ServerLimits) -> tuple[str, Convert]:
    """The BSON type name and the converter of an Arrow type: one rule per type."""
    kind = value_type(kind)
    t = pa.types
    if t.is_null(kind):
        return "null", lambda v: None
    if t.is_boolean(kind):
        return "bool", bool
    if t.is_uint64(kind):
        return (
            "int or long (decimal above 2^63-1)",
            lambda v: v if v <= INT64_MAX else _decimal(Decimal(v), limits, "uint64"),
        )
    if t.is_integer(kind):  # a Python int is written as int (32-bit) when it fits, else long
        wide = kind.bit_width == 64 or t.is_uint32(kind)
        return ("int or long" if wide else "int"), int
    if t.is_floating(kind):
        return "double", lambda v: _double(float(v), limits)
    if t.is_decimal(kind):
        return "decimal", lambda v: _decimal(v, limits, "decimal")
    if t.is_union(kind) and all(_is_number(f.type) for f in kind):
        return "int or long, double or decimal, as each value is written", _number(limits)
    if t.is_string(kind) or t.is_large_string(kind) or t.is_string_view(kind):
        return "string", str
    if (
        t.is_binary(kind)
        or t.is_large_binary(kind)
        or t.is_fixed_size_binary(kind)
        or t.is_binary_view(kind)
    ):
        return "binData", bytes
    if t.is_timestamp(kind):
        return "date", lambda v: _date(_to_ms(v, kind.unit), limits)
    if t.is_date32(kind):
        return "date", lambda v: _date(v * MS_PER_DAY, limits)
    if t.is_date64(kind):
        return "date", lambda v: _date(v, limits)
    if t.is_time(kind):
        return "string", lambda v: time_text(v, kind.unit)
    if t.is_duration(kind):
        return "int or long", int
    if t.is_interval(kind):
        return "object", lambda v: {
            "months": v.months,
            "days": v.days,
            "nanoseconds": v.nanoseconds,
        }
    if t.is_list(kind) or t.is_large_list(kind) or t.is_fixed_size_list(kind):
        name, inner = _rule(kind.value_type, limits)
        item = _nullable(inner)
        return f"array of {name}", lambda v: [item(x) for x in v]
    if t.is_struct(kind):
        fields = [(f.name, _nullable(converter(f.type, limits))) for f in kind]
        return "object", lambda v: {name: conv(v[name]) for name, conv in fields}
    if t.is_map(kind):
        key = value_type(kind.key_type)
        string_keys = t.is_string(key) or t.is_large_string(key)
        return ("object" if string_keys else "array of {k, v}"), _map(kind, limits)
    name = describe(kind)
    reason = f"a value of Arrow type {name}, which has no BSON type"
    return f"none (Arrow {name}: records with a value are rejected)", lambda v: _raise(reason)


def _is_number(kind: pa.DataType) -> bool:
    t = pa.types
    return bool(t.is_integer(kind) or t.is_floating(kind) or t.is_decimal(kind))


def _number(limits: ServerLimits) -> Convert:
    """The converter of a union of number types (a JSON column mixing integers and
    fractions, see ``sources.jsonnumbers``): each value as its own type."""

    def convert(value: Any) -> Any:
        if isinstance(value, Decimal):
            return _decimal(value, limits, "decimal")
        if isinstance(value, float):
            return _double(value, limits)
        if value > INT64_MAX:  # a uint64 member
            return _decimal(Decimal(value), limits, "uint64")
        return int(value)

    return convert


def _nullable(convert: Convert) -> Convert:
    return lambda v: None if v is None else convert(v)


def _raise(reason: str) -> Any:
    raise Unstorable(reason)


def _map(kind: pa.MapType, limits: ServerLimits) -> Convert:
    key, item = value_type(kind.key_type), _nullable(converter(kind.item_type, limits))
    if pa.types.is_string(key) or pa.types.is_large_string(key):

        def subdocument(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
            out = {}
            for k, v in pairs:
                check_field_name(k, "map key")
                out[k] = item(v)
            return out

        return subdocument
    convert_key = converter(key, limits)
    return lambda pairs: [{"k": convert_key(k), "v": item(v)} for k, v in pairs]


def check_field_name(name: str, what: str) -> None:
    """Raise Unstorable for a nested field name MongoDB cannot store (one holding NUL)."""
    problem = field_name_problem(name)
    if problem:
        raise Unstorable(f"{what} {name!r:.80} {problem}")


# -- MongoDB's document rules, enforced by lakesync on every server (README "Limits") --------

#: MongoDB's largest document (BSON bytes), for the document as written: record and marker
MAX_DOCUMENT_BYTES = 16 * 1024 * 1024
#: room kept for the ``_lakesync`` marker copy.py appends (tests/test_limits.py measures it)
MARKER_RESERVE = 256
#: MongoDB's documented nesting limit: the document is level 1, each non-empty
#: subdocument or array inside it one more (the server itself refuses beyond 180 levels)
MAX_NESTING = 100


def field_name_problem(name: str, *, top: bool = False, in_id: bool = False) -> str | None:
    """Why MongoDB cannot store a field of this name here, or None.

    Everywhere: no NUL (BSON ends names with it). At the top level: no ``$`` prefix (a
    replacement, which is how lakesync writes a changed record, refuses one; an insert
    would take it, so the first copy and the next would differ). In a composite ``_id``:
    neither a ``$`` prefix nor a ``.`` (MongoDB refuses them as subfields of ``_id``).
    Empty names and, elsewhere, ``.`` and ``$`` are stored by MongoDB 5.0 and later.
    """
    if "\x00" in name:
        return "holds a NUL character, which no MongoDB field name can"
    if in_id and (name.startswith("$") or "." in name):
        return "cannot name a field of a composite _id (MongoDB refuses '$' and '.' there)"
    if top and name.startswith("$"):
        return (
            "starts with '$', which MongoDB refuses at the top level of a replaced document "
            "(lakesync replaces changed records); rename the column"
        )
    return None


def type_depth(kind: pa.DataType) -> int:
    """The most levels of nesting a value of this Arrow type can add (0: a scalar)."""
    kind = value_type(kind)
    if pa.types.is_struct(kind):
        return 1 + max((type_depth(f.type) for f in kind), default=0)
    if pa.types.is_map(kind):
        inner = type_depth(kind.item_type)
        if pa.types.is_string(value_type(kind.key_type)) or pa.types.is_large_string(
            value_type(kind.key_type)
        ):
            return 1 + inner  # a subdocument
        return 2 + max(inner, type_depth(kind.key_type))  # a list of {k, v}
    item = getattr(kind, "value_type", None)  # lists of any kind
    if is_nested(kind) and item is not None:
        return 1 + type_depth(item)
    return 0


def value_depth(value: Any) -> int:
    """Levels of nesting a BSON-ready value adds, as MongoDB counts them (empty ones: none)."""
    if isinstance(value, dict) and value:
        return 1 + max(value_depth(v) for v in value.values())
    if isinstance(value, list) and value:
        return 1 + max(value_depth(v) for v in value)
    return 0


def too_deep(depth: int) -> str:
    """The rejection reason for a document nested ``depth`` levels."""
    return f"the document is nested {depth} levels deep; MongoDB stores at most {MAX_NESTING}"


def too_large(size: int) -> str:
    """The rejection reason for a record whose BSON (``_id`` included) is ``size`` bytes."""
    return (
        f"the document is {size:,} bytes of BSON (with its _id), more than MongoDB's 16 MiB "
        f"({MAX_DOCUMENT_BYTES:,} bytes) once lakesync's marker is added"
    )


def _double(value: float, limits: ServerLimits) -> float:
    if not limits.non_finite and not math.isfinite(value):
        raise limits.refuse(f"{value} is not a finite number")
    return value


def _decimal(value: Decimal, limits: ServerLimits, what: str) -> Decimal128:
    if not limits.decimal128:
        raise limits.refuse(f"{what} {value} needs Decimal128")
    try:
        return Decimal128(value)
    except Exception as e:  # more than 34 digits, or an exponent out of range
        raise Unstorable(
            f"{what} {value} does not fit Decimal128 (34 significant digits): {e}"
        ) from None


def _to_ms(value: int, unit: str) -> int:
    """Milliseconds of a timestamp, truncated towards the past (as BSON dates are)."""
    per = _PER_MS[unit]
    return value * per if per > 0 else value // -per


def _date(ms: int, limits: ServerLimits) -> DatetimeMS:
    if not -(2**63) <= ms <= INT64_MAX:
        raise Unstorable(f"{ms} ms from 1970 is beyond the range of a BSON date")
    if limits.date_range is not None and not limits.date_range[0] <= ms <= limits.date_range[1]:
        raise limits.refuse(f"the date {ms} ms from 1970 is outside the years 1-9999")
    return DatetimeMS(ms)


_TIME_UNITS = {"s": 1, "ms": 1000, "us": 1_000_000, "ns": 1_000_000_000}


def time_text(value: int, unit: str) -> str:
    """A time of day as ``HH:MM:SS[.ffffff]`` (digits below microseconds are dropped)."""
    per = _TIME_UNITS[unit]
    seconds, fraction = divmod(value, per)
    hours, rest = divmod(seconds, 3600)
    text = f"{hours:02d}:{rest // 60:02d}:{rest % 60:02d}"
    micros = fraction * 1_000_000 // per
    return f"{text}.{micros:06d}" if micros else text


def bson_error(error: Exception) -> str:
    """Why bson.encode refused a document, for a rejection."""
    if isinstance(error, InvalidDocument):
        return f"the record cannot be encoded as BSON: {error}"
    return f"the record cannot be encoded as BSON: {type(error).__name__}: {error}"
