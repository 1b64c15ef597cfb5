"""
Issue 16's figures: what ``workers = 2`` costs against ``workers = 1``, how the
kernel spreads one client host's WebSockets over two workers, and a SIGHUP
rolling restart under a steady load.

1. **CPU per unit of work** of the gateway's whole process tree (supervisor and
   workers), pinned to one CPU as in ``bench/run.py`` and measured the same way
   (utime + stime from /proc, read by ``bench/load.js`` around the measured
   window), ``workers = 1`` and ``workers = 2`` interleaved: a WebSocket
   handshake with a JWT (open + close, 8 at a time), 64 B WebSocket messages at
   a fixed 2,000/s, HTTP GETs at a fixed 1,000/s and saturating. The ratio is
   what a second process and the supervisor cost per unit: on a host of N
   cores, N workers each do 1/ratio of what one process does on one core.
2. **Spread**: 400 WebSockets opened by one client host on ``workers = 2``,
   counted per worker with ``ss -p``; repeated, each time on new connections.
3. **Rolling restart**: ``kill -HUP`` while threads open new WebSockets and
   send HTTP requests on new connections, one after another, until the restart
   is done and 1 s after; every attempt is counted ok, refused, reset, 5xx or
   other, and WebSockets held open across it report the close code they got
   (1012 "service restart" is the one promised). With ``workers = 2`` and 1.

    .venv/bin/python bench/workers.py [--quick | --smoke] [--only cpu,spread,restart] [--reps N]

Writes ``bench/results/workers-<plan>-<time>.{md,json}`` and
``latest-workers-<plan>.*``. Exit status: 0 when every check held (no bad echo
or answer in 1, every socket counted in 2, no failed attempt in 3 and 1012 on
every held WebSocket), 1 otherwise, 2 on a crash.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import datetime
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))

import report  # noqa: E402
import run  # noqa: E402
from targets import BENCH, LOOPBACK, Gateway, Load, Target, cpu_ticks, load_average, stop_all, wait_for_log  # noqa: E402


@dataclass(frozen=True)
class Plan:
    """How much work each part does."""

    name: str
    reps: int
    hs_count: int = 800
    hs_warmup: int = 100
    rate: int = 2000
    http_rate: int = 1000
    warmup_s: float = 1.0
    measure_s: float = 4.0
    spread_sockets: int = 400
    spread_reps: int = 5
    restart_reps: int = 3
    held: int = 50
    load_threads: int = 4


FULL = Plan("full", reps=3)
QUICK = Plan("quick", reps=1, hs_count=300, hs_warmup=50, warmup_s=0.5, measure_s=2.0, spread_reps=2,
             restart_reps=1)
#: Tiny amounts: proves the machinery (tests/test_bench_workers.py), measures nothing.
SMOKE = Plan("smoke", reps=1, hs_count=10, hs_warmup=2, rate=200, http_rate=100, warmup_s=0.1, measure_s=0.3,
             spread_sockets=40, spread_reps=1, restart_reps=1, held=4, load_threads=2)
PLANS = {"full": FULL, "quick": QUICK, "smoke": SMOKE}
PARTS = ("cpu", "spread", "restart")

READY = re.compile(r"\bworker (\d+) ready \(pid (\d+)\)")
RESTART_DONE = "rolling restart done"
#: Seconds any one wait may take: only against a hung run.
GUARD = 120.0


# -- the gateways -------------------------------------------------------------------


def start_gateway(bench: run.Bench, workers: int, part: str) -> Gateway:
    """
    A ``twistd wsgateway`` with ``workers`` in front of the run's backend, its
    files named after ``part``; back once every worker is ready.
    """
    gateway = Gateway(
        bench.backend, bench.placement, bench.workdir, gateway_keys=[f"workers = {workers}"],
        variant=f"-{part}-w{workers}",
    )
    gateway.name = f"workers={workers}"
    gateway.start()
    if workers > 1:
        ready: set[str] = set()

        def all_ready(line: str) -> bool:
            found = READY.search(line)
            if found:
                ready.add(found.group(1))
            return len(ready) == workers

        assert gateway.proc is not None
        wait_for_log(gateway.log, gateway.proc, all_ready, GUARD)
    bench.say(f"started {gateway.name}: port {gateway.port}, pids {gateway.pids()}")
    return gateway


def stop_gateway(bench: run.Bench, gateway: Gateway) -> None:
    try:
        gateway.stop()
    except Exception as e:  # the run goes on; the failure is reported
        bench.errors.append(f"stopping {gateway.name}: {e}")


# -- 1. CPU per unit ---------------------------------------------------------------


def cpu_per_unit(bench: run.Bench, plan: Plan) -> None:
    """Each kind of work on workers = 1 and workers = 2, interleaved, ``plan.reps`` times."""
    gateways = [start_gateway(bench, 1, "cpu"), start_gateway(bench, 2, "cpu")]
    token = gateways[0].token()
    window = {"warmup_s": plan.warmup_s, "measure_s": plan.measure_s}
    kinds: list[tuple[str, Callable[[Target], dict[str, Any]], float]] = [
        ("handshake", lambda t: {"mode": "handshake", "url": t.url("ws", f"/auth/?token={token}"),
                                 "count": plan.hs_count, "warmup_count": plan.hs_warmup, "concurrency": 8}, 1000.0),
        ("ws-rate", lambda t: {"mode": "rate", "url": t.url("ws", "/"), "conns": 16, "size": 64,
                               "rate": plan.rate, **window}, 10_000),
        ("http-rate", lambda t: {"mode": "http", "url": t.url("http", "/"), "conns": 16,
                                 "rate": plan.http_rate, **window}, 10_000),
        ("http-sat", lambda t: {"mode": "http-saturate", "url": t.url("http", "/"), "conns": 32, **window}, 10_000),
    ]
    bench.say(f"CPU per unit: {', '.join(k for k, _, _ in kinds)}; {plan.reps} repetitions")
    try:
        for rep in range(plan.reps):
            for kind, config, unit in kinds:
                for gateway in gateways:
                    def one(gateway: Gateway = gateway, kind: str = kind, config: Any = config,
                            unit: float = unit) -> dict[str, Any]:
                        assert gateway.proc is not None
                        supervisor = gateway.proc.pid
                        before = cpu_ticks([supervisor])
                        result = bench.load(gateway, config(gateway))
                        spent = (cpu_ticks([supervisor]) - before) / run.CLK_TCK
                        bench.check(result["errors"] == 0, f"{kind} {gateway.name}: {result['errors']} errors "
                                    f"({result.get('last_error')})")
                        values = bench.cpu_window(gateway, result, unit)
                        # the supervisor's own CPU over the whole load (warm-up included): an upper bound
                        values["supervisor_cpu_s"] = spent if gateway.name == "workers=2" else None
                        return values

                    bench.measure(kind, gateway, rep, one)
    finally:
        for gateway in gateways:
            stop_gateway(bench, gateway)


# -- 2. spread ----------------------------------------------------------------------


def holders(port: int) -> collections.Counter[int]:
    """Established connections on the gateway's port, by the pid holding them (``ss -p``)."""
    out = subprocess.run(
        ["ss", "-tnpH", "state", "established", f"( sport = :{port} )"],
        capture_output=True, text=True, check=True, timeout=30,
    ).stdout
    return collections.Counter(int(pid) for pid in re.findall(r"pid=(\d+)", out))


