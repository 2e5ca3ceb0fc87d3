"""lakesync benchmark: copy throughput against the peers, memory, and API latency under load.

One command (``make bench``, or ``.venv/bin/python bench/run.py [--quick]``) does, in one
run, on one MongoDB-wire server and one generated demo lake (no bad rows, so every mode
writes exactly the same records):

  (a) raw baseline: pymongo ``bulk_write(ordered=False)`` of ``UpdateOne({_id}, {$set: doc},
      upsert=True)`` over the same batches lakesync reads, no status tracking. The documents
      and operations are built before the clock starts: this is the server's upsert limit.
  (b) the peer: PyMongoArrow ``write()`` of the same records as one Arrow table (read before
      the clock starts) into an empty collection, insert-only. If it fails, the reason is
      reported and ``insert_many`` of the same documents is measured instead, labelled.
  (c) ``lakesync copy`` into an empty collection through the real job path (Runtime,
      jobs.start, runner.run, in-process): reading, validation, counting, status updates and
      checkpoints are all inside the measured time.
  (d) the same copy again: every record unchanged.
  (e) the copy after 10% of the records changed (``lakesync.demo.touch_records``).
  (f) the read-and-validate pipeline alone (Lake.batches -> validate -> content hash) with a
      null sink, in a fresh subprocess pinned to one CPU.

(a), (b) and (c) are measured ``--reps`` times, interleaved ((b) and (c) back to back,
each first in turn; (a) and (m) rotated around them), each into a fresh database;
the table shows the best of each (noise on a shared machine only ever slows a run down)
and lists every sample. Then: peak RSS of fresh subprocesses over 100,000 and 1,000,000
records, GET /api/jobs/{id} latency with 50 concurrent pollers while a copy runs under
``python -m lakesync serve``, and the time from POST /api/jobs to its 202 with a
1,000,000-row lake.

The embedded server (nx-27017) is started unless LAKESYNC_MONGODB_URI is set.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.metadata
import json
import logging
import os
import platform
import random
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import bson
import httpx
import psutil
import pyarrow as pa
import pyarrow.dataset as ds
from bson.raw_bson import RawBSONDocument
from pymongo import MongoClient, UpdateOne
from pymongo.database import Database

from lakesync.config import Settings, load_settings
from lakesync.copy import MARKER, CopyEngine, digest
from lakesync.demo import generate, touch_records
from lakesync.lake import Lake, LakeBatch
from lakesync.masking import masked
from lakesync.models import JobState, JobStatus
from lakesync.mongo import EmbeddedServer
from lakesync.runtime import Runtime
from lakesync.schema import TASK_DETAIL, validate

Doc = dict[str, Any]
OPERATION = "copy-taskdetail"
COLLECTION = "taskdetails"  # the operation's target collection
DEFAULT_BATCH = Settings.model_fields["batch_size"].default

log = logging.getLogger("bench")


# -- results ----------------------------------------------------------------------------


@dataclass
class Measure:
    """One timed run of one mode."""

    key: str
    label: str
    records: int
    seconds: float
    note: str = ""
    samples: list[int] = field(default_factory=list)  # records/s of every repetition
    client_cpu: float | None = None  # CPU seconds of this process (all threads)
    server_cpu: float | None = None  # CPU seconds of the embedded server meanwhile
    cpu_pressure: float | None = None  # PSI "some": share of the run with a task short of CPU

    @property
    def rate(self) -> float:
        return self.records / self.seconds if self.seconds > 0 else 0.0


@dataclass
class Report:
    """Everything one run measured; printed as a table and optionally saved as JSON."""

    machine: dict[str, Any]
    settings: dict[str, Any]
    rows: list[Measure] = field(default_factory=list)
    memory: list[dict[str, Any]] = field(default_factory=list)
    latency: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    targets: list[tuple[str, bool | None, str]] = field(default_factory=list)

    def row(self, key: str) -> Measure | None:
        return next((r for r in self.rows if r.key == key), None)


def content_hash(doc: dict[str, Any]) -> str:
    """A document's content hash as the copy engine stores it in its marker."""
    return digest(bson.encode(doc))


# -- the machine and the server -----------------------------------------------------------


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    freq = psutil.cpu_freq()
    return {
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "cpu": cpu,
        "cores": os.cpu_count(),
        "cpu_mhz": round(freq.current) if freq else None,
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "versions": {
            d: _version(d) for d in ("lakesync", "pymongo", "pyarrow", "pymongoarrow", "nx-27017")
        },
    }


