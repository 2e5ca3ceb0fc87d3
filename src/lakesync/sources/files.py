"""Plain files: listing a folder, a glob or one file (local or S3), hive partitions, the
choice of format by extension, and the inspection of each file at open.

A lake of plain files is read in path order (files sorted by path, rows in file order).
"""

from __future__ import annotations

import functools
import os
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import unquote

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from lakesync.errors import SourceError
from lakesync.locations import Location, read_error
from lakesync.sources import orc, parquet, tables, text
from lakesync.sources.base import FileFacts, Listing

#: data files by extension; CSV and JSON may also be compressed (``text.COMPRESSIONS``)
EXTENSIONS = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".json": "json"}
EXTENSIONS |= {".jsonl": "json", ".ndjson": "json", ".orc": "orc"}
#: the format names an operation may give, and what each means
ALIASES = {"pq": "parquet", "jsonl": "json", "ndjson": "json", "delta": "delta"}
ALIASES |= {f: f for f in ("parquet", "orc", "iceberg", *text.FORMATS)}
#: what the messages list as readable
SUPPORTED = (
    ".parquet/.pq, .orc, .csv, .json/.jsonl/.ndjson, and .csv/.json/.jsonl/.ndjson "
    "compressed as .gz, .zst or .bz2"
)
#: compressions lakesync does not read, recognised so that such a file is refused by name
_OTHER_COMPRESSIONS = (
    *(".lz4", ".xz", ".lzma", ".snappy", ".sz", ".br", ".lzo", ".z", ".zip"),
    *(".7z", ".deflate", ".gzip", ".bzip2", ".tar", ".tgz"),
)
_GLOB = {"**/": "(?:[^/]*/)*", "**": ".*", "*": "[^/]*", "?": "[^/]"}
_INSPECT_THREADS = 32  # footers / headers read in parallel at open on S3


def format_of(name: str) -> str | None:
    """The format of a data file by its extension (None: not a data file lakesync reads)."""
    lower = name.lower().rsplit("/", 1)[-1]
    inner = text.without_compression(lower)
    if inner is not None:  # CSV and JSON only
        found = _plain_format(inner)
        return found if found in text.FORMATS else None
    return _plain_format(lower)


def _plain_format(lower: str) -> str | None:
    return next((fmt for ext, fmt in EXTENSIONS.items() if lower.endswith(ext)), None)


def unreadable_extension(name: str, single: bool) -> str | None:
    """The extension that makes ``name`` a file lakesync cannot read, if it is one: a data
    file compressed in a way not supported (``a.csv.lz4``, ``a.parquet.gz``), or, for a
    file named as the source (``single``), any extension that is not a data file's."""
    lower = name.lower().rsplit("/", 1)[-1]
    if format_of(lower) is not None:
        return None
    stem, dot, last = lower.rpartition(".")
    if not dot or not stem:
        return None  # no extension: read as Parquet (Hive writes such files)
    compressed = text.without_compression(lower)
    if compressed is not None and _plain_format(compressed):  # e.g. .parquet.gz
        return lower[len(compressed.rsplit(".", 1)[0]) :]
    if f".{last}" in _OTHER_COMPRESSIONS and _plain_format(stem):
        return lower[len(stem.rsplit(".", 1)[0]) :]  # e.g. .csv.lz4
    return f".{last}" if single else None


def glob_regex(pattern: str) -> re.Pattern[str]:
    """Glob to regex: ``**`` spans directories, ``*``, ``?`` and ``[...]`` stay inside one."""
    tokens = re.split(r"(\*\*/|\*\*|\*|\?|\[[^]/]+\])", pattern)
    return re.compile(
        "".join(
            _GLOB.get(t) or (t.replace("[!", "[^", 1) if t.startswith("[") else re.escape(t))
            for t in tokens
        )
    )


def partition(rel: str) -> list[tuple[str, str | None]]:
    """Hive ``key=value`` directory segments of a path relative to the lake root."""
    pairs = [seg.split("=", 1) for seg in rel.split("/")[:-1] if "=" in seg]
    return [
        (unquote(k), None if v == "__HIVE_DEFAULT_PARTITION__" else unquote(v))
        for k, v in pairs
        if k
    ]


def hive_expression(keys: list[tuple[str, str | None]]) -> pc.Expression | None:
    """The partition expression of a file with these hive ``keys``: one object for the
    files of one folder (each expression costs ~0.9 KB; a lake of many files has few
    folders)."""
    return _hive_expression(tuple(keys))


