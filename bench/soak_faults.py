"""
The soak's seeded fault schedule: which fault, when, and at whom. Pure.

Client faults are spread at random over the storm, each kind a few times a
minute. Upstream faults that take an instance out (a SIGKILL and restart, an
answer after ``request_timeout``) get slots of their own, so that the other
instance of the route is in service while one is out and every ejection can be
traced to the fault that caused it. The same seed gives the same schedule.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass

#: What a client does wrong. Expected outcomes live in soak_load.
CLIENT_FAULTS = (
    "abort_handshake_head",  # half an upgrade request, then a reset
    "abort_handshake_connect",  # a whole upgrade, reset 0-2 ms later (upstream connect in progress)
    "abort_handshake_waiting",  # reset 0.3 s in, while the upstream takes 1.5 s to answer
    "abort_mid_message",  # half of a 100 KiB frame, then a reset
    "abort_mid_request_body",  # half of a POST body, then a reset
    "abort_mid_response",  # reads part of a 4 MiB answer, then a reset
    "abort_before_answer",  # gives up 0.3 s into a request the upstream answers in 1.5 s
    "slow_reader_client",  # stops reading (half of ws_ping_timeout) while 2 MiB are echoed to it
    "slow_reader_upstream",  # the upstream stops reading as long while 2 MiB are sent
    "no_pong",  # never answers the gateway's pings
    "unmasked_frame",
    "bad_utf8",
    "reserved_opcode",
    "oversized",  # one byte more than ws_max_message_size
    "token_expiry",  # a token that expires 3-6 s after it is made (the WebSocket open by then)
    "upgrade_answered_200",  # an upgrade to a path the upstream answers with a page
    "upstream_close_code",  # the upstream closes with 1000, 1001, 1011 or 4000
    "upstream_reset",  # an HTTP answer the upstream resets after its head
)

#: What an upstream does wrong; each gets a slot of its own.
UPSTREAM_FAULTS = ("kill", "slow_answer")


@dataclass(frozen=True)
class Fault:
    #: seconds into the storm
    at: float
    kind: str
    #: the instance name for upstream faults (``echo2``), else ""
    target: str = ""
    #: seconds the killed instance stays down before its restart
    down_for: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)


def schedule(
    seed: int,
    duration: float,
    instances: dict[str, list[str]],
    *,
    per_minute: float = 3.0,
    slot: float = 20.0,
) -> list[Fault]:
    """
    Every fault of a storm of ``duration`` seconds, in time order.
    ``instances`` names the instances of each route (``{"echo": ["echo1",
    "echo2"]}``); kills take turns over all of them. Each client fault kind
    happens about ``per_minute`` times a minute, at least twice. Upstream
    faults alternate kill / slow answer, one every ``slot`` seconds, none in
    the last ``slot`` (the instance must be seen back in service).
    """
    rng = random.Random(seed)
    faults: list[Fault] = []
    for kind in CLIENT_FAULTS:
        count = max(2, round(per_minute * duration / 60))
        faults += [Fault(round(rng.uniform(1, duration - 1), 3), kind) for _ in range(count)]
    victims = [name for names in instances.values() for name in names]
    rng.shuffle(victims)
    kill_turn = 0
    k = 1
    while slot * (k + 1) <= duration:
        if k % 2:
            target = victims[kill_turn % len(victims)]
            kill_turn += 1
            faults.append(Fault(slot * k, "kill", target, round(rng.uniform(3, 6), 1)))
        else:
            faults.append(Fault(slot * k, "slow_answer"))
        k += 1
    return sorted(faults, key=lambda f: (f.at, f.kind))
