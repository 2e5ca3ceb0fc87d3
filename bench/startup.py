"""Start-up of the command line: `lakesync --help`, `jobs` and `status` as a person runs them.

Each command runs in a fresh `python -m lakesync` process, several times; prints the median
and the fastest wall time. `jobs` and `status` run twice: against a data folder where no job
ever ran (they answer without starting the embedded server), and against a running embedded
server holding a finished job (they read it; nothing else is set up).

Targets (issue "A newcomer's day"): `--help` under 0.3 s, `status` and `jobs` under 1 s,
on a quiet machine.

Run: ``.venv/bin/python bench/startup.py [--runs N]`` (``make bench`` runs it).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGETS = {"--help": 0.3, "jobs": 1.0, "status": 1.0}


def timed(env: dict[str, str], *args: str) -> float:
    started = time.perf_counter()
    run = subprocess.run(
        [sys.executable, "-m", "lakesync", *args], env=env, capture_output=True, text=True
    )
    took = time.perf_counter() - started
    if run.returncode not in (0, 1):
        raise SystemExit(f"lakesync {' '.join(args)} failed: {run.stderr}")
    return took


def report(name: str, times: list[float], target: float) -> None:
    median = statistics.median(times)
    verdict = "ok" if median < target else "OVER"
    print(f"{name:<34} median {median:6.3f} s  fastest {min(times):6.3f} s  "
          f"target < {target:g} s  {verdict}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    src = Path(__file__).resolve().parent.parent / "src"
    with tempfile.TemporaryDirectory() as tmp:
        base = {k: v for k, v in os.environ.items() if not k.startswith("LAKESYNC_")}
        base["PYTHONPATH"] = os.pathsep.join([str(src), base.get("PYTHONPATH", "")])
        empty = base | {"LAKESYNC_DATA_DIR": str(Path(tmp) / "empty")}
        report("lakesync --help", [timed(empty, "--help") for _ in range(args.runs)], 0.3)
        report("jobs (no job ever ran)", [timed(empty, "jobs") for _ in range(args.runs)], 1.0)
        report("status (no job ever ran)",
               [timed(empty, "status", "job_x") for _ in range(args.runs)], 1.0)  # fmt: skip

        used = base | {
            "LAKESYNC_DATA_DIR": str(Path(tmp) / "used"),
            "LAKESYNC_DEMO_ROWS": "1000",
        }
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
            report("jobs (embedded server running)",
                   [timed(used, "jobs") for _ in range(args.runs)], 1.0)  # fmt: skip
            report("status (embedded server running)",
                   [timed(used, "status", job_id) for _ in range(args.runs)], 1.0)  # fmt: skip
        finally:
            serve.terminate()
            serve.wait(30)


if __name__ == "__main__":
    main()
