"""Security: bearer-token auth on every protected route, safe job sources, body limits,
no secret in any response, log line or stored document, and `serve` refusing to be exposed.
"""

from __future__ import annotations

import glob
import io
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr
from pymongo.collection import Collection
from pymongo.errors import AutoReconnect, OperationFailure
from tests.helpers import ServeProcess, cli_zygote, free_port, inject, lakesync

from lakesync.api.app import create_app
from lakesync.api.auth import needs_token
from lakesync.api.server import check_exposure, is_loopback
from lakesync.config import Settings
from lakesync.errors import ConfigError, SourceError
from lakesync.lake import Lake
from lakesync.locations import within_roots
from lakesync.logs import JobFields, JsonFormatter, MaskingFormatter
from lakesync.models import Outcome
from lakesync.mongo import EmbeddedServer, Mongo
from lakesync.runtime import Runtime

TOKEN = "sec-test-token-5b0c1e9f7a"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
PASSWORD = "s3cr3t-pw"  # must never show up anywhere
#: Routes anyone may call; everything else must sit under a protected prefix.
OPEN = {"/", "/healthz", "/readyz", "/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect"}
FAKE_JOB = "job_0000000000000000000000000z"


def tokened(settings: Settings, **update: Any) -> Settings:
    return settings.model_copy(update={"api_token": SecretStr(TOKEN), **update})


@pytest.fixture
def app_client(settings: Settings) -> Iterator[tuple[Runtime, TestClient]]:
    """The app with a token and no executor: jobs stay pending, only the API is exercised."""
    with Runtime(tokened(settings)) as rt, TestClient(create_app(rt)) as client:
        yield rt, client


def protected_calls(client: TestClient) -> list[tuple[str, str]]:
    """(method, path) of every declared route under a protected prefix, parameters filled in.

    Read from the OpenAPI document: this FastAPI keeps included routers lazily, so
    `app.routes` does not list their routes. Routes hidden from the schema are still
    guarded by prefix (`auth.TokenGuard`); the unknown-path case below checks that.
    """
    calls = []
    for path, operations in client.get("/openapi.json").json()["paths"].items():
        assert needs_token(path) or path in OPEN, f"{path} is neither protected nor known open"
        if needs_token(path):
            filled = re.sub(r"\{[^}]+\}", FAKE_JOB, path)
            calls += [(method.upper(), filled) for method in operations]
    return calls


# -- authentication ----------------------------------------------------------------------


def test_every_protected_route_answers_401_without_the_right_token(
    app_client: tuple[Runtime, TestClient],
) -> None:
    _, client = app_client
    calls = protected_calls(client)
    paths = {p for _, p in calls}
    seed = ("/.netlify/functions/copy-taskdetail", "/.netlify/functions/simple-status")
    expected = {"/api/jobs", f"/api/jobs/{FAKE_JOB}/events", "/api/operations", "/metrics", *seed}
    assert expected <= paths
    wrong = [
        {},
        {"Authorization": f"Bearer {TOKEN}x"},
        {"Authorization": f"Bearer {TOKEN[:-1]}"},
        {"Authorization": "Bearer "},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": TOKEN},
        {"X-Api-Token": TOKEN},
    ]
    for method, path in calls:
        for headers in wrong:
            r = client.request(method, path, headers=headers, json={})
            assert r.status_code == 401, (method, path, headers, r.text)
            assert r.headers["www-authenticate"] == "Bearer"
            assert "LAKESYNC_API_TOKEN" in r.json()["error"] and TOKEN not in r.text
        # the query-string token is for EventSource only
        r = client.request(method, path, params={"access_token": TOKEN}, json={})
        assert r.status_code == (404 if path.endswith("/events") else 401), (method, path)
    # 401 comes before anything reads the body: no parse error, no size error, no 404
    bad = {"content-type": "application/json"}
    assert client.post("/api/jobs", content=b"{not json", headers=bad).status_code == 401
    assert client.post("/api/jobs", content=b"x" * 200_000, headers=bad).status_code == 401
    assert client.get("/api/no-such-route").status_code == 401
    for path in ("/healthz", "/readyz", "/", "/docs", "/openapi.json", "/static/app.js"):
        assert client.get(path).status_code == 200, path