@contextlib.contextmanager
def mongodb(workdir: Path) -> Iterator[tuple[str, str]]:
    """(uri, description): LAKESYNC_MONGODB_URI, or a fresh embedded nx-27017 server."""
    uri = os.environ.get("LAKESYNC_MONGODB_URI", "").strip()
    if uri:
        yield uri, f"LAKESYNC_MONGODB_URI={masked(uri)}"
        return
    server = EmbeddedServer(workdir / "server").start()
    Clock.server = psutil.Process(server.process.pid) if server.process else None
    try:
        yield server.uri, f"embedded nx-27017 {_version('nx-27017')} (SQLite, single writer)"
    finally:
        server.stop()


def client_for(uri: str) -> MongoClient[Doc]:
    return MongoClient(uri, tz_aware=True, serverSelectionTimeoutMS=10_000)


class Databases:
    """A fresh database per measurement, dropped at the end."""

    def __init__(self, client: MongoClient[Doc]) -> None:
        self.client = client
        self.prefix = f"lsbench_{uuid.uuid4().hex[:6]}"
        self.made: list[str] = []

    def new(self, label: str) -> str:
        name = f"{self.prefix}_{label}_{len(self.made)}"
        self.made.append(name)
        return name

    def drop_all(self) -> None:
        for name in self.made:
            with contextlib.suppress(Exception):
                self.client.drop_database(name)


# -- the lake -----------------------------------------------------------------------------


def make_lake(out: Path, rows: int) -> Path:
    started = time.perf_counter()
    summary = generate(out, rows, bad_rows=0, seed=0)
    log.info("lake: %d rows in %d files (%.1f s)", rows, summary.files, _since(started))
    return out


def lake_batches(lake_dir: Path, batch_size: int) -> list[list[Doc]]:
    """The documents lakesync writes, batch by batch (without its marker)."""
    lake = Lake.open(str(lake_dir))
    return [validate(TASK_DETAIL, b.table).documents for b in lake.batches(batch_size)]


def lake_table(lake_dir: Path) -> pa.Table:
    """The whole lake as one table with ``_id`` = the key, as a PyMongoArrow user writes it."""
    table = ds.dataset(str(lake_dir), format="parquet", partitioning="hive").to_table()
    return table.append_column("_id", table["taskDetailId"])


def _since(started: float) -> float:
    return time.perf_counter() - started


@dataclass
class Timing:
    """Wall time of one measured run, and the CPU time the client and the server spent."""

    seconds: float
    client_cpu: float
    server_cpu: float | None
    cpu_pressure: float | None  # share of the time some runnable task waited for a CPU


def _cpu_stall_us() -> int | None:
    """Linux PSI: total microseconds in which some runnable task waited for a CPU."""
    try:
        first = Path("/proc/pressure/cpu").read_text().splitlines()[0]
    except (OSError, IndexError):
        return None
    return int(first.rsplit("total=", 1)[1])


class Clock:
    """Wall clock plus CPU time of this process and (embedded server only) of the server."""

    server: psutil.Process | None = None

    def __init__(self) -> None:
        self._wall = time.perf_counter()
        self._cpu = time.process_time()
        self._server = self._server_cpu()
        self._stall = _cpu_stall_us()

    def _server_cpu(self) -> float | None:
        if self.server is None:
            return None
        times = self.server.cpu_times()
        return float(times.user + times.system)

    def stop(self) -> Timing:
        wall, cpu, server = _since(self._wall), time.process_time() - self._cpu, self._server_cpu()
        used = None if server is None or self._server is None else server - self._server
        stall, before = _cpu_stall_us(), self._stall
        pressure = None if stall is None or before is None else (stall - before) / 1e6 / wall
        return Timing(wall, cpu, used, pressure)


# -- (a) (b) (c) (d) (e) --------------------------------------------------------------------


def run_raw(db: Database[Doc], batches: list[list[Doc]]) -> Timing:
    """(a): bulk upserts with $set, operations built before the clock starts."""
    ops = [
        [UpdateOne({"_id": d["_id"]}, {"$set": {k: v for k, v in d.items() if k != "_id"}},
                   upsert=True) for d in docs]
        for docs in batches
    ]  # fmt: skip
    coll = db[COLLECTION]
    upserted = 0
    clock = Clock()
    for chunk in ops:
        upserted += coll.bulk_write(chunk, ordered=False).upserted_count
    timing = clock.stop()
    expected = sum(len(b) for b in batches)
    if upserted != expected:
        raise RuntimeError(f"(a) upserted {upserted} of {expected} records")
    return timing


_PEER: list[tuple[Callable[..., Any], int]] = []


