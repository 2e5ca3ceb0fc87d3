"""Every `lakesync` command as a person runs it: on a pseudo-terminal 80 columns wide (the
command sees a tty, draws colours and a progress bar, takes Ctrl-C from the keyboard), and
in a pipe, as scripts and cron run it."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import typer
from tests.helpers import Terminal, child_env, free_port, lakesync, wait_for

from lakesync.cli import app
from lakesync.config import Settings
from lakesync.demo import generate

ROOT = Path(__file__).resolve().parent.parent
COMMANDS = sorted(typer.main.get_command(app).commands)  # type: ignore[attr-defined]


def on_terminal(env: dict[str, str], *args: str, timeout: float = 120) -> Any:
    """Run a command to its end on an 80-column terminal: (exit code, visible lines)."""
    term = Terminal(list(args), env).start()
    code = term.wait(timeout)
    return code, term.lines


def in_pipe(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """The command as a script or cron runs it: no terminal (stdout and stderr to files),
    forked from the test's zygote (tests.helpers.lakesync)."""
    return lakesync(env, *args, cwd=ROOT)


LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ [A-Z]+ ")


def assert_fits(lines: list[str], columns: int = 80) -> None:
    """What the command draws fits the terminal, log lines too (they wrap at their spaces: only
    a single word longer than the line, a path, may be wider)."""
    too_wide = [line for line in lines if len(line) > columns and len(line.split()) > 1]
    assert not too_wide, too_wide
    assert not any("Traceback" in line for line in lines), "\n".join(lines)


def piped_log(env: dict[str, str], job_id: str) -> list[str]:
    """A job's log messages as `lakesync logs` prints them in a pipe (one line each)."""
    piped = in_pipe(env, "logs", job_id)
    assert piped.returncode == 0, piped.stderr
    return [line.split(None, 2)[2] for line in piped.stdout.splitlines()]


def stored(db: Any, job_id: str) -> dict[str, Any]:
    doc: dict[str, Any] = db.jobstatuses.find_one({"jobId": job_id})
    return doc