def test_right_token_works_on_every_route_over_http(
    serve_env: dict[str, str], tmp_path: Path
) -> None:
    serve_env["LAKESYNC_API_TOKEN"] = TOKEN
    proc = ServeProcess(serve_env, tmp_path / "serve.log").start()
    try:
        url = proc.url
        r = httpx.post(f"{url}/api/jobs", json={"options": {"batchSize": 1000}}, headers=AUTH)
        assert r.status_code == 202, r.text
        job_id = r.json()["jobId"]
        # EventSource style: the token in the query string
        with httpx.stream("GET", f"{url}/api/jobs/{job_id}/events",
                          params={"access_token": TOKEN}, timeout=60) as events:  # fmt: skip
            assert events.status_code == 200
            kinds = [line[7:] for line in events.iter_lines() if line.startswith("event: ")]
        assert kinds[-1] == "end" and "status" in kinds
        with httpx.stream("GET", f"{url}/api/jobs/{job_id}/events", headers=AUTH) as events:
            assert events.status_code == 200 and "event: end" in events.read().decode()
        lower = {"Authorization": f"bearer {TOKEN}"}  # the scheme is case-insensitive
        assert httpx.get(f"{url}/api/jobs/{job_id}", headers=lower).json()["status"] == "completed"
        assert httpx.get(f"{url}/api/jobs", headers=AUTH).json()["jobs"][0]["jobId"] == job_id
        assert httpx.get(f"{url}/api/operations", headers=AUTH).status_code == 200
        assert httpx.post(f"{url}/api/jobs/{job_id}/cancel", headers=AUTH).status_code == 409
        seed = httpx.post(f"{url}/.netlify/functions/copy-taskdetail", headers=AUTH)
        assert seed.status_code == 202
        status = httpx.get(f"{url}/.netlify/functions/simple-status",
                           params={"jobId": seed.json()["jobId"]}, headers=AUTH)  # fmt: skip
        assert status.status_code == 200 and status.json()["jobId"] == seed.json()["jobId"]
        metrics = httpx.get(f"{url}/metrics", headers=AUTH)
        assert metrics.status_code == 200 and "lakesync_records_total" in metrics.text
        assert httpx.get(f"{url}/metrics").status_code == 401
        assert httpx.get(f"{url}/healthz").status_code == 200
        assert httpx.get(f"{url}/readyz").json() == {"status": "ready"}
    finally:
        proc.kill()
    assert TOKEN not in (tmp_path / "serve.log").read_text()


