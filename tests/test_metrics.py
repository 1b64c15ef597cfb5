"""
Metrics: the counts the data path makes are what a Prometheus scrape reads,
with bounded labels, and every gateway keeps its own.
"""

from __future__ import annotations

import pytest
from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import DuplicateTimeseries
from treq.testing import StubTreq

from twisted_gateway.metrics import (
    DIRECTIONS,
    MESSAGE_SIZE_BUCKETS,
    GatewayCollector,
    Load,
    Metrics,
    MetricsResource,
    normalize_auth_reason,
    normalize_close_code,
    normalize_method,
    normalize_status,
    upstream_label,
)

Samples = dict[tuple[str, frozenset], float]


def scrape(registry: CollectorRegistry) -> Samples:
    """Every sample of a scrape, keyed by sample name and label set."""
    text = generate_latest(registry).decode("utf-8")
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


# -- counts move as the data path calls ----------------------------------------


def test_ws_message_counts_messages_bytes_and_size_buckets() -> None:
    m = Metrics()
    m.ws_message("chat", "client_to_upstream", 10)
    m.ws_message("chat", "client_to_upstream", 64)  # on a bound: counted as le="64"
    m.ws_message("chat", "client_to_upstream", 65)
    m.ws_message("chat", "upstream_to_client", 20_000_000)  # above every bound

    s = scrape(m.registry)
    c2u = dict(route="chat", direction="client_to_upstream")
    u2c = dict(route="chat", direction="upstream_to_client")
    assert value(s, "wsgateway_ws_messages_total", **c2u) == 3
    assert value(s, "wsgateway_ws_bytes_total", **c2u) == 139
    assert value(s, "wsgateway_ws_messages_total", **u2c) == 1
    assert value(s, "wsgateway_ws_bytes_total", **u2c) == 20_000_000
    hist = "wsgateway_ws_message_size_bytes"
    assert value(s, hist + "_bucket", le="64.0", **c2u) == 2
    assert value(s, hist + "_bucket", le="256.0", **c2u) == 3
    assert value(s, hist + "_bucket", le="+Inf", **c2u) == 3
    assert value(s, hist + "_count", **c2u) == 3
    assert value(s, hist + "_sum", **c2u) == 139
    assert value(s, hist + "_bucket", le="1.6777216e+07", **u2c) == 0
    assert value(s, hist + "_bucket", le="+Inf", **u2c) == 1


def test_a_flow_kept_by_a_relay_leg_counts_into_the_same_series() -> None:
    m = Metrics()
    flow = m.flow("chat", "upstream_to_client")
    flow.count(100)
    m.ws_message("chat", "upstream_to_client", 100)
    assert flow.messages == 2 and flow.bytes == 200
    s = scrape(m.registry)
    assert value(s, "wsgateway_ws_messages_total", route="chat", direction="upstream_to_client") == 2


def test_http_requests_by_route_method_status_and_their_durations() -> None:
    m = Metrics()
    m.http_request("api", b"GET", 200, 0.02)
    m.http_request("api", "GET", 200, 0.2)
    m.http_request("api", b"BREW", 418, 3.0)

    s = scrape(m.registry)
    total = "wsgateway_http_requests_total"
    assert value(s, total, route="api", method="GET", status="200") == 2
    assert value(s, total, route="api", method="other", status="418") == 1
    hist = "wsgateway_http_request_duration_seconds"
    assert value(s, hist + "_bucket", route="api", le="0.025") == 1
    assert value(s, hist + "_bucket", route="api", le="0.25") == 2
    assert value(s, hist + "_bucket", route="api", le="+Inf") == 3
    assert value(s, hist + "_count", route="api") == 3
    assert value(s, hist + "_sum", route="api") == pytest.approx(3.22)


def test_handshakes_by_outcome() -> None:
    m = Metrics()
    for outcome in ("accepted", "accepted", "unauthorized", "refused_by_upstream"):
        m.ws_handshake("chat", outcome)
    s = scrape(m.registry)
    total = "wsgateway_ws_handshakes_total"
    assert value(s, total, route="chat", outcome="accepted") == 2
    assert value(s, total, route="chat", outcome="unauthorized") == 1
    assert value(s, total, route="chat", outcome="refused_by_upstream") == 1
    assert value(s, total, route="chat", outcome="limited") is None


