"""
Run Autobahn|Testsuite through the gateway in both directions and summarise.

Server direction: ``wstest -m fuzzingclient`` -> gateway -> the echo service
(``twisted_gateway.demo.echo``), which tests the gateway's client-facing server.
Client direction: the testee echo client (``twisted_gateway.demo.testee_client``)
-> gateway -> ``wstest -m fuzzingserver``, which puts the gateway's
upstream-facing client in front of a hostile server.

Every process runs on a free loopback port; the specs, the generated gateway
configs, each process's log and the suite's reports go to reports/conformance/
(or ``--reports DIR``).
The last line is ``conformance: N passed, M failed, K unimplemented`` and the
exit status is non-zero if any case failed, was unimplemented or did not run.

    .venv/bin/python .ci/conformance.py [--quick] [--direction server|client|both]
                                        [--direct] [--time-limit SECONDS] [--reports DIR]

``--direct`` leaves the gateway out (wstest talks to the echo service and the
testee client to the fuzzing server straight away), to check the machinery and
the two demo peers on their own.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Iterable, Sequence

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_REPORTS = ROOT / "reports" / "conformance"
AGENT = "twisted_gateway"

# Passed and failed, as the suite reports a case's behaviour.
PASSING = {"OK", "NON-STRICT", "INFORMATIONAL"}
UNIMPLEMENTED = "UNIMPLEMENTED"
MISSING = "MISSING"  # the suite selected the case but reported nothing for it

GROUP_TITLES = {
    1: "Framing",
    2: "Pings/Pongs",
    3: "Reserved bits",
    4: "Opcodes",
    5: "Fragmentation",
    6: "UTF-8 handling",
    7: "Close handling",
    8: "(no cases)",
    9: "Limits/performance",
    10: "Miscellaneous",
    11: "(no cases)",
    12: "permessage-deflate, payloads",
    13: "permessage-deflate, parameters",
}

# The quick selection: a few cases of every subgroup the suite has (it has no
# cases numbered 8.* or 11.*), the cheap end of each performance subgroup plus
# the 16 MiB messages, and compression with every parameter set.
QUICK_CASES: tuple[str, ...] = (
    # 1 framing: empty, small, 125/126/127-byte boundaries, 64 KiB, text and binary
    "1.1.1", "1.1.2", "1.1.3", "1.1.4", "1.1.6", "1.1.8", "1.2.1", "1.2.4", "1.2.8",
    # 2 pings and pongs: payloads, too-long ping, unsolicited pong, fragmented ping, many pings
    "2.1", "2.3", "2.4", "2.5", "2.6", "2.7", "2.9", "2.10",
    # 3 reserved bits
    "3.1", "3.2", "3.4", "3.7",
    # 4 reserved opcodes
    "4.1.1", "4.1.3", "4.1.5", "4.2.1", "4.2.3", "4.2.5",
    # 5 fragmentation: control frames between fragments, bad continuations
    "5.1", "5.3", "5.6", "5.8", "5.9", "5.15", "5.16", "5.17", "5.19", "5.20",
    # 6 UTF-8: valid, invalid, fail-fast on fragments, boundaries, surrogates, noncharacters
    "6.1.1", "6.1.3", "6.2.3", "6.3.1", "6.3.2", "6.4.1", "6.4.3", "6.5.1", "6.6.3",
    "6.7.1", "6.8.1", "6.9.1", "6.10.1", "6.11.1", "6.12.1", "6.13.1", "6.14.1",
    "6.15.1", "6.16.1", "6.17.1", "6.18.1", "6.19.1", "6.20.1", "6.21.1", "6.22.1",
    "6.23.1", "6.23.7",
    # 7 close: after close, payloads, invalid codes and reasons, long reasons
    "7.1.1", "7.1.3", "7.1.6", "7.3.1", "7.3.2", "7.3.3", "7.3.5", "7.3.6", "7.5.1",
    "7.7.1", "7.7.4", "7.7.9", "7.7.13", "7.9.1", "7.9.5", "7.9.9", "7.13.1", "7.13.2",
    # 9 limits: 64 KiB and 16 MiB messages, fragmented and chopped messages, many messages
    "9.1.1", "9.1.6", "9.2.1", "9.2.6", "9.3.9", "9.4.9", "9.5.6", "9.6.6", "9.7.1", "9.8.1",
    # 10 auto-fragmentation
    "10.1.1",
    # 12 compression with different payloads and sizes
    "12.1.1", "12.1.5", "12.2.3", "12.2.11", "12.3.5", "12.4.8", "12.5.6",
    # 13 compression with every offer/parameter set, small and larger messages
    "13.1.1", "13.1.9", "13.2.1", "13.2.9", "13.3.1", "13.3.9", "13.4.1", "13.4.9",
    "13.5.1", "13.5.9", "13.6.1", "13.6.9", "13.7.1", "13.7.9",
)
FULL_CASES: tuple[str, ...] = ("*",)

QUICK_TIME_LIMIT = 15 * 60.0
FULL_TIME_LIMIT = 120 * 60.0
LISTEN_TIMEOUT = 30.0


class Deadline:
    """The whole run's time limit; every wait takes at most what is left of it."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.ends = time.monotonic() + seconds

    def left(self) -> float:
        return self.ends - time.monotonic()


