"""
``twistd`` with tracemalloc, for ``bench/soak.py --trace-memory``: whether RSS
that grows is memory Python still holds (a leak) or memory the allocator keeps.

On SIGUSR2 the process collects its cyclic garbage, saves a tracemalloc snapshot to ``$SOAK_MEMORY_DIR/
snapshot-N`` and appends a JSON line to ``$SOAK_MEMORY_DIR/memory.jsonl``: its
RSS, the bytes Python's live allocations hold (tracemalloc), and, when the file
``$SOAK_MEMORY_DIR/trim`` exists, its RSS again after glibc's ``malloc_trim(0)``
(what the allocator was holding free). Arguments are twistd's.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import signal
import sys
import tracemalloc
from pathlib import Path

OUT = Path(os.environ.get("SOAK_MEMORY_DIR", "."))


def rss() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def dump(signum, frame) -> None:
    n = len(list(OUT.glob("snapshot-*")))
    before = rss()  # the snapshot itself takes memory
    collected = gc.collect()  # garbage in cycles is not held: only what is still reachable counts
    snapshot = tracemalloc.take_snapshot()
    snapshot.dump(str(OUT / f"snapshot-{n}"))
    traced, peak = tracemalloc.get_traced_memory()
    line = {"n": n, "rss": before, "traced": traced, "traced_peak": peak, "collected": collected}
    if (OUT / "trim").exists():
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        line["rss_after_trim"] = rss()
    with open(OUT / "memory.jsonl", "a") as f:
        f.write(json.dumps(line) + "\n")


def main() -> None:
    tracemalloc.start(1)
    signal.signal(signal.SIGUSR2, dump)
    from twisted.scripts.twistd import run

    sys.argv = ["twistd", *sys.argv[1:]]
    run()


if __name__ == "__main__":
    main()