@pytest.fixture(scope="module")
def lake20k(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """20,000 TaskDetail records, 12 of them bad."""
    out = tmp_path_factory.mktemp("lake20k") / "tasks"
    generate(out, 20_000, bad_rows=12, seed=3)
    return out


@pytest.fixture
def env(settings: Settings, lake20k: Path) -> dict[str, str]:
    return child_env(settings, LAKESYNC_LAKE_URI=str(lake20k), PYTHONPATH=str(ROOT / "src"))


def test_every_command_has_help_that_fits_80_columns_and_shows_flags_as_flags(
    env: dict[str, str],
) -> None:
    for command in [None, *COMMANDS]:
        args = ["--help"] if command is None else [command, "--help"]
        code, lines = on_terminal(env, *args)
        piped = in_pipe(env, *args)
        for where, out in (("terminal", "\n".join(lines)), ("pipe", piped.stdout)):
            assert "Usage: lakesync" in out, (where, command, out)
            assert "<bool>" not in out, (where, command, out)  # --json takes no value
        assert code == 0 and piped.returncode == 0, (command, lines, piped.stderr)
        assert_fits(lines)
        assert_fits(piped.stdout.splitlines())
        if command is None:
            assert {"serve", "copy", "status", "jobs", "cancel", "resume", "mongo-uri"} <= set(
                COMMANDS
            )
            for name in COMMANDS:
                assert name in "\n".join(lines), name


def test_copy_on_a_terminal_shows_the_progress_bar_then_the_summary(
    env: dict[str, str], db: Any
) -> None:
    term = Terminal(["copy", "--batch-size", "500"], env).start()
    code = term.wait(180)
    lines = term.lines
    text = "\n".join(lines)
    assert code == 0, text
    assert_fits(lines)
    bars = [line for line in lines if line.startswith("copying")]
    assert bars, text
    # before its first record the job plans: the bar says so (not a 0% that looks stuck)
    planning = [i for i, line in enumerate(lines) if line.startswith("planning")]
    assert planning and "listing the lake's files" in lines[planning[0]], text
    assert any("finding repeated keys" in lines[i] for i in planning), text
    first = next(i for i, line in enumerate(lines) if line.startswith("copying") and "%" in line)
    assert planning[-1] < first, text
    assert any("/20,000 records" in bar and "%" in bar for bar in bars), bars
    assert "100% 20,000/20,000 records" in bars[-1], bars[-1]
    assert "━" in bars[-1]  # the bar itself
    assert "\x1b[" in term.text  # colours: it knew it was on a terminal
    words = " ".join(text.split())  # the summary wraps at 80 columns
    assert "completed job_" in text and "Copied 20,000 records: 19,988 inserted" in words
    job = db.jobstatuses.find_one()
    assert (job["status"], job["processedRecords"], job["errorRecords"]) == ("completed", 20_000,
                                                                             12)  # fmt: skip

    # the same command in a pipe: no bar, no colours, the same summary on stdout
    piped = in_pipe(env, "copy", "--batch-size", "500")
    assert piped.returncode == 0, piped.stderr
    assert "\x1b[" not in piped.stdout + piped.stderr and "━" not in piped.stderr
    assert piped.stdout.startswith("completed job_") and "19,988 unchanged" in piped.stdout


def test_ctrl_c_of_a_copy_leaves_it_resumable_and_resume_finishes_it(
    env: dict[str, str], db: Any
) -> None:
    term = Terminal(["copy", "--batch-size", "100"], env, fresh=True).start()
    wait_for(lambda: (db.jobstatuses.find_one() or {}).get("processedRecords", 0) >= 2000,
             timeout=120, every=0.05)  # fmt: skip
    term.wait_for_text("records")  # the bar is up
    term.ctrl_c()
    code = term.wait(60)
    text = "\n".join(term.lines)
    assert code == 1, text  # documented: 1 unless the job completed
    assert "stopping after the current batch" in text and "Traceback" not in text
    job = db.jobstatuses.find_one()
    words = " ".join(text.split())
    assert f"continue it here with `lakesync resume {job['jobId']}`" in words, words
    assert f"follow it with `lakesync status {job['jobId']}`" in words  # if a serve takes it
    assert job["status"] == "pending" and 2000 <= job["processedRecords"] < 20_000, job
    assert f"pending {job['jobId']}" in text

    # `lakesync resume` of the pending job nobody runs continues it from its checkpoint
    resumed = Terminal(["resume", job["jobId"]], env).start()
    assert resumed.wait(180) == 0, "\n".join(resumed.lines)
    out = "\n".join(resumed.lines)
    assert "resumed from its checkpoint" in out and "100% 20,000/20,000 records" in out
    done = stored(db, job["jobId"])
    assert done["status"] == "completed" and done["attempt"] == 2
    assert (done["processedRecords"], done["insertedRecords"], done["errorRecords"]) == (
        20_000, 19_988, 12)  # fmt: skip
    assert db.taskdetails.count_documents({}) == 19_988

    again = in_pipe(env, "resume", job["jobId"], "--json")  # completed: nothing to resume
    assert again.returncode == 1
    assert json.loads(again.stdout)["error"].startswith(f"Job {job['jobId']} is completed")


def test_resume_follows_a_job_another_process_runs(
    env: dict[str, str], settings: Settings, db: Any
) -> None:
    from lakesync.runtime import Runtime

    with Runtime(settings) as rt:
        job, _ = rt.jobs.start("copy-taskdetail", trusted=True)
        assert rt.store.claim(job.jobId, "another-worker", lease_seconds=600) is not None
    term = Terminal(["resume", job.jobId], env).start()
    term.wait_for_text("following it here")
    term.ctrl_c()  # stops following, not the job
    code = term.wait(60)
    text = " ".join("\n".join(term.lines).split())
    assert code == 1 and "Traceback" not in text, text
    assert "stopped following; the job goes on" in text
    assert f"follow it with `lakesync status {job.jobId}`" in text
    assert stored(db, job.jobId)["owner"] == "another-worker"


def test_status_and_jobs_at_80_columns(env: dict[str, str], db: Any) -> None:
    first = in_pipe(env, "copy", "--json")
    job = json.loads(first.stdout)
    code, lines = on_terminal(env, "jobs")
    assert code == 0
    assert_fits(lines)
    at = next(i for i, line in enumerate(lines) if line.startswith("job_"))
    row, below = lines[at], lines[at + 1]
    assert row.split()[0] == job["jobId"], row  # whole: it can be pasted into status
    assert "completed" in row and "copy-taskdetail" in row
    assert "19,988 inserted" in below and "12 rejected" in below, below  # source and result
    assert below.split()[0].endswith("tasks"), below

    code, lines = on_terminal(env, "status", job["jobId"])
    text = "\n".join(lines)
    assert code == 0 and job["jobId"] in text
    assert_fits(lines)
    assert "{'" not in text and "':" not in text  # no Python dict
    assert re.search(r"checkpoint +fileIndex: \d+", text), text
    assert re.search(r"^ +batches: \d+$", text, re.M), text
    assert re.search(r"processedRecords +20,000", text) and "cancelRequested   no" in text

    piped = in_pipe(env, "jobs")
    assert piped.returncode == 0 and job["jobId"] in piped.stdout
    assert "\x1b[" not in piped.stdout

    code, lines = on_terminal(env, "operations")  # the last job's id is whole there too
    whole = any(line.split()[-1:] == [job["jobId"]] for line in lines)
    assert code == 0 and whole, "\n".join(lines)
    assert_fits(lines)


def test_json_errors_go_to_stdout_as_json(env: dict[str, str]) -> None:
    cases = [
        (["status", "job_nosuchjob", "--json"], 1, "No job 'job_nosuchjob'"),
        (["copy", "--batch-size", "many", "--json"], 1, "--batch-size"),
        (["copy", "--mode", "sideways", "--json"], 1, "options.mode"),
        (["jobs", "--limit", "0", "--json"], 2, "--limit"),
        (["resume", "job_nosuchjob", "--json"], 1, "No job"),
        (["operations", "--json", "--what"], 2, "No such option"),
    ]
    for args, code, words in cases:
        run = in_pipe(env, *args)
        assert run.returncode == code, (args, run.stderr)
        lines = run.stdout.splitlines()
        assert len(lines) == 1, (args, run.stdout)
        assert words in json.loads(lines[0])["error"], (args, run.stdout)
        assert "Traceback" not in run.stderr
    code, lines = on_terminal(env, "status", "job_nosuchjob", "--json")
    assert code == 1 and any(line.startswith('{"error": "No job') for line in lines), lines


def test_cancel_asks_on_a_terminal_and_not_in_a_pipe(
    env: dict[str, str], settings: Settings, db: Any
) -> None:
    from lakesync.runtime import Runtime

    with Runtime(settings) as rt:  # no executor: jobs stay pending
        kept, _ = rt.jobs.start("copy-taskdetail", trusted=True)
        other, _ = rt.jobs.start("copy-taskdetail", {"source": settings.lake_uri + "/*"},
                                 trusted=True)  # fmt: skip
        third, _ = rt.jobs.start("copy-taskdetail", {"source": settings.lake_uri + "/**"},
                                 trusted=True)  # fmt: skip

    term = Terminal(["cancel", kept.jobId], env).start()
    term.wait_for_text("[y/N]")
    assert f"Cancel job {kept.jobId}" in "\n".join(term.lines)
    term.type("n\n")
    assert term.wait(60) == 1
    assert "Not cancelled" in "\n".join(term.lines)
    assert stored(db, kept.jobId)["status"] == "pending"

    term = Terminal(["cancel", kept.jobId], env).start()
    term.wait_for_text("[y/N]")
    term.type("y\n")
    assert term.wait(60) == 0
    assert f"Job {kept.jobId} cancelled; 0 records had been copied." in "\n".join(term.lines)
    assert stored(db, kept.jobId)["status"] == "cancelled"

    code, lines = on_terminal(env, "cancel", "--yes", other.jobId)
    assert code == 0 and not any("[y/N]" in line for line in lines), lines
    assert stored(db, other.jobId)["status"] == "cancelled"

    piped = in_pipe(env, "cancel", third.jobId)  # stdin is not a terminal: no question
    assert piped.returncode == 0 and "[y/N]" not in piped.stderr, piped.stderr
    assert stored(db, third.jobId)["status"] == "cancelled"


def test_operations_demo_data_worker_and_mongo_uri(env: dict[str, str], tmp_path: Path) -> None:
    code, lines = on_terminal(env, "operations")
    assert code == 0 and "copy-taskdetail" in "\n".join(lines)
    assert_fits(lines)
    assert in_pipe(env, "operations").returncode == 0

    code, lines = on_terminal(env, "demo-data", "--rows", "1", "--out", str(tmp_path / "one"))
    assert code == 0 and "wrote 1 record (0 bad)" in "\n".join(lines), lines
    piped = in_pipe(env, "demo-data", "--rows", "3", "--out", str(tmp_path / "three"))
    assert piped.returncode == 0 and "wrote 3 records" in piped.stdout

    code, lines = on_terminal(env, "worker")  # local executor: no broker to work for
    assert code == 2 and any("LAKESYNC_BROKER_URL" in line for line in lines), lines
    # (errors are one line, however long, for scripts: the terminal wraps them)

    secret = env | {"LAKESYNC_MONGODB_URI": "mongodb://me:s3cret@db.example:27017/?tls=true"}
    masked = in_pipe(secret, "mongo-uri")
    assert masked.stdout == "mongodb://me:***@db.example:27017/" + env["LAKESYNC_DATABASE"] \
        + "?tls=true\n"  # fmt: skip
    shown = in_pipe(secret, "mongo-uri", "--show-password", "--json")
    assert json.loads(shown.stdout)["uri"].startswith("mongodb://me:s3cret@")
    code, lines = on_terminal(secret, "mongo-uri")
    assert code == 0 and any("me:***@db.example" in line for line in lines)

    embedded = {k: v for k, v in env.items() if k != "LAKESYNC_MONGODB_URI"}
    embedded["LAKESYNC_DATA_DIR"] = str(tmp_path / "nothing-running")
    down = in_pipe(embedded, "mongo-uri")
    assert down.returncode == 1 and down.stdout == ""
    assert "not running" in down.stderr and "lakesync serve" in down.stderr


def test_serve_on_a_terminal_starts_prints_where_the_data_is_and_stops_on_ctrl_c(
    env: dict[str, str], tmp_path: Path
) -> None:
    """The embedded server, as `make run` uses it: where the records are, and Ctrl-C."""
    from pymongo import MongoClient

    serve_env = {k: v for k, v in env.items() if k != "LAKESYNC_MONGODB_URI"}
    serve_env["LAKESYNC_DATA_DIR"] = str(tmp_path / "data")
    port = free_port()
    term = Terminal(["serve", "--port", str(port)], serve_env, fresh=True).start()
    try:
        term.wait_for_text(f"open http://127.0.0.1:{port}/", timeout=90)
        term.wait_for_text("lakesync mongo-uri")
        r = httpx.post(f"http://127.0.0.1:{port}/api/jobs", json={"operation": "copy-taskdetail"})
        assert r.status_code == 202, r.text
        url = f"http://127.0.0.1:{port}/api/jobs/{r.json()['jobId']}"
        wait_for(lambda: httpx.get(url).json()["status"] == "completed", timeout=120)

        uri = in_pipe(serve_env, "mongo-uri")
        assert uri.returncode == 0, uri.stderr
        printed = uri.stdout.strip()
        assert printed in "\n".join(term.lines)  # the same address serve printed
        client: MongoClient[dict[str, Any]] = MongoClient(printed, serverSelectionTimeoutMS=5000)
        try:  # the URI names the database: what mongosh "$(lakesync mongo-uri)" opens
            database = client.get_default_database()
            assert database.name == env["LAKESYNC_DATABASE"]
            assert database.taskdetails.count_documents({}) == 19_988
        finally:
            client.close()

        started = time.monotonic()
        term.ctrl_c()
        assert term.wait(30) in (0, 1, -signal.SIGINT, 130)
        assert time.monotonic() - started < 10
    finally:
        if term.proc is not None and term.proc.poll() is None:
            term.proc.kill()
    text = "\n".join(term.lines)
    assert "Traceback" not in text and "Exception in ASGI" not in text, text
    assert "embedded MongoDB-wire server stopped" in " ".join(text.split())  # wrapped log
    assert in_pipe(serve_env, "mongo-uri").returncode == 1  # gone with serve


def test_serve_on_a_taken_port_says_how_to_choose_another(env: dict[str, str]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, lines = on_terminal(env, "serve", "--port", str(port))
        piped = in_pipe(env, "serve", "--port", str(port))
    text = "\n".join(lines)
    for shown, rc in ((text, code), (piped.stderr + piped.stdout, piped.returncode)):
        out = " ".join(shown.split())  # on a terminal the error wraps at its spaces
        assert rc == 2, out
        assert f"Port {port} on 127.0.0.1 is already in use" in out, out
        assert "--port 8400" in out and "make run PORT=8400" in out
        assert "serving on" not in out and "open http" not in out and "Traceback" not in out


def test_make_run_takes_the_port() -> None:
    run = subprocess.run(["make", "-n", "run", "PORT=8400"], cwd=ROOT, capture_output=True,
                         text=True, check=True)  # fmt: skip
    assert "lakesync serve --host 127.0.0.1 --port 8400" in run.stdout


def _sse_client(url: str, seen: list[str], stop: threading.Event) -> None:
    try:
        with httpx.stream("GET", url, timeout=30) as r:
            for line in r.iter_lines():
                seen.append(line)
                if stop.is_set():
                    return
    except httpx.HTTPError as e:
        seen.append(f"error: {e}")


def test_ctrl_c_of_serve_during_a_partitioned_copy_hands_the_job_back(
    env: dict[str, str], db: Any
) -> None:
    serve_env = env | {
        "LAKESYNC_PARTITION_ROWS": "2000",
        "LAKESYNC_WORKERS": "2",
        "LAKESYNC_BATCH_SIZE": "100",
        "LAKESYNC_LEASE_SECONDS": "60",  # a resume within 5 s cannot be a lease expiry
    }
    port = free_port()
    term = Terminal(["serve", "--port", str(port)], serve_env, fresh=True).start()
    base = f"http://127.0.0.1:{port}"
    stop = threading.Event()
    try:
        term.wait_for_text(f"open {base}/", timeout=90)
        job_id = httpx.post(f"{base}/api/jobs", json={}).json()["jobId"]

        def copying() -> bool:
            doc = stored(db, job_id)
            return bool(doc.get("partitions")) and doc.get("processedRecords", 0) >= 1000

        wait_for(copying, timeout=120, every=0.1)
        seen: list[str] = []  # the page's event stream stays open through the shutdown
        sse = threading.Thread(target=_sse_client, args=(f"{base}/api/jobs/{job_id}/events",
                                                         seen, stop), daemon=True)  # fmt: skip
        sse.start()
        wait_for(lambda: any(line.startswith("data:") for line in seen), timeout=30)
        started = time.monotonic()
        term.ctrl_c()
        term.wait(30)
        took = time.monotonic() - started
    finally:
        stop.set()
        if term.proc is not None and term.proc.poll() is None:
            term.proc.kill()
    text = "\n".join(term.lines)
    assert took < 20, (took, text)  # an event stream holding the shutdown: it never ends
    assert "Exception in ASGI" not in text and "CancelledError" not in text, text
    assert "Traceback" not in text, text
    words = " ".join(text.split())  # log lines wrap at their spaces on a terminal
    assert words.index("handing running jobs back") < words.index("running jobs handed back")
    paused = stored(db, job_id)
    assert paused["status"] == "pending", paused  # handed back, not left in_progress
    before = paused["processedRecords"]
    assert 0 < before < 20_000

    port = free_port()
    again = Terminal(["serve", "--port", str(port)], serve_env).start()
    try:
        again.wait_for_text(f"open http://127.0.0.1:{port}/", timeout=90)
        # handed back (pending, above), so the new process takes it up as it starts
        wait_for(lambda: stored(db, job_id)["processedRecords"] > before, timeout=60, every=0.05)
        wait_for(lambda: stored(db, job_id)["status"] == "completed", timeout=180)
    finally:
        again.ctrl_c()
        again.wait(30)
    done = stored(db, job_id)
    assert done["processedRecords"] == done["totalRecords"] == 20_000
    assert done["failures"] == 0  # a hand-back, not a crash
    assert db.taskdetails.count_documents({}) == 19_988


def test_operations_schedules_and_errors_fit_80_columns_without_splitting_words(
    env: dict[str, str], tmp_path: Path, lake20k: Path
) -> None:
    """Tables designed for 80 columns: long descriptions wrap at spaces, paths and times are
    never split, job ids stay whole; and no INFO line before them."""
    about = (
        "Copy the projects of the demo lake into their own collection every night, with a "
        "description long enough to wrap over several lines of a narrow terminal"
    )
    config = tmp_path / "lakesync.toml"
    config.write_text(
        f'[operations.copy-projects]\ndescription = "{about}"\nsource = "{lake20k}"\n'
        'collection = "projects"\nkey = "taskDetailId"\nschedule = "30 7 * * *"\n'
        'timezone = "Europe/Berlin"\n'
    )
    env = env | {"LAKESYNC_OPERATIONS_FILE": str(config)}
    copied = json.loads(in_pipe(env, "copy", "copy-projects", "--json").stdout)
    logged = piped_log(env, copied["jobId"])
    for command in (
        ["operations"],
        ["schedules"],
        ["errors", copied["jobId"]],
        ["jobs"],
        ["logs", copied["jobId"]],
    ):
        code, lines = on_terminal(env, *command)
        assert code == 0, lines
        assert_fits(lines)
        text = "\n".join(lines)
        assert "Traceback" not in text, text
        assert "INFO" not in text or command[0] == "logs", text  # a job's log has levels
        words = set(text.split())
        if command == ["operations"]:
            assert set(about.replace(",", "").split()) <= {w.strip(",") for w in words}, text
            assert str(lake20k) in words  # the path whole, on one line
            assert copied["jobId"] in words
            assert re.search(r"next \d\d-\d\d 07:30 CES?T", text), text  # time and zone
        if command == ["schedules"]:
            assert re.search(r"\d\d-\d\d 07:30 CES?T", text), text
        if command[0] == "logs":  # each message wraps at its spaces: every word whole
            assert len(logged) >= 4
            for line in logged:
                assert set(line.split()) <= words, (line, text)
        if command[0] == "errors":
            assert f"files under {lake20k}/" in text
            rows = [line for line in lines if line.startswith(("(none)", "TD-"))]
            assert rows and all(re.search(r"PRJ-\d+/part-\d+\.parquet:\d+", r) for r in rows)


def test_schedules_shows_a_failing_schedules_error_whole_at_80_columns(
    env: dict[str, str], tmp_path: Path, lake20k: Path, db: Any
) -> None:
    """A schedule's error, as a serve's scheduler records it on the schedule, is shown by
    `lakesync schedules` below its table: whole words, square brackets kept (not markup),
    within 80 columns; the failing schedule's next run says so; the others are as before."""
    config = tmp_path / "lakesync.toml"
    config.write_text(
        f'[operations.nightly]\nsource = "{lake20k}"\ncollection = "nightly"\n'
        'key = "taskDetailId"\nschedule = "30 7 * * *"\ntimezone = "Europe/Berlin"\n\n'
        f'[operations.copy-projects-hourly]\nsource = "{lake20k}"\ncollection = "projects"\n'
        'key = "taskDetailId"\nevery = "1h"\n'
    )
    env = env | {"LAKESYNC_OPERATIONS_FILE": str(config)}
    error = (
        f"SourceError: The lake {lake20k}/gone holds no data files: check `source` of "
        "copy-projects-hourly in lakesync.toml, or pip install 'lakesync[delta]' for Delta"
    )
    db.schedules.update_one(
        {"_id": "copy-projects-hourly"}, {"$set": {"error": error}}, upsert=True
    )
    listed = json.loads(in_pipe(env, "schedules", "--json").stdout)["schedules"]
    assert {s["operation"]: s["error"] for s in listed} == {
        "nightly": None, "copy-projects-hourly": error}  # fmt: skip
    code, lines = on_terminal(env, "schedules")
    assert code == 0, lines
    assert_fits(lines)
    text = "\n".join(lines)
    assert "INFO" not in text, text
    shown = " ".join(text[text.index("schedule of copy-projects-hourly failing:") :].split())
    assert shown == f"schedule of copy-projects-hourly failing: {error}", text
    assert re.search(r"nightly .* \d\d-\d\d 07:30 CES?T", text), text
    assert "Europe/Berlin" in text.split(), text  # a time zone never split
    rows = [line for line in lines if line.startswith("copy-projects-hourly ")]
    assert rows and re.search(r"every 1h +\d\d-\d\d \d\d:00 UTC", rows[0]), text  # it runs on
    piped = in_pipe(env, "schedules")
    assert f"schedule of copy-projects-hourly failing: {error}\n" in piped.stdout


def test_schedules_too_wide_for_80_columns_are_one_block_each(
    env: dict[str, str], tmp_path: Path, lake20k: Path, db: Any
) -> None:
    """Schedules whose table would not fit 80 columns (a long name, cron and zone) are shown
    one block each: the name on its own line, then `key: value` lines, every value whole,
    rather than a table whose rows wrap into each other's columns."""
    names = ["copy-projects-of-the-demo-lake-into-their-own-collection", "hourly"]
    config = tmp_path / "lakesync.toml"
    config.write_text(
        f'[operations.{names[0]}]\nsource = "{lake20k}"\ncollection = "projects"\n'
        'key = "taskDetailId"\nschedule = "15,45 6-22/2 * * 1-5"\n'
        'timezone = "America/Argentina/Buenos_Aires"\n\n'
        f'[operations.{names[1]}]\nsource = "{lake20k}"\ncollection = "hourly"\n'
        'key = "taskDetailId"\nevery = "1h"\n'
    )
    env = env | {"LAKESYNC_OPERATIONS_FILE": str(config)}
    job_id = "job_" + "q" * 26  # a job whose status has expired: its result is unknown
    db.scheduleslots.insert_one(
        {"_id": f"{names[0]}|0", "operation": names[0], "slotMs": 1_780_000_000_000,
         "slot": "2026-05-28T20:26:40.000Z", "outcome": "started", "jobId": job_id}
    )  # fmt: skip
    listed = json.loads(in_pipe(env, "schedules", "--json").stdout)["schedules"]
    assert [s["operation"] for s in listed] == names
    assert listed[0]["lastRun"]["jobId"] == job_id, listed
    code, lines = on_terminal(env, "schedules")
    assert code == 0, lines
    piped = in_pipe(env, "schedules")  # no terminal: 80 columns too
    assert piped.returncode == 0, piped.stderr
    for shown in (lines, piped.stdout.splitlines()):
        text = "\n".join(shown)
        assert_fits(shown)
        assert "operation" not in text.split(), text  # no table header
        heads = [i for i, line in enumerate(shown) if line in names]
        assert [shown[i] for i in heads] == names, text  # each name alone on its line
        first = shown[heads[0] + 1 : heads[1]]
        fields = dict(line.strip().split(": ", 1) for line in first if line.strip())
        assert fields == {
            "schedule": "15,45 6-22/2 * * 1-5 America/Argentina/Buenos_Aires",
            "next run": fields["next run"],
            "last run": f"05-28 17:26 -03 started {job_id}",
        }, text
        assert re.fullmatch(r"\d\d-\d\d \d\d:[14]5 -03", fields["next run"]), text
        second = dict(line.strip().split(": ", 1) for line in shown[heads[1] + 1 :] if line)
        assert second["schedule"] == "every 1h" and second["last run"] == "-", text
        assert re.fullmatch(r"\d\d-\d\d \d\d:00 UTC", second["next run"]), text


def test_an_error_wraps_at_spaces_on_a_terminal_and_is_one_line_in_a_pipe(
    env: dict[str, str],
) -> None:
    missing = "job_" + "x" * 26
    piped = in_pipe(env, "status", missing)
    assert piped.returncode == 1 and piped.stderr.count("\n") == 1, piped.stderr
    message = piped.stderr.strip()
    assert message.startswith("error: ") and len(message) > 80, message
    code, lines = on_terminal(env, "status", missing)
    assert code == 1, lines
    assert_fits(lines)
    assert set(message.split()) <= set("\n".join(lines).split()), lines  # no word split


def test_pause_and_unpause_say_what_changed_and_the_next_run_in_its_zone(
    env: dict[str, str], tmp_path: Path, lake20k: Path
) -> None:
    config = tmp_path / "lakesync.toml"
    config.write_text(
        f'[operations.nightly]\nsource = "{lake20k}"\ncollection = "n"\nkey = "taskDetailId"\n'
        'schedule = "30 7 * * *"\ntimezone = "Europe/Berlin"\n'
    )
    env = env | {"LAKESYNC_OPERATIONS_FILE": str(config)}
    said = []
    for command in ("pause", "pause", "unpause", "unpause"):
        done = in_pipe(env, command, "nightly")
        assert done.returncode == 0, done.stderr
        said.append(done.stdout.strip())
    assert said[0] == "Schedule of nightly is now paused; running jobs go on.", said
    assert said[1] == "Schedule of nightly was already paused; running jobs go on.", said
    assert re.fullmatch(r"Schedule of nightly is now running; next run \d\d-\d\d 07:30 CES?T\.",
                        said[2]), said  # fmt: skip
    assert said[3].startswith("Schedule of nightly was already running; next run "), said


def test_verbose_log_lines_wrap_at_spaces_on_a_terminal_and_are_one_line_in_a_pipe(
    env: dict[str, str],
) -> None:
    """`-v` logs each step on stderr: on a terminal each line wraps at its spaces (the rest
    indented under its time), as errors and `lakesync logs` do; in a pipe one line each."""
    piped = in_pipe(env, "-v", "copy", "--mode", "dry-run")
    assert piped.returncode == 0, piped.stderr
    logged = [line for line in piped.stderr.splitlines() if LOG_LINE.match(line)]
    assert any(len(line) > 80 for line in logged), logged  # one line each, however long
    assert len(logged) >= 4, piped.stderr
    code, lines = on_terminal(env, "-v", "copy", "--mode", "dry-run")
    assert code == 0, lines
    wide = [line for line in lines if len(line) > 80]
    assert not wide, wide  # not even a log line is cut by the terminal at column 80
    records: list[str] = []  # each log line, its wrapped rest (the lines below it) joined
    rest = False
    drawn = False  # the bar is shown: rich prints the log lines above it, through its proxy
    above_the_bar = []  # the log lines printed while the bar was shown that wrapped
    for line in lines:
        if LOG_LINE.match(line):
            records.append(line)
            rest = True
        elif not line.strip() or line.startswith(("copying", "planning")) or not rest:
            rest = False  # the bar, a notice: not part of a log line
            drawn = drawn or line.startswith(("copying", "planning"))
        else:
            # wrapped at its spaces, the rest indented under its time: rich's stderr proxy
            # once hid the terminal, and rich wrapped the line itself, flush left
            assert line.startswith("  ") and not line.startswith("   "), "\n".join(lines)
            records[-1] += " " + line.strip()
            if drawn:
                above_the_bar.append(records[-1])
    assert any(len(r) > 80 for r in records), lines  # it wrapped, nothing was dropped
    assert above_the_bar, "\n".join(lines)  # (the bar's log lines are checked above)
    ids = re.compile(r"job_[0-9a-z]{26}|^\S+ \S+")  # another job, another time

    def shape(line: str) -> str:
        return " ".join(ids.sub("", line).split())

    assert [shape(r) for r in records] == [shape(r) for r in logged], "\n".join(lines)
