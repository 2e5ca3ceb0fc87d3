"""Integers of JSON files kept as written where Arrow's reader would make them doubles.

Arrow's JSON reader gives a column one type per file: a column holding an integer beyond
int64 (``2**63``), or integers beside numbers with a fraction (``5``, ``2.5``), is read as
doubles, which changes ``5`` into ``5.0``, ``9007199254740993`` into ``9007199254740992.0``
and ``12345678901234567890123`` into ``1.2345678901234568e+22``. Keys are read as written
by ``jsonruns``; these are the other columns.

``written_integers`` tells whether a file needs that: whether some top-level column Arrow
typed as a double is written with an integer literal in some record (one regular expression
per such column over the file's text, at C speed: under 1 ms of CPU a MB a column). A file
whose double columns hold numbers with a fraction or an exponent only (``2.0``, ``2.75``),
or are declared ``float``, is read by Arrow's scan alone.

``exact_column`` builds such a column of a run of records from their values as Python's
``json`` parsed them: integers within int64 as int64, beyond as decimals (BSON Decimal128,
as the README's types table has uint64 beyond int64), numbers with a fraction as doubles; a
column mixing them is a dense union of the three, each record keeping the type it is written
with (``typemap`` writes each value as its own type). An integer of more digits than a
decimal holds (76) refuses its record, with the reason.

Integers inside objects and arrays are not covered: Arrow's types stay there.
"""

from __future__ import annotations

import json
import re
from decimal import Decimal
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs

_INT64 = (-(1 << 63), (1 << 63) - 1)
#: the most digits an integer may have: a decimal256's precision
MAX_DIGITS = 76
#: a column mixing integers and numbers with a fraction: the same type in every run
MIXED = pa.dense_union(
    [
        pa.field("int", pa.int64()),
        pa.field("double", pa.float64()),
        pa.field("decimal", pa.decimal256(MAX_DIGITS, 0)),
    ]
)
_READ = 16 << 20
_SPACE = rb"[ \t\r\n]*"
#: a text file's codec by the extension its fragment's path ends with (``text._CodecAliases``
#: names a ``.zst`` file ``.zst.zstd``, which pyarrow's own detection does not know)
_CODECS = {".gz": "gzip", ".bz2": "bz2", ".zstd": "zstd", ".zst": "zstd"}


def open_text(fs: pafs.FileSystem, path: str) -> Any:
    """The file at a JSON fragment's ``path`` as a stream, decompressed as it is read."""
    codec = next((c for suffix, c in _CODECS.items() if path.endswith(suffix)), None)
    return fs.open_input_stream(path, compression=codec)


def _pattern(names: list[str]) -> list[re.Pattern[bytes]]:
    """For each column, the expression of its name followed by an integer value (the name
    as writers spell it: JSON's escapes, with or without non-ASCII characters escaped)."""
    out = []
    for name in names:
        spelled = {json.dumps(name, ensure_ascii=a)[1:-1].encode() for a in (False, True)}
        either = b"|".join(re.escape(s) for s in sorted(spelled))
        out.append(
            re.compile(
                b'"(?:' + either + b')"' + _SPACE + b":" + _SPACE + rb"-?[0-9]+" + _SPACE + b"[,}]"
            )
        )
    return out


def written_integers(
    fs: pafs.FileSystem, path: str, schema: pa.Schema, keys: frozenset[str]
) -> bool:
    """Whether a top-level column of the NDJSON file ``path`` that Arrow typed as a double
    (``schema``; not a key: see ``jsonruns``) is written with an integer in some record."""
    names = [f.name for f in schema if pa.types.is_floating(f.type) and f.name not in keys]
    if not names:
        return False
    patterns = _pattern(names)
    rest = b""
    with open_text(fs, path) as stream:
        while True:
            chunk = stream.read(_READ)
            text = rest + chunk if rest else chunk
            # records end with their lines: a match never spans two reads
            end = text.rfind(b"\n") + 1 if chunk else len(text)
            if any(p.search(text, 0, end) for p in patterns):
                return True
            if not chunk:
                return False
            rest = text[end:]


def _kind(value: Any) -> int:
    """The child of ``MIXED`` a value goes to (a null: the first)."""
    if type(value) is float:
        return 1
    if type(value) is int and not _INT64[0] <= value <= _INT64[1]:
        return 2
    return 0


def too_long(name: str, value: Any) -> str | None:
    """Why an integer cannot be read (None: it can)."""
    if isinstance(value, int) and not isinstance(value, bool):
        digits = len(str(abs(value)))
        if digits > MAX_DIGITS:
            return (
                f"{name}: the integer has {digits} digits; lakesync stores at most 34 "
                "significant ones (Decimal128)"
            )
    return None


def decimals(values: list[Any]) -> pa.Array:
    """Integers (beyond int64) as a decimal column: decimal128 up to 38 digits."""
    exact = [None if v is None else Decimal(v) for v in values]
    widest = max((len(str(abs(v))) for v in values if v is not None), default=1)
    kind = pa.decimal128(38, 0) if widest <= 38 else pa.decimal256(MAX_DIGITS, 0)
    return pa.array(exact, kind)


def exact_column(name: str, values: list[Any]) -> tuple[pa.Array | None, dict[int, str]]:
    """The column ``name`` of a run of records (``values`` as Python's ``json`` read them;
    a column Arrow typed as a double: numbers and nulls), with the rows it refuses (None:
    Arrow's doubles are what is written, no integer among them)."""
    types = set(map(type, values))
    if int not in types:  # (a whole pass at C speed: the common case)
        return None, {}
    ints = [v for v in values if type(v) is int]
    refused: dict[int, str] = {}
    small = _INT64[0] <= min(ints) and max(ints) <= _INT64[1]
    if not small:
        for i, value in enumerate(values):
            why = too_long(name, value)
            if why is not None:
                refused[i] = why
                values[i] = None
        ints = [v for v in values if type(v) is int]
        small = not ints or (_INT64[0] <= min(ints) and max(ints) <= _INT64[1])
    fractions = float in types
    if small and not fractions:
        return pa.array(values, pa.int64()), refused
    if not fractions and ints and all(not _INT64[0] <= v <= _INT64[1] for v in ints):
        return decimals(values), refused
    codes = list(map(_kind, values))
    children: list[list[Any]] = [[], [], []]
    offsets = []
    for code, value in zip(codes, values, strict=True):
        child = children[code]
        offsets.append(len(child))
        child.append(Decimal(value) if code == 2 else value)
    arrays = [pa.array(child, f.type) for child, f in zip(children, MIXED, strict=True)]
    mixed = pa.UnionArray.from_dense(
        pa.array(codes, pa.int8()),
        pa.array(offsets, pa.int32()),
        arrays,
        [f.name for f in MIXED],
    )
    return mixed, refused