class RunError(Exception):
    """The machinery failed (a process did not start, the time ran out...)."""


# -- processes -------------------------------------------------------------


@dataclass
class Processes:
    """Every subprocess started, so that all of them are stopped on every path."""

    log_dir: Path
    started: list[tuple[str, subprocess.Popen[bytes], IO[bytes]]] = field(default_factory=list)

    def start(self, name: str, argv: Sequence[str], cwd: Path) -> subprocess.Popen[bytes]:
        log = open(self.log_dir / f"{name}.log", "wb")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        # A session of its own: a Ctrl-C reaches only this script, which then
        # stops each process group (and nothing else) in stop_all.
        process = subprocess.Popen(
            list(argv), cwd=cwd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            env=env, start_new_session=True,
        )
        self.started.append((name, process, log))
        return process

    def log_tail(self, name: str, lines: int = 25) -> str:
        text = (self.log_dir / f"{name}.log").read_text(errors="replace").splitlines()
        return "\n".join(f"    {line}" for line in text[-lines:])

    def stop(self, process: subprocess.Popen[bytes], grace: float = 5.0) -> None:
        if process.poll() is None:
            _signal_group(process, signal.SIGTERM)
            try:
                process.wait(grace)
            except subprocess.TimeoutExpired:
                pass
        # Whatever is left of its group (a child of wstest, say) goes too.
        _signal_group(process, signal.SIGKILL)
        process.wait()

    def stop_all(self) -> None:
        for _name, process, log in reversed(self.started):
            self.stop(process)
            log.close()
        self.started.clear()


def _signal_group(process: subprocess.Popen[bytes], signum: int) -> None:
    try:
        os.killpg(process.pid, signum)
    except ProcessLookupError:
        pass


