"""A job's rejected records, its own log, job paging, /docs offline and `lakesync errors|logs`,
against a real `lakesync serve` and the CLI as a person runs it (pipe and pseudo-terminal)."""

from __future__ import annotations

import csv
import io
import json
import re
import time
from pathlib import Path
from typing import Any

import httpx
from tests.helpers import ServeProcess, Terminal, lakesync, wait_for

from lakesync import metrics
from lakesync.runner import RUNNING


def finished(url: str, job_id: str, timeout: float = 60) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        doc: dict[str, Any] = httpx.get(f"{url}/api/jobs/{job_id}").json()
        return doc if doc["status"] in ("completed", "failed", "cancelled") else None

    result: dict[str, Any] = wait_for(done, timeout=timeout)
    return result


def start(url: str, **options: Any) -> str:
    r = httpx.post(f"{url}/api/jobs", json={"operation": "copy-taskdetail", "options": options})
    assert r.status_code == 202, r.text
    return str(r.json()["jobId"])


def test_rejected_records_page_by_page_and_as_downloads(serve: ServeProcess) -> None:
    job_id = start(serve.url, batchSize=700)
    job = finished(serve.url, job_id)
    assert job["status"] == "completed" and job["errorRecords"] == 25

    seen: list[dict[str, Any]] = []
    after = None
    pages = 0
    while True:
        params: dict[str, Any] = {"limit": 10}
        if after:
            params["after"] = after
        r = httpx.get(f"{serve.url}/api/jobs/{job_id}/errors", params=params)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["errorRecords"] == 25
        seen += body["errors"]
        pages += 1
        after = body["next"]
        if after is None:
            break
    assert pages == 3 and len(seen) == 25
    assert len({(e["file"], e["row"]) for e in seen}) == 25, "a record was listed twice"
    assert [(e["file"], e["row"]) for e in seen] == sorted((e["file"], e["row"]) for e in seen)
    for e in seen:
        assert set(e) == {"key", "file", "row", "reason", "time"}
        assert e["file"].endswith(".parquet") and isinstance(e["row"], int) and e["reason"]
        assert e["time"].endswith("Z")

    r = httpx.get(f"{serve.url}/api/jobs/{job_id}/errors", params={"format": "csv"})
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/csv")
    assert f'filename="{job_id}-errors.csv"' in r.headers["content-disposition"]
    rows = list(csv.DictReader(io.StringIO(r.text)))
    assert len(rows) == 25
    assert [(x["file"], int(x["row"]), x["reason"]) for x in rows] == [
        (e["file"], e["row"], e["reason"]) for e in seen
    ]

    r = httpx.get(f"{serve.url}/api/jobs/{job_id}/errors", params={"format": "ndjson"})
    assert r.headers["content-type"].startswith("application/x-ndjson")
    assert [json.loads(line) for line in r.text.splitlines()] == seen

    # bad input: plain errors, never a trace
    bad = httpx.get(f"{serve.url}/api/jobs/{job_id}/errors", params={"after": "nonsense"})
    assert bad.status_code == 400 and "next" in bad.json()["error"]
    assert httpx.get(f"{serve.url}/api/jobs/{job_id}/errors?format=xml").status_code == 422
    assert httpx.get(f"{serve.url}/api/jobs/{job_id}/errors?limit=0").status_code == 422
    missing = httpx.get(f"{serve.url}/api/jobs/job_0000000000000000000000000z/errors")
    assert missing.status_code == 404 and "error" in missing.json()


