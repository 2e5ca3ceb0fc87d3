"""The type mapping (README "Types"): every Arrow type as its BSON type, with and without a server.

The encoder is checked without a server (encode, ``bson.decode``, compare with the Arrow
value), then a corpus written with pyarrow is copied twice through declared operations on
the embedded server: exact values first, everything unchanged second, and the values
nx-27017 cannot store rejected per record with its limit named.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import bson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from bson import Decimal128
from bson.datetime_ms import DatetimeMS
from tests.helpers import lakesync, write_corpus

from lakesync.config import Settings
from lakesync.errors import SourceError
from lakesync.models import JobStatus
from lakesync.runtime import Runtime
from lakesync.schema import RecordSchema, check_columns, validate
from lakesync.typemap import KEY_CODEC, MONGODB, NX_27017, lookup_key

ANY = RecordSchema(key="id")
NAN, INF = float("nan"), float("inf")
T0 = 1_700_000_000_123_456_789  # ns: 2023-11-14T22:13:20.123456789Z


def decode(schema: RecordSchema, table: pa.Table, limits: Any = MONGODB) -> list[dict[str, Any]]:
    out = validate(schema, table, limits)
    assert not out.rejections, out.rejections
    return [bson.decode(b, KEY_CODEC) for b in out.encoded()]


def ms(value: Any) -> int:
    """A decoded BSON date as int64 milliseconds."""
    if isinstance(value, DatetimeMS):
        return int(value)
    delta = value - datetime(1970, 1, 1, tzinfo=UTC)
    return (delta.days * 86_400 + delta.seconds) * 1000 + delta.microseconds // 1000


def same_double(a: Any, b: Any) -> bool:
    return isinstance(a, float) and (a == b or (a != a and b != b))


# -- the encoder alone -----------------------------------------------------------------------


def test_timestamps_of_every_unit_and_zone_are_dates_truncated_to_milliseconds() -> None:
    raw = [T0, -1, -1_000_001, None]  # -1 ns is 1969-12-31T23:59:59.999Z, not 1970
    table = pa.table({
        "id": [1, 2, 3, 4],
        "ns_utc": pa.array(raw, pa.timestamp("ns", tz="UTC")),
        "ns_paris": pa.array(raw, pa.timestamp("ns", tz="Europe/Paris")),
        "us_naive": pa.array([v if v is None else v // 1000 for v in raw], pa.timestamp("us")),
        "s": pa.array([1, -1, 0, None], pa.timestamp("s")),
    })  # fmt: skip
    docs = decode(ANY, table)
    expected = [T0 // 1_000_000, -1, -2, None]
    for doc, want in zip(docs, expected, strict=True):
        for name in ("ns_utc", "ns_paris", "us_naive"):
            assert (None if doc[name] is None else ms(doc[name])) == want, (name, doc)
    assert [None if d["s"] is None else ms(d["s"]) for d in docs] == [1000, -1000, 0, None]


def test_declared_timestamp_fields_are_truncated_the_same_way() -> None:
    from lakesync.schema import FieldRule

    schema = RecordSchema(key="id", fields=[FieldRule(name="id", type="int"),
                                            FieldRule(name="t", type="timestamp")])  # fmt: skip
    table = pa.table({"id": [1, 2], "t": pa.array([T0, -1], pa.timestamp("ns", tz="Asia/Tokyo"))})
    assert [ms(d["t"]) for d in decode(schema, table)] == [T0 // 1_000_000, -1]


def test_instants_outside_pythons_datetime_range_are_stored_exactly() -> None:
    far = 253_402_300_800 * 10  # seconds: the year 82269
    table = pa.table({"id": [1, 2], "t": pa.array([far, -far], pa.timestamp("s", tz="UTC")),
                      "n": pa.array([[{"t": far * 1_000_000}], None],
                                    pa.list_(pa.struct([("t", pa.timestamp("us"))])))})  # fmt: skip
    docs = decode(ANY, table)
    assert docs[0]["t"] == DatetimeMS(far * 1000) and docs[1]["t"] == DatetimeMS(-far * 1000)
    assert docs[0]["n"] == [{"t": DatetimeMS(far * 1000)}] and docs[1]["n"] is None
    huge = pa.table({"id": [1, 2], "t": pa.array([2**62, 5], pa.timestamp("s"))})
    out = validate(ANY, huge)
    assert [r.row for r in out.rejections] == [0] and out.rows == [1]
    assert "t: " in out.rejections[0].reason and "BSON date" in out.rejections[0].reason


def test_each_arrow_type_becomes_its_bson_type() -> None:
    dec = [Decimal("1003.85800"), Decimal("-5.67800"), None]
    table = pa.table({
        "id": pa.array([1, 2, 3], pa.int64()),
        "dec": pa.array(dec, pa.decimal128(10, 5)),
        "dec256": pa.array(dec, pa.decimal256(40, 5)),
        "d32": pa.array([date(2020, 1, 2), date(1, 1, 1), None]),
        "d64": pa.array([date(2020, 1, 2), date(1969, 12, 31), None], pa.date64()),
        "t64": pa.array([3_723_000_001_999, 0, None], pa.time64("ns")),
        "t32": pa.array([3_723, 59, None], pa.time32("s")),
        "dur": pa.array([5, -3, None], pa.duration("ns")),
        "u64": pa.array([2**64 - 1, 2**63 - 1, None], pa.uint64()),
        "u8": pa.array([255, 0, None], pa.uint8()),
        "f16": pa.array([1.5, -0.0, None], pa.float16()),
        "f32": pa.array([0.1, INF, None], pa.float32()),
        "bin": pa.array([b"\x00\x01", b"", None]),
        "fixed": pa.array([b"ab", b"cd", None], pa.binary(2)),
        "lstr": pa.array(["x", "", None], pa.large_string()),
        "lbin": pa.array([b"x", b"", None], pa.large_binary()),
        "dict": pa.array(["a", "b", None]).dictionary_encode(),
        "ree": pa.RunEndEncodedArray.from_arrays([2, 3], ["r", None]),
        "smap": pa.array([[("a", 1), ("b", None)], [], None], pa.map_(pa.string(), pa.int64())),
        "imap": pa.array([[(1, "a")], [], None], pa.map_(pa.int32(), pa.string())),
        "nested": pa.array([[{"x": [1, None], "y": {"z": "q"}}, None], [], None],
                           pa.list_(pa.struct([("x", pa.list_(pa.int64())),
                                               ("y", pa.struct([("z", pa.string())]))]))),
    })  # fmt: skip
    docs = decode(ANY, table)
    first, second, third = docs
    assert first["dec"] == Decimal128("1003.85800") and second["dec"] == Decimal128("-5.67800")
    assert first["dec256"] == Decimal128("1003.85800") and third["dec"] is None
    assert first["d32"] == datetime(2020, 1, 2, tzinfo=UTC) == first["d64"]
    assert second["d32"] == datetime(1, 1, 1, tzinfo=UTC)
    assert second["d64"] == datetime(1969, 12, 31, tzinfo=UTC)
    assert (first["t64"], second["t64"], first["t32"], second["t32"]) == (
        "01:02:03.000001", "00:00:00", "01:02:03", "00:00:59")  # fmt: skip
    assert (first["dur"], second["dur"], third["dur"]) == (5, -3, None)
    assert first["u64"] == Decimal128(str(2**64 - 1)) and second["u64"] == 2**63 - 1
    assert isinstance(second["u64"], int) and first["u8"] == 255
    assert first["f16"] == 1.5 and str(second["f16"]) == "-0.0"
    assert first["f32"] == float(pa.scalar(0.1, pa.float32()).as_py()) and second["f32"] == INF
    assert (first["bin"], second["bin"], first["fixed"]) == (b"\x00\x01", b"", b"ab")
    assert (first["lstr"], first["lbin"], first["dict"], second["ree"], third["ree"]) == (
        "x", b"x", "a", "r", None)  # fmt: skip
    assert first["smap"] == {"a": 1, "b": None} and second["smap"] == {} and third["smap"] is None
    assert first["imap"] == [{"k": 1, "v": "a"}] and second["imap"] == []
    assert first["nested"] == [{"x": [1, None], "y": {"z": "q"}}, None]
    assert (second["nested"], third["nested"]) == ([], None)


def test_views_intervals_and_fixed_size_lists_become_their_bson_types() -> None:
    table = pa.table({
        "id": [1, 2],
        "iv": pa.array([(1, 2, 3), None], pa.month_day_nano_interval()),
        "fsl": pa.array([[1, 2], None], pa.list_(pa.int64(), 2)),
        "sv": pa.array(["a", None], pa.string_view()),
        "bv": pa.array([b"a", None], pa.binary_view()),
        "ns": pa.array([[T0], None], pa.large_list(pa.timestamp("ns"))),
    })  # fmt: skip
    first, second = decode(ANY, table)
    assert first["iv"] == {"months": 1, "days": 2, "nanoseconds": 3} and first["fsl"] == [1, 2]
    assert (first["sv"], first["bv"], ms(first["ns"][0])) == ("a", b"a", T0 // 1_000_000)
    assert all(second[name] is None for name in ("iv", "fsl", "sv", "bv", "ns"))


def test_nan_and_infinities_are_kept_at_every_level() -> None:
    table = pa.table({
        "id": [1],
        "top": [NAN],
        "neg": [-INF],
        "items": pa.array([[NAN, INF]]),
        "inside": pa.array([{"v": NAN}]),
        "map": pa.array([[("k", NAN)]], pa.map_(pa.string(), pa.float64())),
    })  # fmt: skip
    (doc,) = decode(ANY, table)
    assert same_double(doc["top"], NAN) and doc["neg"] == -INF
    assert same_double(doc["items"][0], NAN) and doc["items"][1] == INF
    assert same_double(doc["inside"]["v"], NAN) and same_double(doc["map"]["k"], NAN)


def test_values_that_cannot_be_stored_reject_their_record_naming_column_and_reason() -> None:
    table = pa.table({
        "id": [1, 2, 3, 4],
        "m": pa.array([[("ok", 1)], [("$set", 2)], [("a.b", 3)], [("x\x00", 4)]],
                      pa.map_(pa.string(), pa.int64())),
        "big": pa.array([Decimal(1), Decimal(1), Decimal(1), Decimal("1" * 40)],
                        pa.decimal256(40, 0)),
    })  # fmt: skip
    out = validate(ANY, table)
    # nested names with '$' or '.' are stored by MongoDB 5.0+ (and nx-27017); NUL by none
    assert out.rows == [0, 1, 2]
    reasons = {r.row: r.reason for r in out.rejections}
    assert "m: map key 'x\\x00' holds a NUL character" in reasons[3]
    assert [r.key for r in out.rejections] == ["4"]
    only_big = validate(ANY, table.select(["id", "big"]))
    assert [r.row for r in only_big.rejections] == [3]
    assert "big: decimal" in only_big.rejections[0].reason
    assert "34 significant digits" in only_big.rejections[0].reason


def test_nx_27017_limits_reject_per_record_naming_the_server() -> None:
    table = pa.table({
        "id": [1, 2, 3, 4, 5, 6],
        "f": [1.0, NAN, 1.0, 1.0, 1.0, 1.0],
        "dec": pa.array([None, None, Decimal("1.5"), None, None, None], pa.decimal128(4, 2)),
        "u": pa.array([1, 1, 1, 2**64 - 1, 1, 1], pa.uint64()),
        "t": pa.array([0, 0, 0, 0, 253_402_300_800_000, 0], pa.timestamp("ms")),
        "l": pa.array([[1.0], [1.0], [1.0], [1.0], [1.0], [-INF]]),
    })  # fmt: skip
    out = validate(ANY, table, NX_27017)
    assert out.rows == [0]
    reasons = {r.row: r.reason for r in out.rejections}
    assert set(reasons) == {1, 2, 3, 4, 5}
    assert all("nx-27017" in why and "cannot store" in why for why in reasons.values())
    assert reasons[1].startswith("f: nan") and reasons[2].startswith("dec: decimal 1.50")
    assert reasons[3].startswith("u: uint64") and "years 1-9999" in reasons[4]
    assert reasons[5].startswith("l: -inf")
    keys = pa.table({"id": [True, False], "x": [1, 2]})
    refused = validate(ANY, keys, NX_27017)
    assert (
        not refused.rows and "cannot find documents by such an _id" in refused.rejections[0].reason
    )
    assert validate(ANY, keys, MONGODB).keys == [True, False]


def test_keys_are_what_the_server_answers() -> None:
    when = datetime(2024, 5, 1, 12, 0, 0, 123000, tzinfo=UTC)
    table = pa.table({"d": [date(2024, 5, 1)], "t": pa.array([when], pa.timestamp("us", tz="UTC")),
                      "dec": pa.array([Decimal("1.50")], pa.decimal128(5, 2))})  # fmt: skip
    assert validate(RecordSchema(key="d"), table).keys == [datetime(2024, 5, 1, tzinfo=UTC)]
    assert validate(RecordSchema(key="t"), table).keys == [when]
    (key,) = validate(RecordSchema(key="dec"), table).keys
    assert {key: 1}[lookup_key(Decimal128("1.50"))] == 1  # as the server's answer is looked up
    composite = validate(RecordSchema(key=["t", "d"]), table)
    assert list(composite.keys[0].items()) == [("t", when), ("d", datetime(2024, 5, 1, tzinfo=UTC))]
    assert list(bson.decode(composite.encoded()[0])["_id"]) == ["t", "d"]


def test_a_list_struct_or_map_key_is_refused_before_the_copy_naming_column_and_type() -> None:
    schema = pa.schema([("k", pa.list_(pa.string())), ("s", pa.struct([("a", pa.int8())]))])
    for key in ("k", ["s", "k"]):
        with pytest.raises(SourceError) as info:
            check_columns(RecordSchema(key=key), schema, "/lake")
        assert "key column" in str(info.value) and "cannot be a key" in str(info.value)
    with pytest.raises(SourceError, match="'k' of the lake at /lake is of type list<item: string>"):
        check_columns(RecordSchema(key="k"), schema, "/lake")


# -- copied twice through declared operations on the embedded server ---------------------------


def run_copy(rt: Runtime, operation: str) -> JobStatus:
    from lakesync.models import Outcome

    status, _ = rt.jobs.start(operation, {}, trusted=True)
    while rt.runner.run(status.jobId) is Outcome.CONTINUE:
        pass
    final: JobStatus = rt.store.get(status.jobId)
    return final


TOML = """
[operations.corpus]
source = "{lake}"
collection = "corpus"
key = "id"

