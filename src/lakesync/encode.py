"""Arrow columns to BSON documents, column by column.

`encode_rows` writes the BSON of every row of a validated batch with a few numpy operations
per column, instead of a Python dict and a ``bson.encode`` call per record. Its output is
byte for byte what ``bson.encode`` gives for the documents ``Validated.documents`` builds
(tests/test_encode.py compares them on generated tables), so the content hashes stored in
``_lakesync.h`` are the same whichever way a batch was encoded.

It handles the column types records have most: strings, integers, floats (NaN and
infinities kept), booleans, timestamps (as int64 milliseconds, see ``schema._prepare``),
lists of strings and all-null columns (``writes`` tells). For any other type it returns None
and the caller encodes the documents one by one (see ``typemap.py``).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from numpy.typing import NDArray

Buffer = NDArray[np.uint8]
Ints = NDArray[np.int64]
Writer = Callable[[Buffer, Ints], None]
Element = tuple[Ints, Writer]  # each row's element size, and what writes them at positions

_DOUBLE, _STRING, _ARRAY, _BOOL, _DATE, _NULL, _INT32, _INT64 = (
    0x01,
    0x02,
    0x04,
    0x08,
    0x09,
    0x0A,
    0x10,
    0x12,
)
_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1
_MAX_LIST_DIGITS = 7  # list items are keyed "0", "1", ...: up to 10 million items a list


def encode_rows(fields: list[tuple[str, pa.Array]], n: int) -> tuple[bytes, Ints] | None:
    """BSON documents ``{name: value, ...}`` of the n rows: (data, offsets), or None.

    Document i is ``data[offsets[i]:offsets[i + 1]]``. Every array holds n values.
    """
    elements = []
    for name, array in fields:
        if "\x00" in name or len(array) != n:
            return None  # bson.encode raises for such a key: let it say so
        element = _element(name, array)
        if element is None:
            return None
        elements.append(element)
    sizes = np.full(n, 5, dtype=np.int64)  # int32 length + elements + terminating 0
    for element_sizes, _ in elements:
        sizes += element_sizes
    ends = np.cumsum(sizes)
    starts = ends - sizes
    buf = np.zeros(int(ends[-1]) if n else 0, dtype=np.uint8)
    if n:
        _put(buf, starts, sizes.astype("<i4").view(np.uint8).reshape(n, 4))
        pos = starts + 4
        for element_sizes, write in elements:
            write(buf, pos)
            pos = pos + element_sizes
    return buf.tobytes(), np.concatenate([[0], ends]).astype(np.int64)


def writes(kind: pa.DataType) -> bool:
    """Whether ``encode_rows`` writes a (prepared) column of this type itself."""
    if pa.types.is_dictionary(kind):
        return writes(kind.value_type)
    if pa.types.is_list(kind) or pa.types.is_large_list(kind):
        return bool(
            pa.types.is_string(kind.value_type) or pa.types.is_large_string(kind.value_type)
        )
    return bool(
        pa.types.is_null(kind)
        or pa.types.is_boolean(kind)
        or (pa.types.is_floating(kind) and not pa.types.is_float16(kind))
        or (pa.types.is_timestamp(kind) and kind.unit == "ms")
        or (pa.types.is_integer(kind) and kind != pa.uint64())
        or pa.types.is_string(kind)
        or pa.types.is_large_string(kind)
    )


def _element(name: str, array: pa.Array) -> Element | None:
    kind = array.type
    if pa.types.is_dictionary(kind):
        return _element(name, array.dictionary_decode())
    cname = np.frombuffer(name.encode() + b"\x00", dtype=np.uint8)
    valid = _valid(array)
    if pa.types.is_null(kind):
        return _fixed(cname, valid, _NULL, np.zeros((len(array), 0), np.uint8))
    if pa.types.is_floating(kind) and not pa.types.is_float16(kind):
        values = pc.fill_null(array, 0.0).cast(pa.float64()).to_numpy(zero_copy_only=False)
        return _fixed(cname, valid, _DOUBLE, values.astype("<f8").view(np.uint8).reshape(-1, 8))
    if pa.types.is_boolean(kind):
        values = pc.fill_null(array, False).to_numpy(zero_copy_only=False)
        return _fixed(cname, valid, _BOOL, values.astype(np.uint8).reshape(-1, 1))
    if pa.types.is_timestamp(kind) and kind.unit == "ms":  # schema._prepare made it ms
        ints = pc.fill_null(array.cast(pa.int64()), 0).to_numpy(zero_copy_only=False)
        return _fixed(cname, valid, _DATE, ints.astype("<i8").view(np.uint8).reshape(-1, 8))
    if pa.types.is_integer(kind) and kind != pa.uint64():
        return _integers(cname, valid, pc.fill_null(array, 0).cast(pa.int64()))
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        return _strings(cname, valid, array)
    if (pa.types.is_list(kind) or pa.types.is_large_list(kind)) and (
        pa.types.is_string(kind.value_type) or pa.types.is_large_string(kind.value_type)
    ):
        return _string_lists(cname, valid, array)
    return None


def _valid(array: pa.Array) -> NDArray[np.bool_]:
    if array.null_count == 0:
        return np.ones(len(array), dtype=bool)
    return np.asarray(array.is_valid().to_numpy(zero_copy_only=False), dtype=bool)


def _put(buf: Buffer, at: Ints, values: Buffer) -> None:
    """Write row i of the (rows, width) byte matrix ``values`` at ``buf[at[i]:]``."""
    if values.shape[1]:
        buf[at[:, None] + np.arange(values.shape[1])] = values


def _head(code: int, cname: Buffer, values: Buffer) -> Buffer:
    """Rows of element bytes: the type, the field name, then that row of ``values``."""
    rows, width = values.shape
    block = np.empty((rows, 1 + len(cname) + width), dtype=np.uint8)
    block[:, 0] = code
    block[:, 1 : 1 + len(cname)] = cname
    block[:, 1 + len(cname) :] = values
    return block


def _put_heads(
    buf: Buffer, pos: Ints, valid: NDArray[np.bool_], block: Buffer, cname: Buffer
) -> None:
    """Write ``block`` (one row per valid row) at the valid positions, null elements elsewhere."""
    if valid.all():
        _put(buf, pos, block)
        return
    _put(buf, pos[valid], block)
    nulls = pos[~valid]
    _put(buf, nulls, _head(_NULL, cname, np.zeros((len(nulls), 0), np.uint8)))


def _fixed(cname: Buffer, valid: NDArray[np.bool_], code: int, values: Buffer) -> Element:
    """A fixed-width value per row (nulls: no value bytes)."""
    head = 1 + len(cname)
    sizes = np.where(valid, head + values.shape[1], head).astype(np.int64)

    def write(buf: Buffer, pos: Ints) -> None:
        _put_heads(buf, pos, valid, _head(code, cname, values[valid]), cname)

    return sizes, write


def _integers(cname: Buffer, valid: NDArray[np.bool_], array: pa.Array) -> Element:
    """Python ints: int32 when they fit, else int64 (as bson.encode chooses)."""
    values = array.to_numpy(zero_copy_only=False).astype(np.int64)
    small = (values >= _INT32_MIN) & (values <= _INT32_MAX)
    head = 1 + len(cname)
    sizes = np.where(valid, np.where(small, head + 4, head + 8), head).astype(np.int64)

    def write(buf: Buffer, pos: Ints) -> None:
        four, eight = valid & small, valid & ~small
        _put_heads(buf, pos, valid, np.zeros((int(valid.sum()), 0), np.uint8), cname)
        _put(
            buf,
            pos[four],
            _head(_INT32, cname, values[four].astype("<i4").view(np.uint8).reshape(-1, 4)),
        )
        _put(
            buf,
            pos[eight],
            _head(_INT64, cname, values[eight].astype("<i8").view(np.uint8).reshape(-1, 8)),
        )

    return sizes, write


def _string_parts(array: pa.Array) -> tuple[Ints, Ints, Buffer] | None:
    """(start, length) of each value in the data buffer, and the buffer; None if not UTF-8."""
    try:
        array.validate(full=True)  # bad UTF-8: the per-record path raises as it always did
    except pa.ArrowInvalid:
        return None
    n = len(array)
    buffers = array.buffers()
    width = np.int32 if pa.types.is_string(array.type) else np.int64
    if n == 0 or buffers[1] is None:
        return np.zeros(n, np.int64), np.zeros(n, np.int64), np.zeros(0, np.uint8)
    raw = np.frombuffer(buffers[1], dtype=width, count=array.offset + n + 1)[array.offset :]
    offsets: Ints = raw.astype(np.int64)
    data = (
        np.frombuffer(buffers[2], dtype=np.uint8)
        if buffers[2] is not None
        else np.zeros(0, np.uint8)
    )
    return offsets[:-1], offsets[1:] - offsets[:-1], data


def _copy_bytes(buf: Buffer, to: Ints, data: Buffer, starts: Ints, lengths: Ints) -> None:
    """buf[to[i] : to[i] + lengths[i]] = data[starts[i] : starts[i] + lengths[i]], for all i."""
    total = int(lengths.sum())
    if total == 0:
        return
    shift = np.repeat(to - starts, lengths)
    if bool((starts[1:] == starts[:-1] + lengths[:-1]).all()):  # one run of the data buffer
        first = int(starts[0])
        buf[shift + np.arange(first, first + total, dtype=np.int64)] = data[first : first + total]
        return
    source = np.repeat(starts - (np.cumsum(lengths) - lengths), lengths)
    source += np.arange(total, dtype=np.int64)
    buf[shift + source] = data[source]


def _strings(cname: Buffer, valid: NDArray[np.bool_], array: pa.Array) -> Element | None:
    parts = _string_parts(array)
    if parts is None:
        return None
    starts, lengths, data = parts
    lengths = np.where(valid, lengths, 0)
    head = 1 + len(cname)
    sizes = np.where(valid, head + 4 + lengths + 1, head).astype(np.int64)

    def write(buf: Buffer, pos: Ints) -> None:
        size = lengths[valid]
        prefix = (size + 1).astype("<i4").view(np.uint8).reshape(-1, 4)
        _put_heads(buf, pos, valid, _head(_STRING, cname, prefix), cname)
        at = pos[valid] + head + 4
        _copy_bytes(buf, at, data, starts[valid], size)
        buf[at + size] = 0

    return sizes, write


def _string_lists(cname: Buffer, valid: NDArray[np.bool_], array: pa.Array) -> Element | None:
    """Lists of strings: BSON arrays, i.e. documents keyed "0", "1", ..."""
    counts = pc.fill_null(pc.list_value_length(array), 0).to_numpy(zero_copy_only=False)
    counts = counts.astype(np.int64)
    items = array.flatten()  # skips the contents of null lists, as counts does
    parts = _string_parts(items)
    if parts is None or int(counts.max(initial=0)) > 10**_MAX_LIST_DIGITS:
        return None
    starts, lengths, data = parts
    item_valid = _valid(items)
    lengths = np.where(item_valid, lengths, 0)
    first = np.cumsum(counts) - counts  # index of each row's first item
    index = np.arange(len(items), dtype=np.int64) - np.repeat(first, counts)
    digits = np.ones(len(items), dtype=np.int64)
    for d in range(1, _MAX_LIST_DIGITS + 1):
        digits += index >= 10**d
    item_sizes = 2 + digits + np.where(item_valid, 4 + lengths + 1, 0)
    before = np.concatenate([[0], np.cumsum(item_sizes)]).astype(np.int64)
    doc_sizes = 4 + before[first + counts] - before[first] + 1
    head = 1 + len(cname)
    sizes = np.where(valid, head + doc_sizes, head).astype(np.int64)
    item_codes = np.where(item_valid, _STRING, _NULL).astype(np.uint8)

    def write(buf: Buffer, pos: Ints) -> None:
        prefix = doc_sizes[valid].astype("<i4").view(np.uint8).reshape(-1, 4)
        _put_heads(buf, pos, valid, _head(_ARRAY, cname, prefix), cname)
        doc = pos + head
        buf[(doc + doc_sizes - 1)[valid]] = 0
        at = np.repeat(doc + 4 - before[first], counts) + before[:-1]
        buf[at] = item_codes
        for d in range(int(digits.max(initial=1))):  # the key: decimal digits of the index
            has = digits > d
            power = 10 ** (digits[has] - 1 - d)
            buf[at[has] + 1 + d] = 48 + (index[has] // power) % 10
        buf[at + 1 + digits] = 0
        value = (at + 2 + digits)[item_valid]
        size = lengths[item_valid]
        _put(buf, value, (size + 1).astype("<i4").view(np.uint8).reshape(-1, 4))
        _copy_bytes(buf, value + 4, data, starts[item_valid], size)
        buf[value + 4 + size] = 0

    return sizes, write
