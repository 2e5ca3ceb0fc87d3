"""Record validation: Arrow types -> BSON-ready values, and one clear reason per bad record."""

from __future__ import annotations

from datetime import UTC, date, datetime
from typing import Any
from zoneinfo import ZoneInfo

import bson
import pyarrow as pa
import pytest
from bson.datetime_ms import DatetimeMS

from lakesync.errors import SourceError
from lakesync.schema import TASK_DETAIL, FieldRule, RecordSchema, check_columns, validate

TS = pa.timestamp("ms", tz="UTC")
WHEN = datetime(2024, 3, 1, 12, 30, 15, 123000, tzinfo=UTC)


def task_table(n: int = 2, **columns: Any) -> pa.Table:
    """n valid TaskDetail rows; keyword arguments replace (or, with None, drop) columns."""
    base: dict[str, Any] = {
        "taskDetailId": pa.array([f"TD-{i}" for i in range(n)]),
        "taskId": pa.array(["TSK-1"] * n),
        "projectId": pa.array(["PRJ-1"] * n),
        "assignee": pa.array([None] * n, pa.string()),
        "status": pa.array(["todo"] * n),
        "hoursLogged": pa.array([1.5] * n),
        "estimateHours": pa.array([None] * n, pa.float64()),
        "startedAt": pa.array([WHEN] * n, TS),
        "completedAt": pa.array([None] * n, TS),
        "updatedAt": pa.array([WHEN] * n, TS),
        "tags": pa.array([["a", "b"]] * n, pa.list_(pa.string())),
        "notes": pa.array([None] * n, pa.string()),
    }
    for name, value in columns.items():
        if value is None:
            base.pop(name)
        else:
            base[name] = (
                value if isinstance(value, (pa.Array, pa.ChunkedArray)) else pa.array(value)
            )
    return pa.table(base)


def roundtrip(doc: dict[str, Any]) -> dict[str, Any]:
    """What MongoDB would store: the document through BSON and back (tz-aware)."""
    options = bson.CodecOptions(tz_aware=True)
    return bson.decode(bson.encode(doc, codec_options=options), codec_options=options)


def test_valid_rows_become_documents_keyed_by_task_detail_id() -> None:
    out = validate(TASK_DETAIL, task_table(3))
    assert out.rejections == [] and out.rows == [0, 1, 2]
    doc = out.documents[1]
    assert doc["_id"] == doc["taskDetailId"] == "TD-1"  # the key field is kept too
    assert next(iter(doc)) == "_id"


def test_arrow_types_become_bson_types() -> None:
    table = task_table(
        2,
        assignee=pa.array(["ana", None]),
        estimateHours=pa.array([None, 4.0]),
        tags=pa.array([[], ["x"]], pa.list_(pa.string())),
        completedAt=pa.array([None, WHEN], TS),
    )
    first, second = (roundtrip(d) for d in validate(TASK_DETAIL, table).documents)
    assert isinstance(first["startedAt"], datetime) and first["startedAt"] == WHEN
    assert first["startedAt"].utcoffset().total_seconds() == 0
    assert first["tags"] == [] and second["tags"] == ["x"]
    assert first["assignee"] == "ana" and second["assignee"] is None
    assert first["estimateHours"] is None and second["estimateHours"] == 4.0
    assert first["completedAt"] is None and second["completedAt"] == WHEN
    assert isinstance(first["hoursLogged"], float)


def test_timestamps_of_any_unit_and_zone_become_utc_instants() -> None:
    berlin = datetime(2024, 3, 1, 13, 30, 15, 123456, tzinfo=ZoneInfo("Europe/Berlin"))
    table = task_table(
        1,
        startedAt=pa.array([berlin], pa.timestamp("us", tz="Europe/Berlin")),
        updatedAt=pa.array([datetime(2024, 3, 1, 12, 30, 15, 123456)], pa.timestamp("ns")),
        completedAt=pa.array([date(2024, 3, 2)], pa.date32()),
    )
    out = validate(TASK_DETAIL, table)
    assert out.rejections == []
    doc = roundtrip(out.documents[0])
    assert doc["startedAt"] == WHEN  # to milliseconds, as BSON dates hold
    assert doc["updatedAt"] == WHEN  # a zone-less timestamp is read as UTC
    assert doc["completedAt"] == datetime(2024, 3, 2, tzinfo=UTC)
    assert isinstance(out.documents[0]["startedAt"], DatetimeMS)


