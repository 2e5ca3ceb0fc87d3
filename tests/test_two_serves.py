"""Two serves on one data folder and its embedded server: when the serve that started the
server stops it (SIGTERM), the other one starts it again and is ready within seconds."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest
from tests.helpers import ServeProcess, wait_for

pytestmark = pytest.mark.slow


def _ready(serve: ServeProcess) -> bool:
    try:
        return httpx.get(f"{serve.url}/readyz", timeout=3).status_code == 200
    except httpx.HTTPError:
        return False


def _copies(serve: ServeProcess) -> None:
    r = httpx.post(f"{serve.url}/api/jobs", json={"operation": "copy-taskdetail"}, timeout=30)
    assert r.status_code == 202, r.text
    job_id = r.json()["jobId"]
    done = wait_for(
        lambda: (s := httpx.get(f"{serve.url}/api/jobs/{job_id}", timeout=10).json())["status"]
        in ("completed", "failed")
        and s,
        timeout=120,
    )
    assert done["status"] == "completed", done


def test_a_serve_whose_embedded_server_is_stopped_by_the_other_starts_it_again(
    serve_env: dict[str, str], tmp_path: Path
) -> None:
    env = {k: v for k, v in serve_env.items() if k != "LAKESYNC_MONGODB_URI"}  # embedded
    first = ServeProcess(env, tmp_path / "first.log").start(timeout=120)
    second = ServeProcess(env, tmp_path / "second.log")
    third = ServeProcess(env, tmp_path / "third.log")
    try:
        second.start(timeout=120)
        assert "using the embedded server already running" in second.log.read_text()
        first.terminate(timeout=60)  # stops the server the second one uses
        assert "embedded MongoDB-wire server stopped" in first.log.read_text()
        wait_for(lambda: _ready(second), timeout=60)
        assert "went away; starting it again" in second.log.read_text()
        _copies(second)
        # the sequence: SIGTERM, and a new serve 3 s later on the same folder
        assert second.proc is not None
        second.proc.send_signal(15)
        time.sleep(3)
        third.start(timeout=120)
        second.proc.wait(60)
        wait_for(lambda: _ready(third), timeout=60)
        _copies(third)
        time.sleep(2)  # the third stays on a live server
        assert _ready(third)
    finally:
        for s in (first, second, third):
            s.kill()
