"""lakesync: copy data-lake records into MongoDB as durable background jobs."""

import os

# Arrow's allocator: the system's, unless the environment names one. With pyarrow's default
# (mimalloc) the pages that reading a lake frees stay resident, so a copy's memory grew with
# the lake (docs/performance.md, "Memory at lake scale"); read when pyarrow is imported.
os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "system")

__version__ = "0.1.0"