def test_text_columns_are_converted_where_they_can_be() -> None:
    table = task_table(
        2,
        taskDetailId=pa.array([1, 2]),  # numeric keys become strings
        hoursLogged=pa.array(["2.5", "0"]),
        updatedAt=pa.array(["2024-03-01T12:30:15.123Z", "2024-03-01 12:30:15.123"]),
        tags=pa.array(['["a", "b"]', "a; b"]),
    )
    out = validate(TASK_DETAIL, table)
    assert out.rejections == []
    first, second = (roundtrip(d) for d in out.documents)
    assert first["_id"] == "1" and second["taskDetailId"] == "2"
    assert first["hoursLogged"] == 2.5
    assert first["updatedAt"] == second["updatedAt"] == WHEN
    assert first["tags"] == second["tags"] == ["a", "b"]


@pytest.mark.parametrize(
    ("column", "values", "reason"),
    [
        (
            "taskDetailId",
            pa.array(["ok", None], pa.string()),
            "taskDetailId is required but missing",
        ),
        ("taskDetailId", ["ok", ""], "taskDetailId must not be empty"),
        ("hoursLogged", [1.0, -0.5], "hoursLogged must be >= 0, got -0.5"),
        ("hoursLogged", [1.0, float("nan")], "hoursLogged"),
        ("hoursLogged", ["1", "three hours"], "hoursLogged must be a number, got 'three hours'"),
        ("estimateHours", [None, -1.0], "estimateHours must be >= 0"),
        ("status", ["todo", "archived"], "status must be one of todo, in_progress, blocked, done"),
        ("updatedAt", pa.array([WHEN, None], TS), "updatedAt is required but missing"),
        ("updatedAt", ["2024-01-01", "yesterday"], "updatedAt must be a timestamp"),
        ("tags", pa.array([None, 5]), "tags must be a list of strings, got 5"),
        ("taskId", pa.array(["t", None], pa.string()), "taskId is required but missing"),
    ],
)
def test_each_broken_rule_rejects_the_record_with_a_reason(
    column: str, values: Any, reason: str
) -> None:
    out = validate(TASK_DETAIL, task_table(2, **{column: values}))
    assert len(out.documents) == 1 and out.rows == [0]
    (rejection,) = out.rejections
    assert rejection.row == 1
    assert reason in rejection.reason
    expected_key = None if column == "taskDetailId" else "TD-1"
    assert rejection.key == expected_key


def test_nan_in_an_optional_number_is_stored_as_null() -> None:
    out = validate(TASK_DETAIL, task_table(1, estimateHours=[float("nan")]))
    assert out.rejections == []
    assert out.documents[0]["estimateHours"] is None


def test_one_reason_per_record_and_rows_point_at_the_batch() -> None:
    table = task_table(4, hoursLogged=[-1.0, 1.0, 2.0, -3.0], status=["x", "todo", "y", "done"])
    out = validate(TASK_DETAIL, table)
    assert out.rows == [1]
    assert [(r.row, r.key) for r in out.rejections] == [(0, "TD-0"), (2, "TD-2"), (3, "TD-3")]
    assert out.rejections[0].reason.startswith("status")  # the first rule broken, schema order
    assert out.rejections[2].reason == "hoursLogged must be >= 0, got -3.0"


def test_missing_optional_columns_are_left_out_and_extra_columns_dropped() -> None:
    table = task_table(1, notes=None, assignee=None).append_column("secret", pa.array(["x"]))
    doc = validate(TASK_DETAIL, table).documents[0]
    assert "notes" not in doc and "assignee" not in doc and "secret" not in doc


def test_schema_that_keeps_extra_columns() -> None:
    schema = RecordSchema(key="id", fields=[FieldRule(name="id", type="int")], keepExtra=True)
    table = pa.table({"id": [1, 2], "when": pa.array([WHEN, None], TS), "v": [[1], []]})
    out = validate(schema, table)
    assert [d["_id"] for d in out.documents] == [1, 2]
    assert roundtrip(out.documents[0])["when"] == WHEN and out.documents[1]["when"] is None
    assert out.documents[0]["v"] == [1]


def test_check_columns_names_what_is_missing_and_how_to_fix_it() -> None:
    check_columns(TASK_DETAIL, task_table(1).column_names, "/lake")
    with pytest.raises(SourceError) as e:
        check_columns(TASK_DETAIL, ["taskDetailId", "taskId", "notes"], "/lake")
    message = str(e.value)
    assert "/lake" in message and "projectId" in message and "hoursLogged" in message
    assert "notes" in message and "lakesync.toml" in message