def test_open_pairs_gauge_and_closes_by_side_and_code() -> None:
    m = Metrics()
    m.ws_opened("chat")
    m.ws_opened("chat")
    m.ws_opened("chat")
    m.ws_closed("chat", "client", 1000)
    m.ws_closed("chat", "upstream", 1014)
    s = scrape(m.registry)
    assert value(s, "wsgateway_ws_open", route="chat") == 1
    closes = "wsgateway_ws_closes_total"
    assert value(s, closes, route="chat", side="client", code="1000", reason="close_frame") == 1
    assert value(s, closes, route="chat", side="upstream", code="1014", reason="close_frame") == 1

    m.ws_closed("chat", "gateway", None)
    s = scrape(m.registry)
    assert value(s, "wsgateway_ws_open", route="chat") == 0
    assert value(s, closes, route="chat", side="gateway", code="none", reason="lost") == 1

    m.ws_closed("chat", "gateway", 1008, "send_timeout")
    m.ws_closed("chat", "client", 1006)
    m.ws_closed("chat", "gateway", 1001, "a reason nobody planned for")
    m.ws_closed("chat", "gateway", 1001, "drain")
    s = scrape(m.registry)
    assert value(s, closes, route="chat", side="gateway", code="1008", reason="send_timeout") == 1
    assert value(s, closes, route="chat", side="client", code="1006", reason="lost") == 1
    assert value(s, closes, route="chat", side="gateway", code="1001", reason="other") == 1
    assert value(s, closes, route="chat", side="gateway", code="1001", reason="drain") == 1


def test_auth_failures_by_reason() -> None:
    m = Metrics()
    m.auth_failure("chat", "missing_token")
    m.auth_failure("chat", "invalid_token")
    m.auth_failure("chat", "invalid_token")
    m.auth_failure("chat", "a reason nobody planned for")
    s = scrape(m.registry)
    total = "wsgateway_auth_failures_total"
    assert value(s, total, route="chat", reason="missing_token") == 1
    assert value(s, total, route="chat", reason="invalid_token") == 2
    assert value(s, total, route="chat", reason="other") == 1


def test_upstream_gauges_come_from_the_callable_without_credentials() -> None:
    states = [
        ("chat", "ws://user:secret@10.0.0.1:9001/base?key=k", True, 3),
        ("chat", "ws://10.0.0.2:9001", False, 0),
    ]
    m = Metrics(upstreams=lambda: states)
    s = scrape(m.registry)
    one = dict(route="chat", upstream="ws://10.0.0.1:9001/base")
    two = dict(route="chat", upstream="ws://10.0.0.2:9001")
    assert value(s, "wsgateway_upstream_up", **one) == 1
    assert value(s, "wsgateway_upstream_open_connections", **one) == 3
    assert value(s, "wsgateway_upstream_up", **two) == 0
    assert value(s, "wsgateway_upstream_open_connections", **two) == 0
    assert b"secret" not in generate_latest(m.registry)


def test_a_failing_upstream_callable_does_not_break_the_scrape() -> None:
    def broken():
        raise RuntimeError("pool not ready")

    m = Metrics(routes=["chat"], upstreams=broken, upstream_failures=broken)
    s = scrape(m.registry)
    assert value(s, "wsgateway_ws_open", route="chat") == 0
    assert not any(name.startswith("wsgateway_upstream") for name, _ in s)


def test_the_load_gauges_are_read_at_each_scrape() -> None:
    """A soak run reads them to see that everything the gateway opened was given back."""
    held = [Load(delayed_calls=7, http_in_flight=2, handshakes_in_progress=1)]
    m = Metrics(load=lambda: held[0])
    s = scrape(m.registry)
    assert value(s, "wsgateway_reactor_delayed_calls") == 7
    assert value(s, "wsgateway_http_in_flight") == 2
    assert value(s, "wsgateway_ws_handshakes_in_progress") == 1
    held[0] = Load()
    s = scrape(m.registry)
    assert value(s, "wsgateway_reactor_delayed_calls") == 0
    assert value(s, "wsgateway_ws_handshakes_in_progress") == 0


