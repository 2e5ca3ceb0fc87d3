"""The data-lake reader against real Parquet / CSV / NDJSON files (S3: test_s3.py, Delta:
test_delta.py)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from lakesync.demo import append_records, generate
from lakesync.errors import SourceError
from lakesync.lake import Lake, Position

ROWS = 3000


@pytest.fixture(scope="module")
def lake_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("lake") / "taskdetails"
    generate(out, ROWS, seed=7, files_per_partition=2)
    (out / "_SUCCESS").write_text("")
    (out / "_temporary" / "0").mkdir(parents=True)  # Spark's leftovers
    (out / "_temporary" / "0" / "part-9.parquet").write_text("partial")
    (out / ".part-0.parquet.crc").write_bytes(b"\0")
    return out


@pytest.fixture(scope="module")
def small_groups(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three files of 20, 45 and 8 rows in row groups of 7 rows (ids are 0..72 in order)."""
    out = tmp_path_factory.mktemp("groups")
    start = 0
    for i, n in enumerate([20, 45, 8]):
        ids = list(range(start, start + n))
        table = pa.table({"id": ids, "even": [x % 2 == 0 for x in ids]})
        pq.write_table(table, out / f"f{i}.parquet", row_group_size=7)
        start += n
    return out


def keys(lake: Lake, column: str = "taskDetailId", **kwargs: object) -> list[object]:
    return [k for b in lake.batches(**kwargs) for k in b.table[column].to_pylist()]  # type: ignore[arg-type]


def test_directory_with_hive_partitions(lake_dir: Path) -> None:
    lake = Lake.open(str(lake_dir))
    assert lake.format == "parquet" and lake.uri == str(lake_dir)
    assert lake.files == sorted(lake.files)
    assert all("/projectId=PRJ-" in f and f.endswith(".parquet") for f in lake.files)
    assert lake.schema.field("projectId").type == pa.string() and lake.has_column("notes")
    assert not lake.has_column("nope")
    for batch in lake.batches(500):
        for seg in batch.segments:  # a batch may span files: each segment is one file's rows
            expected = seg.file.split("projectId=")[1].split("/")[0]
            rows = batch.table["projectId"].slice(seg.offset, seg.rows).to_pylist()
            assert set(rows) == {expected}


def test_counts_agree(lake_dir: Path) -> None:
    lake = Lake.open(str(lake_dir))
    counts = lake.file_row_counts()
    assert lake.count_rows() == sum(counts) == ROWS
    per_file = [0] * len(lake.files)
    for batch in lake.batches(128):
        for seg in batch.segments:
            per_file[seg.file_index] += seg.rows
    assert per_file == counts
    assert len(set(keys(lake, batch_size=1000))) == ROWS


def test_batches_are_exact_and_span_files(small_groups: Path) -> None:
    """Files of 20, 45 and 8 rows in batches of 10: whole batches across file ends."""
    lake = Lake.open(str(small_groups))
    batches = list(lake.batches(10))
    shape = [[(s.file_index, s.start_row, s.rows, s.offset) for s in b.segments] for b in batches]
    assert shape == [
        [(0, 0, 10, 0)],
        [(0, 10, 10, 0)],
        [(1, 0, 10, 0)],
        [(1, 10, 10, 0)],
        [(1, 20, 10, 0)],
        [(1, 30, 10, 0)],
        [(1, 40, 5, 0), (2, 0, 5, 5)],
        [(2, 5, 3, 0)],
    ]
    assert [b.table.num_rows for b in batches] == [10] * 7 + [3]
    assert all(s.file == lake.files[s.file_index] for b in batches for s in b.segments)
    assert batches[1].end == Position(0, 20) and batches[6].end == Position(2, 5)
    assert batches[6].at(4) == (1, 44) and batches[6].at(5) == (2, 0)
    assert batches[6].holds(2, 4) and not batches[6].holds(2, 5)
    assert keys(lake, "id", batch_size=3) == list(range(73))


