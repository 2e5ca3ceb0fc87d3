"""Passwords in malformed MongoDB and broker URIs never show: 20 malformed forms fed to
every command and to `serve`, every output grepped for the password."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from tests.helpers import lakesync_all

from lakesync.masking import masked
from lakesync.mongo import EmbeddedServer

PASSWORD = "S3cretPW-q7"
JOB = "job_0000000000000000000000000z"
#: {s}: the scheme; {pw}: the password
FORMS = [
    "{s}:/user:{pw}@127.0.0.1:27401",
    "user:{pw}@127.0.0.1",
    "{s}:user:{pw}@127.0.0.1",
    "{s}:///user:{pw}@127.0.0.1",
    "{s}//user:{pw}@127.0.0.1",
    "{s}://user:{pw}",
    "{s}://user:{pw}@",
    "{s}://user:{pw}@@127.0.0.1",
    "{s}://user:{pw}@127.0.0.1:notaport",
    "{s}://user:{pw}@127.0.0.1:99999",
    "{s}://:{pw}@127.0.0.1:1",
    "{s}://user:{pw}/x@127.0.0.1",
    "{s}://user:{pw}@127.0.0.1:1/?authMechanism=BOGUS",
    "{S}://user:{pw}@127.0.0.1:1",
    "{s}+srv://user:{pw}@127.0.0.1",
    "{s}://user:{pw}@127.0.0.1/db name",
    " {s}://user:{pw}@127.0.0.1:1",
    "{s}://user:{pw}:extra@127.0.0.1",
    "{s}://us%er:{pw}@127.0.0.1",
    "{s}://user:{pw}@127.0.0.1,,:x",
]
COMMANDS = [
    ["jobs"], ["jobs", "--json"], ["status", JOB], ["cancel", JOB], ["resume", JOB],
    ["errors", JOB], ["logs", JOB], ["operations"], ["copy", "--json"], ["serve", "--port", "8"],
]  # fmt: skip


def variants(scheme: str) -> list[str]:
    return [f.format(s=scheme, S=scheme.upper(), pw=PASSWORD) for f in FORMS]


def outputs(calls: list[tuple[list[str], dict[str, str]]]) -> list[str]:
    """Each command's stdout + stderr, the commands run 32 at a time (each one killed after
    60 s, its output so far kept: a worker may keep retrying)."""
    return [
        str(done.stdout or "") + str(done.stderr or "")
        for done in lakesync_all(calls, timeout=60, parallel=32)
    ]


def base_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LAKESYNC_")}
    env.update(LAKESYNC_DATA_DIR=str(tmp_path / "data"), LAKESYNC_DEMO_ROWS="100",
               LAKESYNC_LAKE_URI=str(tmp_path / "nolake"), LAKESYNC_EMBEDDED_IDLE="0")  # fmt: skip
    return env


def test_the_masking_covers_every_malformed_form() -> None:
    for uri in variants("mongodb") + variants("amqp") + variants("redis"):
        assert PASSWORD not in masked(f"bad URI {uri!r}: {uri}"), uri


def test_the_masking_leaves_times_and_addresses_alone() -> None:
    """A status document holds times and host:port pairs that are no passwords."""
    text = '{"startTime": "2026-11-29T06:34:30.479Z", "uri": "mongodb://127.0.0.1:4444/?x=1"}'
    assert masked(text) == text


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_no_command_shows_the_password_of_a_malformed_mongodb_uri(tmp_path: Path) -> None:
    calls = []
    for uri in variants("mongodb"):
        env = {**base_env(tmp_path), "LAKESYNC_MONGODB_URI": uri}
        calls += [(args, env) for args in COMMANDS]
    shown = outputs(calls)
    assert len(shown) == 200
    for (args, env), out in zip(calls, shown, strict=True):
        assert PASSWORD not in out, (args, env["LAKESYNC_MONGODB_URI"], out[-2000:])
    assert sum("***" in out for out in shown) > len(shown) / 2  # the URI is shown, masked


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_worker_never_shows_the_password_of_a_malformed_broker_url(
    tmp_path: Path, mongo_server: EmbeddedServer
) -> None:
    calls = []
    for scheme in ("amqp", "redis"):
        for uri in variants(scheme)[:10] if scheme == "redis" else variants(scheme):
            env = {**base_env(tmp_path), "LAKESYNC_MONGODB_URI": mongo_server.uri,
                   "LAKESYNC_EXECUTOR": "celery", "LAKESYNC_BROKER_URL": uri}  # fmt: skip
            calls += [(["worker"], env), (["serve", "--port", "8"], env)]
    for (args, env), out in zip(calls, outputs(calls), strict=True):
        assert PASSWORD not in out, (args, env["LAKESYNC_BROKER_URL"], out[-2000:])
