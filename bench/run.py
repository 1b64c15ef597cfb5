"""
Issue 8's benchmark: what the gateway costs next to nginx, and next to no proxy.

Wall-clock rates on a shared two-core machine say more about the neighbours
than about the proxy, so the figures are the proxy's own CPU seconds per unit
of work (utime + stime of its process tree, read from /proc after a warm-up)
and its memory; rates and latencies are reported beside them as context.

Four targets reach one Node backend (WebSocket echo, 64-byte HTTP answer):
``direct`` (no proxy: the floor), ``nginx`` (1 worker, WebSocket and
keep-alive upstream; skipped with a notice if not installed), ``aiohttp``
(the seed's design, ``bench/aiohttp_gateway.py``; skipped with a notice if
aiohttp cannot be imported: ``pip install -e '.[bench]'``) and ``gateway``
(``twistd -n wsgateway``). They are measured interleaved, A B C D A B C D ...,
with the proxy pinned to its own CPU and the backend and the Node load
generator sharing the other(s). Figures:

1. WebSocket CPU per 10k messages, 64 KiB, 64 connections, saturating, one
   message in flight per connection, and again with 8 in flight (frames then
   straddle reads);
2. WebSocket CPU per 10k messages at 2,000 msg/s, 64 B, 16 connections,
   with p50/p99 round trips;
3. CPU per handshake (open + close), auth = none and auth = required (with
   ``--cluster``, also auth = required under a per-user cap counted in a
   Redis the gateway shares: redis-server started for the run; with ``--cap``,
   the same cap counted by the gateway alone, e.g. with ``--gateway-set
   workers=2`` by the supervisor for both workers); then what auth =
   required adds, paired in one gateway (``bench/auth_paired.py``: blocks of
   handshakes alternating between an auth = none and an auth = required
   route, the median of the per-pair differences and its 95 % interval);
4. RSS per idle WebSocket at 1k and 5k connections (fresh proxy each time);
5. peak RSS growth while one 16 MiB message crosses (fresh proxy each time);
6. HTTP CPU per 10k GETs of 64 B at 1,000 req/s, and the saturated rate:
   32 keep-alive connections each sending its next GET as soon as the last
   answer is in (requests/s, and CPU per 10k requests); then what auth =
   required adds to a GET, paired as in figure 3;
7. a reconnect storm: 1,000 and 5,000 WebSockets opened at once, the time
   until all are open, the p99 handshake and the SYNs the kernel dropped at a
   full listen queue (TcpExt ListenOverflows, machine-wide), with the gateway
   also run with Twisted's old default backlog of 50 for comparison.

A "message" is one client message and its echo, so a proxy relays it twice.
Writes ``bench/results/bench-<time>.{md,json}`` (and ``latest.*``) and prints
the table. ``--profile DIR`` records the gateway with py-spy during the
measured windows instead (its CPU figures are then perturbed).

    .venv/bin/python bench/run.py [--quick | --smoke] [--only 1,2,3] [--targets gateway]

Exit status: 0 when every measurement ran and every check held (messages
intact, connections all open, targets stopped); 1 otherwise; 2 on a crash.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))

import auth_paired  # noqa: E402
import report  # noqa: E402
from targets import (  # noqa: E402
    AIOHTTP_MISSING,
    BENCH,
    LOOPBACK,
    NGINX_MISSING,
    Aiohttp,
    Backend,
    Direct,
    Gateway,
    Load,
    Nginx,
    Placement,
    RssSampler,
    Target,
    ensure_node_modules,
    kernel_cpu_lines,
    listen_overflows,
    load_average,
    memory,
    node_command,
    reset_peak,
    stop_all,
    tree_rss,
)

KiB = 1024
MiB = 1024 * KiB
CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Plan:
    """How much work each figure does; ``reps`` repetitions of every target."""

    name: str
    reps: int
    mem_reps: int
    sat_conns: int = 64
    sat_size: int = 64 * KiB
    sat_inflight: int = 8
    sat_warmup_s: float = 1.0
    sat_measure_s: float = 3.0
    rate_conns: int = 16
    rate_size: int = 64
    rate: int = 2000
    rate_warmup_s: float = 1.0
    rate_measure_s: float = 4.0
    hs_count: int = 800
    hs_warmup: int = 100
    hs_concurrency: int = 8
    idle_steps: tuple[int, ...] = (1000, 5000)
    idle_settle_s: float = 1.0
    big_size: int = 16 * MiB
    http_rate: int = 1000
    http_conns: int = 16
    http_warmup_s: float = 1.0
    http_measure_s: float = 5.0
    http_sat_conns: int = 32
    storm_sizes: tuple[int, ...] = (1000, 5000)
    storm_reps: int = 3
    #: auth = required over auth = none, paired: (pairs, handshakes or GETs per block)
    paired_handshakes: tuple[int, int] = (800, 4)
    paired_requests: tuple[int, int] = (120, 25)


FULL = Plan("full", reps=5, mem_reps=3)
QUICK = Plan(
    "quick",
    reps=2,
    mem_reps=1,
    sat_warmup_s=0.5,
    sat_measure_s=1.5,
    rate_warmup_s=0.5,
    rate_measure_s=2.0,
    hs_count=300,
    hs_warmup=50,
    http_warmup_s=0.5,
    http_measure_s=2.0,
    storm_reps=1,
    paired_handshakes=(150, 4),
    paired_requests=(40, 25),
)
#: Tiny amounts: proves the machinery (tests/test_bench_quick.py), measures nothing.
SMOKE = Plan(
    "smoke",
    reps=1,
    mem_reps=1,
    sat_conns=4,
    sat_size=1 * KiB,
    sat_warmup_s=0.1,
    sat_measure_s=0.3,
    rate_conns=2,
    rate=200,
    rate_warmup_s=0.1,
    rate_measure_s=0.3,
    hs_count=10,
    hs_warmup=2,
    hs_concurrency=2,
    idle_steps=(10, 20),
    idle_settle_s=0.1,
    big_size=1 * MiB,
    http_rate=100,
    http_conns=2,
    http_warmup_s=0.1,
    http_measure_s=0.3,
    http_sat_conns=2,
    storm_sizes=(20,),
    storm_reps=1,
    paired_handshakes=(2, 2),
    paired_requests=(2, 2),
)
PLANS = {"full": FULL, "quick": QUICK, "smoke": SMOKE}
FIGURES = (1, 2, 3, 4, 5, 6, 7)


def raise_nofile(wanted: int = 65536) -> tuple[int, int]:
    """Raise the open-files limit for this process and its children (figure 4)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for limits in ((max(wanted, soft), max(wanted, hard)), (min(max(wanted, soft), hard), hard)):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, limits)
            break
        except (ValueError, OSError):
            continue
    return resource.getrlimit(resource.RLIMIT_NOFILE)


