"""The web page at `/`, driven in headless Chromium (Debian's /usr/bin/chromium) by Playwright.

Each test starts a real `lakesync serve` (conftest's `serve`), uses the page like a person
would, and saves a full-page screenshot of its end state under test-artifacts/.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import httpx
import pytest
from tests.helpers import ARTIFACTS, PageRun, wait_for

from lakesync.demo import generate

pytestmark = pytest.mark.browser

sync_api = pytest.importorskip("playwright.sync_api")
expect = sync_api.expect

TOKEN = "page-test-token-3f9a"
COPIED_5000 = "Copied 5,000 records: 4,975 inserted, 0 updated, 0 unchanged, 25 rejected"


def job_id_of(page: Any) -> str:
    expect(page.locator("#job-id")).to_have_text(re.compile(r"^job_[0-9a-z]{20,}$"))
    return str(page.locator("#job-id").inner_text())


def test_copy_runs_to_completion_with_live_progress(
    serve_env: dict[str, str], slow_database: Any, request: Any, run: Any
) -> None:
    serve_env["LAKESYNC_BATCH_SIZE"] = "20"  # with the slow link: progress between SSE ticks
    serve = request.getfixturevalue("serve")
    r = run()
    page = r.page
    page.goto(serve.url + "/")
    expect(page).to_have_title(re.compile("lakesync"))
    expect(page.locator("#jobs-table")).to_contain_text("No jobs yet")

    button = page.get_by_role("button", name="Copy TaskDetail Data")
    expect(button).to_have_id("copy-button")
    button.click()

    expect(page.locator("#notice")).to_contain_text("Copy started as background process")
    job_id = job_id_of(page)
    expect(page.locator("#notice")).to_contain_text(job_id)
    assert f"#job={job_id}" in page.url

    progress = page.locator("#progress")
    expect(progress).to_have_attribute("role", "progressbar")
    expect(page.locator("#status-badge")).to_have_attribute(
        "data-status", "completed", timeout=120_000
    )
    expect(page.locator("#message")).to_have_text(COPIED_5000)
    expect(progress).to_have_attribute("aria-valuenow", "100")
    expect(page.locator("#error")).to_be_hidden()
    expect(page.locator("#cancel-button")).to_be_hidden()

    seen: list[float] = page.evaluate("window.__progress")
    assert any(0 < v < 100 for v in seen), f"no intermediate progress seen: {seen}"
    assert seen == sorted(seen), f"progress went backwards: {seen}"
    assert "live" in page.evaluate("window.__transport"), "updates did not come over SSE"

    row = page.locator(f'#jobs-table tr[data-job-id="{job_id}"]')
    expect(row).to_contain_text("Completed")
    expect(row).to_contain_text("5,000 / 5,000")
    counts = page.evaluate("window.__rows")
    live = [c for c in counts if re.fullmatch(r"[1-9][\d,]* / 5,000", c) and c != "5,000 / 5,000"]
    assert live, f"the job's row did not follow its progress: {counts}"
    expect(row.locator(".badge")).to_have_attribute("data-status", "completed")

    chart = page.locator("#throughput-chart")
    expect(chart).to_have_attribute("role", "img")
    assert chart.locator("path.line").count() == 1, "the throughput chart has no line"
    expect(page.locator("#chart-summary")).to_contain_text("records per second")
    expect(page.locator("#copy-button")).to_be_enabled()
    r.shot("completed")


def test_cancel_a_running_copy_after_a_reload(
    serve_env: dict[str, str], tmp_path: Path, request: Any, run: Any
) -> None:
    lake = tmp_path / "big-lake"
    generate(lake, 60000)
    serve_env["LAKESYNC_LAKE_URI"] = str(lake)
    serve_env["LAKESYNC_BATCH_SIZE"] = "50"
    serve = request.getfixturevalue("serve")
    r = run()
    page = r.page
    # The page has not noticed the job yet (its job list refreshes every few seconds).
    stale = {"on": True}

    def jobs_list(route: Any) -> None:
        if stale["on"]:
            route.fulfill(json={"jobs": []})
        else:
            route.continue_()

    page.route(re.compile(r"/api/jobs\?limit=10$"), jobs_list)
    page.goto(serve.url + "/")
    expect(page.locator("#jobs-table")).to_contain_text("No jobs yet")
    watcher = run(width=1024, height=800).page  # open before the job starts
    watcher.goto(serve.url + "/")
    expect(watcher.locator("#jobs-table")).to_contain_text("No jobs yet")

    # Someone else starts the copy; pressing the button then follows theirs.
    started = httpx.post(serve.url + "/api/jobs", json={"operation": "copy-taskdetail"})
    assert started.status_code == 202, started.text
    job_id = started.json()["jobId"]
    page.locator("#copy-button").click()
    expect(page.locator("#notice")).to_contain_text("A copy is already running")
    expect(page.locator("#job-id")).to_have_text(job_id)
    stale["on"] = False
    expect(page.locator("#status-badge")).to_have_attribute("data-status", "in_progress")
    expect(page.locator("#copy-button")).to_be_disabled()  # one copy at a time

    # A reload keeps following the same running job.
    page.reload()
    expect(page.locator("#job-id")).to_have_text(job_id)
    expect(page.locator("#status-badge")).to_have_attribute("data-status", "in_progress")
    expect(page.locator("#progress")).to_have_attribute("aria-valuenow", re.compile(r"^[1-9]\d?$"))

    # A fresh tab (no hash, no session) follows the newest running job too...
    other = run(width=1024, height=800).page
    other.goto(serve.url + "/")
    expect(other.locator("#job-id")).to_have_text(job_id)
    expect(other.locator("#cancel-button")).to_be_visible()
    # ...and a tab that was already open picks it up at its next refresh.
    expect(watcher.locator("#job-id")).to_have_text(job_id, timeout=10_000)
    expect(watcher.locator("#status-badge")).to_have_attribute("data-status", "in_progress")

    cancel = page.get_by_role("button", name="Cancel", exact=True)
    expect(cancel).to_be_visible()
    cancel.click()  # asks first
    confirm = page.locator("#cancel-confirm")
    expect(confirm).to_be_visible()
    expect(page.get_by_role("button", name="Yes, cancel the copy")).to_be_focused()
    r.shot("cancel-confirm")
    page.get_by_role("button", name="Keep it running").click()
    expect(confirm).to_be_hidden()
    expect(page.locator("#status-badge")).to_have_attribute("data-status", "in_progress")
    cancel.click()
    page.get_by_role("button", name="Yes, cancel the copy").click()
    badge = page.locator("#status-badge")
    expect(badge).to_have_attribute("data-status", "cancelled", timeout=60_000)
    expect(badge).to_have_text("Cancelled")
    expect(page.locator("#cancel-button")).to_be_hidden()
    expect(page.locator("#message")).not_to_be_empty()
    row = page.locator(f'#jobs-table tr[data-job-id="{job_id}"]')
    expect(row.locator(".badge")).to_have_attribute("data-status", "cancelled")
    assert int(page.locator("#progress").get_attribute("aria-valuenow") or 0) < 100
    r.shot("cancelled")


def test_errors_are_shown_in_plain_words(serve: Any, tmp_path: Path, run: Any) -> None:
    bad = tmp_path / "bad-lake"
    bad.mkdir()
    (bad / "x.parquet").write_text("this is not a parquet file\n")
    r = run()
    page = r.page
    page.goto(serve.url + "/")
    expect(page.locator("#jobs-table")).to_contain_text("No jobs yet")

    # A request the API refuses: the reason appears in the alert region.
    page.locator("#options summary").click()
    page.get_by_label("Source").fill(str(tmp_path / "missing"))
    page.locator("#copy-button").click()
    alert = page.get_by_role("alert").filter(has_text="does not exist")
    expect(alert).to_be_visible()
    expect(alert).to_have_id("alert")
    expect(page.locator("#alert")).not_to_contain_text("Traceback")

    # A job that fails while running: its error in plain words, next to the status.
    page.get_by_label("Source").fill(str(bad))
    page.locator("#copy-button").click()
    expect(page.locator("#alert")).to_be_hidden()
    expect(page.locator("#status-badge")).to_have_attribute("data-status", "failed", timeout=60_000)
    error = page.locator("#error")
    expect(error).to_be_visible()
    expect(error).to_have_attribute("role", "alert")
    expect(error).to_contain_text("x.parquet is not a valid parquet file")
    expect(error).to_contain_text("Fix or remove it")
    expect(page.locator("#message")).to_contain_text("failed")
    job_id = job_id_of(page)
    expect(page.locator(f'#jobs-table tr[data-job-id="{job_id}"] .badge')).to_have_text("Failed")
    r.shot("failed")

    # A fresh page shows the last (failed) job with its error too.
    fresh = run(width=1024, height=800).page
    fresh.goto(serve.url + "/")
    expect(fresh.locator("#job-id")).to_have_text(job_id)
    expect(fresh.locator("#error")).to_contain_text("not a valid parquet file")


def test_token_is_asked_for_and_used(serve_env: dict[str, str], request: Any, run: Any) -> None:
    serve_env["LAKESYNC_API_TOKEN"] = TOKEN
    serve_env["LAKESYNC_BATCH_SIZE"] = "100"
    serve = request.getfixturevalue("serve")
    r = run()
    page = r.page
    page.goto(serve.url + "/")

    form = page.locator("#auth-card")
    expect(form).to_be_visible()
    token_input = page.get_by_label("API token", exact=True)
    expect(token_input).to_be_focused()
    r.shot("token-form")

    token_input.fill("wrong-token")
    page.get_by_role("button", name="Save token").click()
    expect(form).to_be_visible()
    expect(form).to_contain_text("not accepted")

    expect(page.locator("#footer-metrics")).to_be_hidden()  # a link cannot send the token
    token_input.fill(TOKEN)
    page.get_by_role("button", name="Save token").click()
    expect(form).to_be_hidden()
    expect(page.locator("#footer-metrics")).to_be_hidden()
    assert page.evaluate("sessionStorage.getItem('lakesync.token')") == TOKEN
    expect(page.locator("#jobs-table")).to_contain_text("No jobs yet")

    page.locator("#copy-button").click()
    expect(page.locator("#notice")).to_contain_text("Copy started as background process")
    expect(page.locator("#status-badge")).to_have_attribute(
        "data-status", "completed", timeout=120_000
    )
    expect(page.locator("#message")).to_have_text(COPIED_5000)
    # The rejected records download with the token too (fetched, then saved).
    page.locator("#stat-errors").click()
    expect(page.locator("#errors-body tr")).to_have_count(25)
    with page.expect_download() as download:
        page.locator("#errors-csv").click()
    assert len(Path(download.value.path()).read_text().splitlines()) == 26
    # The stream authenticated with ?access_token= (EventSource cannot send headers).
    assert "live" in page.evaluate("window.__transport")
    assert "polling" not in page.evaluate("window.__transport")
    job_id = job_id_of(page)
    expect(page.locator(f'#jobs-table tr[data-job-id="{job_id}"]')).to_contain_text("Completed")

    # The token survives a reload in the same tab.
    page.reload()
    expect(page.locator("#job-id")).to_have_text(job_id)
    expect(form).to_be_hidden()
    r.shot("token-completed")


def test_phone_layout_and_polling_fallback(serve: Any, run: Any) -> None:
    # An earlier job, so the table has a row to lay out.
    first = httpx.post(
        serve.url + "/api/jobs", json={"operation": "copy-taskdetail", "options": {}}
    )
    assert first.status_code == 202, first.text

    r = run(width=375, height=740)
    page = r.page
    # Without SSE (a proxy that drops streams, say) the page falls back to polling.
    page.route("**/api/jobs/*/events*", lambda route: route.abort())
    page.goto(serve.url + "/")
    expect(page.locator(f'#jobs-table tr[data-job-id="{first.json()["jobId"]}"]')).to_contain_text(
        "Completed", timeout=120_000
    )

    button = page.locator("#copy-button")
    expect(button).to_be_visible()
    expect(button).to_be_in_viewport()
    box = button.bounding_box()
    assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= 375

    def no_horizontal_scroll() -> None:
        sizes = page.evaluate(
            "[document.documentElement.scrollWidth, document.documentElement.clientWidth]"
        )
        assert sizes[0] <= sizes[1], f"page scrolls sideways: {sizes}"

    no_horizontal_scroll()
    button.click()
    expect(page.locator("#notice")).to_contain_text(
        re.compile("Copy started as background process|A copy is already running")
    )
    expect(page.locator("#status-badge")).to_have_attribute(
        "data-status", "completed", timeout=120_000
    )
    assert "polling" in page.evaluate("window.__transport")
    expect(page.locator("#message")).to_contain_text("Copied 5,000 records")
    no_horizontal_scroll()
    r.shot("phone")

    page.set_viewport_size({"width": 360, "height": 740})
    no_horizontal_scroll()
    expect(button).to_be_in_viewport()


# -- the job page, rejected records, resume, operations, paging, /docs -------------------------


def shots(r: PageRun, name: str, height: int = 900) -> None:
    """Screenshots of the page's current state at 1280 and 390 pixels wide."""
    page = r.page
    for width in (1280, 390):
        page.set_viewport_size({"width": width, "height": height})
        page.wait_for_timeout(150)
        sizes = page.evaluate(
            "[document.documentElement.scrollWidth, document.documentElement.clientWidth]"
        )
        assert sizes[0] <= sizes[1], f"{name} at {width}: the page scrolls sideways {sizes}"
        r.shot(f"{name}-{width}")
    page.set_viewport_size({"width": 1280, "height": height})


