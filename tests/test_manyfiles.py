"""Lakes of many small files: what each file costs in S3 requests, watermark pruning by
Parquet statistics, and partitioned or resumed copies equal to the copy in one piece.

S3 requests are counted at a proxy in front of moto (``tests/s3proxy.py``), per object
key: what a real S3 bill and a real S3 latency would see.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import bson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tests.helpers import (
    SCHEMA,
    T0,
    assert_like_reference,
    counts_of,
    database_of,
    fresh,
    record,
    run_partitioned,
    run_whole,
    s3_client,
    s3_settings,
)
from tests.s3proxy import CountingProxy

from lakesync.config import Settings
from lakesync.errors import SourceError
from lakesync.lake import Lake
from lakesync.models import JobState, JobStatus, Outcome
from lakesync.plan import PLANNING
from lakesync.runtime import Runtime
from lakesync.watermarks import from_millis, scan

FILES, ROWS = 120, 20


def small_files(root: Path, files: int = FILES, seed: int = 7, unique: bool = False) -> Path:
    """``files`` Parquet files of ROWS records: keys repeat across and within files (the
    last valid record wins; ``unique``: they do not), some records are invalid, and file
    i's ``updatedAt`` values lie in hour i (so every file has its own range)."""
    rng = random.Random(seed)
    root.mkdir(parents=True)
    for i in range(files):
        rows = []
        for r in range(ROWS):
            key = f"U{i * ROWS + r:06d}" if unique else f"K{rng.randrange(files * ROWS // 3):05d}"
            rec = record(key, i * ROWS + r, bad=rng.random() < 0.02)
            rec["updatedAt"] = T0 + timedelta(hours=i, seconds=r)
            rows.append(rec)
        pq.write_table(pa.Table.from_pylist(rows, SCHEMA), root / f"part-{i:05d}.parquet")
    return root


def test_many_small_files_partitioned_and_resumed_equal_the_copy_in_one_piece(
    settings: Settings, tmp_path: Path
) -> None:
    lake = small_files(tmp_path / "lake")
    whole = fresh(settings, lake)
    assert_like_reference(run_whole(whole), database_of(whole), lake)

    parted = fresh(settings, lake, partition_rows=ROWS * 25)
    done = run_partitioned(parted, "random", seed=5)
    assert done.partitions and done.partitions >= 4
    assert_like_reference(done, database_of(parted), lake)

    resumed = fresh(settings, lake, batch_size=70)  # batches span files, cut inside them
    with Runtime(resumed) as rt:
        job, _ = rt.jobs.start("copy-taskdetail", {}, trusted=True)

        def crash(s: JobStatus) -> None:
            if s.processedRecords >= FILES * ROWS // 2:
                raise SystemExit("simulated crash")

        with pytest.raises(SystemExit):
            rt.runner.run(job.jobId, on_progress=crash)
        db = database_of(resumed)
        assert db.jobplans.count_documents({"jobId": job.jobId, "listing": 0}) == 1
        rt.jobs.store.release(
            job.jobId,
            db.jobstatuses.find_one({"jobId": job.jobId})["owner"],
            "test: hand back after the crash",
        )
        assert rt.runner.run(job.jobId) is Outcome.ENDED
        assert_like_reference(rt.jobs.get(job.jobId), db, lake)


def test_the_watermark_scan_opens_only_the_files_its_statistics_cannot_settle(
    tmp_path: Path,
) -> None:
    lake_dir = small_files(tmp_path / "lake", files=30)
    # three more files written without statistics: they must be read
    for i in range(30, 33):
        rows = [
            record(f"N{i}-{r}", r) | {"updatedAt": T0 + timedelta(hours=i, seconds=r)}
            for r in range(ROWS)
        ]
        pq.write_table(
            pa.Table.from_pylist(rows, SCHEMA),
            lake_dir / f"part-{i:05d}.parquet",
            write_statistics=False,
        )
    lake = Lake.open(str(lake_dir))
    rows, high = scan(lake, "updatedAt", None)
    assert rows == 33 * ROWS
    assert high is not None and high.value == int(
        (T0 + timedelta(hours=32, seconds=19)).timestamp() * 1000
    )
    assert lake.opened == 3  # the files without statistics; the others answered from footers

    since = from_millis("updatedAt", int((T0 + timedelta(hours=20, seconds=10)).timestamp() * 1000))
    lake = Lake.open(str(lake_dir))
    rows, high = scan(lake, "updatedAt", since)
    assert rows == 10 + 9 * ROWS + 3 * ROWS  # 10 rows of file 20, files 21-29, 30-32
    assert lake.opened == 1 + 3  # file 20 (values on both sides), the 3 without statistics

    # the copy's reads skip the files below the watermark too, and find the same rows
    opened = lake.opened
    from lakesync.watermarks import lake_filter

    reading = lake_filter(lake, since, high)
    keys = [
        k for b in lake.batches(50, filter=reading) for k in b.table["taskDetailId"].to_pylist()
    ]
    assert len(keys) == rows
    assert lake.opened - opened == 1 + 9 + 3


