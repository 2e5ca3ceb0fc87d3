"""Text files: CSV and JSON (NDJSON, or one JSON array of objects) read by pyarrow.dataset,
plain or compressed (``.gz``, ``.zst``, ``.bz2``: decompressed as they stream).

A text file has no footer: its schema is what pyarrow infers from its first block, and its
rows are only known by reading it, so a text lake keeps each file's (small) fragment.

CSV is read as written (``CsvOptions``): the declared fields and the key columns as text,
so that "007" stays "007" (validation then converts a declared int, float, bool or
timestamp, rejecting the records whose cell is not one); an unquoted empty cell is null
and a quoted "" the empty string (as DuckDB reads it with ``allow_quoted_nulls=false``);
a column whose header is empty (pandas' unnamed index) is named ``column<i>`` (its place
from 0), as DuckDB names it; text the file's encoding cannot decode rejects its record.
The watermark column is read as the file's reader types it, and compared (an incremental
filter, the watermark scan) as validation reads it (``Compared``).
"""

from __future__ import annotations

import codecs
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.json as pajson

from lakesync.errors import SourceError
from lakesync.locations import Location
from lakesync.schema import read_as
from lakesync.sources import jsonruns, widecsv
from lakesync.sources.base import FileFacts, with_partition_columns
from lakesync.sources.jsonarray import is_json_array, ndjson_copy
from lakesync.sources.jsondepth import guard
from lakesync.sources.undefined import MARKED, first_mark, marking, reading_codec
from lakesync.sources.widecsv import CSV_BLOCK_BYTES, convert_options, parse_options

#: the text formats and their pyarrow dataset formats
FORMATS = {"csv": ds.CsvFileFormat, "json": ds.JsonFileFormat}
#: an NDJSON block must hold a whole record, which may be as large as a MongoDB document
#: (16 MB): Arrow's default block (1 MB) failed the file ("straddles two block boundaries").
#: A file's block is 1 MB, or its longest line when longer (``jsondepth`` measures it);
#: this when that is not known
JSON_BLOCK_BYTES = CSV_BLOCK_BYTES
#: compressed text by extension: pyarrow's codec names
COMPRESSIONS = {".gz": "gzip", ".bz2": "bz2", ".zst": "zstd", ".zstd": "zstd"}


def without_compression(name: str) -> str | None:
    """``name`` without its compression extension (None: not compressed)."""
    lower = name.lower()
    suffix = next((s for s in COMPRESSIONS if lower.endswith(s)), None)
    return None if suffix is None else name[: -len(suffix)]


def compression_of(path: str) -> str | None:
    """The codec of a compressed text file, by its extension (None: not compressed)."""
    lower = path.lower()
    return next((codec for s, codec in COMPRESSIONS.items() if lower.endswith(s)), None)


@dataclass(frozen=True)
class CsvOptions:
    """How an operation's CSV files are read (lakesync.toml: `encoding`, `delimiter`,
    `header`, and the declared fields)."""

    encoding: str = "utf-8"
    delimiter: str = ","
    header: bool = True
    #: columns read as text, as written: the declared fields and the key columns (in JSON
    #: files too: a JSON string of them is never read as a date, see ``as_written``)
    text: frozenset[str] = field(default_factory=frozenset)
    #: the names of the first columns of a file without a header (the declared fields)
    names: tuple[str, ...] = ()
    #: the key columns (JSON: a key is read as written, see ``jsonruns``)
    keys: tuple[str, ...] = ()
    #: the operation's watermark column, and its declared type (timestamp or int; None:
    #: not declared): see ``Compared``
    watermark: str | None = None
    watermark_type: str | None = None
    #: the fields declared ``float`` (JSON: validation makes their integers doubles, so a
    #: file is not read as written for them, see ``jsonnumbers``)
    doubles: frozenset[str] = field(default_factory=frozenset)

    def file_format(
        self, columns: list[str] | None = None, invalid: Callable[[Any], str] | None = None
    ) -> ds.FileFormat:
        """The dataset format; ``columns``: the file's column names (then its header line,
        if any, is skipped rather than read as names); ``invalid``: told each record of
        another number of cells (None: such a record fails the read)."""
        read = pacsv.ReadOptions(encoding=reading_codec(self.encoding), block_size=CSV_BLOCK_BYTES)
        if columns is not None:
            read.column_names = columns
            read.skip_rows = 1 if self.header else 0
        elif not self.header:
            read.autogenerate_column_names = True  # f0, f1...
        convert = convert_options({name: pa.string() for name in self.text})
        parse = parse_options(self.delimiter)
        if invalid is not None:
            parse.invalid_row_handler = invalid
        return ds.CsvFileFormat(
            parse_options=parse,
            convert_options=convert,
            read_options=read,
        )

    def named(self, found: list[str]) -> list[str] | None:
        """The column names a file is read with, if not those ``found`` in it (None)."""
        if not self.header:
            given = list(self.names[: len(found)])
            return unique(given + [f"f{i}" for i in range(len(given), len(found))])
        names = unique([name or f"column{i}" for i, name in enumerate(found)])
        return None if names == found else names


