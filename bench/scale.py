"""lakesync on lakes of many small files: time to first batch, records/s and peak RSS.

Spark, Databricks and Flink write many small files. This writes local lakes of 1,000, 5,000
and 20,000 Parquet files of 20 TaskDetail records each (and the demo lake's layout, a few
large files, with the same 100,000 records as the 5,000-file lake for comparison), then
copies each into an empty database in a fresh child process: once in one piece and once
partitioned on the local executor (2 workers). Each row of the table is one child:

    files  rows  mode  first batch (s)  records/s  peak RSS (MB)

Targets (issue "Lakes of 100,000 files"): partitioned >= 0.9x one piece; records/s on 20-row
files >= 0.7x the demo lake's; peak RSS at 20,000 files <= 1.3x at 1,000.

Then the same 20-row files on S3: 5,000 of them (1,000 with ``--quick``) on moto (``python -m
moto.server``) behind a proxy that adds 20 ms to every request and counts them
(``tests/s3proxy.py``). One copy in one piece: requests per file before the first batch
(target <= 2), time to first batch (target < 10 s), requests per file over the job (target
<= 3).

Wide tables: a 200-column file of 200,000 rows in one row group (pyarrow's default writer
settings) against the 12-column demo lake of as many records, each read with a null sink
(``Lake.batches`` + ``CopyEngine.prepare``: validation, BSON, hash; nothing written) in a
fresh child: records/s, client µs per record and peak RSS (VmHWM). ``--quick``: 50,000 rows.
Then wide CSV files as a user copies them: ``lakesync copy`` (its own exec'd process, peak
by /usr/bin/time) of 100,000 columns x 3 rows and 20,000 columns x 50 rows into the embedded
server, three runs each: min/median/max peak RSS; a peak over ``WIDE_CSV_LIMIT_MB`` fails
the bench (the copy of 100,000 columns peaked ~0.5 GB before its encoder, row counts and
key reads were bounded by the columns they need).

Run: ``.venv/bin/python bench/scale.py [--quick]`` (``make bench`` runs it).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROWS_PER_FILE = 20
TIME = shutil.which("time", path="/usr/bin:/bin")
WIDE_COLUMNS = 200


def measured(
    cmd: list[str],
    env: dict[str, str] | None = None,
    trace: Path | None = None,
    progress: Any = None,
) -> tuple[str, float]:
    """Run ``cmd`` as its own exec'd process; its stdout's last line and its own peak RSS (MB).

    The peak is ``/usr/bin/time``'s (``%M``, from wait4 of the child it forks and execs): a
    child exec'd straight from this process would report *this* process's peak too, as
    Linux carries ``ru_maxrss`` over fork and exec (the old 301 MB on every row).

    With ``trace``, the measured process's VmHWM and VmRSS (``/proc/<pid>/status``) are
    also appended there every 5 s with ``progress()``'s answer (e.g. records written so
    far): a run stopped before its end still tells its peak through the phase it reached.
    """
    if TIME is None:
        raise SystemExit("bench/scale.py needs /usr/bin/time (apt-get install time)")
    with tempfile.NamedTemporaryFile("r", suffix=".rss") as out:
        wrapped = [TIME, "-f", "%M", "-o", out.name, *cmd]
        proc = subprocess.Popen(
            wrapped, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )
        stop = threading.Event()
        sampler = None
        if trace is not None:
            sampler = threading.Thread(target=_trace, args=(proc.pid, trace, progress, stop))
            sampler.start()
        try:
            stdout, stderr = proc.communicate()
        finally:
            stop.set()
            if sampler is not None:
                sampler.join()
        if proc.returncode != 0:
            raise SystemExit(f"child failed ({proc.returncode}): {stderr[-2000:]}")
        peak = int(out.read().split()[-1]) / 1024  # kB
    return stdout.strip().splitlines()[-1], peak


def _trace(time_pid: int, trace: Path, progress: Any, stop: threading.Event) -> None:
    """Append ``seconds VmHWM-MB VmRSS-MB progress`` of /usr/bin/time's child every 5 s."""
    started = time.perf_counter()
    pid = None
    with trace.open("a") as log:
        while not stop.wait(5):
            try:
                if pid is None:
                    kids = Path(f"/proc/{time_pid}/task/{time_pid}/children").read_text()
                    pid = int(kids.split()[0]) if kids.split() else None
                    if pid is None:
                        continue
                fields = dict(
                    line.split(":", 1)
                    for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                )
                hwm = int(fields["VmHWM"].split()[0]) / 1024
                rss = int(fields["VmRSS"].split()[0]) / 1024
            except (OSError, ValueError, KeyError):  # not started yet, or ended (a zombie)
                continue
            note = progress() if progress is not None else ""
            log.write(f"{time.perf_counter() - started:8.0f} s  VmHWM {hwm:7.1f} MB  "
                      f"VmRSS {rss:7.1f} MB  {note}\n")  # fmt: skip
            log.flush()