def test_rejected_records_under_the_errors_tile(serve: Any, run: Any) -> None:
    r = run()
    page = r.page
    page.goto(serve.url + "/")
    page.locator("#copy-button").click()
    expect(page.locator("#status-badge")).to_have_attribute(
        "data-status", "completed", timeout=120_000
    )
    tile = page.locator("#stat-errors")
    expect(tile).to_have_text("25")
    expect(tile).to_have_attribute("aria-expanded", "false")
    tile.click()
    panel = page.locator("#errors-panel")
    expect(panel).to_be_visible()
    expect(tile).to_have_attribute("aria-expanded", "true")
    rows = page.locator("#errors-body tr")
    expect(rows).to_have_count(25)
    api = httpx.get(f"{serve.url}/api/jobs/{job_id_of(page)}/errors").json()["errors"]
    first = rows.first.locator("td")
    expect(first.nth(0)).to_have_text(api[0]["key"] or "—")
    expect(first.nth(1)).to_have_attribute("title", api[0]["file"])
    assert api[0]["file"].endswith(first.nth(1).inner_text().lstrip("…"))
    expect(first.nth(2)).to_have_text(f"{api[0]['row']:,}")
    expect(first.nth(3)).to_have_text(api[0]["reason"])
    expect(page.locator("#errors-summary")).to_contain_text("25 records were rejected")
    expect(page.locator("#meta-destination")).to_contain_text("mongodb://127.0.0.1:")
    expect(page.locator("#meta-destination")).to_contain_text("collection taskdetails")
    shots(r, "errors")

    with page.expect_download() as download:
        page.locator("#errors-csv").click()
    assert download.value.suggested_filename.endswith("-errors.csv")
    lines = Path(download.value.path()).read_text().splitlines()
    assert lines[0] == "key,file,row,reason,time" and len(lines) == 26
    with page.expect_download() as download:
        page.locator("#errors-ndjson").click()
    assert len(Path(download.value.path()).read_text().splitlines()) == 25

    tile.click()  # closes it
    expect(panel).to_be_hidden()


