"""Structured logs: with LAKESYNC_LOG_FORMAT=json every stderr line is one JSON object, job
lines carry jobId / operation / batch / counts / seconds, and no line is logged per record.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

from tests import helpers

from lakesync.config import Settings
from lakesync.logs import JobFields, JsonFormatter, MaskingFormatter, job_context

URI = "mongodb://admin:hunter2@db.example:27017/lakesync"


def lakesync(settings: Settings, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """`lakesync` run on the test's database and lake, with ``env`` added."""
    return helpers.lakesync(helpers.child_env(settings, **env), *args)


def json_lines(stderr: str) -> list[dict[str, Any]]:
    """Every stderr line parsed as JSON (fails on the first line that is not)."""
    lines = []
    for line in stderr.splitlines():
        assert line.strip(), "empty line on stderr"
        parsed = json.loads(line)
        assert isinstance(parsed, dict), line
        assert {"time", "level", "logger", "message"} <= set(parsed), line
        assert parsed["time"].endswith("Z")
        lines.append(parsed)
    return lines


def test_copy_logs_one_json_object_per_line_with_job_fields(settings: Settings) -> None:
    run = lakesync(settings, "copy", "--json", "--batch-size", "1000",
                   LAKESYNC_LOG_FORMAT="json", LAKESYNC_LOG_LEVEL="debug")  # fmt: skip
    assert run.returncode == 0, run.stderr
    status = json.loads(run.stdout)
    lines = json_lines(run.stderr)
    job_id = status["jobId"]
    for line in lines:  # whatever carries a job id carries this job's
        assert line.get("jobId", job_id) == job_id, line
    mine = [line for line in lines if line.get("jobId") == job_id]
    assert all(line["operation"] == "copy-taskdetail" for line in mine), mine
    started = [line for line in mine if "run 1 started" in line["message"]]
    ended = [line for line in mine if line["message"].startswith(f"job {job_id} completed")]
    assert len(started) == 1 and started[0]["level"] == "info"
    assert len(ended) == 1 and ended[0]["level"] == "info"
    batches = [line for line in mine if "batch" in line]
    assert [b["batch"] for b in batches] == list(range(1, len(batches) + 1))
    assert len(batches) == status["checkpoint"]["batches"] >= 5
    for b in batches:
        assert b["level"] == "debug" and b["seconds"] >= 0
        assert b["processed"] == b["inserted"] + b["updated"] + b["unchanged"] + b["errors"]
    assert sum(b["inserted"] for b in batches) == status["insertedRecords"] == 4975
    assert sum(b["errors"] for b in batches) == status["errorRecords"] == 25
    assert len(lines) < len(batches) + 15  # no line per record (5,000 of them)


def test_info_level_logs_job_start_and_end_but_no_batches(settings: Settings) -> None:
    run = lakesync(settings, "copy", "--json", LAKESYNC_LOG_FORMAT="JSON")
    assert run.returncode == 0, run.stderr
    lines = json_lines(run.stderr)
    assert {line["level"] for line in lines} <= {"info", "warning"}
    assert not [line for line in lines if "batch" in line]
    job_id = json.loads(run.stdout)["jobId"]
    assert any(line.get("jobId") == job_id and "created" in line["message"] for line in lines)
    (end,) = [line for line in lines if line["message"].startswith(f"job {job_id} completed")]
    assert end["status"] == "completed" and end["seconds"] >= 0  # the outcome, as fields
    assert (end["processedRecords"], end["insertedRecords"], end["errorRecords"]) == (
        5000, 4975, 25)  # fmt: skip


def test_a_failing_command_keeps_stderr_json(settings: Settings) -> None:
    run = lakesync(settings, "copy", "--source", "/no/such/lake", LAKESYNC_LOG_FORMAT="json")
    assert run.returncode == 1
    last = json_lines(run.stderr)[-1]
    assert last["level"] == "error" and "/no/such/lake" in last["message"]


def test_text_format_is_for_people(settings: Settings) -> None:
    run = lakesync(settings, "-v", "copy", "--json")  # -v: the INFO lines too
    assert run.returncode == 0, run.stderr
    job_id = json.loads(run.stdout)["jobId"]
    lines = run.stderr.splitlines()
    assert lines and not any(line.startswith("{") for line in lines)
    assert any(f"job {job_id} completed" in line for line in lines)
    quiet = lakesync(settings, "copy", "--json")  # quiet by default: no INFO line
    assert quiet.returncode == 0 and " INFO " not in quiet.stderr, quiet.stderr


def test_configured_process_masks_and_tags_everything(tmp_path: Path) -> None:
    script = textwrap.dedent(f"""
        import logging, warnings
        from lakesync.logs import configure_logging, job_context
        configure_logging("json", "DEBUG")
        with job_context("job_x", "copy-taskdetail"):
            logging.getLogger("lakesync.lake").info("opened %s", {URI!r})
            logging.getLogger("anything").debug("n", extra={{"batch": 3, "uri": {URI!r}}})
        logging.getLogger("lakesync").info("outside")
        warnings.warn("deprecated option in " + {URI!r})
        try:
            raise RuntimeError("cannot reach " + {URI!r})
        except RuntimeError:
            logging.getLogger("lakesync").exception("failed")
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=60)  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "hunter2" not in run.stderr
    opened, extra, outside, warned, failed = json_lines(run.stderr)
    assert opened["jobId"] == "job_x" and opened["operation"] == "copy-taskdetail"
    assert "admin:***@db.example" in opened["message"]
    assert extra["batch"] == 3 and extra["jobId"] == "job_x" and "***" in extra["uri"]
    assert "jobId" not in outside
    assert warned["logger"] == "py.warnings" and "***" in warned["message"]
    assert "RuntimeError" in failed["exception"] and "***" in failed["exception"]


def test_formatters_mask_passwords_in_messages_fields_and_traces() -> None:
    try:
        raise ValueError(URI)
    except ValueError:
        record = logging.LogRecord("lakesync.x", logging.ERROR, __file__, 1, "to %s", (URI,),
                                   sys.exc_info())  # fmt: skip
    record.nested = {"uris": [URI], "n": 1}
    with job_context("job_y"):
        JobFields().filter(record)
    as_json = JsonFormatter().format(record)
    as_text = MaskingFormatter("%(message)s").format(record)
    assert "hunter2" not in as_json + as_text
    parsed = json.loads(as_json)
    assert parsed["jobId"] == "job_y" and parsed["nested"]["n"] == 1
    assert parsed["nested"]["uris"] == ["mongodb://admin:***@db.example:27017/lakesync"]
    assert "\n" not in as_json  # the trace stays on the one line
