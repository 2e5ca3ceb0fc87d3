"""Batches assembled across a table's units, and read ahead of the consumer by a thread."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any, TypeVar

import pyarrow as pa

from lakesync.sources.base import LakeBatch

logger = logging.getLogger(__name__)


def _joined(pieces: list[LakeBatch]) -> LakeBatch:
    """One batch of consecutive pieces of the lake (whose tables have the same schema)."""
    if len(pieces) == 1:
        return pieces[0]
    segments, offset = [], 0
    for piece in pieces:
        for s in piece.segments:
            segments.append(replace(s, offset=offset + s.offset))
        offset += piece.table.num_rows
    first = pieces[0]
    table = pa.concat_tables([p.table for p in pieces])
    refused, offset = {}, 0
    for piece in pieces:
        refused.update({offset + row: why for row, why in piece.refused.items()})
        offset += piece.table.num_rows
    return LakeBatch(
        table,
        first.file,
        first.file_index,
        first.start_row,
        first.ordinal,
        segments=segments,
        refused=refused,
    )


def _sliced(piece: LakeBatch, rows: int) -> tuple[LakeBatch, LakeBatch]:
    """A one-file piece cut after ``rows`` rows."""
    head = LakeBatch(
        piece.table.slice(0, rows),
        piece.file,
        piece.file_index,
        piece.start_row,
        piece.ordinal,
        refused={r: why for r, why in piece.refused.items() if r < rows},
    )
    tail = LakeBatch(
        piece.table.slice(rows),
        piece.file,
        piece.file_index,
        piece.start_row + rows,
        piece.ordinal,
        refused={r - rows: why for r, why in piece.refused.items() if r >= rows},
    )
    return head, tail


def across_files(pieces: Iterator[LakeBatch], size: int) -> Iterator[LakeBatch]:
    """Batches of exactly ``size`` rows made of one-file pieces, spanning files.

    Fewer rows only at the end, or where the next file's columns differ (name, type or
    order): records of such files are never put in one table, so each is stored exactly
    as its own file holds it.
    """
    pending: list[LakeBatch] = []
    rows = 0
    for piece in pieces:
        if pending and not piece.table.schema.equals(pending[0].table.schema, check_metadata=False):
            yield _joined(pending)
            pending, rows = [], 0
        pending.append(piece)
        rows += piece.table.num_rows
        while rows >= size:
            head: list[LakeBatch] = []
            need = size
            while need:
                first = pending.pop(0)
                n = first.table.num_rows
                if n > need:
                    first, rest = _sliced(first, need)
                    pending.insert(0, rest)
                    n = need
                head.append(first)
                need -= n
            rows -= size
            yield _joined(head)
    if pending:
        yield _joined(pending)


_T = TypeVar("_T")
_END = object()


def prepared(
    batches: Iterator[LakeBatch], prepare: Callable[[LakeBatch], Any]
) -> Iterator[LakeBatch]:
    for batch in batches:
        try:
            batch.prepared = prepare(batch)
        except Exception:
            logger.debug(
                "preparing a batch of %s failed; it is done again", batch.file, exc_info=True
            )
        yield batch


def prefetched(source: Iterator[_T], depth: int) -> Iterator[_T]:
    """``source``, produced by a thread that runs at most ``depth`` items ahead.

    Reading and decoding the next batch overlaps with the consumer's work on this one (the
    copy waits on MongoDB most of the time). Memory stays bounded: the queue holds at most
    ``depth`` items, and the thread holds one more. An exception in the source is raised
    where the consumer would have met it; when the consumer stops early (closing this
    generator), the thread stops after the item it is reading.
    """
    if depth < 1:
        yield from source
        return
    items: queue.Queue[tuple[bool, Any]] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: tuple[bool, Any]) -> bool:
        while not stop.is_set():
            try:
                items.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in source:
                if not put((True, item)):
                    return
            put((True, _END))
        except BaseException as e:  # handed to the consumer, raised there
            put((False, e))

    thread = threading.Thread(target=produce, name="lake-reader", daemon=True)
    thread.start()
    try:
        while True:
            ok, item = items.get()
            if not ok:
                raise item
            if item is _END:
                return
            yield item
    finally:
        stop.set()