def test_files_with_other_columns_are_never_put_in_one_batch(tmp_path: Path) -> None:
    pq.write_table(pa.table({"id": [1, 2], "a": ["x", "y"]}), tmp_path / "f0.parquet")
    pq.write_table(pa.table({"id": [3], "b": [1.5]}), tmp_path / "f1.parquet")
    pq.write_table(pa.table({"id": [4], "b": [2.5]}), tmp_path / "f2.parquet")
    batches = list(Lake.open(str(tmp_path)).batches(10))
    assert [[s.file_index for s in b.segments] for b in batches] == [[0], [1, 2]]
    assert batches[1].table.column_names == ["id", "b"]


@pytest.mark.parametrize(
    "start",
    [
        Position(0, 0),
        Position(0, 5),
        Position(0, 20),
        Position(1, 0),
        Position(1, 7),
        Position(1, 30),
        Position(1, 44),
        Position(2, 3),
        Position(3, 0),
        Position(1, 99),
    ],
)
def test_resume_yields_exactly_the_rest(small_groups: Path, start: Position) -> None:
    lake = Lake.open(str(small_groups))
    before = sum(lake.file_row_counts()[: start.file_index])
    offset = min(before + start.row, sum(lake.file_row_counts()[: start.file_index + 1]))
    resumed = list(lake.batches(4, start))
    assert [k for b in resumed for k in b.table["id"].to_pylist()] == list(range(offset, 73))
    if resumed and start.file_index < 3:
        assert resumed[0].start_row == (
            start.row if resumed[0].file_index == start.file_index else 0
        )


def test_resume_from_batch_ends_loses_and_duplicates_nothing(lake_dir: Path) -> None:
    lake = Lake.open(str(lake_dir))
    batches = list(lake.batches(256))
    everything = [k for b in batches for k in b.table["taskDetailId"].to_pylist()]
    done = 0
    for i, cut in enumerate(batches):
        done += cut.table.num_rows
        if i % 5 == 0:
            assert keys(lake, batch_size=100, start=cut.end) == everything[done:]


def test_stop_file_bounds_the_files_read(small_groups: Path) -> None:
    lake = Lake.open(str(small_groups))
    assert keys(lake, "id", batch_size=50, start=Position(0, 15), stop_file=2) == list(
        range(15, 65)
    )
    assert keys(lake, "id", batch_size=50, start=Position(1, 0), stop_file=1) == []


def test_filter_counts_and_batches_agree(lake_dir: Path, small_groups: Path) -> None:
    lake = Lake.open(str(lake_dir))
    table = pa.concat_tables(b.table for b in lake.batches(1000))
    done = pc.field("status") == "done"
    expected = pc.sum(pc.equal(table["status"], "done")).as_py()
    assert lake.count_rows(done) == expected == len(keys(lake, batch_size=333, filter=done))
    project = pc.field("projectId") == "PRJ-002"
    assert lake.count_rows(project) == pc.sum(pc.equal(table["projectId"], "PRJ-002")).as_py()
    assert lake.count_rows(pc.field("projectId") == "nope") == 0
    groups = Lake.open(str(small_groups))
    even = pc.field("even")
    assert groups.count_rows(even) == 37
    # rows are counted after the filter: row 5 of file 1 is its 6th even row (id 30)
    assert keys(groups, "id", batch_size=4, start=Position(1, 5), filter=even)[0] == 30
    assert keys(groups, "id", batch_size=4, filter=pc.field("id") >= 60) == list(range(60, 73))


def test_columns_projection(lake_dir: Path) -> None:
    lake = Lake.open(str(lake_dir))
    batch = next(lake.batches(10, columns=["taskDetailId", "projectId"]))
    assert batch.table.column_names == ["taskDetailId", "projectId"]
    with pytest.raises(SourceError, match="nope"):
        next(lake.batches(10, columns=["nope"]))


