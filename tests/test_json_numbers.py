"""Every integer written in an NDJSON or JSON-array file keeps its exact value, in every
column: Arrow's reader made a column holding an integer beyond int64, or integers beside
fractions, a column of doubles (5 became 5.0, 9007199254740993 became 9007199254740992.0,
12345678901234567890123 became 1.2345678901234568e+22), with nothing rejected. Python's
``json`` module is the oracle; a file of plain floats stays on Arrow's fast path."""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from bson import Decimal128
from tests.test_csv import _copy, _toml

from lakesync.config import Settings
from lakesync.operations import OperationRegistry
from lakesync.preview import preview
from lakesync.schema import RecordSchema, validate
from lakesync.sources import jsonruns
from lakesync.sources.lake import Lake
from lakesync.sources.text import CsvOptions
from lakesync.typemap import MONGODB, NX_27017, server_limits

LINES = [
    '{"id": 1, "n": 12345678901234567890123}',
    '{"id": 2, "n": 5}',
    '{"id": 3, "n": 9223372036854775808}',
    '{"id": 4, "m": 9007199254740993, "f": 1}',
    '{"id": 5, "m": 2.5}',
    '{"id": 6, "n": -9223372036854775808, "m": 7}',
    '{"id": 7, "n": 2.0, "m": 1e3}',
    '{"id": 8, "n": 1234567890123456789012345678901234567}',  # 37 digits: no Decimal128
    '{"id": 9, "n": ' + "9" * 80 + "}",  # more than a decimal holds
]


def _write(lake: Path, form: str) -> None:
    """The lines as an NDJSON file, a JSON array (as Python's json writes it), gzip or
    zstd (``.zst``: read under another name, see ``text._CodecAliases``)."""
    lake.mkdir()
    if form == "ndjson":
        (lake / "a.ndjson").write_text("\n".join(LINES) + "\n")
    elif form == "json":
        records = [json.loads(line) for line in LINES]
        (lake / "a.json").write_text(json.dumps(records, indent=1))
    elif form == "gz":
        (lake / "a.ndjson.gz").write_bytes(gzip.compress(("\n".join(LINES) + "\n").encode()))
    else:
        with pa.CompressedOutputStream(str(lake / "a.ndjson.zst"), "zstd") as out:
            out.write(("\n".join(LINES) + "\n").encode())


def _written() -> Iterator[dict[str, Any]]:
    return (json.loads(line) for line in LINES)


def _fits_decimal128(value: int) -> bool:
    return len(str(abs(value)).rstrip("0")) <= 34


def _same(a: Any, b: Any) -> bool:
    """Equal, and of the same kind (5 is not 5.0; BSON's Int64 is an int)."""
    kinds = (bool, int, float, str, type(None))
    return (
        next(k for k in kinds if isinstance(a, k)) is next(k for k in kinds if isinstance(b, k))
        and a == b
    )


@pytest.mark.parametrize("form", ["ndjson", "json", "gz", "zst"])
def test_every_integer_is_copied_as_written(
    settings: Settings, db: Any, tmp_path: Path, form: str
) -> None:
    lake = tmp_path / "big"
    _write(lake, form)
    done = _copy(settings, tmp_path, _toml("big", lake, format="json"), "big")
    limits = server_limits(db["big"])
    docs = {d["_id"]: d for d in db["big"].find()}
    reasons = {e["key"]: e["reason"] for e in db.copyerrors.find({"jobId": done.jobId})}
    for record in _written():
        key = record["id"]
        big = [v for v in record.values() if isinstance(v, int) and not -(2**63) <= v < 2**63]
        if any(len(str(abs(v))) > 76 for v in big):
            assert "the integer has 80 digits" in reasons[str(key)], reasons
            continue
        if big and not limits.decimal128:  # nx-27017: no Decimal128, rejected saying so
            assert f"{big[0]} needs Decimal128" in reasons[str(key)], reasons
            continue
        if big and not all(_fits_decimal128(v) for v in big):
            assert "does not fit Decimal128" in reasons[str(key)], reasons
            continue
        assert key in docs and str(key) not in reasons, (key, reasons)
        for name in ("n", "m", "f"):
            want = record.get(name)
            got = docs[key].get(name)
            if isinstance(want, int) and want in big:
                assert got == Decimal128(str(want)), (key, name, got)
            else:
                assert _same(got, want), (key, name, got, want)
    assert docs[2]["n"] == 5 and isinstance(docs[2]["n"], int)
    assert docs[4]["m"] == 9007199254740993 and docs[5]["m"] == 2.5
    again = _copy(settings, tmp_path, _toml("big", lake, format="json"), "big")
    assert again.unchangedRecords == done.insertedRecords, again


