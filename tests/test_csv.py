"""CSV as written: declared types are read types, null and "" differ, encoding, delimiter
and header per operation, undecodable text rejected per record, large cells. DuckDB's
`read_csv` (declared types, ``allow_quoted_nulls=false``) is the oracle."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import duckdb
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pytest
from tests.test_partitions import reversed_with_a_failure_resumed

from lakesync.config import Settings
from lakesync.errors import ConfigError
from lakesync.locations import Location
from lakesync.models import JobState, JobStatus
from lakesync.operations import load_operations
from lakesync.runtime import Runtime
from lakesync.sources import text, widecsv
from lakesync.sources.text import CsvOptions


def _toml(name: str, lake: Path, fields: dict[str, str] | None = None, **extra: Any) -> str:
    text = f'[operations.{name}]\nsource = "{lake}"\ncollection = "{name}"\nkey = "id"\n'
    text += "".join(f"{k} = {json.dumps(v)}\n" for k, v in extra.items())
    if fields:
        text += f"[operations.{name}.schema.fields]\n"
        text += "".join(f'{k} = {{type = "{t}"}}\n' for k, t in fields.items())
    return text


def _copy(settings: Settings, tmp_path: Path, toml: str, name: str) -> JobStatus:
    config = tmp_path / f"{name}.toml"
    config.write_text(toml)
    with Runtime(settings.model_copy(update={"operations_file": config})) as rt:
        status, _ = rt.jobs.start(name)
        rt.runner.run(status.jobId)
        done = rt.jobs.get(status.jobId)
    assert done.status == JobState.COMPLETED, (done.message, done.error)
    counted = done.insertedRecords + done.updatedRecords + done.unchangedRecords
    assert counted + done.duplicateRecords + done.errorRecords == done.totalRecords
    return done


def _oracle(files: list[Path], types: dict[str, str], **options: Any) -> dict[Any, dict[str, Any]]:
    """The records DuckDB reads, by key (the last of a key wins, as in lakesync)."""
    args = ", ".join(f"{k} = {v!r}" for k, v in options.items())
    query = (
        f"SELECT * FROM read_csv({[str(f) for f in files]!r}, columns = {types!r}, "
        f"allow_quoted_nulls = false{', ' + args if args else ''})"
    )
    relation = duckdb.sql(query)
    rows = [dict(zip(relation.columns, r, strict=True)) for r in relation.fetchall()]
    return {r["id"]: r for r in rows}


def _collection(db: Any, name: str) -> dict[Any, dict[str, Any]]:
    out = {}
    for doc in db[name].find():
        doc.pop("_id")
        out[doc["id"]] = {k: v for k, v in doc.items() if not k.startswith("_")}
    return out


def test_declared_strings_stay_as_written_and_null_is_not_empty(
    settings: Settings, db: Any, tmp_path: Path
) -> None:
    lake = tmp_path / "zips"
    lake.mkdir()
    # by hand: keys that a number type would merge, zero-padded zips, null and ""
    (lake / "a.csv").write_text(
        'id,zip,note,n\n007,00001,"",1\n7,02134,,2\n"0x1",01,"a, ""quoted""\nline",3\n'
    )
    # written by DuckDB (it quotes only where needed)
    duckdb.sql(
        "COPY (SELECT * FROM (VALUES ('8', '00000', NULL, 4), ('9', '9', '', 5)) "
        f"t(id, zip, note, n)) TO '{lake / 'b.csv'}' (HEADER, DELIMITER ',')"
    )
    types = {"id": "string", "zip": "string", "note": "string", "n": "int"}
    done = _copy(settings, tmp_path, _toml("zips", lake, types), "zips")
    assert (done.insertedRecords, done.errorRecords) == (5, 0), done
    oracle = _oracle(
        sorted(lake.glob("*.csv")),
        {"id": "VARCHAR", "zip": "VARCHAR", "note": "VARCHAR", "n": "BIGINT"},
    )
    assert _collection(db, "zips") == oracle
    assert oracle["007"]["note"] == "" and oracle["7"]["note"] is None  # what is compared
    assert oracle["0x1"]["note"] == 'a, "quoted"\nline'
    again = _copy(settings, tmp_path, _toml("zips", lake, types), "zips")
    assert (again.insertedRecords, again.updatedRecords, again.unchangedRecords) == (0, 0, 5)


def test_an_undeclared_key_has_one_type_in_every_file(
    settings: Settings, db: Any, tmp_path: Path
) -> None:
    lake = tmp_path / "keys"
    lake.mkdir()
    (lake / "a.csv").write_text("id,v\n1,a\n")
    (lake / "b.csv").write_text("id,v\n1,c\nx,d\n")
    done = _copy(settings, tmp_path, _toml("keys", lake), "keys")
    assert done.duplicateRecords == 1 and done.insertedRecords == 2, done
    assert {d["_id"]: d["v"] for d in db["keys"].find()} == {"1": "c", "x": "d"}


def test_a_pandas_index_column_is_named_as_duckdb_names_it(
    settings: Settings, db: Any, tmp_path: Path
) -> None:
    lake = tmp_path / "frame"
    lake.mkdir()
    (lake / "df.csv").write_text(",id,v\n0,a,1.5\n1,b,2.5\n")  # DataFrame.to_csv()
    _copy(settings, tmp_path, _toml("frame", lake), "frame")
    docs = {d["_id"]: d for d in db["frame"].find()}
    assert "" not in docs["a"] and docs["a"]["column0"] == 0 and docs["b"]["v"] == 2.5
    assert duckdb.sql(f"SELECT * FROM read_csv('{lake / 'df.csv'}')").columns[0] == "column0"


def test_latin1_text_is_rejected_as_utf8_and_read_right_when_declared(
    settings: Settings, db: Any, tmp_path: Path
) -> None:
    lake = tmp_path / "latin"
    lake.mkdir()
    (lake / "a.csv").write_bytes("id,name\n1,plain\n2,café\n3,Zoë\n".encode("latin-1"))
    done = _copy(settings, tmp_path, _toml("latin", lake), "latin")
    assert (done.insertedRecords, done.errorRecords) == (1, 2), done
    errors = list(db.copyerrors.find({"jobId": done.jobId}).sort("row"))
    assert [e["row"] for e in errors] == [1, 2]
    assert "not valid utf-8" in errors[0]["reason"] and "latin-1" in errors[0]["reason"]
    assert db["latin"].find_one({"_id": "1"})["name"] == "plain"  # text, never binary
    done = _copy(settings, tmp_path, _toml("latin", lake, encoding="latin-1"), "latin")
    assert (done.insertedRecords, done.errorRecords) == (2, 0), done
    assert {d["_id"]: d["name"] for d in db["latin"].find()} == {
        "1": "plain",
        "2": "café",
        "3": "Zoë",
    }


def test_delimiter_and_no_header(settings: Settings, db: Any, tmp_path: Path) -> None:
    lake = tmp_path / "semi"
    lake.mkdir()
    (lake / "a.csv").write_text("Ann;001;7\nBob;002;8\n")
    fields = {"name": "string", "id": "string"}  # the columns in the file's order
    toml = _toml("semi", lake, fields, delimiter=";", header=False)
    _copy(settings, tmp_path, toml, "semi")
    docs = {d["_id"]: d for d in db["semi"].find()}
    oracle = _oracle([lake / "a.csv"], {"name": "VARCHAR", "id": "VARCHAR", "f2": "BIGINT"},
                     delim=";", header=False)  # fmt: skip
    assert docs.keys() == oracle.keys() == {"001", "002"}
    assert docs["002"]["name"] == "Bob" and "f2" not in docs["002"]  # not declared: not kept
    toml = _toml("semi2", lake, delimiter=";", header=False).replace('key = "id"', 'key = "f1"')
    _copy(settings, tmp_path, toml, "semi2")
    doc = db["semi2"].find_one({"_id": "001"})
    assert (doc["f0"], doc["f1"], doc["f2"]) == ("Ann", "001", 7), doc


def test_a_cell_of_two_megabytes_is_copied(settings: Settings, db: Any, tmp_path: Path) -> None:
    lake = tmp_path / "big"
    lake.mkdir()
    big = "x" * (2 << 20)
    (lake / "a.csv").write_text(f'id,text\na,"{big}"\nb,small\n')
    done = _copy(settings, tmp_path, _toml("big", lake), "big")
    assert done.insertedRecords == 2, done
    assert db["big"].find_one({"_id": "a"})["text"] == big


@pytest.mark.parametrize(
    ("extra", "problem"),
    [
        ({"encoding": "klingon"}, "encoding 'klingon' is not an encoding"),
        ({"delimiter": ";;"}, "delimiter ';;' must be one character"),
        ({"delimiter": '"'}, "must be one character other than a quote"),
        ({"header": "yes"}, "header: input should be a valid boolean"),
        ({"encoding": "latin-1", "format": "parquet"}, "encoding only apply to CSV files"),
    ],
)
def test_csv_settings_are_checked_at_load(
    tmp_path: Path, extra: dict[str, Any], problem: str
) -> None:
    config = tmp_path / "lakesync.toml"
    config.write_text(_toml("ops", tmp_path, **extra))
    with pytest.raises(ConfigError) as e:
        load_operations(config)
    assert str(config) in str(e.value) and "'ops'" in str(e.value)
    assert problem in str(e.value)


def test_a_declared_number_that_is_not_one_rejects_its_record_not_the_file(
    settings: Settings, db: Any, tmp_path: Path
) -> None:
    lake = tmp_path / "nums"
    lake.mkdir()
    rows = [f"r{i},{i}" for i in range(3000)]
    rows[2500] = "bad,x"
    rows[2600] = "pandas,7.0"  # an int column with a NaN, as pandas writes it
    (lake / "a.csv").write_text("id,n\n" + "\n".join(rows) + "\n")
    done = _copy(settings, tmp_path, _toml("nums", lake, {"n": "int"}), "nums")
    assert (done.insertedRecords, done.errorRecords) == (2999, 1), done
    error = db.copyerrors.find_one({"jobId": done.jobId})
    assert error["row"] == 2500 and "n must be an integer" in error["reason"], error
    assert db["nums"].find_one({"_id": "pandas"})["n"] == 7


def test_a_header_the_encoding_cannot_decode_fails_the_job_saying_how_to_fix_it(
    settings: Settings, tmp_path: Path
) -> None:
    lake = tmp_path / "latinhead"
    lake.mkdir()
    (lake / "a.csv").write_bytes("id,café\n1,x\n".encode("latin-1"))
    config = tmp_path / "latinhead.toml"
    config.write_text(_toml("latinhead", lake))
    with Runtime(settings.model_copy(update={"operations_file": config})) as rt:
        status, _ = rt.jobs.start("latinhead")
        rt.runner.run(status.jobId)
        done = rt.jobs.get(status.jobId)
    assert done.status == JobState.FAILED
    assert "header" in (done.error or "") and "`encoding`" in (done.error or ""), done.error
    assert "Unexpected error" not in (done.error or "")
    done = _copy(settings, tmp_path, _toml("latinhead", lake, encoding="latin-1"), "latinhead")
    assert done.insertedRecords == 1


def _written(db: Any, name: str, job: str) -> tuple[dict[Any, dict[str, Any]], list[Any]]:
    docs = {
        d["_id"]: {k: v for k, v in d.items() if not k.startswith("_")} for d in db[name].find()
    }
    errors = [(e["row"], e["reason"]) for e in db.copyerrors.find({"jobId": job}).sort("row")]
    return docs, errors


def test_a_wide_file_is_read_a_group_of_columns_at_a_time_with_the_same_documents(
    settings: Settings, db: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lake = tmp_path / "wideish"
    lake.mkdir()
    # by hand: a BOM, CRLF, an empty line, null and "", quotes and a line end inside a
    # cell, a quote inside an unquoted cell, a byte that is not UTF-8, a declared int
    lines = [
        "id,zip,note,n,x,f,flag,,when",
        '007,00001,"",1,"a ""b""",1.5,true,e1,2020-01-01',
        '7,02134,,2,"line\none",,false,,',
        "",
        '"0x1",01,"a, b",3,5",2.5,,e3,2021-02-03',
    ]
    data = ("\ufeff" + "\r\n".join(lines) + "\r\n").encode() + b"8,9,caf\xe9,4,y,3,true,e4,\n"
    (lake / "a.csv").write_bytes(data)
    fields = {"id": "string", "zip": "string", "note": "string", "n": "int"}
    table = "[operations.wideish.schema"
    toml = _toml("wideish", lake, fields).replace(
        f"{table}.", f"{table}]\nkeepExtra = true\n{table}."
    )
    narrow = _copy(settings, tmp_path, toml, "wideish")
    assert (narrow.insertedRecords, narrow.errorRecords) == (3, 1), narrow
    expected = _written(db, "wideish", narrow.jobId)
    db["wideish"].drop()
    monkeypatch.setattr(widecsv, "WIDE_COLUMNS", 3)  # 9 columns: read as a wide file
    monkeypatch.setattr(widecsv, "GROUP_COLUMNS", 2)
    wide = _copy(settings, tmp_path, toml, "wideish")
    assert (wide.insertedRecords, wide.errorRecords) == (3, 1), wide
    assert _written(db, "wideish", wide.jobId) == expected
    docs = expected[0]
    assert docs["007"]["note"] == "" and docs["7"]["note"] is None and docs["7"]["x"] == "line\none"
    assert docs["0x1"]["x"] == '5"' and docs["007"]["f"] == 1.5 and docs["0x1"]["column7"] == "e3"
    assert "not valid utf-8" in expected[1][0][1]
    oracle = _oracle([lake / "a.csv"], {"id": "VARCHAR", "zip": "VARCHAR", "note": "VARCHAR",
                     "n": "BIGINT", "x": "VARCHAR", "f": "DOUBLE", "flag": "BOOLEAN",
                     "column7": "VARCHAR", "when": "DATE"}, ignore_errors=True)  # fmt: skip
    assert {k: {f: docs[k][f] for f in ("zip", "note", "n", "x", "f", "flag")} for k in docs} == {
        k: {f: oracle[k][f] for f in ("zip", "note", "n", "x", "f", "flag")} for k in docs
    }


