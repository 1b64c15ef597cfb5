"""
Memory and throughput of the HTTP forwarder, measured on loopback.

1. Slow reader: downloads ``--size-mib`` (default 1024) through an
   HTTPForwarder-backed gateway while reading at only ``--rate-mib`` MiB/s;
   the upstream could send far faster (an unthrottled download is measured
   first), so without backpressure the gateway would have to hold the
   difference. Prints the gateway process's RSS growth
   (``/proc/PID/status`` VmRSS sampled during the download, and VmHWM).
2. Requests per second: the same small GET, ``--connections`` keep-alive
   clients for ``--rps-seconds`` each, straight to the upstream and then
   through the gateway.

The upstream and the gateway each run in their own subprocess so that the
gateway's RSS is its own. Usage::

    .venv/bin/python bench/http_slow_reader.py --size-mib 1024 --rate-mib 128
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import time

CHUNK = 64 * 1024


# -- the two servers (run as subprocesses) --------------------------------------


def run_upstream() -> None:
    """``/blob?size=N`` streams N bytes as fast as allowed; anything else is 12 bytes."""
    from twisted.internet import reactor
    from twisted.internet.endpoints import serverFromString
    from twisted.internet.interfaces import IPushProducer
    from twisted.web.resource import Resource
    from twisted.web.server import NOT_DONE_YET, Site
    from zope.interface import implementer

    @implementer(IPushProducer)
    class Blob:
        def __init__(self, request, size: int) -> None:
            self.request, self.remaining = request, size
            self.paused = self.stopped = False
            self.data = b"x" * CHUNK
            request.setHeader(b"content-length", b"%d" % size)
            request.setHeader(b"content-type", b"application/octet-stream")
            request.registerProducer(self, True)
            reactor.callLater(0, self.pump)

        def pump(self) -> None:
            while self.remaining and not self.paused and not self.stopped:
                size = min(self.remaining, CHUNK)
                self.remaining -= size
                self.request.write(self.data[:size])
            if not self.remaining and not self.stopped:
                self.stopped = True
                self.request.unregisterProducer()
                self.request.finish()

        def pauseProducing(self) -> None:
            self.paused = True

        def resumeProducing(self) -> None:
            self.paused = False
            reactor.callLater(0, self.pump)

        def stopProducing(self) -> None:
            self.stopped = True

    class Root(Resource):
        isLeaf = True

        def render(self, request):
            if request.path == b"/blob":
                Blob(request, int(request.args[b"size"][0]))
                return NOT_DONE_YET
            request.setHeader(b"content-type", b"text/plain")
            return b"hello world\n"

    site = Site(Root())
    site.log = lambda request: None
    _serve(reactor, serverFromString, site)


def run_gateway(upstream: str) -> None:
    """Every request forwarded to ``upstream`` by an HTTPForwarder."""
    from twisted.internet import reactor
    from twisted.internet.endpoints import serverFromString
    from twisted.logger import globalLogBeginner, textFileLogObserver
    from twisted.web.resource import Resource
    from twisted.web.server import Site

    from twisted_gateway.config import GatewaySettings
    from twisted_gateway.http_proxy import GatewayRequest, HTTPForwarder
    from twisted_gateway.routing import normalize_path, split_uri

    # Access-log events are formatted and written, as in production, but to nowhere.
    globalLogBeginner.beginLoggingTo(
        [textFileLogObserver(open(os.devnull, "w"))], redirectStandardIO=False
    )
    settings = GatewaySettings()
    forwarder = HTTPForwarder(settings, reactor)

    class ForwardAll(Resource):
        isLeaf = True

        def render(self, request):
            path, query = split_uri(request.uri)
            return forwarder.forward(request, upstream, normalize_path(path), query)

    site = Site(ForwardAll())
    site.requestFactory = GatewayRequest.for_settings(settings)
    site.log = lambda request: None
    _serve(reactor, serverFromString, site)


def _serve(reactor, serverFromString, site) -> None:
    def listening(port) -> None:
        print(port.getHost().port, flush=True)

    serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(site).addCallback(listening)
    reactor.run()


def start(*role: str) -> tuple[subprocess.Popen, int]:
    process = subprocess.Popen(
        [sys.executable, __file__, "--role", *role], stdout=subprocess.PIPE, text=True
    )
    port = int(process.stdout.readline())
    return process, port


# -- measurements ---------------------------------------------------------------


def status_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def download(port: int, size: int, rate: float | None, sample=None) -> float:
    """GET /blob through ``port`` reading at most ``rate`` bytes/s; returns seconds."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, CHUNK)
    sock.connect(("127.0.0.1", port))
    sock.sendall(
        b"GET /blob?size=%d HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n" % size
    )
    started = last_sample = time.monotonic()
    received = 0
    buffer = b""
    while b"\r\n\r\n" not in buffer:
        buffer += sock.recv(CHUNK)
    head, _, rest = buffer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    received = len(rest)
    while True:
        data = sock.recv(CHUNK)
        if not data:
            break
        received += len(data)
        now = time.monotonic()
        if rate is not None:
            ahead = received / rate - (now - started)
            if ahead > 0:
                time.sleep(ahead)
        if sample is not None and now - last_sample > 0.2:
            sample()
            last_sample = now
    sock.close()
    assert received == size, (received, size)
    return time.monotonic() - started