def test_as_a_mongodb_server_gets_them_big_integers_are_decimal128(tmp_path: Path) -> None:
    """On MongoDB (no nx-27017 limits): beyond int64 an exact Decimal128, up to 34
    significant digits; the integers beside them stay integers, the fractions doubles."""
    lake = tmp_path / "big"
    _write(lake, "ndjson")
    opened = Lake.open(str(lake), csv=CsvOptions(text=frozenset({"id"}), keys=("id",)))
    docs, rejected = {}, {}
    for batch in opened.batches(100):
        out = validate(RecordSchema(key="id"), batch.table, MONGODB, refused=batch.refused)
        docs |= {d["_id"]: d for d in out.documents}
        rejected |= {r.key: r.reason for r in out.rejections}
    assert docs[1]["n"] == Decimal128("12345678901234567890123")
    assert docs[3]["n"] == Decimal128("9223372036854775808")
    assert _same(docs[6]["n"], -(2**63)) and _same(docs[6]["m"], 7)
    assert _same(docs[2]["n"], 5) and _same(docs[4]["m"], 9007199254740993)
    assert _same(docs[5]["m"], 2.5) and _same(docs[7]["n"], 2.0) and _same(docs[7]["m"], 1000.0)
    assert set(rejected) == {"8", "9"}, rejected
    assert "does not fit Decimal128 (34 significant digits)" in rejected["8"]
    assert "the integer has 80 digits" in rejected["9"]


def test_a_declared_type_still_wins(settings: Settings, db: Any, tmp_path: Path) -> None:
    """Declared float: the integers are doubles; declared int: 9007199254740993 exactly (it
    was 9007199254740992 read through a double); declared string: the integer's digits."""
    lake = tmp_path / "typed"
    lake.mkdir()
    (lake / "a.ndjson").write_text(
        '{"id": 1, "f": 5, "i": 9007199254740993, "s": 12345678901234567890123}\n'
        '{"id": 2, "f": 2.5, "i": 2.0, "s": 2.5}\n'
    )
    fields = {"f": "float", "i": "int", "s": "string"}
    done = _copy(settings, tmp_path, _toml("typed", lake, fields, format="json"), "typed")
    assert done.errorRecords == 0, done
    docs = {d["_id"]: d for d in db["typed"].find()}
    assert _same(docs[1]["f"], 5.0) and _same(docs[2]["f"], 2.5)
    assert _same(docs[1]["i"], 9007199254740993) and _same(docs[2]["i"], 2)
    assert docs[1]["s"] == "12345678901234567890123" and docs[2]["s"] == "2.5"


def test_inspect_shows_the_exact_values(settings: Settings, tmp_path: Path) -> None:
    lake = tmp_path / "big"
    _write(lake, "ndjson")
    config = tmp_path / "lakesync.toml"
    config.write_text(_toml("big", lake, format="json"))
    s = settings.model_copy(update={"operations_file": config})
    p = preview(s, OperationRegistry.from_settings(s), "big", limits=MONGODB, trusted=True)
    docs = {d["_id"]: d for d in p["documents"]}
    assert docs[1]["n"] == {"$numberDecimal": "12345678901234567890123"}
    assert docs[2]["n"] == 5 and docs[4]["m"] == 9007199254740993 and docs[5]["m"] == 2.5
    types = {f["name"]: f["bsonType"] for f in p["schema"]}
    assert types["n"] == types["m"] == "int or long, double or decimal, as each value is written"
    p = preview(s, OperationRegistry.from_settings(s), "big", limits=NX_27017, trusted=True)
    assert {r["key"] for r in p["rejections"]} == {"1", "3", "8", "9"}  # no Decimal128
    assert {d["_id"]: d["m"] for d in p["documents"]}[4] == 9007199254740993