def unique(names: list[str]) -> list[str]:
    """``names`` with each one already taken suffixed as DuckDB's ``read_csv`` does it (a
    header ``a,a,a,a_1`` names ``a``, ``a_1``, ``a_2``, ``a_1_1``): Arrow's reader refused
    a file whose header repeats a name ("multiple columns named a")."""
    taken: set[str] = set()
    counts: dict[str, int] = {}
    out = []
    for name in names:
        while name in taken:
            counts[name] = counts.get(name, 0) + 1
            name = f"{name}_{counts[name]}"
        taken.add(name)
        out.append(name)
    return out


@dataclass(frozen=True)
class Compared:
    """A text lake's watermark column as the incremental filter and the watermark scan
    compare it: each file's cells read as validation reads a field of ``type``
    (``schema.read_as``), whatever type Arrow's reader gave the file's column. A file whose
    cells are written in two formats (``2024-01-03 05:00:00`` and ``2024-01-03T05:00:00+02:00``)
    is text to Arrow, and a text column has no order with a timestamp."""

    column: str
    type: Literal["timestamp", "int"]

    @property
    def arrow_type(self) -> pa.DataType:
        """The type the cells are compared as (validation's for ``type``)."""
        return pa.timestamp("ms", tz="UTC") if self.type == "timestamp" else pa.int64()

    def read(self, values: pa.Array | pa.ChunkedArray) -> tuple[pa.Array, pa.Array]:
        """``values`` as compared, and which of them cannot be read so (a cell that is not
        null, read as null): a filter keeps those rows, so that validation rejects them
        with the reason (a declared field) or they are copied as written (an undeclared
        one), never dropped unseen."""
        read, _ = read_as(values, self.type, self.column)
        if isinstance(values, pa.ChunkedArray):
            values = values.combine_chunks()
        return read, pc.and_(read.is_null(), values.is_valid())


def compared(csv: CsvOptions, schemas: list[pa.Schema]) -> Compared | None:
    """How a text lake compares its watermark column (None: as the files' reader typed it,
    one type in every file, a filter pushed down to the reader): as the type the operation
    declares; or, undeclared, when the files' types disagree or some file holds it as text,
    as a timestamp if the other files hold timestamps or dates, as an integer if integers."""
    column = csv.watermark
    held = [[f.type for f in s if f.name == column] for s in schemas]
    if column is None or not any(held) or any(len(h) > 1 for h in held):
        return None  # no such column (or two of that name: refused where it is read)
    if csv.watermark_type in ("timestamp", "int"):
        return Compared(column, "timestamp" if csv.watermark_type == "timestamp" else "int")
    types = {t for h in held for t in h if not pa.types.is_null(t)}
    typed = {t for t in types if not pa.types.is_string(t) and not pa.types.is_large_string(t)}
    if not typed or (len(types) == 1 and types == typed):  # none, or one type not text
        return None
    if all(pa.types.is_timestamp(t) or pa.types.is_date(t) for t in typed):
        return Compared(column, "timestamp")
    if all(pa.types.is_integer(t) for t in typed):
        return Compared(column, "int")
    return None