def test_job_page_survives_reload_new_tab_and_back(serve: Any, run: Any) -> None:
    started = httpx.post(serve.url + "/api/jobs", json={"operation": "copy-taskdetail"})
    job_id = started.json()["jobId"]
    wait_for(lambda: httpx.get(f"{serve.url}/api/jobs/{job_id}").json()["status"] == "completed")
    r = run()
    page = r.page
    page.goto(serve.url + "/")
    link = page.locator(f'#jobs-table tr[data-job-id="{job_id}"] a.job-link')
    expect(link).to_have_attribute("href", f"/jobs/{job_id}")

    # a new tab from the link (what a middle click or ctrl-click does)
    with r.context.expect_page() as opened:
        link.click(modifiers=["Control"])
    tab = opened.value
    tab.wait_for_load_state()
    assert tab.url == f"{serve.url}/jobs/{job_id}"
    expect(tab.locator("#job-id")).to_have_text(job_id)
    tab.close()

    link.click()
    expect(page).to_have_url(f"{serve.url}/jobs/{job_id}")
    expect(page).to_have_title(re.compile(job_id))
    expect(page.locator("#job-id")).to_have_text(job_id)
    expect(page.locator("#status-badge")).to_have_attribute("data-status", "completed")
    expect(page.locator(".card--start")).to_be_hidden()
    details = page.locator("#details")
    expect(details).to_contain_text("copy-taskdetail")
    expect(details).to_contain_text(serve.env["LAKESYNC_LAKE_URI"])
    expect(details).to_contain_text("Runs")
    expect(details).to_contain_text("4,975 inserted")
    expect(details).to_contain_text("25 rejected")
    log = page.locator("#job-log")
    expect(log).to_contain_text("Run 1 started")
    expect(log).to_contain_text("Completed: Copied 5,000 records")
    expect(page.locator("#chart-summary")).not_to_contain_text("No throughput samples")
    expect(page.locator("#chart-summary")).to_contain_text("Average over the whole job")
    shots(r, "job-page", height=1400)

    page.reload()
    expect(page.locator("#job-id")).to_have_text(job_id)
    expect(page.locator("#job-log")).to_contain_text("Run 1 started")

    page.go_back()
    expect(page).to_have_url(re.compile(re.escape(serve.url) + r"/(#job=job_\w+)?$"))
    expect(page.locator(".card--start")).to_be_visible()
    page.go_forward()
    expect(page.locator("#job-id")).to_have_text(job_id)

    missing = run().page
    missing.goto(serve.url + "/jobs/job_0000000000000000000000000z")
    expect(missing.locator("#error")).to_contain_text("can no longer be found")


