"""Two serves on one data folder and its embedded server: when the serve that started the
server stops it (SIGTERM), the other one starts it again and is ready within seconds."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest
from tests.helpers import ServeProcess, wait_for

from lakesync.mongo import EmbeddedServer


def test_revive_never_starts_a_second_server_and_restarts_a_gone_one_on_its_port(
    tmp_path: Path,
) -> None:
    first = EmbeddedServer(tmp_path).start()
    second = EmbeddedServer(tmp_path)
    try:
        second.start()
        assert second.port == first.port and second.process is None  # attached
        assert second.revive() and second.process is None  # alive (maybe busy): left alone
        first.stop()
        assert not (tmp_path / "mongo" / "embedded.json").exists()
        assert not second.alive()
        assert second.revive()  # gone: started again, on the same port
        assert second.process is not None and second.owned and second.alive()
        assert second.port == first.port
        third = EmbeddedServer(tmp_path).start()  # a newcomer attaches to it
        assert third.port == second.port and third.process is None
    finally:
        second.stop()
        first.stop()


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
        lambda: (
            (s := httpx.get(f"{serve.url}/api/jobs/{job_id}", timeout=10).json())["status"]
            in ("completed", "failed")
            and s
        ),
        timeout=120,
    )
    assert done["status"] == "completed", done


@pytest.mark.slow
def test_a_serve_whose_embedded_server_is_stopped_by_the_other_starts_it_again(
    serve_env: dict[str, str], tmp_path: Path
) -> None:
    env = {k: v for k, v in serve_env.items() if k != "LAKESYNC_MONGODB_URI"}  # embedded
    first = ServeProcess(env, tmp_path / "first.log").start(timeout=120)
    second = ServeProcess(env, tmp_path / "second.log")
    third = ServeProcess(env, tmp_path / "third.log")
    try:
        second.start(timeout=120)
        assert "embedded MongoDB-wire server already running" in second.log.read_text()
        first.terminate(timeout=60)  # stops the server the second one uses
        assert "embedded MongoDB-wire server stopped" in first.log.read_text()
        wait_for(lambda: _ready(second), timeout=60)
        # ready as soon as the new server answers, which can be before the line is logged
        wait_for(lambda: "server started again on port" in second.log.read_text(), timeout=30)
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