def _pymongoarrow_write() -> tuple[Callable[..., Any], int]:
    """pymongoarrow.api.write, and how many binary-compatibility warnings its import gave."""
    if not _PEER:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            from pymongoarrow.api import write
        _PEER.append((write, sum("binary incompatibility" in str(w.message) for w in caught)))
    return _PEER[0]


def run_marked(db: Database[Doc], batches: list[list[Doc]]) -> Timing:
    """(m): insert_many of the documents lakesync stores (record + _lakesync marker), prebuilt
    as BSON: the server's limit for what an initial copy must write."""
    raw = [
        [RawBSONDocument(bson.encode({**d, MARKER: {"h": content_hash(d), "job": "job_bench",
                                                    "op": "i", "at": [i, j]}}))
         for j, d in enumerate(docs)]
        for i, docs in enumerate(batches)
    ]  # fmt: skip
    coll = db[COLLECTION]
    clock = Clock()
    for chunk in raw:
        coll.insert_many(chunk, ordered=False)
    return clock.stop()


def run_peer(db: Database[Doc], table: pa.Table, batches: list[list[Doc]]) -> tuple[Timing, str]:
    """(b): PyMongoArrow write() of the table; insert_many of the same documents if it fails."""
    coll = db[COLLECTION]
    try:
        write, abi_warnings = _pymongoarrow_write()
        clock = Clock()
        result = write(coll, table)
        timing = clock.stop()
        inserted = int(result.raw_result["insertedCount"])
        if inserted != table.num_rows:
            raise RuntimeError(f"write() inserted {inserted} of {table.num_rows} records")
        note = "pymongoarrow.api.write, one call"
        if abi_warnings:
            note += f" ({abi_warnings} pyarrow ABI warnings at import; count verified)"
        return timing, note
    except Exception as e:  # the peer failing is a result, not a crash of the benchmark
        reason = f"{type(e).__name__}: {str(e)[:200]}"
        log.warning("(b) PyMongoArrow write() failed (%s); measuring insert_many instead", reason)
        db.drop_collection(COLLECTION)
        clock = Clock()
        for docs in batches:
            coll.insert_many(docs, ordered=False)
        return clock.stop(), f"FALLBACK insert_many: pymongoarrow failed with {reason}"


def lakesync_settings(uri: str, database: str, workdir: Path, lake: Path, batch: int) -> Settings:
    return load_settings(
        mongodb_uri=uri, database=database, data_dir=workdir / "data", lake_uri=str(lake),
        batch_size=batch, log_level="WARNING",
    )  # fmt: skip


def run_copy(rt: Runtime) -> tuple[Timing, JobStatus]:
    """(c) (d) (e): one copy job through jobs.start + runner.run, timed end to end."""
    gc.collect()
    clock = Clock()
    status, created = rt.jobs.start(OPERATION, {})
    if not created:
        raise RuntimeError(f"a copy job is already active: {status.jobId}")
    rt.runner.run(status.jobId)
    timing = clock.stop()
    final = rt.jobs.get(status.jobId)
    if final.status is not JobState.COMPLETED:
        raise RuntimeError(f"copy job ended {final.status.value}: {final.message} {final.error}")
    return timing, final


def _check(final: JobStatus, inserted: int, updated: int, unchanged: int) -> None:
    got = (final.insertedRecords, final.updatedRecords, final.unchangedRecords, final.errorRecords)
    if got != (inserted, updated, unchanged, 0):
        raise RuntimeError(f"unexpected counts {got}, expected {(inserted, updated, unchanged, 0)}")


# -- subprocess children: (f) and peak RSS ----------------------------------------------------


def _client_work() -> Callable[[LakeBatch], int]:
    """What the copy does to a batch before MongoDB sees it; returns the valid records.

    ``CopyEngine.prepare`` (validate, column-wise BSON, content hash); with a lakesync that
    has no ``prepare`` (to measure an older version), validate and hash each document.
    """
    engine: Any = CopyEngine(None, None, TASK_DETAIL, "bench")  # type: ignore[arg-type]
    if hasattr(engine, "prepare"):
        return lambda batch: len(engine.prepare(batch).digests)

    def older(batch: LakeBatch) -> int:
        docs = validate(TASK_DETAIL, batch.table).documents
        return len([content_hash(doc) for doc in docs])

    return older


def child_nullsink(lake_dir: str, batch_size: int) -> dict[str, Any]:
    """(f): Lake.batches -> validate -> BSON -> content hash of every record, nothing written."""
    work = _client_work()
    started = time.perf_counter()
    lake = Lake.open(lake_dir)
    opened = _since(started)
    records = documents = 0
    for batch in lake.batches(batch_size):
        documents += work(batch)
        records += batch.table.num_rows
    return {"records": records, "documents": documents, "seconds": _since(started),
            "open_seconds": opened}  # fmt: skip