def test_single_file_and_glob(lake_dir: Path) -> None:
    lake = Lake.open(str(lake_dir))
    one = Lake.open(lake.files[0])
    assert one.files == [lake.files[0]] and one.count_rows() == lake.file_row_counts()[0]
    glob = Lake.open(f"{lake_dir}/**/part-1.parquet")
    assert glob.files == [f for f in lake.files if f.endswith("part-1.parquet")]
    assert set(glob.batches(100).__next__().table.column_names) >= {"projectId", "notes"}
    assert Lake.open(f"{lake_dir}/projectId=PRJ-00[12]/*.parquet").files == lake.files[:4]


def test_csv_and_ndjson(tmp_path: Path) -> None:
    (tmp_path / "csv" / "region=eu").mkdir(parents=True)
    (tmp_path / "csv" / "region=eu" / "a.csv").write_text("id,h\n1,2.5\n2,3\n3,\n")
    (tmp_path / "csv" / "b.csv").write_text("id,h\n4,1\n")
    lake = Lake.open(str(tmp_path / "csv"))
    assert lake.format == "csv" and lake.count_rows() == 4 and lake.file_row_counts() == [1, 3]
    assert keys(lake, "id", batch_size=2) == [4, 1, 2, 3]
    regions = [b.table.to_pydict().get("region") for b in lake.batches(2)]
    assert regions == [None, ["eu", "eu"], ["eu"]]  # b.csv is not in a partition directory
    rows = [{"id": i, "tags": ["x"] * (i % 3)} for i in range(25)]
    (tmp_path / "data.ndjson").write_text("".join(json.dumps(r) + "\n" for r in rows))
    lake = Lake.open(str(tmp_path / "data.ndjson"))
    assert lake.format == "json" and lake.count_rows() == 25
    assert keys(lake, "id", batch_size=10, start=Position(0, 12)) == list(range(12, 25))
    (tmp_path / "odd.txt").write_text("id\n7\n")
    assert keys(Lake.open(str(tmp_path / "odd.txt"), format="csv"), "id", batch_size=5) == [7]


def test_each_file_keeps_its_own_types(tmp_path: Path) -> None:
    generate(tmp_path / "lake", 600, bad_rows=6, seed=1)
    lake = Lake.open(str(tmp_path / "lake"))
    types = {
        b.file.rsplit("/", 1)[1]: b.table.schema.field("hoursLogged").type
        for b in lake.batches(1000)
    }
    assert types["part-bad.parquet"] == pa.string() and types["part-0.parquet"] == pa.float64()
    assert lake.count_rows() == 600


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match=re.escape(f"{tmp_path}/nope does not exist")):
        Lake.open(str(tmp_path / "nope"))
    with pytest.raises(SourceError, match=re.escape(f"{tmp_path}/nope does not exist")):
        Lake.open(str(tmp_path / "nope" / "*.parquet"))


def test_no_data_files(tmp_path: Path) -> None:
    (tmp_path / "_SUCCESS").write_text("")
    (tmp_path / ".hidden.parquet").write_text("")
    with pytest.raises(SourceError, match=re.escape(f"No data files found in {tmp_path}")):
        Lake.open(str(tmp_path))
    with pytest.raises(SourceError, match="No data files found"):
        Lake.open(f"{tmp_path}/**/*.csv")


def test_not_a_parquet_file(tmp_path: Path, small_groups: Path) -> None:
    for f in small_groups.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    (tmp_path / "f1.parquet").write_text("id,even\n1,true\n")
    with pytest.raises(
        SourceError, match=re.escape(f"{tmp_path}/f1.parquet is not a valid parquet file")
    ):
        Lake.open(str(tmp_path))


def test_mixed_formats(tmp_path: Path) -> None:
    (tmp_path / "a.csv").write_text("id\n1\n")
    (tmp_path / "b.parquet").write_bytes(b"")
    with pytest.raises(
        SourceError, match=re.escape(f"Mixed file formats in {tmp_path}") + ".*a.csv"
    ):
        Lake.open(str(tmp_path))
    with pytest.raises(SourceError, match="Mixed file formats"):
        Lake.open(str(tmp_path), format="csv")
    assert Lake.open(f"{tmp_path}/*.csv").count_rows() == 1