def test_an_incremental_copy_reads_new_files_and_files_without_statistics(
    settings: Settings, tmp_path: Path
) -> None:
    lake = small_files(tmp_path / "lake", files=20)
    settings = fresh(settings, lake)
    with Runtime(settings) as rt:
        first = copy(rt, "full")
        assert first.status == JobState.COMPLETED, first.error
        # a later file without statistics, and one with: both hold new records
        for i, stats in ((20, False), (21, True)):
            rows = [
                record(f"NEW{i}-{r}", r) | {"updatedAt": T0 + timedelta(hours=i, seconds=r)}
                for r in range(ROWS)
            ]
            pq.write_table(
                pa.Table.from_pylist(rows, SCHEMA),
                lake / f"part-{i:05d}.parquet",
                write_statistics=stats,
            )
        second = copy(rt, "incremental")
    assert second.status == JobState.COMPLETED, second.error
    assert second.insertedRecords == 2 * ROWS
    # the file holding the watermark's own value is read again (at or after it), nothing older
    assert second.processedRecords == 2 * ROWS + 1


def copy(rt: Runtime, mode: str) -> JobStatus:
    job, _ = rt.jobs.start("copy-taskdetail", {"mode": mode}, trusted=True)
    rt.runner.run(job.jobId)
    return rt.jobs.get(job.jobId)


# -- S3 ---------------------------------------------------------------------------------------


@pytest.fixture
def proxy(s3_url: str) -> Iterator[CountingProxy]:
    parts = urlsplit(s3_url)
    link = CountingProxy((str(parts.hostname), int(parts.port or 80)))
    yield link
    link.close()


def put_lake(url: str, local: Path, prefix: str) -> list[str]:
    s3 = s3_client(url)
    if "many" not in [b["Name"] for b in s3.list_buckets()["Buckets"]]:
        s3.create_bucket(Bucket="many")
    names = []
    for path in sorted(local.glob("*.parquet")):
        s3.put_object(Bucket="many", Key=f"{prefix}/{path.name}", Body=path.read_bytes())
        names.append(path.name)
    return names


def s3_lake(settings: Settings, proxy: CountingProxy, prefix: str, **more: Any) -> Settings:
    return settings.model_copy(
        update={
            "lake_uri": f"s3://many/{prefix}",
            "s3_endpoint_url": proxy.url,
            "s3_region": "us-east-1",
            **more,
        }
    )