def inspect_file(
    loc: Location,
    fmt: str,
    path: str,
    expr: pc.Expression | None,
    keys: list[tuple[str, str | None]],
    size: int | None,
    csv: CsvOptions | None = None,
) -> tuple[FileFacts, pa.Schema, ds.Fragment]:
    """A text file's facts, schema (plus hive ``keys``) and fragment, which decompresses
    the file as it reads (the codec inferred from its extension). A JSON file holding one
    array is read from an NDJSON copy (see ``jsonarray``). A JSON record nested too deep
    for Arrow's reader is refused (see ``jsondepth``)."""
    fs, real = loc.fs, path
    codec = compression_of(path)
    refused = None
    rows = None  # a CSV file's, counted at open (when it is read as Arrow reads it)
    scratch: list[str] = []  # the copies made (held: the lake lets them go when closed)
    if fmt == "json" and is_json_array(fs, path, codec):  # [{...}, ...]: read as NDJSON
        fs, real = pafs.LocalFileSystem(), ndjson_copy(fs, path, loc.show(path), codec)
        size, codec = None, None
        scratch.append(real)
    longest = None
    if fmt == "json":  # a record nested too deep would crash Arrow's reader (a segfault)
        safe = guard(fs, real, codec)
        longest = safe.longest
        if safe.path != real:  # a plain NDJSON copy
            fs, real, size, refused, codec = safe.fs, safe.path, None, safe.refused, None
            scratch.append(real)
    opened, source = real, fs
    if codec is not None and not real.endswith(_ARROW_SUFFIX[codec]):  # .zst, .GZ...
        fs, opened = pafs.PyFileSystem(_CodecAliases(fs)), real + _ARROW_SUFFIX[codec]
    if fmt == "csv":
        csv = csv or CsvOptions()
        try:  # the names from the first record: Arrow's reader refuses two empty ones
            head, whole = widecsv.first_record(source, real, codec, csv.encoding, csv.delimiter)
            found = [v.decode() if csv.header else "" for v in head]
            marks = [m for name in found if (m := first_mark(name)) is not None]
            if marks:  # a byte the encoding does not define (see ``undefined``)
                raise UnicodeDecodeError(csv.encoding, bytes([marks[0][0]]), 0, 1, "undefined")
        except UnicodeDecodeError as e:  # pyarrow hands the header's names over as UTF-8
            raise SourceError(
                f"The header of {loc.show(path)} is not valid {csv.encoding} (byte "
                f"0x{e.object[e.start]:02x} in it). If the file is written in another "
                "encoding, set `encoding` for this operation in lakesync.toml (e.g. "
                '"latin-1")',
                uri=loc.show(path),
            ) from e
        names = csv.named(found)
        # Arrow's reader takes ~10 KB a column; and it reads an empty last cell that ends
        # the file (no line break after it) as "" after a quoted cell; and it fails the
        # whole file on a record of another number of cells: the group reader reads all
        # three right (such a record refused with its reason, in its place)
        grouped = len(head) > widecsv.WIDE_COLUMNS
        grouped = grouped or _ends_in_a_cell(source, real, codec, csv, whole)
        if not grouped:  # no header, or an empty name in it: read with the names made for it
            file_format = csv.file_format(names)
            rows = _counted(csv, names, opened, fs, size, whole)
            grouped = rows is None
            rows = None if rows is None or rows < 0 else rows  # (read on, to fail as it did)
        if grouped:
            copy, refused = widecsv.wide_copy(
                source,
                real,
                codec,
                encoding=csv.encoding,
                delimiter=csv.delimiter,
                header=csv.header,
                names=names or found,
                text=csv.text,
            )
            fs, opened, size, file_format = pafs.LocalFileSystem(), copy, None, _WIDE
            scratch.append(copy)
            refused = refused or None
        fragment = file_format.make_fragment(
            opened, filesystem=fs, partition_expression=expr, file_size=size
        )
    else:
        file_format = FORMATS[fmt]()
        if fmt == "json":  # a block must hold the longest record (Arrow's default: 1 MB)
            block = JSON_BLOCK_BYTES if longest is None else max(1 << 20, longest + 2)
            file_format = ds.JsonFileFormat(read_options=pajson.ReadOptions(block_size=block))
        fragment = file_format.make_fragment(
            opened, filesystem=fs, partition_expression=expr, file_size=size
        )
    try:
        physical = fragment.physical_schema
    except pa.ArrowInvalid as e:  # a column Arrow cannot give one type: read as written
        if fmt != "json" or not jsonruns.is_type_error(e):
            raise
        given = csv or CsvOptions()
        physical = jsonruns.schema_of(fs, opened, list(given.keys), given.text)
    schema = with_partition_columns(physical, keys)
    if fmt == "json" and csv is not None:  # (the scan's schema is the reader's explicit one)
        schema = as_written(schema, csv.text)
    facts = FileFacts(real, size, rows, expr, refused=refused, scratch=tuple(scratch))
    return facts, schema, fragment


