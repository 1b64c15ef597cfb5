"""
The workers of one gateway acting as one, without ``[cluster]``.

With ``workers = N`` and no Redis, "this gateway" is N processes: a per-user
cap must count the sockets of all of them, an administrator's disconnect or
revocation must reach every worker's sockets, and the sessions and
``/admin/cluster`` must list them all. The supervisor already owns the
workers, so it relays: each worker gets one end of a socketpair, and the
:class:`Hub` in the supervisor counts each worker's capped sockets per user
(a dead worker's counts go with its connection, at once), keeps the
revocations (a replacement worker gets them when it starts), and hands each
administrator action to every worker, answering the asker once all have. A
worker's :class:`Link` plays for its ``cluster.Cluster`` the part Redis plays
with ``[cluster]``: one round trip per capped handshake, none otherwise, none
per message.

Messages are JSON objects in 32-bit length-prefixed frames.
"""

from __future__ import annotations

import json
import socket
from dataclasses import dataclass, field
from typing import Any, Callable, TypeVar

from twisted.internet.defer import Deferred, fail
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IDelayedCall, IReactorSocket, IReactorTime
from twisted.internet.protocol import Factory, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from twisted_gateway._bases import Int32StringReceiver
from twisted_gateway.revocations import Revocations

log = Logger()

#: Seconds the hub waits for every worker's answer to an action (as for Redis).
REPLY_TIMEOUT = 2.0
#: Seconds a worker waits for the hub (an action's answer comes within REPLY_TIMEOUT).
REQUEST_TIMEOUT = REPLY_TIMEOUT + 1.0

#: A message between the supervisor and a worker: a JSON object, as read from the socket.
Message = dict[str, Any]

_T = TypeVar("_T")


class _Channel(Int32StringReceiver):
    """One end of a socketpair: JSON messages in, JSON messages out."""

    MAX_LENGTH = 64 * 1024 * 1024  # every session of a worker, in one answer

    def __init__(self, on_message: Callable[[Message], None], on_lost: Callable[[], None]) -> None:
        self.on_message, self.on_lost = on_message, on_lost

    def send(self, message: Message) -> None:
        self.sendString(json.dumps(message, separators=(",", ":")).encode())

    def stringReceived(self, data: bytes) -> None:
        try:
            message = json.loads(data)
        except ValueError:
            log.warn("workers: a message that is not JSON between supervisor and worker")
            return
        self.on_message(message)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.on_lost()


def _adopt(reactor: IReactorSocket, sock: socket.socket, channel: _Channel) -> None:
    """Run ``channel`` on a connected UNIX socket (the reactor takes a duplicate)."""
    factory = Factory.forProtocol(lambda: channel)
    reactor.adoptStreamConnection(sock.fileno(), socket.AF_UNIX, factory)  # type: ignore[arg-type]  # typed for ServerFactory[...]; any factory serves
    sock.close()


@dataclass
class _Action:
    """An administrator action in flight: who asked, who has yet to answer, the answers."""

    origin: int
    request: object
    pending: set[int]
    results: list[object] = field(default_factory=list)
    timer: IDelayedCall | None = None


