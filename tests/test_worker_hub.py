"""
The supervisor's hub and its workers' links (worker_hub), in this process:
real socketpairs on the reactor, the hub's action timer on a task.Clock.
"""

from __future__ import annotations

import socket

import pytest_twisted
from twisted.internet import reactor, task

from tests.support import settle
from twisted_gateway.revocations import Revocations
from twisted_gateway.worker_hub import REPLY_TIMEOUT, Hub, Link


class Worker:
    """A link as a worker holds it: what the hub asked it to do and what it loaded."""

    def __init__(self, hub: Hub, name: str) -> None:
        self.name = name
        self.applied: list = []
        self.loaded = Revocations()
        ours, theirs = socket.socketpair()
        hub.attach(ours)
        self.link = Link(reactor, theirs.detach(), apply=self.apply, load=self.loaded.replace, on_lost=lambda: None)

    def apply(self, action: str, args: dict):
        self.applied.append((action, args))
        return self.name

    async def acquire(self, sub: str, cap: int = 2) -> int:
        return (await self.link.request({"op": "acquire", "keys": [["chat", sub]], "caps": [cap]}))["over"]


async def _close(hub: Hub, *workers: Worker) -> None:
    for worker in workers:
        worker.link.close()
    await settle(lambda: not hub.links, "every link closed")


@pytest_twisted.ensureDeferred
async def test_a_cap_counts_the_sockets_of_every_worker_and_a_gone_worker_stops_counting_at_once():
    hub = Hub(reactor)
    a, b = Worker(hub, "a"), Worker(hub, "b")
    assert [await a.acquire("alice"), await b.acquire("alice"), await b.acquire("alice")] == [0, 0, 1]
    assert await a.acquire("bob") == 0  # another user, another count
    a.link.send({"op": "release", "keys": [["chat", "alice"]]})
    assert await b.acquire("alice") == 0
    assert await a.acquire("alice") == 1
    b.link.close()  # b held both of alice's sockets
    await settle(lambda: len(hub.links) == 1, "b's link gone")
    assert hub.counts == {'["chat", "bob"]': {1: 1}}
    assert await a.acquire("alice") == 0
    await _close(hub, a)


@pytest_twisted.ensureDeferred
async def test_an_action_reaches_every_worker_and_answers_once_all_have():
    hub = Hub(reactor)
    a, b = Worker(hub, "a"), Worker(hub, "b")
    reply = await b.link.request({"op": "broadcast", "action": "disconnect", "args": {"sub": "alice"}})
    assert sorted(reply["results"]) == ["a", "b"]
    assert a.applied == b.applied == [("disconnect", {"sub": "alice"})]
    await _close(hub, a, b)


@pytest_twisted.ensureDeferred
async def test_a_revocation_is_kept_for_a_worker_started_later():
    hub = Hub(reactor)
    a = Worker(hub, "a")
    until = reactor.seconds() + 3600
    await a.link.request({"op": "broadcast", "action": "revoke", "args": {"jti": "stolen", "until": until}})
    await a.link.request({"op": "broadcast", "action": "revoke", "args": {"sub": "alice", "before": 1000.0}})
    later = Worker(hub, "later")
    await settle(lambda: later.loaded.jtis, "the revocations sent to the new worker")
    assert (later.loaded.jtis, later.loaded.subjects) == ({"stolen": until}, {"alice": 1000.0})
    await _close(hub, a, later)


@pytest_twisted.ensureDeferred
async def test_a_worker_that_does_not_answer_delays_an_action_by_the_reply_timeout_only():
    clock = task.Clock()
    hub = Hub(reactor, clock=clock)
    a = Worker(hub, "a")
    silent, silent_peer = socket.socketpair()  # a worker that never reads
    hub.attach(silent)
    d = a.link.request({"op": "broadcast", "action": "sessions", "args": {}})
    await settle(lambda: a.applied, "a has answered")
    assert not d.called
    clock.advance(REPLY_TIMEOUT)
    assert (await d)["results"] == ["a"]
    silent_peer.close()
    await _close(hub, a)
