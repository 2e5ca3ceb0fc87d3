"""Peak RSS of ``lakesync copy`` through its plan: the lake opened, the plan of repeated
keys made and stored, then the first ``--copy-seconds`` of the copy; then it is stopped.

At 10,000,000 records a whole copy takes hours on a shared machine, but the copy's peak is
reached before its first write (docs/performance.md, sessions 8 and 9): this measures that
part alone. ``lakesync copy`` runs as its own exec'd process (``python -m lakesync``, with
``--src`` first on its path: the tree measured) against an embedded server started here;
every 0.2 s this reads the process's ``VmHWM``/``VmRSS`` (``/proc/<pid>/status``) and the
job's message. With ``--copy-seconds -1`` the copy runs to its end (a baseline's whole copy).

    PYTHONPATH=src python bench/planpeak.py LAKE [--src DIR] [--copy-seconds 20] [--trace F]

Prints one JSON line: the peak through the plan (``planMB``, VmHWM when the job's message
first says it copies), the peak at the stop (``peakMB``), the plan's seconds, the records
written at the stop, and the load average at the start and the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any


def status_of(pid: int) -> tuple[float, float]:
    """VmHWM and VmRSS of ``pid`` (MB); zeros once it has gone."""
    hwm = rss = 0.0
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                hwm = int(line.split()[1]) / 1024
            elif line.startswith("VmRSS:"):
                rss = int(line.split()[1]) / 1024
    except OSError:
        pass
    return hwm, rss


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("lake", type=Path)
    parser.add_argument("--src", type=Path, help="the lakesync tree to measure (its src/)")
    parser.add_argument("--copy-seconds", type=float, default=20.0)
    parser.add_argument("--trace", type=Path, help="a file: every second, VmHWM/VmRSS/message")
    parser.add_argument("--workdir", type=Path, help="server and data folders here")
    ns = parser.parse_args()

    from pymongo import MongoClient

    from lakesync.mongo import EmbeddedServer

    work = Path(tempfile.mkdtemp(prefix="planpeak-", dir=ns.workdir))
    server = EmbeddedServer(work / "mongo").start()
    database = "peak_" + uuid.uuid4().hex[:10]
    env = {
        **os.environ,
        "LAKESYNC_MONGODB_URI": server.uri,
        "LAKESYNC_DATABASE": database,
        "LAKESYNC_DATA_DIR": str(work / "data"),
        "LAKESYNC_LOG_LEVEL": "WARNING",
    }
    if ns.src is not None:
        env["PYTHONPATH"] = str(ns.src.resolve())
    cmd = [sys.executable, "-m", "lakesync", "copy", "copy-taskdetail", "--source",
           str(ns.lake), "--json"]  # fmt: skip
    client: MongoClient[dict[str, Any]] = MongoClient(server.uri)
    load = [round(x, 2) for x in os.getloadavg()]
    started = time.perf_counter()
    # its output to files, not pipes: a copy of hours that fills a pipe no one reads would
    # stop in its write, and be measured standing still
    out_file, err_file = (open(work / name, "w+b") for name in ("stdout", "stderr"))  # noqa: SIM115
    proc = subprocess.Popen(cmd, env=env, stdout=out_file, stderr=err_file)
    log = ns.trace.open("w") if ns.trace else None
    plan_mb = plan_s = None
    copying_since = None
    last_log = 0.0
    message = ""
    peak = 0.0
    try:
        while proc.poll() is None:
            time.sleep(0.2)
            hwm, rss = status_of(proc.pid)
            peak = max(peak, hwm)
            now = time.perf_counter() - started
            if now - last_log >= 1.0:
                doc = client[database]["jobstatuses"].find_one({}, {"message": 1}) or {}
                message = str(doc.get("message", ""))
                if log is not None:
                    log.write(f"{now:8.1f} s  VmHWM {hwm:7.1f}  VmRSS {rss:7.1f}  {message}\n")
                    log.flush()
                last_log = now
                if plan_mb is None and message.startswith("Copying"):
                    plan_mb, plan_s, copying_since = peak, now, now
            if (
                copying_since is not None
                and ns.copy_seconds >= 0
                and now - copying_since >= ns.copy_seconds
            ):
                proc.send_signal(signal.SIGKILL)
                break
        proc.wait()
        out_file.seek(0)
        out = out_file.read()
        written = client[database]["taskdetails"].estimated_document_count()
        counts: dict[str, Any] = {}
        if proc.returncode == 0:  # a whole copy: its final status (``--json``)
            final = json.loads(out.decode().strip().splitlines()[-1])
            names = ("status", "insertedRecords", "duplicateRecords", "errorRecords")
            counts = {k: final.get(k) for k in names}
        elif copying_since is None or ns.copy_seconds < 0:  # it failed: say why
            err_file.seek(0)
            counts = {"stderr": err_file.read()[-2000:].decode(errors="replace")}
    finally:
        if log is not None:
            log.close()
        for f in (out_file, err_file):
            f.close()
        client.drop_database(database)
        client.close()
        server.stop()
        shutil.rmtree(work, ignore_errors=True)  # the server's files: GBs at 10M records
    print(json.dumps({
        "lake": str(ns.lake), "src": str(ns.src), "planMB": plan_mb, "peakMB": round(peak, 1),
        "planSeconds": plan_s, "written": written, "returncode": proc.returncode, **counts,
        "loadStart": load, "loadEnd": [round(x, 2) for x in os.getloadavg()],
    }), flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
