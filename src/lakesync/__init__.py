"""lakesync: copy data-lake records into MongoDB as durable background jobs."""

__version__ = "0.1.0"
