"""Scratch copies (a JSON array as NDJSON, JSON without its records nested too deep, a
CSV of very many columns) live in a folder of the process that made them, and are removed
when the last lake reading them is closed; the folder of a process that died without
removing them is removed by the next process that makes copies."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.test_csv import _copy, _toml

from lakesync.config import Settings
from lakesync.sources import base
from lakesync.sources.lake import Lake


def _json_lake(root: Path) -> Path:
    lake = root / "events"
    lake.mkdir()
    (lake / "a.json").write_text(json.dumps([{"id": i, "v": i} for i in range(5)]))
    deep = "[" * 150 + "]" * 150
    (lake / "b.ndjson").write_text(f'{{"id": 10, "v": 1}}\n{{"id": 11, "v": {deep}}}\n')
    return lake


def _wide_lake(root: Path) -> Path:
    lake = root / "wide"
    lake.mkdir()
    names = ["id", *(f"c{i}" for i in range(1200))]
    rows = [",".join(names), *(",".join([str(r)] + ["x"] * 1200) for r in range(3))]
    (lake / "a.csv").write_text("\n".join(rows) + "\n")
    return lake


def _copies() -> set[Path]:
    return {p for p in base.scratch_folder().iterdir()}


def test_a_job_leaves_no_scratch_copy_behind(settings: Settings, db: Any, tmp_path: Path) -> None:
    before = _copies()
    lake = _json_lake(tmp_path)
    opened = Lake.open(str(lake))  # the copies exist while a lake reads them
    made = _copies() - before
    assert len(made) == 3, made  # the array as NDJSON; the guarded copy, its refused rows
    done = _copy(settings, tmp_path, _toml("events", lake), "events")
    assert (done.insertedRecords, done.errorRecords) == (6, 1), done
    assert _copies() - before == made  # still read by `opened`
    opened.close()
    assert _copies() - before == set()  # the job's own lakes are gone too
    wide = _wide_lake(tmp_path)
    done = _copy(settings, tmp_path, _toml("wide", wide), "wide")
    assert done.insertedRecords == 3, done
    assert _copies() - before == set()


_CHILD = """
import os, sys
from lakesync.sources import base
from lakesync.sources.lake import Lake
lake = Lake.open(sys.argv[1])
print(base.scratch_folder(), flush=True)
if sys.argv[2] == "crash":
    os._exit(0)  # no exit handlers, nothing closed: as a kill -9 leaves it
lake.close()
"""


def test_the_copies_of_a_dead_process_are_removed_at_the_next_start(tmp_path: Path) -> None:
    lake = _json_lake(tmp_path)
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = {**os.environ, "TMPDIR": str(scratch), "PYTHONPATH": os.pathsep.join(sys.path)}

    def child(how: str) -> Path:
        out = subprocess.run(
            [sys.executable, "-c", _CHILD, str(lake), how],
            env=env, capture_output=True, text=True, check=True, timeout=120,
        )  # fmt: skip
        return Path(out.stdout.strip())

    crashed = child("crash")
    assert crashed.is_dir() and len(list(crashed.iterdir())) == 3
    clean = child("clean")
    assert clean != crashed
    assert not crashed.exists()  # removed by the next process's first copy
    assert not clean.exists()  # its own folder: removed when it exited
    assert list(clean.parent.iterdir()) == []
