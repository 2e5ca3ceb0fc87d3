"""Text files: CSV and JSON (NDJSON, or one JSON array of objects) read by pyarrow.dataset,
plain or compressed (``.gz``, ``.zst``, ``.bz2``: decompressed as they stream).

A text file has no footer: its schema is what pyarrow infers from its first block, and its
rows are only known by reading it, so a text lake keeps each file's (small) fragment.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.fs as pafs

from lakesync.locations import Location
from lakesync.sources.base import FileFacts, with_partition_columns
from lakesync.sources.jsonarray import is_json_array, ndjson_copy

#: the text formats and their pyarrow dataset formats
FORMATS = {"csv": ds.CsvFileFormat, "json": ds.JsonFileFormat}
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


def inspect_file(
    loc: Location,
    fmt: str,
    path: str,
    expr: pc.Expression | None,
    keys: list[tuple[str, str | None]],
    size: int | None,
) -> tuple[FileFacts, pa.Schema, ds.Fragment]:
    """A text file's facts, schema (plus hive ``keys``) and fragment, which decompresses
    the file as it reads (the codec inferred from its extension). A JSON file holding one
    array is read from an NDJSON copy (see ``jsonarray``)."""
    fs, real = loc.fs, path
    codec = compression_of(path)
    if fmt == "json" and is_json_array(fs, path, codec):  # [{...}, ...]: read as NDJSON
        fs, real = pafs.LocalFileSystem(), ndjson_copy(fs, path, loc.show(path), codec)
        size = None
    opened = real
    if real.lower().endswith(".zst"):  # pyarrow infers zstd from ".zstd" only
        fs, opened = pafs.PyFileSystem(_ZstAliases(fs)), real + "d"
    fragment = FORMATS[fmt]().make_fragment(
        opened, filesystem=fs, partition_expression=expr, file_size=size
    )
    schema = with_partition_columns(fragment.physical_schema, keys)
    return FileFacts(real, size, None, expr), schema, fragment


class _ZstAliases(pafs.FileSystemHandler):  # type: ignore[misc]
    """``fs`` read-only, with each ``x.zst`` file also named ``x.zstd``: pyarrow's text
    formats infer a file's codec from its extension and know zstd as ``.zstd`` only, so
    a ``.zst`` file is opened under that name and decompressed as it streams."""

    def __init__(self, fs: pafs.FileSystem) -> None:
        self.fs = fs

    @staticmethod
    def _real(path: str) -> str:
        return path[:-1] if path.lower().endswith(".zstd") else path

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _ZstAliases) and other.fs.equals(self.fs)

    def __ne__(self, other: object) -> bool:
        return not self == other

    def get_type_name(self) -> str:
        return f"zst+{self.fs.type_name}"

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
