"""Bytes a CSV file's encoding does not define, kept to the record that holds them.

Arrow's CSV reader transcodes a file that is not UTF-8 with the Python codec, strictly: one
byte the codec does not define (0x81 in cp1252) raised in the middle of a block and failed
the whole file. Read through ``reading_codec``, such a byte ``0xNN`` decodes to the
character ``U+10FF00 + 0xNN`` instead (the last private-use plane, which a codec that
cannot encode it never decodes to), and ``text.decoded`` rejects the record holding it,
naming the byte, as it rejects a cell that is not valid UTF-8.
"""

from __future__ import annotations

import codecs
import functools
import re

#: the character a byte the codec does not define becomes: MARK + the byte
MARK = 0x10FF00
#: the cells holding one (an RE2 class, for ``pc.match_substring_regex``)
MARKED = "[\U0010ff00-\U0010ffff]"
_FIRST = re.compile(MARKED)
_PREFIX = "lakesync_undefined_"
_HANDLER = "lakesync-undefined"


def _mark(error: UnicodeError) -> tuple[str, int]:
    if not isinstance(error, UnicodeDecodeError):
        raise error
    bad = error.object[error.start : error.end]
    return "".join(chr(MARK + b) for b in bad), error.end


def _search(name: str) -> codecs.CodecInfo | None:
    if not name.startswith(_PREFIX):
        return None
    base = codecs.lookup(name.removeprefix(_PREFIX))
    decoder = functools.partial(base.incrementaldecoder, errors=_HANDLER)
    return codecs.CodecInfo(
        base.encode,
        base.decode,
        name=name,
        incrementalencoder=base.incrementalencoder,
        incrementaldecoder=decoder,
        streamreader=base.streamreader,
        streamwriter=base.streamwriter,
    )


@functools.cache
def _registered() -> None:
    codecs.register_error(_HANDLER, _mark)
    codecs.register(_search)


@functools.cache
def reading_codec(encoding: str) -> str:
    """The codec a CSV file of ``encoding`` is read with: ``encoding`` itself for UTF-8
    (Arrow checks it, see ``text.decoded``) and for a codec that could decode to the marks
    (UTF-16, GB 18030: one such byte still fails the file); otherwise one whose undefined
    bytes become marks."""
    name = codecs.lookup(encoding).name
    if name == "utf-8":
        return encoding
    try:
        codecs.encode(chr(MARK + 0x81), name)
        return encoding  # the marks could be text of the file: not told apart
    except UnicodeError:
        pass
    _registered()
    return _PREFIX + name.replace("-", "_")


def first_mark(value: str) -> tuple[int, int] | None:
    """(the byte, its place in ``value``) of the first undefined byte in a decoded value."""
    found = _FIRST.search(value)
    return None if found is None else (ord(found[0]) - MARK, found.start())


def marking(encoding: str) -> bool:
    """Whether a file of ``encoding`` is read with marks for its undefined bytes (else no
    cell can hold one: nothing to look for)."""
    return reading_codec(encoding) != encoding
