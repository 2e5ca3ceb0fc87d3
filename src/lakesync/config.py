"""Settings: the only place that reads the environment (prefix LAKESYNC_, or a `.env` file)."""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Literal
from urllib.parse import unquote

from pydantic import (
    AliasChoices,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from lakesync.errors import ConfigError
from lakesync.masking import URI_SECRETS, masked

#: Host header names served by default: a DNS-rebinding page carries its own name instead
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]")


_SCHEME = re.compile(r"^\s*[a-z][a-z0-9+.-]*:/*", re.I)


def uri_passwords(uri: str) -> set[str]:
    """What could be the password of a URI, however malformed: the text after the first
    ':' of the part before the last '@' (or of the authority when there is no '@')."""
    rest = _SCHEME.sub("", uri.strip())
    userinfo = rest.rpartition("@")[0] if "@" in rest else re.split(r"[/?#]", rest)[0]
    password = userinfo.partition(":")[2]
    # parsers that stop at "/", "?" or "#" quote only the first piece (e.g. as a "port")
    found = {password, unquote(password), re.split(r"[/?#]", password)[0]}
    if "@" not in rest and password.isdigit():  # host:port, no password
        return set()
    return {p for p in found if len(p) >= 3}


def default_data_dir() -> Path:
    """The platform's per-user data directory for lakesync (e.g. ~/.local/share/lakesync)."""
    from platformdirs import user_data_dir

    return Path(user_data_dir("lakesync", appauthor=False))


class Settings(BaseSettings):
    """lakesync configuration; see the README's configuration table."""

    model_config = SettingsConfigDict(
        env_prefix="LAKESYNC_", env_file=".env", extra="ignore", validate_default=True
    )

    mongodb_uri: SecretStr | None = None
    database: str = Field("lakesync", min_length=1, pattern=r"^[^/\\. \"$]+$")
    #: one folder per user, whatever the current folder: `make run`, the CLI and workers share
    #: the embedded server and the demo lake in it
    data_dir: Path = Field(default_factory=lambda: default_data_dir())
    lake_uri: str | None = None
    s3_endpoint_url: str | None = None
    s3_region: str | None = None
    batch_size: int = Field(1000, ge=1, le=100_000)
    job_time_limit: float = Field(900, gt=0)
    status_ttl_days: float = Field(7, gt=0)
    api_token: SecretStr | None = None
    executor: Literal["local", "celery"] = "local"
    broker_url: SecretStr | None = None
    workers: int = Field(2, ge=1, le=64)
    lease_seconds: float = Field(120, gt=0)  # longer than the retry budget (see lease.py)
    max_attempts: int = Field(3, ge=1, le=100)
    retry_budget_seconds: float = Field(60, ge=0)
    demo_rows: int = Field(100_000, ge=1)
    #: seconds the embedded server a short command started stays up unused, for the next
    #: command (0: it stops with the command); serve and worker stop theirs when they end
    embedded_idle: float = Field(300, ge=0)
    allowed_roots: list[str] = Field(default_factory=list)
    allowed_origins: list[str] = Field(default_factory=list)
    allowed_hosts: list[str] = Field(default_factory=lambda: list(LOOPBACK_HOSTS))
    operations_file: Path = Path("lakesync.toml")
    partition_rows: int = Field(50_000, ge=1)
    log_format: Literal["text", "json"] = "text"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    # unattended runs (schedules.py, scheduler.py, notify.py)
    schedule: str | None = None  # cron or interval of the built-in copy-taskdetail
    schedule_timezone: str = "UTC"
    schedule_mode: Literal["full", "incremental"] | None = None
    notify: list[str] = Field(default_factory=list)  # default webhooks of every operation
    notify_on: list[Literal["completed", "failed", "cancelled"]] = ["failed"]
    #: LAKESYNC_WEBHOOK_SECRET (a field name without "secret": reprs stay free of the word)
    signing_key: SecretStr | None = Field(
        None, validation_alias=AliasChoices("LAKESYNC_WEBHOOK_SECRET", "signing_key")
    )
    webhook_timeout: float = Field(10, gt=0, le=300)
    webhook_retries: int = Field(3, ge=0, le=10)
    #: tests only: a file holding the scheduler's "now" (epoch seconds) instead of the clock
    scheduler_clock_file: Path | None = None

    @field_validator("schedule", "signing_key")
    @classmethod
    def _blank_is_unset(cls, value: object) -> object:
        text = value.get_secret_value() if isinstance(value, SecretStr) else value
        return None if isinstance(text, str) and not text.strip() else value

    @field_validator("schedule")
    @classmethod
    def _schedule(cls, value: str | None) -> str | None:
        if value is None:  # (the schedules imported only when one is set: start-up time)
            return None
        from lakesync.schedules import Schedule

        return Schedule.parse(value).text.removeprefix("every ")

    @field_validator("signing_key")
    @classmethod
    def _signing_key(cls, value: SecretStr | None) -> SecretStr | None:
        from lakesync.signing import signing_key

        if value is not None:
            signing_key(value.get_secret_value())  # whsec_ + base64, or any other text
        return value

    @field_validator("schedule_timezone")
    @classmethod
    def _zone(cls, value: str) -> str:
        if value == "UTC":  # the default: no need to import the schedules (start-up time)
            return value
        from lakesync.schedules import check_timezone

        return check_timezone(value)

    @field_validator("notify")
    @classmethod
    def _webhooks(cls, value: list[str]) -> list[str]:
        if not value:
            return value
        from lakesync.schedules import check_webhook

        return [check_webhook(url) for url in value]

    @field_validator("mongodb_uri", "broker_url", "api_token", "lake_uri", "s3_endpoint_url")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        if isinstance(value, SecretStr) and not value.get_secret_value().strip():
            return None
        if isinstance(value, str) and not value.strip():
            return None
        return value

    @model_validator(mode="after")
    def _remember_secrets(self) -> Settings:
        for uri in (self.mongodb_uri, self.broker_url):
            if uri is not None:
                URI_SECRETS.update(uri_passwords(uri.get_secret_value()))
        return self

    @field_validator("log_format", "executor", "log_level", mode="before")
    @classmethod
    def _case_insensitive(cls, value: object) -> object:
        if isinstance(value, str):
            return (
                value.upper()
                if value.lower() in {"debug", "info", "warning", "error"}
                else value.lower()
            )
        return value

    @property
    def demo_lake_dir(self) -> Path:
        """Where the generated demo lake lives when LAKESYNC_LAKE_URI is unset."""
        return self.data_dir / "demo-lake"

    @property
    def effective_lake_uri(self) -> str:
        """The lake to read: LAKESYNC_LAKE_URI, or the demo lake under the data dir."""
        return self.lake_uri or str(self.demo_lake_dir)


