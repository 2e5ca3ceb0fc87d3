"""Loopback is no security boundary: cross-site writes, DNS rebinding and framing, against a
real `lakesync serve` over HTTP and in Chromium, with and without a token."""

from __future__ import annotations

import functools
import http.server
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from tests.helpers import PageRun, ServeProcess, free_port, wait_for

from lakesync.api.crosssite import same_origin
from lakesync.api.hosts import host_allowed

TOKEN = "crosssite-test-token-8c1d2e"
MIRROR = {"options": {"mode": "mirror"}}


def jobs(url: str, headers: dict[str, str] | None = None) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = httpx.get(f"{url}/api/jobs", headers=headers).json()["jobs"]
    return found


def attempts(url: str) -> list[tuple[str, dict[str, str], bytes]]:
    """(path, headers, body) of every cross-site write a browser lets a foreign page send."""
    body = json.dumps(MIRROR).encode()
    foreign = [
        {"Origin": "http://attacker.example"},
        {"Origin": "null"},  # sandboxed iframes, file: pages
        {"Origin": url.replace("127.0.0.1", "localhost")},  # another site on this machine
        {"Origin": url.rsplit(":", 1)[0] + ":1"},  # same host, another port
        {"Sec-Fetch-Site": "cross-site"},
        {"Sec-Fetch-Site": "same-site"},
        {"Sec-Fetch-Site": "Cross-Site"},  # header values in any case
        {"Sec-Fetch-Site": "SAME-SITE"},
        {"Sec-Fetch-Site": "cross-site, same-origin"},  # not a value a browser sends
        {"Origin": url.replace("http://", "https://")},  # same host and port, another scheme
        {"Origin": url.replace("127.0.0.1", "127.0.0.1..")},
        {"Origin": "http://attacker.example", "Sec-Fetch-Site": "cross-site"},
    ]
    kinds = [
        {"Content-Type": "text/plain"},  # fetch(..., {mode: "no-cors"}): no preflight
        {"Content-Type": "text/plain;charset=UTF-8"},
        {"Content-Type": "application/x-www-form-urlencoded"},  # a plain HTML form
        {"Content-Type": "multipart/form-data; boundary=x"},
        {"Content-Type": "application/json"},  # would need a preflight, but still refused
    ]
    paths = ["/api/jobs", "/.netlify/functions/copy-taskdetail"]
    return [(p, {**f, **k}, body) for p in paths for f in foreign for k in kinds]


def test_cross_site_writes_are_refused_and_start_no_job(serve: ServeProcess) -> None:
    url = serve.url
    for path, headers, body in attempts(url):
        r = httpx.post(url + path, content=body, headers=headers)
        assert r.status_code == 403, (path, headers, r.status_code, r.text)
        assert "Cross-site request refused" in r.json()["error"]
        assert "LAKESYNC_ALLOWED_ORIGINS" in r.json()["error"]
    # not JSON, from anywhere (a form from a page that sends no Origin): 415
    for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data"):
        for path in ("/api/jobs", "/.netlify/functions/copy-taskdetail"):
            r = httpx.post(url + path, content=b"{}", headers={"Content-Type": ctype})
            assert r.status_code == 415 and "application/json" in r.json()["error"], r.text
    r = httpx.post(url + "/api/jobs", content=b'{"operation": "copy-taskdetail"}')
    assert r.status_code == 415, "a body without Content-Type is not JSON either"
    assert jobs(url) == [], "a refused request started a job"
    # the page's own requests: same origin, JSON
    same = {"Origin": url, "Sec-Fetch-Site": "same-origin"}
    started = httpx.post(url + "/api/jobs", json={"options": {"batchSize": 1000}}, headers=same)
    assert started.status_code == 202, started.text
    job_id = started.json()["jobId"]
    # cancel takes no body; cross-site it is refused, same-origin it is accepted
    cancel = f"{url}/api/jobs/{job_id}/cancel"
    assert httpx.post(cancel, headers={"Sec-Fetch-Site": "cross-site"}).status_code == 403
    assert httpx.post(cancel, headers={"Origin": "http://a.example"}).status_code == 403
    assert httpx.post(cancel, headers=same).status_code in (202, 409)
    wait_for(lambda: jobs(url)[0]["status"] in ("completed", "cancelled"), timeout=60)
    # curl and scripts send no Origin: accepted (JSON only)
    assert httpx.post(url + "/.netlify/functions/copy-taskdetail").status_code == 202


