"""Settings: defaults, the environment and `.env`, and one clear message per bad value."""

from __future__ import annotations

from pathlib import Path

import pytest

from lakesync.config import get_settings, load_settings
from lakesync.errors import ConfigError


def test_defaults_match_the_contract(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("LAKESYNC_DATA_DIR")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))  # the user's data directory
    s = load_settings()
    assert s.mongodb_uri is None and s.lake_uri is None and s.s3_endpoint_url is None
    assert s.database == "lakesync" and s.data_dir == tmp_path / "xdg" / "lakesync"
    assert (s.batch_size, s.job_time_limit, s.status_ttl_days) == (1000, 900, 7)
    assert (s.executor, s.workers, s.api_token, s.broker_url) == ("local", 2, None, None)
    assert s.effective_lake_uri == str(tmp_path / "xdg" / "lakesync" / "demo-lake")


def test_the_data_dir_is_the_same_from_any_folder(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("LAKESYNC_DATA_DIR")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    seen = set()
    for folder in (tmp_path / "a", tmp_path / "b"):
        folder.mkdir()
        monkeypatch.chdir(folder)
        seen.add(load_settings().data_dir)
    assert seen == {tmp_path / "xdg" / "lakesync"}
    monkeypatch.setenv("LAKESYNC_DATA_DIR", str(tmp_path / "mine"))
    assert load_settings().data_dir == tmp_path / "mine"


def test_environment_is_read_with_the_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LAKESYNC_BATCH_SIZE", "100000")
    monkeypatch.setenv("LAKESYNC_LAKE_URI", "s3://bucket/tasks")
    monkeypatch.setenv("LAKESYNC_EXECUTOR", "Celery")
    monkeypatch.setenv("LAKESYNC_LOG_LEVEL", "debug")
    monkeypatch.setenv("LAKESYNC_STATUS_TTL_DAYS", "0.5")
    s = load_settings()
    assert (s.batch_size, s.lake_uri, s.executor, s.log_level) == (
        100000,
        "s3://bucket/tasks",
        "celery",
        "DEBUG",
    )
    assert s.effective_lake_uri == "s3://bucket/tasks" and s.status_ttl_days == 0.5


def test_empty_values_mean_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("MONGODB_URI", "LAKE_URI", "API_TOKEN", "BROKER_URL", "S3_ENDPOINT_URL"):
        monkeypatch.setenv(f"LAKESYNC_{name}", "  ")
    s = load_settings()
    assert (s.mongodb_uri, s.lake_uri, s.api_token, s.broker_url, s.s3_endpoint_url) == (None,) * 5


def test_dot_env_file_is_read_and_the_environment_wins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / ".env").write_text("LAKESYNC_DATABASE=fromfile\nLAKESYNC_WORKERS=5\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LAKESYNC_WORKERS", "3")
    s = load_settings()
    assert (s.database, s.workers) == ("fromfile", 3)


@pytest.mark.parametrize("value", ["0", "-5", "100001", "lots"])
def test_batch_size_outside_the_range_names_variable_and_range(
    value: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LAKESYNC_BATCH_SIZE", value)
    with pytest.raises(ConfigError) as e:
        load_settings()
    message = str(e.value)
    assert f"LAKESYNC_BATCH_SIZE={value!r}" in message
    assert "1..100000" in message and "Fix the environment variable" in message
    assert "\n" not in message


def test_every_bad_value_is_reported_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LAKESYNC_EXECUTOR", "threads")
    monkeypatch.setenv("LAKESYNC_STATUS_TTL_DAYS", "0")
    monkeypatch.setenv("LAKESYNC_DATABASE", "my.db")
    with pytest.raises(ConfigError) as e:
        load_settings()
    message = str(e.value)
    assert "LAKESYNC_EXECUTOR='threads'" in message and "'local' or 'celery'" in message
    assert "LAKESYNC_STATUS_TTL_DAYS='0'" in message
    assert "LAKESYNC_DATABASE='my.db'" in message


def test_secrets_are_never_echoed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LAKESYNC_MONGODB_URI", "mongodb://user:secret@db:27017")
    monkeypatch.setenv("LAKESYNC_API_TOKEN", "tok-secret")
    monkeypatch.setenv("LAKESYNC_WORKERS", "0")
    with pytest.raises(ConfigError) as e:
        load_settings()
    assert "secret" not in str(e.value) and "LAKESYNC_WORKERS" in str(e.value)
    monkeypatch.delenv("LAKESYNC_WORKERS")
    s = load_settings()
    assert "secret" not in repr(s) and "secret" not in str(s.model_dump())
    assert s.mongodb_uri is not None and s.mongodb_uri.get_secret_value().endswith("@db:27017")


def test_get_settings_is_read_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LAKESYNC_DATABASE", "first")
    assert get_settings().database == "first"
    monkeypatch.setenv("LAKESYNC_DATABASE", "second")
    assert get_settings() is get_settings() and get_settings().database == "first"
    get_settings.cache_clear()
    assert get_settings().database == "second"


def test_an_unknown_variable_is_named_with_the_closest_valid_one(tmp_path: Path) -> None:
    from lakesync.config import unknown_variables

    env_file = tmp_path / ".env"
    env_file.write_text("LAKESYNC_BATCHSIZE=10\nLAKESYNC_DATABASE=x\nOTHER=1\n")
    environ = {
        "LAKESYNC_MONGO_URI": "mongodb://db",
        "LAKESYNC_MONGODB_URI": "mongodb://db",
        "lakesync_webhook_secret": "k",  # names are case-insensitive, as Settings reads them
        "LAKESYNC_ZZZZZZ": "1",
        "PATH": "/bin",
    }
    found = unknown_variables(environ, env_file)
    assert found == [
        f"LAKESYNC_BATCHSIZE (in the {env_file}) is not a lakesync setting and is ignored; "
        "did you mean LAKESYNC_BATCH_SIZE?",
        "LAKESYNC_MONGO_URI is not a lakesync setting and is ignored; "
        "did you mean LAKESYNC_MONGODB_URI?",
        "LAKESYNC_ZZZZZZ is not a lakesync setting and is ignored; "
        "the README's configuration table lists the settings.",
    ]
    assert unknown_variables({"LAKESYNC_DATA_DIR": "/x"}, tmp_path / "none") == []
