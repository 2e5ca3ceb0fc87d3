"""Text files: CSV and JSON (NDJSON, or one JSON array of objects) read by pyarrow.dataset.

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
from lakesync.sources.jsondepth import guard

#: the text formats and their pyarrow dataset formats
FORMATS = {"csv": ds.CsvFileFormat, "json": ds.JsonFileFormat}


def inspect_file(
    loc: Location,
    fmt: str,
    path: str,
    expr: pc.Expression | None,
    keys: list[tuple[str, str | None]],
    size: int | None,
) -> tuple[FileFacts, pa.Schema, ds.Fragment]:
    """A text file's facts, schema (plus hive ``keys``) and fragment. A JSON file holding
    one array is read from an NDJSON copy (see ``jsonarray``). A JSON record nested too
    deep for Arrow's reader is refused (see ``jsondepth``)."""
    fs, real = loc.fs, path
    refused = None
    if fmt == "json" and is_json_array(fs, path):  # [{...}, ...]: read as NDJSON
        fs, real = pafs.LocalFileSystem(), ndjson_copy(fs, path, loc.show(path))
        size = None
    if fmt == "json":  # a record nested too deep would crash Arrow's reader (a segfault)
        safe = guard(fs, real)
        if safe.path != real:
            fs, real, size, refused = safe.fs, safe.path, None, safe.refused
    fragment = FORMATS[fmt]().make_fragment(
        real, filesystem=fs, partition_expression=expr, file_size=size
    )
    schema = with_partition_columns(fragment.physical_schema, keys)
    return FileFacts(real, size, None, expr, refused=refused), schema, fragment
