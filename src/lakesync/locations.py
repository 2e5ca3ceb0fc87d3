"""Where a lake lives: a local path or an ``s3://`` URI resolved to a pyarrow filesystem.

Also the allowed-roots check (the same rules for local paths and S3) and the messages of
storage failures. Credentials come from the standard AWS chain (``AWS_ACCESS_KEY_ID`` /
``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN``, ``AWS_PROFILE``, instance roles): never
from a URI or job options, and never shown in a message.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import botocore.exceptions as bex
import pyarrow as pa
import pyarrow.fs as pafs

from lakesync.config import Settings
from lakesync.errors import SourceError, TransientSourceError
from lakesync.masking import masked

logger = logging.getLogger(__name__)

#: a GET without a HEAD before it (the size came from the listing) says RESOURCE_NOT_FOUND
_MISSING = ("NO_SUCH_KEY", "NoSuchKey", "Path does not exist", "No such file", "RESOURCE_NOT_FOUND")
_DENIED = (
    *("ACCESS_DENIED", "INVALID_ACCESS_KEY", "SIGNATURE", "AccessDenied", "Forbidden"),
    *("InvalidAccessKeyId", "SignatureDoesNotMatch", "Missing AccessKeyId"),
)
_UNREACHABLE = (
    *("NETWORK_CONNECTION", "curlCode", "error sending request", "Connection refused"),
    *("connection closed", "tcp connect", "dns error", "timed out", "Timeout"),
    *("Could not connect", "Read timeout", "Connect timeout", "ConnectionClosedError"),
    *("Connection was closed", "Connection broken", "IncompleteRead", "ResponseStreamingError"),
    *("Connection reset", "ConnectionResetError"),
)
_NO_CREDENTIALS = (
    *("169.254.169.254", "Missing AccessKeyId", "NoCredentialProviders"),
    *("Unable to locate credentials", "No credentials"),
)
_BUSY = (
    *("SLOW_DOWN", "SlowDown", "SERVICE_UNAVAILABLE", "ServiceUnavailable"),
    *("INTERNAL_FAILURE", "InternalError"),
)
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


@dataclass(frozen=True)
class Location:
    """A lake URI resolved: its filesystem, the path inside it, how to show paths."""

    fs: Any
    path: str  # "/abs/dir" locally, "bucket/key/prefix" on S3 (may hold a glob)
    prefix: str = ""  # "s3://" on S3: prefix + path is the URI shown to users
    endpoint: str | None = None  # S3 host[:port] when LAKESYNC_S3_ENDPOINT_URL is set
    #: deltalake (object_store) options for the same endpoint and region; never credentials.
    storage_options: dict[str, str] = field(default_factory=dict)
    #: S3: small objects read whole in one GET (None locally)
    objects: WholeObjects | None = None

    @property
    def is_s3(self) -> bool:
        """Whether the lake is on S3 (or an S3-compatible server)."""
        return self.prefix == "s3://"

    def show(self, path: str) -> str:
        """The user-facing URI of a path inside this filesystem."""
        return self.prefix + path


def resolve(uri: str, settings: Settings) -> Location:
    """The filesystem and path of a lake URI (a local path, ``file://`` or ``s3://``)."""
    parts = urlsplit(uri)
    if parts.scheme == "s3":
        _check_s3_uri(uri)
        key = "/".join(s for s in parts.path.split("/") if s)  # "//" is no S3 "directory"
        return _s3(parts.netloc, f"{parts.netloc}/{key}".rstrip("/"), settings)
    return Location(pafs.LocalFileSystem(), _local_path(uri))


def _local_path(uri: str) -> str:
    parts = urlsplit(uri)
    if parts.scheme == "file":
        uri = unquote(parts.path)
    elif len(parts.scheme) > 1:  # one letter is a Windows drive
        raise SourceError(
            f"Unsupported lake URI scheme {parts.scheme}://: use a local "
            "path, a glob or s3://bucket/prefix."
        )
    return Path(uri).expanduser().absolute().as_posix()


def _check_s3_uri(uri: str) -> None:
    parts = urlsplit(uri)
    if "@" in parts.netloc or not parts.netloc or parts.query or parts.fragment:
        raise SourceError(
            "Invalid S3 URI: use s3://bucket/prefix (no user, query string or fragment). "
            "Credentials come from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or "
            "AWS_PROFILE in lakesync's environment, never from the URI."
        )


def _s3(bucket: str, path: str, settings: Settings) -> Location:
    options: dict[str, Any] = {"connect_timeout": 10.0, "request_timeout": 60.0}
    options["retry_strategy"] = pafs.AwsStandardS3RetryStrategy(max_attempts=3)
    delta = {"timeout": "60s", "connect_timeout": "10s", "max_retries": "2"}
    endpoint = settings.s3_endpoint_url
    if endpoint:  # "http://host:9000" -> endpoint_override="host:9000", scheme="http"
        ep = urlsplit(endpoint if "://" in endpoint else f"https://{endpoint}")
        endpoint = f"{ep.hostname}:{ep.port}" if ep.port else str(ep.hostname)
        options |= {"endpoint_override": endpoint, "scheme": ep.scheme}
        delta["AWS_ENDPOINT_URL"] = f"{ep.scheme}://{endpoint}"
        if ep.scheme == "http":
            delta["AWS_ALLOW_HTTP"] = "true"
    region = settings.s3_region
    if not region and not endpoint:  # AWS answers a bucket in another region with redirects
        with contextlib.suppress(OSError, pa.ArrowException):
            region = pafs.resolve_s3_region(bucket)
    if region:
        options["region"] = delta["AWS_REGION"] = region
    try:
        fs = pafs.S3FileSystem(**options)
    except (OSError, pa.ArrowException) as e:
        raise SourceError(
            f"Cannot set up S3 access: {masked(str(e))}. Check "
            "LAKESYNC_S3_ENDPOINT_URL and LAKESYNC_S3_REGION."
        ) from e
    url = delta.get("AWS_ENDPOINT_URL")  # scheme, host and port: no path, as pyarrow's
    objects = WholeObjects(url, getattr(fs, "region", None) or region)
    return Location(fs, path, "s3://", endpoint, delta, objects)


@dataclass(frozen=True)
class WholeObjects:
    """S3 objects read whole, one GET each, for files whose size the listing gave.

    pyarrow reads a small Parquet file in two requests at best (its footer, then the
    data): its Python API opens a file by path only, with a HEAD first, and a dataset
    fragment given the size reads the footer apart. A lake of many small files paid that
    per file, at open and again at the copy. botocore takes the object's key alone; the
    bytes are then parsed from memory (``pa.BufferReader``), so a small file costs one
    request each time it is read. Credentials come from the same AWS chain; where
    botocore finds none (or is not installed) ``get`` answers None and the file is read
    through pyarrow as before.
    """

    endpoint_url: str | None
    region: str | None

    def get(self, path: str, size: int | None = None) -> pa.Buffer | None:
        """``bucket/key`` read whole, or None when botocore cannot read it with credentials
        (none found, a profile it cannot find...: pyarrow reads it then). A missing object,
        or one whose size is no longer ``size`` (the listing's), raises FileNotFoundError,
        any other failure OSError, worded for ``read_error``."""
        client = _client(self.endpoint_url, self.region)
        if client is None:
            return None
        bucket, _, key = path.partition("/")
        try:
            body = client.get_object(Bucket=bucket, Key=key)["Body"]
            try:
                data = body.read()
            finally:
                body.close()
        except _CREDENTIALS_ERRORS as e:
            _no_client(self.endpoint_url, self.region, e)
            return None
        except bex.ClientError as e:
            raise _client_error(e) from e
        except OSError:
            raise
        except Exception as e:  # botocore's and urllib3's own errors: a failed read
            raise OSError(f"{type(e).__name__}: {e}") from e
        if size is not None and len(data) != size:
            raise FileNotFoundError(
                f"the object is now {len(data):,} bytes, {size:,} when the lake was listed"
            )
        return pa.py_buffer(data)


def _client_error(error: Any) -> OSError:
    """An S3 error answer as the OSError ``read_error`` words: its code, or for an answer
    without one (a proxy's bare 403 or 503), the code its HTTP status stands for."""
    answer = error.response
    code = answer.get("Error", {}).get("Code") or ""
    status = answer.get("ResponseMetadata", {}).get("HTTPStatusCode")
    if code in ("NoSuchKey", "404") or status == 404:
        return FileNotFoundError(str(error))
    if not code.strip() or code.isdigit():
        code = {403: "AccessDenied", 500: "InternalError", 503: "ServiceUnavailable"}.get(
            status or 0, "ServiceUnavailable" if (status or 0) >= 500 else ""
        )
    return OSError(f"{code} (HTTP {status}): {error}" if code else str(error))


#: botocore cannot sign with what it found (pyarrow, with its own chain, may still read)
_CREDENTIALS_ERRORS = (
    *(bex.NoCredentialsError, bex.PartialCredentialsError, bex.ProfileNotFound),
    *(bex.CredentialRetrievalError, bex.InvalidConfigError, bex.ConfigNotFound),
)
_CLIENTS: dict[tuple[str | None, ...], Any] = {}
_NO_CLIENT: set[tuple[str | None, ...]] = set()
_CLIENTS_LOCK = threading.Lock()
#: requests in flight per client: the lake's readers (32 at open, 32 ahead at the copy)
_POOL = 64


def _client_key(endpoint_url: str | None, region: str | None) -> tuple[str | None, ...]:
    """What a client is made for: the endpoint, the region and the credentials in the
    environment (a digest of them; a process may change them, as tests do)."""
    names = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE")
    digest = hashlib.sha256("\0".join(os.environ.get(n, "") for n in names).encode())
    return endpoint_url, region, digest.hexdigest()


def _no_client(endpoint_url: str | None, region: str | None, error: Exception) -> None:
    """botocore cannot read with credentials here: pyarrow reads every file from now on."""
    _NO_CLIENT.add(_client_key(endpoint_url, region))
    logger.info(
        "S3 files are read by pyarrow only (two requests per small file): botocore: %s",
        masked(str(error)),
    )


def _client(endpoint_url: str | None, region: str | None) -> Any:
    """One botocore S3 client per endpoint and region, made once (making one loads the
    service's model: tens of milliseconds) and shared by every thread (clients are
    thread-safe); None when botocore found no credentials before."""
    key = _client_key(endpoint_url, region)
    if key in _NO_CLIENT:
        return None
    with _CLIENTS_LOCK:
        if key not in _CLIENTS:
            import botocore.config
            import botocore.session

            config = botocore.config.Config(
                connect_timeout=10,
                read_timeout=60,
                retries={"max_attempts": 3, "mode": "standard"},
                max_pool_connections=_POOL,
                # path-style, as pyarrow addresses a set endpoint (MinIO, R2...): a
                # bucket.host name would need DNS those servers rarely have
                s3={"addressing_style": "path"} if endpoint_url else None,
            )
            try:
                session = botocore.session.get_session()
                _CLIENTS[key] = session.create_client(
                    "s3", region_name=region, endpoint_url=endpoint_url, config=config
                )
            except _CREDENTIALS_ERRORS as e:
                _no_client(endpoint_url, region, e)
                return None
        return _CLIENTS[key]


def canonical_uri(uri: str) -> str:
    """A lake URI in one spelling, for comparisons: an absolute real path or s3://bucket/key.

    Local paths are made absolute with ``..`` and symlinks resolved; S3 URIs lose repeated
    and trailing slashes (and may hold no ``.`` or ``..`` segment). A glob keeps its
    pattern after the canonical base directory. ``iceberg://CATALOG/namespace.table`` (an
    Iceberg table of a catalog in lakesync.toml) is kept as it is.
    """
    parts = urlsplit(uri)
    if parts.scheme == "iceberg":  # a table of a catalog in lakesync.toml: already one name
        return uri
    if parts.scheme == "s3":
        _check_s3_uri(uri)
        segments = [s for s in parts.path.split("/") if s]
        if any(s in (".", "..") for s in segments):
            raise SourceError(
                f"Invalid S3 URI s3://{parts.netloc}/...: '.' and '..' are not allowed."
            )
        return "/".join(["s3:/", parts.netloc, *segments])
    path = _local_path(uri)
    segments = path.split("/")
    glob_at = first_glob_segment(segments)
    base = "/".join(segments[:glob_at]) if glob_at is not None else path
    real = os.path.realpath(base or "/")
    return real if glob_at is None else "/".join([real.rstrip("/"), *segments[glob_at:]])


def within_roots(uri: str, roots: list[str]) -> bool:
    """Whether the lake at ``uri`` lies inside one of ``roots`` (local paths or s3:// URIs).

    Whole path segments are compared, so ``s3://b/data`` allows ``s3://b/data/x`` but not
    ``s3://b/database``; a local root never allows an S3 URI and vice versa. A glob with a
    ``.`` or ``..`` segment after its first wildcard is refused. An empty list allows
    nothing: callers decide whether "no roots configured" means "no check".
    """
    canonical = canonical_uri(uri)
    # both spellings: a local "." is gone from the canonical one, a file:// "%2E%2E" from the raw
    if dot_segment_after_glob(uri) or dot_segment_after_glob(canonical):
        return False
    target = _base(canonical)
    for root in roots:
        base = _base(canonical_uri(root)).rstrip("/")
        if target == base or target.startswith(base + "/"):
            return True
    return False


def _base(canonical: str) -> str:
    """The part of a canonical URI before its first glob segment."""
    segments = canonical.split("/")
    glob_at = first_glob_segment(segments)
    return canonical if glob_at is None else "/".join(segments[:glob_at])


def first_glob_segment(segments: list[str]) -> int | None:
    """The index of the first path segment holding ``*``, ``?`` or ``[``; None if none does."""
    return next((i for i, s in enumerate(segments) if any(c in s for c in "*?[")), None)


def dot_segment_after_glob(path: str) -> bool:
    """Whether a ``.`` or ``..`` segment follows the first glob segment of ``path``.

    Only the part before the first wildcard is resolved and compared with the roots, but a
    glob follows a later ``..`` out of it: ``lake/*/../../etc/x*`` matches files in /etc.
    """
    segments = path.split("/")
    glob_at = first_glob_segment(segments)
    return glob_at is not None and any(s in (".", "..") for s in segments[glob_at:])


def short_error(text: str, limit: int = 400) -> str:
    """One masked line of an error text (deltalake's are multi-line, coloured, with XML)."""
    text = re.sub(r"\s*↳\s*", ": ", masked(_ANSI.sub("", text)))
    text = re.sub(r"<(RequestId|HostId)>[^<]*</\1>", "", text)
    text = " ".join(text.split()).rstrip(".")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def read_error(
    error: BaseException, file: str, fmt: str, endpoint: str | None, listing: bool = False
) -> SourceError:
    """A SourceError naming ``file`` that says what went wrong and how to fix it."""
    text = short_error(str(error))
    transient = False
    if not listing and (isinstance(error, FileNotFoundError) or any(m in text for m in _MISSING)):
        message = (
            f"Data file {file} no longer exists (deleted or replaced after the lake was "
            "listed). Restore it and resume the job, or start the copy again so that the "
            "lake is listed afresh."
        )
    elif file.startswith("s3://") and isinstance(error, OSError):
        message, transient = s3_message(text, file, endpoint)
    elif "FieldRef" in text:
        message = f"The filter names a column {file} does not have ({text}). Fix the filter."
    elif isinstance(error, OSError):
        message = f"Cannot read {file}: {text}. Check that it exists and is readable."
    else:
        message = (
            f"{file} is not a valid {fmt} file or holds bad data ({text}). Fix or "
            "remove it, or exclude it from the source with a glob."
        )
    return (TransientSourceError if transient else SourceError)(message, file=file)


def s3_message(text: str, where: str, endpoint: str | None) -> tuple[str, bool]:
    """The message for an S3 failure at ``where``, and whether retrying later may help."""
    if "NO_SUCH_BUCKET" in text or "NoSuchBucket" in text:
        bucket = where.removeprefix("s3://").split("/", 1)[0]
        return (
            f"S3 bucket s3://{bucket} does not exist (or these credentials cannot see it). "
            "Check the bucket name in the source URI and LAKESYNC_S3_ENDPOINT_URL.",
            False,
        )
    if any(m in text for m in _NO_CREDENTIALS):
        return (
            f"No AWS credentials were found to read {where} ({text}). Set "
            "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN) in "
            "lakesync's environment. AWS_PROFILE works for plain files but not for Delta "
            "tables (deltalake ignores it): export a profile's keys with eval \"$(aws "
            'configure export-credentials --profile NAME --format env)".',
            False,
        )
    if any(m in text for m in _DENIED):
        return (
            f"Access to {where} was denied ({text}). Check the credentials in "
            "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN) or "
            "AWS_PROFILE, and that they allow s3:ListBucket and s3:GetObject.",
            False,
        )
    if any(m in text for m in _UNREACHABLE):
        return (
            f"The S3 endpoint {endpoint or '(AWS default)'} is unreachable while reading "
            f"{where} ({text}). Check LAKESYNC_S3_ENDPOINT_URL and that the server is "
            "running and reachable.",
            True,
        )
    slow = any(m in text for m in _BUSY)
    return f"Cannot read {where}: {text}. Check the URI, credentials and endpoint.", slow
