"""
``make soak``'s machinery in a few seconds: its verdicts on fabricated records
(a clean run passes, a leak, a wrongful ejection or a wrong close code fails
it), its seeded schedule, and a tiny storm of every client fault against a
gateway and the soak's echo and chat upstreams on loopback, which must end
with every close code as the rules say and nothing left open. No timing is
asserted: speed and the full figures live in ``bench/``.
"""

from __future__ import annotations

import copy
import sys
import time
from pathlib import Path

import pytest
import pytest_twisted
import txaio
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.web.server import Site

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import soak_checks  # noqa: E402
from soak_faults import CLIENT_FAULTS, schedule  # noqa: E402
from soak_load import Limits, Load, Profile, sleep  # noqa: E402
from soak_upstream import build_echo_site, build_soak_echo_factory  # noqa: E402

from tests.support import hs256_config, listen, settle, start_gateway  # noqa: E402
from twisted.internet import reactor  # noqa: E402
from twisted_gateway.demo.chat import build_chat_site  # noqa: E402

SECRET = "smoke-secret-0123456789-0123456789-abcdef"
T0 = 1_800_000_000.0


def clean_record() -> dict:
    """A run in which everything went as the rules say."""
    ws = [
        {"kind": "chat", "route": "chat", "started": T0 + 1, "ended": T0 + 5, "expected": [1000], "got": 1000,
         "within": None, "detail": ""},
        {"kind": "bad_utf8", "route": "echo", "started": T0 + 2, "ended": T0 + 2.1, "expected": [1007],
         "got": 1007, "within": 20, "detail": ""},
        # open when echo2 was killed: 1014 is what the rules give
        {"kind": "echo", "route": "echo", "started": T0 + 3, "ended": T0 + 10.5, "expected": [1000],
         "got": 1014, "within": None, "detail": ""},
    ]
    http = [
        {"kind": "get", "route": "echo", "started": T0 + 1, "ended": T0 + 1.1, "status": 200, "ok": True,
         "detail": ""},
        {"kind": "slow_answer", "route": "echo", "started": T0 + 20, "ended": T0 + 23, "status": 504,
         "ok": False, "detail": ""},
    ]
    state = {"pairs": 0, "handshakes": 0, "handshakes_in_progress": 0, "http_in_flight": 0,
             "delayed_calls": 6, "fds": 10, "rss": 60 << 20}
    return {
        "mode": "quick",
        "seed": 1,
        "config": {"request_timeout": 3.0, "fail_timeout": 5.0, "health_interval": 1.0},
        "storm": {"start": T0, "end": T0 + 60},
        "faults": [{"at": 10.0, "kind": "kill", "target": "echo2", "down_for": 4.0}],
        "kills": [{"target": "echo2", "route": "echo", "killed_at": T0 + 10, "restarted_at": T0 + 14,
                   "back_at": T0 + 16}],
        "slow_answers": [{"at": T0 + 20}],
        "ejections": [
            {"time": T0 + 10.2, "instance": "echo2", "causes": ["connect_refused"], "reason": ""},
            {"time": T0 + 23, "instance": "echo1", "causes": ["no_head_timeout"], "reason": ""},
        ],
        "tally": {"ws_outcomes": ws, "http_outcomes": http, "upgrades_accepted": 3, "upgrades_abandoned": 1,
                  "http_abandoned": 1, "messages_sent": 10, "messages_received": 10},
        "tasks_left": 0,
        "baseline": dict(state),
        "final": dict(state),
        "rss": {"mid": 60 << 20, "end": 61 << 20},
        "metrics": {"handshakes": {"accepted": 4}, "closes": 4, "open": 0,
                    "http": {"echo 200": 2, "echo 504": 1}, "messages": 20, "failures": {}},
        "log_problems": [],
        "log_lines": 100,
        "open_samples": [2, 3, 3],
        "minimums": {"open_websockets_median": 2, "messages": 10, "handshakes": 3, "http_requests": 3},
    }


def failed(record: dict) -> set[str]:
    return {c.name for c in soak_checks.run_checks(record) if not c.ok}


def test_a_clean_record_passes_every_check():
    assert failed(clean_record()) == set()
    assert "PASS" in soak_checks.markdown(clean_record(), soak_checks.run_checks(clean_record()))


@pytest.mark.parametrize(
    "change, check",
    [
        (lambda r: r["final"].update(pairs=1), "no pair, handshake or request left"),
        (lambda r: r["final"].update(http_in_flight=2), "no pair, handshake or request left"),
        (lambda r: r["final"].update(fds=16), "file descriptors back to the baseline"),
        (lambda r: r["final"].update(delayed_calls=9), "timers back to the baseline"),
        (lambda r: r["rss"].update(end=63 << 20), "RSS growth over the last half under 2 MiB"),
        (lambda r: r["ejections"].append({"time": T0 + 40, "instance": "chat1", "causes": ["reset_before_head"]}),
         "no instance ejected for a client's fault"),
        (lambda r: r["kills"][0].update(back_at=T0 + 25), "killed upstreams back in service"),
        (lambda r: r["tally"]["ws_outcomes"][1].update(got=1002), "close codes as the rules say"),
        (lambda r: r["tally"]["ws_outcomes"][0].update(got=1014), "close codes as the rules say"),
        (lambda r: r["tally"]["ws_outcomes"][1].update(ended=T0 + 30), "nothing hangs past its timeout"),
        (lambda r: r.update(tasks_left=1), "nothing hangs past its timeout"),
        (lambda r: r["tally"]["http_outcomes"][0].update(ok=False, detail="the body came back changed"),
         "HTTP answers as the rules say"),
        (lambda r: r["metrics"].update(closes=3), "handshakes: metrics agree with the clients"),
        (lambda r: r["metrics"]["http"].update({"echo 200": 3}), "HTTP: metrics agree with the clients"),
        (lambda r: r["log_problems"].append("Unhandled error in Deferred:"), "no traceback in the gateway's log"),
        (lambda r: r["metrics"].update(messages=5), "the storm was as big as asked"),
    ],
)
def test_a_fabricated_fault_fails_its_check(change, check):
    record = copy.deepcopy(clean_record())
    change(record)
    assert failed(record) == {check}


