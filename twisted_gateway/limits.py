"""
The gateway's descriptor budget: how far to raise ``RLIMIT_NOFILE`` and how
many client connections that limit allows.

Services started by systemd or a login shell get a soft limit of 1024 and a
much higher hard one; a WebSocket costs two descriptors (the client's and the
upstream leg), so 1024 runs out at a few hundred chats. The rules are pure
(numbers in, numbers out); :mod:`twisted_gateway.tap` reads and sets the
process limit with them.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Descriptors every client connection may need: its own and an upstream leg.
DESCRIPTORS_PER_CONNECTION = 2

#: Descriptors kept for the gateway itself: listeners, logs, the reactor,
#: Twisted's reserved accept descriptor, health checks, JWKS fetches.
OWN_FILES = 64

#: Below this limit the gateway warns at start: a few hundred WebSockets fill it.
LOW_OPEN_FILES = 4096

#: Where no hard limit is set, the most a Linux process may open (``fs.nr_open``'s default).
UNLIMITED_CEILING = 1024 * 1024


@dataclass(frozen=True)
class OpenFilesPlan:
    """The soft and hard ``RLIMIT_NOFILE`` to ask for, and why."""

    soft: int
    hard: int
    note: str | None = None  # a reason to warn (the wish could not be granted)


def plan_open_files(soft: int, hard: int, wanted: int | None, unlimited: int) -> OpenFilesPlan:
    """
    The limit to set: ``wanted`` (``[gateway] max_open_files``) when given,
    else the hard limit. Raising the hard limit too is only asked for when
    ``wanted`` exceeds it (it takes privileges; :func:`fallback` gives the
    plan when that is refused). ``unlimited`` is the value that means "no
    limit" (``resource.RLIM_INFINITY``).
    """
    ceiling = UNLIMITED_CEILING if hard == unlimited else hard
    if wanted is None:
        return OpenFilesPlan(ceiling, hard)
    if wanted <= ceiling:
        return OpenFilesPlan(wanted, hard)
    return OpenFilesPlan(wanted, wanted)


def fallback(plan: OpenFilesPlan, hard: int, unlimited: int) -> OpenFilesPlan:
    """The plan when the system refused ``plan``: the hard limit as it is."""
    ceiling = UNLIMITED_CEILING if hard == unlimited else hard
    return OpenFilesPlan(
        ceiling,
        hard,
        note=f"max_open_files = {plan.soft} is above the hard limit {hard} and raising that was refused",
    )


def reserved_files(upstream_keepalive: int, upstream_instances: int) -> int:
    """Descriptors outside the client budget: the gateway's own and its idle keep-alive pool."""
    return OWN_FILES + upstream_keepalive * max(upstream_instances, 1)


def refusal_room(budget: int) -> int:
    """
    Connections past the cap that may still be answered with 503 at once
    (a refusal holds one descriptor for a moment); beyond those a connection
    is closed as soon as it is accepted.
    """
    return max(8, min(256, budget // 16))


def websocket_room(open_files: int, reserved: int) -> int:
    """
    How many client connections, each with an upstream leg, ``open_files``
    holds besides ``reserved`` and the room for refusals.
    """
    budget = open_files - reserved
    return max(1, (budget - refusal_room(budget)) // DESCRIPTORS_PER_CONNECTION)


@dataclass(frozen=True)
class ClientLimits:
    """``cap`` client connections are served; ``refusals`` more are answered 503."""

    cap: int
    refusals: int


def client_limits(setting: int | str, open_files: int, reserved: int) -> ClientLimits:
    """
    ``max_client_connections``: a number as configured, or for ``auto`` the
    room the descriptor limit leaves (:func:`websocket_room`), so that the
    clients alone never bring the process to ``EMFILE``.
    """
    if setting == "auto":
        budget = open_files - reserved
        return ClientLimits(websocket_room(open_files, reserved), refusal_room(budget))
    cap = int(setting)
    return ClientLimits(cap, refusal_room(cap * DESCRIPTORS_PER_CONNECTION))
