"""
Upstream pools: balancing, consistent hashing, passive and active health, the
config keys. Pure and in memory: a ``task.Clock`` and treq's ``RequestTraversalAgent``.
"""

from __future__ import annotations

import json
from collections import Counter

import pytest
from treq.testing import RequestTraversalAgent
from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from twisted_gateway.health import HealthChecker
from twisted_gateway.schema import (
    RouteSettings,
    parse_balance,
    parse_hash_key,
    parse_health_check,
    read_section,
)
from twisted_gateway.upstreams import (
    HashRing,
    InstanceRegistry,
    NoHealthyUpstream,
    PoolKeyError,
    UpstreamPool,
    check_pool_keys,
    hash_key_value,
    may_retry,
    upstream_failures,
    upstream_states,
)

A, B, C, D = (f"http://10.0.0.{n}:9001" for n in (1, 2, 3, 4))


def make_pool(urls=(A, B, C), clock=None, registry=None, **kwargs) -> UpstreamPool:
    registry = registry or InstanceRegistry(clock or Clock())
    return UpstreamPool("chat", list(urls), registry, **kwargs)


def urls_of(instances) -> list[str]:
    return [i.url for i in instances]


# -- balancing ------------------------------------------------------------------


def test_round_robin_spreads_requests_evenly_over_three_instances():
    pool = make_pool(balance="round_robin")
    chosen = [pool.choose().url for _ in range(300)]
    assert Counter(chosen) == {A: 100, B: 100, C: 100}
    assert chosen[:4] == [A, B, C, A]


def test_round_robin_skips_an_ejected_instance_without_overloading_its_neighbour():
    pool = make_pool(balance="round_robin", max_fails=1)
    pool.report_failure(pool.instances[1])
    assert Counter(pool.choose().url for _ in range(100)) == {A: 50, C: 50}


def test_least_connections_picks_the_instance_with_fewest_open_connections():
    pool = make_pool(balance="least_connections")
    a, b, c = pool.instances
    for instance, count in ((a, 3), (b, 1), (c, 2)):
        for _ in range(count):
            instance.acquire(websocket=True)
    assert pool.choose() is b
    b.acquire(websocket=True)
    b.acquire()  # an HTTP request in flight counts too
    assert pool.choose() is c
    assert (b.active, b.open_websockets) == (3, 2)


def test_least_connections_takes_turns_among_equally_loaded_instances():
    pool = make_pool(balance="least_connections")
    assert urls_of(pool.choose() for _ in range(6)) == [A, B, C, A, B, C]


def test_a_released_connection_makes_its_instance_preferred_again():
    pool = make_pool(balance="least_connections")
    for instance in pool.instances:
        instance.acquire(websocket=True)
        instance.acquire(websocket=True)
    pool.instances[2].release(websocket=True)
    assert pool.choose() is pool.instances[2]


@pytest.mark.parametrize(
    "websocket, expected", [(True, "least_connections"), (False, "round_robin")]
)
def test_default_balance_is_least_connections_for_websocket_routes_and_round_robin_otherwise(
    websocket, expected
):
    assert make_pool(websocket=websocket).balance == expected


def test_every_attempt_is_counted_on_the_instance_that_got_it():
    pool = make_pool()
    for _ in range(4):
        pool.choose()
    assert [i.requests for i in pool.instances] == [2, 1, 1]


# -- consistent hashing -------------------------------------------------------------


def test_hash_sends_every_member_of_a_room_to_the_same_instance():
    pool = make_pool(balance="hash", hash_key="query:room")
    for room in ("lobby", "games", "room-42", "caf\u00e9"):
        first = pool.choose(room)
        assert all(pool.choose(room) is first for _ in range(20))


def test_routes_and_gateways_naming_the_same_instances_agree_on_a_room():
    one = make_pool(balance="hash", hash_key="query:room")
    other = make_pool(urls=(C, A, B), balance="hash", hash_key="header:x-room")
    assert all(one.choose(f"r{n}").url == other.choose(f"r{n}").url for n in range(500))


def test_hash_spreads_rooms_over_all_instances():
    ring = HashRing([A, B, C])
    shares = Counter(ring.owner(f"room-{n}") for n in range(10_000))
    assert all(2_500 < shares[url] < 4_200 for url in (A, B, C))