def test_a_post_that_met_a_kept_alive_close_may_be_a_502_that_says_so():
    """The rules of keep-alive replays: it may have reached the upstream, so it is not sent twice."""
    record = clean_record()
    raced = {"kind": "post", "route": "echo", "started": T0 + 30, "ended": T0 + 30.1, "status": 502, "ok": False,
             "detail": "the upstream closed its kept-alive connection as the request was sent; it may ..."}
    record["tally"]["http_outcomes"].append(raced)
    record["metrics"]["http"]["echo 502"] = 1
    assert failed(record) == set()
    raced["detail"] = "the upstream closed the connection without a valid response"
    assert failed(record) == {"HTTP answers as the rules say"}


def test_the_schedule_is_seeded_covers_every_client_fault_and_takes_turns_killing():
    instances = {"chat": ["chat1", "chat2"], "echo": ["echo1", "echo2"]}
    faults = schedule(7, 200, instances)
    assert faults == schedule(7, 200, instances)
    assert faults != schedule(8, 200, instances)
    assert {f.kind for f in faults} >= set(CLIENT_FAULTS)
    kills = [f.target for f in faults if f.kind == "kill"]
    assert len(kills) == 5 and len(set(kills[:4])) == 4 and kills[4] == kills[0]
    assert all(0 < f.at < 200 for f in faults)
    upstream = [f for f in faults if f.kind in ("kill", "slow_answer")]
    assert all(b.at - a.at >= 20 for a, b in zip(upstream, upstream[1:]))


def _config(chat: int, echo: int) -> str:
    """
    The slow readers pause half of ``ws_ping_timeout`` and must still end with
    1000: with 3 s the pong has 1.5 s to get through 512 KiB of backlog, which a
    CPU-starved machine needs (with 1 s it missed the deadline now and then).
    """
    gateway = """
[gateway]
ws_open_timeout = 3
request_timeout = 2
ws_max_message_size = 65536
ws_ping_interval = 1
ws_ping_timeout = 3
"""
    return hs256_config(SECRET, chat, before=gateway, after=f"[route:echo]\nprefix = /v1/echo\nupstream = http://127.0.0.1:{echo}\n")


@pytest_twisted.ensureDeferred
async def test_a_tiny_storm_of_every_client_fault_ends_as_the_rules_say_and_leaves_nothing_open():
    chat_site = build_chat_site(reactor)
    chat_site.log = lambda request: None
    chat_port = await listen(chat_site)
    echo_site: Site = build_echo_site(reactor, "echo1")
    echo_port = await listen(echo_site)
    gw = await start_gateway(_config(chat_port.getHost().port, echo_port.getHost().port))
    gw.gateway.startService()
    profile = Profile(chat_sessions=4, echo_sessions=2, churn_per_s=5, http_per_s=10, session_life=(1, 2),
                      max_message=64 * 1024)
    load = Load(gw.number, SECRET, profile, Limits(64 * 1024, 1.0, 3.0, 2.0), seed=3)
    start = time.time()
    load.start(ramp=0.5)
    for kind in CLIENT_FAULTS:
        load.inject(kind)
    await sleep(3)
    assert await load.stop() == 0
    record = clean_record()
    record.update(kills=[], storm={"start": start, "end": time.time()}, tasks_left=0,
                  tally=load.tally.as_dict())
    for check in (soak_checks.check_close_codes, soak_checks.check_hangs, soak_checks.check_http):
        verdict = check(record)
        assert verdict.ok, verdict.detail
    kinds = {o["kind"] for o in record["tally"]["ws_outcomes"]}
    assert kinds >= {"chat", "echo", "churn", "no_pong", "oversized", "token_expiry", "upstream_close_code"}
    await settle(lambda: len(gw.registry) == 0 and not gw.registry.handshakes, "no pair left")
    assert gw.gateway.http_in_flight == 0
    await gw.gateway.stopService()
    await gw.close()
    for port in (chat_port, echo_port):
        await port.stopListening()


def test_the_echo_upstream_sends_its_own_close_before_its_close_timer_can_drop_it(monkeypatch):
    """
    The soak's ``upstream_close_code`` once got 1014 instead of the upstream's
    1001: Autobahn's close handshake timer rounds its deadline down to a whole
    second (txaio's batched timer), so a 1 s timeout set at x.99 s fired 0.01 s
    later, and the upstream's drop discarded its own close frame, still queued.
    The gateway saw an upstream vanish without a close and said so (1014):
    the right charge for what reached it. The upstream now waits at least 4 s.
    """
    clock = MemoryReactorClock()
    clock.advance(1_000.99)
    monkeypatch.setattr(txaio.config, "loop", clock)  # Autobahn's timers run on the global loop
    server = build_soak_echo_factory(clock, "echo1").buildProtocol(None)
    transport = StringTransport()
    transport.unregisterProducer = lambda: None  # (what Autobahn's drop calls)
    server.makeConnection(transport)
    server.dataReceived(
        b"GET /v1/echo/ws HTTP/1.1\r\nHost: echo\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    assert server.state == server.STATE_OPEN
    server.onMessage(b"close:1001", False)
    assert server.state == server.STATE_CLOSING
    clock.advance(1.0)
    assert not server.wasCloseHandshakeTimeout and not transport.disconnecting
    server.transport.loseConnection()