[operations.by-day]
source = "{lake}"
collection = "byday"
key = "day"

[operations.composite]
source = "{lake}"
collection = "composite"
key = ["at", "id"]
"""


@pytest.fixture
def corpus_runtime(settings: Settings, tmp_path: Path) -> Any:
    table = write_corpus(tmp_path / "lake")
    path = tmp_path / "lakesync.toml"
    path.write_text(TOML.format(lake=tmp_path / "lake"))
    with Runtime(settings.model_copy(update={"operations_file": path})) as rt:
        yield rt, table


def expected(name: str, value: Any, kind: pa.DataType) -> Any:
    """What the BSON value of one pyarrow value must be (the README's type table)."""
    if value is None:
        return None
    if pa.types.is_timestamp(kind):
        return datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=value // {
            "ns": 1_000_000, "us": 1000, "ms": 1}[kind.unit])  # fmt: skip
    if pa.types.is_date(kind):
        return datetime(value.year, value.month, value.day, tzinfo=UTC)
    if pa.types.is_time(kind):
        return value.isoformat()
    if pa.types.is_duration(kind):
        return value // timedelta(milliseconds=1)
    if pa.types.is_map(kind) and pa.types.is_string(kind.key_type):
        return dict(value)
    if pa.types.is_map(kind):
        return [{"k": k, "v": v} for k, v in value]
    return value


