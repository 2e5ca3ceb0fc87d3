"""NDJSON read as written where Arrow's JSON reader cannot type a column.

Arrow's reader gives each column one type per file: a key column mixing numbers and
strings (``1``, ``"a"``, as pandas writes an object column) fails the whole file
(``changed from number to string in row N``), and integers beyond int64 (``2**64``) or next
to a decimal number (``1``, ``2.5``) silently become doubles: wrong keys.

A JSON file Arrow fails on (``is_type_error``), whose key column Arrow types as a double
(which may hold integers it promoted), or whose other columns typed as doubles are written
with integers (``jsonnumbers.written_integers``), is read here instead, a block of lines at a time:
each line is parsed once with Python's ``json`` to tell the kind of its key (string,
integer, integer beyond int64, number with a fraction, boolean), and each run of
consecutive lines whose keys have one kind is handed to Arrow's reader on its own, its key
column then replaced by the exact values (an integer beyond int64 as a decimal: BSON
Decimal128, as the README's types table has uint64 beyond int64). A run Arrow still cannot
read (another column changes type) is split where Arrow says, so every column of every
record keeps the type it is written with. Runs of different types are batches of their
own (``stream.across_files`` never mixes schemas in one batch). The other columns a run's
read types as doubles get their integers back from the parsed lines
(``jsonnumbers.exact_column``: a column mixing integers and fractions is a union, never
split into runs).

A record that cannot be read this way is refused with its reason and read as ``{}`` (so
rows keep their places): a key that is an object or an array (it cannot be an ``_id``), an
integer key of more digits than a decimal holds, a line that is not a JSON object, or a
line Arrow cannot read alone (an array mixing types).
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.json as pajson

from lakesync.sources.jsonnumbers import MAX_DIGITS, decimals, exact_column, open_text

#: lines parsed at a time (and at most about this many bytes of them)
_BLOCK_ROWS = 8192
_BLOCK_BYTES = 4 << 20
_READ = 1 << 20
_WHITESPACE = b" \t\r\n"
_ROW = re.compile(r"in row (\d+)")
_INT64 = (-(1 << 63), (1 << 63) - 1)


def is_type_error(error: BaseException) -> bool:
    """Whether Arrow's JSON reader failed on a value of another type than its column's."""
    text = str(error)
    return isinstance(error, pa.ArrowInvalid) and (
        "changed from" in text or "Failed to convert JSON to" in text
    )


def needs_exact(schema: pa.Schema, keys: frozenset[str]) -> bool:
    """Whether a file of this (inferred) schema is read here from the start: a key column
    Arrow typed as a double may hold integers it promoted (beyond int64, or beside 2.5)."""
    return any(f.name in keys and pa.types.is_floating(f.type) for f in schema)


def _kind(value: Any) -> str | None:
    """The kind of a key value, for runs (None: missing or null, fits any run)."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int" if _INT64[0] <= value <= _INT64[1] else "big"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "str"
    return "nested"


def _refusal(name: str, value: Any) -> str | None:
    """Why a key value cannot be a key (None: it can)."""
    if isinstance(value, dict | list):
        what = "an object" if isinstance(value, dict) else "an array"
        return (
            f"{name}: the key is {what} ({json.dumps(value)[:40]}), which cannot be a "
            "record's _id; write a string or a number"
        )
    if isinstance(value, int) and not isinstance(value, bool):
        digits = len(str(abs(value)))
        if digits > MAX_DIGITS:
            return (
                f"{name}: the integer key has {digits} digits; a key holds at most 34 (Decimal128)"
            )
    return None


def _key_array(values: list[Any], kind: str | None) -> pa.Array | None:
    """The exact key column of a run (None: keep what Arrow read, all nulls)."""
    if kind == "str":
        return pa.array(values, pa.string())
    if kind == "int":
        return pa.array(values, pa.int64())
    if kind == "float":
        return pa.array(values, pa.float64())
    if kind == "bool":
        return pa.array(values, pa.bool_())
    if kind == "big":
        return decimals(values)
    return None


def _lines(stream: Any) -> Iterator[bytes]:
    """The non-blank lines of a stream (as Arrow counts rows: blank lines are none)."""
    rest = b""
    while chunk := stream.read(_READ):
        pieces = (rest + chunk).split(b"\n")
        rest = pieces.pop()
        for piece in pieces:
            if piece.strip(_WHITESPACE):
                yield piece
    if rest.strip(_WHITESPACE):
        yield rest


def _blocks(stream: Any) -> Iterator[list[bytes]]:
    block: list[bytes] = []
    size = 0
    for line in _lines(stream):
        block.append(line)
        size += len(line)
        if len(block) >= _BLOCK_ROWS or size >= _BLOCK_BYTES:
            yield block
            block, size = [], 0
    if block:
        yield block