def test_file_deleted_after_open(tmp_path: Path, small_groups: Path) -> None:
    for f in small_groups.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    lake = Lake.open(str(tmp_path))
    (tmp_path / "f1.parquet").unlink()
    batches = lake.batches(20)  # file 0 holds 20 rows: the first batch needs nothing else
    assert next(batches).file_index == 0
    with pytest.raises(SourceError, match=re.escape(f"{tmp_path}/f1.parquet no longer exists")):
        next(batches)


def test_bad_uri_and_format() -> None:
    with pytest.raises(SourceError, match="Unsupported lake URI scheme gs://"):
        Lake.open("gs://bucket/x")
    for uri in ("s3://key:secret@bucket/x", "s3://bucket/x?secret_key=hunter2"):
        with pytest.raises(SourceError, match="never from the URI") as info:
            Lake.open(uri)
        assert "secret" not in str(info.value).replace("AWS_SECRET", "")
        assert "hunter2" not in str(info.value)
    with pytest.raises(SourceError, match="Unknown lake format 'xlsx'"):
        Lake.open("/tmp", format="xlsx")
    with pytest.raises(SourceError, match="Invalid Delta version -1"):
        Lake.open("/tmp", version=-1)


def test_resume_skips_row_groups_without_reading_them(tmp_path: Path) -> None:
    path = tmp_path / "groups.parquet"
    pq.write_table(pa.table({"id": list(range(100))}), path, row_group_size=10, compression="none")
    second = pq.ParquetFile(path).metadata.row_group(1).column(0)
    data = bytearray(path.read_bytes())
    start = min(o for o in (second.dictionary_page_offset, second.data_page_offset) if o)
    data[4:start] = b"\xff" * (start - 4)  # row group 0 is garbage, the footer is intact
    path.write_bytes(bytes(data))
    lake = Lake.open(str(path))
    assert keys(lake, "id", batch_size=7, start=Position(0, 13)) == list(range(13, 100))
    with pytest.raises(SourceError, match=re.escape(str(path))):
        keys(lake, "id", batch_size=7)


def test_file_names_are_relative_to_the_lake_root(lake_dir: Path, small_groups: Path) -> None:
    lake = Lake.open(str(lake_dir))
    assert lake.file_name(0) == "projectId=PRJ-001/part-0.parquet"
    assert [lake.file_name(i) for i in range(len(lake.files))] == [
        f.removeprefix(f"{lake_dir}/") for f in lake.files
    ]
    assert Lake.open(f"{lake_dir}/projectId=PRJ-001/*.parquet").file_name(1) == "part-1.parquet"
    assert Lake.open(f"{small_groups}/f1.parquet").file_name(0) == "f1.parquet"
    assert Lake.open(f"file://{small_groups}").file_name(2) == "f2.parquet"


def test_resume_position_follows_the_file_or_refuses(tmp_path: Path) -> None:
    generate(tmp_path / "lake", 2000, seed=4)
    before = Lake.open(str(tmp_path / "lake"))
    start = Position(3, 10)
    name = before.file_name(3)
    assert before.resume_position(start, name) == start
    assert before.resume_position(start, None) == start  # a checkpoint without a name
    rest = keys(before, batch_size=500, start=start)
    # A file that sorts before the checkpoint's file appears: the index moves with the name.
    shutil.copy(before.files[0], tmp_path / "lake" / "projectId=PRJ-001" / "part-00.parquet")
    after = Lake.open(str(tmp_path / "lake"))
    moved = after.resume_position(start, name)
    assert moved == Position(4, 10) and after.file_name(4) == name
    assert keys(after, batch_size=500, start=moved) == rest
    # Files appended after it (append_records sorts last) leave the index alone.
    append_records(tmp_path / "lake", 10, start_id=90_000)
    assert Lake.open(str(tmp_path / "lake")).resume_position(moved, name) == moved
    # The checkpoint's file is gone, or now has fewer rows than were consumed: refuse.
    (tmp_path / "lake" / name).unlink()
    gone = Lake.open(str(tmp_path / "lake"))
    with pytest.raises(SourceError, match=re.escape(f"checkpoint's file {name} is no longer")):
        gone.resume_position(moved, name)
    with pytest.raises(SourceError, match="now has"):
        gone.resume_position(Position(1, 10**6), gone.file_name(1))
    with pytest.raises(SourceError, match="Start a new copy"):
        gone.resume_position(Position(len(gone.files) + 1, 0), None)