def make_small_files(src: Path, out: Path, files: int) -> Path:
    """``files`` Parquet files of ROWS_PER_FILE records each, cut from the demo lake ``src``."""
    table = pq.read_table(src).slice(0, files * ROWS_PER_FILE)
    out.mkdir(parents=True)
    for i in range(files):
        piece = table.slice(i * ROWS_PER_FILE, ROWS_PER_FILE)
        pq.write_table(piece, out / f"part-{i:06d}.parquet")
    return out


def child(lake: str, uri: str, partitioned: bool) -> dict[str, Any]:
    """One copy, in this (fresh) process: first batch, rate and peak RSS."""
    from lakesync.config import load_settings
    from lakesync.runtime import Runtime

    settings = load_settings(
        mongodb_uri=uri,
        database="scale_" + uuid.uuid4().hex[:10],
        data_dir=Path(tempfile.mkdtemp()),
        lake_uri=lake,
        workers=2,
        partition_rows=50_000 if partitioned else 10**9,
    )
    with Runtime(settings, executor="local") as rt:
        rt.start()
        started = time.perf_counter()
        job, _ = rt.jobs.start("copy-taskdetail", {}, trusted=True)
        first = None
        while True:
            status = rt.store.get(job.jobId)
            if first is None and status.processedRecords > 0:
                first = time.perf_counter() - started
            if status.state.is_final:
                break
            time.sleep(0.05)
        elapsed = time.perf_counter() - started
        rt.mongo.client.drop_database(settings.database)
    if status.status != "completed":
        raise SystemExit(f"copy did not complete: {status.message} {status.error}")
    return {
        "firstBatch": round(first or elapsed, 2),
        "rate": round(status.processedRecords / elapsed),
        "records": status.processedRecords,
        "partitions": status.partitions or 1,
    }