def spread(bench: run.Bench, plan: Plan) -> None:
    """``plan.spread_sockets`` WebSockets from this host on two workers: how many each holds."""
    gateway = start_gateway(bench, 2, "spread")
    assert gateway.proc is not None
    supervisor = gateway.proc.pid
    bench.say(f"spread: {plan.spread_sockets} WebSockets on 2 workers, {plan.spread_reps} times")
    try:
        for rep in range(plan.spread_reps):
            def one() -> dict[str, Any]:
                counted: dict[str, Any] = {}

                def on_step(load: Load, event: dict[str, Any]) -> None:
                    if event.get("event") == "step":
                        held = holders(gateway.port)
                        counted["per_worker"] = sorted((n for pid, n in held.items() if pid != supervisor),
                                                       reverse=True)
                        counted["supervisor"] = held.get(supervisor, 0)
                        counted["open"] = event["open"]
                        load.reply("close")

                bench.load(gateway, {"mode": "idle", "url": gateway.url("ws", "/"), "steps": [plan.spread_sockets],
                                     "concurrency": 32, "settle_s": 0.5, "timeout_s": GUARD}, on_event=on_step)
                per_worker = counted["per_worker"]
                bench.check(
                    counted["open"] == plan.spread_sockets and sum(per_worker) == plan.spread_sockets
                    and counted["supervisor"] == 0 and len(per_worker) == 2,
                    f"spread: {counted['open']} open, per worker {per_worker}, {counted['supervisor']} on the supervisor",
                )
                bench.say(f"  spread #{rep + 1}: {'/'.join(map(str, per_worker))}")
                return {**counted, "share_max": per_worker[0] / max(1, sum(per_worker))}

            bench.measure("spread", gateway, rep, one)
    finally:
        stop_gateway(bench, gateway)


