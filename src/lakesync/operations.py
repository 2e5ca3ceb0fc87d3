"""The registry of operations: `copy-taskdetail` built in, more declared in lakesync.toml.

An operations file (``LAKESYNC_OPERATIONS_FILE``, default ``lakesync.toml``; read only if
it exists) declares one ``[operations.<name>]`` table per operation::

    [operations.copy-projects]
    source = "/data/lake/projects"   # relative paths are relative to the file
    collection = "projects"
    key = "projectId"
    mode = "incremental"
    watermark = "updatedAt"
    [operations.copy-projects.schema.fields]
    projectId = { type = "string", required = true }
    updatedAt = { type = "timestamp", required = true }

An Iceberg table may be named through a catalog instead of a ``source``: ``catalog = "NAME"``
and ``table = "namespace.table"``, with a ``[catalogs.NAME]`` table of pyiceberg catalog
properties (``type = "sql"``, ``uri = ...``; REST, Glue...).

Any mistake stops start-up with a ConfigError naming the file, the operation and the field.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import tomllib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, Protocol
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationError,
    field_validator,
)

from lakesync.config import Settings
from lakesync.errors import ConfigError, LakesyncError, RequestError
from lakesync.locations import canonical_uri
from lakesync.masking import masked
from lakesync.schedules import Unattended, check_unattended
from lakesync.schema import TASK_DETAIL, FieldRule, FieldType, RecordSchema
from lakesync.sources.iceberg import CatalogTable
from lakesync.sources.text import CsvOptions, check_encoding

logger = logging.getLogger(__name__)

Mode = Literal["full", "incremental", "mirror"]
#: a job's mode: an operation's, or a dry run (a full copy's counts, nothing written)
JobMode = Literal["full", "incremental", "mirror", "dry-run"]


class Operation(Unattended):
    """A named copy: where records come from, what they look like, where they go."""

    name: str
    description: str = ""
    source: str | None = None  # None: LAKESYNC_LAKE_URI or the demo lake
    format: str | None = None
    collection: str
    schema_: RecordSchema = Field(alias="schema")
    batchSize: int | None = Field(None, ge=1, le=100_000)
    mode: Mode = "full"
    watermark: str | None = "updatedAt"
    #: incremental copies start this far below the watermark: a duration or a number
    lookback: str | int | None = None
    #: an Iceberg table named through a catalog of lakesync.toml (then ``source`` is None)
    catalog: CatalogTable | None = None
    #: CSV: the files' text encoding, the delimiter, and whether the first line names columns
    encoding: str = "utf-8"
    delimiter: str = ","
    header: bool = True
    #: the declared fields in the order lakesync.toml gives them (a CSV file without a
    #: header names its columns by them)
    declared: tuple[str, ...] = ()

    model_config = ConfigDict(populate_by_name=True)

    def csv_options(self) -> CsvOptions:
        """How this operation's CSV files are read: its declared string, int, float and bool
        fields and its key read as text (validation converts them), so "007" stays "007";
        not the watermark, which is read as the file's own type and compared as its declared
        type (see ``sources.text.Compared``)."""
        text = {f.name for f in self.schema_.fields if f.type in _TEXT_READ}
        text |= set(self.schema_.key_columns)
        text.discard(self.watermark or "")
        declared = next((f.type for f in self.schema_.fields if f.name == self.watermark), None)
        return CsvOptions(
            self.encoding,
            self.delimiter,
            self.header,
            frozenset(text),
            self.declared,
            tuple(self.schema_.key_columns),
            watermark=self.watermark,
            watermark_type=declared if declared in ("timestamp", "int") else None,
            doubles=frozenset(f.name for f in self.schema_.fields if f.type == "float"),
        )

    def source_uri(self, settings: Settings) -> str:
        """The lake this operation reads by default."""
        if self.catalog is not None:
            return self.catalog.uri
        return self.source or settings.effective_lake_uri

    def catalog_for(self, source: str) -> CatalogTable | None:
        """The catalog table a job's ``source`` names (``iceberg://CATALOG/namespace.table``),
        if it is in this operation's catalog; None for every other source."""
        if self.catalog is None or not source.startswith("iceberg://"):
            return None
        name, _, table = source.removeprefix("iceberg://").partition("/")
        if name != self.catalog.catalog or not table:
            return None
        return replace(self.catalog, table=table)

    def check_options(self, options: JobOptions) -> None:
        """Refuse, before a job exists, options this operation cannot honour (RequestError)."""
        mode = options.mode or self.mode
        if mode == "incremental" and not self.watermark:
            raise RequestError(
                f"Operation {self.name!r} has no watermark column, so it cannot copy "
                "incrementally. Use mode full or mirror, or declare its `watermark` in "
                "lakesync.toml.",
                operation=self.name,
            )
        if mode == "mirror" and not isinstance(self.schema_.key, str):
            raise RequestError(
                f"Operation {self.name!r} has a composite key, and mirror mode needs a single "
                "string or integer key. Use mode full.",
                operation=self.name,
            )
        if options.sinceDeltaVersion is not None:
            raise RequestError(
                '"sinceDeltaVersion" is chosen by lakesync: an incremental job of a Delta table '
                "reads the files added since the version its last completed copy read. Remove "
                'the option, and send "mode": "incremental".',
            )
        if options.sinceIcebergSnapshotId is not None:
            raise RequestError(
                '"sinceIcebergSnapshotId" is chosen by lakesync: an incremental job of an '
                "Iceberg table reads the files added since the snapshot its last completed copy "
                'read. Remove the option, and send "mode": "incremental".',
            )
        if options.allowEmpty and mode != "mirror":
            raise RequestError(
                f'"allowEmpty" only applies to mode mirror; this job\'s mode is {mode}. '
                'Remove the option, or send "mode": "mirror".',
            )


