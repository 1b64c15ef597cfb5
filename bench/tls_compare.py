"""
What TLS costs the WebSocket relay: handshake rate and relay throughput with
and without TLS, measured in the same run on loopback.

Three modes, each a fresh ``twistd -n wsgateway`` subprocess in front of an
echo upstream (asyncio ``websockets`` peers in this process, compression off
so that only TLS differs):

- ``plain``: ``ws://`` client -> ``tcp:`` listener -> ``ws://`` upstream;
- ``edge-tls``: ``wss://`` client -> ``ssl:`` listener -> ``ws://`` upstream;
- ``tls``: ``wss://`` client -> ``ssl:`` listener -> ``wss://`` upstream
  (verified with ``ca_file``, as a private-CA deployment runs it).

Per mode: opening handshakes (client to gateway to upstream and back, one
echoed byte, then a close) one at a time and 20 at a time; round trips of
100-byte messages with 32 in flight; 64 KiB messages echoed, 32 in flight.
Besides wall-clock rates, the gateway's own CPU seconds per operation are read
from ``/proc/PID/stat``: with clients and upstream sharing this process (and
the machine shared with whatever else runs), wall-clock rates are noisy and
may be bounded by the harness; CPU per operation still compares the modes.
The modes are interleaved over ``--rounds`` rounds and each figure is the
median of its rounds.

Prints a Markdown table and writes ``bench/results/tls_compare.json``. Loopback
only; every loop is bounded in count and time (``--quick`` for a short run).

    .venv/bin/python bench/tls_compare.py [--quick] [--rounds N]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import platform
import statistics
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from websockets.asyncio.client import connect as ws_connect
from websockets.asyncio.server import serve as ws_serve

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.certs import Authority  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "tls_compare.json"
LOOPBACK = "127.0.0.1"
KiB = 1024
MODES = ("plain", "edge-tls", "tls")
_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Sizes:
    handshakes: int
    concurrency: int
    small_messages: int
    small_size: int
    window: int
    bulk_messages: int
    bulk_size: int
    scenario_timeout_s: float


FULL = Sizes(1000, 20, 20_000, 100, 32, 2000, 64 * KiB, 120.0)
QUICK = Sizes(200, 20, 4000, 100, 32, 400, 64 * KiB, 60.0)


@dataclass
class Result:
    mode: str
    handshakes_per_s_serial: float
    handshakes_per_s_concurrent: float
    gateway_cpu_ms_per_handshake: float
    small_round_trips_per_s: float
    gateway_cpu_us_per_small_message: float
    bulk_mib_per_s: float
    gateway_cpu_ms_per_mib: float


class PKI:
    def __init__(self, directory: Path) -> None:
        ca = Authority("bench-ca")
        self.ca = ca.write(directory)
        self.gateway_cert, self.gateway_key = ca.issue("gateway", ips=(LOOPBACK,)).write(directory)
        self.upstream_cert, self.upstream_key = ca.issue("upstream", ips=(LOOPBACK,)).write(directory)

    def client_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca))

    def upstream_context(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.upstream_cert, self.upstream_key)
        return context


class Gateway:
    """One ``twistd -n wsgateway`` child; its CPU time read from /proc."""

    def __init__(self, config: str, workdir: Path, name: str) -> None:
        self.config = workdir / f"{name}.cfg"
        self.config.write_text(config)
        self.workdir = workdir
        self.lines: collections.deque[str] = collections.deque(maxlen=100)
        self.port: int | None = None
        self._listening = threading.Event()
        twistd = Path(sys.executable).parent / "twistd"
        self.proc = subprocess.Popen(
            [str(twistd), "-n", "--pidfile=", "wsgateway", "--config", str(self.config)],
            cwd=workdir,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
        )
        threading.Thread(target=self._drain, daemon=True).start()
        if not self._listening.wait(30) or self.port is None:
            self.stop()
            raise RuntimeError("the gateway did not start:\n" + "\n".join(self.lines))

    def _drain(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip())
            if self.port is None and "wsgateway listening on" in line:
                self.port = int(line.rsplit("(port ", 1)[1].split(")", 1)[0])
                self._listening.set()
        self._listening.set()

    def cpu_seconds(self) -> float:
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _TICKS  # utime + stime

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def gateway_config(mode: str, pki: PKI, upstream_port: int) -> str:
    listen = f"tcp:0:interface={LOOPBACK}"
    if mode != "plain":
        listen = f"ssl:0:interface={LOOPBACK}:privateKey={pki.gateway_key}:certKey={pki.gateway_cert}"
    scheme = "https" if mode == "tls" else "http"
    ca = f"ca_file = {pki.ca}" if mode == "tls" else ""
    return f"""
[gateway]
listen = {listen}
ws_compression = false