# -- what a scrape shows ---------------------------------------------------------

#: Every metric family and the label names its samples carry.
FAMILIES = [
    ("wsgateway_http_requests", "counter", {"route", "method", "status"}),
    ("wsgateway_http_request_duration_seconds", "histogram", {"route"}),
    ("wsgateway_ws_handshakes", "counter", {"route", "outcome"}),
    ("wsgateway_ws_open", "gauge", {"route"}),
    ("wsgateway_ws_messages", "counter", {"route", "direction"}),
    ("wsgateway_ws_bytes", "counter", {"route", "direction"}),
    ("wsgateway_ws_message_size_bytes", "histogram", {"route", "direction"}),
    ("wsgateway_ws_closes", "counter", {"route", "side", "code", "reason"}),
    ("wsgateway_upstream_up", "gauge", {"route", "upstream"}),
    ("wsgateway_upstream_open_connections", "gauge", {"route", "upstream"}),
    ("wsgateway_auth_failures", "counter", {"route", "reason"}),
    ("wsgateway_reactor_delayed_calls", "gauge", set()),
    ("wsgateway_http_in_flight", "gauge", set()),
    ("wsgateway_ws_handshakes_in_progress", "gauge", set()),
    ("wsgateway_limit_rejections", "counter", {"route", "limit"}),
]


def _busy_metrics() -> Metrics:
    m = Metrics(upstreams=lambda: [("chat", "ws://127.0.0.1:9001", True, 1)])
    m.http_request("chat", b"GET", 200, 0.01)
    m.ws_handshake("chat", "accepted")
    m.ws_opened("chat")
    m.ws_message("chat", "client_to_upstream", 5)
    m.ws_closed("chat", "client", 1000)
    m.auth_failure("chat", "invalid_token")
    m.limit_rejection("chat", "ws_rate_limit")
    return m


@pytest.mark.parametrize("name, kind, labels", FAMILIES)
def test_the_scrape_has_each_metric_with_its_labels(name: str, kind: str, labels: set[str]) -> None:
    text = generate_latest(_busy_metrics().registry).decode("utf-8")
    families = {f.name: f for f in text_string_to_metric_families(text)}
    family = families[name]
    assert family.type == kind
    assert family.samples
    for sample in family.samples:
        assert set(sample.labels) - {"le"} == labels


def test_message_counters_exist_for_both_directions_of_a_known_route() -> None:
    s = scrape(Metrics(routes=["chat"]).registry)
    for direction in DIRECTIONS:
        assert value(s, "wsgateway_ws_messages_total", route="chat", direction=direction) == 0


def test_two_gateways_do_not_share_values() -> None:
    a, b = Metrics(), Metrics()
    a.ws_message("chat", "client_to_upstream", 7)
    a.ws_opened("chat")
    assert a.registry is not b.registry
    sa, sb = scrape(a.registry), scrape(b.registry)
    assert value(sa, "wsgateway_ws_bytes_total", route="chat", direction="client_to_upstream") == 7
    assert value(sb, "wsgateway_ws_bytes_total", route="chat", direction="client_to_upstream") is None
    assert value(sb, "wsgateway_ws_open", route="chat") is None


def test_the_global_default_registry_is_left_alone() -> None:
    Metrics().ws_opened("chat")
    assert b"wsgateway_" not in generate_latest(REGISTRY)


def test_a_second_collector_with_the_same_names_is_refused_by_a_registry() -> None:
    m = Metrics()
    with pytest.raises(DuplicateTimeseries):
        m.registry.register(GatewayCollector(m))


@pytest.mark.parametrize(
    "call",
    [
        lambda m: m.ws_message("chat", "sideways", 1),
        lambda m: m.ws_handshake("chat", "maybe"),
        lambda m: m.ws_closed("chat", "nobody", 1000),
    ],
)
def test_a_label_outside_its_fixed_set_is_a_programming_error(call) -> None:
    with pytest.raises(ValueError):
        call(Metrics())


# -- cardinality normalisation (pure) -----------------------------------------------