def test_corpus_is_copied_exactly_then_found_unchanged(corpus_runtime: Any, db: Any) -> None:
    rt, table = corpus_runtime
    first = run_copy(rt, "corpus")
    assert first.status.value == "completed", first
    # rows 3, 4, 5: NaN, Decimal128, uint64 above int64: nx-27017 cannot store them
    assert (first.totalRecords, first.insertedRecords, first.errorRecords) == (7, 4, 3)
    errors = {e["row"]: e for e in db.copyerrors.find({"jobId": first.jobId})}
    assert {e["key"] for e in errors.values()} == {"3", "4", "5"}
    assert all("nx-27017" in e["reason"] for e in errors.values())
    reasons = sorted(e["reason"].split(":")[0] for e in errors.values())
    assert reasons == ["dec", "nan", "u64"]
    raw = {n: table.column(n).cast(pa.int64()).to_pylist() for n in ("at", "at_us", "time", "dur")}
    for i in range(3):
        doc = db.corpus.find_one({"_id": i})
        for name in table.column_names:
            kind = table.schema.field(name).type
            if name in raw and raw[name][i] is not None:
                value: Any = raw[name][i]
            else:
                value = table.column(name)[i].as_py()
            if name == "time" and value is not None:
                value = (datetime(2000, 1, 1) + timedelta(microseconds=value)).time()
            if name == "dur" and value is not None:
                value = timedelta(milliseconds=value)
            assert doc[name] == expected(name, value, kind), (i, name, doc[name])
    spark = db.corpus.find_one({"_id": 100})
    assert spark["at"] == datetime(9999, 12, 31, 3, tzinfo=UTC)  # int96 read in microseconds
    second = run_copy(rt, "corpus")
    assert (second.insertedRecords, second.updatedRecords, second.unchangedRecords) == (0, 0, 4)
    assert second.errorRecords == 3


