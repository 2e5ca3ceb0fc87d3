"""Iceberg tables the tests write with pyiceberg, plus the delete files it cannot write.

pyiceberg 0.12 deletes copy-on-write only (``write.delete.mode = merge-on-read`` falls back
with a warning) and writes no equality deletes, while Spark, Flink and Trino write both. The
helpers here write a position or equality delete file as the Iceberg spec defines it (Parquet
with the reserved field ids) and commit it in a snapshot of its own, with a delete manifest,
through pyiceberg's own snapshot producer: the table is then as those engines leave it.
"""

from __future__ import annotations

import uuid
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from pyiceberg.io.pyarrow import schema_to_pyarrow
from pyiceberg.manifest import (
    DataFile,
    DataFileContent,
    FileFormat,
    ManifestContent,
    ManifestWriterV2,
)
from pyiceberg.table import Table
from pyiceberg.table.snapshots import Operation
from pyiceberg.table.update.snapshot import _FastAppendFiles
from pyiceberg.typedef import Record

FILE_PATH_ID, POS_ID = 2147483546, 2147483545  # the spec's reserved field ids
#: column statistics left empty (optional in the spec; pyiceberg's inspect needs the maps)
NO_STATS: dict[str, Any] = {
    "column_sizes": {}, "value_counts": {}, "null_value_counts": {}, "nan_value_counts": {},
    "lower_bounds": {}, "upper_bounds": {},
}  # fmt: skip


class _DeleteManifestWriter(ManifestWriterV2):
    def content(self) -> ManifestContent:
        return ManifestContent.DELETES

    @property
    def _meta(self) -> dict[str, str]:
        return {**super()._meta, "content": "deletes"}


class _RowDelta(_FastAppendFiles):
    """A fast append whose added files are delete files (of one partition spec, which may
    be an older one than the table's): written in a delete manifest of that spec."""

    spec_id = 0

    def new_manifest_writer(self, spec: Any) -> Any:
        return _DeleteManifestWriter(
            self.spec(self.spec_id), self.schema(), self.new_manifest_output(),
            self._snapshot_id, self._compression,
        )  # fmt: skip


def _commit(table: Table, files: list[DataFile], spec_id: int) -> None:
    with table.transaction() as tx:
        delta = _RowDelta(Operation.DELETE, tx, table.io)
        delta.spec_id = spec_id
        for f in files:
            f.spec_id = spec_id  # from_args does not set it
            delta.append_data_file(f)
        delta.commit()


def _write(table: Table, data: pa.Table) -> tuple[str, int]:
    path = f"{table.metadata.location}/data/delete-{uuid.uuid4()}.parquet"
    with table.io.new_output(path).create() as out:
        pq.write_table(data, out)
    return path, table.io.new_input(path).__len__()


def position_delete(table: Table, data_file: str, positions: list[int], spec_id: int = 0,
                    partition: Record | None = None) -> None:  # fmt: skip
    """Delete rows ``positions`` of ``data_file`` (a path as the manifests name it)."""
    schema = pa.schema([
        pa.field("file_path", pa.string(), False, {"PARQUET:field_id": str(FILE_PATH_ID)}),
        pa.field("pos", pa.int64(), False, {"PARQUET:field_id": str(POS_ID)}),
    ])  # fmt: skip
    rows = pa.table({"file_path": [data_file] * len(positions), "pos": positions}, schema=schema)
    path, size = _write(table, rows)
    _commit(table, [DataFile.from_args(
        content=DataFileContent.POSITION_DELETES, file_path=path, file_format=FileFormat.PARQUET,
        partition=partition or Record(), record_count=len(positions), file_size_in_bytes=size,
        spec_id=spec_id, sort_order_id=None, equality_ids=None, key_metadata=None, **NO_STATS,
    )], spec_id)  # fmt: skip


def equality_delete(table: Table, values: dict[str, list[Any]], spec_id: int = 0,
                    partition: Record | None = None) -> None:  # fmt: skip
    """Delete the rows whose columns equal one of the ``values`` rows (by column name)."""
    schema = table.schema()
    ids = [schema.find_field(name).field_id for name in values]
    arrow = schema_to_pyarrow(schema)
    fields = [
        pa.field(n, arrow.field(n).type, True, {"PARQUET:field_id": str(i)})
        for n, i in zip(values, ids, strict=True)
    ]
    rows = pa.table(values, schema=pa.schema(fields))
    path, size = _write(table, rows)
    _commit(table, [DataFile.from_args(
        content=DataFileContent.EQUALITY_DELETES, file_path=path, file_format=FileFormat.PARQUET,
        partition=partition or Record(), record_count=rows.num_rows, file_size_in_bytes=size,
        spec_id=spec_id, sort_order_id=None, equality_ids=ids, key_metadata=None, **NO_STATS,
    )], spec_id)  # fmt: skip


def rewrite(table: Table, removed: list[DataFile], data: pa.Table, operation: Operation) -> None:
    """One snapshot that removes the data files ``removed`` and adds ``data`` (one file per
    partition, in the row order given), as Spark commits a compaction (``rewrite_data_files``:
    ``replace``) or a static ``INSERT OVERWRITE`` of a partition (``overwrite``): pyiceberg's
    own ``overwrite`` commits a delete and an append, two snapshots."""
    from pyiceberg.io.pyarrow import _dataframe_to_data_files
    from pyiceberg.table.update.snapshot import _OverwriteFiles

    with table.transaction() as tx:
        producer = _OverwriteFiles(operation=operation, transaction=tx, io=table.io)
        for f in removed:
            producer.delete_data_file(f)
        for f in _dataframe_to_data_files(
            table_metadata=tx.table_metadata, write_uuid=producer.commit_uuid, df=data,
            io=table.io,
        ):  # fmt: skip
            producer.append_data_file(f)
        producer.commit()
