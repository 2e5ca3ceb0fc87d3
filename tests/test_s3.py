"""lakesync against a real S3-compatible HTTP server (moto) on a free loopback port.

The main server is moto's ThreadedMotoServer in this process. The cases that need a
server to die, or to check signatures, run ``python -m moto.server`` as a child process:
killing it is a real outage (an in-process server keeps serving open keep-alive
connections after ``stop``), and its authentication switch is process-wide.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest
from tests.helpers import (
    REGION,
    free_port,
    run_job,
    s3_client,
    s3_settings,
    upload,
)

from lakesync.config import Settings
from lakesync.demo import generate
from lakesync.errors import SourceError, TransientSourceError
from lakesync.lake import Lake, Position
from lakesync.locations import (
    canonical_uri,
    read_error,
    s3_message,
    short_error,
    within_roots,
)
from lakesync.masking import masked
from lakesync.models import JobState, Outcome
from lakesync.runtime import Runtime

#: 40 batches of 500 read from S3 through several resumes: what 50,000 in batches of 2,500
#: proved, at less than half the reading
ROWS, BAD = 20_000, 60


class MotoProcess:
    """``python -m moto.server`` in a child process: a server that can really die."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                httpx.get(f"{self.url}/moto-api/", timeout=1)
                return
            except httpx.HTTPError:
                time.sleep(0.05)
        self.kill()
        raise RuntimeError("moto server did not start")

    def require_signatures(self) -> None:
        """From now on every request must be signed by an IAM user's access key."""
        httpx.post(f"{self.url}/moto-api/reset-auth", content=b"0").raise_for_status()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def moto_process(aws_env: None) -> Iterator[MotoProcess]:
    server = MotoProcess()
    yield server
    server.kill()


def keys(lake: Lake, **kwargs: Any) -> list[str]:
    return [k for b in lake.batches(**kwargs) for k in b.table["taskDetailId"].to_pylist()]


