"""The page without overflow and with what a newcomer looks for: the recent jobs fit their
card at 1280 and 390 pixels, the operations with their schedules (Pause/Unpause), the
preview, the notice gone once the job ended, the average rate of a finished job."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest
from bson import Int64

from lakesync.models import new_job_id

pytestmark = pytest.mark.browser

sync_api = pytest.importorskip("playwright.sync_api")
expect = sync_api.expect

FITS = """() => [...document.querySelectorAll('#jobs-table, #operations-table')].map(
  t => [t.id, t.scrollWidth, t.parentElement.clientWidth])"""

CUT = """() => [...document.querySelectorAll(
  '#jobs-table td.c-num, #jobs-table td.c-when, #operations-table .c-target__collection')]
  .filter(e => e.scrollWidth > e.clientWidth + 1).map(e => e.textContent)"""
UNLABELLED = """() => [...document.querySelectorAll('#operations-body td')]
  .filter(td => td.cellIndex >= 1 && td.cellIndex <= 4)
  .filter(td => getComputedStyle(td, '::before').content === 'none').map(td => td.textContent)"""

ROW_TOPS = """() => [...document.querySelectorAll('#preview-schema tr')]
  .map(tr => [...tr.cells].map(td => Math.round(td.getBoundingClientRect().top)))"""


@pytest.fixture
def serve_env(serve_env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    """A second operation on a schedule in Europe/Berlin, with a long source path."""
    deep = tmp_path / "a-rather-long-folder-name" / "with-more-levels" / "tasks"
    deep.parent.mkdir(parents=True)
    deep.symlink_to(serve_env["LAKESYNC_LAKE_URI"])
    config = tmp_path / "lakesync.toml"
    config.write_text(
        f'[operations.nightly-projects-copy]\nsource = "{deep}"\ncollection = "projects"\n'
        'key = "taskDetailId"\nschedule = "30 7 * * *"\ntimezone = "Europe/Berlin"\n'
    )
    serve_env["LAKESYNC_OPERATIONS_FILE"] = str(config)
    return serve_env


def test_tables_fit_and_the_operations_view_pauses_a_schedule(serve: Any, run: Any) -> None:
    for op in ("copy-taskdetail", "nightly-projects-copy"):
        started = httpx.post(serve.url + "/api/jobs", json={"operation": op})
        assert started.status_code == 202, started.text
    r = run(width=1280, height=900)
    page = r.page
    page.goto(serve.url + "/")
    expect(page.locator("#jobs-body tr[data-job-id]")).to_have_count(2, timeout=30_000)
    expect(page.locator("#jobs-body")).not_to_contain_text("In progress", timeout=60_000)
    for width in (1280, 390):
        page.set_viewport_size({"width": width, "height": 900})
        page.wait_for_timeout(200)
        for table, scroll, client in page.evaluate(FITS):
            assert scroll <= client, f"{table} overflows its card at {width}: {scroll} > {client}"
        sizes = page.evaluate("[document.documentElement.scrollWidth, innerWidth]")
        assert sizes[0] <= sizes[1], sizes
        # numbers, times and the collection are never cut (they wrap at spaces)
        assert not page.evaluate(CUT), (width, page.evaluate(CUT))
        if width == 390:  # stacked operations cells each say what they are
            assert page.evaluate(UNLABELLED) == [], page.evaluate(UNLABELLED)
        r.shot(f"fit-{width}")
    page.set_viewport_size({"width": 1280, "height": 900})

    source = page.locator("#jobs-body .c-source span").first
    full = source.get_attribute("title") or ""
    assert full.startswith("/") and source.inner_text().startswith("…/")
    assert full.endswith(source.inner_text().removeprefix("…"))  # shortened from the left

    ops = page.locator("#operations-body")
    row = ops.locator("tr", has_text="nightly-projects-copy")
    expect(row).to_contain_text("30 7 * * * (Europe/Berlin)")
    # in its own zone, named as `lakesync schedules` names it (CET), not as a browser does
    expect(row).to_contain_text(re.compile(r"07:30 CES?T"))
    expect(row).not_to_contain_text("GMT")
    listed = httpx.get(serve.url + "/api/operations").json()["operations"]
    nightly = next(o for o in listed if o["name"] == "nightly-projects-copy")
    at = datetime.fromisoformat(nightly["nextRun"].replace("Z", "+00:00"))
    zone = at.astimezone(ZoneInfo("Europe/Berlin")).tzname()  # what the CLI prints
    assert nightly["schedule"]["nextRunZone"] == zone, nightly
    expect(row).to_contain_text(f"07:30 {zone}")
    expect(row).to_contain_text(
        "completed", timeout=120_000
    )  # the page polls; the copy ends on its own time
    row.get_by_role("button", name=re.compile("Pause")).click()
    expect(row).to_contain_text("paused")
    expect(row.get_by_role("button")).to_have_text("Unpause")
    state = httpx.get(serve.url + "/api/operations").json()["operations"]
    assert next(o for o in state if o["name"] == "nightly-projects-copy")["schedule"]["paused"]
    row.get_by_role("button", name=re.compile("Unpause")).click()
    expect(row.get_by_role("button")).to_have_text("Pause")

    page.locator("#options summary").click()
    help_text = page.locator("#opt-source-help")
    expect(help_text).to_contain_text(serve.env["LAKESYNC_LAKE_URI"])  # the allowed roots
    assert serve.env["LAKESYNC_LAKE_URI"] in (page.locator("#opt-source").get_attribute(
        "placeholder") or "")  # fmt: skip


def test_preview_notice_and_average_rate(serve: Any, run: Any, db: Any) -> None:
    r = run(width=1280, height=1000)
    page = r.page
    page.goto(serve.url + "/")
    page.locator("#preview-button").click()
    preview = page.locator("#preview")
    expect(preview).to_be_visible(timeout=30_000)
    expect(preview).to_contain_text("Nothing was written")
    expect(page.locator("#preview-schema")).to_contain_text("date")
    docs = page.locator("#preview-documents").inner_text().splitlines()
    assert len(docs) == 10 and all(json.loads(d)["_id"] for d in docs)
    # as written: 7.0 stays a double (JSON.parse would show 7), fields spaced to wrap
    answer = httpx.post(serve.url + "/api/preview", json={"operation": "copy-taskdetail"})
    assert docs == [json.dumps(d, ensure_ascii=False) for d in answer.json()["documents"]]
    assert re.search(r'"hoursLogged": \d+\.0,', "\n".join(docs)), docs
    expect(page.locator("#preview-rejections")).to_contain_text("taskDetailId")
    assert db.jobstatuses.count_documents({}) == 0 and db.taskdetails.count_documents({}) == 0
    r.shot("preview")
    page.set_viewport_size({"width": 390, "height": 900})  # on a phone still a table
    page.wait_for_timeout(200)
    tops = page.evaluate(ROW_TOPS)
    assert tops and all(len(set(row)) == 1 for row in tops), tops  # a row's cells side by side
    head = "document.querySelector('.preview__schema thead').getBoundingClientRect().height"
    assert page.evaluate(head) > 10  # the column names shown (the jobs tables hide theirs)
    cells = "[...document.querySelectorAll('#preview-schema td')]"
    displays = page.evaluate(f"{cells}.map(td => getComputedStyle(td).display)")
    assert set(displays) == {"table-cell"}, set(displays)
    sizes = page.evaluate("[document.documentElement.scrollWidth, innerWidth]")
    assert sizes[0] <= sizes[1], sizes
    r.shot("preview-390")
    page.set_viewport_size({"width": 1280, "height": 1000})

    page.locator("#copy-button").click()
    expect(page.locator("#status-badge")).to_have_attribute(
        "data-status", "completed", timeout=60_000
    )
    expect(page.locator("#notice")).to_be_empty()  # "Copy started…" gone with the job
    rate = page.locator("#stat-rate")
    expect(rate.locator("xpath=preceding-sibling::dt")).to_have_text("Records/s (average)")
    job = db.jobstatuses.find_one()
    seconds = (job["endTime"] - job["startTime"]).total_seconds()
    shown = float(rate.inner_text().replace(",", ""))
    assert abs(shown - job["processedRecords"] / seconds) <= max(1, shown * 0.05), (shown, seconds)

    # a 64-bit Iceberg snapshot id past 2^53 is shown exactly (a JavaScript number rounds it)
    snapshot = 2**62 + 1
    job_id = new_job_id()
    copied = {k: v for k, v in job.items() if k not in ("_id", "clientJobId")}
    db.jobstatuses.insert_one(
        {**copied, "jobId": job_id, "options": {"icebergSnapshotId": Int64(snapshot)}}
    )
    answer = httpx.get(f"{serve.url}/api/jobs/{job_id}")
    assert answer.json()["options"]["icebergSnapshotId"] == snapshot, answer.text
    page.goto(f"{serve.url}/jobs/{job_id}")
    expect(page.locator("#details")).to_contain_text(f"Iceberg snapshot{snapshot}")


BADGES_CUT = """() => [...document.querySelectorAll('#jobs-table td.c-status')]
  .filter(td => td.scrollWidth > td.clientWidth + 1
    || td.firstElementChild.getBoundingClientRect().right > td.closest('tr')
      .getBoundingClientRect().right).map(td => td.textContent)"""

# the text's own width: an ellipsis that hides a pixel or two leaves scrollWidth at most 1
# above clientWidth
STATS_CUT = """() => [...document.querySelectorAll('.stat dd')].filter(e => {
  const text = document.createRange(); text.selectNodeContents(e);
  return text.getBoundingClientRect().width > e.clientWidth + 0.5; }).map(e => e.textContent)"""


def test_the_operations_follow_the_job_and_its_numbers_are_never_cut(serve: Any, run: Any) -> None:
    """A newcomer's copy from the page: the operations' "last job" follows it to its end
    (without a reload, with no schedule to poll for), and at 390 pixels a running job's ETA
    ("2 min 05 s") wraps in its card instead of being cut."""
    r = run(width=1280, height=900)
    page = r.page
    page.goto(serve.url + "/")
    row = page.locator("#operations-body tr", has_text="copy-taskdetail")
    expect(row).to_contain_text("—")  # no job yet
    page.locator("#copy-button").click()
    expect(page.locator("#status-badge")).to_have_attribute(
        "data-status", "completed", timeout=120_000
    )
    expect(row).to_contain_text("completed")  # the last job, as GET /api/operations has it
    job_id = page.locator("#job-id").inner_text()
    page.set_viewport_size({"width": 390, "height": 900})  # each job a card: its badge whole
    expect(page.locator("#jobs-body td.c-status").first).to_contain_text("Completed")
    assert not page.evaluate(BADGES_CUT), page.evaluate(BADGES_CUT)

    running = httpx.get(f"{serve.url}/api/jobs/{job_id}").json()
    now = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    running |= {
        "status": "in_progress", "endTime": None, "processedRecords": 2000,
        "percentComplete": 2, "recordsPerSecond": 793, "etaSeconds": 125,
        "updatedAt": now, "heartbeatAt": now, "message": "Copying: 2,000 of 100,000 records",
    }  # fmt: skip
    small = run(width=390, height=900)
    phone = small.page
    phone.route("**/api/jobs/*/events*", lambda route: route.abort())
    phone.route(re.compile(rf".*/api/jobs/{job_id}$"), lambda route: route.fulfill(json=running))
    phone.goto(f"{serve.url}/jobs/{job_id}")
    expect(phone.locator("#stat-eta")).to_have_text("2 min 05 s")
    small.shot("running-390")
    assert not phone.evaluate(STATS_CUT), phone.evaluate(STATS_CUT)