def test_adding_a_fourth_instance_moves_about_a_quarter_of_the_rooms_and_only_to_it():
    before, after = HashRing([A, B, C]), HashRing([A, B, C, D])
    rooms = [f"room-{n}" for n in range(10_000)]
    moved = [room for room in rooms if before.owner(room) != after.owner(room)]
    assert 0.15 < len(moved) / len(rooms) < 0.35
    assert {after.owner(key) for key in moved} == {D}


def test_rooms_of_a_down_instance_move_and_the_others_stay_put():
    clock = Clock()
    pool = make_pool(clock=clock, balance="hash", hash_key="query:room", fail_timeout=10)
    rooms = [f"room-{n}" for n in range(300)]
    before = {room: pool.choose(room) for room in rooms}
    down = pool.instances[0]
    pool.report_failure(down)
    during = {room: pool.choose(room) for room in rooms}
    assert all(during[r] is before[r] for r in rooms if before[r] is not down)
    assert all(during[r] is not down for r in rooms)
    clock.advance(10)
    assert {room: pool.choose(room) for room in rooms} == before


def test_a_request_without_the_hash_key_falls_back_to_the_default_policy():
    websocket = make_pool(balance="hash", hash_key="query:room", websocket=True)
    for instance, count in zip(websocket.instances, (2, 0, 1)):
        for _ in range(count):
            instance.acquire(websocket=True)
    assert websocket.choose(None) is websocket.instances[1]
    http = make_pool(balance="hash", hash_key="query:room", websocket=False)
    assert urls_of(http.choose(None) for _ in range(3)) == [A, B, C]


@pytest.mark.parametrize(
    "spec, request_parts, expected",
    [
        ("query:room", {"query": b"room=lobby"}, "lobby"),
        ("query:room", {"query": b"token=x&room=a%20b+c&room=second"}, "a b c"),
        ("query:room", {"query": b"ro%6Fm=encoded-name"}, "encoded-name"),
        ("query:room", {"query": b"room=caf%C3%A9"}, "caf\u00e9"),
        ("query:room", {"query": b"room="}, None),
        ("query:room", {"query": b"rooms=x"}, None),
        ("query:room", {"query": b""}, None),
        ("header:x-room", {"headers": [(b"X-Room", b" lobby ")]}, "lobby"),
        ("header:x-room", {"headers": [(b"X-Other", b"lobby")]}, None),
        ("cookie:room", {"headers": [(b"Cookie", b"a=1; room=lobby")]}, "lobby"),
        ("cookie:room", {"headers": [(b"cookie", b"a=1"), (b"cookie", b'room="q"')]}, "q"),
        ("cookie:room", {"headers": [(b"Cookie", b"myroom=x")]}, None),
        ("claim:tenant", {"claims": {"tenant": "acme"}}, "acme"),
        ("claim:tenant", {"claims": {"tenant": 42}}, "42"),
        ("claim:groups", {"claims": {"groups": ["b", "a"]}}, '["b","a"]'),
        ("claim:tenant", {"claims": {"sub": "x"}}, None),
        ("claim:tenant", {"claims": None}, None),
        ("ip", {"client_ip": "198.51.100.7", "query": b"sid=x"}, "198.51.100.7"),
        ("ip", {}, None),
    ],
)
def test_hash_key_value_reads_the_configured_part_of_the_request(spec, request_parts, expected):
    assert hash_key_value(spec, **request_parts) == expected


# -- passive health ------------------------------------------------------------------


def test_an_instance_failing_max_fails_times_is_ejected_and_returns_after_fail_timeout():
    clock = Clock()
    pool = make_pool(clock=clock, max_fails=2, fail_timeout=10)
    a = pool.instances[0]
    pool.report_failure(a)
    assert a.state == "up"
    clock.advance(3)
    pool.report_failure(a)
    assert (a.state, a.failures, a.ejected_until) == ("down", 2, 13)
    assert A not in urls_of(pool.choose() for _ in range(10))
    clock.advance(9.9)
    assert a.state == "down"
    clock.advance(0.1)
    assert a.state == "up"
    assert A in urls_of(pool.choose() for _ in range(3))


def test_failures_further_apart_than_fail_timeout_do_not_eject():
    clock = Clock()
    pool = make_pool(clock=clock, max_fails=2, fail_timeout=10)
    pool.report_failure(pool.instances[0])
    clock.advance(11)
    pool.report_failure(pool.instances[0])
    assert pool.instances[0].state == "up"


def test_a_success_between_failures_starts_the_count_afresh():
    pool = make_pool(max_fails=2)
    a = pool.instances[0]
    pool.report_failure(a)
    pool.report_success(a)
    pool.report_failure(a)
    assert a.state == "up"
    pool.report_failure(a)
    assert a.state == "down"