def test_resume_button_continues_a_failed_job(serve: Any, tmp_path: Path, run: Any) -> None:
    lake = tmp_path / "lake"
    generate(lake, 300)
    broken = lake / "zz-broken.parquet"
    broken.write_text("not parquet at all\n")
    started = httpx.post(
        serve.url + "/api/jobs",
        json={"operation": "copy-taskdetail", "options": {"source": str(lake)}},
    )
    job_id = started.json()["jobId"]
    r = run()
    page = r.page
    page.goto(f"{serve.url}/jobs/{job_id}")
    expect(page.locator("#status-badge")).to_have_attribute("data-status", "failed", timeout=60_000)
    resume = page.get_by_role("button", name="Resume")
    expect(resume).to_be_visible()
    expect(page.locator("#cancel-button")).to_be_hidden()
    expect(page.locator("#job-log")).to_contain_text("not a valid parquet file")
    shots(r, "resume-failed", height=1300)

    # A run's log lines are stored in the background, a moment after the status it wrote:
    # the log the page asks for as the job ends may not hold them yet (held back here).
    hold = {"on": True}

    def logs(route: Any) -> None:
        answer = route.fetch()
        body = answer.json()
        if hold["on"]:
            first_run = ("created", "run 1", "failed")
            body["lines"] = [x for x in body["lines"] if any(w in x["message"] for w in first_run)]
        route.fulfill(response=answer, json=body)

    page.route(re.compile(r".*/api/jobs/[^/]+/logs$"), logs)
    broken.unlink()  # the cause is fixed
    resume.click()
    expect(page.locator("#status-badge")).to_have_attribute(
        "data-status", "completed", timeout=120_000
    )
    expect(resume).to_be_hidden()
    expect(page.locator("#message")).to_contain_text("Copied 300 records")
    expect(page.locator("#details")).to_contain_text("Runs")
    page.wait_for_timeout(1000)  # the log asked for at the end came back without run 2
    expect(page.locator("#job-log")).not_to_contain_text("Run 2 started")
    hold["on"] = False
    expect(page.locator("#job-log")).to_contain_text("Run 2 started", timeout=15_000)
    shots(r, "resumed", height=1300)


