"""JSON files that hold one array of objects (``[{...}, {...}]``), read like NDJSON.

pyarrow reads only newline-delimited JSON. A file whose first character is ``[`` is
rewritten once, as it is streamed (memory bounded by the largest object, not the file), to
an NDJSON copy in this process's scratch folder (``base.scratch_folder``), which is then
read like any NDJSON file. The copy is named after the file's path, size and modification
time, so it is reused until the file changes, while a lake reading it is open.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import os
import re
import threading
from typing import Any

import pyarrow.fs as pafs

from lakesync.errors import SourceError
from lakesync.sources.base import hold, reused, scratch_folder

_CHUNK = 1 << 20
MAX_ELEMENT = 64 << 20  # one element of the array, in characters: memory stays bounded
_WHITESPACE = " \t\r\n"


def is_json_array(fs: pafs.FileSystem, path: str, codec: str | None = None) -> bool:
    """Whether the file's first character (after a BOM and whitespace) is ``[``; ``codec``:
    the file's compression (None: not compressed)."""
    with fs.open_input_stream(path, compression=codec) as f:
        head = f.read(4096).decode("utf-8", errors="replace").lstrip("\ufeff" + _WHITESPACE)
    return bool(head.startswith("["))


def ndjson_copy(fs: pafs.FileSystem, path: str, shown: str, codec: str | None = None) -> str:
    """The local path of an NDJSON copy of the JSON array file ``path`` (made if needed),
    decompressed as it is read when ``codec`` names the file's compression."""
    info = fs.get_file_info(path)
    tag = f"{fs.type_name}:{path}:{info.size}:{info.mtime_ns}".encode()
    folder = scratch_folder()
    target = folder / f"{hashlib.sha256(tag).hexdigest()[:32]}.ndjson"
    if reused(target):
        return str(target)
    partial = target.with_suffix(f".{threading.get_ident()}.part")
    try:
        with (
            fs.open_input_stream(path, compression=codec) as src,
            partial.open("w", encoding="utf-8") as out,
        ):
            for item in _items(src, shown):
                if isinstance(item, str):  # too deep to parse: the NDJSON guard refuses it
                    out.write(item.replace("\n", " ").replace("\r", " "))
                else:
                    out.write(json.dumps(item, ensure_ascii=False))
                out.write("\n")
        os.replace(partial, target)
        hold([str(target)])
    finally:
        partial.unlink(missing_ok=True)
    return str(target)


def _items(src: Any, shown: str) -> Any:
    """The objects of a JSON array, parsed one at a time from a byte stream; an element
    nested too deep for Python's parser comes as its text, as written (jsondepth.py then
    refuses its record: it never reaches a parser)."""
    decoder, text = json.JSONDecoder(), codecs.getincrementaldecoder("utf-8-sig")()
    buf, pos, eof, count = "", 0, False, 0

    def more() -> bool:
        nonlocal buf, pos, eof
        if eof:
            return False
        chunk = src.read(_CHUNK)
        eof = not chunk
        buf = buf[pos:] + text.decode(chunk, final=eof)
        pos = 0
        return True

    def skip() -> str:
        nonlocal pos
        while True:
            while pos < len(buf) and buf[pos] in _WHITESPACE:
                pos += 1
            if pos < len(buf):
                return buf[pos]
            if not more():
                return ""

    if skip() != "[":
        raise _bad(shown, "it does not start with [")
    pos += 1
    if skip() == "]":
        return
    while True:
        while True:
            try:
                item, end = decoder.raw_decode(buf, pos)
                break
            except json.JSONDecodeError as e:
                if len(buf) - pos > MAX_ELEMENT or not more():
                    raise _bad(shown, f"element {count + 1}: {e.msg}") from None
            except RecursionError:
                ends = _element_end(buf, pos)
                if ends is not None:
                    item, end = buf[pos:ends], ends
                    break
                if len(buf) - pos > MAX_ELEMENT or not more():
                    raise _bad(shown, f"element {count + 1} does not end") from None
        if not isinstance(item, dict | str):
            raise _bad(shown, f"element {count + 1} is {json.dumps(item)[:40]}, not an object")
        pos = end
        count += 1
        yield item
        sep = skip()
        if sep == "]":
            return
        if sep != ",":
            raise _bad(shown, f"expected ',' or ']' after element {count}")
        pos += 1
        skip()


_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}]')


def _element_end(buf: str, pos: int) -> int | None:
    """Where the array or object starting at ``buf[pos]`` ends (None: not in ``buf`` yet)."""
    depth = 0
    for match in _TOKEN.finditer(buf, pos):
        token = match.group()
        if token in "[{":
            depth += 1
        elif token in "]}":
            depth -= 1
            if depth == 0:
                return match.end()
    return None


def _bad(shown: str, why: str) -> SourceError:
    return SourceError(
        f"{shown} holds a JSON array that cannot be read: {why}. A JSON lake file holds one "
        "object per line (NDJSON), or one array of objects.",
        file=shown,
    )
