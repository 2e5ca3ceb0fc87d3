"""The page shows the selected operation's schedule, next run, last run and its result, and
marks scheduled jobs in the recent jobs table (headless Chromium, a real `serve`)."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from tests.helpers import ServeProcess

pytestmark = pytest.mark.browser

expect = pytest.importorskip("playwright.sync_api").expect


def _set(clock: Path, seconds: float) -> None:
    tmp = clock.with_suffix(".tmp")
    tmp.write_text(str(seconds))
    tmp.replace(clock)


def test_page_shows_the_schedule_and_marks_scheduled_jobs(
    serve_env: dict[str, str],
    tmp_path: Path,
    run: Any,
) -> None:
    clock = tmp_path / "clock"
    start = int(time.time())
    _set(clock, start + 0.5)
    env = dict(serve_env, LAKESYNC_SCHEDULE="10s", LAKESYNC_SCHEDULER_CLOCK_FILE=str(clock))
    serve = ServeProcess(env, tmp_path / "serve.log").start(timeout=120)
    try:
        r = run()
        page = r.page
        page.goto(serve.url + "/")
        line = page.locator("#operation-schedule")
        expect(line).to_contain_text("Runs by itself every 10s; next run")
        first = start - start % 10 + 10
        _set(clock, first + 0.25)  # the next slot is due: the schedule starts a job
        page.wait_for_timeout(1000)
        page.reload()
        expect(page.locator("#jobs-body")).to_contain_text("scheduled", timeout=30_000)
        expect(line).to_contain_text(re.compile(r"Last run .*: (started|in progress|completed)"))
        r.shot("schedule")
        assert httpx.post(f"{serve.url}/api/operations/copy-taskdetail/pause").status_code == 200
        page.reload()
        expect(line).to_contain_text("paused.")
    finally:
        serve.kill()