[route:echo]
prefix = /
upstream = {scheme}://{LOOPBACK}:{upstream_port}
{ca}
"""


async def echo(connection) -> None:
    async for message in connection:
        await connection.send(message)


async def measure(mode: str, pki: PKI, sizes: Sizes, workdir: Path) -> Result:
    upstream_tls = pki.upstream_context() if mode == "tls" else None
    async with ws_serve(echo, LOOPBACK, 0, ssl=upstream_tls, compression=None, max_size=None) as server:
        upstream_port = server.sockets[0].getsockname()[1]
        gateway = Gateway(gateway_config(mode, pki, upstream_port), workdir, mode)
        try:
            client_tls = pki.client_context() if mode != "plain" else None
            scheme = "wss" if client_tls else "ws"
            url = f"{scheme}://{LOOPBACK}:{gateway.port}/echo"

            def open_ws():
                return ws_connect(url, ssl=client_tls, compression=None, max_size=None, open_timeout=10)

            async def one_handshake() -> None:
                async with open_ws() as ws:
                    await ws.send(b"x")
                    await ws.recv()

            async def timed(coro) -> float:
                started = time.perf_counter()
                await asyncio.wait_for(coro, sizes.scenario_timeout_s)
                return time.perf_counter() - started

            await one_handshake()  # warm-up

            async def serial() -> None:
                for _ in range(sizes.handshakes):
                    await one_handshake()

            cpu = gateway.cpu_seconds()
            serial_s = await timed(serial())
            cpu_serial = gateway.cpu_seconds() - cpu

            async def worker(count: int) -> None:
                for _ in range(count):
                    await one_handshake()

            async def concurrent() -> None:
                each = sizes.handshakes // sizes.concurrency
                await asyncio.gather(*(worker(each) for _ in range(sizes.concurrency)))

            concurrent_s = await timed(concurrent())

            async def pipelined(ws, count: int, payload: bytes) -> None:
                in_flight = asyncio.Semaphore(sizes.window)

                async def reader() -> None:
                    for _ in range(count):
                        await ws.recv()
                        in_flight.release()

                reading = asyncio.ensure_future(reader())
                for _ in range(count):
                    await in_flight.acquire()
                    await ws.send(payload)
                await reading

            async with open_ws() as ws:
                small = os.urandom(sizes.small_size)
                cpu = gateway.cpu_seconds()
                small_s = await timed(pipelined(ws, sizes.small_messages, small))
                cpu_small = gateway.cpu_seconds() - cpu

                bulk = os.urandom(sizes.bulk_size)
                cpu = gateway.cpu_seconds()
                bulk_s = await timed(pipelined(ws, sizes.bulk_messages, bulk))
                cpu_bulk = gateway.cpu_seconds() - cpu
        finally:
            gateway.stop()

    bulk_mib = 2 * sizes.bulk_messages * sizes.bulk_size / (1024 * KiB)  # each way through the relay
    return Result(
        mode=mode,
        handshakes_per_s_serial=sizes.handshakes / serial_s,
        handshakes_per_s_concurrent=(sizes.handshakes // sizes.concurrency * sizes.concurrency) / concurrent_s,
        gateway_cpu_ms_per_handshake=1000 * cpu_serial / sizes.handshakes,
        small_round_trips_per_s=sizes.small_messages / small_s,
        gateway_cpu_us_per_small_message=1e6 * cpu_small / sizes.small_messages,
        bulk_mib_per_s=bulk_mib / bulk_s,
        gateway_cpu_ms_per_mib=1000 * cpu_bulk / bulk_mib,
    )


def table(results: list[Result]) -> str:
    rows = [
        ("handshakes/s, one at a time", "handshakes_per_s_serial", "{:,.0f}"),
        ("handshakes/s, concurrent", "handshakes_per_s_concurrent", "{:,.0f}"),
        ("gateway CPU ms per handshake", "gateway_cpu_ms_per_handshake", "{:.2f}"),
        ("100 B round trips/s (window 32)", "small_round_trips_per_s", "{:,.0f}"),
        ("gateway CPU µs per 100 B message", "gateway_cpu_us_per_small_message", "{:.0f}"),
        ("64 KiB echo, MiB/s through the relay", "bulk_mib_per_s", "{:,.1f}"),
        ("gateway CPU ms per MiB relayed", "gateway_cpu_ms_per_mib", "{:.2f}"),
    ]
    lines = ["| | " + " | ".join(r.mode for r in results) + " |", "|---" * (len(results) + 1) + "|"]
    for label, name, fmt in rows:
        lines.append(f"| {label} | " + " | ".join(fmt.format(getattr(r, name)) for r in results) + " |")
    return "\n".join(lines)


def median(results: list[Result]) -> Result:
    numbers = {
        name: statistics.median(getattr(r, name) for r in results)
        for name in Result.__dataclass_fields__
        if name != "mode"
    }
    return Result(mode=results[0].mode, **numbers)


async def main(sizes: Sizes, rounds: int) -> tuple[list[Result], list[Result]]:
    """Every round runs every mode once, in turn; the medians per mode, and every round."""
    runs: list[Result] = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        pki = PKI(workdir)
        for _ in range(rounds):
            for mode in MODES:
                runs.append(await measure(mode, pki, sizes, workdir))
    return [median([r for r in runs if r.mode == mode]) for mode in MODES], runs


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller counts")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of all modes (median)")
    options = parser.parse_args()
    sizes = QUICK if options.quick else FULL
    results, runs = asyncio.run(main(sizes, max(1, min(options.rounds, 10))))
    print(table(results))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "sizes": asdict(sizes),
                "python": platform.python_version(),
                "cpus": os.cpu_count(),
                "rounds": len(runs) // len(MODES),
                "load_average_at_end": os.getloadavg(),
                "results": [asdict(r) for r in results],
                "runs": [asdict(r) for r in runs],
            },
            indent=2,
        )
        + "\n"
    )