def test_serve_refuses_a_non_loopback_address_without_a_token(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LAKESYNC_")}
    env["LAKESYNC_DATA_DIR"] = str(tmp_path / "data")
    for host in ("0.0.0.0", "::"):
        cli_zygote()  # lakesync imported: what is timed is the command, not the import
        started = time.monotonic()
        run = lakesync(env, "serve", "--host", host, "--port", str(free_port()), timeout=60)
        assert run.returncode != 0 and time.monotonic() - started < 15
        assert f"Refusing to listen on {host}" in run.stderr
        assert "LAKESYNC_API_TOKEN" in run.stderr and "openssl rand" in run.stderr
    assert not (tmp_path / "data" / "mongo").exists()  # refused before starting anything


def test_which_addresses_count_as_loopback(settings: Settings) -> None:
    for host in ("127.0.0.1", "127.0.0.2", "::1", "localhost"):
        assert is_loopback(host), host
        check_exposure(settings, host)
    for host in ("0.0.0.0", "::", "10.1.2.3", "192.168.0.1", "", "no-such-host.invalid"):
        assert not is_loopback(host), host
        with pytest.raises(ConfigError, match="LAKESYNC_API_TOKEN"):
            check_exposure(settings, host)
        check_exposure(tokened(settings), host)


# -- safe sources -------------------------------------------------------------------------


@pytest.fixture
def lakes(tmp_path: Path, demo_lake: Path) -> tuple[Path, Path]:
    """A lake with a sub-directory and a symlink out of it, and a directory beside it."""
    root = tmp_path.resolve()
    lake, outside = root / "lake", root / "outside"
    shutil.copytree(demo_lake, lake / "tasks")
    shutil.copytree(demo_lake, outside)
    (lake / "escape").symlink_to(outside)
    (lake / "tasks" / "leak.parquet").symlink_to(next(outside.rglob("*.parquet")))
    return lake, outside


def post_source(client: TestClient, source: str, seed: bool = False) -> httpx.Response:
    body = {"options": {"source": source}}
    path = "/.netlify/functions/copy-taskdetail" if seed else "/api/jobs"
    r: httpx.Response = client.post(path, json=body, headers=AUTH)
    return r


def test_sources_outside_the_lake_are_refused(settings: Settings, lakes: tuple[Path, Path]) -> None:
    lake, outside = lakes
    refused = [
        f"{lake}/../outside", f"{lake}/tasks/../../outside", f"{lake}/escape",
        f"{lake}/escape/projectId=PRJ-000", f"{lake}/tasks/leak.parquet", f"{outside}",
        f"file://{outside}", f"{lake}/../outside/**/*.parquet", f"{lake}X", "/etc", "/",
        "s3://other-bucket/tasks", f"s3://bucket{lake}", "~/",
    ]  # fmt: skip
    with Runtime(tokened(settings, lake_uri=str(lake))) as rt, TestClient(create_app(rt)) as c:
        for source in refused:
            r = post_source(c, source)
            assert r.status_code == 400, (source, r.text)
            assert "outside the allowed roots" in r.json()["error"], source
            assert str(lake) in r.json()["error"] and r.json()["allowedRoots"] == [str(lake)]
            seed = post_source(c, source, seed=True)  # the seed endpoint takes no options
            assert seed.status_code == 400 and "takes no options" in seed.json()["error"]
        assert post_source(c, f"{lake}/tasks").status_code == 202
        assert post_source(c, f"{lake}/tasks/**/*.parquet").status_code == 202
        missing = post_source(c, f"{lake}/no-such-dir")  # inside: existence may be told
        assert missing.status_code == 400 and "does not exist" in missing.json()["error"]
        assert rt.store.jobs.count_documents({}) == 2


def test_dot_segments_after_a_wildcard_are_refused_whether_files_exist_or_not(
    settings: Settings, lakes: tuple[Path, Path]
) -> None:
    """Only the part of a glob before its first wildcard is resolved and compared with the
    roots, but glob.glob follows a later `..`: 400 versus 202 would tell what exists outside."""
    lake, outside = lakes
    (outside.parent / "empty").mkdir()
    with_files = [f"{lake}/*/../../outside/**/*.parquet", f"{lake}/tasks/*/../../../outside/*"]
    assert all(glob.glob(s, recursive=True) for s in with_files)  # the oracle this closes
    refused = [
        *with_files, f"{lake}/*/../../empty/**/*.parquet", f"{lake}/*/../../no-such-dir/*",
        f"{lake}/tasks/*/../../../outside/*.nothing", f"{lake}/tasks/*/../../tasks/*",
        f"{lake}/tasks/*/./*.parquet", f"file://{lake}/*/%2E%2E/%2E%2E/outside/*",
        f"{lake}/tasks/**/../../../outside/*.parquet", f"{lake}/t?sks/../../outside/*",
    ]  # fmt: skip
    with Runtime(tokened(settings, lake_uri=str(lake))) as rt, TestClient(create_app(rt)) as c:
        for source in refused:
            r = post_source(c, source)
            assert r.status_code == 400, (source, r.text)
            assert "outside the allowed roots" in r.json()["error"], (source, r.text)
        assert rt.store.jobs.count_documents({}) == 0
        assert post_source(c, f"{lake}/tasks/*/*.parquet").status_code == 202
        assert rt.store.jobs.count_documents({}) == 1
    with pytest.raises(SourceError, match="not allowed"):  # S3: refused wherever they are
        within_roots("s3://corp-lake/exports/*/../../other/*", ["s3://corp-lake/exports"])


def test_the_lake_reader_refuses_dot_segments_after_a_wildcard(lakes: tuple[Path, Path]) -> None:
    lake, _ = lakes
    for source in (f"{lake}/*/../../outside/**/*.parquet", f"{lake}/*/../../no-such-dir/*"):
        with pytest.raises(SourceError) as info:
            Lake.open(source)
        assert "'..' segment after a wildcard" in str(info.value) and "Remove it" in str(info.value)
    assert Lake.open(f"{lake}/tasks/*/*.parquet").files  # a glob inside the lake still opens


def test_allowed_roots_replace_the_lake_as_the_limit(
    settings: Settings, lakes: tuple[Path, Path]
) -> None:
    lake, outside = lakes
    roots = [str(outside), "s3://corp-lake/exports"]
    with Runtime(tokened(settings, lake_uri=str(lake), allowed_roots=roots)) as rt, \
            TestClient(create_app(rt)) as c:  # fmt: skip
        assert post_source(c, str(outside)).status_code == 202
        assert post_source(c, "s3://corp-lake/exports/tasks").status_code == 202  # not listed
        for source in (f"{lake}/tasks", "s3://corp-lake/other", "s3://corp-lake/exports/../x",
                       "s3://key:secret@corp-lake/exports/t"):  # fmt: skip
            r = post_source(c, source)
            assert r.status_code == 400, (source, r.text)
            assert "secret" not in r.text


def test_without_a_lake_uri_only_the_demo_lake_is_allowed(
    settings: Settings, demo_lake: Path
) -> None:
    settings = tokened(settings, lake_uri=None)
    (settings.demo_lake_dir / "part").mkdir(parents=True)
    with Runtime(settings) as rt, TestClient(create_app(rt)) as c:
        r = post_source(c, str(demo_lake))
        assert r.status_code == 400 and str(settings.demo_lake_dir) in r.json()["error"]
        assert post_source(c, str(settings.demo_lake_dir / "part")).status_code == 202


def test_the_cli_may_copy_any_source_its_user_can_read(settings: Settings, tmp_path: Path) -> None:
    with Runtime(tokened(settings, lake_uri=str(tmp_path / "elsewhere"))) as rt:
        status, created = rt.jobs.start("copy-taskdetail", {"source": settings.lake_uri},
                                        trusted=True)  # fmt: skip
    assert created and status.options["source"] == settings.lake_uri


def test_bodies_and_lists_are_bounded(app_client: tuple[Runtime, TestClient]) -> None:
    _, client = app_client

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted while it streams in
        for _ in range(100):
            yield b" " * 1024

    for path in ("/api/jobs", "/.netlify/functions/copy-taskdetail"):
        headers = {**AUTH, "content-type": "application/json"}
        r = client.post(path, content=chunks(), headers=headers)
        assert r.status_code == 413 and "larger than 65536 bytes" in r.json()["error"], r.text
    for limit in (0, 201, 10**9):
        assert client.get("/api/jobs", params={"limit": limit}, headers=AUTH).status_code == 422
    assert client.get("/api/jobs", params={"limit": 200}, headers=AUTH).status_code == 200
    long = "x" * 300
    assert client.get("/api/jobs", params={"operation": long}, headers=AUTH).status_code == 422
    r = client.post("/api/jobs", json={}, headers={**AUTH, "Idempotency-Key": long})
    assert r.status_code == 422


# -- no secret leaks ----------------------------------------------------------------------


@pytest.fixture
def secret_uri(mongo_server: EmbeddedServer) -> str:
    """A URI with a password to the session's server. nx-27017 accepts PLAIN auth and does
    not check the password (a stand-in for a real server's credentials)."""
    return (
        f"mongodb://lakesync:{PASSWORD}@127.0.0.1:{mongo_server.port}/"
        "?directConnection=true&authMechanism=PLAIN&authSource=admin"
    )


@pytest.fixture
def captured_logs() -> Iterator[io.StringIO]:
    """Every log record, DEBUG and up, formatted as JSON and as text, as they would be written."""
    out = io.StringIO()
    handlers = []
    for formatter in (JsonFormatter(), MaskingFormatter("%(levelname)s %(name)s: %(message)s")):
        handler = logging.StreamHandler(out)
        handler.setFormatter(formatter)
        handler.addFilter(JobFields())
        handlers.append(handler)
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.DEBUG)
    for h in handlers:
        root.addHandler(h)
    yield out
    for h in handlers:
        root.removeHandler(h)
    root.setLevel(level)


