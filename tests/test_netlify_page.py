"""The seed's own frontend, unchanged, against `lakesync serve`, in headless Chromium.

tests/pages/datacopy.html is that frontend written from the seed's description: it names
its job `job_<Date.now()>`, POSTs it to copy-taskdetail, and polls simple-status with its
own id every 2 s. The test serves it on lakesync's origin (Playwright answers that one URL;
every other request goes to the real server), as a Netlify site serves its page beside its
functions. lakesync itself does not ship it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import httpx
import pytest
from tests.helpers import ARTIFACTS, ServeProcess, wait_for

pytestmark = pytest.mark.browser

sync_api = pytest.importorskip("playwright.sync_api")
expect = sync_api.expect

PAGE = Path(__file__).resolve().parent / "pages" / "datacopy.html"
PAGE_PATH = "/__test__/datacopy.html"  # answered by the test; lakesync has no such route
COPY = "/.netlify/functions/copy-taskdetail"
COPIED_5000 = "Copied 5,000 records: 4,975 inserted, 0 updated, 0 unchanged, 25 rejected"


class SeedPage:
    """The seed's page opened on the server's origin; `platform_504` answers the start like
    Netlify did for the seed (the function runs; the browser gets an empty 504)."""

    def __init__(self, browser: Any, origin: str, *, platform_504: bool = False) -> None:
        self.context = browser.new_context(viewport={"width": 900, "height": 600})
        self.context.route(origin + PAGE_PATH, self._serve_page)
        self.forwarded: list[int] = []
        if platform_504:
            self.context.route(origin + COPY, self._answer_504)
        self.page = self.context.new_page()
        self.page.set_default_timeout(20_000)
        self.errors: list[str] = []
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.goto(origin + PAGE_PATH)

    @staticmethod
    def _serve_page(route: Any) -> None:
        route.fulfill(status=200, content_type="text/html; charset=utf-8", body=PAGE.read_text())

    def _answer_504(self, route: Any) -> None:
        answer = route.fetch()  # the request reaches lakesync unchanged...
        self.forwarded.append(answer.status)
        route.fulfill(status=504, body="")  # ...the page learns nothing from the answer

    @property
    def log(self) -> dict[str, Any]:
        value: dict[str, Any] = self.page.evaluate("window.__seed")
        return value

    def progress_polls(self) -> list[dict[str, Any]]:
        return [p for p in self.log["polls"] if p.get("state") == "in_progress"]

    def shot(self, name: str) -> None:
        ARTIFACTS.mkdir(exist_ok=True)
        self.page.screenshot(path=str(ARTIFACTS / f"seed-page-{name}.png"), full_page=True)

    def close(self) -> None:
        self.context.close()
        assert not self.errors, f"script errors on the page: {self.errors}"


def check_polls(polls: list[dict[str, Any]], job_id: str) -> None:
    """Every answered poll named the one job; progress never went backwards; no 404."""
    answered = [p for p in polls if p["status"]]
    assert answered and all(p["status"] == 200 for p in answered), polls
    assert {p["jobId"] for p in answered} == {job_id}
    processed = [p["processed"] for p in answered]
    assert processed == sorted(processed), processed


def test_the_seed_page_copies_the_demo_lake_polling_its_own_job_id(
    serve_env: dict[str, str], slow_database: Any, request: Any, browser: Any
) -> None:
    serve_env["LAKESYNC_BATCH_SIZE"] = "20"  # with the slow link, a copy of several seconds
    serve: ServeProcess = request.getfixturevalue("serve")
    seed = SeedPage(browser, serve.url)
    page = seed.page
    try:
        expect(page.get_by_role("button", name="Copy TaskDetail Data")).to_be_enabled()
        page.get_by_role("button", name="Copy TaskDetail Data").click()
        expect(page.locator("#message")).to_have_text(
            "Copy started as background process", timeout=30_000
        )
        expect(page.get_by_role("button", name="Copy TaskDetail Data")).to_be_disabled()
        expect(page.locator("#progress")).to_contain_text(
            re.compile(r"in_progress: [1-9][\d,]* of 5,000 records \(\d+%\)"), timeout=60_000
        )
        expect(page.locator("#message")).to_have_text("Copy completed", timeout=120_000)
        expect(page.locator("#result")).to_have_text(COPIED_5000, timeout=10_000)
        expect(page.locator("#progress")).to_have_text(
            "completed: 5,000 of 5,000 records (100%), 4,975 inserted, 0 updated, 25 errors"
        )
        seed.shot("completed")
        log = seed.log
        assert re.fullmatch(r"job_\d{13}", log["jobId"]), log["jobId"]
        assert log["starts"] == [{"status": 202, "empty": False}]
        status = httpx.get(f"{serve.url}/.netlify/functions/simple-status",
                           params={"jobId": log["jobId"]}).json()  # fmt: skip
        assert status["clientJobId"] == log["jobId"] and status["status"] == "completed"
        check_polls(log["polls"], status["jobId"])
        assert any(0 < p["processed"] < 5000 for p in seed.progress_polls()), log["polls"]
        jobs = httpx.get(f"{serve.url}/api/jobs").json()["jobs"]
        assert [j["jobId"] for j in jobs] == [status["jobId"]]
    finally:
        seed.close()


def test_the_seed_page_sees_completion_through_an_empty_504_and_a_server_restart(
    serve_env: dict[str, str], slow_database: Any, request: Any, browser: Any
) -> None:
    serve_env["LAKESYNC_BATCH_SIZE"] = "10"  # slower still: the restart lands mid-copy
    serve: ServeProcess = request.getfixturevalue("serve")
    seed = SeedPage(browser, serve.url, platform_504=True)
    page = seed.page
    try:
        page.get_by_role("button", name="Copy TaskDetail Data").click()
        expect(page.locator("#message")).to_have_text(
            "Copy started as background process", timeout=30_000
        )
        assert seed.forwarded == [202]  # lakesync started it; the page only saw the 504
        wait_for(lambda: any(p["processed"] > 0 for p in seed.progress_polls()), timeout=60)
        before = max(p["processed"] for p in seed.progress_polls())
        assert before < 5000, "the copy ended before the restart; slow it down"

        serve.kill()  # SIGKILL mid-copy: the job resumes from its checkpoint after its lease
        wait_for(lambda: any(p["status"] == 0 for p in seed.log["polls"]), timeout=30)
        expect(page.locator("#progress")).to_have_attribute("data-waiting", "true")
        seed.shot("server-down")
        serve.start()

        expect(page.locator("#message")).to_have_text("Copy completed", timeout=180_000)
        expect(page.locator("#result")).to_have_text(COPIED_5000, timeout=10_000)
        expect(page.locator("#error")).to_have_text("")
        seed.shot("completed-after-restart")
        log = seed.log
        assert log["starts"] == [{"status": 504, "empty": True}]
        status = httpx.get(f"{serve.url}/.netlify/functions/simple-status",
                           params={"jobId": log["jobId"]}).json()  # fmt: skip
        assert status["clientJobId"] == log["jobId"] and status["attempt"] >= 2, status
        assert status["processedRecords"] == status["totalRecords"] == 5000
        check_polls(log["polls"], status["jobId"])
        polls = log["polls"]
        down = [i for i, p in enumerate(polls) if p["status"] == 0]
        assert any(p["status"] == 200 and p["state"] == "in_progress" for p in polls[: down[0]])
        assert polls[-1]["state"] == "completed" and all(p["status"] for p in polls[down[-1] + 1 :])
    finally:
        seed.close()