def test_a_wide_row_larger_than_a_document_is_rejected_with_the_reason(
    settings: Settings, db: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # its 18 MB copy goes with it
    lake = tmp_path / "widerow"
    lake.mkdir()
    columns = 2000  # > widecsv.WIDE_COLUMNS: the wide path
    cell = "v" * 9000  # 2000 cells of 9 KB: 18 MB, over MongoDB's 16 MiB
    with (lake / "a.csv").open("w") as f:
        f.write("id," + ",".join(f"c{i}" for i in range(columns - 1)) + "\n")
        f.write("big," + ",".join([cell] * (columns - 1)) + "\n")
        f.write("small," + ",".join(str(i) for i in range(columns - 1)) + "\n")
    done = _copy(settings, tmp_path, _toml("widerow", lake), "widerow")
    assert (done.insertedRecords, done.errorRecords) == (1, 1), done
    error = db.copyerrors.find_one({"jobId": done.jobId})
    assert error["row"] == 0 and "more than MongoDB's 16 MiB" in error["reason"], error
    small = db["widerow"].find_one({"_id": "small"})
    assert len([f for f in small if not f.startswith("_")]) == columns
    assert small["c1998"] == "1998"  # text: the column holds the big row's text too


_PEAK = """
import sys
from lakesync.sources import widecsv
from lakesync.sources.lake import Lake
from lakesync.sources.text import CsvOptions
def peak():  # this process's own high-water mark (ru_maxrss is kept across an exec)
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
if sys.argv[2] == "arrow":
    widecsv.WIDE_COLUMNS = 10**9
base = peak()
lake = Lake.open(sys.argv[1], csv=CsvOptions(text=frozenset({"id"})))
rows = sum(b.table.num_rows for b in lake.batches(1000))
print(rows, (peak() - base) // 1024)
"""


def test_a_file_of_30000_columns_takes_much_less_memory_than_arrows_reader(
    tmp_path: Path,
) -> None:
    lake = tmp_path / "wide"
    lake.mkdir()
    columns = 30_000
    with (lake / "a.csv").open("w") as f:
        f.write("id," + ",".join(f"c{i}" for i in range(columns - 1)) + "\n")
        for r in range(3):
            f.write(f"k{r}," + ",".join(str(r + i) for i in range(columns - 1)) + "\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "TMPDIR": str(tmp_path)}
    peaks = {}
    for way in ("arrow", "wide"):  # each in a process of its own: its own peak
        out = subprocess.run(
            [sys.executable, "-c", _PEAK, str(lake), way],
            capture_output=True, text=True, env=env, check=True,
        )  # fmt: skip
        rows, peaks[way] = map(int, out.stdout.split())
        assert rows == 3
    assert peaks["wide"] < peaks["arrow"] * 0.7, peaks  # (measured: ~120 MB against ~225 MB)


_COPY_PEAK = """
import sys
from lakesync import cli, repeats, runtime  # the copy's imports, before the baseline
def peak():  # this process's own high-water mark (ru_maxrss is kept across an exec)
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
base = peak()
sys.argv = ["lakesync", "copy", "wide", "--json"]
try:
    cli.main()
finally:
    print((peak() - base) // 1024, file=sys.stderr)
"""


def test_a_copy_of_30000_columns_takes_little_more_memory_than_reading_the_file(
    mongo_uri: str, database: str, db: Any, tmp_path: Path
) -> None:
    lake = tmp_path / "wide"
    lake.mkdir()
    columns = 30_000
    with (lake / "a.csv").open("w") as f:
        f.write("id," + ",".join(f"c{i}" for i in range(columns - 1)) + "\n")
        for r in range(3):
            f.write(f"k{r}," + ",".join(str(r + i) for i in range(columns - 1)) + "\n")
    (tmp_path / "ops.toml").write_text(_toml("wide", lake))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(sys.path),
        "LAKESYNC_MONGODB_URI": mongo_uri,
        "LAKESYNC_DATABASE": database,
        "LAKESYNC_DATA_DIR": str(tmp_path / "data"),
        "LAKESYNC_OPERATIONS_FILE": str(tmp_path / "ops.toml"),
    }
    peaks = {}
    for way in ("read", "copy"):  # each in a process of its own, with a grouped copy of its own
        env["TMPDIR"] = str(tmp_path / way)
        (tmp_path / way).mkdir()
        args = [str(lake), "wide"] if way == "read" else []
        code = _PEAK if way == "read" else _COPY_PEAK
        out = subprocess.run(
            [sys.executable, "-c", code, *args], capture_output=True, text=True, env=env
        )
        assert out.returncode == 0, out.stderr[-2000:]
        peaks[way] = int(out.stderr.split()[-1] if way == "copy" else out.stdout.split()[-1])
    assert json.loads(out.stdout)["insertedRecords"] == 3
    assert db["wide"].find_one({"_id": "k2"})["c29998"] == 29998 + 2
    # the copy reads the file, validates, encodes and writes 3 records of 30,000 fields,
    # each peak over its interpreter and imports (measured: reading alone 83 MB, the copy
    # 65 MB; 115 MB before its work was bounded by the columns it needs)
    assert peaks["copy"] < peaks["read"] * 1.1, peaks


def test_an_empty_last_cell_that_ends_the_file_is_null_after_a_quoted_cell(
    settings: Settings, db: Any, tmp_path: Path
) -> None:
    lake = tmp_path / "eof"
    lake.mkdir()
    (lake / "a.csv").write_text('id,note,tail\n1,"x",""\n2,"y",')  # no line break at the end
    types = {"id": "string", "note": "string", "tail": "string"}
    _copy(settings, tmp_path, _toml("eof", lake, types), "eof")
    oracle = _oracle([lake / "a.csv"], {"id": "VARCHAR", "note": "VARCHAR", "tail": "VARCHAR"})
    assert oracle["2"]["tail"] is None and oracle["1"]["tail"] == ""  # (Arrow read "")
    assert _collection(db, "eof") == oracle


@pytest.mark.parametrize("megabytes", [2, 15])
def test_a_cell_of_many_megabytes_is_copied_as_duckdb_reads_it(
    settings: Settings, db: Any, tmp_path: Path, megabytes: int
) -> None:
    lake = tmp_path / "cells"
    lake.mkdir()
    big = 'a "quoted" line\n' * (megabytes << 16)  # 16 bytes a line
    quoted = big.replace('"', '""')
    (lake / "a.csv").write_text(f'id,text,n\nsmall,x,1\nbig,"{quoted}",2\nafter,,3\n')
    types = {"id": "string", "text": "string", "n": "int"}
    done = _copy(settings, tmp_path, _toml("cells", lake, types), "cells")
    assert (done.insertedRecords, done.errorRecords) == (3, 0), done
    oracle = _oracle([lake / "a.csv"], {"id": "VARCHAR", "text": "VARCHAR", "n": "BIGINT"},
                     max_line_size=20 << 20)  # fmt: skip
    assert len(oracle["big"]["text"]) == megabytes << 20
    assert _collection(db, "cells") == oracle


def test_an_int_key_beyond_64_bits_is_rejected_never_a_double(
    settings: Settings, db: Any, tmp_path: Path
) -> None:
    """A key declared {type = "int"} is stored as a 64-bit integer: 2**64 no longer fails
    the batch (an OverflowError), nor becomes another number; it is rejected, saying how
    to keep it (as text)."""
    lake = tmp_path / "big"
    lake.mkdir()
    duckdb.sql(
        "COPY (SELECT * FROM (VALUES ('9223372036854775807', 1), ('18446744073709551616', 2), "
        f"('-9223372036854775809', 3), ('7', 4)) t(id, v)) TO '{lake / 'a.csv'}' (HEADER)"
    )
    done = _copy(settings, tmp_path, _toml("big", lake, {"id": "int", "v": "int"}), "big")
    assert {d["_id"]: d["v"] for d in db["big"].find()} == {2**63 - 1: 1, 7: 4}
    reasons = [e["reason"] for e in db.copyerrors.find({"jobId": done.jobId})]
    assert len(reasons) == 2 and all("beyond a 64-bit integer" in r for r in reasons), reasons
    text = _toml("bigtext", lake, {"id": "string", "v": "int"})
    as_text = _copy(settings, tmp_path, text, "bigtext")
    assert as_text.errorRecords == 0 and db["bigtext"].find_one({"_id": "18446744073709551616"})


class _CountingFs(pafs.FileSystemHandler):  # type: ignore[misc]
    """The local filesystem, counting the opens of each file."""

    def __init__(self) -> None:
        self.fs = pafs.LocalFileSystem()
        self.opens: dict[str, int] = {}

    def _open(self, path: str, how: str) -> Any:
        self.opens[path] = self.opens.get(path, 0) + 1
        return getattr(self.fs, how)(path)

    def open_input_stream(self, path: str) -> Any:
        return self._open(path, "open_input_stream")

    def open_input_file(self, path: str) -> Any:
        return self._open(path, "open_input_file")

    def get_type_name(self) -> str:
        return "counting"

    def normalize_path(self, path: str) -> str:
        return path

    def get_file_info(self, paths: list[str]) -> Any:
        return self.fs.get_file_info(paths)

    def get_file_info_selector(self, selector: Any) -> Any:
        return self.fs.get_file_info(selector)

    def __eq__(self, other: object) -> bool:
        return self is other

    def __ne__(self, other: object) -> bool:
        return self is not other

    def _read_only(self, *args: object) -> None:
        raise OSError("read only")

    create_dir = delete_dir = delete_dir_contents = delete_root_dir_contents = _read_only
    delete_file = move = copy_file = open_output_stream = open_append_stream = _read_only


def test_a_small_csv_file_is_not_read_again_for_its_end(tmp_path: Path) -> None:
    """Whether a file ends in an empty cell is seen in the first read of a file that it
    holds whole (on S3, each read of a file's end was a HEAD and a GET more)."""
    counting = _CountingFs()
    loc = Location(pafs.PyFileSystem(counting), str(tmp_path))
    big = "x" * (2 << 20)  # past the first read: its end is read on its own
    files = {"cell": 'id,a,b\n1,"q",', "line": 'id,a,b\n1,"q",\n', "big": f'id,a,b\n{big},"q",'}
    for name, data in files.items():
        path = str(tmp_path / f"{name}.csv")
        Path(path).write_text(data)
        _, _, fragment = text.inspect_file(loc, "csv", path, None, [], len(data), CsvOptions())
        grouped = isinstance(fragment.format, ds.IpcFileFormat)
        assert grouped is (name != "line"), name  # an empty last cell: the grouped reader
    opens = {Path(p).stem: n for p, n in counting.opens.items()}
    # each: the first record's read, then the reader's (Arrow's, or the grouped copy's);
    # the large file's end once more (the old way: every file's end, 3 opens each)
    assert opens == {"cell": 2, "line": 2, "big": 3}, opens


def _run(settings: Settings, tmp_path: Path, toml: str, name: str, mode: str) -> JobStatus:
    config = tmp_path / f"{name}.toml"
    config.write_text(toml)
    with Runtime(settings.model_copy(update={"operations_file": config})) as rt:
        status, _ = rt.jobs.start(name, {"mode": mode})
        rt.runner.run(status.jobId)
        done = rt.jobs.get(status.jobId)
    assert done.status == JobState.COMPLETED, (done.message, done.error)
    counted = done.insertedRecords + done.updatedRecords + done.unchangedRecords
    assert counted + done.duplicateRecords + done.errorRecords == done.totalRecords, done
    return done


def _watermark(db: Any, name: str) -> str:
    return str(db.syncstate.find_one({"operation": name})["watermark"]["iso"])


@pytest.mark.parametrize(
    ("ext", "declared"), [("csv", False), ("csv", True), ("ndjson", False), ("ndjson", True)]
)
def test_a_watermark_written_in_mixed_formats_is_read_as_validation_reads_it(
    settings: Settings, db: Any, tmp_path: Path, ext: str, declared: bool
) -> None:
    """A file whose watermark cells are written in two formats is read as text by Arrow:
    its cells are compared (incremental filter) and scanned (the watermark recorded) as the
    copy's validation reads a timestamp; a cell that is no timestamp is never dropped."""
    lake = tmp_path / "wm"
    lake.mkdir()

    def write(name: str, rows: list[tuple[int, str]]) -> None:
        if ext == "csv":
            text = "id,v,ts\n" + "".join(f"{i},x,{ts}\n" for i, ts in rows)
        else:
            text = "".join(json.dumps({"id": i, "v": "x", "ts": ts}) + "\n" for i, ts in rows)
        (lake / f"{name}.{ext}").write_text(text)

    write("a", [(1, "2024-01-01T00:00:00Z"), (2, "2024-01-02T00:00:00Z")])  # one format
    # two formats in one file (the second is 03:00 UTC): Arrow reads this column as text
    write("b", [(4, "2024-01-03 05:00:00"), (5, "2024-01-03T05:00:00+02:00")])
    fields = {"ts": "timestamp"} if declared else None
    toml = _toml("wm", lake, fields, watermark="ts")
    full = _run(settings, tmp_path, toml, "wm", "full")
    assert (full.insertedRecords, full.errorRecords) == (4, 0), full
    assert _watermark(db, "wm") == "2024-01-03T05:00:00.000Z"

    write(
        "c",
        [
            (6, "2024-01-04 00:00:00"),
            (7, "2024-01-04T09:00:00+01:00"),  # 08:00 UTC: the new watermark
            (8, "not a time"),  # kept by the filter: validation says what is wrong
            (9, "2024-01-02T23:00:00-01:00"),  # 2024-01-03 00:00 UTC: older, not read
        ],
    )
    new = _run(settings, tmp_path, toml, "wm", "incremental")
    # read again: id 4, at the watermark itself (unchanged)
    if declared:
        assert (new.insertedRecords, new.unchangedRecords, new.errorRecords) == (2, 1, 1), new
        error = db.copyerrors.find_one({"jobId": new.jobId})
        assert "ts must be a timestamp, got 'not a time'" in error["reason"], error
    else:  # an undeclared column is copied as it is written
        assert (new.insertedRecords, new.unchangedRecords, new.errorRecords) == (3, 1, 0), new
        assert db["wm"].find_one({"_id": 8})["ts"] == "not a time"
    assert new.updatedRecords == 0 and db["wm"].find_one({"_id": 9}) is None
    assert _watermark(db, "wm") == "2024-01-04T08:00:00.000Z"

    again = _run(settings, tmp_path, toml, "wm", "incremental")
    assert (again.insertedRecords, again.updatedRecords) == (0, 0), again
    assert _watermark(db, "wm") == "2024-01-04T08:00:00.000Z"


def _ragged_lake(root: Path, header: bool) -> Path:
    """Tab-separated files (one gzipped) whose records of fewer or more cells than the file
    has columns sit first (after the first record, without a header: it names the width),
    in the middle and last; keys repeat across files."""
    lake = root / f"ragged{int(header)}"
    lake.mkdir()
    top = ["id\tv\tw\tx"] if header else []
    first = [] if header else ["0\t0\tzero\t0"]
    files = {
        "a.csv": [*top, *first, "1\t10\tone", "2\t20\ttwo\t2", "3\t30\tthree\t3\textra",
                  "4\t40\tfour\t4", "5\t50"],
        "b.csv.gz": [*top, *first, "6\t60\tsix\t6\tx\ty", "2\t21\ttwo again\t2", "7\t70\tseven\t7",
                     "8"],
        "c.csv": [*top, *first, "9\t90\tnine\t9", "1\t11\tone again\t1"],
    }  # fmt: skip
    for name, lines in files.items():
        data = ("\n".join(lines) + "\n").encode()
        (lake / name).write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
    return lake


def _rejections(db: Any, job: str) -> list[tuple[str, int, str]]:
    return sorted((e["file"], e["row"], e["reason"]) for e in db.copyerrors.find({"jobId": job}))


@pytest.mark.parametrize("header", [True, False])
@pytest.mark.parametrize("wide", [False, True])
def test_a_record_of_another_number_of_cells_is_rejected_with_its_reason_not_the_job(
    settings: Settings,
    db: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    header: bool,
    wide: bool,
) -> None:
    if wide:  # 4 columns: read as a wide file, which split records itself
        monkeypatch.setattr(widecsv, "WIDE_COLUMNS", 3)
        monkeypatch.setattr(widecsv, "GROUP_COLUMNS", 2)
    lake = _ragged_lake(tmp_path, header)
    fields = {"id": "string", "v": "int", "w": "string"}
    name = f"ragged{int(header)}{int(wide)}"

    def toml(**more: Any) -> str:
        return _toml(name, lake, fields, delimiter="\t", header=header, **more)

    whole = _copy(settings, tmp_path, toml(), name)
    expected = _collection(db, name)
    rejected = _rejections(db, whole.jobId)
    ragged = 5  # per file: a 2 (one at its first record), b 2, c 0; a 1 more
    assert (whole.totalRecords, whole.errorRecords) == (11 + 3 * (not header), ragged), whole
    assert whole.insertedRecords == len(expected) == 5 + (not header), whole
    assert whole.duplicateRecords == 1 + 2 * (not header), whole  # (2 and, no header, 0 twice)
    files = [lake / f for f in ("a.csv", "b.csv.gz", "c.csv")]
    oracle = _oracle(files, {"id": "VARCHAR", "v": "BIGINT", "w": "VARCHAR", "x": "BIGINT"},
                     delim="\t", header=header, ignore_errors=True)  # fmt: skip
    assert {k: (d["v"], d["w"]) for k, d in expected.items()} == {
        k: (d["v"], d["w"]) for k, d in oracle.items()
    }
    shift = 1 + header  # the row number Arrow's reader gives the first data record
    places = [("a.csv", 0, 3), ("a.csv", 2, 5), ("a.csv", 4, 2), ("b.csv.gz", 0, 6),
              ("b.csv.gz", 3, 1)]  # fmt: skip
    places = [(f, r + (not header), got) for f, r, got in places]  # (row 0: the first record)
    assert [(f.rsplit("/", 1)[-1], r) for f, r, _ in rejected] == [(f, r) for f, r, _ in places]
    for (_, row, why), (_, _, got) in zip(rejected, places, strict=True):
        cells = f"{got} cell{'s' * (got != 1)}"
        assert f"Row #{row + shift} of the file has {cells}, the file has 4 columns" in why

    for size in (1, 2):  # the same, a batch at a time of one or two records
        db[name].drop()
        again = _copy(settings, tmp_path, toml(batchSize=size), name)
        assert _collection(db, name) == expected and _rejections(db, again.jobId) == rejected
        assert (again.insertedRecords, again.errorRecords) == (whole.insertedRecords, ragged)
    rerun = _copy(settings, tmp_path, toml(), name)
    assert (rerun.insertedRecords, rerun.updatedRecords, rerun.errorRecords) == (0, 0, ragged)

    db[name].drop()  # partitioned, in reverse order, one partition failing and resumed
    config = tmp_path / f"{name}-parts.toml"
    config.write_text(toml(batchSize=1))
    parts = settings.model_copy(update={"operations_file": config})
    done = reversed_with_a_failure_resumed(parts, db, lake, tmp_path / "parked", name)
    assert done.status == JobState.COMPLETED, (done.message, done.error)
    assert _collection(db, name) == expected and _rejections(db, done.jobId) == rejected
    assert (done.totalRecords, done.insertedRecords, done.duplicateRecords, done.errorRecords) == (
        whole.totalRecords,
        whole.insertedRecords,
        whole.duplicateRecords,
        ragged,
    )


@pytest.mark.parametrize("wide", [False, True])
def test_a_read_resumed_at_any_row_refuses_the_same_records_at_the_same_places(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, wide: bool
) -> None:
    from lakesync.sources.base import Position
    from lakesync.sources.lake import Lake

    if wide:
        monkeypatch.setattr(widecsv, "WIDE_COLUMNS", 3)
        monkeypatch.setattr(widecsv, "GROUP_COLUMNS", 2)
    lake = _ragged_lake(tmp_path, True)
    opened = Lake.open(str(lake), csv=CsvOptions(delimiter="\t", text=frozenset({"id"})))
    counts = opened.file_row_counts()
    assert counts == [5, 4, 2] and opened.count_rows() == 11

    def read(size: int, start: Position) -> list[tuple[int, int, Any, str | None]]:
        """(file, row, the record's id, why it was refused) of each row read."""
        out = []
        for batch in opened.batches(size, start=start):
            ids = batch.table.column("id").to_pylist()
            for seg in batch.segments:
                for r in range(seg.offset, seg.offset + seg.rows):
                    out.append((seg.file_index, seg.file_row(r), ids[r], batch.refused.get(r)))
        return out

    whole = read(100, Position())
    assert [(f, r) for f, r, _, why in whole if why] == [(0, 0), (0, 2), (0, 4), (1, 0), (1, 3)]
    assert all(i is None for _, _, i, why in whole if why)  # a placeholder, no cell of it
    for size in (1, 2, 3):
        for f, n in enumerate(counts):
            for row in range(n):
                assert read(size, Position(f, row)) == [w for w in whole if w[:2] >= (f, row)]
    opened.close()


@pytest.mark.parametrize("wide", [False, True])
def test_a_filtered_count_counts_the_ragged_records_batches_reject(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, wide: bool
) -> None:
    """Under a filter (an incremental copy's), ``batches`` keeps each refused record in its
    place, to be rejected with its reason: ``count_rows`` counts them as it does."""
    import pyarrow.compute as pc

    from lakesync.sources.lake import Lake

    if wide:
        monkeypatch.setattr(widecsv, "WIDE_COLUMNS", 3)
        monkeypatch.setattr(widecsv, "GROUP_COLUMNS", 2)
    lake = _ragged_lake(tmp_path, True)
    opened = Lake.open(str(lake), csv=CsvOptions(delimiter="\t", text=frozenset({"id"})))
    for where in (pc.field("v") >= 30, pc.field("v") > 1000, pc.field("w") == "one again"):
        batches = list(opened.batches(100, filter=where))
        kept = sum(b.table.num_rows for b in batches)
        assert sum(len(b.refused) for b in batches) == 5  # whatever the filter keeps
        assert opened.count_rows(where) == kept, where
    opened.close()


def test_an_incremental_copy_rejects_a_ragged_record_and_counts_it(
    settings: Settings, db: Any, tmp_path: Path
) -> None:
    lake = _ragged_lake(tmp_path, True)
    fields = {"id": "string", "v": "int", "w": "string"}
    toml = _toml("ragw", lake, fields, delimiter="\t", watermark="v")
    first = _run(settings, tmp_path, toml, "ragw", "incremental")
    assert (first.totalRecords, first.errorRecords, first.insertedRecords) == (11, 5, 5), first
    again = _run(settings, tmp_path, toml, "ragw", "incremental")
    assert (again.insertedRecords, again.updatedRecords) == (0, 0), again
