"""How copies scale with workers: one partitioned job on the local executor, 1, 2 and 4 workers.

``.venv/bin/python bench/scaling.py [--rows N]`` (also run by ``make bench``) generates one
demo lake, then, on the same MongoDB-wire server, copies it with LAKESYNC_WORKERS = 1, 2
and 4, each into a fresh database, with partitions sized so that every worker has several.
It prints records per second and the speed-up against one worker.

On the embedded nx-27017 server, a single SQLite writer, more workers cannot write faster:
the figure then shows that server's ceiling, about 4-5k TaskDetail records per second. Set
LAKESYNC_MONGODB_URI to a real MongoDB to see the copy itself scale.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from pymongo import MongoClient

from lakesync.config import load_settings
from lakesync.demo import generate
from lakesync.mongo import EmbeddedServer
from lakesync.runtime import Runtime


def copy_with(uri: str, lake: Path, workers: int, rows: int, data: Path) -> tuple[float, Any]:
    """Seconds to copy the lake with `workers` local workers, and the final status."""
    database = "bench_" + uuid.uuid4().hex[:8]
    settings = load_settings(
        mongodb_uri=uri, database=database, data_dir=data, lake_uri=str(lake),
        workers=workers, partition_rows=max(1000, rows // (workers * 4)), batch_size=2000,
    )  # fmt: skip
    try:
        with Runtime(settings, executor="local") as rt:
            rt.start()
            started = time.perf_counter()
            status, _ = rt.jobs.start("copy-taskdetail")
            while not (done := rt.jobs.get(status.jobId)).state.is_final:
                time.sleep(0.1)
            return time.perf_counter() - started, done
    finally:
        client: MongoClient[dict[str, Any]] = MongoClient(uri)
        client.drop_database(database)
        client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--workers", default="1,2,4")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="lakesync-scaling-") as tmp:
        root = Path(tmp)
        lake = root / "lake"
        generate(lake, args.rows, seed=5)
        server = None
        uri = os.environ.get("LAKESYNC_MONGODB_URI")
        if not uri:
            server = EmbeddedServer(root / "mongo").start()
            uri = server.uri
        where = "embedded nx-27017 (one SQLite writer)" if server else "LAKESYNC_MONGODB_URI"
        print(f"# lakesync scaling: {args.rows:,} records, server: {where}")
        print(f"# {platform.platform()}, {os.cpu_count()} CPUs, Python {platform.python_version()}")
        print(f"{'workers':>8} {'partitions':>10} {'seconds':>8} {'records/s':>10} {'speed-up':>8}")
        base = None
        try:
            for n in (int(w) for w in args.workers.split(",")):
                seconds, done = copy_with(uri, lake, n, args.rows, root / "data")
                assert done.status == "completed", done.error
                assert done.processedRecords == args.rows
                rate = args.rows / seconds
                base = base or rate
                print(f"{n:>8} {done.partitions or 1:>10} {seconds:>8.1f} {rate:>10,.0f} "
                      f"{rate / base:>7.2f}x")  # fmt: skip
        finally:
            if server is not None:
                server.stop()


if __name__ == "__main__":
    main()
