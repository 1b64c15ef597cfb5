"""
glibc, as ``twistd wsgateway`` sets it: big buffers keep their own mapping
(given back when freed, not left as holes in the heap), and the free pages of
the heap are given back every ``TRIM_INTERVAL``. The memory cases run in a
fresh interpreter, as twistd does.
"""

from __future__ import annotations

import json
import subprocess
import sys

from twisted.internet.task import Clock

from twisted_gateway.allocator import TRIM_INTERVAL, Trimmer, fix_mmap_threshold

# One big message freed (by default glibc then raises its threshold above it),
# then a message of 256 KiB: does it get its own mapping, given back when freed?
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
mapped = libc.mallinfo2().hblkhd
message = bytearray(256 * 1024)
print(json.dumps({"pinned": pinned, "message_mapped": libc.mallinfo2().hblkhd - mapped >= 256 * 1024}))
"""


def _run(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", WORKLOAD, mode], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def test_big_buffers_keep_their_own_mapping_after_a_bigger_one_was_freed():
    default, pinned = _run("default"), _run("pinned")
    assert default == {"pinned": False, "message_mapped": False}  # glibc's own rule: from the heap
    assert pinned == {"pinned": True, "message_mapped": True}


def test_the_trimmer_asks_for_free_pages_back_every_interval_until_stopped():
    clock, trims = Clock(), []
    trimmer = Trimmer(clock, lambda: trims.append(clock.seconds()))
    trimmer.start()
    for _ in range(3):
        clock.advance(TRIM_INTERVAL)
    trimmer.stop()
    clock.advance(TRIM_INTERVAL * 3)
    assert trims == [TRIM_INTERVAL, TRIM_INTERVAL * 2, TRIM_INTERVAL * 3]
    assert clock.getDelayedCalls() == []


def test_trimming_gives_freed_heap_pages_back_to_the_system():
    out = subprocess.run([sys.executable, "-c", TRIMMED], capture_output=True, text=True, check=True)
    before, after = json.loads(out.stdout)
    assert before - after > 8 * 2**20


# 2,000 blocks of 16 KiB, every other one freed: 16 MiB of free pages scattered
# in the heap, each between two blocks still in use.
TRIMMED = """
import json
from twisted.internet.task import Clock
from twisted_gateway.allocator import Trimmer
def rss():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) * 1024
clock = Clock(); trimmer = Trimmer.for_glibc(clock); trimmer.start()
blocks = [bytearray(16 * 1024) for _ in range(2000)]
del blocks[::2]
before = rss()
clock.advance(10)
print(json.dumps([before, rss()]))
"""


def test_an_operators_own_threshold_is_left_alone():
    assert fix_mmap_threshold({"MALLOC_MMAP_THRESHOLD_": "65536"}) is False