def test_the_seed_endpoint_takes_no_destructive_options(serve: ServeProcess, db: Any) -> None:
    url = serve.url
    seed = f"{url}/.netlify/functions/copy-taskdetail"
    first = httpx.post(seed, json={})
    assert first.status_code == 202
    wait_for(lambda: jobs(url)[0]["status"] == "completed", timeout=60)
    before = db.taskdetails.count_documents({})
    assert before == 4975
    one_file = {"options": {"mode": "mirror", "source": "x/part-0.parquet", "allowEmpty": True}}
    for body in (one_file, MIRROR, {"options": {"batchSize": 10}}):
        r = httpx.post(seed, json=body, headers={"Origin": url})  # even from the page itself
        assert r.status_code == 400 and "takes no options" in r.json()["error"], r.text
        assert "POST /api/jobs" in r.json()["error"]
    assert len(jobs(url)) == 1 and db.taskdetails.count_documents({}) == before
    again = httpx.post(seed, json={"options": {}})  # no options: the defaults
    assert again.status_code == 202 and again.json()["options"].get("mode") is None


def test_with_a_token_cross_site_is_still_refused_and_origins_can_be_allowed(
    serve_env: dict[str, str], tmp_path: Path
) -> None:
    serve_env["LAKESYNC_API_TOKEN"] = TOKEN
    serve_env["LAKESYNC_ALLOWED_ORIGINS"] = json.dumps(["https://ops.example.com"])
    proc = ServeProcess(serve_env, tmp_path / "serve.log").start()
    try:
        url, auth = proc.url, {"Authorization": f"Bearer {TOKEN}"}
        for path, headers, body in attempts(url):
            r = httpx.post(url + path, content=body, headers={**headers, **auth})
            assert r.status_code == 403, (path, headers, r.text)
        assert jobs(url, auth) == []
        listed = {**auth, "Origin": "https://ops.example.com", "Sec-Fetch-Site": "cross-site"}
        r = httpx.post(url + "/api/jobs", json={}, headers=listed)
        assert r.status_code == 202, r.text
        r = httpx.post(url + "/api/jobs", content=b"{}", headers={**listed,
                       "Content-Type": "text/plain"})  # fmt: skip
        assert r.status_code == 415, "a listed origin still sends JSON only"
        unlisted = {**listed, "Origin": "https://ops.example.com.attacker.example"}
        assert httpx.post(url + "/api/jobs", json={}, headers=unlisted).status_code == 403
    finally:
        proc.kill()


def test_a_foreign_host_gets_400(
    serve: ServeProcess, serve_env: dict[str, str], tmp_path: Path
) -> None:
    url, port = serve.url, serve.port
    for host in ("attacker.example", f"attacker.example:{port}", "127.0.0.1.attacker.example",
                 f"localhost.:{port}x", "10.0.0.1", f"[::2]:{port}", "", "localhost..",
                 f"localhost..:{port}", f".localhost:{port}"):  # fmt: skip
        for method, path in (("GET", "/api/jobs"), ("GET", "/"), ("POST", "/api/jobs"),
                             ("GET", "/openapi.json")):  # fmt: skip
            r = httpx.request(method, url + path, headers={"Host": host}, json={})
            assert r.status_code == 400, (host, path, r.status_code)
            assert "LAKESYNC_ALLOWED_HOSTS" in r.json()["error"]
    assert jobs(url) == []
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", "localhost", f"LOCALHOST.:{port}",
                 f"[::1]:{port}"):  # fmt: skip
        assert httpx.get(url + "/api/jobs", headers={"Host": host}).status_code == 200, host
    # a deployment names its hosts
    serve_env["LAKESYNC_ALLOWED_HOSTS"] = json.dumps(["lakesync.example.com", "*.corp.example"])
    proc = ServeProcess(serve_env, tmp_path / "serve2.log").start()
    try:
        get = functools.partial(httpx.get, proc.url + "/api/jobs")
        assert get(headers={"Host": "lakesync.example.com"}).status_code == 200
        assert get(headers={"Host": f"a.corp.example:{proc.port}"}).status_code == 200
        assert get(headers={"Host": "corp.example.attacker.example"}).status_code == 400
        assert get(headers={"Host": "127.0.0.1"}).status_code == 400  # the list replaces it
    finally:
        proc.kill()


