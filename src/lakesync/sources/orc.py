"""ORC files, read by ``pyarrow.dataset`` (``OrcFileFormat``) like the text formats: one
fragment per file, batches streamed, rows counted from the file's footer."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from lakesync.locations import Location
from lakesync.sources.base import FileFacts, with_partition_columns

FORMAT = ds.OrcFileFormat()


def inspect_file(
    loc: Location,
    path: str,
    expr: pc.Expression | None,
    keys: list[tuple[str, str | None]],
    size: int | None,
) -> tuple[FileFacts, pa.Schema, ds.Fragment]:
    """An ORC file's facts, schema (plus hive ``keys``, read from its footer) and fragment."""
    fragment = FORMAT.make_fragment(
        path, filesystem=loc.fs, partition_expression=expr, file_size=size
    )
    schema = with_partition_columns(fragment.physical_schema, keys)
    return FileFacts(path, size, None, expr), schema, fragment
