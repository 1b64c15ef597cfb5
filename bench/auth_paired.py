"""
What ``auth = required`` adds to a handshake and to a request over ``auth =
none``, for a token the gateway has verified before, measured paired in one
gateway: issue 17's bar is 0.05 ms, less than separate runs of figure 3 move
from one repetition to the next.

Blocks of WebSocket handshakes (open + close, one at a time, each a new
connection) or of keep-alive GETs (4 connections, one request at a time)
alternate between ``/none/x`` (route ``echo``, ``auth = none``) and
``/auth/x`` (route ``auth``, ``auth = required``, the same token every time:
``?token=`` for a handshake, as a browser sends it, ``Authorization: Bearer``
for a GET), in the order none auth, auth none, none auth, ... so that a drift
of the machine falls on both sides alike. The gateway's CPU time over each
block is read from ``/proc/PID/task/*/schedstat`` (nanoseconds on a CPU, not
utime's 10 ms ticks); each pair of blocks gives one difference per handshake
or request, and the figure is the median of the differences, with a 95 %
bootstrap interval of that median and their interquartile range.

    .venv/bin/python bench/auth_paired.py [--pairs 60] [--handshakes 20] [--requests 100]

run alone starts the benchmark's backend and gateway (pinned as bench/run.py
pins them); ``make bench`` runs it at the end of figures 3 and 6.
"""

from __future__ import annotations

import argparse
import glob
import http.client
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable

sys.path.insert(0, str(Path(__file__).resolve().parent))
import report  # noqa: E402
from http_instructions import handshakes, send_requests  # noqa: E402  (the instruction counter's clients)
from targets import LOOPBACK, Backend, Gateway, Placement, ensure_node_modules, stop_all  # noqa: E402

#: The two sides of a pair: the same shape of path, on a route without and with auth.
NONE_PATH, AUTH_PATH = "/none/x", "/auth/x"


def cpu_ns(pids: Iterable[int]) -> int:
    """Nanoseconds the scheduler ran every thread of ``pids`` so far (gone threads count 0)."""
    total = 0
    for pid in pids:
        for name in glob.glob(f"/proc/{pid}/task/*/schedstat"):
            try:
                with open(name) as f:
                    total += int(f.read().split()[0])
            except (OSError, ValueError, IndexError):
                pass
    return total


def _blocks(
    kind: str, port: int, token: str, connections: list[http.client.HTTPConnection]
) -> tuple[Callable[[int], None], Callable[[int], None]]:
    """The two sides' blocks: handshakes (``kind`` "handshake"), or GETs over ``connections``."""
    if kind == "handshake":
        return (
            lambda count: handshakes(port, NONE_PATH, None, [token], count),
            lambda count: handshakes(port, AUTH_PATH, "query", [token], count),
        )
    return (
        lambda count: send_requests(connections, NONE_PATH, None, [token], count),
        lambda count: send_requests(connections, AUTH_PATH, "header", [token], count),
    )


def measure(kind: str, port: int, pids: list[int], token: str, *, pairs: int, block: int) -> dict[str, Any]:
    """
    ``pairs`` pairs of blocks of ``block`` handshakes (``kind`` "handshake") or
    GETs ("request"), after two pairs not counted; CPU ms per unit on each side
    and the differences (their figures: :func:`report.paired_summary`).
    """
    count = 4 if kind == "request" else 0  # GETs keep 4 connections open for the run; closed at its end
    connections = [http.client.HTTPConnection(LOOPBACK, port, timeout=120) for _ in range(count)]
    none, auth = _blocks(kind, port, token, connections)
    none_ms: list[float] = []
    auth_ms: list[float] = []
    try:
        for i in range(pairs + 2):
            sides = ((none, none_ms), (auth, auth_ms)) if i % 2 == 0 else ((auth, auth_ms), (none, none_ms))
            for run, out in sides:
                before = cpu_ns(pids)
                run(block)
                used = cpu_ns(pids) - before
                if i >= 2:  # the first two pairs warm both routes up
                    out.append(used / block / 1e6)
    finally:
        for connection in connections:
            connection.close()
    differences = [a - n for n, a in zip(none_ms, auth_ms)]
    return {
        "auth_over_none_ms": statistics.median(differences),
        "none_per_unit_ms": statistics.median(none_ms),
        "auth_per_unit_ms": statistics.median(auth_ms),
        "block": block,
        "differences_ms": differences,
        "none_ms": none_ms,
        "auth_ms": auth_ms,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=60)
    parser.add_argument("--handshakes", type=int, default=20, help="handshakes per block")
    parser.add_argument("--requests", type=int, default=100, help="GETs per block")
    parser.add_argument("--no-pin", action="store_true", help="do not pin with taskset")
    args = parser.parse_args()
    ensure_node_modules()
    placement = Placement(pin=not args.no_pin)
    placement.pin_self()
    with tempfile.TemporaryDirectory(prefix="auth-paired-") as work:
        backend = Backend(placement, Path(work))
        backend.start()
        gateway = Gateway(backend, placement, Path(work))
        try:
            gateway.start()
            token = gateway.token()
            for kind, block in (("handshake", args.handshakes), ("request", args.requests)):
                began = time.monotonic()
                found = measure(kind, gateway.port, gateway.pids(), token, pairs=args.pairs, block=block)
                print(
                    f"{kind}: auth = required {found['auth_per_unit_ms']:.3f} ms, auth = none"
                    f" {found['none_per_unit_ms']:.3f} ms; paired difference"
                    f" {report.fmt_summary(report.paired_summary(found['differences_ms']), 3)} ms"
                    f" ({args.pairs} pairs of {block}, {time.monotonic() - began:.0f} s)",
                    flush=True,
                )
        finally:
            gateway.stop()
            backend.stop()
            stop_all()


if __name__ == "__main__":
    main()