class _Reader:
    """One file's rows, as described above; ``refused`` gets the rows it could not read
    (by their place in the stream of rows), with the reason."""

    def __init__(
        self,
        keys: list[str],
        text: frozenset[str],
        schema: pa.Schema | None = None,
        numbers: bool = True,
    ) -> None:
        self.keys = keys
        #: whether the other columns typed as doubles get their integers back (not for a
        #: file's schema: that is Arrow's, as for the files Arrow reads alone, so that the
        #: lake's files unify)
        self.numbers = numbers
        # read as strings: the declared text columns the scan reads as strings (a date
        # written as a string stays that string, see ``text.as_written``)
        self.text = frozenset(
            name
            for name in text
            if schema is None
            or (name in schema.names and pa.types.is_string(schema.field(name).type))
        )
        self.refused: dict[int, str] = {}
        self.row = 0  # rows given so far

    def tables(self, stream: Any) -> Iterator[pa.Table]:
        for block in _blocks(stream):
            values: list[list[Any]] = []
            kinds: list[tuple[str | None, ...]] = []
            records: list[dict[str, Any]] = []
            for i, line in enumerate(block):
                why, found, record = self._parse(line)
                if why is not None:
                    self.refused[self.row + i] = why
                    block[i] = b"{}"
                    found, record = [None] * len(self.keys), {}
                values.append(found)
                records.append(record)
                kinds.append(tuple(_kind(v) for v in found))
            start = 0
            while start < len(block):
                end, kind = start + 1, kinds[start]
                while end < len(block) and _fits(kinds[end], kind):
                    kind = _merged(kind, kinds[end])
                    end += 1
                yield from self._run(
                    block[start:end], values[start:end], records[start:end], kind, self.row + start
                )
                start = end
            self.row += len(block)

    def _parse(self, line: bytes) -> tuple[str | None, list[Any], dict[str, Any]]:
        try:
            record = json.loads(line)
        except (ValueError, RecursionError) as e:
            return f"the line is not valid JSON ({str(e)[:80]})", [], {}
        if not isinstance(record, dict):
            return f"the line is {json.dumps(record)[:40]}, not a JSON object", [], {}
        found = [record.get(k) for k in self.keys]
        for name, value in zip(self.keys, found, strict=True):
            why = _refusal(name, value)
            if why is not None:
                return why, [], {}
        return None, found, record

    def _run(
        self,
        lines: list[bytes],
        values: list[list[Any]],
        records: list[dict[str, Any]],
        kind: tuple[str | None, ...],
        first: int,
        explicit: frozenset[str] | None = None,
    ) -> Iterator[pa.Table]:
        """The run's rows, read by Arrow (split where it cannot), keys and the integers of
        the columns Arrow typed as doubles made exact (``jsonnumbers``)."""
        explicit = self.text - set(self.keys) if explicit is None else explicit
        data = b"\n".join(lines)
        schema = pa.schema([(name, pa.string()) for name in sorted(explicit)])
        try:
            table = pajson.read_json(
                io.BytesIO(data),
                read_options=pajson.ReadOptions(
                    use_threads=False, block_size=max(len(data) + 1, 1 << 20)
                ),
                parse_options=pajson.ParseOptions(explicit_schema=schema),
            )
        except pa.ArrowInvalid as e:
            found = _ROW.search(str(e))
            at = int(found.group(1)) if found else len(lines) // 2
            if 0 < at < len(lines):  # read up to where Arrow stopped, then the rest
                yield from self._run(lines[:at], values[:at], records[:at], kind, first, explicit)
                yield from self._run(lines[at:], values[at:], records[at:], kind, first + at)
                return
            column = re.search(r"Column\(/([^/)]*)", str(e))
            if column and column.group(1) in explicit:  # a declared string written otherwise
                fewer = explicit - {column.group(1)}
                yield from self._run(lines, values, records, kind, first, fewer)
                return
            if len(lines) > 1:
                half = len(lines) // 2
                yield from self._run(
                    lines[:half], values[:half], records[:half], kind, first, explicit
                )
                yield from self._run(
                    lines[half:], values[half:], records[half:], kind, first + half
                )
                return
            self.refused[first] = f"Arrow's JSON reader cannot read the record: {str(e)[:200]}"
            yield pa.table({"\0empty": [None]}).drop_columns(["\0empty"])
            return
        for i, name in enumerate(self.keys):
            exact = _key_array([v[i] if v else None for v in values], kind[i])
            if exact is None:
                continue
            if name in table.column_names:
                table = table.set_column(table.column_names.index(name), name, exact)
            else:
                table = table.append_column(name, exact)
        for i, f in enumerate(table.schema):
            if not self.numbers or not pa.types.is_floating(f.type) or f.name in self.keys:
                continue
            column, refused = exact_column(f.name, [r.get(f.name) for r in records])
            for row, why in refused.items():
                self.refused.setdefault(first + row, why)
            if column is not None:
                table = table.set_column(i, f.name, column)
        yield table


