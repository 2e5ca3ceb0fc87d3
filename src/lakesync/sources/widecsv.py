"""CSV files of very many columns, read a group of columns at a time.

Arrow's CSV reader spends about 10 KB per column whatever the rows: a file of 100,000
columns and 3 rows took ~0.8 GB to open and read. A file whose first record has more than
``WIDE_COLUMNS`` fields is therefore split here into records (by the same state machine as
Arrow's parser: quoting only at a field's start, ``""`` inside quotes, ``\\r``, ``\\n`` or
``\\r\\n`` line ends, empty lines skipped), and each group of ``GROUP_COLUMNS`` columns of a
run of records is handed to Arrow's reader as a CSV of its own: the very bytes of those
fields, so Arrow converts every value itself (types inferred from the file's first block,
null and quoted "" as in ``text.CsvOptions``, text the encoding does not describe kept as
read). The file becomes an Arrow IPC copy in this process's scratch folder (as a JSON array
becomes an NDJSON copy: ``jsonarray``), named after the file and the options it is read
with, and is then read like any other file. Memory is bounded by a block of the file
(``CSV_BLOCK_BYTES``) and one group's conversion, not by the number of columns.

A record of fewer or more cells than the file has columns is not read: it stays in the copy
as a row of nulls at its place (so the rows after it keep theirs) and is refused with its
reason (``ragged_reason``), as a JSON record nested too deep is (``jsondepth``). A file of
few columns holding such a record is read here too (``text.inspect_file``): Arrow's reader
failed the whole file on it ("Expected 4 columns, got 3").
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.fs as pafs

from lakesync.sources.base import hold, reused, scratch_folder
from lakesync.sources.undefined import reading_codec

#: a CSV block must hold a whole record: a cell may be as large as a MongoDB document
#: (16 MB), which Arrow's default block (1 MB) refused ("straddles two block boundaries")
CSV_BLOCK_BYTES = 17 << 20
#: a file whose first record has more fields than this is read a group of columns at a time
WIDE_COLUMNS = 1000
GROUP_COLUMNS = 1000
#: the extension of the list of a copy's refused rows, beside it
REFUSED_SUFFIX = ".refused.json"
#: records converted at a time after the first block (whose types are fixed by then)
_RUN_BYTES = 4 << 20
_READ = 1 << 20
_BOM = b"\xef\xbb\xbf"


def parse_options(delimiter: str) -> pacsv.ParseOptions:
    """How the fields of a record are split (both paths)."""
    return pacsv.ParseOptions(delimiter=delimiter, newlines_in_values=True)


def convert_options(types: dict[str, pa.DataType]) -> pacsv.ConvertOptions:
    """How cells become values (both paths): ``types`` are the columns' read types (the
    others inferred); an unquoted empty cell is null, a quoted "" the empty string."""
    return pacsv.ConvertOptions(
        column_types=types,
        null_values=[""],
        strings_can_be_null=True,
        quoted_strings_can_be_null=False,
        check_utf8=False,  # bad text rejects its record (``text.decoded``), not its column
    )


class _Records:
    """The records of a CSV stream (UTF-8 bytes): each one's bytes without its line end,
    the end of each of its fields in them, and the stream offset just past it."""

    def __init__(self, stream: Any, delimiter: str) -> None:
        d = re.escape(delimiter.encode())
        self._field = re.compile(
            rb'(?:"(?:[^"]|"")*+(?:"|\Z))?(?:[^' + d + rb"\r\n])*+(" + d + rb"|\r\n|\r|\n|\Z)"
        )
        self._delimiter = delimiter.encode()
        self._stream = stream
        self.buf = b""
        self._pos = 0
        self.eof = False
        self.offset = 0  # stream offset of buf[0]

    def fill(self) -> None:
        """More of the stream in the buffer (or ``eof``)."""
        chunk = self._stream.read(_READ)
        if not chunk:
            self.eof = True
        elif not self.offset and not self.buf and chunk.startswith(_BOM):
            self.buf, self._pos = chunk, len(_BOM)  # a UTF-8 BOM is not data
        else:
            self.buf += chunk

    def __iter__(self) -> Iterator[tuple[bytes, list[int], int]]:
        while True:
            if self._pos > _READ:  # between records: let the bytes read go
                self.offset += self._pos
                self.buf, self._pos = self.buf[self._pos :], 0
            if self._pos + 1 >= len(self.buf) and not self.eof:
                self.fill()  # (two bytes seen: a line end may be \r\n)
                continue
            if self._pos >= len(self.buf):
                return
            first = self.buf[self._pos : self._pos + 1]
            if first in (b"\r", b"\n"):  # an empty line: skipped, as Arrow skips it
                self._pos += 2 if self.buf[self._pos : self._pos + 2] == b"\r\n" else 1
                continue
            start, ends = self._pos, []
            while True:
                match = self._field.match(self.buf, self._pos)
                assert match is not None  # every part of the pattern may match nothing
                if match.end() >= len(self.buf) - 1 and not self.eof:
                    self.fill()  # the field (or its line end) may go on: read on, again
                    continue
                sep = match.group(1)
                ends.append(match.end() - start - len(sep))
                self._pos = match.end()
                if sep != self._delimiter:
                    break
            yield self.buf[start : start + ends[-1]], ends, self.offset + self._pos


def _stream(fs: pafs.FileSystem, path: str, codec: str | None, encoding: str) -> Any:
    """The file's bytes as UTF-8, decompressed and transcoded as Arrow's reader does it."""
    raw = fs.open_input_stream(path, compression=codec)
    return pa.transcoding_input_stream(raw, reading_codec(encoding), "utf8")


def first_record(
    fs: pafs.FileSystem, path: str, codec: str | None, encoding: str, delimiter: str
) -> tuple[list[bytes], bytes | None]:
    """The values of the file's first record, as Arrow reads them (none: an empty file),
    and the whole file as UTF-8 if its first read held all of it (None: a larger file)."""
    with _stream(fs, path, codec, encoding) as stream:
        records = _Records(stream, delimiter)
        values: list[bytes] = []
        for record, ends, _ in records:
            starts = [0, *(end + 1 for end in ends[:-1])]
            values = [_value(record[s:e]) for s, e in zip(starts, ends, strict=True)]
            break
        while not records.eof and len(records.buf) < _READ:  # its end, if already read
            records.fill()
        return values, records.buf if records.eof and not records.offset else None


_QUOTED = re.compile(rb'"((?:[^"]|"")*+)"?(.*)', re.DOTALL)


def _value(field: bytes) -> bytes:
    """A field's value: a quoted part unquoted (``""`` as ``"``), and what follows it."""
    match = _QUOTED.fullmatch(field) if field.startswith(b'"') else None
    return field if match is None else match[1].replace(b'""', b'"') + match[2]


