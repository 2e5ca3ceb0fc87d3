"""The data-lake reader, as the rest of lakesync names it: see the ``sources`` package."""

from lakesync.sources import (
    ColumnStats,
    FileFacts,
    Lake,
    LakeBatch,
    Listing,
    Position,
    Segment,
)

__all__ = ["ColumnStats", "FileFacts", "Lake", "LakeBatch", "Listing", "Position", "Segment"]