# -- 3. rolling restart -------------------------------------------------------------


def _request(path: str, upgrade: bool) -> bytes:
    lines = [f"GET {path} HTTP/1.1", f"Host: {LOOPBACK}"]
    if upgrade:
        lines += ["Upgrade: websocket", "Connection: Upgrade", "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
                  "Sec-WebSocket-Version: 13"]
    else:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


HANDSHAKE = _request("/", upgrade=True)
GET = _request("/", upgrade=False)


def attempt(port: int, request: bytes, keep: list[socket.socket] | None = None) -> str:
    """
    One new connection and one request on it: ``ok`` (101 or 2xx), ``5xx``,
    ``refused``, ``reset``, ``closed`` (no answer), ``timeout`` or ``status N``.
    ``keep``: an open WebSocket is appended there instead of being closed.
    """
    try:
        sock = socket.create_connection((LOOPBACK, port), timeout=30)
    except ConnectionRefusedError:
        return "refused"
    except OSError as e:
        return type(e).__name__
    try:
        sock.sendall(request)
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = sock.recv(4096)
            if not chunk:
                return "closed"
            head += chunk
        status = int(head.split(b" ", 2)[1])
        if status == 101 and keep is not None:
            keep.append(sock)
        elif status != 101:
            while sock.recv(65536):  # the whole answer (Connection: close)
                pass
        return "ok" if status < 300 else "5xx" if status >= 500 else f"status {status}"
    except (ConnectionResetError, BrokenPipeError):
        return "reset"
    except socket.timeout:
        return "timeout"
    except OSError as e:
        return type(e).__name__
    finally:
        if keep is None or sock not in keep:
            sock.close()


def close_code(sock: socket.socket) -> int | str:
    """Frames read until the gateway's close frame: its code (or what happened instead)."""
    data = b""
    try:
        while True:
            while len(data) < 2 or len(data) < 2 + (data[1] & 0x7F):
                chunk = sock.recv(4096)
                if not chunk:
                    return "no close frame"
                data += chunk
            length = data[1] & 0x7F
            opcode, payload, data = data[0] & 0x0F, data[2 : 2 + length], data[2 + length :]
            if opcode == 8:
                return int.from_bytes(payload[:2], "big")
    except OSError as e:
        return type(e).__name__
    finally:
        sock.close()


class SteadyLoad:
    """Threads opening new WebSockets and sending HTTP requests on new connections, until stopped."""

    def __init__(self, port: int, threads: int) -> None:
        self.port = port
        self.outcomes: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        kinds = [("handshake", HANDSHAKE), ("http", GET)] * threads
        self._threads = [threading.Thread(target=self._run, args=kind, daemon=True) for kind in kinds[:threads]]

    def _run(self, kind: str, request: bytes) -> None:
        while not self._stop.is_set():
            outcome = attempt(self.port, request)
            with self._lock:
                self.outcomes[f"{kind} {outcome}"] += 1

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> collections.Counter[str]:
        self._stop.set()
        for thread in self._threads:
            thread.join(GUARD)
        return self.outcomes