class JobOptions(BaseModel):
    """Options a copy job accepts (API body `options`, CLI flags)."""

    model_config = ConfigDict(extra="forbid")

    # strict numbers and flags: 2.0, "5" or true are refused, not silently converted
    source: str | None = Field(None, min_length=1, max_length=2048)
    batchSize: StrictInt | None = Field(None, ge=1, le=100_000)
    mode: JobMode | None = None
    allowEmpty: StrictBool = False
    #: Delta table version to read (default: latest)
    deltaVersion: StrictInt | None = Field(None, ge=0)
    #: Delta: read only the files added after this version (incremental jobs pin it)
    sinceDeltaVersion: StrictInt | None = Field(None, ge=0)
    #: Iceberg snapshot to read (default: the table's current one)
    icebergSnapshotId: StrictInt | None = None
    #: Iceberg: read only the files added after this snapshot (incremental jobs pin it)
    sinceIcebergSnapshotId: StrictInt | None = None

    @field_validator("source")
    @classmethod
    def _printable(cls, value: str | None) -> str | None:
        if value is not None and any(ord(ch) < 32 or ord(ch) == 127 for ch in value):
            raise ValueError("contains a NUL or control character; send a path, glob or URI")
        if value is not None and "://" in value:  # `http://[bad`: a 400 here, not a 500 later
            try:
                urlsplit(value).port  # noqa: B018 - raises for a port that is no number
            except ValueError as e:
                raise ValueError(
                    f"{masked(value)!r} is not a valid URI ({e}); send a directory, file or "
                    "glob path, or a URI such as s3://bucket/prefix/"
                ) from None
        return value


COPY_TASKDETAIL = Operation(
    name="copy-taskdetail",
    description="Copy TaskDetail records from the data lake into the taskdetails collection",
    collection="taskdetails",
    schema_=TASK_DETAIL,
)


@dataclass(frozen=True)
class ResolvedJob:
    """What one job copies: its operation, options, source and batch size, resolved once."""

    op: Operation
    options: JobOptions
    source: str
    batch_size: int


class JobLister(Protocol):
    """Lists jobs (jobstore.JobStore)."""

    def list_jobs(self, *, operation: str, limit: int) -> list[Any]: ...


class StateReader(Protocol):
    """Reads an operation's watermarks (boundary.WatermarkStore)."""

    def for_operation(self, operation: str) -> list[Any]: ...


