"""What a lake holds and what a copy of it would write, in seconds: `lakesync inspect` and
POST /api/preview.

Answered from the lake's metadata (files, format, Delta version, schema, rows: Parquet
footers, no data read) and from a sample of its first records, validated and encoded as a
copy would: the documents as they would be written, the rejections with their reasons,
and the keys repeated within the sample. Nothing is written anywhere.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import replace
from typing import Any

import bson
from bson import json_util

from lakesync.config import Settings
from lakesync.masking import masked
from lakesync.operations import OperationRegistry, ResolvedJob
from lakesync.plan import open_source
from lakesync.schema import check_columns, validate
from lakesync.service import checked_request
from lakesync.sources.base import REBUILT
from lakesync.typemap import ServerLimits, bson_type_name

#: records read for the sample: enough to meet a few bad rows, few enough to answer at once
SAMPLE_ROWS = 1000
#: batches read for the sample at most (each ends where the files' schemas differ)
SAMPLE_BATCHES = 100
#: sample documents and rejections shown
SHOWN = 10


def preview(
    settings: Settings,
    registry: OperationRegistry,
    operation: str,
    raw_options: Any = None,
    *,
    limits: ServerLimits,
    trusted: bool = False,
) -> dict[str, Any]:
    """The preview of a copy job's request (the body of POST /api/jobs): refused as the job
    would be (unknown operation, source outside the allowed roots, missing lake...)."""
    options, source = checked_request(settings, registry, operation, raw_options, trusted=trusted)
    op = registry.get(operation)
    job = ResolvedJob(op=op, options=options, source=source, batch_size=SAMPLE_ROWS)
    lake = open_source(job, settings)
    check_columns(op.schema_, lake.schema, lake.uri)  # what would fail the job up front
    rows = lake.count_rows()
    # the first SAMPLE_ROWS records: a batch ends early where the files' schemas differ (a
    # JSON field an integer in one file and an object in the next), so as many as it takes
    # (at most SAMPLE_BATCHES of them: a lake of many small files of as many schemas is
    # sampled from its first files, as "the first N records" then says)
    sample: list[Any] = []
    taken = 0
    for batch in lake.batches(SAMPLE_ROWS):
        if taken + batch.table.num_rows > SAMPLE_ROWS:  # the first rows of it, to the count
            keep = SAMPLE_ROWS - taken
            refused = {row: why for row, why in batch.refused.items() if row < keep}
            batch = replace(batch, table=batch.table.slice(0, keep), refused=refused)
        sample.append(batch)
        taken += batch.table.num_rows
        if taken >= SAMPLE_ROWS or len(sample) >= SAMPLE_BATCHES:
            break
    if not sample:
        checks = [(None, validate(op.schema_, lake.schema.empty_table(), limits))]
    else:  # rows the reader refused are rejected as a copy rejects them
        checks = [(b, validate(op.schema_, b.table, limits, refused=b.refused)) for b in sample]
    bodies = [body for _, checked in checks for body in checked.encoded()]
    stored: dict[str, Any] = {}  # the types of the valid rows' values as they are stored
    for _, checked in checks:
        stored = {**checked.types, **stored}
    key_columns = op.schema_.key_columns
    schema = []
    for field in lake.schema:
        written = field.name in stored
        kind = stored[field.name] if written else field.type
        schema.append(
            {
                "name": field.name,
                "arrowType": str(field.type),
                "bsonType": bson_type_name(kind) if written else None,
                "key": field.name in key_columns,
            }
        )
    repeats = Counter(key for _, checked in checks for key in checked.keys)
    rejections = [(b, r) for b, checked in checks for r in checked.rejections]
    rejected: list[dict[str, Any]] = []
    for held, r in rejections[:SHOWN]:
        assert held is not None  # rejections come from rows
        seg = held.segment_of(r.row)
        rejected.append(
            {"key": r.key, "file": seg.file, "row": seg.file_row(r.row), "reason": r.reason}
        )
    return {
        "operation": operation,
        "source": masked(source),
        "collection": op.collection,
        "key": op.schema_.key,
        "mode": options.mode or op.mode,
        "format": lake.format,
        "deltaVersion": lake.version if lake.format == "delta" else None,
        "icebergSnapshotId": lake.version if lake.format == "iceberg" else None,
        "files": len(lake.files),
        "fileNames": [lake.file_name(i) for i in range(min(len(lake.files), SHOWN))],
        "rows": rows,
        "rowsFrom": "file footers" if lake.format in ("parquet", "delta") else "reading the files",
        "schema": schema,
        "sampleRows": taken,
        "sampleRejected": len(rejections),
        "repeatedKeys": {
            "keys": sum(1 for n in repeats.values() if n > 1),
            "records": sum(n - 1 for n in repeats.values() if n > 1),
            "among": f"the first {taken:,} records",
        },
        "documents": [_json(b) for b in bodies[:SHOWN]],
        "rejections": rejected,
        "orderInDoubt": _in_doubt(lake),
    }


def _in_doubt(lake: Any) -> dict[str, Any]:
    """The files whose place or row order the table cannot tell (``OrderDoubt``): a key
    repeated in them may be copied at an older version (the job counts and warns). A Delta
    rewrite whose rows the copy can trace to the files it rewrote (``REBUILT``: they are
    all still there) is not one of them."""
    doubted = [
        (lake.file_name(i), d.why)
        for i, d in enumerate(lake.doubts)
        if d is not None and d.kind != REBUILT
    ]
    return {
        "files": len(doubted),
        "examples": [f"{name}: {why}" for name, why in doubted[:SHOWN]],
    }


def _json(body: bytes) -> Any:
    """A document as relaxed Extended JSON (dates as {"$date": ...}), as mongosh shows it."""
    return json.loads(
        json_util.dumps(bson.decode(body), json_options=json_util.RELAXED_JSON_OPTIONS)
    )