def test_a_job_keeps_its_own_log(serve: ServeProcess, tmp_path: Path) -> None:
    job_id = start(serve.url)
    finished(serve.url, job_id)

    def lines() -> list[dict[str, Any]]:
        r = httpx.get(f"{serve.url}/api/jobs/{job_id}/logs")
        assert r.status_code == 200, r.text
        got: list[dict[str, Any]] = r.json()["lines"]
        return got if any("Completed" in x["message"] for x in got) else []

    got = wait_for(lines, timeout=10)
    text = "\n".join(x["message"] for x in got)
    assert "Run 1 started" in text
    assert "Completed: Copied 5,000 records" in text
    assert job_id not in text  # a job's own log does not repeat its id on every line
    assert all(x["level"] in ("info", "warning", "error", "critical") for x in got)
    assert all(x["time"].endswith("Z") for x in got)
    times = [x["time"] for x in got]
    assert times == sorted(times)

    # a failing job logs its cause
    bad = tmp_path / "bad-lake"
    bad.mkdir()
    (bad / "x.parquet").write_text("not parquet\n")
    failed_id = start(serve.url, source=str(bad))
    assert finished(serve.url, failed_id)["status"] == "failed"
    failed = wait_for(
        lambda: [
            x
            for x in httpx.get(f"{serve.url}/api/jobs/{failed_id}/logs").json()["lines"]
            if x["level"] == "error"
        ],
        timeout=10,
    )
    assert "not a valid parquet file" in failed[0]["message"]
    # the other job's lines stay its own
    other = httpx.get(f"{serve.url}/api/jobs/{job_id}/logs").json()["lines"]
    assert all(failed_id not in x["message"] for x in other)
    assert httpx.get(f"{serve.url}/api/jobs/job_0000000000000000000000000z/logs").status_code == 404


