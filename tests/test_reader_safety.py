"""A reader that cannot take the server down: JSON nested too deep is refused before Arrow's
native reader sees it, and a job whose runs keep crashing the process is failed, not picked
up forever. Both through `lakesync serve` in a real child process."""

from __future__ import annotations

import json
import os
import signal
import textwrap
from pathlib import Path
from typing import Any

import httpx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tests.helpers import ServeProcess, wait_for, write_operations

from lakesync.sources.jsonarray import ndjson_copy
from lakesync.sources.jsondepth import MAX_DEPTH, _Scan, guard

DEEP = 10_000  # segfaulted pyarrow's JSON reader (and with it `lakesync serve`)


def _deep(depth: int) -> str:
    return "[" * depth + "]" * depth


def _status(url: str, job_id: str) -> dict[str, Any]:
    return httpx.get(f"{url}/api/jobs/{job_id}", timeout=15).json()


def _start(url: str, operation: str) -> str:
    r = httpx.post(f"{url}/api/jobs", json={"operation": operation}, timeout=15)
    assert r.status_code == 202, r.text
    return str(r.json()["jobId"])


def _ended(url: str, job_id: str) -> dict[str, Any] | None:
    s = _status(url, job_id)
    return s if s["status"] in ("completed", "failed", "cancelled") else None


@pytest.mark.slow
def test_a_record_nested_10000_deep_is_rejected_and_serve_stays_up(
    serve_env: dict[str, str], tmp_path: Path, db: Any
) -> None:
    lake = tmp_path / "events"
    lake.mkdir()
    good = [{"id": f"e{i}", "n": i, "tags": [[i]]} for i in range(40)]
    lines = [json.dumps(r) for r in good[:20]]
    lines.insert(3, json.dumps({"id": "deep-1", "tags": "x"})[:-1] + ', "v": ' + _deep(DEEP) + "}")
    lines.insert(7, "")  # a blank line is no row: the rows after it keep Arrow's numbers
    lines.insert(10, '{"id": "deep-2", "v": ' + _deep(MAX_DEPTH + 1) + "}")
    lines.insert(12, '{"id": "deep-ok", "v": ' + _deep(MAX_DEPTH - 1) + "}")
    (lake / "a.ndjson").write_text("\n".join(lines) + "\n")
    array = [json.dumps(r) for r in good[20:]]
    array.insert(5, '{"id": "deep-3", "v": ' + _deep(DEEP).replace("[[", "[\n[") + "}")
    (lake / "b.json").write_text("[\n" + ",\n".join(array) + "\n]\n")
    serve_env["LAKESYNC_OPERATIONS_FILE"] = str(
        write_operations(
            tmp_path / "lakesync.toml",
            {"events": {"source": str(lake), "format": "json", "collection": "events",
                        "key": "id"}},
        )
    )  # fmt: skip
    proc = ServeProcess(serve_env, tmp_path / "serve.log").start()
    try:
        job_id = _start(proc.url, "events")
        final = wait_for(lambda: _ended(proc.url, job_id), timeout=120)
        assert httpx.get(f"{proc.url}/healthz", timeout=15).status_code == 200
        assert proc.proc is not None and proc.proc.poll() is None
        errors = httpx.get(f"{proc.url}/api/jobs/{job_id}/errors", timeout=15).json()
    finally:
        proc.kill()
    assert final["status"] == "completed", final
    assert final["errorRecords"] == 3 and final["processedRecords"] == 44, final
    rejected = {(e["file"].rsplit("/", 1)[-1], e["row"]) for e in errors["errors"]}
    assert rejected == {("a.ndjson", 3), ("a.ndjson", 9), ("b.json", 5)}, errors
    assert all(f"more than {MAX_DEPTH} levels" in e["reason"] for e in errors["errors"])
    ids = {d["_id"] for d in db.events.find({}, {"_id": 1})}
    assert ids == {r["id"] for r in good} | {"deep-ok"}


def test_the_scan_is_exact_across_chunks_and_strings(tmp_path: Path) -> None:
    """Brackets inside strings (escaped quotes, escaped backslashes) do not nest; a line
    split across any chunk boundary is measured whole."""
    deep = '{"s": "[[[[\\"[[[", "t": "\\\\", "v": ' + _deep(5) + "}"
    shallow = '{"s": "\\\\\\"[[[[[[[[", "v": [[1]]}'
    data = "\n".join([shallow, deep, "", shallow, deep]).encode()
    for size in (1, 2, 3, 7, len(data)):
        scan = _Scan(limit=4)
        for at in range(0, len(data), size):
            scan.feed(data[at : at + size])
        scan.feed(b"", final=True)
        assert scan.deep == {1, 4}, size
    path = tmp_path / "x.ndjson"
    path.write_bytes(data)
    safe = guard(__import__("pyarrow.fs").fs.LocalFileSystem(), str(path), limit=4)
    assert sorted(safe.refused) == [1, 3]  # rows: the blank line is none
    assert Path(safe.path).read_text().splitlines()[1] == "{}"