def test_date_and_composite_keys_are_unchanged_on_the_second_copy(
    corpus_runtime: Any, db: Any
) -> None:
    rt, _ = corpus_runtime
    for name in ("by-day", "composite"):
        first = run_copy(rt, name)
        assert first.status.value == "completed", first
        second = run_copy(rt, name)
        assert second.status.value == "completed", second
        assert second.insertedRecords == second.updatedRecords == 0, second
        assert second.unchangedRecords == first.insertedRecords > 0
    doc = db.byday.find_one({"_id": datetime(2024, 1, 2, tzinfo=UTC)})
    assert doc is not None and doc["id"] == 1
    composite = db.composite.find_one({"_id.id": 1})
    assert list(composite["_id"]) == ["at", "id"]
    assert composite["_id"]["at"] == datetime(2023, 11, 14, 22, 13, 21, 123000, tzinfo=UTC)


def test_json_array_file_reads_like_ndjson(settings: Settings, tmp_path: Path, db: Any) -> None:
    lake = tmp_path / "json"
    lake.mkdir()
    rows = [{"id": i, "name": f"n{i}", "tags": ["a", "b"][: i % 3]} for i in range(50)]
    (lake / "rows.json").write_text(json.dumps(rows, indent=2))
    path = tmp_path / "lakesync.toml"
    path.write_text(f'[operations.j]\nsource = "{lake}"\ncollection = "j"\nkey = "id"\n')
    with Runtime(settings.model_copy(update={"operations_file": path})) as rt:
        done = run_copy(rt, "j")
        assert done.status.value == "completed", done
        assert done.insertedRecords == 50
    doc = db.j.find_one({"_id": 7}, {"_lakesync": 0})
    assert doc == {"_id": 7, "id": 7, "name": "n7", "tags": ["a"]}


