"""The time to read an NDJSON lake the way a copy reads it (Lake.batches, then validation and
BSON encoding of each batch as the copy's reader thread does), no server: to compare the
readers of two trees, alternated, on the same file.

    PYTHONPATH=src python bench/jsonread.py LAKE [--key taskDetailId] [--repeat 3]

It prints the seconds of each pass, wall and CPU (the process's, all threads: steadier on a
busy machine): ``read`` (Lake.open and the batches), ``copy`` (read, validated and encoded,
as the copy prepares a batch).
"""

from __future__ import annotations

import argparse
import time

from lakesync.schema import RecordSchema, validate
from lakesync.sources.lake import Lake
from lakesync.sources.text import CsvOptions
from lakesync.typemap import NX_27017


def once(lake: str, key: str, encode: bool) -> tuple[float, float, int]:
    start, cpu = time.perf_counter(), time.process_time()
    opened = Lake.open(lake, csv=CsvOptions(text=frozenset({key}), keys=(key,)))
    rows = 0
    for batch in opened.batches(1000):
        rows += batch.table.num_rows
        if encode:
            validate(RecordSchema(key=key), batch.table, NX_27017, refused=batch.refused).encoded()
    return time.perf_counter() - start, time.process_time() - cpu, rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("lake")
    parser.add_argument("--key", default="taskDetailId")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    for _ in range(args.repeat):
        read, read_cpu, rows = once(args.lake, args.key, False)
        copy, copy_cpu, _ = once(args.lake, args.key, True)
        print(
            f"rows {rows}  read {read:.2f} s (CPU {read_cpu:.2f} s)  "
            f"copy {copy:.2f} s (CPU {copy_cpu:.2f} s)",
            flush=True,
        )


if __name__ == "__main__":
    main()
