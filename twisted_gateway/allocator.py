"""
glibc's malloc, set for a long-running process whose buffers come and go in
every size (chat messages of 10 bytes to 1 MiB).

By default glibc raises its mmap threshold each time a large block that it
mapped is freed, up to 32 MiB: after the first few big messages, every later
one is carved from the heap instead, and the heap's free holes are kept
rather than given back. Under a mixed load the process's memory then creeps
up for hours without anything being held. A fixed threshold keeps blocks of
``MMAP_THRESHOLD`` or more in their own mappings, returned to the system when
freed, as they were before the first one was freed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

#: Blocks this large or larger get their own mapping (glibc's own starting value).
MMAP_THRESHOLD = 128 * 1024
_M_MMAP_THRESHOLD = -3


def fix_mmap_threshold(environ: dict[str, str] = os.environ) -> bool:
    """
    Pin glibc's mmap threshold; True if it was set. Nothing is done off glibc
    or when the operator chose a value with ``MALLOC_MMAP_THRESHOLD_``.
    """
    if not sys.platform.startswith("linux") or "MALLOC_MMAP_THRESHOLD_" in environ:
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl, or no libc by that name
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))