def test_a_json_array_that_is_not_of_objects_is_refused_naming_the_element(
    tmp_path: Path,
) -> None:
    from lakesync.lake import Lake

    path = tmp_path / "bad.json"
    path.write_text('[{"id": 1},\n 2]')
    with pytest.raises(SourceError, match="element 2 is 2, not an object"):
        Lake.open(str(path))
    path.write_text('[{"id": 1}, {"id": ')
    with pytest.raises(SourceError, match=r"bad\.json holds a JSON array that cannot be read"):
        Lake.open(str(path))


# -- Delta tables as Spark and Databricks write them (../shared/fixtures) ----------------------


def _fixtures() -> Path:
    """The shared fixtures beside the clone (or beside the main checkout of a worktree)."""
    root = Path(__file__).resolve().parent.parent
    candidates = [root.parent / "shared" / "fixtures"]
    git = root / ".git"
    if git.is_file():  # a worktree: .git names the main repository's .git/worktrees/<name>
        common = Path(git.read_text().split("gitdir:", 1)[1].strip()).parent.parent
        candidates.append(common.parent.parent / "shared" / "fixtures")
    for path in candidates:
        if (path / "delta").is_dir():
            return path / "delta"
    pytest.skip(f"the shared fixtures are not beside the clone ({candidates[0]})")