def test_max_fails_zero_turns_passive_ejection_off():
    pool = make_pool(max_fails=0)
    for _ in range(10):
        pool.report_failure(pool.instances[0])
    assert (pool.instances[0].state, pool.instances[0].failures) == ("up", 10)


def test_routes_naming_the_same_instance_share_its_health():
    registry = InstanceRegistry(Clock())
    chat = UpstreamPool("chat", [A, B], registry)
    feed = UpstreamPool("feed", [B, C], registry)
    assert chat.instances[1] is feed.instances[0]
    chat.report_failure(chat.instances[1])
    assert urls_of(feed.choose() for _ in range(4)) == [C, C, C, C]
    assert len(registry) == 3


def test_all_instances_down_is_a_502_json_error_at_once():
    """Health checks (passive health never takes a route's last instance) put all out."""
    pool = make_pool()
    for instance in pool.instances:
        instance.record_check(False, "refused")
        instance.record_check(False, "refused")
    with pytest.raises(NoHealthyUpstream) as caught:
        pool.candidates("room", retry=True)
    assert caught.value.status == 502
    body = json.loads(caught.value.body())
    assert body["error"] == "no_healthy_upstream"
    assert "chat" in body["detail"]
    with pytest.raises(NoHealthyUpstream):
        pool.choose()


def test_state_changes_are_logged_once_per_change():
    clock = Clock()
    pool = make_pool(clock=clock, max_fails=1, fail_timeout=10)
    a = pool.instances[0]
    with capturedLogs() as events:
        pool.report_failure(a)
        pool.report_failure(a)  # an in-flight attempt failing later: still one event
        pool.choose()
        clock.advance(10)
        for _ in range(5):
            pool.choose()
    changes = [(e["url"], e["upstream_state"]) for e in events if "upstream_state" in e]
    assert changes == [(A, "down"), (A, "up")]


def test_metrics_see_each_instance_of_each_route_with_its_state_and_connections():
    registry = InstanceRegistry(Clock())
    chat = UpstreamPool("chat", [A, B], registry)
    feed = UpstreamPool("feed", [B, C], registry)
    chat.instances[0].acquire(websocket=True)
    chat.report_failure(chat.instances[1])
    assert upstream_states([chat, feed]) == [
        ("chat", A, True, 1),
        ("chat", B, False, 0),
        ("feed", B, False, 0),
        ("feed", C, True, 0),
    ]


def test_a_routes_only_instance_is_never_ejected_by_failures():
    """With nothing to fail over to, ejecting would only turn slow answers into 502s."""
    pool = make_pool(urls=(A,), max_fails=1)
    with capturedLogs() as events:
        for _ in range(5):
            pool.report_failure(pool.instances[0], "connect_refused")
    assert pool.instances[0].state == "up"
    assert pool.choose().url == A
    assert not [e for e in events if "upstream_state" in e]


def test_the_last_healthy_instance_of_a_route_stays_in_service():
    pool = make_pool(urls=(A, B), max_fails=1)
    a, b = pool.instances
    pool.report_failure(a, "connect_refused")
    pool.report_failure(b, "connect_refused")
    assert (a.state, b.state) == ("down", "up")
    assert urls_of(pool.choose() for _ in range(3)) == [B, B, B]


def test_an_instance_shared_with_a_route_that_has_no_other_is_not_ejected():
    registry = InstanceRegistry(Clock())
    chat = UpstreamPool("chat", [A, B], registry)
    UpstreamPool("feed", [B], registry)
    chat.report_failure(chat.instances[1], "connect_refused")
    assert chat.instances[1].state == "up"


def test_health_checks_still_take_a_routes_only_instance_out():
    pool = make_pool(urls=(A,))
    pool.instances[0].record_check(False, "refused")
    pool.instances[0].record_check(False, "refused")
    assert pool.instances[0].state == "down"
    with pytest.raises(NoHealthyUpstream):
        pool.choose()


def test_the_ejection_log_line_names_the_causes_of_the_failures():
    clock = Clock()
    pool = make_pool(urls=(A, B), clock=clock, max_fails=3, fail_timeout=10)
    a = pool.instances[0]
    with capturedLogs() as events:
        pool.report_failure(a, "connect_refused")
        clock.advance(1)
        pool.report_failure(a, "no_head_timeout")
        clock.advance(1)
        pool.report_failure(a, "connect_refused")
    [down] = [e for e in events if e.get("upstream_state") == "down"]
    assert formatEvent(down) == (
        f"upstream {A} is down: 3 failures in 10 s"
        " (connect refused x2, no head timeout x1), out for 10 s"
    )