async def _load(port: int, connections: int, seconds: float) -> tuple[int, float]:
    request = b"GET /small HTTP/1.1\r\nHost: bench\r\n\r\n"
    deadline = time.monotonic() + seconds
    done = 0
    latency = 0.0

    async def worker() -> None:
        nonlocal done, latency
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        while time.monotonic() < deadline:
            sent = time.monotonic()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
            await reader.readexactly(length)
            latency += time.monotonic() - sent
            done += 1
        writer.close()
        await writer.wait_closed()

    await asyncio.gather(*(worker() for _ in range(connections)))
    return done, latency / max(done, 1)


def requests_per_second(port: int, connections: int, seconds: float) -> tuple[float, float]:
    asyncio.run(_load(port, connections, 0.5))  # warm up
    done, latency = asyncio.run(_load(port, connections, seconds))
    return done / seconds, latency


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--rate-mib", type=float, default=128.0, help="slow reader's speed")
    parser.add_argument("--rps-seconds", type=float, default=5.0, help="0 skips the req/s part")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--role", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role:
        if args.role[0] == "upstream":
            run_upstream()
        else:
            run_gateway(args.role[1])
        return

    upstream, upstream_port = start("upstream")
    gateway, gateway_port = start("gateway", f"http://127.0.0.1:{upstream_port}")
    try:
        pid = gateway.pid
        fast = 256 * 1024 * 1024
        fast_seconds = download(gateway_port, fast, None)  # also the warm-up
        print(f"unthrottled reader: 256 MiB through the gateway at "
              f"{fast / fast_seconds / 2**20:.0f} MiB/s")
        baseline = status_kib(pid, "VmRSS")
        samples = [baseline]
        size = args.size_mib * 1024 * 1024
        seconds = download(
            gateway_port,
            size,
            args.rate_mib * 1024 * 1024,
            sample=lambda: samples.append(status_kib(pid, "VmRSS")),
        )
        samples.append(status_kib(pid, "VmRSS"))
        peak_rss = max(samples)
        hwm = status_kib(pid, "VmHWM")
        print(f"slow reader: {args.size_mib} MiB through the gateway at "
              f"{size / seconds / 2**20:.1f} MiB/s in {seconds:.1f} s")
        print(f"  gateway VmRSS before {baseline / 1024:.1f} MiB, peak sampled "
              f"{peak_rss / 1024:.1f} MiB ({len(samples)} samples), VmHWM {hwm / 1024:.1f} MiB")
        print(f"  RSS growth: {(peak_rss - baseline) / 1024:.2f} MiB "
              f"(high-water mark minus baseline: {(hwm - baseline) / 1024:.2f} MiB)")

        if args.rps_seconds > 0:
            direct, direct_latency = requests_per_second(
                upstream_port, args.connections, args.rps_seconds
            )
            proxied, proxied_latency = requests_per_second(
                gateway_port, args.connections, args.rps_seconds
            )
            print(f"req/s, {args.connections} keep-alive connections, "
                  f"{args.rps_seconds:g} s each, {os.cpu_count()} CPUs shared by all processes:")
            print(f"  direct  {direct:8.0f} req/s  mean latency {direct_latency * 1000:.2f} ms")
            print(f"  gateway {proxied:8.0f} req/s  mean latency {proxied_latency * 1000:.2f} ms"
                  f"  ({proxied / direct:.0%} of direct)")
    finally:
        for process in (gateway, upstream):
            process.terminate()
            process.wait(10)


if __name__ == "__main__":
    main()
