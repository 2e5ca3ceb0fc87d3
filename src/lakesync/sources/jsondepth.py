"""The JSON nesting guard: a record nested deeper than ``MAX_DEPTH`` never reaches Arrow.

Arrow's native JSON reader parses nested arrays and objects recursively: one NDJSON record
holding arrays nested 10,000 deep overflows its stack and kills the whole process (a
segfault, not an exception), so it cannot be caught where the file is read. Every NDJSON
file (and the NDJSON copy of a JSON array file) is therefore scanned first, in chunks
(memory bounded whatever the size of the file or of one line), counting each line's
nesting outside strings. A line nested deeper than the limit is replaced by ``{}`` in a
local copy of the file, and its row is refused with the reason (``Guarded.refused``): the
copy engine rejects that record into copyerrors, the rest of the file is copied.

The limit is MongoDB's own: a document may nest at most 100 levels (the record itself is
the first), so a deeper record could not be stored anyway.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs

from lakesync.sources.base import hold, reused, scratch_folder

MAX_DEPTH = 100
_CHUNK = 1 << 20
_NL, _QUOTE, _BACKSLASH = 10, 34, 92
_OPEN = np.zeros(256, np.int64)
_OPEN[[ord("["), ord("{")]] = 1
_OPEN[[ord("]"), ord("}")]] = -1
_KIND = _OPEN != 0
_KIND[[_NL, _QUOTE]] = True
_REMEMBERED = 4096  # files whose verdict this process remembers (path, size, mtime)


def too_deep_reason(depth_over: int = MAX_DEPTH) -> str:
    """Why a record nested too deep is rejected."""
    return (
        f"the record nests arrays or objects more than {depth_over} levels deep (MongoDB's "
        "limit for a document); it was not read. Flatten it in the lake."
    )


@dataclass(frozen=True)
class Guarded:
    """A JSON file as it is safe to read: the file itself, or a local copy with the lines
    nested too deep replaced by ``{}``; ``refused`` maps their rows to the reason."""

    fs: pafs.FileSystem
    path: str
    refused: dict[int, str] = field(default_factory=dict)
    #: the longest line's bytes (None: not known), which Arrow's block must hold
    longest: int | None = None


@dataclass
class _Scan:
    """The state of a scan between chunks: the line being read and what is open in it."""

    limit: int
    line: int = 0  # id of the current line (lines begun before the chunk)
    in_string: bool = False  # the current line is inside a string
    depth: int = 0  # the current line's nesting
    carry: bytes = b""  # a trailing backslash, kept for the next chunk
    deep: set[int] = field(default_factory=set)  # ids of the lines nested too deep
    run: int = 0  # bytes of the current line before the chunk
    longest: int = 0  # the longest line's bytes so far

    def feed(self, chunk: bytes, final: bool = False) -> None:
        """Scan the next bytes of the file."""
        self._measure(chunk, final)
        data = self.carry + chunk
        self.carry = b""
        # an escaped backslash is two bytes that cannot escape a quote: blank them, so that
        # a quote is escaped exactly when the byte before it is a backslash
        data = data.replace(b"\\\\", b"__")
        if data.endswith(b"\\") and not final:  # it may escape the next chunk's first byte
            data, self.carry = data[:-1], b"\\"
        if not data:
            return
        a = np.frombuffer(data, np.uint8)
        at = np.flatnonzero(_KIND[a])  # only newlines, quotes and brackets matter
        if not at.size:
            return
        k = a[at]
        newline = k == _NL
        quote = k == _QUOTE
        quote &= a[np.maximum(at - 1, 0)] != _BACKSLASH  # (the first byte: itself)
        before = np.cumsum(newline, dtype=np.int64) - newline  # the line of each event
        quotes = np.cumsum(quote, dtype=np.int64)
        # the running counts where each event's line began (the carried line: its state)
        starts = np.maximum.accumulate(np.where(newline, np.arange(k.size), -1))
        first = starts < 0
        base = np.where(first, 0, starts)
        parity = (quotes - quote - np.where(first, -int(self.in_string), quotes[base])) & 1
        step = np.where(parity == 0, _OPEN[k], 0)
        depth = np.cumsum(step, dtype=np.int64)
        depth -= np.where(first, -self.depth, depth[base])
        over = np.flatnonzero(depth > self.limit)
        if over.size:
            self.deep.update((np.unique(before[over]) + self.line).tolist())
        self.line += int(newline.sum())
        if bool(newline[-1]):
            self.in_string, self.depth = False, 0
        else:
            self.in_string = bool((parity[-1] ^ quote[-1]) & 1)
            self.depth = int(depth[-1])

    def _measure(self, chunk: bytes, final: bool) -> None:
        """Keep the longest line's length (a record Arrow's block must hold whole)."""
        ends = np.flatnonzero(np.frombuffer(chunk, np.uint8) == _NL)
        if ends.size:
            inner = int(np.diff(ends).max()) - 1 if len(ends) > 1 else 0
            self.longest = max(self.longest, self.run + int(ends[0]), inner)
            self.run = len(chunk) - int(ends[-1]) - 1
        else:
            self.run += len(chunk)
        if final:
            self.longest = max(self.longest, self.run)


_cache: OrderedDict[str, Guarded] = OrderedDict()
_lock = threading.Lock()


def guard(
    fs: pafs.FileSystem, path: str, codec: str | None = None, limit: int = MAX_DEPTH
) -> Guarded:
    """``path`` if no line of it nests deeper than ``limit``; else a local copy with those
    lines replaced by ``{}``, and their rows refused. A compressed file (``codec``: its
    compression) is read decompressed; the copy is plain NDJSON."""
    info = fs.get_file_info(path)
    tag = f"{fs.type_name}:{path}:{info.size}:{info.mtime_ns}:{limit}"
    with _lock:
        known = _cache.get(tag)
        if known is not None:
            _cache.move_to_end(tag)
    if known is not None and (known.path == path or reused(Path(known.path))):
        return known  # (a copy that was removed, its lakes closed, is made again)
    found = _guarded(fs, path, codec, tag, limit)
    with _lock:
        _cache[tag] = found
        while len(_cache) > _REMEMBERED:
            _cache.popitem(last=False)
    return found


def _guarded(fs: pafs.FileSystem, path: str, codec: str | None, tag: str, limit: int) -> Guarded:
    folder = scratch_folder()
    name = hashlib.sha256(tag.encode()).hexdigest()[:32]
    target, refusals = folder / f"{name}.safe.ndjson", folder / f"{name}.refused.json"
    if refusals.exists() and reused(target):
        rows = json.loads(refusals.read_text())
        return Guarded(pafs.LocalFileSystem(), str(target), {int(r): w for r, w in rows.items()})
    scan = _Scan(limit)
    with fs.open_input_stream(path, compression=codec) as src:
        while chunk := src.read(_CHUNK):
            scan.feed(chunk)
    scan.feed(b"", final=True)
    if not scan.deep:
        return Guarded(fs, path, longest=scan.longest)
    mine = f".{os.getpid()}.{threading.get_ident()}.part"
    partial, listed = Path(f"{target}{mine}"), Path(f"{refusals}{mine}")
    try:
        with fs.open_input_stream(path, compression=codec) as src, partial.open("wb") as out:
            rows = _copy_without(src, out.write, scan.deep)
        refused = {row: too_deep_reason(limit) for row in rows}
        listed.write_text(json.dumps({str(r): w for r, w in refused.items()}))
        os.replace(listed, refusals)  # both complete before either is used
        os.replace(partial, target)
        hold([str(target)])
    finally:
        partial.unlink(missing_ok=True)
        listed.unlink(missing_ok=True)
    return Guarded(pafs.LocalFileSystem(), str(target), refused, scan.longest)


def _copy_without(
    src: pafs.NativeFile, write: Callable[[bytes], object], deep: set[int]
) -> list[int]:
    """Copy the stream line by line, each line in ``deep`` (ids) as ``{}``; the rows of
    those lines (Arrow skips blank lines: they are no rows)."""
    line = row = 0
    filled = False  # the current line has a non-blank byte (it is a row)
    rows = []
    while chunk := src.read(_CHUNK):
        pieces = chunk.split(b"\n")
        for i, piece in enumerate(pieces):
            ended = i < len(pieces) - 1
            if line in deep:
                if not filled:
                    write(b"{}")  # the record's row stays, with no field
                    rows.append(row)
                    filled = True
            else:
                write(piece)
                filled = filled or bool(piece.strip())
            if ended:
                write(b"\n")
                row += filled
                line, filled = line + 1, False
    return rows