def _counted(
    csv: CsvOptions,
    names: list[str] | None,
    path: str,
    fs: pafs.FileSystem,
    size: int | None,
    whole: bytes | None,
) -> int | None:
    """The CSV file's rows, counted by Arrow's parser; None if some record has another
    number of cells than the file's columns (Arrow's reader would fail the whole file on
    it), which its invalid-row handler tells. ``whole``: the file as UTF-8, if its first
    read held all of it (then it is not read again)."""
    found: list[bool] = []

    def handler(row: Any) -> str:
        found.append(True)
        return "skip"

    if whole is not None:
        utf8 = replace(csv, encoding="utf-8").file_format(names, handler)
        fragment = utf8.make_fragment(pa.py_buffer(whole))
    else:
        given = csv.file_format(names, handler)
        fragment = given.make_fragment(path, filesystem=fs, file_size=size)
    try:
        rows = int(fragment.count_rows())
    except pa.ArrowInvalid:  # (met again where the file is read, with its reason)
        return None if found else -1
    return None if found else rows


def _ends_in_a_cell(
    fs: pafs.FileSystem, path: str, codec: str | None, csv: CsvOptions, whole: bytes | None
) -> bool:
    """Whether an uncompressed CSV file ends with its delimiter (an empty last cell, no
    line break after it); ``whole``: the file as UTF-8 if its first read held all of it
    (then it is not read again: on S3, two requests per file less)."""
    if codec is not None:
        return False
    if whole is not None:
        return whole.endswith(csv.delimiter.encode())
    with fs.open_input_file(path) as f:
        size = f.size()
        end = csv.delimiter.encode(csv.encoding, errors="replace")
        return bool(size >= len(end) and f.read_at(len(end), size - len(end)) == end)


def as_written(schema: pa.Schema, text: frozenset[str]) -> pa.Schema:
    """A JSON file's ``schema`` with its ``text`` columns (the key, declared strings) that
    Arrow's reader inferred as timestamps from their JSON strings read as those strings: a
    key "2024-01-02" would be a date in this file and a string in a file whose other keys
    are not dates, two keys where the files hold one."""
    for i, f in enumerate(schema):
        if f.name in text and (pa.types.is_timestamp(f.type) or pa.types.is_date(f.type)):
            schema = schema.set(i, f.with_type(pa.string()))
    return schema


#: a CSV file of very many columns is read from an Arrow IPC copy (see ``widecsv``)
_WIDE = ds.IpcFileFormat()


