"""64-bit hashes of Arrow values, column-wise (numpy, no Python loop per value).

``hash_strings`` hashes strings and binary values (the plan of repeated keys hashes keys
with it, ``repeats``); ``hash_rows`` hashes whole rows, every column of them (a Delta
rewrite's rows matched to the rows they were copied from, ``sources.deltarows``). Equal
values hash alike; different ones rarely do (about one pair in 2**64).
"""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
POLY = np.uint64(0x100000001B3)  # FNV's prime: any odd multiplier would do
SEED = np.uint64(0x9E3779B97F4A7C15)
_HASH_CHUNK = 1 << 16  # bytes of strings hashed at once: temporaries of ~40 bytes each
_powers: np.ndarray = np.ones(1, dtype=np.uint64)
_LONG = 4096  # bytes: a longer key is hashed by BLAKE2b (_powers stays small)


def mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, element-wise (uint64 arithmetic wraps)."""
    x = x ^ (x >> np.uint64(30))
    x *= _M1
    x ^= x >> np.uint64(27)
    x *= _M2
    return np.asarray(x ^ (x >> np.uint64(31)))


def hash_strings(col: pa.Array) -> np.ndarray:
    """A 64-bit hash of each string (or binary) value, vectorised: a polynomial of its bytes,
    mixed with its length. Equal values hash alike; different ones rarely do (and are told
    apart by their bytes: ``repeats._settle``)."""
    global _powers
    col = col.cast(pa.large_binary())
    n = len(col)
    offsets = np.frombuffer(col.buffers()[1], np.int64)[col.offset : col.offset + n + 1]
    data_buf = col.buffers()[2]
    data = np.frombuffer(data_buf, np.uint8) if data_buf is not None else np.empty(0, np.uint8)
    lengths = np.diff(offsets)
    sums = np.zeros(n, dtype=np.uint64)
    long = np.flatnonzero(lengths > _LONG)
    for i in long.tolist():
        value = data[int(offsets[i]) : int(offsets[i + 1])].tobytes()
        sums[i] = int.from_bytes(hashlib.blake2b(value, digest_size=8).digest(), "little")
    lengths_short = np.where(lengths > _LONG, 0, lengths)  # hashed above
    longest = int(lengths_short.max()) if n else 0
    if longest > len(_powers):
        grown = np.cumprod(np.full(longest - 1, POLY, dtype=np.uint64))  # POLY ** i
        _powers = np.concatenate([np.ones(1, dtype=np.uint64), grown])
    # chunks of about _HASH_CHUNK bytes (at least one string each): bounded temporaries
    cuts = np.unique(np.searchsorted(offsets, np.arange(offsets[0], offsets[-1], _HASH_CHUNK)))
    edges = [*(int(c) for c in cuts if 0 < c < n), n]
    lo = 0
    for hi in edges:
        full = np.flatnonzero(lengths_short[lo:hi]) + lo
        if len(full):  # the bytes of the chunk's short strings, gathered
            lens = lengths_short[full]
            firsts = np.cumsum(lens) - lens
            total = int(firsts[-1] + lens[-1])
            within = np.arange(total, dtype=np.int64) - np.repeat(firsts, lens)
            index = within + np.repeat(offsets[full], lens)
            terms = data[index].astype(np.uint64) * _powers[within]
            sums[full] = np.add.reduceat(terms, firsts)
        lo = hi
    return mix(sums ^ mix(lengths.astype(np.uint64) + SEED))


_NULL = np.uint64(0x6A09E667F3BCC908)  # a null value's hash (any constant)


def hash_rows(columns: list[pa.Array], seed: int = 0) -> np.ndarray:
    """A 64-bit hash of each row of ``columns`` (arrays of one length): every value of it,
    in column order, nulls included. ``seed`` tells apart rows of different groups
    (a Delta file's partition values) that are otherwise equal."""
    n = len(columns[0]) if columns else 0
    rows = np.full(n, np.uint64(seed), dtype=np.uint64)
    for col in columns:
        rows = mix(rows * POLY ^ hash_values(col))
    return rows


def hash_values(col: pa.Array) -> np.ndarray:
    """A 64-bit hash of each value of ``col``, of any type (nested ones by their parts)."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    kind = col.type
    if pa.types.is_dictionary(kind):
        return hash_values(col.dictionary_decode())
    valid = None if col.null_count == 0 else col.is_valid().to_numpy(zero_copy_only=False)
    if pa.types.is_null(kind):
        return np.full(len(col), _NULL, dtype=np.uint64)
    if _textual(kind):
        out = hash_strings(col.cast(pa.large_binary()).fill_null(b""))
    elif pa.types.is_boolean(kind):
        out = mix(col.fill_null(False).cast(pa.uint8()).to_numpy().astype(np.uint64) + SEED)
    elif pa.types.is_decimal(kind):
        out = hash_strings(col.cast(pa.string()).fill_null(""))
    elif _fixed(kind):
        ints = col.view(getattr(pa, f"int{kind.bit_width}")()).fill_null(0)
        out = mix(ints.to_numpy().astype(np.int64).view(np.uint64) ^ SEED)
    elif pa.types.is_struct(kind):
        out = np.full(len(col), SEED, dtype=np.uint64)
        for child in col.flatten():
            out = mix(out * POLY ^ hash_values(child))
    elif pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_map(kind):
        out = _hash_lists(col)
    else:  # anything else (fixed-size lists, unions...): value by value
        out = np.fromiter(
            (
                int.from_bytes(hashlib.blake2b(repr(v).encode(), digest_size=8).digest(), "little")
                for v in col.to_pylist()
            ),
            np.uint64,
            len(col),
        )
    if valid is not None:
        out = np.where(valid, out, _NULL)
    return out


def _textual(kind: pa.DataType) -> bool:
    return (
        pa.types.is_string(kind)
        or pa.types.is_large_string(kind)
        or pa.types.is_binary(kind)
        or pa.types.is_large_binary(kind)
        or pa.types.is_fixed_size_binary(kind)
        or getattr(pa.types, "is_string_view", lambda _: False)(kind)
        or getattr(pa.types, "is_binary_view", lambda _: False)(kind)
    )


def _fixed(kind: pa.DataType) -> bool:
    """Numbers, dates and times: values of 8 to 64 bits, hashed by their bits."""
    plain = pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_temporal(kind)
    return plain and kind.bit_width in (8, 16, 32, 64)


def _hash_lists(col: pa.Array) -> np.ndarray:
    """Each list's (or map's) values hashed with their place in it, summed, mixed with its
    length."""
    if pa.types.is_map(col.type):  # as a list of (key, value) structs
        entries = pa.struct([col.type.key_field, col.type.item_field])
        col = col.cast(pa.list_(entries))
    lengths = pc.list_value_length(col).fill_null(0).to_numpy().astype(np.int64)
    inner = hash_values(col.flatten())
    sums = np.zeros(len(col), dtype=np.uint64)
    full = np.flatnonzero(lengths)
    if len(full):
        lens = lengths[full]
        firsts = np.cumsum(lens) - lens
        within = np.arange(int(lens.sum()), dtype=np.int64) - np.repeat(firsts, lens)
        terms = mix(inner ^ mix(within.astype(np.uint64) + SEED))
        sums[full] = np.add.reduceat(terms, firsts)
    return mix(sums ^ mix(lengths.astype(np.uint64) + SEED))