def _accepted(field: str) -> str:
    """The accepted range of a numeric setting, e.g. " Accepted range: 1..100000." (or "")."""
    info = Settings.model_fields.get(field)
    bounds = {
        name: getattr(m, name)
        for m in (info.metadata if info else [])
        for name in ("ge", "gt", "le")
        if hasattr(m, name)
    }
    if "ge" in bounds and "le" in bounds:
        return f" Accepted range: {bounds['ge']}..{bounds['le']}."
    words = {"ge": ">=", "gt": ">", "le": "<="}
    parts = [f"{words[k]} {v}" for k, v in bounds.items()]
    return f" Accepted: {' and '.join(parts)}." if parts else ""


def _describe(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        field = str(item["loc"][0]).lower().removeprefix("lakesync_") if item["loc"] else "?"
        field = "signing_key" if field == "webhook_secret" else field  # the alias
        variable = (
            "LAKESYNC_WEBHOOK_SECRET" if field == "signing_key" else f"LAKESYNC_{field.upper()}"
        )
        given = item.get("input")
        secret = field in {"mongodb_uri", "api_token", "broker_url", "signing_key"}
        shown = "" if isinstance(given, dict) or secret else f"={_masked(given)!r}"
        lines.append(f"{variable}{shown} is invalid: {item['msg']}.{_accepted(field)}")
    return " ".join(lines) + " Fix the environment variable (or .env file) and start again."


def _masked(value: object) -> object:
    return masked(value)


def load_settings(**overrides: object) -> Settings:
    """Build Settings from the environment, raising ConfigError with a readable message."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as e:
        raise ConfigError(_describe(e)) from None


def setting_names() -> set[str]:
    """Every variable lakesync reads: LAKESYNC_ + a setting's name, or its alias."""
    names: set[str] = set()
    for name, info in Settings.model_fields.items():
        alias = info.validation_alias
        choices = alias.choices if isinstance(alias, AliasChoices) else []
        found = [c for c in choices if isinstance(c, str) and c.upper().startswith("LAKESYNC_")]
        names.update(c.upper() for c in found) if found else names.add(f"LAKESYNC_{name.upper()}")
    return names


def unknown_variables(environ: Mapping[str, str], env_file: Path = Path(".env")) -> list[str]:
    """A warning for each LAKESYNC_* variable of the environment or `.env` that no setting
    reads (a typo is otherwise silently ignored), naming the closest valid one."""
    found = {k.upper(): "environment" for k in environ if k.upper().startswith("LAKESYNC_")}
    if env_file.is_file():
        from dotenv import dotenv_values

        for key in dotenv_values(env_file):
            if key.upper().startswith("LAKESYNC_"):
                found.setdefault(key.upper(), str(env_file))
    valid = setting_names()
    warnings = []
    for name, where in sorted(found.items()):
        if name in valid:
            continue
        # compared without the shared prefix, which would make every name look close
        suffixes = {v.removeprefix("LAKESYNC_"): v for v in valid}
        close = difflib.get_close_matches(
            name.removeprefix("LAKESYNC_"), sorted(suffixes), n=1, cutoff=0.6
        )
        hint = (
            f"did you mean {suffixes[close[0]]}?"
            if close
            else "the README's configuration table lists the settings."
        )
        warnings.append(
            f"{name} (in the {where}) is not a lakesync setting and is ignored; {hint}"
            if where != "environment"
            else f"{name} is not a lakesync setting and is ignored; {hint}"
        )
    return warnings


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide Settings, read once."""
    return load_settings()
