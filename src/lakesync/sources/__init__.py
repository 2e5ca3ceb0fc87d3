"""Where lakes are read: one readable-table protocol and one module per kind of table.

- ``base``: the protocol (units in the table's order, counts, statistics, batches from a
  position, a version) and its types: ``Position``, ``LakeBatch``, ``Segment``,
  ``TableVersion`` (what a table kind such as Delta or Iceberg gives the reader);
- ``lake``: ``Lake``, the readable table every job reads, whatever the kind;
- ``files``: plain files (listing, globs, hive partitions, the format of each file);
- ``parquet``: Parquet reading (footers, small files from memory, row-group slices);
- ``text``: CSV and JSON files (NDJSON, or JSON arrays through ``jsonarray``), plain or
  compressed; ``orc``: ORC files;
- ``tables``: table folders (Delta, Iceberg), read as tables and never as loose files;
  ``Lake._open_iceberg`` is where an Iceberg source plugs in (a ``TableVersion``);
- ``delta``: Delta tables (the active files of a version, deletion vectors, column
  mapping), read by ``deltalake``; ``deltalog``: their commit order;
- ``iceberg``: Iceberg tables (a snapshot's data files in sequence-number order, position
  and equality deletes, schema and partition evolution), read by ``pyiceberg``;
  ``icebergorder``: where the files a rewrite wrote come in that order;
- ``stream``: batches assembled across files, read ahead of the consumer.

Where a lake lives (local or S3) and its storage errors: ``lakesync.locations``.
"""

from lakesync.sources.base import (
    ColumnStats,
    FileFacts,
    LakeBatch,
    Listing,
    Position,
    Segment,
    TableVersion,
)
from lakesync.sources.lake import Lake

__all__ = [
    "ColumnStats",
    "FileFacts",
    "Lake",
    "LakeBatch",
    "Listing",
    "Position",
    "Segment",
    "TableVersion",
]
