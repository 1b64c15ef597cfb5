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

Smaller blocks still leave free pages scattered through the heap when a burst
of connections ends; glibc gives back only the free top of the heap.
:class:`Trimmer` asks it every ``TRIM_INTERVAL`` seconds (``malloc_trim``, a
millisecond or so) to return every whole free page, so memory freed after a
burst goes back to the system instead of counting against the host.
"""

from __future__ import annotations

import ctypes
import os
import sys
from typing import Callable, Mapping

from twisted.internet.interfaces import IReactorTime
from twisted_gateway.periodic import Periodic

#: Blocks this large or larger get their own mapping (glibc's own starting value).
MMAP_THRESHOLD = 128 * 1024
_M_MMAP_THRESHOLD = -3
#: Seconds between two requests to glibc to return its whole free pages.
TRIM_INTERVAL = 10.0


def _libc() -> ctypes.CDLL | None:
    """glibc, or None (another C library, another system)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")  # glibc's name on every Linux it runs
        libc.mallopt, libc.malloc_trim  # noqa: B018 - glibc has both, musl neither
    except (OSError, AttributeError):
        return None
    return libc


def fix_mmap_threshold(environ: Mapping[str, str] = os.environ) -> bool:
    """
    Pin glibc's mmap threshold; True if it was set. Nothing is done off glibc
    or when the operator chose a value with ``MALLOC_MMAP_THRESHOLD_``.
    """
    libc = _libc()
    if libc is None or "MALLOC_MMAP_THRESHOLD_" in environ:
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))


class Trimmer:
    """Every ``interval`` s, ``trim()`` (glibc's ``malloc_trim(0)``) until :meth:`stop`."""

    def __init__(self, clock: IReactorTime, trim: Callable[[], object], interval: float = TRIM_INTERVAL) -> None:
        self._loop = Periodic(clock, interval, trim)

    @classmethod
    def for_glibc(cls, clock: IReactorTime) -> Trimmer | None:
        """A trimmer of this process's malloc, or None off glibc."""
        libc = _libc()
        return None if libc is None else cls(clock, lambda: libc.malloc_trim(0))

    def start(self) -> None:
        self._loop.start()

    def stop(self) -> None:
        self._loop.stop()