def test_a_stray_delta_log_is_not_ignored(tmp_path: Path, small_groups: Path) -> None:
    """A folder holding _delta_log is a table: read as one or refused, never as loose files
    (neither with a plain format nor through a glob), and nothing suggests a glob into it."""
    shutil.copytree(small_groups, tmp_path / "t")
    (tmp_path / "t" / "_delta_log").mkdir()
    (tmp_path / "t" / "_delta_log" / "notes.txt").write_text("not a commit")
    with pytest.raises(SourceError, match="_delta_log folder but no Delta table commits") as e:
        Lake.open(str(tmp_path / "t"))
    assert "remove its stray _delta_log folder" in str(e.value) and "*" not in str(e.value)
    with pytest.raises(SourceError, match=r'never as loose parquet files.*format = "delta"'):
        Lake.open(str(tmp_path / "t"), format="parquet")
    for glob in (f"{tmp_path}/t/*.parquet", f"{tmp_path}/t/**/*.parquet", f"{tmp_path}/**"):
        with pytest.raises(SourceError, match=r"Delta table .*/t") as e:
            Lake.open(glob)
        assert "*" not in str(e.value).replace(glob, "")  # no glob suggested
    shutil.rmtree(tmp_path / "t" / "_delta_log")
    assert Lake.open(str(tmp_path / "t")).count_rows() == 73  # plain files again
    with pytest.raises(SourceError, match="not a Delta table"):
        Lake.open(str(small_groups), format="delta")
    with pytest.raises(SourceError, match="no Delta format or version"):
        Lake.open(str(small_groups), version=0)
    with pytest.raises(SourceError, match="Invalid Delta version 0"):
        Lake.open(str(small_groups), format="csv", version=0)


def test_open_only_some_files_reads_only_their_footers(small_groups: Path, tmp_path: Path) -> None:
    whole = Lake.open(str(small_groups))
    names = [whole.file_name(1), whole.file_name(2)]
    part = Lake.open(str(small_groups), only=names, first_index=1)
    assert part.files == whole.files[1:] and part.file_row_counts() == [45, 8]
    assert [s.ordinal for b in part.batches(100) for s in b.segments] == [1, 2]
    with pytest.raises(SourceError, match="Restore the file and resume the job"):
        Lake.open(str(small_groups), only=[*names, "gone.parquet"])


def _evolving_lake(root: Path) -> Path:
    """Hive partitions, a column only some files have, int32 in one file and int64 in
    another, a dictionary column (as pandas categoricals are written), nulls, several row
    groups: what the small-file reader must conform exactly as the dataset scanner does."""
    a = pa.table(
        {
            "id": pa.array([1, 2, 3], pa.int32()),
            "x": ["a", None, "c"],
            "cat": pa.array(["u", "v", "u"]).dictionary_encode(),
        }
    )
    b = pa.table(
        {
            "id": pa.array([4, 5, 6, 7], pa.int64()),
            "y": pa.array([1.5, None, 2.5, 3.5]),
            "cat": pa.array(["v", None, "w", "u"]).dictionary_encode(),
        }
    )
    # a column named as the partition: the partition's value wins, as the scanner has it
    c = pa.table({"id": pa.array([8, 9], pa.int64()), "x": ["h", "i"], "p": ["in-file", None]})
    for path, table, group in (
        ("p=a/f1.parquet", a, 2),
        ("p=b/f2.parquet", b, 3),
        ("p=b/f3.parquet", c, 10),
        ("p=__HIVE_DEFAULT_PARTITION__/f4.parquet", c, 1),
    ):
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, root / path, row_group_size=group)
    return root  # fmt: skip


