"""
glibc's mmap threshold pinned by ``allocator.fix_mmap_threshold``: big
buffers freed go back to the system instead of staying as holes in the heap.
Each case runs in a fresh interpreter, as twistd does.
"""

from __future__ import annotations

import json
import subprocess
import sys

from twisted_gateway.allocator import fix_mmap_threshold

# One big message freed (glibc then raises its threshold), then 100 messages of
# 256 KiB, each followed by a small allocation that outlives it, as a chat
# relay's buffers and its connections' objects interleave; the messages go.
WORKLOAD = """
import ctypes, json, sys
from twisted_gateway.allocator import fix_mmap_threshold
pinned = fix_mmap_threshold() if sys.argv[1] == "pinned" else False
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split())]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
big = bytearray(1 << 20); del big
messages, kept = [], []
for i in range(100):
    messages.append(bytearray(256 * 1024))
    kept.append(bytearray(600))
del messages
print(json.dumps({"pinned": pinned, "heap_kept_free": libc.mallinfo2().fordblks}))
"""


def _run(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", WORKLOAD, mode], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def test_freed_big_buffers_are_not_kept_as_holes_in_the_heap():
    default, pinned = _run("default"), _run("pinned")
    assert pinned["pinned"] is True
    assert default["heap_kept_free"] > 20 * 2**20  # 100 x 256 KiB left as holes
    assert pinned["heap_kept_free"] < 2**20


def test_an_operators_own_threshold_is_left_alone():
    assert fix_mmap_threshold({"MALLOC_MMAP_THRESHOLD_": "65536"}) is False