SPARK_TOML = """
[operations.dv]
source = "{fixtures}/table_with_deletion_logs"
collection = "dv"
key = "id"
batchSize = 15

[operations.mapped]
source = "{fixtures}/table_with_partitioning_mapping"
collection = "mapped"
key = "newid"
batchSize = 1
"""


def live_rows(table: Path) -> list[dict[str, Any]]:
    from deltalake import DeltaTable, QueryBuilder

    reader = QueryBuilder().register("t", DeltaTable(str(table))).execute("select * from t")
    return pa.table(reader.read_all()).to_pylist()


def test_spark_delta_tables_copy_their_live_rows_and_resume_mid_table(
    settings: Settings, tmp_path: Path, db: Any
) -> None:
    from lakesync.models import Outcome

    fixtures = _fixtures()
    path = tmp_path / "lakesync.toml"
    path.write_text(SPARK_TOML.format(fixtures=fixtures))
    with Runtime(settings.model_copy(update={"operations_file": path})) as rt:
        tables = (("dv", "table_with_deletion_logs", "id"),
                  ("mapped", "table_with_partitioning_mapping", "newid"))  # fmt: skip
        for name, table, key in tables:
            expected_rows = {r[key]: r for r in live_rows(fixtures / table)}
            assert len(expected_rows) == {"dv": 98, "mapped": 2}[name]  # the fixtures' README
            status, _ = rt.jobs.start(name, {}, trusted=True)
            stops = 0

            def stop_after_a_batch(s: JobStatus) -> None:
                if 0 < s.processedRecords < s.totalRecords:
                    rt.runner.stop.set()

            while True:  # interrupted after each batch, resumed from its checkpoint
                outcome = rt.runner.run(status.jobId, on_progress=stop_after_a_batch)
                if outcome is not Outcome.CONTINUE:
                    break
                stops += 1
                rt.runner.stop.clear()
            done = rt.store.get(status.jobId)
            assert done.status.value == "completed", done
            assert stops >= 1
            n = len(expected_rows)
            assert (done.totalRecords, done.processedRecords, done.insertedRecords) == (n, n, n)
            docs = {d["_id"]: d for d in db[name].find({}, {"_lakesync": 0})}
            assert docs == {k: {"_id": k, **r} for k, r in expected_rows.items()}
            again = run_copy(rt, name)
            assert (again.unchangedRecords, again.insertedRecords, again.updatedRecords) == (
                n,
                0,
                0,
            )