class Hub:
    """In the supervisor: the workers' links, their capped sockets per user, the revocations."""

    def __init__(self, reactor: IReactorSocket, clock: IReactorTime | None = None) -> None:
        self.reactor = reactor
        self.clock = clock if clock is not None else IReactorTime(reactor)
        self.links: dict[int, _Channel] = {}
        #: [scope, sub] as JSON -> link -> open capped sockets
        self.counts: dict[str, dict[int, int]] = {}
        self.revocations = Revocations()
        self._actions: dict[int, _Action] = {}
        self._links = 0
        self._sequence = 0

    def attach(self, sock: socket.socket) -> None:
        """A new worker's end of the pair is ``sock``'s peer; it learns the revocations first."""
        self._links += 1
        link = self._links
        channel = _Channel(lambda m: self._received(link, m), lambda: self._lost(link))
        _adopt(self.reactor, sock, channel)
        self.links[link] = channel
        channel.send({"op": "revocations", "jtis": self.revocations.jtis, "subjects": self.revocations.subjects})

    def _lost(self, link: int) -> None:
        """A worker is gone: its sockets stop counting now, it answers nothing more."""
        self.links.pop(link, None)
        for key in list(self.counts):
            self.counts[key].pop(link, None)
            if not self.counts[key]:
                del self.counts[key]
        for number, action in list(self._actions.items()):
            action.pending.discard(link)
            if not action.pending:
                self._finish(number)

    def _received(self, link: int, message: Message) -> None:
        op = message.get("op")
        if op == "acquire":
            self._reply(link, message.get("id"), over=self._acquire(link, message["keys"], message["caps"]))
        elif op == "release":
            for key in message["keys"]:
                self._count(json.dumps(key), link, -1)
        elif op == "broadcast":
            self._broadcast(link, message)
        elif op == "result":
            action = self._actions.get(message.get("id", 0))
            if action is not None and link in action.pending:
                action.pending.discard(link)
                action.results.append(message.get("result"))
                if not action.pending:
                    self._finish(message["id"])

    def _acquire(self, link: int, keys: list[list[str]], caps: list[int]) -> int:
        """0 and the socket counted under every key, or the 1-based index of the first cap reached."""
        names = [json.dumps(key) for key in keys]
        for i, (name, cap) in enumerate(zip(names, caps)):
            if sum(self.counts.get(name, {}).values()) >= cap:
                return i + 1
        for name in names:
            self._count(name, link, 1)
        return 0

    def _count(self, name: str, link: int, change: int) -> None:
        per_link = self.counts.setdefault(name, {})
        n = per_link.get(link, 0) + change
        if n > 0:
            per_link[link] = n
        else:
            per_link.pop(link, None)
        if not per_link:
            del self.counts[name]

    def _broadcast(self, link: int, message: Message) -> None:
        action, args = message.get("action"), message.get("args") or {}
        if action == "revoke":  # kept for workers started later
            if args.get("jti") is not None:
                self.revocations.add_jti(args["jti"], float(args["until"]))
            else:
                self.revocations.add_subject(args["sub"], float(args["before"]))
            self.revocations.prune(self.clock.seconds())
        self._sequence += 1
        number = self._sequence
        pending = _Action(link, message.get("id"), set(self.links))
        self._actions[number] = pending
        pending.timer = self.clock.callLater(REPLY_TIMEOUT, self._finish, number)
        for channel in list(self.links.values()):
            channel.send({"op": "apply", "id": number, "action": action, "args": args})

    def _finish(self, number: int) -> None:
        action = self._actions.pop(number, None)
        if action is None:
            return
        if action.timer is not None and action.timer.active():
            action.timer.cancel()
        if action.pending:
            log.warn("workers: {n} worker(s) did not answer an administrator action in time", n=len(action.pending))
        self._reply(action.origin, action.request, results=action.results)

    def _reply(self, link: int, request: object, **answer: object) -> None:
        channel = self.links.get(link)
        if channel is not None:
            channel.send({"op": "reply", "id": request, **answer})


class Link:
    """
    A worker's end: its requests to the hub, the hub's actions handed to
    ``apply`` (answered at once), the revocations the hub kept handed to ``load``.
    """

    def __init__(
        self,
        reactor: IReactorTime,
        fd: int,
        *,
        apply: Callable[[str | None, Message], object],
        load: Callable[[Revocations], None],
        on_lost: Callable[[], None],
    ) -> None:
        self.clock = reactor
        self.apply, self.load, self.on_lost = apply, load, on_lost
        self.up = True
        self._replies: dict[int, Deferred[Message]] = {}
        self._sequence = 0
        self.channel = _Channel(self._received, self._lost)
        _adopt(IReactorSocket(reactor), socket.socket(fileno=fd), self.channel)

    def request(self, message: Message) -> Deferred[Message]:
        """The hub's answer to ``message`` (a dict), or a failure if it is gone or late."""
        if not self.up:
            return fail(ConnectionDone("the supervisor is gone"))
        self._sequence += 1
        number = self._sequence
        d: Deferred[Message] = Deferred()
        self._replies[number] = d
        d.addTimeout(REQUEST_TIMEOUT, self.clock)

        def forget(result: _T) -> _T:
            self._replies.pop(number, None)
            return result

        d.addBoth(forget)
        self.channel.send({**message, "id": number})
        return d

    def send(self, message: Message) -> None:
        """A message that wants no answer."""
        if self.up:
            self.channel.send(message)

    def close(self) -> None:
        self.up = False
        if self.channel.transport is not None:
            self.channel.transport.loseConnection()

    def _received(self, message: Message) -> None:
        op = message.get("op")
        if op == "reply":
            d = self._replies.get(message.get("id", 0))
            if d is not None and not d.called:
                d.callback(message)
        elif op == "apply":
            result = self.apply(message.get("action"), message.get("args") or {})
            self.channel.send({"op": "result", "id": message.get("id"), "result": result})
        elif op == "revocations":
            self.load(Revocations(jtis=dict(message["jtis"]), subjects=dict(message["subjects"])))

    def _lost(self) -> None:
        was_up, self.up = self.up, False
        for d in list(self._replies.values()):
            if not d.called:
                d.errback(ConnectionDone("the supervisor is gone"))
        if was_up:
            self.on_lost()