PROJECTS_TOML = """
[operations.copy-projects]
description = "Copy projects from the projects lake"
source = "{source}"
collection = "projects"
key = "projectId"
[operations.copy-projects.schema.fields]
projectId = {{ type = "string", required = true }}
name = {{ type = "string", required = true }}
"""


def test_picking_an_operation_shows_its_job(
    serve_env: dict[str, str], tmp_path: Path, request: Any, run: Any
) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    projects = tmp_path / "projects"
    projects.mkdir()
    pq.write_table(
        pa.table({"projectId": [f"P{i}" for i in range(50)], "name": ["x"] * 50}),
        projects / "p.parquet",
    )
    toml = tmp_path / "lakesync.toml"
    toml.write_text(PROJECTS_TOML.format(source=projects))
    serve_env["LAKESYNC_OPERATIONS_FILE"] = str(toml)
    serve = request.getfixturevalue("serve")
    base = httpx.post(serve.url + "/api/jobs", json={"operation": "copy-taskdetail"}).json()
    wait_for(lambda: httpx.get(f"{serve.url}/api/jobs/{base['jobId']}").json()["endTime"])
    r = run()
    page = r.page
    page.goto(serve.url + "/")
    expect(page.locator("#job-id")).to_have_text(base["jobId"])
    select = page.get_by_label("Operation", exact=True).first
    expect(page.locator("#operation-field")).to_be_visible()

    # an operation that never ran: its card says so, the source names its own default
    page.locator("#operation-select").select_option("copy-projects")
    expect(page.locator("#job-empty")).to_contain_text("No copy-projects job has run yet")
    expect(page.locator("#status-badge")).to_have_text("No job yet")
    page.locator("#options summary").click()
    placeholder = page.locator("#opt-source").get_attribute("placeholder") or ""
    assert str(projects) in placeholder and "LAKESYNC_LAKE_URI" not in placeholder
    page.locator("#copy-button").click()
    expect(page.locator("#status-badge")).to_have_attribute("data-status", "completed")
    projects_job = job_id_of(page)
    assert projects_job != base["jobId"]
    expect(page.locator("#meta-destination")).to_contain_text("collection projects")

    page.locator("#operation-select").select_option("copy-taskdetail")
    expect(page.locator("#job-id")).to_have_text(base["jobId"])
    page.locator("#operation-select").select_option("copy-projects")
    expect(page.locator("#job-id")).to_have_text(projects_job)
    row = page.locator(f'#jobs-table tr[data-job-id="{projects_job}"]')
    expect(row.locator(".c-op")).to_have_text("copy-projects")
    expect(row.locator(".c-source")).to_contain_text("projects")
    assert select.count() == 1
    shots(r, "operation-picked")