class OperationRegistry:
    """Looks up operations by name; lists them in a stable order."""

    def __init__(self, operations: list[Operation]) -> None:
        self._ops = {op.name: op for op in operations}

    @classmethod
    def from_settings(cls, settings: Settings) -> OperationRegistry:
        """The built-in operation plus those declared in the operations file, if present."""
        path = Path(settings.operations_file)
        if not path.is_file():
            if path.exists():
                raise ConfigError(f"{path}: not a file (LAKESYNC_OPERATIONS_FILE).")
            return cls([COPY_TASKDETAIL])
        declared = load_operations(path)
        logger.info("Loaded %d operation(s) from %s", len(declared), path)
        return cls([COPY_TASKDETAIL, *declared])

    def names(self) -> list[str]:
        """Operation names, built-in first."""
        return list(self._ops)

    def all(self) -> list[Operation]:
        """Every operation."""
        return list(self._ops.values())

    def resolve(self, name: str, raw_options: Any, settings: Settings) -> ResolvedJob:
        """A job's operation and options with every default applied (settings, then op)."""
        op = self.get(name)
        options = parse_options(raw_options)
        return ResolvedJob(
            op=op,
            options=options,
            source=options.source or op.source_uri(settings),
            batch_size=options.batchSize or op.batchSize or settings.batch_size,
        )

    def get(self, name: str) -> Operation:
        """The named operation, or a RequestError listing the valid names."""
        try:
            return self._ops[name]
        except KeyError:
            raise RequestError(
                f"Unknown operation {name!r}. Valid operations: {', '.join(self._ops)}.",
                valid=self.names(),
            ) from None

    def overview(
        self, settings: Settings, store: JobLister, watermarks: StateReader
    ) -> list[OperationInfo]:
        """Every operation with its last job and its watermark (for the API and the CLI)."""
        out = []
        for op in self._ops.values():
            last = store.list_jobs(operation=op.name, limit=1)
            source = op.source_uri(settings)
            states = watermarks.for_operation(op.name)
            spellings = {source}  # jobs store sources canonical (storage.canonical_uri)
            with contextlib.suppress(LakesyncError):
                spellings.add(canonical_uri(source))
            state = next(
                (s for s in states if s.source in spellings), states[0] if states else None
            )
            shown = None
            if state is not None:
                w = state.watermark
                shown = {
                    "column": w.column,
                    "kind": w.kind,
                    "value": w.iso or w.value,
                    "source": masked(state.source),
                    "jobId": state.jobId,
                }
                if state.deltaVersion is not None:
                    shown["deltaVersion"] = state.deltaVersion
                if state.icebergSnapshotId is not None:
                    shown["icebergSnapshotId"] = state.icebergSnapshotId
            out.append(
                OperationInfo(
                    name=op.name,
                    description=op.description,
                    source=masked(source),
                    format=op.format,
                    collection=op.collection,
                    key=op.schema_.key,
                    batchSize=op.batchSize,
                    mode=op.mode,
                    watermarkColumn=op.watermark,
                    lookback=op.lookback,
                    watermark=shown,
                    lastJob=last[0].public() if last else None,
                )
            )
        return out


class OperationInfo(BaseModel):
    """What GET /api/operations and `lakesync operations` show about one operation."""

    name: str
    description: str
    source: str
    format: str | None
    collection: str
    key: str | list[str]
    batchSize: int | None
    mode: Mode
    watermarkColumn: str | None
    lookback: str | int | None = None  # how far before the watermark incremental copies read
    #: column, kind, value (ISO time or number), source, jobId, and a Delta table's version
    #: or an Iceberg table's snapshot
    watermark: dict[str, Any] | None
    lastJob: dict[str, Any] | None
    #: its schedule (cron or interval, time zone, paused, last run and result), if any
    schedule: dict[str, Any] | None = None
    nextRun: str | None = None  # ISO 8601 UTC; None when unscheduled or paused


# -- lakesync.toml ---------------------------------------------------------------------------

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
_COLLECTION = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,119}")
#: lakesync's own collections, and the prefix of its temporary ones
RESERVED = {
    "jobstatuses",
    "copyerrors",
    "idempotencykeys",
    "syncstate",
    "jobpartitions",
    "jobplans",
    "joblogs",
    "schedules",
    "scheduleslots",
    "notifications",
}
_RESERVED_PREFIXES = ("mirrorseen_", "system.")
_WATERMARK_TYPES = ("timestamp", "int", "any")
#: declared types a CSV column is read as text for (validation converts it)
_TEXT_READ = ("string", "int", "float", "bool")


class FieldConfig(BaseModel):
    """One field of a declared schema, as written in lakesync.toml."""

    model_config = ConfigDict(extra="forbid")

    type: FieldType = "any"
    required: bool = False  # the column must exist and hold a value
    nullable: bool | None = None  # default: nulls allowed unless required
    min: float | None = None
    allowed: list[str] | None = None
    nonEmpty: bool = False


