"""The web page at `/`, driven in headless Chromium (Debian's /usr/bin/chromium) by Playwright.

Each test starts a real `lakesync serve` (conftest's `serve`), uses the page like a person
would, and saves a full-page screenshot of its end state under test-artifacts/.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from lakesync.demo import generate

pytestmark = pytest.mark.browser

sync_api = pytest.importorskip("playwright.sync_api")
expect = sync_api.expect

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
TOKEN = "page-test-token-3f9a"
COPIED_5000 = "Copied 5,000 records: 4,975 inserted, 0 updated, 0 unchanged, 25 rejected"

# Records every aria-valuenow of #progress, every transport mode the page goes through, and
# the record counts shown in the jobs table's rows of running jobs.
RECORDER = """
window.__progress = [];
window.__transport = [];
window.__rows = [];
document.addEventListener("DOMContentLoaded", () => {
  const bar = document.getElementById("progress");
  const transport = document.getElementById("transport");
  new MutationObserver(() => {
    for (const tr of document.querySelectorAll('#jobs-body tr[data-status="in_progress"]'))
      window.__rows.push(tr.querySelector(".c-num").textContent);
  }).observe(document.getElementById("jobs-body"),
             { subtree: true, childList: true, characterData: true, attributes: true });
  new MutationObserver(() => {
    const v = bar.getAttribute("aria-valuenow");
    if (v !== null) window.__progress.push(Number(v));
  }).observe(bar, { attributes: true, attributeFilter: ["aria-valuenow"] });
  new MutationObserver(() => window.__transport.push(transport.dataset.mode))
    .observe(transport, { attributes: true, attributeFilter: ["data-mode"] });
});
"""


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not CHROMIUM.exists():
        pytest.skip("Chromium is not installed: apt-get install -y chromium")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield b
        b.close()


class PageRun:
    """One browser context + page, collecting uncaught script errors."""

    def __init__(self, browser: Any, width: int = 1280, height: int = 900) -> None:
        self.context = browser.new_context(viewport={"width": width, "height": height})
        self.context.add_init_script(RECORDER)
        self.page = self.context.new_page()
        self.page.set_default_timeout(15_000)
        self.errors: list[str] = []
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))

    def shot(self, name: str) -> Path:
        ARTIFACTS.mkdir(exist_ok=True)
        path = ARTIFACTS / f"page-{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        return path

    def close(self) -> None:
        self.context.close()
        assert not self.errors, f"script errors on the page: {self.errors}"


@pytest.fixture
def run(browser: Any) -> Iterator[Any]:
    runs: list[PageRun] = []

    def make(**kw: Any) -> PageRun:
        r = PageRun(browser, **kw)
        runs.append(r)
        return r

    yield make
    for r in runs:
        r.close()


def job_id_of(page: Any) -> str:
    expect(page.locator("#job-id")).to_have_text(re.compile(r"^job_[0-9a-z]{20,}$"))
    return str(page.locator("#job-id").inner_text())


def test_copy_runs_to_completion_with_live_progress(
    serve_env: dict[str, str], request: Any, run: Any
) -> None:
    serve_env["LAKESYNC_BATCH_SIZE"] = "20"  # slow enough to see progress between SSE ticks
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
        "data-status", "completed", timeout=30_000
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

    cancel = page.get_by_role("button", name="Cancel")
    expect(cancel).to_be_visible()
    cancel.click()
    badge = page.locator("#status-badge")
    expect(badge).to_have_attribute("data-status", "cancelled", timeout=20_000)
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
    expect(page.locator("#status-badge")).to_have_attribute("data-status", "failed", timeout=20_000)
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

    token_input.fill(TOKEN)
    page.get_by_role("button", name="Save token").click()
    expect(form).to_be_hidden()
    assert page.evaluate("sessionStorage.getItem('lakesync.token')") == TOKEN
    expect(page.locator("#jobs-table")).to_contain_text("No jobs yet")

    page.locator("#copy-button").click()
    expect(page.locator("#notice")).to_contain_text("Copy started as background process")
    expect(page.locator("#status-badge")).to_have_attribute(
        "data-status", "completed", timeout=30_000
    )
    expect(page.locator("#message")).to_have_text(COPIED_5000)
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
        "Completed", timeout=30_000
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
        "data-status", "completed", timeout=30_000
    )
    assert "polling" in page.evaluate("window.__transport")
    expect(page.locator("#message")).to_contain_text("Copied 5,000 records")
    no_horizontal_scroll()
    r.shot("phone")

    page.set_viewport_size({"width": 360, "height": 740})
    no_horizontal_scroll()
    expect(button).to_be_in_viewport()