def test_a_json_array_too_deep_for_python_keeps_the_other_elements(tmp_path: Path) -> None:
    path = tmp_path / "a.json"
    path.write_text('[{"a": 1}, {"b": ' + _deep(DEEP) + '}, {"c": "]"}]')
    fs = __import__("pyarrow.fs").fs.LocalFileSystem()
    lines = Path(ndjson_copy(fs, str(path), str(path))).read_text().splitlines()
    assert json.loads(lines[0]) == {"a": 1} and json.loads(lines[2]) == {"c": "]"}
    assert lines[1] == '{"b": ' + _deep(DEEP) + "}"  # as written: the guard refuses it
    assert guard(fs, ndjson_copy(fs, str(path), str(path))).refused.keys() == {1}


def _died_or_ended(proc: ServeProcess, job_id: str) -> bool:
    assert proc.proc is not None
    try:
        return proc.proc.poll() is not None or _ended(proc.url, job_id) is not None
    except httpx.HTTPError:  # it is dying
        return False


# A real segfault is taken by the thread that faults, at once. os.kill(getpid()) is sent to
# the process instead: Linux hands it to a thread of its choosing (the event loop's), and
# the reading thread ran on meanwhile: under load its partition committed a batch of the
# file that "crashes" it, which restarts the count of deaths (a 4th crash).
_CRASH = """
import signal, threading
def _crash():
    signal.pthread_kill(threading.get_ident(), signal.SIGSEGV)  # this thread, as a fault
    threading.Event().wait()  # never reached: the thread does not read on
"""

_HOOK = (
    _CRASH
    + """
import lakesync.lake as _lake
_original = _lake.Lake._file_batches
def _file_batches(self, index, size, skip, filter, columns, *args, **kwargs):
    if "crash-me" in self.files[index] and columns is None:  # the copy, not the plan
        _crash()
    return _original(self, index, size, skip, filter, columns, *args, **kwargs)
_lake.Lake._file_batches = _file_batches
"""
)


def test_the_crash_stops_the_reading_thread_at_once(tmp_path: Path) -> None:
    """The test hook's crash, as a segfault in the reader: the thread that meets it never
    runs another line (it must not read, and commit, what crashes it)."""
    import subprocess
    import sys

    ran_on = tmp_path / "ran-on"
    child = _CRASH + textwrap.dedent(
        f"""
        import threading
        def read():
            _crash()
            open({str(ran_on)!r}, "w").close()
        threading.Thread(target=read).start()
        threading.Event().wait(60)
        """
    )
    for _ in range(12):
        done = subprocess.run([sys.executable, "-c", child], timeout=60, check=False)
        assert done.returncode == -signal.SIGSEGV
        assert not ran_on.exists()


@pytest.mark.slow
@pytest.mark.parametrize("partitioned", [False, True])
def test_a_reader_that_crashes_the_process_fails_its_job_after_three_runs(
    serve_env: dict[str, str], tmp_path: Path, db: Any, partitioned: bool
) -> None:
    """A test-only sitecustomize makes the reader kill the process (SIGSEGV) when it opens
    `crash-me.parquet` to copy it; the test restarts serve after each crash, as a
    supervisor would."""
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(textwrap.dedent(_HOOK))
    serve_env["PYTHONPATH"] = os.pathsep.join([str(hooks), serve_env.get("PYTHONPATH", "")])
    bad, fine = tmp_path / "bad", tmp_path / "fine"
    bad.mkdir()
    fine.mkdir()
    rows = pa.table({"id": [f"k{i}" for i in range(30)], "n": list(range(30))})
    if partitioned:  # one partition per file: the first completes, the second crashes
        pq.write_table(rows.slice(0, 10), bad / "a-good.parquet")
        serve_env["LAKESYNC_PARTITION_ROWS"] = "10"
    pq.write_table(rows.slice(10, 10), bad / "crash-me.parquet")
    pq.write_table(rows, fine / "all.parquet")
    ops = {
        "bad": {"source": str(bad), "collection": "bad", "key": "id"},
        "fine": {"source": str(fine), "collection": "fine", "key": "id"},
    }
    serve_env["LAKESYNC_OPERATIONS_FILE"] = str(write_operations(tmp_path / "ops.toml", ops))
    serve_env["LAKESYNC_BATCH_SIZE"] = "5"
    log = tmp_path / "serve.log"
    proc = ServeProcess(serve_env, log).start()
    crashes = 0
    try:
        job_id = _start(proc.url, "bad")
        while True:
            assert proc.proc is not None
            wait_for(lambda p=proc: _died_or_ended(p, job_id), timeout=120)
            if proc.proc.poll() is None:
                break  # the job ended and this serve is still up
            assert proc.proc.returncode == -signal.SIGSEGV
            crashes += 1
            assert crashes <= 3, log.read_text()[-3000:]
            proc = ServeProcess(serve_env, log)
            try:  # the recovery scan may take the job (and crash) before serve answers
                proc.start()
            except RuntimeError:
                assert proc.proc is not None and proc.proc.returncode is not None
        final = _ended(proc.url, job_id)
        other = _start(proc.url, "fine")
        done = wait_for(lambda: _ended(proc.url, other), timeout=120)
        assert httpx.get(f"{proc.url}/healthz", timeout=15).status_code == 200
    finally:
        proc.kill()
    assert crashes == 3
    assert final is not None and final["status"] == "failed", final
    assert "The lake crashed the reader in run 3: crash-me.parquet" in final["error"], final
    if partitioned:
        assert final["error"].startswith("Partition 2 of 2"), final
        assert db.bad.count_documents({}) == 10  # the other partition was copied
    assert done["status"] == "completed" and done["insertedRecords"] == 30, done