def test_jobs_list_filters_and_pages(serve: Any, tmp_path: Path, run: Any) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.parquet").write_text("nope")
    made: list[tuple[str, str]] = []
    for i in range(13):
        options = {} if i % 4 == 0 else {"source": str(bad)}
        job = httpx.post(
            serve.url + "/api/jobs", json={"operation": "copy-taskdetail", "options": options}
        ).json()
        wait_for(lambda j=job: httpx.get(f"{serve.url}/api/jobs/{j['jobId']}").json()["endTime"])
        made.append((job["jobId"], "completed" if i % 4 == 0 else "failed"))
    newest = [j for j, _ in reversed(made)]
    r = run()
    page = r.page
    page.goto(serve.url + "/")
    rows = page.locator("#jobs-body tr[data-job-id]")
    expect(rows).to_have_count(10)
    expect(rows.first).to_have_attribute("data-job-id", newest[0])
    expect(page.locator("#jobs-newer")).to_be_disabled()
    page.locator("#jobs-older").click()
    expect(page.locator("#jobs-page")).to_have_text("Page 2")
    expect(rows).to_have_count(3)
    expect(rows.first).to_have_attribute("data-job-id", newest[10])
    expect(page.locator("#jobs-older")).to_be_disabled()
    shots(r, "jobs-page-2")
    page.locator("#jobs-newer").click()
    expect(rows.first).to_have_attribute("data-job-id", newest[0])

    page.get_by_label("Status").select_option("completed")
    completed = [j for j, s in reversed(made) if s == "completed"]
    expect(rows).to_have_count(len(completed))
    for i, job_id in enumerate(completed):
        expect(rows.nth(i)).to_have_attribute("data-job-id", job_id)
    expect(page.locator("#jobs-page")).to_have_text("Page 1")
    page.get_by_label("Status").select_option("cancelled")
    expect(page.locator("#jobs-table")).to_contain_text("No jobs match these filters")
    page.get_by_label("Status").select_option("failed")
    expect(rows).to_have_count(9)
    expect(rows.first.locator(".c-source")).to_contain_text("bad")
    shots(r, "jobs-filtered")


