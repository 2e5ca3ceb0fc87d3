"""glibc's bytes in use (``mallinfo2``), for the memory tests and bench/heapsteps.py.

Bench scripts put the repository's root on ``sys.path`` to import it (as bench/scale.py
does for tests/s3proxy.py); tests import it as ``tests.mallinfo``.
"""

from __future__ import annotations

import ctypes
import ctypes.util


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                     "uordblks", "fordblks", "keepcost")
    ]  # fmt: skip


def malloc_in_use() -> int:
    """glibc's bytes in use, all arenas, mapped chunks included (Arrow's C++ objects; not
    Python's small objects, which live in its own arenas). OSError or AttributeError where
    there is no glibc 2.33+ (no ``mallinfo2``)."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    libc.mallinfo2.restype = _MallInfo2
    info = libc.mallinfo2()
    return int(info.uordblks + info.hblkhd)