def free_port() -> int:
    """A loopback TCP port that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_listening(
    processes: Processes, name: str, process: subprocess.Popen[bytes], port: int, deadline: Deadline
) -> None:
    """Wait until ``port`` accepts connections, failing early if ``process`` exits."""
    ends = time.monotonic() + min(LISTEN_TIMEOUT, max(deadline.left(), 0.0))
    while True:
        if process.poll() is not None:
            raise RunError(f"{name} exited with {process.returncode} before listening:\n{processes.log_tail(name)}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1.0):
                return
        except OSError:
            pass
        if time.monotonic() > ends:
            raise RunError(f"{name} is not listening on port {port}:\n{processes.log_tail(name)}")
        time.sleep(0.1)


def wait_exit(
    processes: Processes, name: str, process: subprocess.Popen[bytes], deadline: Deadline
) -> int:
    try:
        return process.wait(max(deadline.left(), 0.0))
    except subprocess.TimeoutExpired:
        raise RunError(
            f"the time limit ({deadline.seconds:.0f} s) ran out while {name} was running:\n"
            f"{processes.log_tail(name)}"
        ) from None


def ensure_running(processes: Processes, names: Iterable[tuple[str, subprocess.Popen[bytes]]]) -> None:
    for name, process in names:
        if process.poll() is not None:
            raise RunError(f"{name} exited with {process.returncode} during the run:\n{processes.log_tail(name)}")


# -- the two directions ----------------------------------------------------


def find_wstest() -> str:
    """The path of a working wstest, from .ci/wstest-env.sh (which may build it)."""
    result = subprocess.run(
        ["bash", str(ROOT / ".ci" / "wstest-env.sh")], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL
    )
    if result.returncode != 0:
        raise RunError("no wstest (see the messages above and docs/conformance.md)")
    return result.stdout.decode().strip().splitlines()[-1]


def gateway_config(listen_port: int, upstream_port: int) -> str:
    return (
        "[gateway]\n"
        f"listen = tcp:{listen_port}:interface=127.0.0.1\n"
        "ws_open_timeout = 10\n"
        "ws_max_message_size = 16777216\n"
        "\n"
        "[route:conformance]\n"
        "prefix = /\n"
        f"upstream = http://127.0.0.1:{upstream_port}\n"
        "websocket = true\n"
        # the fuzzing server refuses a Host whose port is not its own
        "host_header = upstream\n"
    )


@dataclass(frozen=True)
class Run:
    """What both directions share: where results go, the processes, the time left."""

    reports: Path
    processes: Processes
    deadline: Deadline
    wstest: str
    cases: Sequence[str]
    via_gateway: bool

    def start_gateway(self, direction: str, upstream_port: int) -> int:
        """Start a gateway routing ``/`` to ``upstream_port``; return its port once it listens."""
        port = free_port()
        config = self.reports / f"gateway-{direction}.cfg"
        config.write_text(gateway_config(port, upstream_port))
        twistd = Path(sys.executable).parent / "twistd"
        name = f"gateway-{direction}"
        process = self.processes.start(
            name, [str(twistd), "-n", "--pidfile=", "wsgateway", "--config", str(config)], cwd=ROOT
        )
        wait_listening(self.processes, name, process, port, self.deadline)
        return port

    def write_spec(self, name: str, spec: dict[str, object]) -> Path:
        path = self.reports / name
        path.write_text(json.dumps(spec, indent=2) + "\n")
        return path


def run_server_direction(run: Run) -> list[str]:
    """wstest's fuzzing client -> (gateway ->) echo service. Returns the selected case ids."""
    processes, deadline = run.processes, run.deadline
    echo_port = free_port()
    echo = processes.start(
        "echo",
        [sys.executable, "-m", "twisted_gateway.demo.echo", "--listen", f"tcp:{echo_port}:interface=127.0.0.1"],
        cwd=ROOT,
    )
    wait_listening(processes, "echo", echo, echo_port, deadline)
    target_port = run.start_gateway("server", echo_port) if run.via_gateway else echo_port
    spec = run.write_spec(
        "fuzzingclient.json",
        {
            "outdir": str(run.reports / "server"),
            "servers": [{"agent": AGENT, "url": f"ws://127.0.0.1:{target_port}"}],
            "cases": list(run.cases),
            "exclude-cases": [],
            "exclude-agent-cases": {},
        },
    )
    print(f"server direction: wstest -> {'gateway -> ' if run.via_gateway else ''}echo", flush=True)
    fuzzer = processes.start(
        "wstest-fuzzingclient", [run.wstest, "-m", "fuzzingclient", "-s", str(spec)], cwd=run.reports
    )
    code = wait_exit(processes, "wstest-fuzzingclient", fuzzer, deadline)
    ensure_running(processes, [("echo", echo)])
    if code != 0:
        raise RunError(f"wstest -m fuzzingclient exited with {code}:\n{processes.log_tail('wstest-fuzzingclient')}")
    return selected_cases(processes, "wstest-fuzzingclient")


def run_client_direction(run: Run) -> list[str]:
    """testee client -> (gateway ->) wstest's fuzzing server. Returns the selected case ids."""
    processes, deadline = run.processes, run.deadline
    fuzzer_port = free_port()
    spec = run.write_spec(
        "fuzzingserver.json",
        {
            "url": f"ws://127.0.0.1:{fuzzer_port}",
            "outdir": str(run.reports / "client"),
            "cases": list(run.cases),
            "exclude-cases": [],
            "exclude-agent-cases": {},
        },
    )
    fuzzer = processes.start(
        "wstest-fuzzingserver",
        [run.wstest, "-m", "fuzzingserver", "-s", str(spec), "--webport", "0"],
        cwd=run.reports,
    )
    wait_listening(processes, "wstest-fuzzingserver", fuzzer, fuzzer_port, deadline)
    target_port = run.start_gateway("client", fuzzer_port) if run.via_gateway else fuzzer_port
    print(f"client direction: testee client -> {'gateway -> ' if run.via_gateway else ''}wstest", flush=True)
    testee = processes.start(
        "testee-client",
        [
            sys.executable, "-m", "twisted_gateway.demo.testee_client",
            "--url", f"ws://127.0.0.1:{target_port}", "--agent", AGENT,
        ],
        cwd=ROOT,
    )
    code = wait_exit(processes, "testee-client", testee, deadline)
    ensure_running(processes, [("wstest-fuzzingserver", fuzzer)])
    if code != 0:
        # The cases it could not complete show up as failed or missing.
        print(f"client direction: the testee client exited with {code} (see logs/testee-client.log)")
    if not (run.reports / "client" / "index.json").exists():
        raise RunError(f"the fuzzing server wrote no report:\n{processes.log_tail('testee-client')}")
    return selected_cases(processes, "wstest-fuzzingserver")