def rolling_restart(bench: run.Bench, plan: Plan, workers: int) -> None:
    """SIGHUP under a steady load, ``plan.restart_reps`` times on one gateway."""
    gateway = start_gateway(bench, workers, "restart")
    bench.say(f"rolling restart, workers = {workers}: {plan.held} WebSockets held, {plan.load_threads} load threads")
    try:
        for rep in range(plan.restart_reps):
            def one() -> dict[str, Any]:
                assert gateway.proc is not None
                held: list[socket.socket] = []
                for _ in range(plan.held):
                    attempt(gateway.port, HANDSHAKE, keep=held)
                load = SteadyLoad(gateway.port, plan.load_threads)
                load.start()
                time.sleep(1)
                before = set(gateway.pids())
                done = _count(gateway, RESTART_DONE)
                began = time.monotonic()
                gateway.proc.send_signal(signal.SIGHUP)
                while _count(gateway, RESTART_DONE) == done:
                    if gateway.proc.poll() is not None or time.monotonic() - began > GUARD:
                        raise RuntimeError(f"no {RESTART_DONE!r} (exit status {gateway.proc.returncode})")
                    time.sleep(0.1)
                took = time.monotonic() - began
                time.sleep(1)
                outcomes = load.stop()
                codes = collections.Counter(str(close_code(sock)) for sock in held)
                failed = sum(n for what, n in outcomes.items() if not what.endswith(" ok"))
                left = before & set(gateway.pids()) - {gateway.proc.pid}
                bench.check(failed == 0, f"restart workers={workers}: failed attempts {dict(outcomes)}")
                bench.check(codes == {"1012": len(held)} and len(held) == plan.held,
                            f"restart workers={workers}: held WebSockets closed with {dict(codes)}")
                bench.check(not left, f"restart workers={workers}: old processes {sorted(left)} still there")
                return {
                    "attempts": sum(outcomes.values()),
                    "failed": failed,
                    "outcomes": dict(outcomes),
                    "restart_s": round(took, 2),
                    "held_close_codes": dict(codes),
                }

            bench.measure(f"restart-w{workers}", gateway, rep, one)
    finally:
        stop_gateway(bench, gateway)


def _count(gateway: Gateway, text: str) -> int:
    """How many times the gateway has logged ``text`` so far."""
    return gateway.log.read_text(errors="replace").count(text)


# -- the report ---------------------------------------------------------------------


def _values(samples: list[dict[str, Any]], figure: str, target: str, key: str) -> list[Any]:
    return [s[key] for s in samples if s["figure"] == figure and s["target"] == target and s.get(key) is not None]