def make_repeating(src: Path, out: Path, share: float = 0.3, seed: int = 1) -> Path:
    """The lake ``src`` with ``share`` of its records given the key of a random record of
    the next file (the last file: of the first): keys that repeat across files."""
    rng = np.random.default_rng(seed)
    files = sorted(src.rglob("*.parquet"))
    for i, path in enumerate(files):
        table = pq.read_table(path)
        groups = pq.ParquetFile(path).metadata.num_row_groups
        donor = pq.read_table(files[(i + 1) % len(files)], columns=["taskDetailId"])
        keys = table["taskDetailId"].to_numpy(zero_copy_only=False).copy()
        pick = np.flatnonzero(rng.random(len(keys)) < share)
        given = donor["taskDetailId"].to_numpy(zero_copy_only=False)
        keys[pick] = given[rng.integers(0, len(given), len(pick))]
        at = table.schema.get_field_index("taskDetailId")
        table = table.set_column(at, table.schema.field(at), pa.array(keys, pa.string()))
        dest = out / path.relative_to(src)
        dest.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, dest, row_group_size=-(-table.num_rows // groups))
        del table, donor, keys, given
    return out


def copy_rss(
    work: Path,
    uri: str,
    sizes: list[int],
    kinds: tuple[str, ...] = ("unique", "repeated"),
    trace: Path | None = None,
    source: Path | None = None,
) -> list[dict[str, Any]]:
    """``lakesync copy`` (the CLI, its own exec'd process) of a lake of unique keys and of
    one where 30% of the records repeat a key of another file, at each size: its peak RSS."""
    from pymongo import MongoClient

    from lakesync.demo import generate

    results: list[dict[str, Any]] = []
    client: MongoClient[dict[str, Any]] = MongoClient(uri)
    try:
        for rows in sizes:
            unique = work / f"unique-{rows}"
            if source is not None:  # the same lake, made before (a rerun, or a second kind)
                unique = source
            else:
                # files of about the same size at every lake size (the largest project's of
                # ~18,000 records): the lake grows in files, as a lake does
                generate(unique, rows, seed=5, files_per_partition=max(1, rows // 100_000))
            lakes: dict[str, Path] = {}
            if "unique" in kinds:
                lakes["unique keys"] = unique
            if "repeated" in kinds:
                lakes["30% repeated"] = make_repeating(unique, work / f"rep-{rows}")
            for kind, lake in lakes.items():
                database = "rss_" + uuid.uuid4().hex[:10]
                env = {
                    **os.environ,
                    "LAKESYNC_MONGODB_URI": uri,
                    "LAKESYNC_DATABASE": database,
                    "LAKESYNC_DATA_DIR": str(work / f"data-{database}"),
                    "LAKESYNC_LOG_LEVEL": "WARNING",
                }
                cmd = [sys.executable, "-m", "lakesync", "copy", "copy-taskdetail",
                       "--source", str(lake), "--json"]  # fmt: skip
                log = None
                if trace is not None:
                    log = trace / f"rss-{kind.split()[0].replace('%', '')}-{rows}.log"
                    log.write_text(f"{kind}, {rows:,} records: lakesync copy's memory\n")

                def written(db: str = database) -> str:
                    try:
                        n = client[db]["taskdetails"].estimated_document_count()
                    except Exception as e:  # a sample, not the measure
                        return f"({type(e).__name__})"
                    return f"copy: {n:,} written" if n else "listing/plan (nothing written yet)"

                started = time.perf_counter()
                out, peak = measured(cmd, env, log, written)
                seconds = time.perf_counter() - started
                client.drop_database(database)
                final = json.loads(out)
                if final["status"] != "completed" or final["processedRecords"] != rows:
                    raise SystemExit(f"{kind} copy of {rows:,}: {final['status']} {final}")
                r = {
                    "kind": kind,
                    "records": rows,
                    "rssMB": round(peak, 1),
                    "inserted": final["insertedRecords"],
                    "duplicates": final["duplicateRecords"],
                    "rate": round(rows / seconds),
                }
                results.append(r)
                print(f"  {kind:<14}{rows:>12,}{peak:>9.1f} MB{r['inserted']:>12,}"
                      f"{r['duplicates']:>12,}{r['rate']:>11,}", flush=True)  # fmt: skip
            for lake in lakes.values():
                if lake != source:
                    shutil.rmtree(lake, ignore_errors=True)
    finally:
        client.close()
    return results


def rss_section(
    work: Path,
    uri: str,
    sizes: list[int],
    kinds: tuple[str, ...],
    trace: Path | None = None,
    source: Path | None = None,
) -> None:
    """The copy peak RSS section: one row per copy, then the ratios against the smallest."""
    print(f"\ncopy peak RSS: `lakesync copy` in its own exec'd process, read by /usr/bin/time "
          f"(wait4 of that process); the embedded server is a separate process\n"
          f"  {'lake':<14}{'records':>12}{'peak RSS':>12}{'inserted':>12}{'duplicates':>12}"
          f"{'records/s':>11}")  # fmt: skip
    results = copy_rss(work, uri, sizes, kinds, trace, source)
    limits = {1_000_000: 1.15, 10_000_000: 1.3}
    for kind in ("unique keys", "30% repeated"):
        runs = {r["records"]: r["rssMB"] for r in results if r["kind"] == kind}
        if not runs:
            continue
        base = min(runs)
        for rows, peak in sorted(runs.items()):
            if rows == base:
                continue
            limit = limits.get(rows)
            target = f" (<= {limit})" if limit else ""
            print(f"{kind}: peak RSS at {rows:,} / at {base:,}: {peak / runs[base]:.2f}{target}")


def make_wide(out: Path, rows: int, columns: int) -> Path:
    """One Parquet file of ``rows`` x ``columns`` in a single row group: an ``id`` key, then
    int64, float64, string (1,000 distinct) and bool columns in turn; default writer settings."""
    rng = np.random.default_rng(0)
    data: dict[str, Any] = {"id": np.arange(rows, dtype=np.int64)}
    words = np.array([f"value-{i}" for i in range(1000)], dtype=object)
    for c in range(1, columns):
        kind = c % 4
        if kind == 0:
            data[f"c{c:03d}"] = rng.integers(0, 10**9, rows)
        elif kind == 1:
            data[f"c{c:03d}"] = rng.random(rows)
        elif kind == 2:
            data[f"c{c:03d}"] = pa.array(words[rng.integers(0, 1000, rows)], pa.string())
        else:
            data[f"c{c:03d}"] = rng.integers(0, 2, rows).astype(bool)
    out.mkdir(parents=True)
    pq.write_table(pa.table(data), out / "wide.parquet", row_group_size=rows)
    return out


def child_nullsink(lake: str, key: str) -> dict[str, Any]:
    """Read, validate, encode and hash the lake with nothing written (a fresh process)."""
    from lakesync.copy import CopyEngine
    from lakesync.lake import Lake
    from lakesync.operations import COPY_TASKDETAIL
    from lakesync.schema import RecordSchema

    schema = RecordSchema(key=key, keepExtra=True)
    if key == "taskDetailId":
        schema = COPY_TASKDETAIL.schema_
    engine: Any = CopyEngine(None, None, schema, "bench")  # type: ignore[arg-type]
    cpu, started = time.process_time(), time.perf_counter()
    records = valid = 0
    lake_ = Lake.open(lake)
    for batch in lake_.batches(1000):
        valid += len(engine.prepare(batch).digests)
        records += batch.table.num_rows
    seconds = time.perf_counter() - started
    if valid != records:
        raise SystemExit(f"{records - valid} of {records} records rejected")
    return {
        "records": records,
        "columns": len(lake_.schema),
        "rate": round(records / seconds),
        "cpuUs": round((time.process_time() - cpu) / records * 1e6, 1),
    }


def run_nullsink(lake: Path, key: str) -> dict[str, Any]:
    out, peak = measured([sys.executable, __file__, "--nullsink", str(lake), key])
    return {**json.loads(out), "rssMB": round(peak)}


def wide_tables(work: Path, rows: int) -> None:
    """The wide-table section: 200 columns against 12, same records, null sink."""
    from lakesync.demo import generate

    narrow = work / "narrow"
    generate(narrow, rows, seed=5)
    wide = make_wide(work / "wide", rows, WIDE_COLUMNS)
    group = pq.ParquetFile(wide / "wide.parquet").metadata.row_group(0)
    results = [
        ("12 columns", run_nullsink(narrow, "taskDetailId")),
        (f"{WIDE_COLUMNS} columns", run_nullsink(wide, "id")),
    ]
    print(
        f"\nwide tables: {rows:,} records, null sink (read + validate + BSON + hash, nothing "
        f"written), batch size 1,000; the {WIDE_COLUMNS}-column file is one row group of "
        f"{group.total_byte_size / 1e6:,.0f} MB decoded"
    )
    print(f"{'lake':<14}{'records':>9}{'records/s':>11}{'client µs/rec':>15}{'peak RSS':>10}")
    for name, r in results:
        row = f"{name:<14}{r['records']:>9,}{r['rate']:>11,}{r['cpuUs']:>15.1f}"
        print(f"{row}{r['rssMB']:>7} MB")


#: (columns, rows) of the wide CSV files copied, and the peak a copy of each may reach
WIDE_CSV = [(100_000, 3), (20_000, 50)]
WIDE_CSV_LIMIT_MB = 400


def make_wide_csv(out: Path, columns: int, rows: int) -> Path:
    """A CSV file of an ``id`` key and ``columns - 1`` integer columns."""
    out.mkdir(parents=True)
    with (out / "wide.csv").open("w") as f:
        f.write("id," + ",".join(f"c{i}" for i in range(columns - 1)) + "\n")
        for r in range(rows):
            f.write(f"k{r}," + ",".join(str(r + i) for i in range(columns - 1)) + "\n")
    return out


def wide_csv_copies(work: Path, runs: int = 3) -> list[tuple[str, list[float]]]:
    """``lakesync copy`` of each ``WIDE_CSV`` file, ``runs`` times into a new database: the
    peak RSS of each run (MB). Each run makes its grouped copy anew (a scratch folder of its
    own), as the first copy of a file does."""
    from lakesync.mongo import EmbeddedServer

    server = EmbeddedServer(work / "mongo").start()
    results = []
    try:
        for columns, rows in WIDE_CSV:
            lake = make_wide_csv(work / f"csv-{columns}", columns, rows)
            (work / "lakesync.toml").write_text(
                f'[operations.wide]\nsource = "{lake}"\nformat = "csv"\n'
                'collection = "wide"\nkey = "id"\n'
            )
            peaks = []
            for _ in range(runs):
                database = "wide_" + uuid.uuid4().hex[:10]
                scratch = Path(tempfile.mkdtemp(dir=work))
                env = {
                    **os.environ,
                    "LAKESYNC_MONGODB_URI": server.uri,
                    "LAKESYNC_DATABASE": database,
                    "LAKESYNC_DATA_DIR": str(work / f"data-{database}"),
                    "LAKESYNC_OPERATIONS_FILE": str(work / "lakesync.toml"),
                    "LAKESYNC_LOG_LEVEL": "WARNING",
                    "TMPDIR": str(scratch),
                }
                cmd = [sys.executable, "-m", "lakesync", "copy", "wide", "--json"]
                out, peak = measured(cmd, env)
                final = json.loads(out)
                if final["status"] != "completed" or final["insertedRecords"] != rows:
                    raise SystemExit(f"wide CSV copy of {columns:,} columns: {final}")
                peaks.append(peak)
                shutil.rmtree(scratch, ignore_errors=True)
            results.append((f"{columns:,} x {rows}", peaks))
    finally:
        server.stop()
    return results


def wide_csv_section(work: Path) -> None:
    print(
        "\nwide CSV: `lakesync copy` (its own exec'd process, /usr/bin/time) into the embedded "
        f"server, 3 runs; a peak over {WIDE_CSV_LIMIT_MB} MB fails the bench"
    )
    print(f"{'columns x rows':<18}{'min':>8}{'median':>9}{'max':>8}  (peak RSS, MB)")
    over = []
    for name, peaks in wide_csv_copies(work):
        low, mid, high = min(peaks), statistics.median(peaks), max(peaks)
        print(f"{name:<18}{low:>8.0f}{mid:>9.0f}{high:>8.0f}")
        if high > WIDE_CSV_LIMIT_MB:
            over.append(f"{name}: {high:.0f} MB")
    if over:
        raise SystemExit(f"wide CSV copies over {WIDE_CSV_LIMIT_MB} MB: {', '.join(over)}")


def run_child(lake: Path, uri: str, partitioned: bool) -> dict[str, Any]:
    args = [sys.executable, __file__, "--child", str(lake), uri, "1" if partitioned else "0"]
    out, peak = measured(args)
    return {**json.loads(out), "rssMB": round(peak)}


def s3_case(src: Path, files: int, mongo_uri: str, delay: float = 0.02) -> dict[str, Any]:
    """One copy of ``files`` 20-row files from moto behind a counting, delaying proxy.

    The proxy runs in this process and the copy in a child (``s3_child``), as a real S3
    would not share lakesync's interpreter: in one process the proxy's Python threads and
    lakesync's took turns at one GIL. Before the copy, a second child fetches every file
    once (botocore, 32 at a time, as the open does): how fast moto behind the proxy can
    answer one request per file on this machine, the floor under the time to first batch.
    """
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import boto3
    import httpx
    from tests.s3proxy import CountingProxy

    os.environ["AWS_ACCESS_KEY_ID"] = os.environ["AWS_SECRET_ACCESS_KEY"] = "testing"
    os.environ["AWS_EC2_METADATA_DISABLED"] = "true"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    moto = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(300):
            try:
                httpx.get(f"{url}/moto-api/", timeout=1)
                break
            except httpx.HTTPError:
                time.sleep(0.1)
        s3 = boto3.client("s3", endpoint_url=url, region_name="us-east-1")
        s3.create_bucket(Bucket="lake")
        for path in sorted(src.glob("*.parquet"))[:files]:
            s3.put_object(Bucket="lake", Key=f"tasks/{path.name}", Body=path.read_bytes())
        proxy = CountingProxy(("127.0.0.1", port), delay=delay)
        floor = json.loads(_run([__file__, "--s3-fetch", proxy.url]))
        proxy.reset()
        samples: list[tuple[float, int]] = []  # (time.time(), requests so far)
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                samples.append((time.time(), proxy.total))
                time.sleep(0.01)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        result = json.loads(_run([__file__, "--s3-child", proxy.url, mongo_uri]))
        stop.set()
        sampler.join()
        total, counts = proxy.total, dict(proxy.counts)
        proxy.close()
    finally:
        moto.kill()
        moto.wait(10)

    def requests_at(moment: float) -> int:
        return max((n for t, n in samples if t <= moment), default=0)

    started = result["started"]
    return {
        "files": files,
        "records": result["records"],
        "firstBatch": round(result["first"] - started, 2),
        "beforeFirstPerFile": round(requests_at(result["first"]) / files, 2),
        "planned": round(result["planned"] - started, 2),
        "beforeCopyPerFile": round(requests_at(result["planned"]) / files, 2),
        "totalPerFile": round(total / files, 2),
        "requests": counts,
        "rate": round(result["records"] / (result["ended"] - started)),
        "seconds": round(result["ended"] - started, 1),
        "floorSeconds": floor["seconds"],
        "floorRate": round(floor["objects"] / floor["seconds"]),
    }


def _run(args: list[str]) -> str:
    out = subprocess.run([sys.executable, *args], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"child failed: {out.stderr[-2000:]}")
    return out.stdout.strip().splitlines()[-1]


def s3_fetch(url: str) -> dict[str, Any]:
    """Every object of s3://lake/tasks fetched once, 32 at a time, as the open fetches them."""
    from concurrent.futures import ThreadPoolExecutor

    import boto3

    from lakesync.locations import WholeObjects

    objects = WholeObjects(url, "us-east-1")
    s3 = boto3.client("s3", endpoint_url=url, region_name="us-east-1")
    keys = [
        o["Key"]
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket="lake", Prefix="tasks/")
        for o in page.get("Contents", [])
    ]
    started = time.perf_counter()
    with ThreadPoolExecutor(32) as pool:
        list(pool.map(lambda key: objects.get(f"lake/{key}"), keys))
    return {"objects": len(keys), "seconds": round(time.perf_counter() - started, 2)}


def s3_child(url: str, mongo_uri: str) -> dict[str, Any]:
    """The S3 copy, in this (fresh) process: wall-clock moments of its start, plan, first
    batch and end, for the parent to match with the proxy's counts."""
    from lakesync.config import load_settings
    from lakesync.runtime import Runtime

    settings = load_settings(
        mongodb_uri=mongo_uri,
        database="scale_" + uuid.uuid4().hex[:10],
        data_dir=Path(tempfile.mkdtemp()),
        lake_uri="s3://lake/tasks",
        s3_endpoint_url=url,
        s3_region="us-east-1",
    )
    with Runtime(settings) as rt:
        job, _ = rt.jobs.start("copy-taskdetail", {}, trusted=True)
        moments: dict[str, float] = {"started": time.time()}

        def progress(status: Any) -> None:
            moments.setdefault("planned", time.time())  # the lake is opened, the plan made
            if status.processedRecords:
                moments.setdefault("first", time.time())

        rt.runner.run(job.jobId, on_progress=progress)
        moments["ended"] = time.time()
        status = rt.jobs.get(job.jobId)
        rt.mongo.client.drop_database(settings.database)
    if status.status != "completed":
        raise SystemExit(f"S3 copy did not complete: {status.message} {status.error}")
    return {**moments, "records": status.processedRecords}


def local_rows(rows: list[tuple[str, str, dict[str, Any]]], sizes: list[int]) -> None:
    """The local lakes' table and their ratios."""
    print(f"{'lake':<14}{'mode':<13}{'records':>9}{'parts':>6}{'first batch':>13}"
          f"{'records/s':>11}{'peak RSS':>10}")  # fmt: skip
    for lake_name, mode, r in rows:
        print(f"{lake_name:<14}{mode:<13}{r['records']:>9,}{r['partitions']:>6}"
              f"{r['firstBatch']:>12.2f}s{r['rate']:>11,}{r['rssMB']:>8} MB")  # fmt: skip
    by = {(name, mode): r for name, mode, r in rows}
    n = max(sizes)
    name = f"{n:,} x 20"
    ones = [r["rate"] for lake, mode, r in rows if (lake, mode) == (name, "one piece")]
    parts = [r["rate"] for lake, mode, r in rows if (lake, mode) == (name, "partitioned")]
    if len(ones) > 1:
        ratios = sorted(p / o for p, o in zip(parts, ones, strict=True))
        print(f"partitioned / one piece at {n:,} files, {len(ratios)} alternated pairs: min "
              f"{ratios[0]:.2f}, median {statistics.median(ratios):.2f}, max {ratios[-1]:.2f} "
              f"(load average now {os.getloadavg()[0]:.1f})")  # fmt: skip
    one, part = by[(f"{n:,} x 20", "one piece")], by[(f"{n:,} x 20", "partitioned")]
    if len(ones) < 2:  # else the alternated pairs above
        print(f"\npartitioned / one piece at {n:,} files: {part['rate'] / one['rate']:.2f} "
              "(>= 0.9)")  # fmt: skip
    small, demo = by.get(("5,000 x 20", "one piece")), by.get(("demo files", "one piece"))
    if small and demo:
        print(f"20-row files / demo files (100,000 records): {small['rate'] / demo['rate']:.2f} "
              "(>= 0.7)")  # fmt: skip
    if first := by.get(("1,000 x 20", "one piece")):
        print(f"peak RSS {n:,} / 1,000 files: {one['rssMB'] / first['rssMB']:.2f} (<= 1.3)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1,000 and 5,000 files only")
    parser.add_argument("--skip-s3", action="store_true", help="no S3 (moto) section")
    parser.add_argument("--s3-only", action="store_true", help="only the S3 (moto) section")
    parser.add_argument("--wide-only", action="store_true", help="the wide-table section only")
    parser.add_argument("--rss-only", action="store_true", help="the copy peak RSS section only")
    parser.add_argument("--wide-csv-only", action="store_true", help="the wide CSV copies only")
    parser.add_argument("--reps", type=int, default=1, help="alternated pairs at the most files")
    parser.add_argument("--files", help="lake sizes in files, e.g. 1000,20000 (5,000 is added)")
    parser.add_argument("--local-only", action="store_true", help="the local lakes section only")
    parser.add_argument(
        "--rss-rows",
        default="100000,1000000",
        help="lake sizes of the copy peak RSS section (add 10000000 for the 10M figure)",
    )
    parser.add_argument("--rss-10m", action="store_true", help="also copy 10,000,000 records")
    parser.add_argument("--rss-lakes", default="unique,repeated", help="unique,repeated or one")
    parser.add_argument(
        "--rss-trace",
        type=Path,
        help="a folder: every 5 s, each measured copy's VmHWM/VmRSS and records written",
    )
    parser.add_argument("--workdir", type=Path, help="lakes and server files here (kept)")
    parser.add_argument(
        "--rss-source",
        type=Path,
        help="the unique-keys lake of one --rss-rows size, made before (kept; not generated)",
    )
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--nullsink", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--s3-child", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--s3-fetch", help=argparse.SUPPRESS)
    ns = parser.parse_args()
    if ns.s3_child:
        print(json.dumps(s3_child(*ns.s3_child)))
        return 0
    if ns.s3_fetch:
        print(json.dumps(s3_fetch(ns.s3_fetch)))
        return 0
    if ns.child:
        print(json.dumps(child(ns.child[0], ns.child[1], ns.child[2] == "1")))
        return 0
    if ns.nullsink:
        print(json.dumps(child_nullsink(*ns.nullsink)))
        return 0
    if ns.wide_csv_only:
        work = Path(tempfile.mkdtemp(prefix="lakesync-wide-", dir=ns.workdir))
        try:
            wide_csv_section(work)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return 0
    if not (ns.wide_only or ns.rss_only):
        local_and_s3(ns)
    if not (ns.s3_only or ns.wide_only or ns.local_only):
        sizes = sorted(
            {int(x) for x in ns.rss_rows.split(",")} | ({10**7} if ns.rss_10m else set())
        )
        if ns.quick:
            sizes = [s for s in sizes if s <= 100_000] or sizes[:1]
        from lakesync.mongo import EmbeddedServer

        work = Path(tempfile.mkdtemp(prefix="lakesync-rss-", dir=ns.workdir))
        server = EmbeddedServer(work / "mongo").start()
        try:
            kinds = tuple(ns.rss_lakes.split(","))
            if ns.rss_source is not None and len(sizes) != 1:
                raise SystemExit("--rss-source is the lake of one size: give one --rss-rows")
            rss_section(work, server.uri, sizes, kinds, ns.rss_trace, ns.rss_source)
        finally:
            server.stop()
            shutil.rmtree(work, ignore_errors=True)
    if not (ns.s3_only or ns.rss_only or ns.local_only):
        work = Path(tempfile.mkdtemp(prefix="lakesync-wide-"))
        try:
            wide_tables(work, 50_000 if ns.quick else 200_000)
            wide_csv_section(work)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return 0


def local_and_s3(ns: argparse.Namespace) -> None:
    """The local lakes of many files and the S3 section."""
    from lakesync.demo import generate
    from lakesync.mongo import EmbeddedServer

    sizes = [5000] if ns.s3_only else [1000, 5000] if ns.quick else [1000, 5000, 20000]
    if ns.files:  # the S3 section reads the 5,000-file lake
        sizes = sorted({*(() if ns.skip_s3 else (5000,)), *(int(x) for x in ns.files.split(","))})
    work = Path(tempfile.mkdtemp(prefix="lakesync-scale-"))
    server = EmbeddedServer(work / "mongo").start()
    try:
        demo = work / "demo"
        generate(demo, max(sizes) * ROWS_PER_FILE, seed=5)
        lakes = {n: make_small_files(demo, work / f"files{n}", n) for n in sizes}
        rows: list[tuple[str, str, dict[str, Any]]] = []
        if not ns.s3_only and 5000 in sizes:  # the 5,000 files' records in the demo's files
            big = work / "demo100k"
            generate(big, 5000 * ROWS_PER_FILE, seed=5)  # the demo lake's files, 100,000 records
            rows.append(("demo files", "one piece", run_child(big, server.uri, False)))
        for n, lake in ({} if ns.s3_only else lakes).items():
            reps = ns.reps if n == max(sizes) else 1
            for rep in range(reps):  # alternated: one piece first, then partitioned first
                for partitioned in (False, True) if rep % 2 == 0 else (True, False):
                    mode = "partitioned" if partitioned else "one piece"
                    rows.append((f"{n:,} x 20", mode, run_child(lake, server.uri, partitioned)))
        s3 = None if ns.skip_s3 else s3_case(lakes[5000], 1000 if ns.quick else 5000, server.uri)
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    if rows:
        local_rows(rows, sizes)
    if s3 is not None:
        print(
            f"\nS3 (moto behind a proxy adding 20 ms per request), {s3['files']:,} files x 20 "
            f"rows, one piece: {s3['records']:,} records in {s3['seconds']} s "
            f"({s3['rate']:,}/s); requests {s3['requests']}\n"
            f"requests per file before the first batch: {s3['beforeFirstPerFile']} (<= 2)\n"
            f"time to first batch: {s3['firstBatch']} s (< 10 s); moto behind the proxy "
            f"answers one GET per file in {s3['floorSeconds']} s ({s3['floorRate']:,}/s), "
            "the floor under it on this machine\n"
            f"lake opened and plan made (the copy starts) after {s3['planned']} s, "
            f"{s3['beforeCopyPerFile']} requests per file\n"
            f"requests per file over the job: {s3['totalPerFile']} (<= 3)"
        )


if __name__ == "__main__":
    os.environ.setdefault("LAKESYNC_LOG_LEVEL", "WARNING")
    raise SystemExit(main())