@functools.lru_cache(maxsize=4096)
def _hive_expression(keys: tuple[tuple[str, str | None], ...]) -> pc.Expression | None:
    expr = None
    for key, value in keys:
        term = pc.field(key).is_null() if value is None else pc.field(key) == value
        expr = term if expr is None else expr & term
    return expr


Item = tuple[str, pc.Expression | None, list[tuple[str, str | None]]]


def refuse_gone(gone: list[str], uri: str) -> None:
    """SourceError naming the first of the planned files that are no longer in the lake."""
    if gone:
        raise SourceError(
            f"{gone[0]} is no longer in {uri}: the lake changed while the job was copying it "
            f"({len(gone)} of the files planned for this part are gone). Restore the file and "
            "resume the job, or start a new copy.",
            uri=uri,
            file=gone[0],
        )


def planned(
    loc: Location, base: str, fmt_given: str | None, only: list[str] | None, known: Listing | None
) -> tuple[str, str, list[str], dict[str, int]] | None:
    """A partition's files from the job's listing (``known``, made by the job's first run):
    format, root, paths and sizes, without listing the lake again (a lake is listed once
    per job: 20,000 files cost each partition ~0.3 s locally, and LIST requests on S3).
    None when the listing does not cover them (then the lake is listed as usual). A file
    gone since is found when it is read (or, locally, by the caller at once)."""
    if known is None or only is None or fmt_given not in (None, known.format):
        return None
    if not known.root.startswith(loc.prefix):
        return None
    root = known.root[len(loc.prefix) :]
    if root not in (base, base.rsplit("/", 1)[0]) or any(n not in known.files for n in only):
        return None
    found = [f"{root}/{name}" for name in only]
    sizes = {path: known.files[name][0] for path, name in zip(found, only, strict=True)}
    return known.format, root, found, sizes


def picked(found: list[str], root: str, names: list[str], uri: str) -> list[str]:
    """The paths of the files named (relative to ``root``), in that order."""
    by_name = {p[len(root) :].lstrip("/") if p.startswith(root) else p: p for p in found}
    refuse_gone([n for n in names if n not in by_name], uri)
    return [by_name[n] for n in names]


def inspect(
    loc: Location,
    fmt: str,
    files: list[Item],
    sizes: dict[str, int] | None = None,
    known: Listing | None = None,
    root: str = "",
    keep: list[str] | None = None,
    kept: parquet.Kept | None = None,
    csv: text.CsvOptions | None = None,
) -> list[tuple[FileFacts, pa.Schema, Any]]:
    """Each file's facts and schema (plus hive keys), its footer read in parallel (S3
    latency), and for CSV, JSON and ORC its fragment. Parquet fragments are dropped: a file is
    opened again when read. A file ``known`` lists with the same size is not read at all.

    With ``kept``, the ``keep`` columns of each Parquet file of at most
    ``parquet.KEEP_FILE_BYTES`` are read with its footer and added to ``kept`` in the lake's
    order."""
    sizes = sizes or {}
    shared: dict[bytes, pa.Schema] = {}  # files that share a schema share one object
    lock = threading.Lock()

    def interned(schema: pa.Schema) -> pa.Schema:
        key = schema.serialize().to_pybytes()
        with lock:
            return shared.setdefault(key, schema)

    def one(item: Item) -> tuple[FileFacts, pa.Schema, Any, pa.Table | None]:
        path, expr, keys = item
        size = sizes.get(path)
        if known is not None and size is not None:
            name = path[len(root) :].lstrip("/")
            seen = known.files.get(name)
            if seen is not None and seen[0] == size:
                return FileFacts(path, size, seen[1], expr), known.schemas[seen[2]], None, None
        table, fragment = None, None
        try:
            if fmt in ("parquet", "delta"):
                wanted = keep if kept is not None and not kept.full else None
                facts, schema, table = parquet.inspect_file(loc, path, expr, keys, size, wanted)
            elif fmt == "orc":
                facts, schema, fragment = orc.inspect_file(loc, path, expr, keys, size)
            else:
                facts, schema, fragment = text.inspect_file(loc, fmt, path, expr, keys, size, csv)
        except (pa.ArrowException, OSError) as e:
            raise read_error(e, loc.show(path), fmt, loc.endpoint) from e
        return facts, interned(schema), fragment, table

    if not files:
        return []
    out = []
    # local footers are read in this thread: a pool of threads spent several times the CPU
    # of reading them passing the GIL around
    threads = min(_INSPECT_THREADS, len(files)) if loc.is_s3 else 0
    with ThreadPoolExecutor(max_workers=max(threads, 1)) as pool:
        for facts, schema, fragment, table in (pool.map if threads else map)(one, files):
            if kept is not None and table is not None:
                kept.add(facts.path, table)
            out.append((facts, schema, fragment))
    return out