def test_s3_requests_per_file_over_a_job_in_one_piece_and_in_partitions(
    settings: Settings,
    s3_url: str,
    proxy: CountingProxy,
    tmp_path: Path,
) -> None:
    names = put_lake(s3_url, small_files(tmp_path / "lake", files=200, unique=True), "one")
    settings = s3_lake(fresh(settings, tmp_path), proxy, "one")
    with Runtime(settings) as rt:
        proxy.reset()
        job, _ = rt.jobs.start("copy-taskdetail", {}, trusted=True)
        before_copy: list[int] = []  # when the copy starts (the plan is made)
        before_first: list[int] = []  # when the first batch is written

        def progress(s: JobStatus) -> None:
            if not before_copy and not (s.message or "").startswith(PLANNING):
                before_copy.append(proxy.total)  # past the planning messages
            if s.processedRecords and not before_first:
                before_first.append(proxy.total)

        rt.runner.run(job.jobId, on_progress=progress)
        done = rt.jobs.get(job.jobId)
    assert done.status == JobState.COMPLETED, done.error
    assert done.processedRecords == 200 * ROWS
    assert proxy.counts["HEAD"] <= 2  # the lake's root only: no HEAD per file
    # every file: read whole at open (one GET: its footer and key columns from memory),
    # which the plan of repeated keys reuses (no key repeats, so no second pass), then
    # read whole again by the copy (one GET); the watermark came from the footers
    per_file = [proxy.opened(name) for name in names]
    assert per_file == [2] * 200, per_file
    assert proxy.total <= 2 * 200 + 10
    # the open and the plan: one request per file; the first batch adds the reads of
    # the files the copy has read by then (its batch, the next one, and 32 read ahead)
    assert before_copy and before_copy[0] <= 200 + 10
    assert before_first and before_first[0] <= before_copy[0] + 200

    parted = s3_lake(fresh(settings, tmp_path), proxy, "one", partition_rows=1000)
    proxy.reset()
    done = run_partitioned(parted, "forward")
    assert done.status == JobState.COMPLETED, done.error
    assert done.partitions and done.partitions >= 3
    per_file = [proxy.opened(name) for name in names]
    # the first run's open (one GET), then one read by one partition: no partition reads
    # a footer at open (the plan kept the facts), none reads another's files
    assert per_file == [2] * 200, per_file
    assert proxy.counts["HEAD"] <= 2 * (1 + done.partitions)
    # the lake is listed once per job, and its first open checks that the prefix is not
    # inside a table (one LIST per parent folder: the bucket's root here); a partition asks
    # only whether the lake's folder is there and not a table (two LISTs), lists no files
    assert proxy.counts["LIST"] <= 4 + 2 * done.partitions, proxy.counts


def test_s3_incremental_copy_does_not_open_files_below_the_watermark(
    settings: Settings,
    s3_url: str,
    proxy: CountingProxy,
    tmp_path: Path,
) -> None:
    local = small_files(tmp_path / "lake", files=40)
    names = put_lake(s3_url, local, "inc")
    settings = s3_lake(fresh(settings, tmp_path), proxy, "inc")
    with Runtime(settings) as rt:
        assert copy(rt, "full").status == JobState.COMPLETED
        newer = small_files(tmp_path / "more", files=44)  # same layout: files 40-43 are new
        for name in sorted(p.name for p in newer.glob("*.parquet"))[40:]:
            s3_client(s3_url).put_object(
                Bucket="many", Key=f"inc/{name}", Body=(newer / name).read_bytes()
            )
        proxy.reset()
        done = copy(rt, "incremental")
    assert done.status == JobState.COMPLETED, done.error
    assert done.insertedRecords + done.updatedRecords + done.duplicateRecords > 0
    old = [proxy.opened(name) for name in names[:-1]]
    # read whole at open (for the footer and the plan's key columns); never read again
    assert old == [1] * 39
    assert proxy.opened(names[-1]) > 1  # it holds the watermark's own value: read again