def test_a_password_in_the_mongodb_uri_never_leaks(
    settings: Settings,
    secret_uri: str,
    captured_logs: io.StringIO,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = tokened(settings, mongodb_uri=SecretStr(secret_uri), max_attempts=1,
                       retry_budget_seconds=0.3)  # fmt: skip
    answers: list[str] = []

    def call(client: TestClient, method: str, path: str, **kw: Any) -> Any:
        r = client.request(method, path, **kw)
        answers.append(f"{r.status_code} {dict(r.headers)} {r.text}")
        return r

    faults = {
        "refused": OperationFailure(f"not authorized on lakesync via {secret_uri}", code=13),
        "transient": AutoReconnect(f"connection to {secret_uri} closed"),
        "unexpected": RuntimeError(f"driver bug while talking to {secret_uri}"),
    }
    with Runtime(settings) as rt, TestClient(create_app(rt)) as client:
        errors = {}
        for name, fault in faults.items():
            inject(monkeypatch, fault)
            job = call(client, "POST", "/api/jobs", json={"options": {"batchSize": 500}},
                       headers=AUTH).json()  # fmt: skip
            while rt.runner.run(job["jobId"]) is not Outcome.ENDED:
                pass  # the transient fault hands the job back once; the next run gives up
            monkeypatch.undo()
            done = call(client, "GET", f"/api/jobs/{job['jobId']}", headers=AUTH).json()
            assert done["status"] == "failed", (name, done)
            errors[name] = f"{done['message']} {done['error']}"
            call(client, "GET", f"/api/jobs/{job['jobId']}/events", headers=AUTH)
            call(client, "GET", "/.netlify/functions/simple-status",
                 params={"jobId": job["jobId"]}, headers=AUTH)  # fmt: skip
        assert "lakesync:***@127.0.0.1" in errors["refused"] + errors["unexpected"], errors
        for path in ("/api/jobs", "/api/operations", "/metrics", "/readyz", "/", "/static/app.js",
                     f"/api/jobs/{FAKE_JOB}", "/openapi.json"):  # fmt: skip
            call(client, "GET", path, headers=AUTH)
        # a driver error reaching the API's MongoDB handler: 503, logged with its raw text
        real_find = Collection.find

        def find(self: Collection[Any], *args: Any, **kwargs: Any) -> Any:
            if self.name == "jobstatuses":
                raise AutoReconnect(f"lost {secret_uri}")
            return real_find(self, *args, **kwargs)

        monkeypatch.setattr(Collection, "find", find)
        assert call(client, "GET", "/api/jobs", headers=AUTH).status_code == 503
        monkeypatch.undo()
        # MongoDB gone: /readyz names the host (with the token), never the password
        dead = secret_uri.replace(f":{rt.mongo.where.split(':')[1]}/", f":{free_port()}/")
        alive, rt.mongo = rt.mongo, Mongo(settings.model_copy(
            update={"mongodb_uri": SecretStr(dead)}))  # fmt: skip
        try:
            detailed = call(client, "GET", "/readyz", headers=AUTH)
            assert detailed.status_code == 503, detailed.text
            assert "Cannot reach MongoDB at 127.0.0.1:" in detailed.json()["error"]
            public = call(client, "GET", "/readyz")
            assert public.status_code == 503 and "127.0.0.1" not in public.text
            assert "MongoDB is not reachable" in public.json()["error"]
        finally:
            rt.mongo.close()
            rt.mongo = alive
        stored = [str(d) for c in (rt.store.jobs, rt.store.copyerrors) for d in c.find()]
    logs = captured_logs.getvalue()
    assert "retry 1" in logs and "Traceback" in logs  # the faults were logged, with a trace
    for where, text in {"responses": "\n".join(answers), "logs": logs,
                        "stored": "\n".join(stored)}.items():  # fmt: skip
        assert PASSWORD not in text, where
        assert TOKEN not in text, where
    for line in logs.splitlines():
        if line.startswith("{"):
            json.loads(line)


def test_serve_with_an_unreachable_mongodb_masks_the_password(tmp_path: Path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LAKESYNC_")}
    env.update(
        LAKESYNC_MONGODB_URI=f"mongodb://admin:{PASSWORD}@127.0.0.1:{port}/lakesync",
        LAKESYNC_DATA_DIR=str(tmp_path / "data"),
    )
    for fmt in ("text", "json"):
        env["LAKESYNC_LOG_FORMAT"] = fmt
        cli_zygote()
        started = time.monotonic()
        run = lakesync(env, "serve", "--port", str(free_port()), timeout=60)
        assert run.returncode != 0 and time.monotonic() - started < 20
        assert f"Cannot reach MongoDB at 127.0.0.1:{port}" in run.stderr, run.stderr
        assert PASSWORD not in run.stderr + run.stdout
        if fmt == "json":
            lines = [json.loads(line) for line in run.stderr.splitlines() if line.strip()]
            assert lines[-1]["level"] == "error"


def test_masking_hides_the_whole_password_even_with_an_unescaped_at() -> None:
    from lakesync.masking import masked

    text = f"LAKESYNC_MONGODB_URI=mongodb://app:{PASSWORD}@x@db1:27017,db2/?tls=true is invalid"
    assert (
        masked(text) == "LAKESYNC_MONGODB_URI=mongodb://app:***@db1:27017,db2/?tls=true is invalid"
    )
    assert masked("see mongodb://db:27017/x or mail ops@example.com") == (
        "see mongodb://db:27017/x or mail ops@example.com"
    )


def test_a_link_out_of_the_lake_is_not_followed(lakes: tuple[Path, Path]) -> None:
    lake, outside = lakes
    for source, link in ((f"{lake}/tasks", "leak.parquet"), (str(lake), "escape")):
        with pytest.raises(SourceError) as info:
            Lake.open(source)
        message = str(info.value)
        assert f"{source.split('/tasks')[0]}/tasks/{link}" in message or f"/{link} " in message
        assert str(outside) not in message, "the message names what lies behind the link"
        assert "does not follow links out of the lake" in message
        assert info.value.details["file"].endswith(link)
    (lake / "tasks" / "leak.parquet").unlink()
    # a link that stays inside the lake is read like any file
    inside = next((lake / "tasks").rglob("*.parquet"))
    (lake / "tasks" / "alias.parquet").symlink_to(inside)
    opened = Lake.open(f"{lake}/tasks")
    assert any(f.endswith("alias.parquet") for f in opened.files)


def test_a_glob_through_a_planted_link_cannot_tell_what_exists_outside(
    settings: Settings, lakes: tuple[Path, Path]
) -> None:
    lake, _ = lakes  # lake/escape is a symlink out of the lake, to files that exist
    assert list((lake / "escape").glob("*/*.parquet"))
    with Runtime(tokened(settings, lake_uri=str(lake))) as rt, TestClient(create_app(rt)) as c:
        for source in (f"{lake}/e*/*/*.parquet", f"{lake}/e*/nothing-here*"):
            r = post_source(c, source)
            assert r.status_code == 400 and "No files match" in r.json()["error"], r.text
        assert rt.store.jobs.count_documents({}) == 0