def test_composite_key_config_errors_and_mirror_refusal(tmp_path: Path) -> None:
    from lakesync.errors import ConfigError, RequestError
    from lakesync.operations import JobOptions, load_operations

    path = tmp_path / "lakesync.toml"
    for key, problem in (
        ('["a", "a"]', "a list of distinct columns"),
        ("[]", "key"),
        ('["a", "b"]\nmode = "mirror"', "mode mirror needs a single key"),
    ):
        path.write_text(f'[operations.p]\ncollection = "p"\nkey = {key}\n')
        with pytest.raises(ConfigError, match=re.escape(problem)):
            load_operations(path)
    path.write_text('[operations.p]\ncollection = "p"\nkey = ["a", "b"]\n')
    (op,) = load_operations(path)
    assert op.schema_.key == ["a", "b"] and op.schema_.key_columns == ["a", "b"]
    with pytest.raises(RequestError, match="composite key, and mirror mode needs"):
        op.check_options(JobOptions(mode="mirror"))


def test_cli_copy_of_a_declared_operation_with_a_composite_key_needs_no_demo_lake(
    settings: Settings, tmp_path: Path, db: Any
) -> None:
    import os

    lake = tmp_path / "weather"
    lake.mkdir()
    hours = pa.array([datetime(2013, 1, 1, 5), datetime(2013, 1, 1, 6), datetime(2013, 1, 1, 5)],
                     pa.timestamp("us", tz="America/New_York"))  # fmt: skip
    pq.write_table(pa.table({"origin": ["JFK", "JFK", "LGA"], "time_hour": hours,
                             "temp": [39.02, 39.9, 40.0]}), lake / "w.parquet")  # fmt: skip
    (tmp_path / "lakesync.toml").write_text(
        f'[operations.weather]\nsource = "{lake}"\ncollection = "weather"\n'
        'key = ["origin", "time_hour"]\n'
    )
    assert settings.mongodb_uri is not None
    env = {k: v for k, v in os.environ.items() if not k.startswith("LAKESYNC_")}
    env.update(LAKESYNC_MONGODB_URI=settings.mongodb_uri.get_secret_value(),
               LAKESYNC_DATABASE=settings.database, LAKESYNC_DATA_DIR=str(tmp_path / "data"),
               LAKESYNC_OPERATIONS_FILE=str(tmp_path / "lakesync.toml"))  # fmt: skip
    runs = []
    for _ in range(2):
        done = lakesync(env, "copy", "weather", "--json")
        assert done.returncode == 0, done.stderr[-2000:]
        runs.append(json.loads(done.stdout))
    assert (runs[0]["insertedRecords"], runs[1]["unchangedRecords"]) == (3, 3)
    assert not (tmp_path / "data" / "demo-lake").exists()  # only copy-taskdetail needs it
    doc = db.weather.find_one(
        {"_id.origin": "JFK", "_id.time_hour": datetime(2013, 1, 1, 6, tzinfo=UTC)}
    )
    assert list(doc["_id"]) == ["origin", "time_hour"] and doc["temp"] == 39.9


def test_a_changed_record_with_a_composite_key_is_updated_in_place(
    settings: Settings, tmp_path: Path, db: Any
) -> None:
    lake = tmp_path / "flights"
    lake.mkdir()
    day = pa.array([date(2013, 1, 1)] * 3)

    def write(delays: list[int]) -> None:
        pq.write_table(pa.table({"origin": ["JFK", "LGA", "EWR"], "day": day, "delay": delays}),
                       lake / "f.parquet")  # fmt: skip

    write([1, 2, 3])
    path = tmp_path / "lakesync.toml"
    path.write_text(
        f'[operations.f]\nsource = "{lake}"\ncollection = "f"\nkey = ["origin", "day"]\n'
    )
    with Runtime(settings.model_copy(update={"operations_file": path})) as rt:
        assert run_copy(rt, "f").insertedRecords == 3
        write([1, 20, 3])
        again = run_copy(rt, "f")
    assert (again.updatedRecords, again.unchangedRecords, again.insertedRecords) == (1, 2, 0)
    assert db.f.count_documents({}) == 3
    assert db.f.find_one({"_id.origin": "LGA"})["delay"] == 20