def child_copy(lake_dir: str, uri: str, database: str, batch_size: int) -> dict[str, Any]:
    """(c) in a fresh process: the whole job path, for its peak RSS."""
    workdir = Path(tempfile.mkdtemp(prefix="lsbench-child-"))
    try:
        settings = lakesync_settings(uri, database, workdir, Path(lake_dir), batch_size)
        with Runtime(settings) as rt:
            timing, final = run_copy(rt)
            rt.mongo.client.drop_database(database)
        return {"records": final.processedRecords, "seconds": timing.seconds}
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def run_child(args: list[str], *, one_cpu: bool) -> dict[str, Any]:
    """Run this script as a child; returns its JSON answer plus its peak RSS."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", *args]
    if one_cpu:
        cmd += ["--one-cpu"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"child {args[0]} failed: {out.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def _peak_rss_mb() -> float:
    """This process's peak resident memory since it started (exec'd).

    /proc/self/status VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss over fork
    and exec, so a child would report its parent's peak when that is higher.
    """
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child_main(ns: argparse.Namespace) -> None:
    logging.basicConfig(level=logging.WARNING)
    if ns.one_cpu and hasattr(os, "sched_setaffinity"):
        cpu = max(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cpu})
    if ns.child == "nullsink":
        result = child_nullsink(ns.lake, ns.batch_size)
    elif ns.child == "copy":
        result = child_copy(ns.lake, ns.uri, ns.database, ns.batch_size)
    else:
        raise SystemExit(f"unknown child {ns.child}")
    result["peak_rss_mb"] = _peak_rss_mb()
    print(json.dumps(result))


# -- latency under load: `python -m lakesync serve` ---------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Serve:
    """`python -m lakesync serve` in a child process, on the benchmark's server."""

    def __init__(self, uri: str, database: str, workdir: Path, lake: Path) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("LAKESYNC_")}
        env.update(
            LAKESYNC_MONGODB_URI=uri, LAKESYNC_DATABASE=database,
            LAKESYNC_DATA_DIR=str(workdir / "serve-data"), LAKESYNC_LAKE_URI=str(lake),
            LAKESYNC_LOG_LEVEL="WARNING",
        )  # fmt: skip
        self.log = workdir / "serve.log"
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "lakesync", "serve", "--port", str(self.port)],
                env=env, stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"serve exited: {self.log.read_text()[-2000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/readyz", timeout=1).status_code == 200:
                    return
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"serve did not become ready: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def _wait_ended(client: httpx.Client, job_id: str, timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body: dict[str, Any] = client.get(f"/api/jobs/{job_id}").json()
        if body["status"] in ("completed", "failed", "cancelled"):
            return body
        time.sleep(0.1)
    raise RuntimeError(f"job {job_id} did not end within {timeout} s")


