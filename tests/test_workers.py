"""The supervisor's pure parts: worker counts, socket slots, command lines, why a worker died."""

from __future__ import annotations

import os
import signal
import socket

import pytest
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.python.failure import Failure

from twisted_gateway.workers import (
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
    from twisted.internet.testing import MemoryReactorClock

    from twisted_gateway.workers import Supervisor

    supervisor = Supervisor(MemoryReactorClock(), [], 1, ["twistd"], stop_timeout=1.0, slots=[])
    results: list[object] = []
    supervisor.stopService().addBoth(results.append)
    assert results == [None]
