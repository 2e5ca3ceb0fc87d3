"""Where a copy's memory is, batch after batch: the client side of ``lakesync copy`` (Lake.batches
with ``CopyEngine.prepare`` on the reader thread, then the documents an insert sends) over a
whole lake, no server, with the process's resident memory split by who holds it.

    PYTHONPATH=src python bench/heapsteps.py LAKE [--every 250] [--tracemalloc]

Every ``--every`` batches it prints, in MB: ``heap`` (glibc's main arena), ``arenas`` (glibc's
thread arenas, 64 MiB-aligned mappings), ``mimalloc`` (the 1 GiB region Arrow's default pool
reserves), ``other`` (other anonymous memory: Python's object arenas, thread stacks, numpy),
then glibc's bytes in use (mallinfo2), Arrow's pool (allocated / its peak), Python's traced
heap (with --tracemalloc) and the number of Python objects the collector tracks. Issue #27:
memory that grows with the lake shows in the bytes in use, Arrow's allocated bytes, the
traced heap or the objects; the allocators' retained pages show only in the first four.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
import tracemalloc
from pathlib import Path

import pyarrow as pa

from lakesync.copy import CopyEngine, _new_documents
from lakesync.lake import Lake
from lakesync.schema import TASK_DETAIL

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository: tests.mallinfo
from tests.mallinfo import malloc_in_use


def resident_by_kind() -> dict[str, float]:
    """This process's resident memory (MB) by the kind of mapping that holds it."""
    out = {"heap": 0.0, "arenas": 0.0, "mimalloc": 0.0, "other": 0.0, "files": 0.0}
    kind = "other"
    for line in Path("/proc/self/smaps").read_text().splitlines():
        parts = line.split()
        if "-" in parts[0] and ":" not in parts[0]:
            start, end = (int(x, 16) for x in parts[0].split("-"))
            name = parts[5] if len(parts) > 5 else ""
            if name.startswith("/"):
                kind = "files"
            elif name == "[heap]":
                kind = "heap"
            elif end - start >= 256 << 20:
                kind = "mimalloc"
            elif start % (64 << 20) == 0:
                kind = "arenas"
            else:
                kind = "other"
        elif parts[0] == "Rss:":
            out[kind] += int(parts[1]) / 1024
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("lake", type=Path)
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--every", type=int, default=250, help="batches between samples")
    parser.add_argument("--tracemalloc", action="store_true", help="trace Python's heap")
    ns = parser.parse_args()
    if ns.tracemalloc:
        tracemalloc.start()
    engine = CopyEngine(None, None, TASK_DETAIL, "bench")  # type: ignore[arg-type]
    lake = Lake.open(str(ns.lake))
    pool = pa.default_memory_pool()
    print(f"{len(lake.files):,} files; Arrow's pool: {pool.backend_name}", flush=True)
    records = batches = 0
    started = time.perf_counter()
    for batch in lake.batches(ns.batch_size, prepare=engine.prepare):
        ready = batch.prepared
        docs = _new_documents("job", batch, ready.rows, ready.bodies, ready.digests)
        records += batch.table.num_rows
        batches += 1
        del docs, ready, batch
        if batches % ns.every:
            continue
        kinds = " ".join(f"{k} {v:5.1f}" for k, v in resident_by_kind().items() if k != "files")
        objects = len(gc.get_objects())
        traced = tracemalloc.get_traced_memory()[0] / 2**20 if ns.tracemalloc else float("nan")
        in_use = malloc_in_use() / 2**20
        print(
            f"{time.perf_counter() - started:6.0f} s {records:>11,} records  {kinds}  "
            f"malloc in use {in_use:5.1f}  arrow {pool.bytes_allocated() / 2**20:4.1f}"
            f"/{pool.max_memory() / 2**20:4.1f}  traced {traced:5.1f}  objects {objects:,}",
            flush=True,
        )


if __name__ == "__main__":
    main()