def test_host_and_origin_matching() -> None:
    loopback = ["localhost", "127.0.0.1", "[::1]"]
    assert host_allowed("[::1]:8000", loopback) and host_allowed("[::1]", ["::1"])
    assert not host_allowed("[::1]evil:80", loopback)
    assert not host_allowed("localhost:80:80", loopback)
    assert host_allowed("box:8443", ["box:8443"]) and not host_allowed("box:8000", ["box:8443"])
    assert host_allowed("anything", ["*"])
    assert same_origin("http://127.0.0.1:8000", "127.0.0.1:8000")
    # behind a TLS proxy (that says so: the request's scheme is https)
    assert same_origin("https://lakesync.example", "lakesync.example", "https")
    assert not same_origin("https://127.0.0.1:8000", "127.0.0.1:8000")  # scheme compared
    assert not same_origin("http://lakesync.example", "lakesync.example", "https")
    assert not host_allowed("localhost..", loopback) and not host_allowed(".localhost", loopback)
    assert host_allowed("localhost.", loopback) and not host_allowed("local..host", loopback)
    assert same_origin("http://[::1]:8000", "[::1]:8000")
    assert not same_origin("http://127.0.0.1:8001", "127.0.0.1:8000")
    assert not same_origin("null", "127.0.0.1:8000")
    assert not same_origin("http://127.0.0.1:99999", "127.0.0.1:8000")


def test_the_page_sends_security_headers(serve: ServeProcess) -> None:
    for path in ("/", "/static/app.js", "/api/jobs", "/healthz"):
        r = httpx.get(serve.url + path)
        assert r.status_code == 200, path
        csp = r.headers["content-security-policy"]
        assert "frame-ancestors 'none'" in csp and "default-src 'self'" in csp, path
        assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
        assert r.headers["x-frame-options"] == "DENY"
        assert r.headers["x-content-type-options"] == "nosniff"
        assert r.headers["referrer-policy"] == "no-referrer"
    docs = httpx.get(serve.url + "/docs")  # Swagger UI's CDN assets: only framing is limited
    assert docs.headers["content-security-policy"] == "frame-ancestors 'none'"
    assert docs.headers["x-frame-options"] == "DENY"


# -- in a real browser -------------------------------------------------------------------

ATTACK = """<!doctype html><html><body>
<form id="f" method="POST" enctype="text/plain"
 action="{target}/.netlify/functions/copy-taskdetail">
<input name='{{"options":{{"mode":"mirror","x":"' value='"}}}}'></form>
<iframe id="frame" src="{target}/"></iframe>
<script>
fetch("{target}/api/jobs", {{method: "POST", mode: "no-cors",
  headers: {{"Content-Type": "text/plain"}}, body: '{{"options":{{"mode":"mirror"}}}}'}})
  .then(() => {{ document.title = "fetched"; document.getElementById("f").submit(); }},
        () => {{ document.title = "fetched"; document.getElementById("f").submit(); }});
</script></body></html>"""


@pytest.fixture
def attacker_site(tmp_path: Path, serve: ServeProcess) -> Iterator[str]:
    """A page on another site (localhost:other port vs 127.0.0.1) that tries to start a mirror."""
    site = tmp_path / "attacker"
    site.mkdir()
    (site / "index.html").write_text(ATTACK.format(target=serve.url))
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://localhost:{server.server_address[1]}/"
    server.shutdown()


@pytest.mark.browser
def test_a_foreign_page_can_neither_start_jobs_nor_frame_the_page(
    serve: ServeProcess, attacker_site: str, request: Any
) -> None:
    r = PageRun(request.getfixturevalue("browser"))
    refused: list[int] = []

    def seen(resp: Any) -> None:
        if resp.url.startswith(serve.url) and resp.request.method == "POST":
            refused.append(resp.status)

    r.page.on("response", seen)
    r.page.goto(attacker_site)
    wait_for(lambda: len(refused) >= 2, timeout=20)  # the fetch and the form were sent
    assert set(refused) == {403}, refused
    frame = r.page.frame_locator("#frame")
    assert frame.locator("#copy-button").count() == 0, "the page rendered inside a frame"
    r.context.close()  # not r.close(): the page recorder finds no progress bar here
    assert jobs(serve.url) == []


@pytest.mark.browser
def test_the_page_works_under_its_policy(serve: ServeProcess, request: Any) -> None:
    from playwright.sync_api import expect

    r = PageRun(request.getfixturevalue("browser"))
    violations: list[str] = []
    r.page.on("console", lambda m: violations.append(m.text))
    r.page.goto(serve.url + "/")
    r.page.get_by_role("button", name="Copy TaskDetail Data").click()
    expect(r.page.locator("#status-badge")).to_have_attribute(
        "data-status", "completed", timeout=60_000
    )
    r.close()
    assert not [v for v in violations if "Content Security Policy" in v], violations
    assert jobs(serve.url)[0]["status"] == "completed"
