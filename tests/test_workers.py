"""The supervisor's pure parts: worker counts, socket slots, command lines, why a worker died, crash loops."""

from __future__ import annotations

import os
import signal
import socket

from types import SimpleNamespace

import pytest
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure

from twisted_gateway.workers import (
    CONTROL_FD,
    RESPAWN_DELAY,
    Supervisor,
    WorkerProcess,
    bind_slots,
    death_reason,
    worker_command,
    worker_count,
    worker_environment,
)


def test_auto_is_one_worker_per_cpu_this_process_may_use():
    assert worker_count("auto") == len(os.sched_getaffinity(0))
    assert worker_count(3) == 3


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["/v/twistd", "-n", "wsgateway"], ["-n", "--pidfile=", "-n", "wsgateway"]),
        (["/v/twistd", "--pidfile", "x.pid", "wsgateway", "-c", "a.cfg"], ["-n", "--pidfile=", "wsgateway", "-c", "a.cfg"]),
        (["/v/twistd", "--pidfile=x.pid", "--logger", "m.f", "wsgateway"], ["-n", "--pidfile=", "--logger", "m.f", "wsgateway"]),
    ],
)
def test_a_worker_runs_the_same_twistd_in_the_foreground_without_pidfile(argv, expected):
    command = worker_command(argv)
    assert command[1] == "/v/twistd" and command[2:] == expected


@pytest.mark.parametrize(
    "reason, words",
    [
        (ProcessDone(0), "exited with status 0"),
        (ProcessTerminated(exitCode=3), "exited with status 3"),
        (ProcessTerminated(signal=signal.SIGKILL), "killed by SIGKILL (SIGKILL: killed by an operator or the out-of-memory killer)"),
        (ProcessTerminated(signal=signal.SIGSEGV), "killed by SIGSEGV"),
    ],
)
def test_the_supervisor_says_why_a_worker_died(reason, words):
    assert death_reason(Failure(reason)) == words


def test_a_worker_reads_its_slot_from_the_environment():
    env = worker_environment(
        {"WSGATEWAY_WORKER": "2", "WSGATEWAY_WORKERS": "4", "WSGATEWAY_LISTEN_FDS": "4,5", "WSGATEWAY_CONTROL_FD": "3"}
    )
    assert (env.number, env.workers, env.listen_fds, env.control_fd) == (2, 4, (4, 5), 3)
    assert env.channel_fd is None  # with [cluster]: no link to the supervisor's hub
    env = worker_environment({"WSGATEWAY_WORKER": "0", "WSGATEWAY_LISTEN_FDS": "4", "WSGATEWAY_CHANNEL_FD": "5"})
    assert (env.listen_fds, env.channel_fd) == ((4,), 5)
    assert worker_environment({}) is None


def test_tcp_slots_are_one_reuseport_socket_each_on_one_port_and_unix_is_shared(tmp_path):
    """Each worker gets its own accept queue for TCP (the kernel spreads), one socket for unix:."""
    path = tmp_path / "gw.sock"
    slots = bind_slots(["tcp:0:interface=127.0.0.1", f"unix:{path}"], 3)
    try:
        tcp = [slot[0] for slot in slots]
        assert len({s.fileno() for s in tcp}) == 3
        assert len({s.getsockname() for s in tcp}) == 1
        assert all(s.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) for s in tcp)
        assert len({slot[1].fileno() for slot in slots}) == 1
    finally:
        for s in {s for slot in slots for s in slot}:
            s.close()


def test_a_supervisor_with_no_worker_left_stops_without_an_error():
    """Its stopService fires with None (the plain Service part of stopping returns no Deferred)."""
    supervisor = Supervisor(MemoryReactorClock(), [], 1, ["twistd"], stop_timeout=1.0, slots=[])
    results: list[object] = []
    supervisor.stopService().addBoth(results.append)
    assert results == [None]


class _ProcessReactor(MemoryReactorClock):
    """The injected clock, and processes that never run: each worker is connected to a transport with a pid."""

    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[WorkerProcess] = []

    def spawnProcess(self, protocol: WorkerProcess, executable: str, args: list[str], **kwargs: object) -> object:
        protocol.makeConnection(SimpleNamespace(pid=1000 + len(self.spawned)))
        self.spawned.append(protocol)
        return protocol.transport


#: a failed start under load: never ready, dead after 30 s
SLOW_FAILURE = (None, 30.0)
#: a start that served a minute
SERVED = (0.5, 60.0)


@pytest.mark.parametrize(
    "lives, stopped",
    [
        ([SLOW_FAILURE] * 5, True),
        ([(None, 0.2)] * 5, True),
        ([(0.5, 1.0)] * 5, True),  # ready, then dead within QUICK_DEATH of starting
        ([SLOW_FAILURE] * 4 + [SERVED] + [SLOW_FAILURE] * 4, False),
        ([SLOW_FAILURE] * 4 + [(6.0, 7.0)] + [SLOW_FAILURE] * 4, False),  # a slow start that served, then died
    ],
)
def test_a_crash_loop_counts_deaths_before_ready_however_long_they_took(tmp_path, capfd, lives, stopped):
    """
    Five failed starts of a slot in a row stop the gateway: a worker that died before it was ready,
    whatever the time it took, or within QUICK_DEATH s of starting; one that served longer starts the count again.
    """
    reactor = _ProcessReactor()
    supervisor = Supervisor(reactor, [], 1, ["twistd"], stop_timeout=1.0, slots=[[]])
    supervisor.state_dir = str(tmp_path)
    supervisor.spawn(0)
    for ready_after, dies_after in lives:
        worker = reactor.spawned[-1]
        if ready_after is not None:
            reactor.advance(ready_after)
            worker.childDataReceived(CONTROL_FD, b"ready\n")
        reactor.advance(dies_after - (ready_after or 0.0))
        worker.processEnded(Failure(ProcessTerminated(exitCode=1)))
        reactor.advance(RESPAWN_DELAY)
    assert reactor.hasStopped is stopped
    assert len(reactor.spawned) == len(lives) + (not stopped)  # a stopping gateway starts no replacement
    line = "wsgateway: worker 0 died before it was ready or within 5 s of starting 5 times in a row (last: exited with status 1)"
    assert (line in capfd.readouterr().err) is stopped
