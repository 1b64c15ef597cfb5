"""The /status.json model: totals, rates and last-minute closes from the metrics' own counters."""

from __future__ import annotations

import json

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock

from twisted_gateway.config import parse_config
from twisted_gateway.metrics import Metrics, RouteCounters
from twisted_gateway.gateway import build_gateway
from twisted_gateway.resource import build_gateway_resource
from twisted_gateway.status import (
    SAMPLE_INTERVAL,
    Status,
    Totals,
    closes_since,
    rates,
    route_totals,
    worker_role,
)

from .test_admin import _get


def _counters() -> RouteCounters:
    metrics = Metrics(routes=["chat"])
    for method, status in [("GET", 200), ("GET", 200), ("POST", 502), ("GET", 401), ("GET", 404)]:
        metrics.http_request("chat", method, status, 0.01)
    for outcome in ["accepted", "accepted", "unauthorized", "bad_gateway", "limited"]:
        metrics.ws_handshake("chat", outcome)
    metrics.ws_opened("chat")
    metrics.ws_opened("chat")
    metrics.ws_closed("chat", "client", 1000)
    metrics.ws_opened("chat")
    metrics.ws_closed("chat", "upstream", 1000)
    metrics.ws_opened("chat")
    metrics.ws_closed("chat", "gateway", 1001, "gateway")
    return metrics.route("chat")


def test_route_totals_read_the_metrics_counters():
    totals = route_totals(_counters())
    assert totals == Totals(
        handshakes=5,
        http_requests=5,
        errors_5xx=2,  # the HTTP 502 and the handshake answered 502
        refusals=3,  # the HTTP 401, the handshake's 401 and the limit
        closes={"1000": 2, "1001": 1},
    )


@pytest.mark.parametrize(
    "old, new, seconds, expected",
    [
        (Totals(), Totals(), 0.0, {"handshakes": 0.0, "http_requests": 0.0, "errors_5xx": 0.0, "refusals": 0.0}),
        (
            Totals(handshakes=10, http_requests=5),
            Totals(handshakes=30, http_requests=6, errors_5xx=3, refusals=1),
            10.0,
            {"handshakes": 2.0, "http_requests": 0.1, "errors_5xx": 0.3, "refusals": 0.1},
        ),
    ],
)
def test_rates_are_per_second_differences(old, new, seconds, expected):
    assert rates(old, new, seconds) == expected


def test_the_worker_role_comes_from_the_supervisors_environment():
    assert worker_role({}) == {"workers": 1, "worker": None}
    assert worker_role({"WSGATEWAY_WORKER": "2", "WSGATEWAY_WORKERS": "4"}) == {"workers": 4, "worker": 2}


def test_closes_since_keeps_only_codes_that_moved():
    old = Totals(closes={"1000": 5, "1001": 2})
    new = Totals(closes={"1000": 5, "1001": 4, "1012": 1})
    assert closes_since(old, new) == {"1001": 2, "1012": 1}


CONFIG = """
[route:chat]
prefix = /v1/chat
upstream = http://10.0.0.5:9001 http://10.0.0.6:9001
"""


def test_the_status_document_shows_instances_rates_and_the_last_minutes_closes():
    clock = MemoryReactorClock()
    clock.advance(1000)
    gateway = build_gateway(parse_config(CONFIG), clock)
    status = Status(gateway.metrics, gateway.pools, {"chat": "/v1/chat"}, clock, files=lambda: (42, 1024))
    status.start()
    try:
        metrics = gateway.metrics
        for _ in range(20):
            metrics.ws_handshake("chat", "accepted")
            metrics.ws_opened("chat")
        metrics.ws_closed("chat", "client", 1000)
        clock.advance(SAMPLE_INTERVAL)
        clock.advance(SAMPLE_INTERVAL)
        for _ in range(10):
            metrics.ws_handshake("chat", "accepted")
            metrics.ws_opened("chat")
        metrics.ws_closed("chat", "gateway", 1012, "gateway")
        down = gateway.pools["chat"].instances[1]
        down.record_check(False, "connection refused")
        down.record_check(False, "connection refused")
        clock.advance(SAMPLE_INTERVAL)
        doc = status.document()
        (route,) = doc["routes"]
        assert route["name"] == "chat" and route["prefix"] == "/v1/chat"
        assert route["websockets_open"] == 28
        assert route["rates"]["handshakes"] == 1.0  # 10 in the last 10 s
        assert route["closes_last_minute"] == {"1000": 1, "1012": 1}
        assert [(u["url"], u["state"], u["since"]) for u in route["upstreams"]] == [
            ("http://10.0.0.5:9001", "up", 1000.0),
            ("http://10.0.0.6:9001", "down", 1010.0),
        ]
        assert doc["uptime_seconds"] == 15.0
        assert doc["open_files"] == {"open": 42, "limit": 1024}
        assert (doc["workers"], doc["worker"]) == (1, None)
        # a minute later the closes are gone from the list
        for _ in range(13):
            clock.advance(SAMPLE_INTERVAL)
        assert status.document()["routes"][0]["closes_last_minute"] == {}
    finally:
        status.stop()
    assert clock.getDelayedCalls() == []


def test_the_status_page_and_json_are_admin_pages():
    resource = build_gateway_resource(parse_config(CONFIG), MemoryReactorClock())
    public, local = IPv4Address("TCP", "203.0.113.7", 1), IPv4Address("TCP", "127.0.0.1", 1)
    assert _get(resource, b"/status", public)[0] == 404
    assert _get(resource, b"/status.json", public)[0] == 404
    status, body = _get(resource, b"/status", local)
    assert status == 200 and b"fetch('status.json'" in body
    assert b"http://" not in body.replace(b"http://www.w3.org", b"")  # nothing from a CDN
    status, body = _get(resource, b"/status.json", local)
    assert status == 200
    assert json.loads(body)["routes"][0]["upstreams"][0]["url"] == "http://10.0.0.5:9001"
