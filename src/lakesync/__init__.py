"""lakesync: copy data-lake records into MongoDB as durable background jobs."""

import os
import sys

# Arrow's allocator: the system's, unless the environment names one. With pyarrow's default
# (mimalloc) the pages that reading a lake frees stay resident, so a copy's memory grew with
# the lake (docs/performance.md, "Memory at lake scale"). pyarrow reads the variable when it
# is imported; a program that imported it before lakesync has its pool set here.
if "ARROW_DEFAULT_MEMORY_POOL" not in os.environ:
    os.environ["ARROW_DEFAULT_MEMORY_POOL"] = "system"
    if "pyarrow" in sys.modules:
        import pyarrow

        pyarrow.set_memory_pool(pyarrow.system_memory_pool())

__version__ = "0.1.0"