@pytest.fixture(scope="module")
def big_lake(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("s3lake") / "tasks"
    generate(out, ROWS, bad_rows=BAD, seed=11)
    return out


@pytest.fixture(scope="module")
def small_lake(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("s3small") / "tasks"
    generate(out, 3000, seed=7, files_per_partition=2)
    (out / "_SUCCESS").write_text("")
    return out


@pytest.fixture(scope="module")
def s3_lake(s3_url: str, big_lake: Path) -> str:
    """The 20,000-row demo lake uploaded to s3://lake/tasks."""
    upload(s3_url, big_lake, "lake", "tasks")
    return "s3://lake/tasks"


def test_copies_a_demo_lake_from_s3_with_exact_counts_across_resumes(
    slow_settings: Settings, db: Any, s3_url: str, s3_lake: str
) -> None:
    # A short time limit: the job checkpoints and resumes from S3 positions several times.
    # MongoDB is reached through a link adding 10 ms per request, so that the copy outlasts
    # the limit on any machine (40 batches, each a write and a checkpoint at least: 0.8 s
    # of delays alone).
    settings = s3_settings(slow_settings, s3_url, batch_size=500, job_time_limit=0.5)
    with Runtime(settings) as rt:
        done = run_job(rt, s3_lake)
    assert done.status == JobState.COMPLETED, (done.message, done.error)
    assert done.totalRecords == done.processedRecords == ROWS
    assert done.insertedRecords == ROWS - BAD and done.errorRecords == BAD
    assert done.updatedRecords == done.unchangedRecords == 0
    assert done.attempt >= 2  # resumed from an S3 checkpoint at least once
    assert db.taskdetails.count_documents({}) == ROWS - BAD
    rejected = list(db.copyerrors.find({"jobId": done.jobId}, {"file": 1}))
    assert len(rejected) == BAD
    assert all(r["file"].startswith("s3://lake/tasks/projectId=PRJ-") for r in rejected)


def test_s3_lake_reads_like_the_local_one(
    s3_url: str, small_lake: Path, settings: Settings
) -> None:
    upload(s3_url, small_lake, "lake", "small")
    settings = s3_settings(settings, s3_url)
    local = Lake.open(str(small_lake))
    lake = Lake.open("s3://lake/small", settings=settings)
    assert lake.files == [f.replace(str(small_lake), "s3://lake/small") for f in local.files]
    assert [lake.file_name(i) for i in range(len(lake.files))] == [
        local.file_name(i) for i in range(len(local.files))
    ]
    assert lake.count_rows() == local.count_rows() == 3000
    assert lake.file_row_counts() == local.file_row_counts()
    start = Position(3, 10)
    assert keys(lake, batch_size=700, start=start) == keys(local, batch_size=700, start=start)
    assert keys(lake, batch_size=300, stop_file=4) == keys(local, batch_size=300, stop_file=4)
    glob = Lake.open("s3://lake/small/projectId=PRJ-001/*.parquet", settings=settings)
    assert glob.files == [
        "s3://lake/small/projectId=PRJ-001/part-0.parquet",
        "s3://lake/small/projectId=PRJ-001/part-1.parquet",
    ]
    assert Lake.open("s3://lake//small/", settings=settings).files == lake.files
    with pytest.raises(SourceError, match="s3://lake/nothing-here does not exist"):
        Lake.open("s3://lake/nothing-here", settings=settings)
    s3_client(s3_url).delete_object(Bucket="lake", Key="small/projectId=PRJ-001/part-1.parquet")
    with pytest.raises(
        SourceError, match=re.escape("s3://lake/small/projectId=PRJ-001/part-1.parquet no longer")
    ):
        list(lake.batches(1000, stop_file=2))


def test_missing_bucket_fails_the_job_naming_it(settings: Settings, s3_url: str) -> None:
    with Runtime(s3_settings(settings, s3_url)) as rt:
        done = run_job(rt, "s3://no-such-bucket/tasks")
    assert done.status == JobState.FAILED
    assert "S3 bucket s3://no-such-bucket does not exist" in (done.error or "")
    assert "LAKESYNC_S3_ENDPOINT_URL" in (done.error or "")


def test_an_object_that_is_not_parquet_fails_the_job_naming_it(
    settings: Settings, s3_url: str, small_lake: Path
) -> None:
    upload(s3_url, small_lake, "lake", "broken")
    bad = "broken/projectId=PRJ-002/part-1.parquet"
    s3_client(s3_url).put_object(Bucket="lake", Key=bad, Body=b"taskDetailId,status\nTD-1,done\n")
    with Runtime(s3_settings(settings, s3_url)) as rt:
        done = run_job(rt, "s3://lake/broken")
    assert done.status == JobState.FAILED
    assert f"s3://lake/{bad} is not a valid parquet file" in (done.error or "")


def test_wrong_credentials_fail_the_job_without_showing_them(
    settings: Settings, moto_process: MotoProcess, small_lake: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    upload(moto_process.url, small_lake, "lake", "tasks")
    iam = boto3.client("iam", endpoint_url=moto_process.url, region_name=REGION)
    iam.create_user(UserName="reader")
    # A read-only user. AWS authorizes HeadObject/GetObject with s3:GetObject and
    # ListObjectsV2 with s3:ListBucket; moto 5.2 (checked: 5.2.6) checks the operation's own
    # name instead (s3:HeadObject, s3:ListObjectsV2: not IAM actions, so AWS never matches
    # them). The policy names both, so the right key reads on AWS and on the locked moto.
    reads = ["s3:GetObject", "s3:ListBucket", "s3:HeadObject", "s3:ListObjectsV2"]
    policy = {"Effect": "Allow", "Action": reads, "Resource": "*"}
    iam.put_user_policy(
        UserName="reader", PolicyName="read",
        PolicyDocument=json.dumps({"Version": "2012-10-17", "Statement": [policy]}),
    )  # fmt: skip
    key = iam.create_access_key(UserName="reader")["AccessKey"]
    moto_process.require_signatures()
    settings = s3_settings(settings, moto_process.url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"])
    assert Lake.open("s3://lake/tasks", settings=settings).count_rows() == 3000  # the right key
    wrong = [(key["AccessKeyId"], "wrong-secret-0123456789"), ("AKIAWRONGKEY0123456789", "x" * 40)]
    with Runtime(settings) as rt:
        for key_id, secret in wrong:
            monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
            monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
            done = run_job(rt, "s3://lake/tasks")
            assert done.status == JobState.FAILED
            assert "Access to s3://lake/tasks was denied" in (done.error or "")
            assert "AWS_ACCESS_KEY_ID" in (done.error or "")
            shown = json.dumps(done.public())
            assert key_id not in shown and secret not in shown
            assert key["SecretAccessKey"] not in shown


def test_server_stopping_mid_copy_fails_resumably(
    settings: Settings, db: Any, moto_process: MotoProcess, small_lake: Path
) -> None:
    upload(moto_process.url, small_lake, "lake", "tasks")
    settings = s3_settings(settings, moto_process.url, batch_size=100)

    def stop_server_after_two_batches(status: Any) -> None:
        if status.processedRecords >= 200:
            moto_process.kill()

    with Runtime(settings) as rt:
        status, _ = rt.jobs.start("copy-taskdetail", {"source": "s3://lake/tasks"})
        started = time.monotonic()
        rt.runner.run(status.jobId, on_progress=stop_server_after_two_batches)
        assert time.monotonic() - started < 30  # fails fast: no endless retries
        stopped = rt.jobs.get(status.jobId)
    error = stopped.error or stopped.message or ""
    unreachable = r"endpoint 127\.0\.0\.1:\d+ is unreachable while reading s3://lake/tasks/"
    assert re.search(unreachable + r"projectId=PRJ-\d+/part-\d\.parquet", error), error
    assert "The job's last checkpoint is kept: it resumes from there." in error
    cp = stopped.checkpoint
    assert cp is not None and 200 <= stopped.processedRecords < 3000
    assert db.taskdetails.count_documents({}) == stopped.processedRecords
    if stopped.status == JobState.PENDING:  # the runner hands transient S3 errors back
        assert stopped.failures == 1
    else:
        assert stopped.status == JobState.FAILED
    # The server is back (a new one holding the same objects): the checkpoint resumes exactly.
    back = MotoProcess()
    try:
        upload(back.url, small_lake, "lake", "tasks")
        settings = s3_settings(settings, back.url)
        lake = Lake.open("s3://lake/tasks", settings=settings)
        name = cp.model_dump().get("file") or lake.file_name(cp.fileIndex)
        start = lake.resume_position(Position(cp.fileIndex, cp.row), name)
        rest = sum(b.table.num_rows for b in lake.batches(1000, start))
        assert stopped.processedRecords + rest == 3000
        if stopped.status == JobState.PENDING:
            with Runtime(settings) as rt:
                assert rt.runner.run(stopped.jobId) is Outcome.ENDED
                done = rt.jobs.get(stopped.jobId)
            assert done.status == JobState.COMPLETED and done.processedRecords == 3000
            assert db.taskdetails.count_documents({}) == 3000
    finally:
        back.kill()


def test_allowed_roots_are_checked_alike_on_s3_and_locally(tmp_path: Path) -> None:
    tmp_path = tmp_path.resolve()
    (tmp_path / "lakes" / "tasks").mkdir(parents=True)
    (tmp_path / "other").mkdir()
    (tmp_path / "lakes" / "link").symlink_to(tmp_path / "other")
    roots = [f"{tmp_path}/lakes", "s3://corp-lake/exports/"]
    allowed = [
        f"{tmp_path}/lakes", f"{tmp_path}/lakes/tasks", f"file://{tmp_path}/lakes/tasks",
        f"{tmp_path}/lakes/tasks/**/*.parquet", f"{tmp_path}/other/../lakes/tasks",
        "s3://corp-lake/exports", "s3://corp-lake/exports/tasks", "s3://corp-lake//exports/t/",
        "s3://corp-lake/exports/tasks/*.parquet",
    ]  # fmt: skip
    refused = [
        f"{tmp_path}/lakesX", f"{tmp_path}/lakes/../other", f"{tmp_path}/lakes/link",
        f"{tmp_path}/lakes/link/x.parquet", f"{tmp_path}", "/etc",
        "s3://corp-lake/exportsX", "s3://corp-lake", "s3://corp-lake/other/exports",
        "s3://other-bucket/exports", f"s3://corp-lake{tmp_path}/lakes",
    ]  # fmt: skip
    assert [u for u in allowed if not within_roots(u, roots)] == []
    assert [u for u in refused if within_roots(u, roots)] == []
    assert not within_roots(f"{tmp_path}/lakes", [])
    assert within_roots("s3://corp-lake/x", ["s3://corp-lake"])
    assert canonical_uri("s3://b//a/c/") == "s3://b/a/c"
    assert canonical_uri(f"{tmp_path}/lakes/link/*.pq") == f"{tmp_path}/other/*.pq"
    for bad in ("s3://corp-lake/exports/../secrets", "s3://k:s@corp-lake/exports"):
        with pytest.raises(SourceError):
            within_roots(bad, roots)


def test_storage_error_texts_become_clear_masked_messages() -> None:
    """Texts captured from pyarrow and deltalake (object_store) against moto and AWS."""
    where = "s3://lake/tasks"
    samples = {
        "When listing objects under key 'x/' in bucket 'lake': AWS Error INVALID_ACCESS_KEY_ID "
        "during ListObjectsV2 operation: The AWS Access Key Id you provided does not exist "
        "in our records. Credential=AKIAIOSFODNN7EXAMPLE/20240101/us-east-1/s3": "was denied",
        "Kernel error -> Generic S3 error\n \x1b[31m↳\x1b[0m Error performing GET "
        "http://127.0.0.1:1/nobucket?list-type=2 - Server returned non-2xx status code\n"
        "\x1b[31m↳\x1b[0m 404 Not Found\n <Error><Code>NoSuchBucket</Code><RequestId>X1"
        "</RequestId></Error>": "S3 bucket s3://lake does not exist",
        "Kernel error -> Generic S3 error ↳ Error performing PUT "
        "http://169.254.169.254/latest/api/token - 403 Forbidden": "No AWS credentials",
        "Generic S3 error ↳ error sending request for url (http://127.0.0.1:9/lake) ↳ "
        "tcp connect error: Connection refused": "is unreachable while reading",
    }
    for text, expected in samples.items():
        message, transient = s3_message(short_error(text), where, "127.0.0.1:9")
        assert expected in message and "s3://lake" in message, message
        assert transient == ("unreachable" in expected)
        error = read_error(OSError(text), f"{where}/a.parquet", "parquet", "127.0.0.1:9")
        assert isinstance(error, TransientSourceError) == transient, error  # retried later
        assert "AKIAIOSFODNN7EXAMPLE" not in message and "\x1b" not in message
        assert "RequestId" not in message
    masked_text = masked(
        "key AKIAIOSFODNN7EXAMPLE Signature=0a1b2c X-Amz-Security-Token: FQoGZXIvYXdz "
        "secret_access_key=wJalrXUtnFEMI mongodb://admin:hunter2@db:27017"
    )
    for secret in ("IOSFODNN7EXAMPLE", "0a1b2c", "FQoGZXIvYXdz", "wJalrXUtnFEMI", "hunter2"):
        assert secret not in masked_text, masked_text
    assert "AKIA****" in masked_text and "mongodb://admin:***@db:27017" in masked_text