def test_docs_work_without_internet(serve: Any, browser: Any) -> None:
    context = browser.new_context(viewport={"width": 1280, "height": 900})  # no recorder
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    elsewhere: list[str] = []

    def offline(route: Any) -> None:
        if route.request.url.startswith(serve.url):
            route.continue_()
        else:  # an air-gapped machine: nothing else answers
            elsewhere.append(route.request.url)
            route.abort()

    try:
        page.route("**/*", offline)
        page.goto(serve.url + "/docs")
        expect(page.locator(".swagger-ui .info .title")).to_contain_text("lakesync")
        errors_op = page.locator("#operations-jobs-job_errors_api_jobs__job_id__errors_get")
        expect(errors_op).to_be_visible()
        errors_op.locator("button").first.click()  # expands, rendered by the local bundle
        expect(errors_op).to_contain_text("format")
        assert elsewhere == [], f"/docs asked other hosts: {elsewhere}"
        assert not errors, errors
        ARTIFACTS.mkdir(exist_ok=True)
        for width in (1280, 390):
            page.set_viewport_size({"width": width, "height": 900})
            page.screenshot(path=str(ARTIFACTS / f"page-docs-{width}.png"))
    finally:
        context.close()


def test_page_recovers_after_a_server_restart(
    serve_env: dict[str, str], slow_database: Any, tmp_path: Path, request: Any, run: Any
) -> None:
    lake = tmp_path / "lake"
    generate(lake, 10000)  # 100 batches through the slow link: the kill lands mid-copy
    serve_env["LAKESYNC_LAKE_URI"] = str(lake)
    serve_env["LAKESYNC_BATCH_SIZE"] = "100"
    serve = request.getfixturevalue("serve")
    r = run()
    page = r.page
    page.goto(serve.url + "/")
    page.locator("#copy-button").click()
    job_id = job_id_of(page)
    progress = page.locator("#progress")
    expect(progress).to_have_attribute("aria-valuenow", re.compile(r"^[1-9]\d?$"), timeout=30_000)
    expect(page.locator("#transport")).to_have_text("Live")

    serve.kill()  # the server dies mid-copy
    health = page.locator("#server-health")
    expect(health).to_have_attribute("data-state", "bad", timeout=10_000)
    expect(health).to_contain_text("Server unreachable")
    expect(page.locator("#stat-eta")).to_have_text("—")  # no ETA from a dead server
    expect(page.locator("#message")).to_contain_text("cannot be reached")
    shots(r, "server-down")

    serve.start()  # same port; the job's lease expires and the new server resumes it
    expect(health).to_have_attribute("data-state", "ok", timeout=10_000)
    expect(health).to_contain_text("Server ready")
    expect(page.locator("#transport")).to_have_text("Live", timeout=10_000)
    expect(page.locator("#status-badge")).to_have_attribute(
        "data-status", "completed", timeout=120_000
    )
    expect(page.locator("#message")).to_contain_text("Copied 10,000 records")
    assert httpx.get(f"{serve.url}/api/jobs/{job_id}").json()["attempt"] >= 2
    shots(r, "server-back")


def test_a_run_that_went_quiet_is_not_shown_as_progressing(
    serve_env: dict[str, str], db: Any, request: Any, run: Any
) -> None:
    from datetime import UTC, datetime, timedelta

    serve_env["LAKESYNC_LEASE_SECONDS"] = "600"  # nobody takes the job over during the test
    serve = request.getfixturevalue("serve")
    now = datetime.now(UTC)
    job_id = "job_quietquietquietquietquiet0"
    db.jobstatuses.insert_one(
        {
            "jobId": job_id,
            "status": "in_progress",
            "operation": "copy-taskdetail",
            "startTime": now - timedelta(minutes=3),
            "updatedAt": now - timedelta(minutes=2),
            "heartbeatAt": now - timedelta(minutes=2),
            "heartbeatMs": int(now.timestamp() * 1000),
            "totalRecords": 1000,
            "processedRecords": 470,
            "percentComplete": 47,
            "recordsPerSecond": 30.0,
            "etaSeconds": 14,
            "owner": "elsewhere",
            "attempt": 1,
            "message": "Copying: 470 of 1,000 records",
        }
    )
    r = run()
    page = r.page
    page.goto(f"{serve.url}/jobs/{job_id}")
    expect(page.locator("#progress")).to_have_attribute("aria-valuenow", "47")
    expect(page.locator("#message")).to_contain_text("No progress reported for 2 min")
    expect(page.locator("#stat-eta")).to_have_text("—")
    expect(page.locator("#stat-rate")).to_have_text("—")
    shots(r, "quiet-run")


