"""The data-lake reader: list, count and stream records from Parquet, CSV or NDJSON files.

A lake is a directory (hive partitions such as ``projectId=P-003/`` become string columns),
a single file, a glob, or ``s3://bucket/prefix``. Each file is read through its own
``pyarrow.dataset`` fragment with its own physical schema, so one odd file does not change
how the others are read, and batches stream with bounded memory.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.fs as pafs

from lakesync.config import Settings, get_settings
from lakesync.errors import SourceError

logger = logging.getLogger(__name__)

_EXTENSIONS = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".json": "json"}
_EXTENSIONS |= {".jsonl": "json", ".ndjson": "json"}
_FORMATS = {"parquet": ds.ParquetFileFormat, "csv": ds.CsvFileFormat, "json": ds.JsonFileFormat}
_ALIASES = {"pq": "parquet", "jsonl": "json", "ndjson": "json"} | {f: f for f in _FORMATS}
_GLOB = {"**/": "(?:[^/]*/)*", "**": ".*", "*": "[^/]*", "?": "[^/]"}
#: Decode at most two record batches ahead of the consumer: memory stays flat.
_STREAMING = {"batch_readahead": 2, "fragment_readahead": 1}
_INSPECT_THREADS = 16  # footers / headers read in parallel at open (matters on S3)
_MISSING = ("NO_SUCH_KEY", "Path does not exist", "No such file")


@dataclass(frozen=True)
class Position:
    """A checkpoint in the lake: a file index and the rows of that file already consumed."""

    file_index: int = 0
    row: int = 0


@dataclass
class LakeBatch:
    """Up to batch_size rows of one file, starting at row ``start_row`` of that file."""

    table: pa.Table
    file: str
    file_index: int
    start_row: int

    @property
    def end(self) -> Position:
        """The position just after this batch: where a resumed read starts."""
        return Position(self.file_index, self.start_row + int(self.table.num_rows))


class Lake:
    """A sorted set of same-format data files read as one stream; build it with ``open``."""

    def __init__(
        self,
        uri: str,
        fmt: str,
        files: list[str],
        fragments: list[Any],
        schemas: list[pa.Schema],
        endpoint: str | None,
    ) -> None:
        self.uri, self.format, self.files = uri, fmt, files
        self._fragments, self._schemas, self._endpoint = fragments, schemas, endpoint
        self._row_counts: list[int] | None = None
        try:
            self.schema: pa.Schema = pa.unify_schemas(schemas, promote_options="permissive")
        except (pa.ArrowException, TypeError):  # e.g. a column is double here, string there
            fields: dict[str, pa.Field] = {}
            for field in (f for schema in schemas for f in schema):
                fields.setdefault(field.name, field)
            self.schema = pa.schema(list(fields.values()))

    @classmethod
    def open(cls, uri: str, *, format: str | None = None, settings: Settings | None = None) -> Lake:
        """List and inspect the lake at ``uri``; raise SourceError if it cannot be read."""
        if format is not None and format.lower() not in _ALIASES:
            raise SourceError(f"Unknown lake format {format!r}: use parquet, csv or json.")
        fs, path, prefix, endpoint = _filesystem(uri, settings or get_settings())
        segments = path.split("/")
        glob_at = next((i for i, s in enumerate(segments) if any(c in s for c in "*?[")), None)
        base, pattern = path, None
        if glob_at is not None:
            base = "/".join(segments[:glob_at]) or "/"
            pattern = _glob_regex("/".join(segments[glob_at:]))
        try:
            found, single = _list_files(fs, base, pattern, prefix)
        except (OSError, pa.ArrowException) as e:
            raise _read_error(e, prefix + base, "", endpoint, listing=True) from e
        fmt = _choose_format([prefix + p for p in found], format, prefix + base, single)
        if not single and any(_format_of(p) for p in found):
            found = [p for p in found if _format_of(p) == fmt]  # skip README.md, *.crc...
        if not found:
            raise SourceError(
                f"No data files found in {prefix + path}: expected .parquet/.pq, .csv or "
                ".json/.jsonl/.ndjson files (hidden and _-prefixed files are skipped). "
                "Check the path or the glob.",
                uri=uri,
            )
        root = base.rsplit("/", 1)[0] if single else base
        file_format = _FORMATS[fmt]()

        def inspect(path: str) -> tuple[Any, pa.Schema]:
            keys = _partition(path[len(root) :].lstrip("/"))
            expr = None
            for key, value in keys:
                term = pc.field(key).is_null() if value is None else pc.field(key) == value
                expr = term if expr is None else expr & term
            try:
                fragment = file_format.make_fragment(path, filesystem=fs, partition_expression=expr)
                schema = fragment.physical_schema  # Parquet: reads and caches the footer
            except (pa.ArrowException, OSError) as e:
                raise _read_error(e, prefix + path, fmt, endpoint) from e
            for key, _ in keys:
                if key not in schema.names:
                    schema = schema.append(pa.field(key, pa.string()))
            return fragment, schema

        with ThreadPoolExecutor(max_workers=min(_INSPECT_THREADS, len(found))) as pool:
            inspected = list(pool.map(inspect, found))
        logger.info("Opened lake %s: %d %s file(s)", prefix + path, len(found), fmt)
        fragments, schemas = [f for f, _ in inspected], [s for _, s in inspected]
        return cls(uri, fmt, [prefix + p for p in found], fragments, schemas, endpoint)

    def has_column(self, name: str) -> bool:
        """Whether some file of the lake (or a partition key) has this column."""
        return name in self.schema.names

    def file_row_counts(self) -> list[int]:
        """Rows per file, unfiltered (Parquet: from the footers, no data read)."""
        if self._row_counts is None:
            if self.format == "parquet":
                self._row_counts = [int(f.metadata.num_rows) for f in self._fragments]
            else:
                self._row_counts = [
                    int(self._guard(i, f.count_rows)) for i, f in enumerate(self._fragments)
                ]
        return list(self._row_counts)

    def count_rows(self, filter: pc.Expression | None = None) -> int:
        """Rows after ``filter``, counted exactly as ``batches`` counts them."""
        if filter is None:
            return sum(self.file_row_counts())
        total = 0
        for i, (fragment, schema) in enumerate(zip(self._fragments, self._schemas, strict=True)):
            scanner = self._guard(
                i, ds.Scanner.from_fragment, fragment, schema=schema, filter=filter
            )
            total += int(self._guard(i, scanner.count_rows))
        return total

    def batches(
        self,
        batch_size: int,
        start: Position = Position(),
        *,
        stop_file: int | None = None,
        filter: pc.Expression | None = None,
        columns: list[str] | None = None,
    ) -> Iterator[LakeBatch]:
        """Stream batches of exactly ``batch_size`` rows (fewer at a file's end) from ``start``."""
        if batch_size < 1 or start.file_index < 0 or start.row < 0:
            raise ValueError(f"invalid batch_size {batch_size} or start {start}")
        if columns is not None and (missing := [c for c in columns if not self.has_column(c)]):
            raise SourceError(
                f"Column(s) {missing} are not in the lake {self.uri}, which has "
                f"{self.schema.names}. Fix the column names.",
                uri=self.uri,
            )
        stop = len(self.files) if stop_file is None else min(stop_file, len(self.files))
        for index in range(start.file_index, stop):
            skip = start.row if index == start.file_index else 0
            yield from self._file_batches(index, batch_size, skip, filter, columns)

    def _file_batches(
        self,
        index: int,
        size: int,
        skip: int,
        filter: pc.Expression | None,
        columns: list[str] | None,
    ) -> Iterator[LakeBatch]:
        fragment, schema, offset = self._fragments[index], self._schemas[index], skip
        if columns is not None:  # a column some other file has is simply absent here
            columns = [c for c in columns if c in schema.names]
        if skip and filter is None and self.format == "parquet":
            groups, first = fragment.row_groups, 0
            while first < len(groups) and groups[first].num_rows <= skip:
                skip -= groups[first].num_rows
                first += 1
            if first:  # row groups before the start position are never read
                fragment = fragment.subset(row_group_ids=[g.id for g in groups[first:]])
        scan = {"schema": schema, "columns": columns, "filter": filter, "batch_size": size}
        source = iter(self._guard(index, fragment.to_batches, **scan, **_STREAMING))
        pending: list[pa.RecordBatch] = []
        pending_rows = 0
        while (batch := self._guard(index, next, source, None)) is not None:
            if skip:
                if batch.num_rows <= skip:
                    skip -= batch.num_rows
                    continue
                batch, skip = batch.slice(skip), 0
            if batch.num_rows:
                pending.append(batch)
                pending_rows += batch.num_rows
            while pending_rows >= size:
                table = pa.Table.from_batches(pending)
                yield LakeBatch(table.slice(0, size), self.files[index], index, offset)
                offset += size
                rest = table.slice(size)
                pending, pending_rows = rest.to_batches(), rest.num_rows
        if pending_rows:
            yield LakeBatch(pa.Table.from_batches(pending), self.files[index], index, offset)
        if skip:
            logger.warning("Start row %d is past the end of %s", offset, self.files[index])

    def _guard(self, index: int, call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return call(*args, **kwargs)
        except (pa.ArrowException, OSError) as e:
            raise _read_error(e, self.files[index], self.format, self._endpoint) from e


def _format_of(name: str) -> str | None:
    lower = name.lower()
    return next((fmt for ext, fmt in _EXTENSIONS.items() if lower.endswith(ext)), None)


def _glob_regex(pattern: str) -> re.Pattern[str]:
    """Glob to regex: ``**`` spans directories, ``*``, ``?`` and ``[...]`` stay inside one."""
    tokens = re.split(r"(\*\*/|\*\*|\*|\?|\[[^]/]+\])", pattern)
    return re.compile(
        "".join(
            _GLOB.get(t) or (t.replace("[!", "[^", 1) if t.startswith("[") else re.escape(t))
            for t in tokens
        )
    )


def _partition(rel: str) -> list[tuple[str, str | None]]:
    """Hive ``key=value`` directory segments of a path relative to the lake root."""
    pairs = [seg.split("=", 1) for seg in rel.split("/")[:-1] if "=" in seg]
    return [
        (unquote(k), None if v == "__HIVE_DEFAULT_PARTITION__" else unquote(v))
        for k, v in pairs
        if k
    ]


def _list_files(
    fs: Any, base: str, pattern: re.Pattern[str] | None, prefix: str
) -> tuple[list[str], bool]:
    """Sorted file paths under ``base`` (or base itself), and whether base is one file."""
    info = fs.get_file_info(base)
    if info.type == pafs.FileType.NotFound and prefix:
        bucket = base.split("/", 1)[0]
        if fs.get_file_info(bucket).type == pafs.FileType.NotFound:
            raise SourceError(
                f"S3 bucket s3://{bucket} does not exist (or these credentials "
                "cannot see it). Check the bucket name in the source URI and "
                "LAKESYNC_S3_ENDPOINT_URL."
            )
    if info.type == pafs.FileType.NotFound:
        raise SourceError(
            f"Data lake path {prefix + base} does not exist. Check "
            "LAKESYNC_LAKE_URI or the source option (a directory, a file, a glob "
            "or s3://bucket/prefix)."
        )
    if info.type == pafs.FileType.File and pattern is None:
        return [base], True
    found = []
    for item in fs.get_file_info(pafs.FileSelector(base, recursive=True)):
        rel = item.path[len(base) :].lstrip("/")
        if item.type != pafs.FileType.File or any(s.startswith((".", "_")) for s in rel.split("/")):
            continue  # hidden files, _SUCCESS, _delta_log/, _common_metadata...
        if pattern is None or pattern.fullmatch(rel):
            found.append(item.path)
    return sorted(found), False


def _choose_format(found: list[str], given: str | None, where: str, single: bool) -> str:
    by_format: dict[str, list[str]] = {}
    for path in found:
        if (fmt := _format_of(path)) is not None:
            by_format.setdefault(fmt, []).append(path)
    if given is not None:
        by_format.pop(_ALIASES[given.lower()], None)
        if single or not by_format:
            return _ALIASES[given.lower()]
    if len(by_format) > 1 or given is not None:
        kinds = ", ".join(f"{len(v)} {k} (e.g. {v[0]})" for k, v in sorted(by_format.items()))
        raise SourceError(
            f"Mixed file formats in {where}: {kinds}"
            f"{f' besides the {given} files asked for' if given else ''}. A lake "
            "holds one format: point the source at one of them with a glob such "
            f"as {where.rstrip('/')}/**/*.parquet.",
            where=where,
        )
    return next(iter(by_format), "parquet")


def _read_error(
    error: BaseException, file: str, fmt: str, endpoint: str | None, listing: bool = False
) -> SourceError:
    text = str(error)
    if not listing and (isinstance(error, FileNotFoundError) or any(m in text for m in _MISSING)):
        message = (
            f"Data file {file} no longer exists (deleted or replaced after the lake was "
            "listed). Start the copy again so that the lake is listed afresh."
        )
    elif file.startswith("s3://") and isinstance(error, OSError):
        if "ACCESS_DENIED" in text or "INVALID_ACCESS_KEY" in text or "SIGNATURE" in text:
            message = (
                f"Access to {file} was denied. Check AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN), and that they allow "
                "s3:ListBucket and s3:GetObject."
            )
        elif "NETWORK_CONNECTION" in text or "curlCode" in text:
            message = (
                f"The S3 endpoint {endpoint or '(AWS default)'} is unreachable while "
                f"reading {file}. Check LAKESYNC_S3_ENDPOINT_URL and that the server is "
                "running and reachable."
            )
        else:
            message = f"Cannot read {file}: {text}. Check the URI, credentials and endpoint."
    elif "FieldRef" in text:
        message = f"The filter names a column {file} does not have ({text}). Fix the filter."
    elif isinstance(error, OSError):
        message = f"Cannot read {file}: {text}. Check that it exists and is readable."
    else:
        message = (
            f"{file} is not a valid {fmt} file or holds bad data ({text}). Fix or "
            "remove it, or exclude it from the source with a glob."
        )
    return SourceError(message, file=file)


def _filesystem(uri: str, settings: Settings) -> tuple[Any, str, str, str | None]:
    """(filesystem, path inside it, display prefix, S3 endpoint) for a lake URI."""
    parts = urlsplit(uri)
    if parts.scheme == "s3":
        if "@" in parts.netloc or not parts.netloc:
            raise SourceError(
                "Invalid S3 URI: use s3://bucket/prefix, and give credentials "
                "with AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, never in the URI."
            )
        options: dict[str, Any] = {"connect_timeout": 10.0, "request_timeout": 60.0}
        options["retry_strategy"] = pafs.AwsStandardS3RetryStrategy(max_attempts=3)
        endpoint = settings.s3_endpoint_url
        if endpoint:  # "http://host:9000" -> endpoint_override="host:9000", scheme="http"
            ep = urlsplit(endpoint if "://" in endpoint else f"https://{endpoint}")
            endpoint = f"{ep.hostname}:{ep.port}" if ep.port else str(ep.hostname)
            options |= {"endpoint_override": endpoint, "scheme": ep.scheme}
        if settings.s3_region:
            options["region"] = settings.s3_region
        elif not endpoint:  # AWS answers a bucket in another region with redirects
            with contextlib.suppress(OSError, pa.ArrowException):
                options["region"] = pafs.resolve_s3_region(parts.netloc)
        try:
            fs = pafs.S3FileSystem(**options)
        except (OSError, pa.ArrowException) as e:
            raise SourceError(
                f"Cannot set up S3 access: {e}. Check LAKESYNC_S3_ENDPOINT_URL "
                "and LAKESYNC_S3_REGION."
            ) from e
        return fs, f"{parts.netloc}{parts.path}".rstrip("/"), "s3://", endpoint
    if parts.scheme == "file":
        uri = unquote(parts.path)
    elif len(parts.scheme) > 1:  # one letter is a Windows drive
        raise SourceError(
            f"Unsupported lake URI scheme {parts.scheme}://: use a local "
            "path, a glob or s3://bucket/prefix."
        )
    return pafs.LocalFileSystem(), Path(uri).expanduser().absolute().as_posix(), "", None
