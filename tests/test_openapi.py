"""The served OpenAPI document matches the server: schemathesis `--checks all` finds nothing,
and the token is shown as required only when one is configured."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from tests.helpers import ServeProcess

CONFIG = Path(__file__).parent / "schemathesis.toml"
TOKEN = "openapi-test-token-4e7b9a1c"


def schemathesis(
    url: str, cwd: Path, *extra: str, phases: str = "examples,coverage,fuzzing,stateful"
) -> subprocess.CompletedProcess[str]:
    """`schemathesis run --checks all` against a served document, bounded in examples and time:
    the coverage phase sends every operation its schema's edge cases whatever the bound; the
    fuzzing and stateful phases add 10 generated requests an operation (at 25 the two tests
    took 438 s where they now take 349 s, side by side at load 22)."""
    cli = Path(sys.executable).parent / "schemathesis"
    if not cli.exists():
        pytest.skip("schemathesis is not installed (it is a dev dependency)")
    return subprocess.run(
        [str(cli), "--no-color", "--config-file", str(CONFIG), "run", f"{url}/openapi.json",
         "--checks", "all", "--max-examples", "10", "--workers", "1",
         "--phases", phases, "--seed", "13", *extra],
        capture_output=True, text=True, timeout=400, cwd=cwd,  # its cache stays out of the repo
    )  # fmt: skip


# schemathesis' own limit is 400 s: a loaded machine may need more than the suite's 300 s
@pytest.mark.timeout(600)
def test_schemathesis_finds_no_failure(serve: ServeProcess, tmp_path: Path) -> None:
    run = schemathesis(serve.url, tmp_path)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    assert "passed" in run.stdout and "failed" not in run.stdout.split("SUMMARY")[-1]
    log = serve.log.read_text()
    assert "Traceback" not in log and "unhandled error" not in log, log[-3000:]


@pytest.mark.timeout(600)
def test_schemathesis_with_a_token(serve_env: dict[str, str], tmp_path: Path) -> None:
    serve_env["LAKESYNC_API_TOKEN"] = TOKEN
    proc = ServeProcess(serve_env, tmp_path / "serve.log").start()
    try:
        doc = httpx.get(proc.url + "/openapi.json").json()
        jobs = doc["paths"]["/api/jobs"]["get"]
        assert jobs["security"] == [{"HTTPBearer": []}] and "401" in jobs["responses"]
        assert "security" not in doc["paths"]["/healthz"]["get"]
        # every operation with the token, its edge cases included (the coverage phase); the
        # generated requests are the run without a token's, which the token does not change
        run = schemathesis(proc.url, tmp_path, "-H", f"Authorization: Bearer {TOKEN}",
                           phases="examples,coverage")  # fmt: skip
        assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    finally:
        proc.kill()
    assert "Traceback" not in (tmp_path / "serve.log").read_text()


def test_the_document_lists_what_each_route_answers(serve: ServeProcess) -> None:
    doc = httpx.get(serve.url + "/openapi.json").json()
    assert "securitySchemes" not in doc.get("components", {})  # no token: no auth at all
    paths = doc["paths"]
    for path, methods in paths.items():
        for method, op in methods.items():
            assert "security" not in op, (method, path)
            assert "401" not in op["responses"], (method, path)
    post_jobs = paths["/api/jobs"]["post"]["responses"]
    assert {"200", "202", "400", "403", "413", "415", "422", "503"} <= set(post_jobs)
    cancel = paths["/api/jobs/{job_id}/cancel"]["post"]["responses"]
    assert {"202", "404", "409", "403", "415"} <= set(cancel)
    seed = paths["/.netlify/functions/simple-status"]["get"]
    assert {"200", "400", "404"} <= set(seed["responses"])
    assert seed["parameters"][0]["required"] is True
    body = doc["components"]["schemas"]["JobRequest"]["properties"]
    assert body["operation"]["enum"] == ["copy-taskdetail"]
    assert body["options"]["anyOf"][0]["additionalProperties"] is False
    # a 405 names every method of the path, not just the first route's
    r = httpx.request("DELETE", serve.url + "/api/jobs")
    assert r.status_code == 405 and set(r.headers["allow"].split(", ")) == {"GET", "POST"}


def test_a_nul_byte_in_the_source_is_a_400(serve: ServeProcess) -> None:
    for source in ("lake\x00/x", "\x00", "a\nb", "lake\x7f"):
        r = httpx.post(serve.url + "/api/jobs", json={"options": {"source": source}})
        assert r.status_code == 400, r.text
        assert "options.source" in r.json()["error"] and "control character" in r.json()["error"]
    raw = b'{"options": {"source": "/tmp/\\u0000/x"}}'
    r = httpx.post(
        serve.url + "/api/jobs", content=raw, headers={"Content-Type": "application/json"}
    )
    assert r.status_code == 400
    assert httpx.get(serve.url + "/api/jobs").json()["jobs"] == []
    assert "Traceback" not in serve.log.read_text()