def grouped_batches(
    fragment: ds.Fragment,
    schema: pa.Schema,
    columns: list[str] | None,
    filter: pc.Expression | None,
    size: int,
) -> Iterator[pa.RecordBatch] | None:
    """The batches of a CSV file read from its grouped copy (None: not such a file), as a
    scan of the fragment gives them (hive columns added, ``filter`` applied, ``columns``
    kept), read by the IPC reader: the dataset scanner spent ~2.4 KB a column (240 MB for
    one batch of 100,000 columns, against 40 MB)."""
    if not isinstance(fragment.format, ds.IpcFileFormat):
        return None
    hive = ds.get_partition_keys(fragment.partition_expression)

    def read() -> Iterator[pa.RecordBatch]:
        names = fragment.physical_schema.names  # the file's columns
        fields = None  # the places of the columns asked for (the key, for repeats.py's first
        wanted = None  # pass): the others are not read at all
        if columns is not None and filter is None:
            wanted = set(columns)
            fields = [i for i, name in enumerate(names) if name in wanted]
        held = set(names)
        added = [  # hive partition columns, and those of other files (null here)
            f for f in schema if f.name not in held and (wanted is None or f.name in wanted)
        ]
        reader = _open_copy(fragment, fields)
        for i in range(reader.num_record_batches):
            table = pa.Table.from_batches([reader.get_batch(i)])
            for f in added:
                value = pa.scalar(hive.get(f.name), pa.string()).cast(f.type)
                table = table.append_column(f, pa.array([value] * table.num_rows, f.type))
            if filter is not None:
                table = table.filter(filter)
            if columns is not None:
                table = table.select(columns)
            yield from table.to_batches(max_chunksize=size)

    return read()


def grouped_rows(fragment: ds.Fragment) -> int | None:
    """The rows of a CSV file read from its grouped copy (None: not such a file), from one
    column: the dataset's count spent ~1.6 KB a column (160 MB for 100,000 columns)."""
    if not isinstance(fragment.format, ds.IpcFileFormat):
        return None
    reader = _open_copy(fragment, [])
    return sum(int(reader.get_batch(i).num_rows) for i in range(reader.num_record_batches))


def _open_copy(fragment: ds.Fragment, fields: list[int] | None) -> pa.ipc.RecordBatchFileReader:
    """The IPC reader of a grouped copy, of the columns at places ``fields`` (None: all;
    none: the first only, which tells the rows)."""
    options = None if fields is None else pa.ipc.IpcReadOptions(included_fields=fields or [0])
    return pa.ipc.open_file(pa.memory_map(fragment.path), options=options)


#: the extension pyarrow's text formats infer each codec from (lower case only)
_ARROW_SUFFIX = {"gzip": ".gz", "bz2": ".bz2", "zstd": ".zstd"}


class _CodecAliases(pafs.FileSystemHandler):  # type: ignore[misc]
    """``fs`` read-only, with each compressed file also named with pyarrow's extension for
    its codec added (``x.zst`` as ``x.zst.zstd``, ``X.CSV.GZ`` as ``X.CSV.GZ.gz``): pyarrow's
    text formats infer a file's codec from its extension, and know only ``.gz``, ``.bz2``
    and ``.zstd`` in lower case, so such a file is opened under that name and decompressed
    as it streams (only aliases are asked of this handler)."""

    def __init__(self, fs: pafs.FileSystem) -> None:
        self.fs = fs

    @staticmethod
    def _real(path: str) -> str:
        for suffix in _ARROW_SUFFIX.values():
            if path.endswith(suffix):
                return path[: -len(suffix)]
        return path

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _CodecAliases) and other.fs.equals(self.fs)

    def __ne__(self, other: object) -> bool:
        return not self == other

    def get_type_name(self) -> str:
        return f"codec+{self.fs.type_name}"

    def normalize_path(self, path: str) -> str:
        return path

    def get_file_info(self, paths: list[str]) -> list[pafs.FileInfo]:
        infos = self.fs.get_file_info([self._real(p) for p in paths])
        return [
            pafs.FileInfo(p, i.type, mtime=i.mtime, size=i.size)
            for p, i in zip(paths, infos, strict=True)
        ]

    def get_file_info_selector(self, selector: pafs.FileSelector) -> list[pafs.FileInfo]:
        return list(self.fs.get_file_info(selector))

    def open_input_stream(self, path: str) -> pa.NativeFile:
        return self.fs.open_input_stream(self._real(path), compression=None)

    def open_input_file(self, path: str) -> pa.NativeFile:
        return self.fs.open_input_file(self._real(path))

    def _read_only(self, *args: object, **kwargs: object) -> None:
        raise OSError("a lake is read, never written")

    create_dir = delete_dir = delete_dir_contents = delete_root_dir_contents = _read_only
    delete_file = move = copy_file = _read_only
    open_output_stream = open_append_stream = _read_only