def _same(a: pa.ChunkedArray, b: pa.ChunkedArray) -> bool:
    """Equal values, NaN equal to NaN (``equals`` says it is not)."""
    if a.equals(b):
        return True
    if not pa.types.is_floating(a.type) or len(a) != len(b):
        return False
    both_nan = pc.and_(pc.is_nan(a), pc.is_nan(b))
    return (
        bool(pc.all(pc.or_kleene(pc.equal(a, b), both_nan)).as_py())
        and a.null_count == b.null_count
    )


def _read_all(lake: Lake, **read: object) -> list[tuple[pa.Table, list[tuple[int, int, int]]]]:
    """Each batch and its segments, or the error met (as a one-row table of its text)."""
    try:
        return [
            (b.table, [(s.ordinal, s.start_row, s.rows) for s in b.segments])
            for b in lake.batches(4, **read)  # type: ignore[arg-type]
        ]
    except SourceError as e:
        return [(pa.table({"error": [str(e)]}), [])]


@pytest.mark.parametrize("kind", ["corpus", "evolving"])
def test_small_files_read_from_memory_equal_the_dataset_scanners_rows(
    tmp_path: Path, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Small Parquet files are decoded from memory (``parquet.read_small``), not
    by a dataset scanner per file: the rows, types, batches and positions must be the
    scanner's, for every type, partition values, missing and widened columns, filters,
    column choices, resumed starts and the columns kept at open."""
    from tests.helpers import write_corpus

    from lakesync.sources import parquet as parquet_module

    if kind == "corpus":
        write_corpus(tmp_path / "lake")
        reads: list[dict[str, object]] = [
            {},
            {"columns": ["id", "at", "smap"]},
            {"filter": pc.field("id") >= 2},
            {"filter": pc.field("id") >= 2, "columns": ["nan", "id"]},
            {"start": Position(1, 1)},
        ]
        keep = ["id", "at"]
    else:
        _evolving_lake(tmp_path / "lake")
        reads = [
            {},
            {"columns": ["y", "id"]},
            {"columns": ["p"]},
            {"filter": pc.field("p") == "b"},
            {"filter": pc.field("x").is_valid(), "columns": ["id"]},
            {"filter": pc.field("y") > 2, "columns": ["cat", "p"]},
            {"start": Position(1, 2)},
            {"start": Position(3, 1), "columns": ["p", "x"]},
        ]
        keep = ["id", "p"]
    uri = str(tmp_path / "lake")
    fast = [_read_all(Lake.open(uri), **read) for read in reads]
    kept_fast = _read_all(Lake.open(uri, keep=keep), columns=keep)
    monkeypatch.setattr(parquet_module, "in_reach", lambda fragment: False)  # the scanner
    slow = [_read_all(Lake.open(uri), **read) for read in reads]
    kept_slow = _read_all(Lake.open(uri, keep=keep), columns=keep)
    for read, got, want in zip(reads, fast, slow, strict=True):
        assert len(got) == len(want), read
        for (table, segments), (expected, where) in zip(got, want, strict=True):
            assert table.schema == expected.schema, read
            for name in table.schema.names:
                assert _same(table[name], expected[name]), (read, name)
            assert segments == where, read
    assert [w for _, w in kept_fast] == [w for _, w in kept_slow]
    for (table, _), (expected, _) in zip(kept_fast, kept_slow, strict=True):
        assert table.schema == expected.schema
        assert all(_same(table[n], expected[n]) for n in keep)


def test_a_hive_key_the_file_also_holds_as_a_typed_column_reads_as_the_scanner_reads_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """year=2024/day=2024-01-02/ over a file that has int64 ``year`` and date ``day``
    columns: the partition's text, cast to the column's type, wins, in the small-file
    reader as in the scanner."""
    import datetime

    from lakesync.sources import parquet as parquet_module

    table = pa.table(
        {"id": [1, 2], "year": pa.array([1, 1], pa.int64()), "day": [datetime.date(2020, 1, 1)] * 2}
    )
    path = tmp_path / "lake" / "year=2024" / "day=2024-01-02" / "f.parquet"
    path.parent.mkdir(parents=True)
    pq.write_table(table, path)
    uri = str(tmp_path / "lake")
    fast = _read_all(Lake.open(uri))
    monkeypatch.setattr(parquet_module, "in_reach", lambda fragment: False)  # the scanner
    slow = _read_all(Lake.open(uri))
    day = datetime.date(2024, 1, 2)
    assert slow[0][0].to_pylist() == [
        {"id": 1, "year": 2024, "day": day},
        {"id": 2, "year": 2024, "day": day},
    ]
    assert [(t.to_pylist(), s) for t, s in fast] == [(t.to_pylist(), s) for t, s in slow]


def test_a_typed_hive_key_in_a_file_of_large_row_groups_reads_as_the_scanner_reads_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same in ``parquet.row_group_slices`` (files streamed row group by row group)."""
    from lakesync.sources import lake as lake_module
    from lakesync.sources import parquet as parquet_module

    path = tmp_path / "lake" / "year=2024" / "f.parquet"
    path.parent.mkdir(parents=True)
    pq.write_table(pa.table({"id": [1, 2, 3], "year": pa.array([1, 1, 1], pa.int64())}), path)
    monkeypatch.setattr(lake_module, "_SMALL_FILE_ROWS", 0)  # streamed, not read whole
    monkeypatch.setattr(parquet_module, "_ROW_GROUP_BYTES", 0)  # by parquet.row_group_slices
    lake = Lake.open(str(tmp_path / "lake"))
    got = [r for b in lake.batches(1) for r in b.table.to_pylist()]
    assert got == [{"id": i, "year": 2024} for i in (1, 2, 3)]


def test_csv_watermarks_of_disagreeing_types_are_compared_as_validation_reads_them(
    tmp_path: Path,
) -> None:
    """Undeclared: one file's watermark cells carry an offset, one's have none, one's are
    dates (Arrow types them three ways, no order between them) and one's are in two formats
    (text): the filter and the scan read every cell as a validated timestamp; a cell that
    is no time is kept by the filter."""
    from lakesync.sources.text import CsvOptions
    from lakesync.watermarks import from_millis, lake_filter, lake_kind, scan

    (tmp_path / "a.csv").write_text("id,ts\n1,2024-01-01T00:00:00Z\n")
    (tmp_path / "b.csv").write_text("id,ts\n2,2024-01-05 00:00:00\n3,2024-01-02 00:00:00\n")
    (tmp_path / "c.csv").write_text("id,ts\n4,2024-01-03\n")
    (tmp_path / "d.csv").write_text("id,ts\n5,2024-01-04T01:00:00+02:00\n6,soon\n7,\n")
    lake = Lake.open(str(tmp_path), csv=CsvOptions(watermark="ts"))
    kinds = [str(s.field("ts").type) for s in lake._schemas]  # as Arrow read each file
    assert kinds == ["timestamp[s, tz=UTC]", "timestamp[s]", "date32[day]", "string"]
    assert lake_kind(lake, "ts") == "timestamp"
    rows, high = scan(lake, "ts", None)
    assert (rows, high and high.iso) == (7, "2024-01-05T00:00:00.000Z")
    since = from_millis("ts", 1704153600000)  # 2024-01-02T00:00Z
    assert scan(lake, "ts", since)[0] == 5  # (ids 2, 3, 4, 5 and 6; 7 is null: out)
    read = lake_filter(lake, since, None)
    ids = [i for b in lake.batches(2, filter=read) for i in b.table.column("id").to_pylist()]
    assert ids == [2, 3, 4, 5, 6] and lake.count_rows(read) == 5
    # a declared watermark the files do not hold: nothing to compare, the lake as it is
    (tmp_path / "none").mkdir()
    (tmp_path / "none" / "a.csv").write_text("id,v\n1,a\n")
    declared = CsvOptions(watermark="updatedAt", watermark_type="timestamp")
    assert Lake.open(str(tmp_path / "none"), csv=declared).schema.names == ["id", "v"]