def _pollers(base: str, path: str, ns: argparse.Namespace) -> list[float]:
    """``ns.pollers`` clients, each on its own connection and thread, GET ``path`` every
    ``ns.poll_interval`` seconds (0: back to back) for ``ns.poll_seconds``; the latencies in
    ms. Each client starts at a random phase, as independent pages would."""
    latencies: list[float] = []
    errors: list[str] = []
    stop_at = time.perf_counter() + ns.poll_seconds
    rng = random.Random(0)

    def poll(phase: float) -> None:
        with httpx.Client(base_url=base, timeout=30) as client:
            client.get("/healthz")  # connect before measuring
            due = time.perf_counter() + phase
            while True:
                pause = due - time.perf_counter()
                if pause > 0:
                    time.sleep(pause)
                if time.perf_counter() >= stop_at:
                    return
                started = time.perf_counter()
                try:
                    response = client.get(path)
                except httpx.HTTPError as e:
                    errors.append(repr(e))
                    continue
                latencies.append((time.perf_counter() - started) * 1000)
                if response.status_code != 200:
                    errors.append(f"HTTP {response.status_code}")
                due = max(due + ns.poll_interval, time.perf_counter())

    threads = [
        threading.Thread(target=poll, args=(rng.uniform(0, ns.poll_interval),), daemon=True)
        for _ in range(ns.pollers)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(ns.poll_seconds + 60)
    if errors:
        raise RuntimeError(f"{len(errors)} polls failed, e.g. {errors[0]}")
    return latencies


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def measure_latency(
    uri: str, dbs: Databases, workdir: Path, big_lake: Path, ns: argparse.Namespace
) -> dict[str, Any]:
    """Pollers during a copy of the big lake, then POST -> 202 with it, under `lakesync serve`."""
    serve = Serve(uri, dbs.new("serve"), workdir, big_lake)
    out: dict[str, Any] = {}
    try:
        with httpx.Client(base_url=serve.url, timeout=30) as http:
            # 1. GET /api/jobs/{id} latency with `pollers` clients while a copy runs
            job = http.post("/api/jobs", json={"operation": OPERATION}).json()
            job_id = job["jobId"]
            deadline = time.monotonic() + 60
            while http.get(f"/api/jobs/{job_id}").json()["processedRecords"] == 0:
                if time.monotonic() > deadline:
                    raise RuntimeError("the copy under load did not start within 60 s")
                time.sleep(0.05)
            windows = {"poll": f"/api/jobs/{job_id}", "floor": "/healthz"}
            for name, path in windows.items():
                before = http.get(f"/api/jobs/{job_id}").json()
                started = time.perf_counter()
                latencies = _pollers(serve.url, path, ns)
                elapsed = _since(started)
                after = http.get(f"/api/jobs/{job_id}").json()
                out[name] = {
                    "path": path,
                    "pollers": ns.pollers,
                    "interval_s": ns.poll_interval,
                    "seconds": round(elapsed, 1),
                    "requests": len(latencies),
                    **{f"p{q}_ms": round(_pct(latencies, q), 1) for q in (50, 90, 99)},
                    "max_ms": round(max(latencies), 1),
                    "copy_running_throughout": after["status"] == "in_progress",
                    "copy_records_per_s_while_polled": round(
                        (after["processedRecords"] - before["processedRecords"]) / elapsed
                    ),
                }
            if after["status"] == "in_progress":
                http.post(f"/api/jobs/{job_id}/cancel")
            _wait_ended(http, job_id)
            # 2. POST /api/jobs -> 202 with a 1,000,000-row lake, server otherwise idle
            times: list[float] = []
            for _ in range(ns.post_reps):
                started = time.perf_counter()
                response = http.post("/api/jobs", json={"operation": OPERATION})
                times.append((time.perf_counter() - started) * 1000)
                if response.status_code != 202:
                    raise RuntimeError(f"POST answered {response.status_code}: {response.text}")
                big_id = response.json()["jobId"]
                http.post(f"/api/jobs/{big_id}/cancel")
                _wait_ended(http, big_id)
            out["post"] = {
                "lake_rows": max(ns.rss_rows),
                "samples_ms": [round(t, 1) for t in times],
                "median_ms": round(statistics.median(times), 1),
            }
    finally:
        serve.stop()
    return out


# -- the run -------------------------------------------------------------------------------


def _measure(
    key: str, label: str, n: int, t: Timing, note: str = "", samples: list[int] | None = None
) -> Measure:
    return Measure(
        key, label, n, t.seconds, note, samples or [], t.client_cpu, t.server_cpu, t.cpu_pressure
    )


def throughput(
    report: Report, uri: str, dbs: Databases, workdir: Path, lake: Path, ns: argparse.Namespace
) -> None:
    batches = lake_batches(lake, ns.batch_size)
    table = lake_table(lake)
    n = sum(len(b) for b in batches)
    if n != table.num_rows or n != ns.rows:
        raise RuntimeError(f"lake: {n} valid records, {table.num_rows} rows, not {ns.rows}")
    client = client_for(uri)
    modes = "abcm"
    samples: dict[str, list[Timing]] = {key: [] for key in modes}
    peer_note = ""
    copy_db = ""
    for rep in range(ns.reps):
        # (b) and (c) back to back, in turn first, so that their ratio per repetition sees
        # the same moment of the machine; the pair, (a) and (m) rotated, so drift hits all
        blocks = ["bc" if rep % 2 == 0 else "cb", "a", "m"]
        order = "".join(blocks[rep % 3 :] + blocks[: rep % 3])
        for key in order:
            name = dbs.new(key)
            db = client[name]
            if key == "a":
                timing = run_raw(db, batches)
            elif key == "m":
                timing = run_marked(db, batches)
            elif key == "b":
                timing, peer_note = run_peer(db, table, batches)
            else:
                with Runtime(lakesync_settings(uri, name, workdir, lake, ns.batch_size)) as rt:
                    timing, final = run_copy(rt)
                _check(final, n, 0, 0)
                copy_db = name
            samples[key].append(timing)
            log.info("(%s) rep %d: %.0f records/s", key, rep + 1, n / timing.seconds)
            if key != "c" or rep < ns.reps - 1:
                client.drop_database(name)
    labels = {
        "a": ("raw pymongo bulk_write, UpdateOne $set upsert", "prebuilt ops, no status"),
        "b": ("peer: PyMongoArrow write()", peer_note),
        "m": ("insert_many of lakesync's documents", "prebuilt BSON with _lakesync markers"),
        "c": ("lakesync copy, empty collection", "Runtime + jobs.start + runner.run"),
    }
    for key, (label, note) in labels.items():
        best = min(samples[key], key=lambda t: t.seconds)
        rates = [round(n / t.seconds) for t in samples[key]]
        report.rows.append(_measure(key, label, n, best, note, rates))
    with Runtime(lakesync_settings(uri, copy_db, workdir, lake, ns.batch_size)) as rt:
        timing, final = run_copy(rt)
        _check(final, 0, 0, n)
        report.rows.append(_measure("d", "lakesync copy again, all unchanged", n, timing))
        touched = len(touch_records(lake, n // 10))
        timing, final = run_copy(rt)
        _check(final, 0, touched, n - touched)
        label = "lakesync copy, 10% changed"
        report.rows.append(_measure("e", label, n, timing, f"{touched} updated"))
    client.close()


def memory(
    report: Report, lakes: dict[int, Path], main: Path, uri: str, dbs: Databases,
    ns: argparse.Namespace,
) -> None:  # fmt: skip
    """(f) over the main lake, then the peak RSS of fresh subprocesses over each lake size."""
    batch = ["--batch-size", str(ns.batch_size)]
    sink = run_child(["nullsink", "--lake", str(main), *batch], one_cpu=True)
    label = "read + validate + BSON + hash, null sink"
    note = f"fresh subprocess on one CPU; Lake.open ({sink['open_seconds'] * 1000:.0f} ms) included"
    report.rows.append(Measure("f", label, sink["records"], sink["seconds"], note))
    for rows, lake in sorted(lakes.items()):
        result = sink if lake == main else run_child(["nullsink", "--lake", str(lake), *batch],
                                                     one_cpu=True)  # fmt: skip
        report.memory.append({"mode": "(f) null sink", "records": rows, **_mem(result)})
    for rows, lake in sorted(lakes.items()):
        if (rows > ns.rss_rows[0] and not ns.copy_rss_big) or ns.quick:
            continue  # a million upserts take minutes on nx-27017: --copy-rss-big
        args = ["copy", "--lake", str(lake), "--uri", uri, "--database", dbs.new("rss"), *batch]
        result = run_child(args, one_cpu=False)
        report.memory.append({"mode": "(c) lakesync copy", "records": rows, **_mem(result)})


def _mem(result: dict[str, Any]) -> dict[str, Any]:
    return {
        "peak_rss_mb": round(result["peak_rss_mb"], 1),
        "records_per_s": round(result["records"] / result["seconds"]),
    }


def evaluate(report: Report) -> None:
    if report.settings["rows"] < 100_000:
        report.notes.append(
            f"{report.settings['rows']:,} records: Lake.open and each batch's fixed costs weigh "
            "more than in the default run (100,000), for which the targets are meant"
        )
    a, b, c, f = (report.row(k) for k in "abcf")
    if a and b and c:
        report.targets.append(("(c) >= 0.95 x (a)", c.rate >= 0.95 * a.rate,
                               f"{c.rate / a.rate:.2f} x"))  # fmt: skip
        report.targets.append(("(c) >= 0.95 x (b)", c.rate >= 0.95 * b.rate,
                               f"{c.rate / b.rate:.2f} x"))  # fmt: skip
    if b and c and len(b.samples) == len(c.samples) > 1:
        ratios = sorted(cs / bs for cs, bs in zip(c.samples, b.samples, strict=True))
        report.notes.append(
            f"(c)/(b) per repetition (each pair back to back, (b) and (c) first in turn): min "
            f"{ratios[0]:.2f}, median {statistics.median(ratios):.2f}, max {ratios[-1]:.2f} "
            f"over {len(ratios)}; load average at start {report.machine['load_average_at_start']}"
        )
    if c and (m := report.row("m")):
        report.notes.append(f"(c)/(m) = {c.rate / m.rate:.2f}: lakesync against the server's "
                            "limit for the documents it must store")  # fmt: skip
    cpu = {
        r.key: (r.client_cpu + r.server_cpu) / r.records * 1e6
        for r in report.rows
        if r.key in "abmc" and r.client_cpu is not None and r.server_cpu is not None
    }
    if "c" in cpu:
        each = ", ".join(f"({k}) {v:.0f}" for k, v in cpu.items())
        ratios = ", ".join(f"(c)/({k}) {cpu[k] / cpu['c']:.2f}" for k in "ab" if k in cpu)
        report.notes.append(
            f"CPU microseconds per record, client + server: {each}. Were the work serial and "
            f"the machine otherwise idle, the ratios would be {ratios}"
        )
    if f:
        report.targets.append(
            ("(f) >= 100,000 records/s on one core", f.rate >= 100_000, f"{f.rate:,.0f}/s")
        )
    for mode in ("(f)", "(c)"):
        runs = [m for m in report.memory if m["mode"].startswith(mode)]
        if len(runs) == 2 and runs[1]["records"] >= 10 * runs[0]["records"]:
            ratio = runs[1]["peak_rss_mb"] / runs[0]["peak_rss_mb"]
            name = f"{mode} peak RSS at {runs[1]['records']:,} <= 1.3 x at {runs[0]['records']:,}"
            report.targets.append((name, ratio <= 1.3, f"{ratio:.2f} x"))
    if poll := report.latency.get("poll"):
        floor = report.latency.get("floor")
        shown = f"p99 {poll['p99_ms']} ms" + (
            f" (/healthz, no database read, same load: p99 {floor['p99_ms']} ms)" if floor else ""
        )
        report.targets.append((f"poll p99 < 50 ms with {poll['pollers']} pollers during a copy",
                               poll["p99_ms"] < 50, shown))  # fmt: skip
    if post := report.latency.get("post"):
        report.targets.append((f"POST -> 202 median < 50 ms ({post['lake_rows']:,}-row lake)",
                               post["median_ms"] < 50, f"{post['median_ms']} ms"))  # fmt: skip


def render(report: Report) -> str:
    m = report.machine
    lines = [
        "lakesync benchmark",
        f"machine: {m['cpu']}, {m['cores']} cores, {m['memory_gb']} GiB, {m['platform']}, "
        f"Python {m['python']}",
        f"load average: start {m['load_average_at_start']}, end {m.get('load_average_at_end')}",
        "versions: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()),
        "server: " + report.settings["server"],
        f"lake: {report.settings['rows']:,} records (demo generator, seed 0, no bad rows), "
        f"batch size {report.settings['batch_size']:,}, best of {report.settings['reps']} "
        "interleaved repetitions for (a) (b) (m) (c) ((b) (c) back to back, first in turn)",
        "",
    ]
    a, b = report.row("a"), report.row("b")
    header = f"{'':4} {'mode':46} {'records':>9} {'seconds':>8} {'records/s':>10} " \
             f"{'/(a)':>5} {'/(b)':>5} {'client':>7} {'server':>7} {'short':>6}  notes"  # fmt: skip
    lines += [header, "-" * len(header)]
    for r in report.rows:
        ra = f"{r.rate / a.rate:5.2f}" if a and r.key in "mcde" else ""
        rb = f"{r.rate / b.rate:5.2f}" if b and r.key in "mcde" else ""
        note = r.note + (f"; samples/s {r.samples}" if len(r.samples) > 1 else "")
        client = "" if r.client_cpu is None else f"{r.client_cpu / r.records * 1e6:.1f}"
        server = "" if r.server_cpu is None else f"{r.server_cpu / r.records * 1e6:.1f}"
        short = "" if r.cpu_pressure is None else f"{r.cpu_pressure:.0%}"
        lines.append(f"({r.key})  {r.label:46} {r.records:>9,} {r.seconds:>8.2f} "
                     f"{r.rate:>10,.0f} {ra:>5} {rb:>5} {client:>7} {server:>7} {short:>6}  "
                     f"{note}")  # fmt: skip
    lines.append(
        "client, server: CPU microseconds per record of this process (all threads) and of the "
        "embedded server; short: share of the run in which some task waited for a CPU (PSI)"
    )
    if report.memory:
        lines += ["", f"{'peak RSS (fresh subprocess)':34} {'records':>10} {'peak RSS':>10} "
                  f"{'records/s':>10}"]  # fmt: skip
        for mem in report.memory:
            lines.append(f"{mem['mode']:34} {mem['records']:>10,} {mem['peak_rss_mb']:>8.1f} MB "
                         f"{mem['records_per_s']:>10,}")  # fmt: skip
    for name in ("poll", "floor"):
        if (poll := report.latency.get(name)) is None:
            continue
        every = f"every {poll['interval_s']:g} s" if poll["interval_s"] else "back to back"
        if name == "poll":
            lines.append("")
        lines.append(f"GET {poll['path']}, {poll['pollers']} clients each polling {every}, "
                     f"during a copy ({poll['seconds']} s, {poll['requests']:,} requests): "
                     f"p50 {poll['p50_ms']} ms, p90 {poll['p90_ms']} ms, p99 {poll['p99_ms']} ms, "
                     f"max {poll['max_ms']} ms; the copy ran at "
                     f"{poll['copy_records_per_s_while_polled']:,} records/s")  # fmt: skip
    if post := report.latency.get("post"):
        lines.append(f"POST /api/jobs -> 202 with a {post['lake_rows']:,}-row lake: median "
                     f"{post['median_ms']} ms (samples {post['samples_ms']})")  # fmt: skip
    if report.targets:
        lines += ["", "targets:"]
        for name, ok, value in report.targets:
            lines.append(f"  [{'met' if ok else 'NOT met':7}] {name}: {value}")
    lines += [f"note: {n}" for n in report.notes]
    return "\n".join(lines)


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="20,000 records, one repetition")
    p.add_argument("--rows", type=int, help="records in the lake (default 100,000)")
    p.add_argument("--rss-rows", default="100000,1000000",
                   help="lake sizes whose peak RSS is measured (the largest also serves the "
                   "latency tests)")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH)
    p.add_argument("--reps", type=int, help="interleaved repetitions of (a) (b) (c)")
    p.add_argument("--pollers", type=int, default=50)
    p.add_argument("--poll-seconds", type=float, help="how long the pollers run (default 10)")
    p.add_argument(
        "--poll-interval",
        type=float,
        default=1.0,
        help="seconds between one client's polls, as the web page (0: back to back)",
    )
    p.add_argument("--post-reps", type=int, default=7)
    p.add_argument(
        "--copy-rss-big",
        action="store_true",
        help="also measure (c)'s peak RSS over the large lake (slow on nx-27017)",
    )
    p.add_argument("--skip-latency", action="store_true")
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--json", type=Path, help="also write the results to this file")
    p.add_argument("--workdir", type=Path, help="keep lakes and server files here")
    p.add_argument("--render", type=Path, help="print the table of a run saved with --json")
    # internal: the subprocess modes
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--lake", help=argparse.SUPPRESS)
    p.add_argument("--uri", help=argparse.SUPPRESS)
    p.add_argument("--database", help=argparse.SUPPRESS)
    p.add_argument("--one-cpu", action="store_true", help=argparse.SUPPRESS)
    ns = p.parse_args(argv)
    ns.rows = ns.rows or (20_000 if ns.quick else 100_000)
    ns.rss_rows = sorted(int(x) for x in str(ns.rss_rows).split(","))
    ns.reps = ns.reps or (1 if ns.quick else 3)
    ns.poll_seconds = ns.poll_seconds or (5.0 if ns.quick else 10.0)
    return ns


def main(argv: list[str] | None = None) -> int:
    ns = parse(argv)
    if ns.child:
        child_main(ns)
        return 0
    if ns.render:
        saved = json.loads(ns.render.read_text())
        report = Report(**{**saved, "rows": [Measure(**r) for r in saved["rows"]],
                           "targets": [tuple(t) for t in saved["targets"]]})  # fmt: skip
        print(render(report))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    for name in ("lakesync", "pymongo", "httpx"):
        logging.getLogger(name).setLevel(logging.WARNING)
    workdir = ns.workdir or Path(tempfile.mkdtemp(prefix="lakesync-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    try:
        with mongodb(workdir) as (uri, server):
            report = Report(
                machine_info(),
                {"server": server, "rows": ns.rows, "batch_size": ns.batch_size, "reps": ns.reps,
                 "rss_rows": ns.rss_rows},
            )  # fmt: skip
            client = client_for(uri)
            dbs = Databases(client)
            try:
                lake = make_lake(workdir / "lake", ns.rows)
                throughput(report, uri, dbs, workdir, lake, ns)
                lakes = {ns.rows: lake} if ns.rows in ns.rss_rows else {}
                if not (ns.skip_memory and ns.skip_latency):
                    for rows in ns.rss_rows:
                        lakes.setdefault(rows, make_lake(workdir / f"lake-{rows}", rows))
                if not ns.skip_memory:
                    memory(report, lakes, lake, uri, dbs, ns)
                if not ns.skip_latency:
                    big = lakes[max(ns.rss_rows)]
                    report.latency = measure_latency(uri, dbs, workdir, big, ns)
            finally:
                dbs.drop_all()
                client.close()
    finally:
        if ns.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    report.machine["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    report.settings["wall_seconds"] = round(_since(started), 1)
    evaluate(report)
    print(render(report))
    if ns.json:
        ns.json.write_text(json.dumps(asdict(report), indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