#: BSON element type bytes, by the names `lakesync inspect` uses
_BSON_NAMES = {1: "double", 2: "string", 3: "object", 4: "array", 5: "binData", 8: "bool",
               9: "date", 10: "null", 16: "int", 18: "long", 19: "decimal"}  # fmt: skip
_FIXED = {1: 8, 8: 1, 9: 8, 10: 0, 16: 4, 18: 8, 19: 16}


def _element_types(body: bytes) -> dict[str, tuple[str, list[str]]]:
    """Each top-level field's BSON type name and, for an array, its items' type names."""
    out: dict[str, tuple[str, list[str]]] = {}
    i = 4
    while body[i] != 0:
        kind, end = body[i], body.index(b"\x00", i + 1)
        name, i = body[i + 1 : end].decode(), end + 1
        size = _FIXED.get(kind)
        if size is None:  # string, binData: length-prefixed; object, array: sized
            n = int.from_bytes(body[i : i + 4], "little", signed=True)
            size = {2: 4 + n, 5: 5 + n}.get(kind, n)
        items = list(_element_types(body[i : i + size]).values()) if kind == 4 else []
        out[name] = (_BSON_NAMES[kind], [t for t, _ in items])
        i += size
    return out


def test_the_bson_type_names_inspect_shows_are_the_types_written() -> None:
    """`lakesync inspect` names each column's BSON type from the converter's own rule:
    every value written has one of the types its column's name lists."""
    from lakesync.typemap import bson_type_name

    table = pa.table({
        "id": pa.array([1, 2**40], pa.int64()),
        "i32": pa.array([1, -(2**31)], pa.int32()),
        "u32": pa.array([1, 2**32 - 1], pa.uint32()),
        "u64": pa.array([3, 2**64 - 1], pa.uint64()),
        "dur": pa.array([5, 2**40], pa.duration("ms")),
        "f": pa.array([1.0, 2.5], pa.float32()),
        "ts": pa.array([0, 1], pa.timestamp("us", tz="UTC")),
        "t": pa.array([0, 1], pa.time32("s")),
        "b": pa.array([True, False]),
        "bin": pa.array([b"x", b""]),
        "dec": pa.array([Decimal("1.5"), Decimal("2")], pa.decimal128(5, 2)),
        "s": pa.array(["a", "b"]).dictionary_encode(),
        "li": pa.array([[1, 2**40], []], pa.list_(pa.int64())),
        "st": pa.array([{"a": 1}, {"a": 2}], pa.struct([("a", pa.int8())])),
        "smap": pa.array([[("a", 1)], []], pa.map_(pa.string(), pa.int64())),
        "imap": pa.array([[(1, "a")], []], pa.map_(pa.int32(), pa.string())),
    })  # fmt: skip
    out = validate(ANY, table, MONGODB)
    assert not out.rejections, out.rejections
    written = [_element_types(b) for b in out.encoded()]
    for field in table.schema:
        name = bson_type_name(field.type)
        allowed = set(re.findall(r"int|long|double|string|object|binData|bool|date|decimal", name))
        for doc in written:
            kind, items = doc[field.name]
            if name.startswith("array of {k, v}"):
                assert kind == "array" and set(items) <= {"object"}, (field.name, doc)
            elif name.startswith("array of "):
                assert kind == "array" and set(items) <= allowed, (field.name, name, items)
            else:
                assert kind in allowed, (field.name, name, kind)
