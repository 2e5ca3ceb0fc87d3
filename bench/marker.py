"""What the `_lakesync` marker costs the server, in different shapes.

Inserts the same demo records with ``insert_many`` in batches of 1,000, without a marker
and with the marker shaped as lakesync stores it and as it could be, into fresh
databases on one server, interleaved, and prints the server's CPU per record (the
embedded nx-27017 by default, whose process is measured; see docs/performance.md).

    .venv/bin/python bench/marker.py [--rows 30000] [--reps 7]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import bson
import psutil
import pyarrow.dataset as ds
from bson.raw_bson import RawBSONDocument
from pymongo import MongoClient

from lakesync.demo import generate
from lakesync.mongo import EmbeddedServer

H, JOB = "0" * 24, "job_" + "a" * 26

SHAPES: dict[str, Callable[[int], Any]] = {
    "none (what PyMongoArrow stores)": lambda row: None,
    "{h, job, op, at: [file, row]} (lakesync)": lambda row: {
        "h": H, "job": JOB, "op": "i", "at": [3, row]},
    "{h, job, op, f, r} (no array)": lambda row: {"h": H, "job": JOB, "op": "i", "f": 3, "r": row},
    "{h, job, op, at: file * 2^32 + row}": lambda row: {
        "h": H, "job": JOB, "op": "i", "at": 3 * 2**32 + row},
    'one string "h|job|op|file|row"': lambda row: f"{H}|{JOB}|i|3|{row}",
}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rows", type=int, default=30_000)
    p.add_argument("--reps", type=int, default=7)
    ns = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="lakesync-marker-") as tmp:
        generate(Path(tmp) / "lake", ns.rows, seed=0)
        records = ds.dataset(Path(tmp) / "lake", partitioning="hive").to_table().to_pylist()
        for r in records:
            r["_id"] = r["taskDetailId"]
        batches = {
            name: [
                [RawBSONDocument(bson.encode(r if (m := shape(i + j)) is None
                                             else {**r, "_lakesync": m}))
                 for j, r in enumerate(records[i : i + 1000])]
                for i in range(0, len(records), 1000)
            ]
            for name, shape in SHAPES.items()
        }  # fmt: skip
        server = EmbeddedServer(Path(tmp) / "server").start()
        assert server.process is not None
        proc = psutil.Process(server.process.pid)
        client: MongoClient[dict[str, Any]] = MongoClient(server.uri)
        costs: dict[str, list[float]] = {name: [] for name in SHAPES}
        try:
            for _ in range(ns.reps):
                for name in SHAPES:
                    db = client[f"marker_{uuid.uuid4().hex[:8]}"]
                    before = sum(proc.cpu_times()[:2])
                    for batch in batches[name]:
                        db.t.insert_many(batch, ordered=False)
                    costs[name].append((sum(proc.cpu_times()[:2]) - before) / ns.rows * 1e6)
                    client.drop_database(db.name)
        finally:
            client.close()
            server.stop()
    print(f"server CPU per record, {ns.rows:,} records, {ns.reps} interleaved runs")
    print(f"{'marker':<44} {'median':>8} {'best':>8}")
    for name, values in costs.items():
        print(f"{name:<44} {statistics.median(values):>6.1f}us {min(values):>6.1f}us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