def check_encoding(encoding: str) -> str:
    """The codec's canonical name; LookupError if Python does not know it."""
    return codecs.lookup(encoding).name


def decoded(batch: pa.RecordBatch, encoding: str | None) -> tuple[pa.RecordBatch, dict[int, str]]:
    """``batch`` with each text cell that is not valid UTF-8 (bytes the file's encoding
    did not describe) made null, and the rows holding one, with the reason; ``encoding``:
    the CSV file's (None: JSON, which is UTF-8 by its specification, RFC 8259)."""
    fix = (
        "JSON text must be UTF-8 (RFC 8259): write the file as UTF-8"
        if encoding is None
        else "if the file is written in another encoding, set `encoding` for this operation "
        'in lakesync.toml (e.g. "latin-1")'
    )
    bad: dict[int, str] = {}
    columns = list(batch.columns)
    for i, column in enumerate(columns):
        if not pa.types.is_nested(column.type) and not pa.types.is_string(column.type):
            continue
        if encoding is not None and pa.types.is_string(column.type) and marking(encoding):
            columns[i] = column = _unmarked(column, batch.schema.names[i], encoding, fix, bad)
        try:
            column.validate(full=True)
            continue
        except pa.ArrowInvalid:
            pass
        if pa.types.is_nested(column.type):  # text inside an object or list: the row's value
            wrong = []
            for row in range(len(column)):
                try:
                    column.take(pa.array([row])).validate(full=True)  # (a slice checks all)
                    wrong.append(False)
                except pa.ArrowInvalid:
                    wrong.append(True)
                    bad.setdefault(
                        row,
                        f"{batch.schema.names[i]}: holds text that is not valid "
                        f"{encoding or 'utf-8'}; {fix}",
                    )
            columns[i] = pc.if_else(pa.array(wrong), pa.nulls(len(column), column.type), column)
            continue
        raw = column.cast(pa.binary())
        wrong = []
        for row, value in enumerate(raw.to_pylist()):
            if value is None:
                wrong.append(False)
                continue
            try:
                value.decode("utf-8")
                wrong.append(False)
            except UnicodeDecodeError as e:
                wrong.append(True)
                bad.setdefault(
                    row,
                    f"{batch.schema.names[i]}: the text is not valid {encoding or 'utf-8'} "
                    f"(byte 0x{value[e.start]:02x} at position {e.start}); {fix}",
                )
        columns[i] = pc.if_else(pa.array(wrong), pa.scalar(None, pa.binary()), raw).cast(
            pa.string()
        )
    if not bad:
        return batch, bad
    return pa.RecordBatch.from_arrays(columns, schema=batch.schema), bad


def _unmarked(
    column: pa.Array, name: str, encoding: str, fix: str, bad: dict[int, str]
) -> pa.Array:
    """``column`` with each cell holding a byte the CSV file's encoding does not define
    (read as a mark, see ``undefined``) made null, and its row's reason in ``bad``."""
    marked = pc.fill_null(pc.match_substring_regex(column, MARKED), False)
    if not pc.any(marked).as_py():
        return column
    for row in pc.indices_nonzero(marked).to_pylist():
        found = first_mark(column[row].as_py())
        assert found is not None
        byte, place = found
        bad.setdefault(
            row,
            f"{name}: the text is not valid {encoding} (byte 0x{byte:02x} at position "
            f"{place}); {fix}",
        )
    return pc.if_else(marked, pa.scalar(None, column.type), column)