def test_failures_are_counted_per_route_instance_and_reason_for_metrics():
    registry = InstanceRegistry(Clock())
    chat = UpstreamPool("chat", [A, B], registry, max_fails=0)
    chat.report_failure(chat.instances[0], "connect_refused")
    chat.report_failure(chat.instances[0], "connect_refused")
    chat.report_failure(chat.instances[1], "tls")
    assert upstream_failures([chat]) == [
        ("chat", A, "connect_refused", 2),
        ("chat", B, "tls", 1),
    ]


# -- retries ---------------------------------------------------------------------------


def test_candidates_offer_each_instance_once_starting_with_the_chosen_one():
    pool = make_pool(balance="round_robin")
    pool.choose()
    tried = urls_of(pool.candidates(None, retry=True))
    assert tried == [B, C, A]


def test_hash_candidates_follow_the_ring_from_the_room_owner():
    pool = make_pool(balance="hash", hash_key="query:room")
    tried = list(pool.candidates("lobby", retry=True))
    assert tried[0] is pool.choose("lobby")
    assert sorted(urls_of(tried)) == sorted([A, B, C])


def test_least_connections_candidates_go_from_least_to_most_loaded():
    pool = make_pool(balance="least_connections")
    for instance, count in zip(pool.instances, (5, 1, 3)):
        for _ in range(count):
            instance.acquire()
    assert urls_of(pool.candidates(None, retry=True)) == [B, C, A]


def test_a_retry_skips_an_instance_ejected_while_the_first_attempt_ran():
    pool = make_pool(balance="round_robin")
    attempts = pool.candidates(None, retry=True)
    first = next(attempts)
    pool.report_failure(first)
    pool.report_failure(pool.instances[2])  # another request found C down meanwhile
    assert [first.url, *urls_of(attempts)] == [A, B]


def test_without_retry_a_request_goes_to_one_instance_only():
    pool = make_pool()
    attempts = pool.candidates(None, retry=False)
    assert urls_of(attempts) == [A]


@pytest.mark.parametrize(
    "method, retried",
    [
        *[(method, True) for method in (b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"get")],
        *[(method, False) for method in (b"POST", b"PATCH", b"CONNECT")],
    ],
)
def test_only_idempotent_requests_are_retried_on_another_instance(method, retried):
    assert may_retry(method) is retried


# -- config keys ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "parse, text, expected",
    [
        (parse_balance, " Least_Connections ", "least_connections"),
        (parse_balance, "hash", "hash"),
        (parse_hash_key, "query:room", "query:room"),
        (parse_hash_key, "Header:X-Room", "header:x-room"),
        (parse_hash_key, "claim:Tenant", "claim:Tenant"),
        (parse_hash_key, "cookie:room", "cookie:room"),
        (parse_hash_key, " IP ", "ip"),
        (parse_health_check, "/health?deep=1", "/health?deep=1"),
        (parse_health_check, "ws:/ws/health", "ws:/ws/health"),
    ],
)
def test_pool_keys_accept_their_documented_forms(parse, text, expected):
    assert parse(text) == expected


@pytest.mark.parametrize(
    "parse, text",
    [
        (parse_balance, "random"),
        (parse_hash_key, "room"),
        (parse_hash_key, "body:room"),
        (parse_hash_key, "query:"),
        (parse_hash_key, "query:two words"),
        (parse_health_check, "health"),
        (parse_health_check, "http://x/health"),
        (parse_health_check, "ws:health"),
    ],
)
def test_pool_keys_refuse_other_forms(parse, text):
    with pytest.raises(ValueError):
        parse(text)


@pytest.mark.parametrize(
    "balance, hash_key",
    [("hash", None), ("round_robin", "query:room"), (None, "query:room")],
)
def test_hash_key_and_balance_hash_must_come_together(balance, hash_key):
    with pytest.raises(PoolKeyError) as caught:
        check_pool_keys(balance, hash_key)
    assert caught.value.key == "hash_key"


POOL_KEYS = ("balance", "hash_key", "max_fails", "fail_timeout", "health_check", "health_interval")


