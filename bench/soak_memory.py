"""
``twistd`` with a memory probe, for ``bench/soak.py --trace-memory`` and
``--probe-memory``: whether RSS that grows is memory Python still holds (a
leak) or memory the allocator keeps.

On SIGUSR2 the process appends a JSON line to ``$SOAK_MEMORY_DIR/memory.jsonl``.

- ``--probe-memory`` (``SOAK_MEMORY_MODE=probe``, cheap enough for the full
  load): RSS, the blocks Python's allocator has handed out
  (``sys.getallocatedblocks``), what glibc's malloc has in use, keeps free and
  has mapped (``mallinfo2``, over all its arenas), the process's threads, and
  on every sixth line the count of live objects by type; the harness's last
  line also collects cyclic garbage and counts again.
- ``--trace-memory`` (tracemalloc, slow): collects cyclic garbage, saves a
  snapshot to ``$SOAK_MEMORY_DIR/snapshot-N``, and writes RSS and the bytes
  Python's live allocations hold; when ``$SOAK_MEMORY_DIR/trim`` exists, RSS
  again after glibc's ``malloc_trim(0)`` (what the allocator was holding free).

Arguments are twistd's.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import signal
import sys
import tempfile
import time
import tracemalloc
from collections import Counter
from pathlib import Path

OUT = Path(os.environ.get("SOAK_MEMORY_DIR", "."))
MODE = os.environ.get("SOAK_MEMORY_MODE", "trace")
LIBC = ctypes.CDLL("libc.so.6")


class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost"
    )]


LIBC.mallinfo2.restype = MallInfo2


def status() -> dict[str, int]:
    """The process's memory lines of ``/proc/self/status``, in bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            name, _, value = line.partition(":")
            if name in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
                out[name] = int(value.split()[0]) * 1024
    return out


def rss() -> int:
    return status()["VmRSS"]


def pymalloc() -> dict[str, int]:
    """Python's own allocator (arenas of 1 MiB, mapped outside malloc): ``sys._debugmallocstats``."""
    saved = os.dup(2)
    with tempfile.TemporaryFile() as f:
        os.dup2(f.fileno(), 2)
        try:
            sys._debugmallocstats()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        f.seek(0)
        text = f.read().decode()
    wanted = {"arenas allocated current": "py_arenas", "bytes in allocated blocks": "py_allocated",
              "bytes in available blocks": "py_available"}
    out = {}
    for line in text.splitlines():
        name, _, value = line.lstrip("# ").partition("=")
        if name.strip() in wanted:
            out[wanted[name.strip()]] = int(value.strip().replace(",", ""))
    return out


def write(line: dict) -> None:
    with open(OUT / "memory.jsonl", "a") as f:
        f.write(json.dumps(line) + "\n")


def trace(signum, frame) -> None:
    n = len(list(OUT.glob("snapshot-*")))
    before = rss()  # the snapshot itself takes memory
    collected = gc.collect()  # garbage in cycles is not held: only what is still reachable counts
    snapshot = tracemalloc.take_snapshot()
    snapshot.dump(str(OUT / f"snapshot-{n}"))
    traced, peak = tracemalloc.get_traced_memory()
    line = {"n": n, "rss": before, "traced": traced, "traced_peak": peak, "collected": collected}
    if (OUT / "trim").exists():
        LIBC.malloc_trim(0)
        line["rss_after_trim"] = rss()
    write(line)


probes = 0


def types() -> dict[str, int]:
    return dict(Counter(type(o).__name__ for o in gc.get_objects()).most_common(60))


def probe(signum, frame) -> None:
    global probes
    info = LIBC.mallinfo2()
    line = {
        "n": probes,
        "t": time.time(),
        "rss": rss(),
        "rss_anon": status()["RssAnon"],
        "rss_file": status()["RssFile"],
        **pymalloc(),
        "py_blocks": sys.getallocatedblocks(),
        "malloc_in_use": info.uordblks + info.hblkhd,
        "malloc_free": info.fordblks,
        "malloc_mapped": info.hblkhd,
        "malloc_arena": info.arena,
        "threads": len(os.listdir("/proc/self/task")),
    }
    if probes % 6 == 0 or (OUT / "collect").exists():
        line["types"] = types()
    if (OUT / "collect").exists():  # the last line: what of it was garbage not yet collected
        line["collected"] = gc.collect()
        line["types_after_collect"] = types()
        line["rss_after_collect"] = rss()
    probes += 1
    write(line)


def main() -> None:
    if MODE == "trace":
        tracemalloc.start(1)
    signal.signal(signal.SIGUSR2, trace if MODE == "trace" else probe)
    from twisted.scripts.twistd import run

    sys.argv = ["twistd", *sys.argv[1:]]
    run()


if __name__ == "__main__":
    main()
