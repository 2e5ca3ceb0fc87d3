"""Start-up of the command line: `lakesync --help`, `jobs` and `status` as a person runs them.

Each command runs in a fresh `python -m lakesync` process, several times, `jobs` and `status`
alternated; prints the fastest, median and slowest wall time, and the median CPU time (user +
sys, with the children the command waited for). `jobs` and `status` run against:
- a data folder where no job ever ran (they answer without starting the embedded server);
- a running `lakesync serve` holding a finished job (they attach to its embedded server);
- jobs stored and no server running, cold: each call starts the embedded server (what the
  first read after a reboot pays; LAKESYNC_EMBEDDED_IDLE=0 stops it after every call);
- jobs stored, after a first command: that command's embedded server stays up until unused
  for LAKESYNC_EMBEDDED_IDLE seconds, and the next commands attach to it.

Targets (issue "A newcomer's day"): `--help` under 0.3 s, `status` and `jobs` under 1 s,
on a quiet machine. Python's bytecode cache is on (PYTHONDONTWRITEBYTECODE dropped), as for
an installed lakesync. The load average is printed: on a loaded machine, compare rows of one run.

Run: ``.venv/bin/python bench/startup.py [--runs N]`` (``make bench`` runs it).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

#: CPU seconds (user + sys) of each timed command and the children it waited for (an
#: embedded server it started and stopped), by command line: far less load-dependent than
#: wall time on a shared machine
CPU: dict[tuple[str, ...], list[float]] = {}


def _cpu() -> float:
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    return used.ru_utime + used.ru_stime


def timed(env: dict[str, str], *args: str) -> float:
    cpu, started = _cpu(), time.perf_counter()
    run = subprocess.run(
        [sys.executable, "-m", "lakesync", *args], env=env, capture_output=True, text=True
    )
    took = time.perf_counter() - started
    CPU.setdefault(args, []).append(_cpu() - cpu)
    if run.returncode not in (0, 1):
        raise SystemExit(f"lakesync {' '.join(args)} failed: {run.stderr}")
    return took


def report(name: str, times: list[float], target: float, cpu: list[float]) -> None:
    median = statistics.median(times)
    verdict = "ok" if median < target else "OVER"
    print(f"{name:<38} {min(times):5.2f} {median:5.2f} {max(times):5.2f} s  cpu "
          f"{statistics.median(cpu):4.2f} s  target < {target:g} s  {verdict}")  # fmt: skip


def jobs_and_status(label: str, env: dict[str, str], job_id: str, runs: int) -> None:
    """`jobs` and `status JOB` alternated, `runs` times each."""
    jobs: list[float] = []
    status: list[float] = []
    CPU.pop(("jobs",), None), CPU.pop(("status", job_id), None)
    for _ in range(runs):
        jobs.append(timed(env, "jobs"))
        status.append(timed(env, "status", job_id))
    report(f"jobs ({label})", jobs, 1.0, CPU[("jobs",)])
    report(f"status ({label})", status, 1.0, CPU[("status", job_id)])


def stop_lingering(data_dir: Path) -> None:
    """Stop the embedded server a command left up (the bench's own, in its temp folder)."""
    try:
        pid = json.loads((data_dir / "mongo" / "embedded.json").read_text())["pid"]
    except (OSError, ValueError, KeyError):
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except OSError:
        return
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
        time.sleep(0.1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    src = Path(__file__).resolve().parent.parent / "src"
    print("load average", " ".join(f"{n:.2f}" for n in os.getloadavg()))
    with tempfile.TemporaryDirectory() as tmp:
        base = {k: v for k, v in os.environ.items() if not k.startswith("LAKESYNC_")}
        base.pop("PYTHONDONTWRITEBYTECODE", None)
        base["PYTHONPATH"] = os.pathsep.join([str(src), base.get("PYTHONPATH", "")])
        empty = base | {"LAKESYNC_DATA_DIR": str(Path(tmp) / "empty")}
        timed(empty, "--help")  # bytecode compiled once, as at install
        CPU.clear()
        helps = [timed(empty, "--help") for _ in range(args.runs)]
        print(f"{'(wall: min median max; cpu: median)':<38}")
        report("lakesync --help", helps, 0.3, CPU[("--help",)])
        jobs_and_status("no job ever ran", empty, "job_x", args.runs)

        used_dir = Path(tmp) / "used"
        used = base | {"LAKESYNC_DATA_DIR": str(used_dir), "LAKESYNC_DEMO_ROWS": "1000"}
        serve = subprocess.Popen(
            [sys.executable, "-m", "lakesync", "serve", "--port", "0"],
            env=used, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            copied = subprocess.run(
                [sys.executable, "-m", "lakesync", "copy", "--json"],
                env=used, capture_output=True, text=True, check=True,
            )  # fmt: skip
            job_id = json.loads(copied.stdout)["jobId"]
            jobs_and_status("serve running", used, job_id, args.runs)
        finally:
            serve.terminate()
            serve.wait(30)
        stop_lingering(used_dir)  # (none: serve's own server stopped with it)
        cold = used | {"LAKESYNC_EMBEDDED_IDLE": "0"}
        jobs_and_status("stored, no server: cold", cold, job_id, args.runs)
        left_up = used | {"LAKESYNC_EMBEDDED_IDLE": "60"}
        try:
            timed(left_up, "jobs")  # the first read starts the server and leaves it up
            jobs_and_status("stored, after a first read", left_up, job_id, args.runs)
        finally:
            stop_lingering(used_dir)


if __name__ == "__main__":
    main()