class SchemaConfig(BaseModel):
    """The `schema` table of a declared operation."""

    model_config = ConfigDict(extra="forbid")

    fields: dict[str, FieldConfig] = Field(default_factory=dict)
    keepExtra: bool = False  # also copy columns the schema does not declare


class OperationConfig(Unattended):
    """One `[operations.<name>]` table of lakesync.toml."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    description: str = ""
    source: str | None = Field(None, min_length=1)
    format: (
        Literal["parquet", "pq", "csv", "json", "jsonl", "ndjson", "orc", "delta", "iceberg"] | None
    ) = None
    catalog: str | None = Field(None, min_length=1)  # an Iceberg table through [catalogs.NAME]
    table: str | None = Field(None, min_length=1)  # ... its "namespace.table"
    collection: str
    key: str | list[str] = Field(min_length=1)  # a list: a composite _id, in this order
    batchSize: int | None = Field(None, ge=1, le=100_000)
    mode: Mode = "full"
    watermark: str | None = Field(None, min_length=1)
    lookback: StrictStr | StrictInt | None = None
    schema_: SchemaConfig | None = Field(None, alias="schema")
    encoding: StrictStr | None = Field(None, min_length=1)
    delimiter: StrictStr | None = None
    header: StrictBool | None = None


def load_operations(path: Path) -> list[Operation]:
    """The operations declared in a TOML file; ConfigError naming the file, operation, field."""
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}. Fix the file and start again.") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot be read: {e.strerror or e}.") from None
    unknown = [k for k in data if k not in ("operations", "catalogs")]
    if unknown:
        raise ConfigError(
            f"{path}: unknown top-level key {unknown[0]!r}; declare each operation as an "
            "[operations.<name>] table (and Iceberg catalogs as [catalogs.<name>] tables)."
        )
    tables = data.get("operations", {})
    if not isinstance(tables, dict):
        raise ConfigError(f"{path}: `operations` must be a table of [operations.<name>] tables.")
    catalogs = _catalogs(path, data.get("catalogs", {}))
    return [_operation(path, name, table, catalogs) for name, table in tables.items()]


def _catalogs(path: Path, tables: Any) -> dict[str, dict[str, str]]:
    """The ``[catalogs.NAME]`` tables: pyiceberg catalog properties, as strings."""
    if not isinstance(tables, dict):
        raise ConfigError(f"{path}: `catalogs` must be a table of [catalogs.<name>] tables.")
    out = {}
    for name, table in tables.items():
        if not _NAME.fullmatch(name):
            raise ConfigError(
                f"{path}: catalog {name!r}: the name may hold letters, digits, '.', '_' and "
                "'-' (at most 100)."
            )
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: catalog {name!r}: must be a table ([catalogs.{name}]).")
        props = {}
        for key, value in table.items():
            if isinstance(value, bool):
                value = "true" if value else "false"
            if not isinstance(value, str | int | float):
                raise ConfigError(
                    f"{path}: catalog {name!r}: {key}: a pyiceberg catalog property is a "
                    f"string, number or boolean, not {type(value).__name__} (got {value!r})."
                )
            props[key] = str(value)
        out[name] = props
    return out


def _operation(
    path: Path, name: str, table: Any, catalogs: dict[str, dict[str, str]] | None = None
) -> Operation:
    def fail(problem: str) -> ConfigError:
        return ConfigError(f"{path}: operation {name!r}: {problem}", operation=name)

    if name == COPY_TASKDETAIL.name:
        raise fail("is built in and cannot be redeclared; give your operation another name.")
    if not _NAME.fullmatch(name):
        raise fail("the name may hold letters, digits, '.', '_' and '-' (at most 100).")
    if not isinstance(table, dict):
        raise fail(f"must be a table ([operations.{name}]), not a value.")
    try:
        cfg = OperationConfig.model_validate(table)
    except ValidationError as e:
        raise fail("; ".join(_problem(item) for item in e.errors())) from None
    if not _COLLECTION.fullmatch(cfg.collection):
        raise fail(
            f"collection {cfg.collection!r} is not a valid collection name (letters, "
            "digits, '_', '.' and '-', starting with a letter or '_')."
        )
    if cfg.collection in RESERVED or cfg.collection.startswith(_RESERVED_PREFIXES):
        raise fail(f"collection {cfg.collection!r} is used by lakesync itself; choose another.")
    if cfg.mode == "incremental" and cfg.watermark is None:
        raise fail('watermark is required when mode is incremental (e.g. watermark = "updatedAt").')
    keys = [cfg.key] if isinstance(cfg.key, str) else cfg.key
    if not all(keys) or len(set(keys)) != len(keys):
        raise fail(f"key {cfg.key!r}: name one column, or a list of distinct columns.")
    if cfg.mode == "mirror" and len(keys) > 1:
        raise fail("mode mirror needs a single key column; a composite key copies in mode full.")
    check_unattended(cfg, fail)  # schedule, every, timezone, notify, on, allowEmpty
    fields = _fields(cfg, fail)
    _check_lookback(cfg, fail)
    catalog = _catalog_table(cfg, catalogs or {}, fail)
    csv = _csv_settings(cfg, fail)
    source = cfg.source
    if source is not None and "://" not in source:  # relative to the file, not the working dir
        source = os.path.abspath(path.parent / Path(source).expanduser())
    schema = RecordSchema(
        key=cfg.key, fields=fields, keepExtra=cfg.schema_.keepExtra if cfg.schema_ else False
    )
    return Operation(
        name=name,
        description=cfg.description,
        source=source,
        format=cfg.format,
        collection=cfg.collection,
        schema_=schema,
        batchSize=cfg.batchSize,
        mode=cfg.mode,
        watermark=cfg.watermark,
        lookback=cfg.lookback,
        catalog=catalog,
        declared=tuple(cfg.schema_.fields) if cfg.schema_ else (),
        **csv,
        **cfg.model_dump(include=set(Unattended.model_fields)),
    )


def _catalog_table(
    cfg: OperationConfig, catalogs: dict[str, dict[str, str]], fail: Any
) -> CatalogTable | None:
    """The Iceberg table an operation names through ``catalog`` and ``table``, checked."""
    if cfg.catalog is None:
        if cfg.table is not None:
            raise fail(
                f'table {cfg.table!r} needs a catalog: add catalog = "NAME" and a '
                "[catalogs.NAME] table, or name the table's folder in `source`."
            )
        return None
    if cfg.source is not None:
        raise fail(
            "give either source (a metadata file or table folder) or catalog and table, not both."
        )
    if cfg.format not in (None, "iceberg"):
        raise fail(f"format {cfg.format!r}: a catalog names an Iceberg table (format iceberg).")
    if cfg.table is None:
        raise fail(f'catalog {cfg.catalog!r} needs table = "namespace.table".')
    if "." not in cfg.table.strip(".") or any(ord(c) < 32 for c in cfg.table):
        raise fail(f'table {cfg.table!r}: name it as "namespace.table".')
    if cfg.catalog not in catalogs:
        declared = ", ".join(sorted(catalogs)) or "none"
        raise fail(
            f"catalog {cfg.catalog!r} is not declared: add a [catalogs.{cfg.catalog}] table "
            f"of pyiceberg catalog properties (declared: {declared})."
        )
    return CatalogTable(cfg.catalog, cfg.table, catalogs[cfg.catalog])


_DURATION = re.compile(r"(?:\d+(?:ms|s|m|h|d|w))+")
_DURATION_PART = re.compile(r"(\d+)(ms|s|m|h|d|w)")
_UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000, "w": 604_800_000}


def duration_ms(text: str) -> int | None:
    """Milliseconds of a duration such as "90s", "2h", "1d" or "1h30m"; None if it is none."""
    text = text.strip()
    if not _DURATION.fullmatch(text):
        return None
    return sum(int(n) * _UNIT_MS[unit] for n, unit in _DURATION_PART.findall(text))


def _check_lookback(cfg: OperationConfig, fail: Any) -> None:
    """A lookback needs a watermark and fits its type: a duration, or a number of integers."""
    lookback = cfg.lookback
    if lookback is None:
        return
    if cfg.watermark is None:
        raise fail('lookback needs a watermark column (e.g. watermark = "updatedAt").')
    if isinstance(lookback, str) and duration_ms(lookback) is None:
        raise fail(
            f"lookback {lookback!r} is not a duration: write a number and a unit "
            '(ms, s, m, h, d, w), e.g. "2h", "1d" or "1h30m".'
        )
    if isinstance(lookback, int) and lookback < 0:
        raise fail(f"lookback {lookback} is negative; give how far below the watermark to read.")
    declared = cfg.schema_.fields.get(cfg.watermark) if cfg.schema_ else None
    if declared is not None and declared.type == "int" and isinstance(lookback, str):
        raise fail(
            f"lookback {lookback!r} is a duration, but watermark {cfg.watermark!r} is "
            "an int field: give a number (e.g. lookback = 100)."
        )
    if declared is not None and declared.type == "timestamp" and isinstance(lookback, int):
        raise fail(
            f"lookback {lookback} is a number, but watermark {cfg.watermark!r} is a "
            'timestamp field: give a duration (e.g. lookback = "2h").'
        )


def _csv_settings(cfg: OperationConfig, fail: Any) -> dict[str, Any]:
    """The CSV settings given (encoding, delimiter, header), checked."""
    given = cfg.model_dump(include={"encoding", "delimiter", "header"}, exclude_none=True)
    if given and cfg.format not in (None, "csv"):
        raise fail(
            f"{', '.join(given)} only apply to CSV files, and this operation reads "
            f'{cfg.format}: remove them, or set format = "csv".'
        )
    if cfg.encoding is not None:
        try:
            check_encoding(cfg.encoding)
        except LookupError:
            raise fail(
                f"encoding {cfg.encoding!r} is not an encoding Python knows; use e.g. "
                '"utf-8" (the default), "latin-1" or "cp1252".'
            ) from None
    if cfg.delimiter is not None and (len(cfg.delimiter) != 1 or cfg.delimiter in '"\r\n'):
        raise fail(
            f"delimiter {cfg.delimiter!r} must be one character other than a quote or a "
            'line break, e.g. ";", "|" or "\\t" (a tab).'
        )
    return given


def _fields(cfg: OperationConfig, fail: Any) -> list[FieldRule]:
    """The schema's field rules; the key is always required (it becomes `_id`)."""
    declared = cfg.schema_.fields if cfg.schema_ else {}
    keys = [cfg.key] if isinstance(cfg.key, str) else cfg.key
    rules = []
    for name, f in declared.items():
        where = f"schema.fields.{name}"
        if f.min is not None and f.type not in ("float", "int"):
            raise fail(f"{where}: min only applies to float and int fields, not {f.type}.")
        if f.allowed is not None and f.type != "string":
            raise fail(f"{where}: allowed only applies to string fields, not {f.type}.")
        if name == cfg.watermark and f.type not in _WATERMARK_TYPES:
            raise fail(
                f"watermark {name!r} is a {f.type} field; a watermark must be a "
                "timestamp or int field."
            )
        is_key = name in keys
        required = f.required or is_key
        nullable = (not required if f.nullable is None else f.nullable) and not is_key
        rules.append(
            FieldRule(
                name=name,
                type=f.type,
                required=required,
                nullable=nullable,
                min=f.min,
                allowed=f.allowed,
                nonEmpty=f.nonEmpty,
            )
        )
    for key in reversed(keys):  # the key must be validated like the engine uses it
        if rules and key not in declared:
            rules.insert(0, FieldRule(name=key, required=True, nullable=False))
    return rules