def test_a_file_of_floats_is_read_by_arrow_alone(
    settings: Settings, db: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whole floats written with a fraction or an exponent (2.0, 1e3), integers in integer
    columns, and integer-looking text in strings: no integer is written in a double column,
    so the file never reaches the exact reader."""
    lake = tmp_path / "floats"
    lake.mkdir()
    rows = [
        {"id": i, "x": i / 4, "y": float(i), "z": 1e300 if i % 2 else -2.5e-3, "note": '"x": 5,'}
        for i in range(3000)
    ]
    (lake / "a.ndjson").write_text("".join(json.dumps(r) + "\n" for r in rows))

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the exact reader was used")

    monkeypatch.setattr(jsonruns, "batches", refuse)
    done = _copy(settings, tmp_path, _toml("floats", lake, format="json"), "floats")
    assert done.insertedRecords == 3000, done
    docs = {d["_id"]: d for d in db["floats"].find()}
    assert all(_same(docs[r["id"]]["y"], r["y"]) and docs[r["id"]]["x"] == r["x"] for r in rows)
    # one integer in a double column, in the file's last line: the exact reader is used
    with (lake / "a.ndjson").open("a") as f:
        f.write('{"id": 3000, "x": 3, "y": 1.5, "z": 0.5, "note": ""}\n')
    with pytest.raises(AssertionError, match="the exact reader was used"):
        list(Lake.open(str(lake), csv=CsvOptions(keys=("id",))).batches(5000))


def test_an_integer_beyond_a_decimal_is_refused_by_its_reader() -> None:
    from lakesync.sources.jsonnumbers import exact_column

    column, refused = exact_column("n", [1, 10**80, 2.5, None])
    assert column is not None and column.to_pylist() == [1, None, 2.5, None]
    assert refused == {1: "n: the integer has 81 digits; lakesync stores at most 34 "
                       "significant ones (Decimal128)"}  # fmt: skip
    assert exact_column("n", [1.5, None])[0] is None
    assert exact_column("n", [10**20, None])[0].to_pylist() == [Decimal(10**20), None]


def test_a_filtered_read_compares_a_column_mixing_integers_and_fractions(tmp_path: Path) -> None:
    """An incremental copy's filter on an integer column whose later records hold a
    fraction and an integer beyond int64 (read as a union, which no Arrow comparison
    takes: compared as doubles, as Arrow's reader read it) keeps the rows at or above it,
    with their values as written."""
    import pyarrow.compute as pc

    lake = tmp_path / "wm"
    lake.mkdir()
    lines = [json.dumps({"id": i, "v": i}) for i in range(60000)]  # past Arrow's first block
    lines += ['{"id": 60000, "v": 60000.5}', '{"id": 60001, "v": 60001}']
    lines += ['{"id": 60002, "v": 18446744073709551616}']
    (lake / "a.ndjson").write_text("\n".join(lines) + "\n")
    opened = Lake.open(str(lake), csv=CsvOptions(text=frozenset({"id"}), keys=("id",)))
    rows = [
        r for b in opened.batches(1000, filter=pc.field("v") >= 59999) for r in b.table.to_pylist()
    ]
    assert [(r["id"], r["v"]) for r in rows] == [
        (59999, 59999), (60000, 60000.5), (60001, 60001), (60002, Decimal(2**64))
    ]  # fmt: skip
    assert [type(r["v"]) for r in rows] == [int, float, int, Decimal]


def test_a_file_arrow_cannot_type_and_a_file_of_doubles_make_one_lake(tmp_path: Path) -> None:
    """A file whose keys mix numbers and strings (its schema read as written) and whose
    ``v`` mixes integers and fractions, beside a file whose ``v`` holds doubles: the lake's
    schema has ``v`` as Arrow types it (a double) in both, and each value is as written."""
    lake = tmp_path / "two"
    lake.mkdir()
    (lake / "a.ndjson").write_text('{"id": 1, "v": 1}\n{"id": 2, "v": 2.5}\n{"id": "c", "v": 3}\n')
    (lake / "b.ndjson").write_text('{"id": 4, "v": 4.5}\n')
    opened = Lake.open(str(lake), csv=CsvOptions(text=frozenset({"id"}), keys=("id",)))
    assert str(opened.schema.field("v").type) == "double"
    rows = [r for b in opened.batches(10) for r in b.table.to_pylist()]
    assert [(r["id"], r["v"], type(r["v"])) for r in rows] == [
        (1, 1, int), (2, 2.5, float), ("c", 3, int), (4, 4.5, float)
    ]  # fmt: skip


def test_a_union_of_numbers_is_written_value_by_value() -> None:
    """The typemap rule of a column mixing integers, fractions and integers beyond int64:
    each value as its own BSON type; on nx-27017 the Decimal128 rejects its record."""
    import bson
    import pyarrow as pa

    from lakesync.sources.jsonnumbers import MIXED, exact_column
    from lakesync.typemap import bson_type_name

    column, _ = exact_column("v", [1, 2.5, 2**64, None, -(2**63), 2**31])
    assert column is not None and column.type == MIXED
    assert bson_type_name(MIXED) == "int or long, double or decimal, as each value is written"
    table = pa.table({"id": list(range(6)), "v": column})
    out = validate(RecordSchema(key="id"), table, MONGODB)
    got = [bson.decode(b)["v"] for b in out.encoded()]
    assert got == [1, 2.5, Decimal128(str(2**64)), None, -(2**63), 2**31]
    assert [type(v) for v in got] == [int, float, Decimal128, type(None), bson.Int64, bson.Int64]
    on_nx = validate(RecordSchema(key="id"), table, NX_27017)
    assert [(r.row, r.reason) for r in on_nx.rejections] == [
        (2, "v: decimal 18446744073709551616 needs Decimal128, which the server (nx-27017, "
         "the embedded server) cannot store")
    ]  # fmt: skip


def test_a_column_declared_float_is_read_by_arrow_alone(
    settings: Settings, db: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Validation makes a declared float's integers doubles: its integers (as JavaScript
    writes 2.0) do not send the file to the exact reader, as TaskDetail's hoursLogged."""
    lake = tmp_path / "floats"
    lake.mkdir()
    (lake / "a.ndjson").write_text('{"id": 1, "x": 5}\n{"id": 2, "x": 2.5}\n')

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the exact reader was used")

    monkeypatch.setattr(jsonruns, "batches", refuse)
    toml = _toml("floats", lake, {"x": "float"}, format="json")
    done = _copy(settings, tmp_path, toml, "floats")
    assert done.insertedRecords == 2, done
    docs = {d["_id"]: d["x"] for d in db["floats"].find()}
    assert _same(docs[1], 5.0) and _same(docs[2], 2.5)