def summarise(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians and ranges per kind of work and workers count, the ratios, the spreads, the restarts."""
    out: dict[str, Any] = {"cpu": {}, "spread": [], "restart": {}}
    for kind, unit in (("handshake", "CPU ms per handshake"), ("ws-rate", "CPU s per 10k messages"),
                       ("http-rate", "CPU s per 10k requests"), ("http-sat", "CPU s per 10k requests")):
        one, two = (report.summary(_values(samples, kind, f"workers={n}", "proxy_per_unit")) for n in (1, 2))
        if one or two:
            out["cpu"][kind] = {"unit": unit, "workers=1": one, "workers=2": two, "ratio": report.ratio(two, one),
                                "supervisor_cpu_s": report.summary(_values(samples, kind, "workers=2", "supervisor_cpu_s")),
                                "rate_workers=1": report.summary(_values(samples, kind, "workers=1", "rate")),
                                "rate_workers=2": report.summary(_values(samples, kind, "workers=2", "rate"))}
    out["spread"] = [s["per_worker"] for s in samples if s["figure"] == "spread"]
    for workers in (2, 1):
        runs = [s for s in samples if s["figure"] == f"restart-w{workers}"]
        if runs:
            out["restart"][workers] = runs
    return out


def markdown(
    plan: Plan, summary: dict[str, Any], bench: run.Bench, started: str, seconds: float, load_at_start: list[float]
) -> str:
    lines = [f"# workers: CPU per unit, spread, rolling restart ({plan.name} run, {started})", ""]
    if summary["cpu"]:
        lines += ["Cells: median (min–max) of the gateway's process tree (supervisor and workers), on one CPU.", "",
                  "| work | unit | workers = 1 | workers = 2 | ratio 2 / 1 | supervisor's CPU s per load (workers = 2) |",
                  "|---|---|---|---|---|---|"]
        for kind, row in summary["cpu"].items():
            cells = [report.fmt_summary(row[k], 3) for k in ("workers=1", "workers=2", "supervisor_cpu_s")]
            lines.append(f"| {kind} | {row['unit']} | {cells[0]} | {cells[1]} | {report.fmt_ratio(row['ratio'])} "
                         f"| {cells[2]} |")
        lines.append("")
    if summary["spread"]:
        shares = [max(split) / max(1, sum(split)) for split in summary["spread"]]
        lines += [f"Spread over 2 workers: {', '.join('/'.join(map(str, s)) for s in summary['spread'])} "
                  f"(the busier worker held {min(shares):.1%}–{max(shares):.1%})", ""]
    for workers, runs in summary["restart"].items():
        lines += [f"Rolling restart, workers = {workers}:", "",
                  "| attempts | failed | outcomes | restart took | held WebSockets closed with |",
                  "|---|---|---|---|---|"]
        for r in runs:
            outcomes = ", ".join(f"{k} {v}" for k, v in sorted(r["outcomes"].items()))
            codes = ", ".join(f"{k} x{v}" for k, v in r["held_close_codes"].items())
            lines.append(f"| {r['attempts']:,} | {r['failed']} | {outcomes} | {r['restart_s']} s | {codes} |")
        lines.append("")
    machine = run.machine()
    lines += [f"- {machine['cpu_model']}, {machine['cpus']} CPUs; gateway on CPU {bench.placement.proxy_cpus}, "
              f"backend and load on {bench.placement.load_cpus}; load average {load_at_start} at the start, "
              f"{load_average()} at the end; {seconds:.0f} s"]
    lines += [f"- NOTICE: {n}" for n in bench.notices] + [f"- ERROR: {e}" for e in bench.errors]
    return "\n".join(lines) + "\n"


# -- main ---------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_const", dest="plan", const="quick")
    size.add_argument("--smoke", action="store_const", dest="plan", const="smoke",
                      help="tiny amounts: checks the machinery only")
    parser.set_defaults(plan="full")
    parser.add_argument("--only", default=",".join(PARTS), help="parts to run: cpu,spread,restart")
    parser.add_argument("--restart-workers", default="2,1", help="the worker counts of the restart part")
    parser.add_argument("--reps", type=int, help="override the repetitions of the CPU part")
    parser.add_argument("--out", default=str(BENCH / "results"))
    parser.add_argument("--no-pin", action="store_true", help="do not pin with taskset")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    plan = dataclasses.replace(PLANS[args.plan], reps=args.reps or PLANS[args.plan].reps)
    parts = [p for p in args.only.split(",") if p]
    run.raise_nofile()
    run.ensure_node_modules()
    workdir = Path(tempfile.mkdtemp(prefix="wsgateway-bench-workers-"))
    bench = run.Bench(argparse.Namespace(no_pin=args.no_pin, profile=None), run.QUICK, workdir)
    started, began = datetime.datetime.now().isoformat(timespec="seconds"), time.monotonic()
    load_at_start = load_average()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(2))
    status = 0
    try:
        if bench.placement.notice:
            bench.notice(bench.placement.notice)
        bench.placement.pin_self()
        bench.backend.start()
        if "cpu" in parts:
            cpu_per_unit(bench, plan)
        if "spread" in parts:
            spread(bench, plan)
        if "restart" in parts:
            for workers in (int(n) for n in args.restart_workers.split(",") if n):
                rolling_restart(bench, plan, workers)
    except Exception as e:
        bench.errors.append(f"crashed: {e}")
        traceback.print_exc()
        status = 2
    finally:
        bench.backend.stop()
        stop_all()
        shutil.rmtree(workdir, ignore_errors=True)
    summary = summarise(bench.samples)
    text = markdown(plan, summary, bench, started, time.monotonic() - began, load_at_start)
    data = {"plan": asdict(plan), "started": started, "workdir": str(workdir), "machine": run.machine(),
            "placement": bench.placement.describe(), "notices": bench.notices, "errors": bench.errors,
            "summary": summary, "samples": bench.samples}
    run.save_results(Path(args.out), f"workers-{plan.name}", f"latest-workers-{plan.name}", text, data)
    return status or (1 if bench.errors else 0)


if __name__ == "__main__":
    sys.exit(main())