def _problem(item: Any) -> str:
    """One pydantic error as `field problem`, in the file's own terms."""
    where = ".".join(str(p) for p in item["loc"])
    if item["type"] == "missing":
        return f"{where} is required"
    if item["type"] == "extra_forbidden":
        *parent, last = [str(p) for p in item["loc"]]
        inside = f"{'.'.join(parent)}: " if parent else ""
        return f"{inside}unknown field {last!r}"
    msg = str(item["msg"])
    return f"{where}: {msg[0].lower()}{msg[1:]} (got {item.get('input')!r})"


def parse_options(raw: Any) -> JobOptions:
    """Validate job options, raising RequestError that names the bad option."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise RequestError('"options" must be a JSON object, e.g. {"batchSize": 1000}.')
    try:
        return JobOptions.model_validate(raw)
    except ValidationError as e:
        problems = []
        for item in e.errors():
            where = ".".join(str(p) for p in item["loc"]) or "options"
            msg = "is not an accepted option" if item["type"] == "extra_forbidden" else item["msg"]
            problems.append(f"options.{where} {msg}")
        internal = ("sinceDeltaVersion", "sinceIcebergSnapshotId")
        accepted = ", ".join(f for f in JobOptions.model_fields if f not in internal)
        raise RequestError(
            f"Invalid job options: {'; '.join(problems)}. Accepted options: {accepted}.",
            problems=problems,
        ) from None