def ragged_reason(record: int, expected: int, found: int, shown: str) -> str:
    """Why a CSV record of ``found`` cells in a file of ``expected`` columns is rejected;
    ``record``: its number in the file (1-based, the header counted, as Arrow's reader
    numbers its rows)."""
    return (
        f"Row #{record} of the file has {found} cell{'s' * (found != 1)}, the file has "
        f"{expected} columns "
        f"({shown[:60]!r}); it was not read. Fix the record in the lake."
    )


def _groups(count: int) -> list[tuple[int, int]]:
    """Column ranges of about ``GROUP_COLUMNS`` each, none of one column (a record of a
    single empty cell would be an empty line, which a CSV reader skips)."""
    n = max(1, -(-count // GROUP_COLUMNS))
    bounds = [count * i // n for i in range(n + 1)]
    return list(itertools.pairwise(bounds))


def _slice(record: bytes, ends: list[int], first: int, last: int) -> bytes:
    """Fields ``[first, last)`` of a record, as written (with their delimiters)."""
    return record[0 if first == 0 else ends[first - 1] + 1 : ends[last - 1]]


def _converted(
    records: list[tuple[bytes, list[int]]],
    names: list[str],
    delimiter: str,
    types: dict[str, pa.DataType],
) -> pa.Table:
    """The records' columns, each group of them converted by Arrow's CSV reader."""
    columns: list[pa.ChunkedArray] = []
    fields: list[pa.Field] = []
    for first, last in _groups(len(names)):
        group = names[first:last]
        data = b"\n".join(_slice(r, ends, first, last) for r, ends in records) + b"\n"
        read = pacsv.ReadOptions(
            column_names=group,
            block_size=max(len(data) + 1, 1 << 20),
            use_threads=False,
        )
        parse = parse_options(delimiter)
        parse.ignore_empty_lines = False  # (records only: a row of one null cell is a row)
        table = pacsv.read_csv(
            pa.py_buffer(data),
            read_options=read,
            parse_options=parse,
            convert_options=convert_options({n: types[n] for n in group if n in types}),
            memory_pool=pa.system_memory_pool(),
        )
        columns.extend(table.columns)
        fields.extend(table.schema)
    return pa.Table.from_arrays(columns, schema=pa.schema(fields))


def wide_copy(
    fs: pafs.FileSystem,
    path: str,
    codec: str | None,
    *,
    encoding: str,
    delimiter: str,
    header: bool,
    names: list[str],
    text: frozenset[str],
) -> tuple[str, dict[int, str]]:
    """The local path of an Arrow IPC copy of the CSV file ``path`` (made if needed), read
    with ``names`` for its columns (its header line, if any, skipped), ``text`` of them read
    as text, the other types inferred from the file's first block as Arrow infers them; and
    its refused rows (records of another number of cells), by their place, with the reason."""
    info = fs.get_file_info(path)
    read = (encoding, delimiter, header, names, sorted(text))
    tag = repr((fs.type_name, path, info.size, info.mtime_ns, *read)).encode()
    target = scratch_folder() / f"{hashlib.sha256(tag).hexdigest()[:32]}.arrow"
    listed = target.with_suffix(REFUSED_SUFFIX)  # (removed with the copy: ``base.let_go``)
    if listed.exists() and reused(target):
        rows = json.loads(listed.read_text())
        return str(target), {int(r): why for r, why in rows.items()}
    mine = f".{os.getpid()}.{threading.get_ident()}.part"
    partial, written = target.with_suffix(mine), Path(f"{listed}{mine}")
    refused: dict[int, str] = {}
    try:
        with _stream(fs, path, codec, encoding) as stream, pa.OSFile(str(partial), "wb") as out:
            _write(_Records(stream, delimiter), out, names, delimiter, header, text, refused)
        written.write_text(json.dumps({str(r): why for r, why in refused.items()}))
        os.replace(written, listed)  # both complete before either is used
        os.replace(partial, target)
        hold([str(target)])
    finally:
        partial.unlink(missing_ok=True)
        written.unlink(missing_ok=True)
    return str(target), refused


def _write(
    records: _Records,
    out: Any,
    names: list[str],
    delimiter: str,
    header: bool,
    text: frozenset[str],
    refused: dict[int, str],
) -> None:
    types: dict[str, pa.DataType] = {n: pa.string() for n in names if n in text}
    writer = None
    run: list[tuple[bytes, list[int]]] = []
    run_bytes, limit, skip = 0, CSV_BLOCK_BYTES, header

    def flush() -> None:
        nonlocal writer, run, run_bytes, types
        table = _converted(run, names, delimiter, types)
        if writer is None:  # the first block fixes the types, as Arrow's streaming reader
            types = dict(zip(names, table.schema.types, strict=True))
            writer = pa.ipc.new_file(out, table.schema)
        writer.write_table(table)
        run, run_bytes = [], 0

    width = len(delimiter.encode())
    blank = delimiter.encode() * (len(names) - 1), [i * width for i in range(len(names))]
    row = 0  # the data record's place in the file's rows
    for record, ends, offset in records:
        if skip:
            skip = False
            continue
        size = len(record)
        if len(ends) != len(names):  # refused, a row of nulls in its place
            shown = record[:96].decode("utf-8", "replace")
            refused[row] = ragged_reason(row + 1 + header, len(names), len(ends), shown)
            record, ends = blank
        row += 1
        if offset > limit and run:  # this record is past the block: the block ends before it
            flush()
            limit = offset - size + _RUN_BYTES
        run.append((record, ends))
        run_bytes += len(record)
    if run:
        flush()
    if writer is None:  # no records: the columns' types are those of an empty file
        schema = pa.schema([(n, types.get(n, pa.null())) for n in names])
        writer = pa.ipc.new_file(out, schema)
    writer.close()