def test_a_listing_is_kept_in_documents_that_fit_and_not_at_all_for_schemas_too_many(
    db: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """pandas writes each file's index range into its schema's metadata: every file of such
    a lake has its own schema. The plan keeps what fits in MongoDB documents, or nothing."""
    from lakesync import boundary

    lake = tmp_path / "lake"
    lake.mkdir()
    for i in range(30):
        table = pa.table({"id": [f"{i}-{r}" for r in range(i + 1)], "v": list(range(i + 1))})
        table = table.replace_schema_metadata({"pandas-like": f'{{"stop": {i + 1}}}'})
        pq.write_table(table, lake / f"part-{i:03d}-{'x' * 150}.parquet")  # long names
    listing = Lake.open(str(lake)).listing()
    assert listing is not None and len(listing.schemas) == 30
    monkeypatch.setattr(boundary, "_LISTING_NAMES_BYTES", 2_000)  # ~10 names per document
    boundary.save_listing(db, "job_a", listing)
    docs = list(db.jobplans.find({"jobId": "job_a"}))
    assert len(docs) >= 3 and all(len(bson.encode(d)) < 16 << 20 for d in docs)
    assert boundary.load_listing(db, "job_a") == listing
    monkeypatch.setattr(boundary, "_LISTING_SCHEMA_BYTES", 2_000)  # the 30 schemas do not fit
    boundary.save_listing(db, "job_a", listing)
    assert db.jobplans.count_documents({"jobId": "job_a"}) == 0
    assert boundary.load_listing(db, "job_a") is None  # resumed runs read the footers again


def test_s3_files_read_through_pyarrow_where_botocore_finds_no_credentials(
    settings: Settings,
    s3_url: str,
    proxy: CountingProxy,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """botocore and pyarrow each walk the AWS credentials chain; where botocore finds none
    (pyarrow may still), a file is read through pyarrow as before: the same documents and
    counts, two requests per read instead of one."""
    import botocore.exceptions

    from lakesync import locations

    local = small_files(tmp_path / "lake", files=30)  # keys repeat, some records are bad
    names = put_lake(s3_url, local, "creds")
    whole = s3_lake(fresh(settings, tmp_path), proxy, "creds")
    first = run_whole(whole)

    class NoCredentials:
        def get_object(self, **_: Any) -> Any:
            raise botocore.exceptions.NoCredentialsError()

    asked: list[tuple[str | None, ...]] = []

    def client(endpoint: str | None, region: str | None) -> Any:
        key = locations._client_key(endpoint, region)
        if key in locations._NO_CLIENT:
            return None
        asked.append(key)
        return NoCredentials()

    monkeypatch.setattr(locations, "_NO_CLIENT", set())
    monkeypatch.setattr(locations, "_client", client)
    arrow = s3_lake(fresh(settings, tmp_path), proxy, "creds")
    proxy.reset()
    second = run_whole(arrow)
    assert len(asked) == 1  # botocore was asked once, then left alone
    assert proxy.counts["HEAD"] <= 2
    assert all(proxy.opened(name) >= 4 for name in names)  # footer + data, at open and read
    assert counts_of(first) == counts_of(second) and first.status == JobState.COMPLETED
    one, two = database_of(whole), database_of(arrow)
    try:
        docs = [list(db.taskdetails.find(sort=[("_id", 1)])) for db in (one, two)]
        for doc in docs[0] + docs[1]:
            del doc["_lakesync"]["job"]
        assert docs[0] == docs[1]
        assert one.taskdetails.count_documents({}) > 0
    finally:
        one.client.close()
        two.client.close()


def test_s3_file_deleted_after_the_listing_fails_the_read_naming_it(
    settings: Settings, s3_url: str, tmp_path: Path
) -> None:
    names = put_lake(s3_url, small_files(tmp_path / "lake", files=3, unique=True), "gone")
    lake = Lake.open("s3://many/gone", settings=s3_settings(settings, s3_url))
    s3_client(s3_url).delete_object(Bucket="many", Key=f"gone/{names[1]}")
    with pytest.raises(SourceError, match=f"s3://many/gone/{names[1]} no longer exists"):
        list(lake.batches(1000))


def test_s3_keys_with_spaces_percent_and_unicode_are_read_whole(
    settings: Settings, s3_url: str, proxy: CountingProxy, tmp_path: Path
) -> None:
    """The whole-object GET names the key as the listing gave it, whatever its characters."""
    s3 = s3_client(s3_url)
    if "many" not in [b["Name"] for b in s3.list_buckets()["Buckets"]]:
        s3.create_bucket(Bucket="many")
    names = ["team=a b/x%20y.parquet", "team=é+ü/naïve file.parquet"]
    for i, name in enumerate(names):
        table = pa.table({"id": [f"{i}-0", f"{i}-1"], "v": [i, i]})
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        s3.put_object(Bucket="many", Key=f"odd/{name}", Body=sink.getvalue().to_pybytes())
    lake = Lake.open("s3://many/odd", settings=s3_lake(settings, proxy, "odd"))
    proxy.reset()
    rows = [r for b in lake.batches(10) for r in b.table.to_pylist()]
    assert sorted(rows, key=lambda r: r["id"]) == [
        {"id": "0-0", "v": 0, "team": "a b"},
        {"id": "0-1", "v": 0, "team": "a b"},
        {"id": "1-0", "v": 1, "team": "é+ü"},
        {"id": "1-1", "v": 1, "team": "é+ü"},
    ]
    assert proxy.counts["GET"] == 2 and proxy.counts["HEAD"] == 0  # one GET per file


def _faulty_s3(reply: bytes) -> str:
    """An S3 endpoint that answers every request with ``reply`` and closes the connection."""
    import socket
    import threading

    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            conn, _ = listener.accept()
            with conn:
                data = b""
                while b"\r\n\r\n" not in data and (chunk := conn.recv(65536)):
                    data += chunk
                conn.sendall(reply)

    threading.Thread(target=serve, daemon=True).start()
    return f"http://127.0.0.1:{listener.getsockname()[1]}"


@pytest.mark.parametrize(
    "reply",
    [
        b"",  # the connection closed before any response (ConnectionClosedError)
        b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"x" * 100,  # cut mid-body
    ],
)
def test_s3_connection_dropped_while_a_small_file_is_fetched_whole_is_transient(
    settings: Settings, s3_url: str, tmp_path: Path, reply: bytes
) -> None:
    """A connection closed before the answer, or in the middle of the body, is transient
    (TransientSourceError: the job keeps its checkpoint and retries), as pyarrow's
    NETWORK_CONNECTION was."""
    from lakesync.errors import TransientSourceError
    from lakesync.locations import WholeObjects

    put_lake(s3_url, small_files(tmp_path / "lake", files=1, unique=True), "drop")
    lake = Lake.open("s3://many/drop", settings=s3_settings(settings, s3_url))
    lake._objects = WholeObjects(_faulty_s3(reply), "us-east-1")  # the network fails now
    with pytest.raises(TransientSourceError):
        list(lake.batches(1000))


def test_s3_profile_botocore_cannot_find_leaves_the_lake_to_pyarrow(
    settings: Settings, s3_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """AWS_PROFILE naming no profile while the keys are in the environment: pyarrow reads
    the lake with them, and botocore's ProfileNotFound must not escape: the lake is read
    through pyarrow, all of it."""
    from lakesync import locations

    monkeypatch.setattr(locations, "_NO_CLIENT", set())
    put_lake(s3_url, small_files(tmp_path / "lake", files=2, unique=True), "profile")
    monkeypatch.setenv("AWS_PROFILE", "no-such-profile")
    lake = Lake.open("s3://many/profile", settings=s3_settings(settings, s3_url))
    rows = sum(b.table.num_rows for b in lake.batches(1000))
    assert rows == sum(lake.file_row_counts()) == 2 * ROWS
    assert len(locations._NO_CLIENT) == 1  # botocore was set aside


def test_s3_file_replaced_by_a_bigger_one_after_the_listing_is_not_read_silently(
    settings: Settings, s3_url: str, tmp_path: Path
) -> None:
    """An object replaced after the listing (ten times the rows the footer counted at open)
    is not read as the file the lake listed: its size no longer matches."""
    names = put_lake(s3_url, small_files(tmp_path / "lake", files=2, unique=True), "swap")
    lake = Lake.open("s3://many/swap", settings=s3_settings(settings, s3_url))
    bigger = pa.table({"x": list(range(10 * sum(lake.file_row_counts())))})
    sink = pa.BufferOutputStream()
    pq.write_table(bigger, sink)
    s3_client(s3_url).put_object(
        Bucket="many", Key=f"swap/{names[1]}", Body=sink.getvalue().to_pybytes()
    )
    with pytest.raises(SourceError, match=names[1]):
        rows = sum(b.table.num_rows for b in lake.batches(1000))
        assert rows == sum(lake.file_row_counts()), "read rows the lake did not count"


def test_s3_endpoint_url_with_a_path_reads_as_pyarrow_does(
    settings: Settings, s3_url: str, tmp_path: Path
) -> None:
    """pyarrow (and deltalake's options) use the endpoint's host and port only; so does
    the whole-object GET (a path kept would ask for /prefix/many/...)."""
    put_lake(s3_url, small_files(tmp_path / "lake", files=1, unique=True), "ep")
    lake = Lake.open("s3://many/ep", settings=s3_settings(settings, s3_url + "/prefix"))
    assert sum(b.table.num_rows for b in lake.batches(1000)) == sum(lake.file_row_counts())


@pytest.mark.parametrize("order", ["reverse", "random"])
def test_s3_lake_of_repeated_keys_partitioned_in_any_order_equals_the_reference(
    settings: Settings, s3_url: str, proxy: CountingProxy, tmp_path: Path, order: str
) -> None:
    """Keys repeated across and within files, bad records, files fetched whole on S3 and
    decoded from memory, partitions run in reverse or random order: the newest valid
    version of every key, exact counts, as a sequential reading of the lake gives them."""
    local = small_files(tmp_path / "lake", files=60, seed=11)
    put_lake(s3_url, local, f"rep-{order}")
    parted = s3_lake(fresh(settings, tmp_path), proxy, f"rep-{order}", partition_rows=ROWS * 9)
    done = run_partitioned(parted, order, seed=3)
    assert done.partitions and done.partitions >= 6
    assert_like_reference(done, database_of(parted), local)
    assert proxy.counts["HEAD"] <= 2 * (1 + done.partitions)