# -- one run ----------------------------------------------------------------------


class Bench:
    """The targets of one run, the measurements taken, the checks that failed."""

    def __init__(self, args: argparse.Namespace, plan: Plan, workdir: Path) -> None:
        self.args, self.plan, self.workdir = args, plan, workdir
        self.placement = Placement(pin=not args.no_pin)
        self.notices: list[str] = []
        self.errors: list[str] = []
        self.samples: list[dict[str, Any]] = []
        self.backend = Backend(self.placement, workdir)
        self.targets: list[Target] = []
        self.token = ""
        #: redis-server for --cluster
        self.redis: subprocess.Popen | None = None
        self.profile_dir = Path(args.profile).resolve() if args.profile else None
        self.py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))

    def say(self, text: str) -> None:
        print(text, flush=True)

    def notice(self, text: str) -> None:
        self.notices.append(text)
        self.say(f"NOTICE: {text}")

    # -- set-up and tear-down --------------------------------------------------------

    def start(self) -> None:
        if self.placement.notice:
            self.notice(self.placement.notice)
        self.placement.pin_self()
        self.backend.start()
        wanted = self.args.targets.split(",")
        for name in wanted:
            if name == "direct":
                self.targets.append(Direct(self.backend, self.placement, self.workdir))
            elif name == "nginx":
                binary = Nginx.find(self.args.nginx)
                if binary is None:
                    self.notice(
                        f"{NGINX_MISSING}: the nginx target is skipped and no ratio to nginx is "
                        "reported (install it: apt-get install -y nginx-light)"
                    )
                    continue
                self.targets.append(Nginx(binary, self.backend, self.placement, self.workdir))
            elif name == "aiohttp":
                python = Aiohttp.find()
                if python is None:
                    self.notice(
                        f"{AIOHTTP_MISSING}: the aiohttp target is skipped and no ratio to it is "
                        "reported (install it: .venv/bin/pip install -e '.[bench]')"
                    )
                    continue
                self.targets.append(Aiohttp(python, self.backend, self.placement, self.workdir))
            elif name == "gateway":
                redis_url = self._start_redis() if self.args.cluster else None
                gateway = Gateway(
                    self.backend, self.placement, self.workdir, twistd=self.args.twistd, redis_url=redis_url,
                    gateway_keys=self.args.gateway_set,
                    capped=self.args.cap,
                )
                self.token = gateway.token()
                self.targets.append(gateway)
            else:
                raise SystemExit(f"unknown target {name!r}")
        for target in self.targets:
            target.start()
            self.say(f"started {target.name}: port {target.port}, pids {target.pids()}")

    def stop(self) -> None:
        for target in self.targets:
            try:
                target.stop()
            except Exception as e:  # keep stopping the others
                self.errors.append(f"stopping {target.name}: {e}")
        self.backend.stop()
        if self.redis is not None:
            self.redis.kill()
            self.redis.wait(30)
        stop_all()
        for target in self.targets:
            for record in target.lifecycle:
                self.say(
                    f"stopped {record['target']} (pid {record['pid']}): "
                    f"returncode {record['returncode']}"
                )

    def _start_redis(self) -> str:
        """A redis-server without persistence for the gateway's [cluster]; its URL."""
        import socket

        with socket.socket() as s:
            s.bind((LOOPBACK, 0))
            port = s.getsockname()[1]
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        self.redis = subprocess.Popen(
            [binary, "--port", str(port), "--bind", LOOPBACK, "--save", "", "--appendonly", "no",
             "--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL,
        )
        for _ in range(200):
            try:
                socket.create_connection((LOOPBACK, port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.05)
        self.say(f"started redis-server: port {port}")
        return f"redis://{LOOPBACK}:{port}/0"

    def proxies(self) -> list[Target]:
        return [t for t in self.targets if t.is_proxy]

    # -- running the load ---------------------------------------------------------

    def load(
        self,
        target: Target,
        config: dict[str, Any],
        on_event: Callable[[Load, dict[str, Any]], None] | None = None,
        profile_as: str | None = None,
    ) -> dict[str, Any]:
        config = dict(
            config,
            watch={"proxy": target.pids(), "backend": self.backend.pids()},
            timeout_s=config.get("timeout_s", 120),
        )
        run = Load(self.placement, self.workdir, config)
        spy = None
        try:
            for event in run.events():
                kind = event.get("event")
                if kind == "measuring" and profile_as and self.profile_dir and target.name == "gateway":
                    spy = self._start_py_spy(target, profile_as)
                elif kind == "result":
                    return event
                elif on_event is not None:
                    on_event(run, event)
        finally:
            if spy is not None:
                self._stop_py_spy(spy, profile_as)
        raise RuntimeError("no result")

    def _start_py_spy(self, target: Target, name: str) -> subprocess.Popen:
        assert self.profile_dir is not None and target.proc is not None
        self.profile_dir.mkdir(parents=True, exist_ok=True)
        out = self.profile_dir / f"{name}.raw"
        command = [*self.placement.load(), self.py_spy, "record", "--pid", str(target.proc.pid)]
        command += ["--rate", "250", "--nonblocking", "--format", "raw", "-o", str(out)]
        return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def _stop_py_spy(self, spy: subprocess.Popen, name: str) -> None:
        spy.send_signal(signal.SIGINT)
        try:
            spy.wait(30)
        except subprocess.TimeoutExpired:
            spy.kill()
            spy.wait(5)
        assert self.profile_dir is not None
        raw = self.profile_dir / f"{name}.raw"
        if raw.exists():
            spots = report.collapsed_hot_spots(raw.read_text(errors="replace"))
            (self.profile_dir / f"{name}.txt").write_text(report.hot_spots_text(name, spots))
            self.say(f"  profile: {self.profile_dir / (name + '.txt')}")

    def cpu_window(self, target: Target, result: dict[str, Any], unit: float) -> dict[str, Any]:
        """CPU per ``unit`` of work for the proxy, the backend and the load, plus context."""
        start, end = result["start"], result["end"]
        wall = (end["t_ms"] - start["t_ms"]) / 1000.0
        done = result["done"]
        proxy = (end["proxy_ticks"] - start["proxy_ticks"]) / CLK_TCK
        backend = (end["backend_ticks"] - start["backend_ticks"]) / CLK_TCK
        load = (end["load_us"] - start["load_us"]) / 1e6
        kernel = report.kernel_cpu_delta(start["proc_stat"], end["proc_stat"])

        def per_unit(cpu: float) -> float | None:
            return cpu / done * unit if done else None

        proxy_cpu = f"cpu{self.placement.proxy_cpus[0]}"
        load_cpus = len(self.placement.load_cpus)
        out = {
            "wall_s": round(wall, 3),
            "done": done,
            "rate": done / wall if wall else None,
            "proxy_cpu_s": proxy if target.is_proxy else None,
            "backend_cpu_s": backend,
            "load_cpu_s": load,
            "proxy_per_unit": per_unit(proxy) if target.is_proxy else None,
            "load_side_per_unit": per_unit(backend + load),
            "proxy_util": proxy / wall if target.is_proxy and wall else None,
            "load_side_util": (backend + load) / wall / load_cpus if wall else None,
            "steal": kernel.get("cpu", {}).get("steal"),
            "proxy_cpu_steal": kernel.get(proxy_cpu, {}).get("steal"),
            "proxy_cpu_busy": kernel.get(proxy_cpu, {}).get("busy"),
            # Work on the proxy's CPU that is not the proxy's: other processes, softirq.
            "proxy_cpu_others": _others(kernel.get(proxy_cpu), proxy if target.is_proxy else 0.0),
            "errors": result.get("errors", 0),
        }
        if result.get("latency_ms"):
            out.update({f"latency_{k}_ms": v for k, v in result["latency_ms"].items() if k != "n"})
        return out

    def record(self, figure: str, target: str, rep: int, values: dict[str, Any]) -> None:
        self.samples.append({"figure": figure, "target": target, "rep": rep, **values})
        shown = ", ".join(
            f"{k}={_short(v)}"
            for k, v in values.items()
            if k in _SHOWN or k.startswith(("kib_per_ws_", "storm_"))
        )
        self.say(f"  [{figure}] {target} #{rep + 1}: {shown}")

    def check(self, ok: bool, what: str) -> None:
        if not ok:
            self.errors.append(what)
            self.say(f"  CHECK FAILED: {what}")

    def measure(self, figure: str, target: Target, rep: int, fn: Callable[[], dict[str, Any]]) -> None:
        """Run one measurement; a failure is recorded and the run goes on."""
        try:
            self.record(figure, target.name if figure not in ("3-auth", "7-b50") else "gateway", rep, fn())
        except Exception as e:
            self.errors.append(f"figure {figure}, {target.name}, rep {rep + 1}: {e}")
            self.say(f"  FAILED [{figure}] {target.name} #{rep + 1}: {e}")
            traceback.print_exc(limit=3)
            if target.is_proxy and (target.proc is None or target.proc.poll() is not None):
                target.restart()

    # -- the figures ----------------------------------------------------------------

    def figure_1(self) -> None:
        p = self.plan
        self.say(
            f"figure 1: WebSocket {p.sat_size // KiB} KiB x {p.sat_conns} connections, saturating, "
            f"1 and {p.sat_inflight} messages in flight per connection"
        )
        for rep in range(p.reps):
            for figure, inflight in (("1", 1), ("1-inflight", p.sat_inflight)):
                for target in self.targets:
                    def one(target: Target = target, figure: str = figure, inflight: int = inflight) -> dict[str, Any]:
                        result = self.load(
                            target,
                            {
                                "mode": "saturate",
                                "url": target.url("ws", "/"),
                                "conns": p.sat_conns,
                                "size": p.sat_size,
                                "inflight": inflight,
                                "warmup_s": p.sat_warmup_s,
                                "measure_s": p.sat_measure_s,
                            },
                            profile_as=f"fig{figure}-rep{rep + 1}",
                        )
                        values = self.cpu_window(target, result, 10_000)
                        values["mib_s"] = values["rate"] * p.sat_size / MiB
                        self.check(
                            result["errors"] == 0, f"figure {figure} {target.name}: {result['errors']} bad echoes"
                        )
                        return values

                    self.measure(figure, target, rep, one)

    def figure_2(self) -> None:
        p = self.plan
        self.say(f"figure 2: WebSocket {p.rate_size} B x {p.rate_conns} connections at {p.rate} msg/s")
        for rep in range(p.reps):
            for target in self.targets:
                def one(target: Target = target) -> dict[str, Any]:
                    result = self.load(
                        target,
                        {
                            "mode": "rate",
                            "url": target.url("ws", "/"),
                            "conns": p.rate_conns,
                            "size": p.rate_size,
                            "rate": p.rate,
                            "warmup_s": p.rate_warmup_s,
                            "measure_s": p.rate_measure_s,
                        },
                        profile_as=f"fig2-rep{rep + 1}",
                    )
                    self.check(result["errors"] == 0, f"figure 2 {target.name}: {result['errors']} bad echoes")
                    return self.cpu_window(target, result, 10_000)

                self.measure("2", target, rep, one)

    def figure_3(self) -> None:
        p = self.plan
        self.say(f"figure 3: {p.hs_count} handshakes (open + close), {p.hs_concurrency} at a time")
        variants: list[tuple[Target, str, str]] = []
        for target in self.targets:
            variants.append((target, "3", "/"))
            if target.name == "gateway":
                variants.append((target, "3-auth", f"/auth/?token={self.token}"))
                if self.args.cluster:
                    variants.append((target, "3-cap", f"/capped/?token={self.token}"))
                elif self.args.cap:
                    variants.append((target, "3-cap-local", f"/capped/?token={self.token}"))
        for rep in range(p.reps):
            for target, figure, path in variants:
                def one(target: Target = target, figure: str = figure, path: str = path) -> dict[str, Any]:
                    result = self.load(
                        target,
                        {
                            "mode": "handshake",
                            "url": target.url("ws", path),
                            "count": p.hs_count,
                            "warmup_count": p.hs_warmup,
                            "concurrency": p.hs_concurrency,
                        },
                        profile_as=f"fig{figure}-rep{rep + 1}",
                    )
                    self.check(
                        result["errors"] == 0,
                        f"figure {figure} {target.name}: {result['errors']} handshakes failed "
                        f"({result.get('last_error')})",
                    )
                    return self.cpu_window(target, result, 1000.0)  # CPU ms per handshake

                self.measure(figure, target, rep, one)
        self.auth_paired("3-paired", "handshake", p.paired_handshakes)

    def auth_paired(self, figure: str, kind: str, plan: tuple[int, int]) -> None:
        """What auth = required adds to a ``kind`` over auth = none, paired in the gateway (if it runs)."""
        gateway = next((t for t in self.targets if t.name == "gateway"), None)
        if gateway is None:
            return
        pairs, block = plan
        self.say(f"  auth = required over auth = none, paired: {pairs} pairs of {block} {kind}s each")
        self.measure(figure, gateway, 0, lambda: auth_paired.measure(
            kind, gateway.port, gateway.pids(), self.token, pairs=pairs, block=block))

    def _warm_up(self, target: Target) -> None:
        """A fresh proxy's first connections and messages, before its baseline."""
        self.load(target, {"mode": "handshake", "url": target.url("ws", "/"), "count": 20,
                           "warmup_count": 0, "concurrency": 4})
        self.load(target, {"mode": "rate", "url": target.url("ws", "/"), "conns": 2, "size": 64,
                           "rate": 200, "warmup_s": 0.0, "measure_s": 0.2})
        time.sleep(0.3)

    def figure_4(self) -> None:
        p = self.plan
        steps = " and ".join(f"{n:,}" for n in p.idle_steps)
        self.say(f"figure 4: RSS per idle WebSocket at {steps} (a fresh proxy each time)")
        for rep in range(p.mem_reps):
            for target in self.proxies():
                def one(target: Target = target) -> dict[str, Any]:
                    target.restart()
                    self._warm_up(target)
                    pids = target.pids()
                    baseline = tree_rss(pids)
                    values: dict[str, Any] = {"baseline_rss_mib": baseline / MiB}

                    def on_step(run: Load, event: dict[str, Any]) -> None:
                        if event.get("event") != "step":
                            return
                        n = event["target"]
                        rss = tree_rss(target.pids())
                        upstream = self.backend.websockets()
                        values[f"kib_per_ws_{n}"] = (rss - baseline) / KiB / max(1, event["open"])
                        values[f"open_{n}"] = event["open"]
                        values[f"backend_open_{n}"] = upstream
                        self.check(
                            event["open"] == n and upstream == n and event["closed_early"] == 0,
                            f"figure 4 {target.name}: {event['open']} of {n} open at the client, "
                            f"{upstream} at the backend, {event['closed_early']} closed early "
                            f"({event.get('last_error')})",
                        )
                        last = n == p.idle_steps[-1] or event["open"] != n
                        run.reply("close" if last else "next")

                    result = self.load(
                        target,
                        {
                            "mode": "idle",
                            "url": target.url("ws", "/"),
                            "steps": list(p.idle_steps),
                            "concurrency": 32,
                            "settle_s": p.idle_settle_s,
                            "timeout_s": 300,
                        },
                        on_event=on_step,
                    )
                    self.check(result["unclosed"] == 0, f"figure 4 {target.name}: {result['unclosed']} not closed")
                    return values

                self.measure("4", target, rep, one)

    def figure_5(self) -> None:
        p = self.plan
        self.say(f"figure 5: peak RSS growth while one {p.big_size // MiB} MiB message crosses")
        for rep in range(p.mem_reps):
            for target in self.proxies():
                def one(target: Target = target) -> dict[str, Any]:
                    target.restart()
                    self._warm_up(target)
                    pids = target.pids()
                    state: dict[str, Any] = {}

                    def on_ready(run: Load, event: dict[str, Any]) -> None:
                        if event.get("event") != "ready":
                            return
                        state["baseline"] = tree_rss(pids)
                        state["hwm_reset"] = reset_peak(pids)
                        state["sampler"] = RssSampler(pids).__enter__()
                        run.reply("go")

                    result = self.load(
                        target,
                        {"mode": "big", "url": target.url("ws", "/"), "size": p.big_size, "timeout_s": 120},
                        on_event=on_ready,
                    )
                    sampler = state["sampler"]
                    sampler.__exit__(None, None, None)
                    peak = sampler.max_rss
                    if state["hwm_reset"]:
                        peak = max(peak, sum(memory(pid)["VmHWM"] for pid in pids))
                    after = tree_rss(pids)
                    self.check(result["intact"], f"figure 5 {target.name}: the message came back altered")
                    return {
                        "peak_growth_mib": (peak - state["baseline"]) / MiB,
                        "retained_mib": (after - state["baseline"]) / MiB,
                        "baseline_rss_mib": state["baseline"] / MiB,
                        "rtt_s": result["rtt_ms"] / 1000.0,
                        "hwm_reset": state["hwm_reset"],
                    }

                self.measure("5", target, rep, one)

    def figure_6(self) -> None:
        p = self.plan
        self.say(
            f"figure 6: HTTP GET 64 B at {p.http_rate} req/s over {p.http_conns} keep-alive connections, "
            f"and saturating {p.http_sat_conns}"
        )
        variants = (
            ("6", {"mode": "http", "conns": p.http_conns, "rate": p.http_rate}),
            ("6-sat", {"mode": "http-saturate", "conns": p.http_sat_conns}),
        )
        for rep in range(p.reps):
            for figure, how in variants:
                for target in self.targets:
                    def one(target: Target = target, figure: str = figure, how: dict = how) -> dict[str, Any]:
                        result = self.load(
                            target,
                            {
                                **how,
                                "url": target.url("http", "/"),
                                "warmup_s": p.http_warmup_s,
                                "measure_s": p.http_measure_s,
                            },
                            profile_as=f"fig{figure}-rep{rep + 1}",
                        )
                        self.check(
                            result["errors"] == 0,
                            f"figure {figure} {target.name}: {result['errors']} bad answers "
                            f"({result.get('last_error')})",
                        )
                        return self.cpu_window(target, result, 10_000)

                    self.measure(figure, target, rep, one)
        self.auth_paired("6-paired", "request", p.paired_requests)

    def figure_7(self) -> None:
        p = self.plan
        sizes = " and ".join(f"{n:,}" for n in p.storm_sizes)
        self.say(f"figure 7: reconnect storm, {sizes} WebSockets opened at once")
        variants: list[tuple[Target, str]] = [(target, "7") for target in self.targets]
        old_default = None
        if any(t.name == "gateway" for t in self.targets):
            old_default = Gateway(self.backend, self.placement, self.workdir, twistd=self.args.twistd, backlog=50,
                                  gateway_keys=self.args.gateway_set)
            old_default.start()
            variants.append((old_default, "7-b50"))
        try:
            for n in p.storm_sizes:
                for rep in range(p.storm_reps):
                    for target, figure in variants:
                        def one(target: Target = target, figure: str = figure, n: int = n) -> dict[str, Any]:
                            before = listen_overflows()
                            result = self.load(
                                target,
                                {"mode": "storm", "url": target.url("ws", "/"), "count": n, "timeout_s": 180},
                            )
                            drops = listen_overflows() - before
                            # The old default's storms may lose handshakes: that is the figure.
                            self.check(
                                (result["open"] == n or figure == "7-b50") and result["unclosed"] == 0,
                                f"figure {figure} {target.name}: {result['open']} of {n} opened, "
                                f"{result['unclosed']} not closed ({result.get('last_error')})",
                            )
                            latency = result.get("latency_ms") or {}
                            return {
                                f"storm_all_s_{n}": result["all_ms"] / 1000.0,
                                f"storm_p50_ms_{n}": latency.get("p50"),
                                f"storm_p99_ms_{n}": latency.get("p99"),
                                f"storm_syn_drops_{n}": drops,
                                f"storm_failed_{n}": result["failed"],
                            }

                        self.measure(figure, target, rep, one)
        finally:
            if old_default is not None:
                old_default.stop()


_SHOWN = {
    "proxy_per_unit",
    "load_side_per_unit",
    "rate",
    "proxy_util",
    "load_side_util",
    "latency_p50_ms",
    "latency_p99_ms",
    "peak_growth_mib",
    "retained_mib",
    "steal",
    "auth_over_none_ms",
}


def _others(cpu: dict[str, float] | None, own_cpu_s: float) -> float | None:
    if not cpu or not cpu["seconds"]:
        return None
    return max(0.0, cpu["busy"] * cpu["seconds"] - own_cpu_s) / cpu["seconds"]


def _short(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


# -- the report ----------------------------------------------------------------------


def build_rows(samples: list[dict[str, Any]], plan: Plan) -> tuple[list[dict], list[dict]]:
    """The main table's rows (CPU and memory) and the context rows (wall clock, load side)."""

    def cells(figure: str, field: str) -> dict[str, Any]:
        out = {}
        for target in report.TARGETS:
            values = [s.get(field) for s in samples if s["figure"] == figure and s["target"] == target]
            out[target] = report.summary(values)
        return out

    def paired(figure: str, title: str) -> list[dict[str, Any]]:
        """Issue 17's bar: the median of the per-pair differences (its 95 % interval beside it)."""
        found = [s for s in samples if s["figure"] == figure and s.get("differences_ms")]
        if not found:
            return []
        summary = report.paired_summary([d for s in found for d in s["differences_ms"]])
        return [{"title": title, "unit": "CPU ms", "cells": {"gateway": summary}, "bar": ("absolute", 0.05),
                 "digits": 3}]

    idle = plan.idle_steps
    main = [
        {"title": f"1. WS {plan.sat_size // KiB} KiB x {plan.sat_conns} conns, saturating: CPU per 10k msgs",
         "unit": "CPU s", "cells": cells("1", "proxy_per_unit"), "bar": ("ratio_nginx", 1.8), "digits": 3},
        {"title": f"1. the same, {plan.sat_inflight} messages in flight per connection: CPU per 10k msgs",
         "unit": "CPU s", "cells": cells("1-inflight", "proxy_per_unit"),
         "bar": [("ratio_nginx", 1.3), ("ratio_aiohttp", 1.0)], "digits": 3},
        {"title": f"2. WS {plan.rate_size} B x {plan.rate_conns} conns at {plan.rate:,} msg/s: CPU per 10k msgs",
         "unit": "CPU s", "cells": cells("2", "proxy_per_unit"), "bar": ("ratio_nginx", 1.6), "digits": 3},
        {"title": "3. handshake (open + close), auth = none: CPU per handshake",
         "unit": "CPU ms", "cells": cells("3", "proxy_per_unit"),
         "bar": [("ratio_nginx", 4.0), ("ratio_aiohttp", 0.8)]},
        {"title": "3. handshake (open + close), auth = required (gateway): CPU per handshake",
         "unit": "CPU ms", "cells": {**cells("3", "proxy_per_unit"), "gateway": cells("3-auth", "proxy_per_unit")["gateway"]},
         "bar": None},
        *paired("3-paired", "3. auth = required over auth = none, paired in one gateway: CPU per handshake"),
        *([{"title": "3. handshake, auth = required + max_websockets_per_user in Redis ([cluster]): CPU per handshake",
            "unit": "CPU ms", "cells": {"gateway": cells("3-cap", "proxy_per_unit")["gateway"]}, "bar": None}]
          if any(s["figure"] == "3-cap" for s in samples) else []),
        *([{"title": "3. handshake, auth = required + max_websockets_per_user counted by the gateway "
                     "(no [cluster]; with workers, by the supervisor): CPU per handshake",
            "unit": "CPU ms", "cells": {"gateway": cells("3-cap-local", "proxy_per_unit")["gateway"]}, "bar": None}]
          if any(s["figure"] == "3-cap-local" for s in samples) else []),
        *[
            {"title": f"4. RSS per idle WS at {n:,} conns", "unit": "KiB",
             "cells": cells("4", f"kib_per_ws_{n}"), "bar": ("absolute", 20.0) if n == idle[-1] else None,
             "digits": 1}
            for n in idle
        ],
        {"title": f"5. peak RSS growth, one {plan.big_size // MiB} MiB message", "unit": "MiB",
         "cells": cells("5", "peak_growth_mib"), "bar": ("absolute", 4.0)},
        {"title": f"6. HTTP GET 64 B at {plan.http_rate:,} req/s: CPU per 10k requests",
         "unit": "CPU s", "cells": cells("6", "proxy_per_unit"),
         "bar": [("ratio_nginx", 3.0), ("ratio_aiohttp", 1.0)], "digits": 3},
        {"title": f"6. HTTP GET 64 B, {plan.http_sat_conns} conns saturating: requests/s", "unit": "req/s",
         "cells": cells("6-sat", "rate"), "bar": ("min_ratio_aiohttp", 1.0), "digits": 0},
        {"title": f"6. HTTP GET 64 B, {plan.http_sat_conns} conns saturating: CPU per 10k requests",
         "unit": "CPU s", "cells": cells("6-sat", "proxy_per_unit"), "bar": None, "digits": 3},
        *paired("6-paired", "6. auth = required over auth = none, paired in one gateway: CPU per GET"),
    ]
    context = [
        {"title": "1. messages/s (wall clock)", "unit": "msg/s", "cells": cells("1", "rate")},
        {"title": f"1. messages/s, {plan.sat_inflight} in flight (wall clock)", "unit": "msg/s",
         "cells": cells("1-inflight", "rate")},
        {"title": "1. proxy CPU utilisation", "unit": "cores", "cells": cells("1", "proxy_util")},
        {"title": "1. backend + load CPU utilisation", "unit": "of their CPUs", "cells": cells("1", "load_side_util")},
        {"title": "1. backend + load CPU per 10k msgs", "unit": "CPU s", "cells": cells("1", "load_side_per_unit"), "digits": 3},
        {"title": "2. round trip p50", "unit": "ms", "cells": cells("2", "latency_p50_ms"), "digits": 3},
        {"title": "2. round trip p99", "unit": "ms", "cells": cells("2", "latency_p99_ms"), "digits": 3},
        {"title": "2. messages/s achieved", "unit": "msg/s", "cells": cells("2", "rate")},
        {"title": "2. backend + load CPU utilisation", "unit": "of their CPUs", "cells": cells("2", "load_side_util")},
        {"title": "3. handshakes/s, auth = none", "unit": "1/s", "cells": cells("3", "rate")},
        {"title": "3. handshake cycle p50, auth = none", "unit": "ms", "cells": cells("3", "latency_p50_ms"), "digits": 3},
        {"title": "3. handshake cycle p50, auth = required", "unit": "ms",
         "cells": {"gateway": cells("3-auth", "latency_p50_ms")["gateway"]}, "digits": 3},
        {"title": "3. backend + load CPU utilisation", "unit": "of their CPUs", "cells": cells("3", "load_side_util")},
        {"title": "4. proxy RSS before the idle WebSockets", "unit": "MiB", "cells": cells("4", "baseline_rss_mib"), "digits": 1},
        {"title": "5. RSS retained after the message", "unit": "MiB", "cells": cells("5", "retained_mib")},
        {"title": "5. round trip of the message", "unit": "s", "cells": cells("5", "rtt_s"), "digits": 3},
        {"title": "6. requests/s achieved", "unit": "req/s", "cells": cells("6", "rate")},
        {"title": "6. latency p50", "unit": "ms", "cells": cells("6", "latency_p50_ms"), "digits": 3},
        {"title": "6. latency p99", "unit": "ms", "cells": cells("6", "latency_p99_ms"), "digits": 3},
        {"title": "6. saturated: latency p50", "unit": "ms", "cells": cells("6-sat", "latency_p50_ms"), "digits": 3},
        {"title": "6. saturated: proxy CPU utilisation", "unit": "cores", "cells": cells("6-sat", "proxy_util")},
        {"title": "6. backend + load CPU utilisation", "unit": "of their CPUs", "cells": cells("6", "load_side_util")},
        *[
            row
            for n in plan.storm_sizes
            for figure, how in (("7", ""), ("7-b50", " (gateway with the old backlog of 50)"))
            for row in (
                {"title": f"7. storm of {n:,}: time until all open{how}", "unit": "s",
                 "cells": cells(figure, f"storm_all_s_{n}"), "digits": 3},
                {"title": f"7. storm of {n:,}: handshake p99{how}", "unit": "ms",
                 "cells": cells(figure, f"storm_p99_ms_{n}"), "digits": 3},
                {"title": f"7. storm of {n:,}: SYNs dropped (ListenOverflows){how}", "unit": "SYNs",
                 "cells": cells(figure, f"storm_syn_drops_{n}"), "digits": 0},
                {"title": f"7. storm of {n:,}: handshakes failed{how}", "unit": f"of {n:,}",
                 "cells": cells(figure, f"storm_failed_{n}"), "digits": 0},
            )
        ],
    ]
    return [report.complete_row(r) for r in main], [report.complete_row(r) for r in context]


def machine() -> dict[str, Any]:
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    versions = {}
    for module in ("twisted", "autobahn", "treq", "aiohttp"):
        try:
            versions[module] = __import__(module).__version__
        except Exception:
            versions[module] = None
    try:
        versions["node"] = subprocess.run([node_command(), "--version"], capture_output=True,
                                          text=True, timeout=10).stdout.strip()
    except Exception:
        versions["node"] = None
    return {
        "host": platform.node(),
        "kernel": platform.release(),
        "cpu_model": model,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        **versions,
    }


def write_outputs(bench: Bench, out_dir: Path, started: dict[str, Any], finished: dict[str, Any]) -> Path:
    plan = bench.plan
    main_rows, context_rows = build_rows(bench.samples, plan)
    noise = {
        "load_average_start": started["loadavg"],
        "load_average_end": finished["loadavg"],
        "kernel_cpu": report.kernel_cpu_delta(started["proc_stat"], finished["proc_stat"]),
    }
    busy_s = sum(
        v["busy"] * v["seconds"] for name, v in noise["kernel_cpu"].items() if name != "cpu"
    )
    noise["busy_cpu_s"] = round(busy_s, 1)
    noise["own_cpu_s"] = round(finished["own_cpu_s"] - started["own_cpu_s"], 1)
    noise["others_cpu_s"] = round(max(0.0, busy_s - noise["own_cpu_s"]), 1)
    steals = [s["steal"] for s in bench.samples if s.get("steal") is not None]
    noise["steal_max_in_a_window"] = max(steals) if steals else None
    nginx = next((t for t in bench.targets if isinstance(t, Nginx)), None)
    data = {
        "plan": asdict(plan),
        "started": started["when"],
        "duration_s": round(finished["t"] - started["t"], 1),
        "machine": machine(),
        "nginx": nginx.version() if nginx else None,
        "placement": bench.placement.describe(),
        "noise": noise,
        "notices": bench.notices,
        "errors": bench.errors,
        "lifecycle": [record for t in bench.targets for record in t.lifecycle],
        "rows": main_rows,
        "context": context_rows,
        "samples": bench.samples,
    }
    cpu = noise["kernel_cpu"]
    per_cpu = ", ".join(f"{name} {v['steal']:.1%}" for name, v in sorted(cpu.items()) if name != "cpu")
    lines = [
        f"# twisted_gateway benchmark ({plan.name} run, {started['when']})",
        "",
        f"{plan.reps} repetitions of every target for CPU figures, {plan.mem_reps} for memory figures, "
        "interleaved (direct, nginx, aiohttp, gateway, direct, ...). Cells: median (min–max). "
        "CPU is the proxy process tree's utime + stime during the measured window; a message is one "
        "client message and its echo (the proxy relays both).",
        "",
        report.main_table(main_rows),
        "",
        "## Context (wall clock, load side)",
        "",
        report.main_table(context_rows),
        "",
        "## Machine and noise",
        "",
        f"- {data['machine']['cpu_model']}, {data['machine']['cpus']} CPUs, Linux {data['machine']['kernel']}; "
        f"Python {data['machine']['python']}, Twisted {data['machine']['twisted']}, "
        f"Autobahn {data['machine']['autobahn']}, aiohttp {data['machine']['aiohttp']}, Node {data['machine']['node']}, {data['nginx'] or 'no nginx'}",
        f"- proxy on CPU {bench.placement.proxy_cpus}, backend + load on CPU {bench.placement.load_cpus}"
        + (f" ({bench.placement.notice})" if bench.placement.notice else ""),
        f"- CPU steal over the run: {cpu.get('cpu', {}).get('steal', 0):.1%} ({per_cpu}); "
        f"worst measured window: {_pct(noise['steal_max_in_a_window'])}",
        f"- CPU used by other processes (not this run's) during the run: {noise['others_cpu_s']} CPU-s "
        f"of {noise['busy_cpu_s']} busy over {data['duration_s']} s wall on {len(cpu) - 1} CPUs; "
        f"other work on the proxy's CPU during measured windows (incl. softirq), median: "
        f"{_pct(_median(s.get('proxy_cpu_others') for s in bench.samples))}",
        f"- load average at start {started['loadavg']}, at end {finished['loadavg']}",
        f"- duration {data['duration_s']} s",
    ]
    lines += [f"- NOTICE: {n}" for n in bench.notices]
    lines += [f"- ERROR: {e}" for e in bench.errors]
    text = "\n".join(lines) + "\n"
    save_results(out_dir, f"bench-{plan.name}", f"latest-{plan.name}", text, data)
    return out_dir / f"latest-{plan.name}.json"


def save_results(out_dir: Path, name: str, latest: str, text: str, data: dict[str, Any]) -> None:
    """The table and the JSON as ``name-<time>`` and as ``latest`` in ``out_dir``; the table printed."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    for saved in (f"{name}-{stamp}", latest):
        (out_dir / f"{saved}.md").write_text(text)
        (out_dir / f"{saved}.json").write_text(json.dumps(data, indent=1, default=str) + "\n")
    print()
    print(text)


def _median(values: Any) -> float | None:
    found = [v for v in values if v is not None]
    return statistics.median(found) if found else None


def _pct(v: float | None) -> str:
    return "—" if v is None else f"{v:.1%}"


def snapshot_noise() -> dict[str, Any]:
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {
        "own_cpu_s": own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime,
        "t": time.monotonic(),
        "when": datetime.datetime.now().isoformat(timespec="seconds"),
        "loadavg": load_average(),
        "proc_stat": kernel_cpu_lines(),
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_const", dest="plan", const="quick", help="under ~2 minutes")
    size.add_argument("--smoke", action="store_const", dest="plan", const="smoke",
                      help="tiny amounts: checks the machinery only")
    parser.set_defaults(plan="full")
    parser.add_argument("--only", default=",".join(map(str, FIGURES)), help="figures to run, e.g. 1,2,3")
    parser.add_argument("--targets", default="direct,nginx,aiohttp,gateway", help="comma-separated subset")
    parser.add_argument("--reps", type=int, help="override the repetitions of the CPU figures")
    parser.add_argument("--scale", type=float, default=1.0,
                        help="multiply the measured windows and handshake counts (e.g. for --profile)")
    parser.add_argument("--cluster", action="store_true",
                        help="figure 3 also under a per-user cap counted in Redis (starts redis-server)")
    parser.add_argument("--cap", action="store_true",
                        help="figure 3 also under a per-user cap counted by the gateway alone (no [cluster])")
    parser.add_argument("--twistd", help="the twistd to run (default: the venv's), e.g. another checkout's")
    parser.add_argument("--nginx", help="the nginx binary (default: found on PATH or /usr/sbin)")
    parser.add_argument("--gateway-set", action="append", default=[], metavar="KEY=VALUE",
                        help="a [gateway] key for the gateway, e.g. access_log={workdir}/access.log")
    parser.add_argument("--out", default=str(BENCH / "results"), help="where the table and JSON go")
    parser.add_argument("--profile", metavar="DIR",
                        help="record the gateway with py-spy during figures 1, 2, 3 and 6")
    parser.add_argument("--no-pin", action="store_true", help="do not pin with taskset")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    plan = PLANS[args.plan]
    if args.reps:
        plan = Plan(**{**asdict(plan), "reps": args.reps})
    if args.scale != 1.0:
        longer = {k: getattr(plan, k) * args.scale for k in ("sat_measure_s", "rate_measure_s", "http_measure_s")}
        plan = Plan(**{**asdict(plan), **longer, "hs_count": int(plan.hs_count * args.scale)})
    figures = [int(x) for x in args.only.split(",") if x]
    nofile = raise_nofile()
    ensure_node_modules()
    started = snapshot_noise()
    workdir = Path(tempfile.mkdtemp(prefix="wsgateway-bench-"))
    bench = Bench(args, plan, workdir)
    print(f"{plan.name} run: figures {figures}; open-files limit {nofile[0]}", flush=True)
    # SIGTERM (e.g. from a test's timeout) still stops every child.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(2))
    try:
        bench.start()
        for figure in (1, 2, 3, 6, 7, 5, 4):  # the ones restarting the proxies last
            if figure in figures:
                began = time.monotonic()
                getattr(bench, f"figure_{figure}")()
                print(f"  (figure {figure}: {time.monotonic() - began:.0f} s)", flush=True)
    except Exception as e:
        bench.errors.append(f"crashed: {e}")
        traceback.print_exc()
        return 2
    finally:
        bench.stop()
        shutil.rmtree(workdir, ignore_errors=True)
        finished = snapshot_noise()
        write_outputs(bench, Path(args.out), started, finished)
    return 1 if bench.errors else 0


if __name__ == "__main__":
    sys.exit(main())