def selected_cases(processes: Processes, name: str) -> list[str]:
    """The case ids wstest selected from the spec, from its ``Cases = [...]`` line."""
    for line in (processes.log_dir / f"{name}.log").read_text(errors="replace").splitlines():
        if line.startswith("Cases = "):
            return [str(case) for case in ast.literal_eval(line[len("Cases = "):])]
    raise RunError(f"{name} did not list its cases:\n{processes.log_tail(name)}")


# The peer behind the gateway in each direction. The gateway must not pass a
# protocol violation on to the other hop, so this peer should never have to
# fail a connection; the suite judges only the hop it talks to and cannot see it.
FAR_PEER = {"server": "echo", "client": "testee-client"}
_FAILING = re.compile(r'failing WebSocket connection \(code=(\d+)\): "(.*)"')
_TESTEE_STEP = re.compile(r"\bcase \d+/\d+: (\S+)")


def far_peer_violations(log: Path, selected: Sequence[str]) -> list[str]:
    """
    Each connection the far peer failed, as ``case: failed with CODE: reason``.

    The testee client's log names the case before each line (by its position
    in ``selected`` or by id); the echo service's log does not, so its lines
    carry only the reason.
    """
    found = []
    case = ""
    for line in log.read_text(errors="replace").splitlines():
        step = _TESTEE_STEP.search(line)
        if step:
            case = step.group(1)
            if case.isdigit() and 0 < int(case) <= len(selected):
                case = selected[int(case) - 1]
        failing = _FAILING.search(line)
        if failing:
            found.append(f"{case + ': ' if case else ''}failed with {failing.group(1)}: {failing.group(2)}")
    return found


# -- results ---------------------------------------------------------------


@dataclass(frozen=True)
class CaseResult:
    case: str
    behavior: str
    behavior_close: str
    report: Path | None

    @property
    def group(self) -> int:
        return int(self.case.split(".")[0])

    @property
    def outcome(self) -> str:
        if self.behavior in PASSING:
            return "passed"
        if self.behavior == UNIMPLEMENTED:
            return "unimplemented"
        return "failed"


def case_key(case: str) -> tuple[int, ...]:
    return tuple(int(part) for part in case.split("."))


def read_results(reports: Path, direction: str, selected: Sequence[str]) -> list[CaseResult]:
    """One result per selected case; a case the report lacks is a failure (``MISSING``)."""
    outdir = reports / direction
    index = json.loads((outdir / "index.json").read_text())
    reported = index.get(AGENT, {})
    results = []
    for case in sorted(set(selected) | set(reported), key=case_key):
        entry = reported.get(case)
        if entry is None:
            results.append(CaseResult(case, MISSING, MISSING, None))
        else:
            results.append(
                CaseResult(case, entry["behavior"], entry["behaviorClose"], outdir / entry["reportfile"])
            )
    return results


def describe_failure(result: CaseResult) -> str:
    """The suite's own words for a case that did not pass."""
    if result.report is None or not result.report.exists():
        return "no result was reported for this case"
    details = json.loads(result.report.read_text())
    parts = [
        f"{details.get('description', '').strip()}",
        f"expected: {details.get('expectation', '').strip()}",
        f"result: {details.get('result', '').strip()}",
        f"close: {details.get('resultClose', '').strip()} (behaviour {result.behavior_close})",
    ]
    return "\n".join(f"      {' '.join(part.split())}" for part in parts if part)


