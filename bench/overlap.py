"""What overlapping a batch's preparation with the previous batch's write is worth.

``Lake.batches(prepare=engine.prepare)`` validates, encodes and hashes the next batch in
the lake's reader thread while the current one is written; the runner and the partitions
pass it (see docs/performance.md). This measures the copy engine's loop both ways against a
simulated server that answers each bulk write after ``--server-us`` microseconds per
document (sleeping, so it takes no CPU from the client, as a real MongoDB on another
machine would not), plus 0.5 ms per batch for the status commit.

    .venv/bin/python bench/overlap.py [--rows 100000] [--server-us 20,100]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from lakesync.copy import CopyEngine
from lakesync.demo import generate
from lakesync.lake import Lake
from lakesync.schema import TASK_DETAIL

COMMIT_SECONDS = 0.0005


class SimulatedServer:
    """A target collection that stores nothing and answers after a per-document delay."""

    def __init__(self, us_per_doc: float) -> None:
        self.delay = us_per_doc / 1e6

    def find(self, *args: Any, **kwargs: Any) -> list[Any]:
        return []

    def insert_many(self, docs: list[Any], ordered: bool = True) -> None:
        time.sleep(len(docs) * self.delay)

    def bulk_write(self, ops: list[Any], ordered: bool = True) -> Any:
        time.sleep(len(ops) * self.delay)
        return type("Result", (), {"bulk_api_result": {"nInserted": len(ops)}})()


def copy(lake: Lake, us_per_doc: float, overlapped: bool, batch_size: int) -> float:
    """Records per second of the engine's loop (write, then a commit round trip)."""
    server: Any = SimulatedServer(us_per_doc)
    engine = CopyEngine(server, server, TASK_DETAIL, "job_overlap")
    started = time.perf_counter()
    records = 0
    for batch in lake.batches(batch_size, prepare=engine.prepare if overlapped else None):
        records += engine.write(batch).counts.processed
        time.sleep(COMMIT_SECONDS)
    return records / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--server-us", default="20,100", help="simulated server cost per document")
    p.add_argument("--batch-size", type=int, default=1000)
    p.add_argument("--reps", type=int, default=3)
    ns = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="lakesync-overlap-") as tmp:
        generate(Path(tmp) / "lake", ns.rows, seed=0)
        lake = Lake.open(str(Path(tmp) / "lake"))
        print(f"{ns.rows:,} records, batch size {ns.batch_size:,}, median of {ns.reps} runs")
        print(f"{'server us/doc':>14} {'sequential':>12} {'overlapped':>12} {'gain':>6}")
        for us in (float(x) for x in ns.server_us.split(",")):
            rates: dict[bool, list[float]] = {False: [], True: []}
            for _ in range(ns.reps):
                for overlapped in (False, True):
                    rates[overlapped].append(copy(lake, us, overlapped, ns.batch_size))
            plain, over = (statistics.median(rates[k]) for k in (False, True))
            print(f"{us:>14g} {plain:>10,.0f}/s {over:>10,.0f}/s {over / plain - 1:>6.0%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