def list_files(
    loc: Location, base: str, pattern: re.Pattern[str] | None, info: Any
) -> tuple[list[str], bool, dict[str, int]]:
    """Sorted file paths under ``base`` (``info``: its FileInfo), whether it is a file, and
    the files' sizes as the listing gave them.

    Refused: files that belong to a table folder (``tables``) and data files compressed
    in a way lakesync cannot read (they would silently be left out)."""
    fs = loc.fs
    if info.type == pafs.FileType.NotFound and loc.is_s3:
        bucket = base.split("/", 1)[0]
        if fs.get_file_info(bucket).type == pafs.FileType.NotFound:
            raise SourceError(
                f"S3 bucket s3://{bucket} does not exist (or these credentials "
                "cannot see it). Check the bucket name in the source URI and "
                "LAKESYNC_S3_ENDPOINT_URL."
            )
    if info.type == pafs.FileType.NotFound:
        raise SourceError(
            f"Data lake path {loc.show(base)} does not exist. Check "
            "LAKESYNC_LAKE_URI or the source option (a directory, a file, a glob "
            "or s3://bucket/prefix)."
        )
    if info.type == pafs.FileType.File and pattern is None:
        return [base], True, {} if info.size is None else {base: int(info.size)}
    found, sizes, every = [], {}, []
    for item in fs.get_file_info(pafs.FileSelector(base, recursive=True)):
        if item.type != pafs.FileType.File:
            continue
        every.append(item.path)
        rel = item.path[len(base) :].lstrip("/")
        if any(s.startswith((".", "_")) for s in rel.split("/")):
            continue  # hidden files, _SUCCESS, _delta_log/, _common_metadata...
        if pattern is None or pattern.fullmatch(rel):
            found.append(item.path)
            if item.size is not None:
                sizes[item.path] = int(item.size)
    found.sort()
    held = [
        (folder, kind)
        for folder, kind in tables.tables_listed(base, every)
        if any(p.startswith(folder.rstrip("/") + "/") for p in found)
    ]
    if held:
        raise tables.refuse_holding(loc, base if pattern is None else loc.path, held)
    refuse_unreadable(loc, found, single=False)
    return found, False, sizes


def refuse_unreadable(loc: Location, found: list[str], single: bool) -> None:
    """SourceError naming the first file lakesync cannot read by its extension."""
    for path in found:
        extension = unreadable_extension(path, single)
        if extension is not None:
            raise SourceError(
                f"{loc.show(path)} is a {extension} file, which lakesync does not read. "
                f"It reads {SUPPORTED}. Convert the file, or point the source at readable "
                "files.",
                file=loc.show(path),
            )


def refuse_links_out(base: str, found: list[str]) -> None:
    """A symlink inside a local lake must stay inside it: the allowed roots are checked on
    the source, and a planted link must not make the server read any file it can."""
    root = os.path.realpath(base)
    for path in found:
        real = os.path.realpath(path)
        if real != root and not real.startswith(root.rstrip("/") + "/"):
            link = _outermost_link(base, path)  # named alone: not what lies behind it
            raise SourceError(
                f"{link} is a symbolic link that points out of the lake {base}; lakesync "
                "does not follow links out of the lake. Move or copy the data into the lake, "
                "or point the source at where it really is.",
                file=link,
            )


def _outermost_link(base: str, path: str) -> str:
    """The first symbolic link on the way from the lake's root down to `path`."""
    current = base.rstrip("/") or "/"
    for part in path[len(base) :].strip("/").split("/"):
        current = f"{current.rstrip('/')}/{part}"
        if os.path.islink(current):
            return current
    return path


def choose_format(found: list[str], given: str | None, where: str, single: bool) -> str:
    by_format: dict[str, list[str]] = {}
    for path in found:
        if (fmt := format_of(path)) is not None:
            by_format.setdefault(fmt, []).append(path)
    if given is not None:
        by_format.pop(ALIASES[given.lower()], None)
        if single or not by_format:
            return ALIASES[given.lower()]
    if len(by_format) > 1 or given is not None:
        kinds = ", ".join(f"{len(v)} {k} (e.g. {v[0]})" for k, v in sorted(by_format.items()))
        raise SourceError(
            f"Mixed file formats in {where}: {kinds}"
            f"{f' besides the {given} files asked for' if given else ''}. A lake "
            "holds one format: keep each format's files in a folder of their own and "
            "point the source at that folder.",
            where=where,
        )
    return next(iter(by_format), "parquet")