def print_summary(reports: Path, results: dict[str, list[CaseResult]]) -> tuple[int, int, int]:
    """Print one row per case group with each direction's counts; return the totals."""
    directions = list(results)
    outcomes = ("passed", "failed", "unimplemented")
    cell = "{:>7}{:>7}{:>7}"
    print()
    print(f"{'':<36}" + "".join(f"  {direction + ' direction':^21}" for direction in directions))
    print(f"{'case group':<36}" + "".join("  " + cell.format("pass", "fail", "unimpl") for _ in directions))
    rule = "-" * (36 + 23 * len(directions))
    print(rule)
    totals = {direction: Counter() for direction in directions}
    for group in sorted({r.group for rs in results.values() for r in rs}):
        row = f"{group:>2} {GROUP_TITLES.get(group, ''):<33}"
        for direction in directions:
            counts = Counter(r.outcome for r in results[direction] if r.group == group)
            totals[direction].update(counts)
            row += "  " + cell.format(*(counts[o] for o in outcomes))
        print(row)
    print(rule)
    print(f"{'total':<36}" + "".join("  " + cell.format(*(totals[d][o] for o in outcomes)) for d in directions))
    print()

    for direction in directions:
        by_behavior: dict[str, list[str]] = {}
        for result in results[direction]:
            by_behavior.setdefault(result.behavior, []).append(result.case)
        print(f"{direction}: " + ", ".join(f"{len(c)} {b}" for b, c in sorted(by_behavior.items())))
        for behavior in ("NON-STRICT", "INFORMATIONAL"):
            if behavior in by_behavior:
                print(f"  {behavior}: {' '.join(by_behavior[behavior])}")
        unclean = [
            r.case for r in results[direction] if r.outcome == "passed" and r.behavior_close in ("FAILED", "UNCLEAN")
        ]
        if unclean:
            print(f"  passed, but the connection was not closed cleanly: {' '.join(unclean)}")
    for direction in directions:
        for result in results[direction]:
            if result.outcome != "passed":
                print(f"{direction} {result.case}: {result.behavior}")
                print(describe_failure(result))
    print("reports: " + " ".join(str(reports / direction / "index.html") for direction in directions))
    return tuple(sum(totals[d][o] for d in directions) for o in outcomes)  # type: ignore[return-value]


# -- main ------------------------------------------------------------------


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=f"run the {len(QUICK_CASES)} cases of the quick selection")
    parser.add_argument("--direction", choices=("server", "client", "both"), default="both")
    parser.add_argument("--direct", action="store_true", help="leave the gateway out (checks the machinery)")
    parser.add_argument(
        "--time-limit", type=float, default=None,
        help=f"seconds for the whole run (default {QUICK_TIME_LIMIT:.0f} quick, {FULL_TIME_LIMIT:.0f} full)",
    )
    parser.add_argument(
        "--reports", type=Path, default=DEFAULT_REPORTS,
        help="where specs, logs and reports go (default: %(default)s)",
    )
    return parser.parse_args(argv)


def _raise_interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    directions = ("server", "client") if args.direction == "both" else (args.direction,)
    deadline = Deadline(args.time_limit or (QUICK_TIME_LIMIT if args.quick else FULL_TIME_LIMIT))
    # Both end the run through the cleanup below (SIGINT even where it was
    # inherited as ignored, as in a background job).
    signal.signal(signal.SIGTERM, _raise_interrupt)
    signal.signal(signal.SIGINT, _raise_interrupt)

    reports: Path = args.reports.resolve()
    reports.mkdir(parents=True, exist_ok=True)
    for stale in ("server", "client", "logs"):
        shutil.rmtree(reports / stale, ignore_errors=True)
    (reports / "logs").mkdir()
    processes = Processes(reports / "logs")
    results: dict[str, list[CaseResult]] = {}
    violations: dict[str, list[str]] = {}
    started = time.monotonic()
    try:
        run = Run(
            reports=reports,
            processes=processes,
            deadline=deadline,
            wstest=find_wstest(),
            cases=QUICK_CASES if args.quick else FULL_CASES,
            via_gateway=not args.direct,
        )
        for direction in directions:
            began = time.monotonic()
            selected = run_server_direction(run) if direction == "server" else run_client_direction(run)
            processes.stop_all()
            results[direction] = read_results(reports, direction, selected)
            if run.via_gateway:
                violations[direction] = far_peer_violations(
                    processes.log_dir / f"{FAR_PEER[direction]}.log", selected
                )
            print(f"{direction} direction: {len(selected)} cases in {time.monotonic() - began:.0f} s", flush=True)
    except RunError as error:
        print(f"conformance: {error}", file=sys.stderr)
        if not results:
            print("conformance: 0 passed, 1 failed, 0 unimplemented")
            return 1
    except KeyboardInterrupt:
        print("conformance: interrupted", file=sys.stderr)
        return 130
    finally:
        processes.stop_all()

    passed, failed, unimplemented = print_summary(reports, results)
    for direction, found in violations.items():
        if found:
            peer = FAR_PEER[direction]
            print(f"{direction}: the gateway passed {len(found)} protocol violations on to the {peer} (logs/{peer}.log):")
            for line in found:
                print(f"  {line}")
    # A direction that could not run at all counts as one failure.
    failed += len(directions) - len(results)
    print(f"conformance: run took {time.monotonic() - started:.0f} s")
    print(f"conformance: {passed} passed, {failed} failed, {unimplemented} unimplemented")
    return 1 if failed or unimplemented else 0


if __name__ == "__main__":
    sys.exit(main())