@pytest.mark.parametrize(
    "method, label",
    [
        (b"GET", "GET"),
        ("GET", "GET"),
        (b"HEAD", "HEAD"),
        (b"POST", "POST"),
        (b"PUT", "PUT"),
        (b"PATCH", "PATCH"),
        (b"DELETE", "DELETE"),
        (b"OPTIONS", "OPTIONS"),
        (b"get", "other"),
        (b"PROPFIND", "other"),
        (b"X" * 1000, "other"),
    ],
)
def test_methods_are_a_fixed_set(method, label: str) -> None:
    assert normalize_method(method) == label


@pytest.mark.parametrize(
    "status, label", [(200, "200"), (101, "101"), (599, "599"), (99, "other"), (600, "other"), (None, "other")]
)
def test_statuses_are_numbers_in_range(status, label: str) -> None:
    assert normalize_status(status) == label


@pytest.mark.parametrize(
    "code, label",
    [(1000, "1000"), (1014, "1014"), (4999, "4999"), (None, "none"), (999, "other"), (5000, "other")],
)
def test_close_codes_are_numbers_in_range(code, label: str) -> None:
    assert normalize_close_code(code) == label


@pytest.mark.parametrize(
    "reason, label",
    [("missing_token", "missing_token"), ("invalid_token", "invalid_token"), ("user 42 is bad", "other")],
)
def test_auth_reasons_are_a_fixed_set(reason: str, label: str) -> None:
    assert normalize_auth_reason(reason) == label


@pytest.mark.parametrize(
    "url, label",
    [
        ("ws://127.0.0.1:9001", "ws://127.0.0.1:9001"),
        ("https://u:p@api.internal/v1?k=secret#f", "https://api.internal/v1"),
        ("ws://[::1]:9001/x", "ws://[::1]:9001/x"),
        ("http://[bad", "other"),
    ],
)
def test_upstream_labels_drop_credentials_query_and_fragment(url: str, label: str) -> None:
    assert upstream_label(url) == label


def test_ten_thousand_request_shapes_stay_a_handful_of_series() -> None:
    m = Metrics()
    for i in range(10_000):
        m.http_request("api", f"M{i}", 1000 + i, 0.0)
        m.ws_closed("api", "client", 100 + i)
    counters = m.route("api")
    assert len(counters.http_requests) == 1
    assert len(counters.closes) == (4999 - 1000 + 1) + 1  # every legal code, plus other


def test_size_buckets_are_sorted() -> None:
    assert list(MESSAGE_SIZE_BUCKETS) == sorted(MESSAGE_SIZE_BUCKETS)


# -- serving ---------------------------------------------------------------------------


def _get(stub: StubTreq, method: str, headers: dict | None = None):
    results: list = []
    stub.request(method, "http://gateway/metrics", headers=headers).addBoth(results.append)
    stub.flush()
    response = results[0]
    body: list = []
    stub.content(response).addBoth(body.append)
    stub.flush()
    return response, body[0]


def test_metrics_resource_serves_the_prometheus_text_format() -> None:
    m = _busy_metrics()
    response, body = _get(StubTreq(MetricsResource(m.registry)), "GET")
    assert response.code == 200
    content_type = response.headers.getRawHeaders(b"content-type")[0]
    assert content_type.startswith(b"text/plain; version=0.0.4")
    names = {f.name for f in text_string_to_metric_families(body.decode("utf-8"))}
    assert {name for name, _, _ in FAMILIES} <= names


def test_metrics_resource_answers_an_openmetrics_scraper_in_openmetrics() -> None:
    m = _busy_metrics()
    accept = {b"accept": [b"application/openmetrics-text; version=1.0.0"]}
    response, body = _get(StubTreq(MetricsResource(m.registry)), "GET", accept)
    assert response.headers.getRawHeaders(b"content-type")[0].startswith(b"application/openmetrics-text")
    assert body.rstrip().endswith(b"# EOF")


def test_metrics_resource_answers_head_without_a_body() -> None:
    response, body = _get(StubTreq(MetricsResource(Metrics().registry)), "HEAD")
    assert response.code == 200
    assert body == b""
