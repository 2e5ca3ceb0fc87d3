"""Status polls under load: 100 SSE clients and 50 pollers while `lakesync serve` copies.

Starts the embedded server and `python -m lakesync serve` on a demo lake, starts a copy,
then for ``--seconds``: 100 clients follow ``GET /api/jobs/{id}/events`` (in a child
process, one asyncio loop) while 50 clients, each on its own connection and thread, poll
``GET /api/jobs/{id}`` once a second from random phases (as pages do). Prints the polls'
p50/p90/p99/max, the events each stream received, and the copy's rate while polled; then the
same load with the pollers on ``GET /healthz`` (reads nothing: the API's own floor).

Target (issue "Lakes of 100,000 files"): poll p99 < 50 ms.

Run: ``.venv/bin/python bench/status.py [--quick]`` (``make bench`` runs it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import Serve, _pct, _pollers  # bench/run.py: the same pollers and server


async def _follow(base: str, path: str, seconds: float, counts: list[int], i: int) -> None:
    async with httpx.AsyncClient(base_url=base, timeout=None) as client:
        deadline = time.monotonic() + seconds
        async with client.stream("GET", path) as response:
            response.raise_for_status()
            async for line in response.aiter_lines():
                if line.startswith("event: status"):
                    counts[i] += 1
                if time.monotonic() > deadline:
                    return


def sse_child(base: str, path: str, clients: int, seconds: float) -> None:
    """``clients`` event streams for ``seconds``; prints the status events each received."""
    counts = [0] * clients

    async def main() -> None:
        await asyncio.gather(*(_follow(base, path, seconds, counts, i) for i in range(clients)))

    asyncio.run(main())
    print(json.dumps({"events": counts}))


def measure(base: str, job_id: str, path: str, ns: argparse.Namespace) -> dict[str, Any]:
    """Latencies of ``path`` polled by ns.pollers while ns.sse clients follow the job."""
    events_path = f"/api/jobs/{job_id}/events"
    args = [sys.executable, __file__, "--sse-child", base, events_path, str(ns.sse)]
    args.append(str(ns.seconds + 2))
    sse = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
    time.sleep(1.0)  # the streams connect
    with httpx.Client(base_url=base, timeout=30) as http:
        before = http.get(f"/api/jobs/{job_id}").json()
        started = time.perf_counter()
        load = SimpleNamespace(pollers=ns.pollers, poll_interval=1.0, poll_seconds=ns.seconds)
        latencies = _pollers(base, path, load)  # type: ignore[arg-type]
        elapsed = time.perf_counter() - started
        after = http.get(f"/api/jobs/{job_id}").json()
    out, _ = sse.communicate(timeout=60)
    events = json.loads(out.strip().splitlines()[-1])["events"]
    return {
        "path": path,
        "requests": len(latencies),
        **{f"p{q}": round(_pct(latencies, q), 1) for q in (50, 90, 99)},
        "max": round(max(latencies), 1),
        "events": [min(events), max(events)],
        "running": after["status"] == "in_progress",
        "rate": round((after["processedRecords"] - before["processedRecords"]) / elapsed),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smaller lake, 5 s windows")
    parser.add_argument("--sse", type=int, default=100, help="event-stream clients")
    parser.add_argument("--pollers", type=int, default=50, help="clients polling once a second")
    parser.add_argument("--seconds", type=float, default=10.0, help="each window")
    parser.add_argument("--sse-child", nargs=4, help=argparse.SUPPRESS)
    ns = parser.parse_args()
    if ns.sse_child:
        base, path, clients, seconds = ns.sse_child
        sse_child(base, path, int(clients), float(seconds))
        return 0
    from lakesync.demo import generate
    from lakesync.mongo import EmbeddedServer

    if ns.quick:
        ns.seconds = min(ns.seconds, 5.0)
    rows = 150_000 if ns.quick else 400_000  # the copy must outlast both windows
    work = Path(tempfile.mkdtemp(prefix="lakesync-status-"))
    server = EmbeddedServer(work / "mongo").start()
    results: dict[str, dict[str, Any]] = {}
    try:
        lake = work / "lake"
        generate(lake, rows, seed=3)
        serve = Serve(server.uri, "status_" + uuid.uuid4().hex[:8], work, lake)
        try:
            with httpx.Client(base_url=serve.url, timeout=30) as http:
                job_id = http.post("/api/jobs", json={"operation": "copy-taskdetail"}).json()[
                    "jobId"
                ]
                deadline = time.monotonic() + 60
                while http.get(f"/api/jobs/{job_id}").json()["processedRecords"] == 0:
                    if time.monotonic() > deadline:
                        raise SystemExit("the copy did not start within 60 s")
                    time.sleep(0.05)
                results["poll"] = measure(serve.url, job_id, f"/api/jobs/{job_id}", ns)
                results["floor"] = measure(serve.url, job_id, "/healthz", ns)
                http.post(f"/api/jobs/{job_id}/cancel")
        finally:
            serve.stop()
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    print(
        f"\nstatus under load: {ns.sse} SSE clients on /api/jobs/{{id}}/events and "
        f"{ns.pollers} pollers (1 request/s each) for {ns.seconds:g} s, during a copy of "
        f"{rows:,} records by `lakesync serve`"
    )
    for name, r in results.items():
        running = "" if r["running"] else " (the copy ended within the window)"
        path = r["path"] if name == "floor" else "/api/jobs/{id}"
        print(
            f"  GET {path}: {r['requests']} requests, p50 {r['p50']} ms, p90 {r['p90']} ms, "
            f"p99 {r['p99']} ms, max {r['max']} ms; events per stream {r['events'][0]}-"
            f"{r['events'][1]}; copy {r['rate']:,} records/s{running}"
        )
    p99 = results["poll"]["p99"]
    print(f"  [{'met' if p99 < 50 else 'missed'}] poll p99 < 50 ms: {p99} ms")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("LAKESYNC_LOG_LEVEL", "WARNING")
    raise SystemExit(main())
