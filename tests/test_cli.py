"""The `lakesync` command as scripts use it: a child process, JSON on stdout, exit codes."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from tests.helpers import CONTRACT_FIELDS, ISO_Z, child_env, free_port, lakesync_all, wait_for

from lakesync.config import Settings


@pytest.fixture
def env(settings: Settings) -> dict[str, str]:
    """The session's embedded server, this test's database and the 5,000-row demo lake."""
    return child_env(settings, COLUMNS="80")


def lakesync(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return in_parallel((env, list(args)))[0]


def in_parallel(
    *commands: tuple[dict[str, str], list[str]],
) -> list[subprocess.CompletedProcess[str]]:
    """Run `lakesync` commands at the same time (each a process forked from the zygote)."""
    done = lakesync_all([(args, env) for env, args in commands], timeout=120)
    for result in done:
        if isinstance(result, subprocess.TimeoutExpired):
            raise result
    return done  # type: ignore[return-value]


def json_out(run: subprocess.CompletedProcess[str]) -> Any:
    lines = run.stdout.strip().splitlines()
    assert len(lines) == 1, run.stdout + run.stderr  # one JSON object, nothing else on stdout
    return json.loads(lines[0])


def one_line_error(run: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in run.stderr, run.stderr
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, run.stderr
    return errors[0]


def test_copy_status_and_jobs(env: dict[str, str], db: Any) -> None:
    first = lakesync(env, "copy", "--json")
    assert first.returncode == 0, first.stderr
    job = json_out(first)
    assert job["status"] == "completed" and job["operation"] == "copy-taskdetail"
    assert (job["totalRecords"], job["processedRecords"]) == (5000, 5000)
    assert (job["insertedRecords"], job["errorRecords"]) == (4975, 25)
    assert job["insertedRecords"] + job["errorRecords"] == job["totalRecords"]
    assert job["percentComplete"] == 100 and job["error"] is None
    for field, kind in CONTRACT_FIELDS.items():
        assert isinstance(job[field], kind), (field, job[field])
    for field in ("startTime", "endTime", "updatedAt", "heartbeatAt"):
        assert ISO_Z.match(job[field]), (field, job[field])
    assert db.copyerrors.count_documents({"jobId": job["jobId"]}) == 25

    second = lakesync(env, "copy", "copy-taskdetail", "--batch-size", "100000", "--json")
    assert second.returncode == 0, second.stderr
    again = json_out(second)
    assert (again["insertedRecords"], again["unchangedRecords"]) == (0, 4975)
    assert again["options"]["batchSize"] == 100000

    status, listed, latest, human = in_parallel(
        (env, ["status", job["jobId"], "--json"]),
        (env, ["jobs", "--json"]),
        (env, ["jobs", "--limit", "1", "--json"]),
        (env, ["status", job["jobId"]]),
    )
    assert status.returncode == listed.returncode == latest.returncode == 0, status.stderr
    assert json_out(status) == job  # the same document, field by field
    jobs = json_out(listed)
    assert list(jobs) == ["jobs"]
    assert [j["jobId"] for j in jobs["jobs"]] == [again["jobId"], job["jobId"]]  # newest first
    assert json_out(latest)["jobs"] == [again]
    assert human.returncode == 0 and job["jobId"] in human.stdout and "completed" in human.stdout


def test_failed_copy_exits_1_with_the_failed_status(
    env: dict[str, str], tmp_path: Path, db: Any
) -> None:
    junk = tmp_path / "junk" / "part-0.parquet"
    junk.parent.mkdir()
    junk.write_bytes(b"not parquet at all")
    run = lakesync(env, "copy", "--source", str(junk.parent), "--json")
    assert run.returncode == 1
    job = json_out(run)
    assert job["status"] == "failed" and "part-0.parquet" in job["error"]
    assert "not a valid parquet file" in job["error"] and ISO_Z.match(job["endTime"])
    assert db.taskdetails.count_documents({}) == 0

    human = lakesync(env, "copy", "--source", str(junk.parent))
    assert human.returncode == 1 and "failed" in human.stdout


BATCH = "LAKESYNC_BATCH_SIZE"
RANGE = "from 1 to 100000"


BAD_INPUT = [  # `copy` exits 1 unless it completes (the contract); other commands exit 2
    (["copy", "--json"], {BATCH: "0"}, 1, [f"{BATCH}='0'", "1..100000", "Fix the environment"]),
    (["jobs", "--json"], {BATCH: "100001"}, 2, [f"{BATCH}='100001'", "1..100000"]),
    (["copy", "--batch-size", "0", "--json"], {}, 1, ["--batch-size 0", RANGE]),
    (["copy", "--batch-size", "100001"], {}, 1, ["--batch-size 100001", RANGE]),
    (["copy", "no-such-op", "--json"], {}, 1, ["'no-such-op'", "Valid operations: copy-"]),
    (["copy", "--source", "/no/such/lake", "--json"], {}, 1, ["/no/such/lake", "not exist"]),
    (["copy", "--mode", "sideways"], {}, 1, ["options.mode", "'mirror' or 'dry-run'"]),
    (["status", "job_unknown", "--json"], {}, 1, ["job_unknown"]),
]


def test_bad_input_gives_one_clear_error_and_creates_no_job(env: dict[str, str], db: Any) -> None:
    runs = in_parallel(*((env | extra, args) for args, extra, _, _ in BAD_INPUT))
    for (args, extra, code, words), run in zip(BAD_INPUT, runs, strict=True):
        assert run.returncode == code, (args, extra, run.stderr)
        message = one_line_error(run)
        if "--json" in args:  # the same error, as JSON on stdout
            assert json_out(run) == {"error": message.removeprefix("error: ")}, args
        else:
            assert run.stdout == "", args
        for word in words:
            assert word in message, (args, extra, message)
    assert db.jobstatuses.count_documents({}) == 0


def test_copy_exits_1_on_arguments_it_cannot_parse(env: dict[str, str]) -> None:
    not_a_number, unknown, other_command = in_parallel(
        (env, ["copy", "--batch-size", "many", "--json"]),
        (env, ["copy", "--no-such-flag", "--json"]),
        (env, ["jobs", "--no-such-flag"]),
    )
    for run, words in ((not_a_number, ["'--batch-size'", "integer"]),
                       (unknown, ["No such option", "--no-such-flag"])):  # fmt: skip
        assert run.returncode == 1, (run.args, run.stderr)
        assert "Traceback" not in run.stderr
        assert words[1] in json_out(run)["error"]  # --json: the error as JSON on stdout
        for word in [*words, "lakesync copy --help"]:  # what is wrong and where to look
            assert word in run.stderr, (run.args, run.stderr)
    assert other_command.returncode == 2, other_command.stderr  # click's usual code elsewhere


def test_cancel_pending_finished_and_unknown_jobs(
    env: dict[str, str], settings: Settings, db: Any
) -> None:
    from lakesync.models import Outcome
    from lakesync.runtime import Runtime

    with Runtime(settings) as rt:  # no executor: created jobs stay pending until run here
        done, _ = rt.jobs.start("copy-taskdetail", trusted=True)
        assert rt.runner.run(done.jobId) is Outcome.ENDED
        assert rt.store.get(done.jobId).status == "completed"
        pending, created = rt.jobs.start("copy-taskdetail", trusted=True)
        assert created and pending.status == "pending"
        running, _ = rt.jobs.start("copy-taskdetail", {"source": str(settings.lake_uri) + "/*"},
                                   trusted=True)  # fmt: skip
        # as a worker does when it picks the job up (the test runs no batch of it)
        assert rt.store.claim(running.jobId, "another-worker", lease_seconds=60) is not None

    cancel_pending, cancel_running, cancel_done, cancel_unknown = in_parallel(
        (env, ["cancel", pending.jobId]),
        (env, ["cancel", running.jobId]),
        (env, ["cancel", done.jobId]),
        (env, ["cancel", "job_nosuchjob"]),
    )
    assert cancel_pending.returncode == 0, cancel_pending.stderr
    assert f"Job {pending.jobId} cancelled" in cancel_pending.stdout
    stored = db.jobstatuses.find_one({"jobId": pending.jobId})
    assert stored["status"] == "cancelled" and stored["endTime"] is not None

    assert cancel_running.returncode == 0, cancel_running.stderr
    assert f"Cancellation of job {running.jobId} requested" in cancel_running.stdout
    assert "stops after its current batch" in cancel_running.stdout
    stored = db.jobstatuses.find_one({"jobId": running.jobId})
    assert stored["status"] == "in_progress" and stored["cancelRequested"]  # True (or 1)

    assert cancel_done.returncode == 1 and cancel_done.stdout == ""
    message = one_line_error(cancel_done)
    assert done.jobId in message and "already ended with status completed" in message
    assert db.jobstatuses.find_one({"jobId": done.jobId})["status"] == "completed"

    assert cancel_unknown.returncode == 1 and cancel_unknown.stdout == ""
    assert "No job 'job_nosuchjob'" in one_line_error(cancel_unknown)

    again = lakesync(env, "cancel", pending.jobId)
    assert again.returncode == 0, again.stderr
    assert f"Job {pending.jobId} was already cancelled" in again.stdout


def test_demo_data_writes_a_lake_that_copies(env: dict[str, str], tmp_path: Path) -> None:
    out = tmp_path / "lake"
    run = lakesync(env, "demo-data", "--rows", "300", "--out", str(out), "--bad-rows", "6")
    assert run.returncode == 0, run.stderr
    assert "300" in run.stdout and any(out.rglob("*.parquet"))
    copy, used, too_many = in_parallel(
        (env, ["copy", "--source", str(out), "--json"]),
        (env, ["demo-data", "--rows", "10", "--out", str(out)]),
        (env, ["demo-data", "--rows", "10", "--bad-rows", "11", "--out", str(tmp_path / "x")]),
    )
    copied = json_out(copy)
    assert (copied["totalRecords"], copied["insertedRecords"], copied["errorRecords"]) == (
        300,
        294,
        6,
    )
    assert used.returncode != 0 and "already exists" in one_line_error(used)
    assert too_many.returncode == 2 and "--bad-rows" in one_line_error(too_many)


def test_ctrl_c_pauses_and_copy_again_resumes_with_exact_counts(
    env: dict[str, str], db: Any
) -> None:
    args = [sys.executable, "-m", "lakesync", "copy", "--batch-size", "50", "--json"]
    paused = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_for(
            lambda: (db.jobstatuses.find_one() or {}).get("processedRecords", 0) > 0,
            timeout=60,
            every=0.05,
        )
        paused.send_signal(signal.SIGINT)
        stdout, stderr = paused.communicate(timeout=60)
    finally:
        if paused.poll() is None:
            paused.kill()
    assert paused.returncode == 1, stderr
    job = json.loads(stdout)
    assert job["status"] == "pending" and 0 < job["processedRecords"] < 5000, job

    resumed = lakesync(env, "copy", "--batch-size", "50", "--json")
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed" in resumed.stderr
    done = json_out(resumed)
    assert done["jobId"] == job["jobId"] and done["status"] == "completed"
    assert (done["processedRecords"], done["insertedRecords"], done["errorRecords"]) == (
        5000,
        4975,
        25,
    )
    assert db.taskdetails.count_documents({}) == 4975
    assert db.copyerrors.count_documents({}) == 25


def test_reading_commands_do_not_generate_the_demo_lake(
    env: dict[str, str], settings: Settings
) -> None:
    env = {k: v for k, v in env.items() if k != "LAKESYNC_LAKE_URI"}
    env["LAKESYNC_DEMO_ROWS"] = "1000"  # small, should it be generated anyway
    listed = lakesync(env, "jobs", "--json")
    assert listed.returncode == 0 and json_out(listed) == {"jobs": []}
    assert not (settings.data_dir / "demo-lake").exists()


def test_jobs_from_another_folder_show_the_jobs_of_a_serve_started_elsewhere(
    settings: Settings, tmp_path: Path
) -> None:
    """One data folder per user: a serve on the embedded server, started in one folder, and
    the CLI run in another share the server, its jobs and `lakesync mongo-uri`."""
    env = child_env(settings, LAKESYNC_DATA_DIR=str(tmp_path / "user-data"))
    del env["LAKESYNC_MONGODB_URI"]  # the embedded server of the data folder
    here, there = tmp_path / "repo", tmp_path / "elsewhere"
    here.mkdir(), there.mkdir()
    port = free_port()
    with open(tmp_path / "serve.log", "ab") as log:
        serve = subprocess.Popen(
            [sys.executable, "-m", "lakesync", "serve", "--port", str(port)],
            env=env, cwd=here, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: _answers(url + "/healthz"), timeout=60)
        started = httpx.post(url + "/api/jobs", json={"operation": "copy-taskdetail"}).json()

        def run(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [sys.executable, "-m", "lakesync", *args],
                env=env, cwd=there, capture_output=True, text=True, timeout=120,
            )  # fmt: skip

        listed = json_out(run("jobs", "--json"))
        assert [j["jobId"] for j in listed["jobs"]] == [started["jobId"]]
        uri = run("mongo-uri")
        assert uri.returncode == 0 and uri.stdout.startswith("mongodb://127.0.0.1:"), uri.stderr
        assert str(tmp_path / "user-data") in uri.stderr  # says which folder's server
        quiet = run("jobs")
        assert quiet.returncode == 0 and started["jobId"] in quiet.stdout
        assert "INFO" not in quiet.stderr  # quiet by default
        told = run("-v", "jobs")
        assert str(tmp_path / "user-data") in told.stderr, told.stderr
        assert not (there / ".lakesync").exists() and not (here / ".lakesync").exists()
    finally:
        serve.send_signal(signal.SIGTERM)
        serve.wait(30)


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def test_resume_and_copy_follow_a_job_a_serve_runs(
    serve_env: dict[str, str], slow_database: Any, request: Any, env: dict[str, str], db: Any
) -> None:
    """`resume` (or `copy`) of a job another process runs follows it to its end, exit 0."""
    serve_env["LAKESYNC_BATCH_SIZE"] = "20"  # slow enough to be caught running
    serve_env["LAKESYNC_PARTITION_ROWS"] = "1000000"
    serve = request.getfixturevalue("serve")
    job_id = httpx.post(serve.url + "/api/jobs", json={"operation": "copy-taskdetail"}).json()[
        "jobId"
    ]
    wait_for(lambda: (db.jobstatuses.find_one({"jobId": job_id}) or {}).get("processedRecords"))
    resumed, copied = in_parallel((env, ["resume", job_id, "--json"]), (env, ["copy", "--json"]))
    for run in (resumed, copied):
        assert run.returncode == 0, run.stderr
        assert "another process runs it" not in run.stderr
        assert "following it here" in run.stderr, run.stderr
        done = json_out(run)
        assert done["jobId"] == job_id and done["status"] == "completed"
    assert db.taskdetails.count_documents({}) == 4975


def test_copy_picks_up_an_abandoned_job_whose_lease_expired(
    settings: Settings, env: dict[str, str], db: Any
) -> None:
    from lakesync.runtime import Runtime

    with Runtime(settings) as rt:
        status, _ = rt.jobs.start("copy-taskdetail", {}, trusted=True, trigger="cli")
        assert rt.store.claim(status.jobId, "gone:1:abcdef:1:abcd", 3) is not None
    assert db.jobstatuses.find_one({"jobId": status.jobId})["status"] == "in_progress"
    env = env | {"LAKESYNC_LEASE_SECONDS": "3"}
    run = lakesync(env, "copy", "--json")  # follows it until its lease expires, then takes over
    assert run.returncode == 0, run.stderr
    assert json_out(run)["jobId"] == status.jobId
    done = db.jobstatuses.find_one({"jobId": status.jobId})
    assert done["status"] == "completed" and done["processedRecords"] == 5000


def test_failures_tell_their_real_cause_and_keep_brackets(
    env: dict[str, str], tmp_path: Path
) -> None:
    lake = tmp_path / "lake"
    lake.mkdir()
    (lake / "bad[delta].parquet").write_bytes(b"PAR1 not parquet at all")
    failed = lakesync(env, "copy", "--source", str(lake))
    assert failed.returncode == 1
    shown = failed.stdout + failed.stderr
    assert "bad[delta].parquet" in shown, shown
    assert ": Failed" not in shown and "Traceback" not in shown

    s3 = env | {
        "LAKESYNC_S3_ENDPOINT_URL": "http://127.0.0.1:9",  # nothing listens
        "LAKESYNC_RETRY_BUDGET_SECONDS": "1",
        "AWS_ACCESS_KEY_ID": "x",
        "AWS_SECRET_ACCESS_KEY": "y",
    }
    for _ in range(2):  # the same true message when run again
        run = lakesync(s3, "copy", "--source", "s3://bucket/tasks")
        assert run.returncode == 1
        assert "another process" not in run.stderr + run.stdout, run.stderr
        assert "127.0.0.1:9" in run.stderr + run.stdout, run.stderr


def test_a_job_that_plans_says_so_in_status_simple_status_and_the_cli(
    settings: Settings, env: dict[str, str], db: Any
) -> None:
    """Before its first record a job plans (lists the files, finds the repeated keys): it is
    `in_progress` (the contract's statuses) and its `message` says what it plans, for
    `lakesync status`, GET simple-status and the page; then it copies."""
    from fastapi.testclient import TestClient

    from lakesync.api.app import create_app
    from lakesync.runtime import Runtime

    messages: list[str] = []
    seen: dict[str, Any] = {}
    with Runtime(settings) as rt, TestClient(create_app(rt)) as client:
        status, _ = rt.jobs.start("copy-taskdetail", {}, trusted=True)

        def progress(s: Any) -> None:
            messages.append(s.message)
            if s.message.startswith("Planning: finding repeated keys") and not seen:
                simple = "/.netlify/functions/simple-status"
                seen["api"] = client.get(simple, params={"jobId": s.jobId}).json()
                seen["json"], seen["human"] = in_parallel(
                    (env, ["status", s.jobId, "--json"]), (env, ["status", s.jobId])
                )

        rt.runner.run(status.jobId, on_progress=progress)
    assert messages[:2] == [
        "Planning: listing the lake's files",
        "Planning: finding repeated keys in 5,000 records",
    ], messages
    assert messages[2] == "Copying 5,000 records", messages
    api = seen["api"]
    assert (api["status"], api["processedRecords"]) == ("in_progress", 0), api
    assert api["message"] == "Planning: finding repeated keys in 5,000 records", api
    assert json_out(seen["json"])["message"] == api["message"]
    human = " ".join(seen["human"].stdout.split())
    assert "in_progress" in human and "Planning: finding repeated keys in 5,000 records" in human
    assert db.jobstatuses.find_one({"jobId": status.jobId})["status"] == "completed"


def test_status_of_a_partitioned_job_shows_its_partitions_not_a_job_checkpoint(
    settings: Settings, env: dict[str, str], db: Any
) -> None:
    """A partitioned job's checkpoints are its partitions' own: the job's checkpoint stays
    at file 0, row 0, batch 0 whatever the copy has done, and `status` once showed it as if
    it were where the job stands. It shows the partitions done instead."""
    from tests.test_partitions import stepped

    rt, queued = stepped(settings, Path(str(settings.lake_uri)))
    rt.settings.partition_rows = 1000  # the 5,000-row demo lake in several partitions
    with rt:
        job, _ = rt.jobs.start("copy-taskdetail")
        rt.runner.run(job.jobId)
        parts = rt.runner.partitioned
        assert parts is not None and len(queued) >= 3, queued
        runs = [(len(queued) - 1, queued[:1]), (0, queued[1:])]  # partway, then to the end
        shown = []
        for left, steps in runs:
            for step in steps:
                parts.run(*step)
            s = rt.store.get(job.jobId)
            assert s.partitions == len(queued) and s.partitionsDone == len(queued) - left, s
            human = lakesync(env, "status", job.jobId)
            assert human.returncode == 0, human.stderr
            shown.append(human.stdout)
            lines = human.stdout.splitlines()
            (at,) = [i for i, line in enumerate(lines) if line.split()[:1] == ["checkpoint"]]
            indent = lines[at].index("checkpoint") + len("checkpoint")
            block = [lines[at][indent:]]  # the checkpoint row, its value's lines below it
            for line in lines[at + 1 :]:
                if line[:indent].strip():  # the next field's name
                    break
                block.append(line)
            text = " ".join(" ".join(block).split())
            assert "fileIndex" not in text and "batches" not in text, human.stdout
            done = f"partitions: {s.partitionsDone:,} of {s.partitions:,} done"
            assert text.startswith(done), human.stdout
            assert "until: updatedAt = " in text, human.stdout  # the job's pinned watermark
        assert rt.store.get(job.jobId).status.value == "completed", shown
    assert json_out(lakesync(env, "status", job.jobId, "--json"))["checkpoint"] is not None