def test_route_pool_keys_read_through_the_config_section_reader():
    """The pool's keys are route keys of the schema, each optional, with its default."""
    values = {
        "prefix": "/v1/chat",
        "upstream": f"{A} {B}",
        "balance": "hash",
        "hash_key": "query:room",
        "health_check": "ws:/health",
    }
    route = RouteSettings(name="chat", **read_section("tap.cfg", "route:chat", values, RouteSettings))
    assert {k: getattr(route, k) for k in POOL_KEYS} == {
        "balance": "hash",
        "hash_key": "query:room",
        "max_fails": 1,
        "fail_timeout": 10.0,
        "health_check": "ws:/health",
        "health_interval": 5.0,
    }


# -- active health, in memory -------------------------------------------------------------


class HealthPage(Resource):
    """``/health`` answering ``code``, or never when ``hang`` is set."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.code, self.hang, self.hits = 200, False, 0

    def render_GET(self, request):
        self.hits += 1
        if self.hang:
            return NOT_DONE_YET
        request.setResponseCode(self.code)
        return b"{}"


def checked_pool(clock, page, **kwargs):
    pool = make_pool(urls=(A,), clock=clock, health_check="/health", health_interval=5, **kwargs)
    return pool, HealthChecker([pool], clock, RequestTraversalAgent(page))


def test_two_failed_checks_eject_and_two_passed_checks_restore():
    clock, page = Clock(), HealthPage()
    pool, checker = checked_pool(clock, page)
    a = pool.instances[0]
    page.code = 503
    checker.start()
    assert (a.state, a.check_failures) == ("up", 1)
    clock.advance(5)
    assert a.state == "down"
    with pytest.raises(NoHealthyUpstream):
        pool.choose()
    page.code = 302  # a redirect is an answer: healthy
    clock.advance(5)
    assert (a.state, a.check_successes) == ("down", 1)
    clock.advance(5)
    assert a.state == "up"
    assert page.hits == 4
    assert checker.stop().called


def test_a_check_without_an_answer_in_time_fails_and_stop_cancels_the_one_in_flight():
    clock, page = Clock(), HealthPage()
    pool, checker = checked_pool(clock, page)
    a = pool.instances[0]
    page.hang = True
    checker.start()
    clock.advance(4.9)
    assert a.check_failures == 0
    clock.advance(0.1)  # min(health_interval, 5) s
    assert a.check_failures == 1
    clock.advance(5)  # the next check starts, and hangs too
    assert page.hits == 2
    stopped = checker.stop()
    assert stopped.called
    assert a.check_failures == 1  # a check cut short by stop() has no verdict
    assert clock.getDelayedCalls() == []


def test_check_now_probes_once_and_never_runs_two_checks_of_one_instance_at_once():
    clock, page = Clock(), HealthPage()
    pool, checker = checked_pool(clock, page)
    page.hang = True
    first, second = checker.check_now(), checker.check_now()
    assert page.hits == 1 and not first.called and not second.called
    clock.advance(5)
    assert first.called and second.called
    assert pool.instances[0].check_failures == 1
    assert checker.stop().called


def test_hash_key_ip_keeps_a_client_on_one_instance_whatever_it_sends():
    """engine.io's first request has no sid: the address alone picks the instance, every time."""
    pool = make_pool(balance="hash", hash_key="ip", websocket=False)
    for address in ("198.51.100.7", "203.0.113.9", "2001:db8::1"):
        key = pool.request_key(query=b"EIO=4&transport=polling", headers=[], claims=None, peer=address)
        chosen = {pool.choose(key).url for _ in range(10)}
        later = pool.request_key(query=b"EIO=4&sid=abc", headers=[], claims=None, peer=address)
        assert chosen == {pool.choose(later).url}


def test_a_gateways_health_checks_connect_to_an_ip_upstream_at_once_without_a_resolver_thread():
    """Resolving ``127.0.0.1`` in a thread made checks fail together when the gateway was short of CPU."""
    from twisted.internet.testing import MemoryReactorClock

    from twisted_gateway.config import parse_config
    from twisted_gateway.gateway import build_gateway

    settings = parse_config(
        "[gateway]\nlisten = tcp:8080\n\n[route:api]\nprefix = /v1/api\n"
        "upstream = http://127.0.0.1:9001 http://[::1]:9002\nwebsocket = false\n"
        "health_check = /health\nhealth_interval = 5\n"
    )
    reactor = MemoryReactorClock()
    gateway = build_gateway(settings, reactor)
    gateway.health_checker.start()
    try:
        assert sorted((host, port) for host, port, *_ in reactor.tcpClients) == [("127.0.0.1", 9001), ("::1", 9002)]
    finally:
        gateway.health_checker.stop()