def test_a_record_nested_too_deep_is_refused_under_an_incremental_filter(tmp_path: Path) -> None:
    """The guard reads the record as {} (no watermark): a copy filtered by its watermark
    still meets it and rejects it with the reason, at its place, from any start row (it
    vanished without a rejection)."""
    import pyarrow.compute as pc

    from lakesync.sources.base import Position
    from lakesync.sources.lake import Lake

    lines = [json.dumps({"id": i, "seq": i}) for i in range(6)]
    lines[4] = '{"id": 4, "seq": 4, "v": ' + _deep(MAX_DEPTH + 50) + "}"
    (tmp_path / "a.ndjson").write_text("\n".join(lines) + "\n")
    lake = Lake.open(str(tmp_path), format="json")
    since = pc.field("seq") >= 2
    for start, size in ((0, 1), (0, 2), (0, 10), (2, 1), (3, 2)):
        seen, reasons = [], []
        for batch in lake.batches(size, Position(0, start), filter=since):
            ids = batch.table.column("id").to_pylist()
            for row in range(batch.table.num_rows):
                if row in batch.refused:
                    reasons.append(batch.refused[row])
                    seen.append("refused")
                else:
                    seen.append(ids[row])
        assert seen == ([2, 3, "refused", 5])[start:], (start, size, seen)
        assert all("more than 100 levels" in r for r in reasons)
    assert sum(b.table.num_rows for b in lake.batches(10, filter=since, columns=["seq"])) == 4
    assert lake.count_rows(since) == 4  # counted as the batches keep it
    # a file without the watermark column at all: its other rows filtered out, as before
    (tmp_path / "b.ndjson").write_text('{"id": 6}\n{"id": 7, "v": ' + _deep(MAX_DEPTH + 1) + "}\n")
    lake = Lake.open(str(tmp_path), format="json")
    last = list(lake.batches(10, filter=since))[-1]
    assert last.file.endswith("b.ndjson") and last.table.num_rows == 1 and 0 in last.refused
    assert lake.count_rows(since) == 5


def test_local_json_copies_live_in_a_folder_of_this_user_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A copy found by its name is used as it is: in a shared folder another user could
    plant one (or own the folder, and no copy could be made)."""
    import stat
    import tempfile

    fs = __import__("pyarrow.fs").fs.LocalFileSystem()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    lake = tmp_path / "a.json"
    lake.write_text('[{"a": 1}, {"b": ' + _deep(MAX_DEPTH + 1) + "}]")
    copy = Path(ndjson_copy(fs, str(lake), str(lake)))
    safe = guard(fs, str(copy))
    folder = copy.parent.parent  # the user's; in it, a folder of this process's copies
    assert folder.name == f"lakesync-json-{os.getuid()}" and copy.parent.name == str(os.getpid())
    assert Path(safe.path).parent == copy.parent
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert stat.S_IMODE(copy.parent.stat().st_mode) == 0o700
    folder.chmod(0o777)  # as if another user had made it, open to all
    lake.write_text('[{"a": 2}]')
    with pytest.raises(OSError, match="not a folder of this user's alone"):
        ndjson_copy(fs, str(lake), str(lake))


def test_json_text_that_is_not_utf8_rejects_its_record_only(
    settings: Any, db: Any, tmp_path: Path
) -> None:
    from lakesync.models import JobState
    from lakesync.runtime import Runtime

    lake = tmp_path / "latin"
    lake.mkdir()
    (lake / "a.ndjson").write_bytes(
        b'{"id": 1, "o": {"w": ["a"]}}\n{"id": 2, "v": "caf\xe9"}\n{"id": 3}\n'
        b'{"id": 4, "o": {"w": ["na\xefve"]}}\n'
    )
    ops = {"latin": {"source": str(lake), "collection": "latin", "key": "id"}}
    config = write_operations(tmp_path / "ops.toml", ops)
    with Runtime(settings.model_copy(update={"operations_file": config})) as rt:
        status, _ = rt.jobs.start("latin")
        rt.runner.run(status.jobId)
        done = rt.jobs.get(status.jobId)
    assert done.status == JobState.COMPLETED, done.error
    assert (done.insertedRecords, done.errorRecords) == (2, 2), done
    errors = list(db.copyerrors.find({"jobId": done.jobId}).sort("row"))
    assert [e["row"] for e in errors] == [1, 3]
    assert all("must be UTF-8" in e["reason"] for e in errors), errors
    assert db.latin.find_one({"_id": 1})["o"] == {"w": ["a"]}