def _fits(kind: tuple[str | None, ...], run: tuple[str | None, ...]) -> bool:
    return all(a is None or b is None or a == b for a, b in zip(kind, run, strict=True))


def _merged(a: tuple[str | None, ...], b: tuple[str | None, ...]) -> tuple[str | None, ...]:
    return tuple(x if x is not None else y for x, y in zip(a, b, strict=True))


def batches(
    fs: pafs.FileSystem,
    path: str,
    keys: list[str],
    text: frozenset[str],
    schema: pa.Schema,
    columns: list[str] | None,
    filter: pc.Expression | None,
    refused: dict[int, str],
    skip: int = 0,
) -> Iterator[pa.RecordBatch]:
    """The rows of the NDJSON file ``path`` read as written, ``filter`` applied and
    ``columns`` kept as a scan of its fragment with ``schema`` would (a column the rows
    lack is null), from the ``skip``-th row of that stream on; ``refused`` gets the rows
    refused, by their place in the whole stream (counted from its first row, not from
    ``skip``: the caller's stream gave the rows before ``skip`` already)."""
    reader = _Reader(keys, text, schema)
    row = given = 0  # file rows read; rows of the filtered stream met (skipped ones too)
    with open_text(fs, path) as stream:
        for table in reader.tables(stream):
            n = table.num_rows
            mine = {r - row: why for r, why in reader.refused.items() if row <= r < row + n}
            for r in list(reader.refused):
                if r < row + n:
                    del reader.refused[r]
            row += n
            table = _shaped(table, schema, columns, filter, mine)
            kept = table.column("\0row").to_pylist()
            table = table.drop_columns(["\0row"])
            for place, r in enumerate(kept):
                if r in mine and given + place >= skip:  # (rows before: given already)
                    refused[given + place] = mine[r]
            if given + len(kept) > skip:
                start = max(skip - given, 0)
                yield from table.slice(start).to_batches()
            given += len(kept)


def schema_of(fs: pafs.FileSystem, path: str, keys: list[str], text: frozenset[str]) -> pa.Schema:
    """The schema of a file Arrow cannot type (its first block, read as written): each
    column with the type its first run gives it."""
    reader = _Reader(keys, text, numbers=False)
    fields: dict[str, pa.Field] = {}
    with open_text(fs, path) as stream:
        for table in reader.tables(stream):
            for f in table.schema:
                if f.name not in fields or pa.types.is_null(fields[f.name].type):
                    fields[f.name] = f
            if reader.row:  # the first block is read
                break
    return pa.schema(list(fields.values()))


def _shaped(
    table: pa.Table,
    schema: pa.Schema,
    columns: list[str] | None,
    filter: pc.Expression | None,
    mine: dict[int, str],
) -> pa.Table:
    """A run's table as a scan gives it: ``filter`` applied (the rows refused kept: they
    are rejected with their reason, never dropped), ``columns`` kept (those it lacks null,
    typed as the file's ``schema`` has them), plus each row's place in the run (``\0row``)."""
    n = table.num_rows
    wanted = table.column_names if columns is None else columns
    needed = set(wanted)
    if filter is not None:
        needed |= {f.name for f in schema}
    for name in needed - set(table.column_names):
        kind = schema.field(name).type if name in schema.names else pa.null()
        table = table.append_column(name, pa.nulls(n, kind))
    table = table.append_column("\0row", pa.array(range(n), pa.int64()))
    if filter is not None:
        keep = _compared(table).filter(filter).column("\0row").to_pylist()
        rows = sorted(set(keep) | {r for r in mine if r in range(n)})
        table = table.take(pa.array(rows, pa.int64()))
    return table.select([*wanted, "\0row"])


def _compared(table: pa.Table) -> pa.Table:
    """``table`` as a filter compares it: a column mixing integers and fractions (a union,
    which no Arrow comparison takes) as doubles, as Arrow's reader would have read it."""
    for i, f in enumerate(table.schema):
        if pa.types.is_union(f.type):
            values = [None if v is None else float(v) for v in table.column(i).to_pylist()]
            table = table.set_column(i, f.name, pa.array(values, pa.float64()))
    return table