def test_a_job_that_plans_shows_planning_not_zero_percent(serve: Any, run: Any) -> None:
    """Before its first record a job plans for seconds (a large lake): the page says
    "Planning…" with what it plans (the job's message), not a 0% that looks stuck. The job
    is seen as the API answers it while it plans (held there: planning is short here)."""
    started = httpx.post(serve.url + "/api/jobs", json={"operation": "copy-taskdetail"})
    job_id = started.json()["jobId"]
    url = f"{serve.url}/api/jobs/{job_id}"
    wait_for(lambda: httpx.get(url).json()["status"] == "completed", timeout=120)
    planning = httpx.get(url).json() | {
        "status": "in_progress", "endTime": None, "totalRecords": 0, "processedRecords": 0,
        "insertedRecords": 0, "errorRecords": 0, "percentComplete": 0, "recordsPerSecond": 0,
        "etaSeconds": None,
        "message": "Planning: finding repeated keys in 100,000 records",
    }  # fmt: skip
    r = run(width=390, height=900)
    page = r.page
    page.route("**/api/jobs/*/events*", lambda route: route.abort())
    page.route(re.compile(rf".*/api/jobs/{job_id}$"), lambda route: route.fulfill(json=planning))
    page.goto(f"{serve.url}/jobs/{job_id}")
    expect(page.locator("#progress-percent")).to_have_text("Planning…")
    expect(page.locator("#progress")).to_have_attribute("aria-valuetext", planning["message"])
    expect(page.locator("#message")).to_have_text(planning["message"])
    expect(page.locator("#progress-counts")).not_to_contain_text("0 / 0")
    r.shot("planning-390")


def test_the_jobs_table_shows_a_jobs_end_even_when_an_older_refresh_answers_last(
    serve_env: dict[str, str], tmp_path: Path, request: Any, run: Any
) -> None:
    """The table's refresh every 5 s may be in flight when the followed job ends; the
    refresh the end asks for used to be dropped (one at a time), so the older answer (the
    job running) stood in the table until the next tick: test_cancel_a_running_copy's
    5 s wait for the row failed on main under load. A refresh asked for meanwhile now runs
    after the one in flight."""
    lake = tmp_path / "big-lake"
    generate(lake, 60000)
    serve_env["LAKESYNC_LAKE_URI"] = str(lake)
    serve_env["LAKESYNC_BATCH_SIZE"] = "50"
    serve = request.getfixturevalue("serve")
    page = run().page
    page.goto(serve.url + "/")
    page.locator("#copy-button").click()
    job_id = job_id_of(page)
    row = page.locator(f'#jobs-table tr[data-job-id="{job_id}"] .badge')
    expect(row).to_have_attribute("data-status", "in_progress", timeout=30_000)
    held: list[tuple[Any, Any]] = []

    def hold_one(route: Any) -> None:  # the next refresh's answer, delayed past the end
        if held:
            route.continue_()
        else:
            held.append((route, route.fetch()))

    page.route(re.compile(r"/api/jobs\?limit=10$"), hold_one)
    wait_for(lambda: held or page.wait_for_timeout(100), timeout=30)  # the next tick
    stale, answer = held[0]
    assert '"in_progress"' in answer.text()
    assert httpx.post(f"{serve.url}/api/jobs/{job_id}/cancel", timeout=30).status_code == 202
    badge = page.locator("#status-badge")
    expect(badge).to_have_attribute("data-status", "cancelled", timeout=60_000)
    stale.fulfill(response=answer)  # the older answer comes in last
    # well before the next tick (5 s after the held one): only a refresh after it can tell
    expect(row).to_have_attribute("data-status", "cancelled", timeout=2_500)