def test_jobs_list_pages_and_filters(serve: ServeProcess, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.parquet").write_text("nope")
    made = []
    for i in range(5):
        made.append(start(serve.url, source=str(bad)) if i % 2 else start(serve.url))
        finished(serve.url, made[-1])
    newest_first = list(reversed(made))

    listed: list[str] = []
    before = None
    while True:
        params: dict[str, Any] = {"limit": 2}
        if before:
            params["before"] = before
        body = httpx.get(f"{serve.url}/api/jobs", params=params).json()
        assert len(body["jobs"]) <= 2
        listed += [j["jobId"] for j in body["jobs"]]
        before = body["next"]
        if before is None:
            break
    assert listed == newest_first

    failed = httpx.get(f"{serve.url}/api/jobs", params={"status": "failed", "limit": 1}).json()
    assert [j["jobId"] for j in failed["jobs"]] == [made[3]]
    rest = httpx.get(
        f"{serve.url}/api/jobs", params={"status": "failed", "limit": 1, "before": failed["next"]}
    ).json()
    assert [j["jobId"] for j in rest["jobs"]] == [made[1]] and rest["next"] is None
    none = httpx.get(f"{serve.url}/api/jobs", params={"operation": "nope"}).json()
    assert none == {"jobs": [], "next": None}
    bad_cursor = httpx.get(f"{serve.url}/api/jobs", params={"before": "job_nope"})
    assert bad_cursor.status_code == 404 and "next" in bad_cursor.json()["error"]  # expired


def test_docs_are_served_without_a_cdn(serve: ServeProcess) -> None:
    page = httpx.get(f"{serve.url}/docs")
    assert page.status_code == 200
    assert "http" not in page.text.replace("http-equiv", ""), "the docs page loads from elsewhere"
    assert "<script>" not in page.text, "an inline script would break a strict CSP"
    for asset in (
        "/docs/assets/swagger-ui-bundle.js",
        "/docs/assets/swagger-ui.css",
        "/docs/init.js",
    ):
        r = httpx.get(serve.url + asset)
        assert r.status_code == 200 and len(r.content) > 100, asset
    assert httpx.get(f"{serve.url}/openapi.json").json()["paths"]["/api/jobs/{job_id}/errors"]


def test_destination_names_the_database_without_the_password(serve: ServeProcess) -> None:
    body = httpx.get(f"{serve.url}/api/destination").json()
    assert body["mongodbUri"].startswith("mongodb://") and body["database"].startswith("t_")


def active(what: str) -> float | None:
    """The lakesync_active_jobs or lakesync_active_runs gauge, as /metrics shows it."""
    return metrics.REGISTRY.get_sample_value(f"lakesync_active_{what}")


def test_active_jobs_counts_jobs_not_partitions() -> None:
    RUNNING.started("job_a")
    RUNNING.started("job_a")  # two partitions of one job
    try:
        assert active("jobs") == 1
        assert active("runs") == 2
        RUNNING.started("job_b")
        assert active("jobs") == 2
        RUNNING.ended("job_b")
        RUNNING.ended("job_a")
        assert active("jobs") == 1
    finally:
        RUNNING.ended("job_a")
    assert active("jobs") == 0 and active("runs") == 0


# -- the CLI ----------------------------------------------------------------------------------


def on_terminal(env: dict[str, str], *args: str, timeout: float = 60) -> tuple[int, str]:
    """Run `lakesync ARGS` on a pseudo-terminal of 80 columns; (exit code, output)."""
    term = Terminal(list(args), env).start()
    code = term.wait(timeout)
    return code, term.text


def test_errors_and_logs_commands(serve_env: dict[str, str], serve: ServeProcess) -> None:
    job_id = start(serve.url)
    finished(serve.url, job_id)
    expected = httpx.get(f"{serve.url}/api/jobs/{job_id}/errors", params={"limit": 100}).json()
    first = expected["errors"][0]

    piped = lakesync(serve_env, "errors", job_id, "--csv")
    assert piped.returncode == 0, piped.stderr
    rows = list(csv.DictReader(io.StringIO(piped.stdout)))
    assert len(rows) == 25 and rows[0]["reason"] == first["reason"]

    limited = lakesync(serve_env, "errors", job_id, "--csv", "--limit", "3")
    assert len(list(csv.DictReader(io.StringIO(limited.stdout)))) == 3

    code, shown = on_terminal(serve_env, "errors", job_id, "--limit", "5")
    assert code == 0, shown
    assert "reason" in shown and first["file"][:20] in shown.replace("\r\n", "")
    assert "Showing 5 of 25 rejected records" in shown
    assert "Traceback" not in shown

    code, shown = on_terminal(serve_env, "logs", job_id)
    assert code == 0, shown
    assert "Run 1 started" in shown and "Completed" in shown
    piped = lakesync(serve_env, "logs", job_id)
    assert piped.returncode == 0 and "INFO" in piped.stdout and "Completed" in piped.stdout

    for command in ("errors", "logs"):
        code, shown = on_terminal(serve_env, command, "job_0000000000000000000000000z")
        assert code == 1 and "No job" in shown and "Traceback" not in shown, shown


def test_paging_is_exact_for_jobs_started_in_the_same_second(settings: Any) -> None:
    from lakesync.models import JobState
    from lakesync.runtime import Runtime

    with Runtime(settings) as rt:
        made = []
        for i in range(23):
            job, _ = rt.store.create("copy-taskdetail", {"source": str(i)}, flight=f"f{i}")
            made.append(job.jobId)
            if i % 3 == 0:
                rt.store.finish(job.jobId, None, JobState.CANCELLED, "stopped")
        listed: list[str] = []
        before = None
        while True:
            page = rt.jobs.list(limit=4, before=before)
            listed += [j.jobId for j in page]
            if len(page) < 4:
                break
            before = page[-1].jobId
        whole = [j.jobId for j in rt.jobs.list(limit=100)]  # jobs of one millisecond: by id
        assert listed == whole and sorted(listed) == sorted(made)
        cancelled = [j for j in whole if made.index(j) % 3 == 0]
        after = rt.jobs.list(status="cancelled", limit=3, before=cancelled[2])
        assert [j.jobId for j in after] == cancelled[3:6]


def test_a_claimed_job_no_longer_says_it_waits_for_a_worker(settings: Any) -> None:
    from lakesync.runtime import Runtime

    with Runtime(settings) as rt:
        job, _ = rt.jobs.start("copy-taskdetail")
        assert job.message == "Waiting for a worker" and job.status == "pending"
        claimed = rt.store.claim(job.jobId, "me", lease_seconds=60)
        assert claimed is not None and claimed.status == "in_progress"
        assert "Waiting" not in (claimed.message or "")


def test_the_log_tells_of_a_takeover_after_a_crash(
    serve_env: dict[str, str], slow_database: Any, tmp_path: Path, request: Any
) -> None:
    from lakesync.demo import generate

    lake = tmp_path / "lake"
    # 80 batches of 100 through the slow link (>= 3 requests of 10 ms each): the kill, after
    # the first, comes well before the last; 20,000 took over 120 s to finish at load 40
    generate(lake, 8000)
    serve_env["LAKESYNC_LAKE_URI"] = str(lake)
    serve_env["LAKESYNC_BATCH_SIZE"] = "100"
    serve: ServeProcess = request.getfixturevalue("serve")
    job_id = start(serve.url)
    wait_for(lambda: httpx.get(f"{serve.url}/api/jobs/{job_id}").json()["processedRecords"])

    def logged(text: str) -> bool:
        got = httpx.get(f"{serve.url}/api/jobs/{job_id}/logs").json()["lines"]
        return any(text in x["message"] for x in got)

    # the log is written in the background: the first run's start is stored before the kill
    wait_for(lambda: logged("Run 1 started"), timeout=30)
    serve.kill()  # the run dies with its process
    serve.start()
    assert finished(serve.url, job_id, timeout=120)["status"] == "completed"

    def lines() -> list[dict[str, Any]]:
        got: list[dict[str, Any]] = httpx.get(f"{serve.url}/api/jobs/{job_id}/logs").json()["lines"]
        return got if any("Completed" in x["message"] for x in got) else []

    text = [(x["level"], x["message"]) for x in wait_for(lines, timeout=10)]
    assert ("info", "Run 1 started") in text
    assert any(lv == "warning" and "lease expired" in m for lv, m in text)  # taken over
    assert any(lv == "info" and m.startswith("Run 2 resumed at record ") for lv, m in text), text
    assert not any(job_id in m or re.search(r":\d+:[0-9a-f]{6}", m) for _, m in text), text
    pids = {x["process"] for x in httpx.get(f"{serve.url}/api/jobs/{job_id}/logs").json()["lines"]}
    assert len(pids) == 2, "the lines of both processes' runs are kept"


def test_active_jobs_metric_counts_a_partitioned_job_once(
    serve_env: dict[str, str], slow_database: Any, tmp_path: Path, request: Any
) -> None:
    from lakesync.demo import generate

    lake = tmp_path / "lake"
    # 5 partitions of 16 batches through the slow link, two at a time: the two runs overlap
    # for most of the copy (20,000 records in partitions of 4,000 made the same 5 partitions)
    generate(lake, 8000)
    serve_env.update(
        LAKESYNC_LAKE_URI=str(lake),
        LAKESYNC_BATCH_SIZE="100",
        LAKESYNC_PARTITION_ROWS="1600",
        LAKESYNC_WORKERS="2",
    )
    serve: ServeProcess = request.getfixturevalue("serve")
    job_id = start(serve.url)
    jobs_seen, runs_seen = set(), set()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        text = httpx.get(f"{serve.url}/metrics").text
        values = {
            line.split(" ")[0]: float(line.split(" ")[1])
            for line in text.splitlines()
            if line.startswith(("lakesync_active_jobs ", "lakesync_active_runs "))
        }
        jobs_seen.add(values["lakesync_active_jobs"])
        runs_seen.add(values["lakesync_active_runs"])
        if httpx.get(f"{serve.url}/api/jobs/{job_id}").json()["status"] == "completed":
            break
        time.sleep(0.05)
    job = httpx.get(f"{serve.url}/api/jobs/{job_id}").json()
    assert job["status"] == "completed" and job["partitions"] >= 2
    assert 2.0 in runs_seen, f"the partitions never ran side by side: {runs_seen}"
    assert max(jobs_seen) == 1.0, f"one job was counted as several: {jobs_seen}"


def test_a_rejected_key_is_shown_as_it_is_not_as_it_looks() -> None:
    """`lakesync errors` printed the key "7 " as 7, the empty key and 0 as "(none)"."""
    from lakesync.cli import shown_key

    shown = {k: shown_key(k) for k in ("7 ", " 7", "", "007", "a\tb", "é")}
    assert shown == {"7 ": '"7 "', " 7": '" 7"', "": '""', "007": "007",
                     "a\tb": '"a\\tb"', "é": "é"}  # fmt: skip
    assert (shown_key(0), shown_key(None), shown_key(None, "(no key)")) == (
        "0",
        "(none)",
        "(no key)",
    )


def test_a_rejected_key_that_hides_what_it_is_is_shown_escaped_and_apart_from_no_key() -> None:
    """Characters that print as nothing or as a line break (a zero-width space, U+2028,
    DEL) were shown raw inside the quotes, so "a<ZWSP>b" still read as "ab" (and U+2028
    broke the table's line); and the key "(none)" read as no key at all."""
    from lakesync.cli import shown_key

    assert shown_key("a\u200bb") == '"a\\u200bb"'
    assert shown_key("x\u2028") == '"x\\u2028"'
    assert shown_key("\x7f") == '"\\u007f"'
    assert shown_key("(none)") == '"(none)"' and shown_key("(no key)", "(no key)") == '"(no key)"'
    assert shown_key("é") == "é" and shown_key("x y") == "x y"
