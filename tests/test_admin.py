"""Who may read /metrics and /status, and where: admin_allow, trusted proxies, [admin] listen."""

from __future__ import annotations

import ipaddress
import json

import pytest
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.web.server import Site

from twisted_gateway.admin import DEFAULT_ADMIN_ALLOW, client_address, is_admin, where_served
from twisted_gateway.config import ConfigError, describe_settings, parse_config
from twisted_gateway.resource import GatewayResource, build_gateway_resource


def nets(*texts: str) -> tuple:
    return tuple(ipaddress.ip_network(t) for t in texts)


@pytest.mark.parametrize(
    "peer, xff, trusted, expected",
    [
        ("203.0.113.7", [], (), "203.0.113.7"),
        # a client's own X-Forwarded-For is never believed
        ("203.0.113.7", [b"127.0.0.1"], (), "203.0.113.7"),
        ("203.0.113.7", [b"127.0.0.1"], nets("10.0.0.0/8"), "203.0.113.7"),
        # behind a trusted proxy: the right-most hop that is not a trusted proxy
        ("10.0.0.2", [b"198.51.100.9"], nets("10.0.0.0/8"), "198.51.100.9"),
        ("10.0.0.2", [b"127.0.0.1, 198.51.100.9"], nets("10.0.0.0/8"), "198.51.100.9"),
        ("10.0.0.2", [b"198.51.100.9, 10.0.0.3"], nets("10.0.0.0/8"), "198.51.100.9"),
        ("10.0.0.2", [b"127.0.0.1", b"198.51.100.9"], nets("10.0.0.0/8"), "198.51.100.9"),
        # a trusted proxy asking for itself
        ("10.0.0.2", [], nets("10.0.0.0/8"), "10.0.0.2"),
        ("::1", [], (), "::1"),
        ("::ffff:127.0.0.1", [], (), "::ffff:127.0.0.1"),
    ],
)
def test_the_client_address_is_the_peer_or_what_a_trusted_proxy_reports(peer, xff, trusted, expected):
    assert client_address(peer, xff, trusted) == ipaddress.ip_address(expected)


@pytest.mark.parametrize(
    "peer, xff, trusted, allowed",
    [
        ("127.0.0.1", [], (), True),
        ("::1", [], (), True),
        ("::ffff:127.0.0.1", [], (), True),
        ("203.0.113.7", [], (), False),
        ("203.0.113.7", [b"127.0.0.1"], (), False),
        # a local proxy in front: its clients are not loopback
        ("127.0.0.1", [b"203.0.113.7"], nets("127.0.0.0/8"), False),
        ("127.0.0.1", [b"garbage"], nets("127.0.0.0/8"), False),
        ("unix", [], (), False),
    ],
)
def test_by_default_only_loopback_clients_are_admins(peer, xff, trusted, allowed):
    assert is_admin(peer, xff, trusted, DEFAULT_ADMIN_ALLOW) is allowed


ROUTE = "[route:chat]\nprefix = /v1/chat\nupstream = http://10.0.0.5:9001\n"


def test_admin_allow_defaults_to_loopback_and_takes_cidrs_or_none():
    assert parse_config(ROUTE).admin.admin_allow == DEFAULT_ADMIN_ALLOW
    settings = parse_config(ROUTE + "[admin]\nadmin_allow = 192.0.2.0/24 2001:db8::1\n")
    assert settings.admin.admin_allow == nets("192.0.2.0/24", "2001:db8::1/128")
    assert parse_config(ROUTE + "[admin]\nadmin_allow = none\n").admin.admin_allow == ()


def test_a_bad_admin_allow_names_section_key_and_reason():
    with pytest.raises(ConfigError) as caught:
        parse_config(ROUTE + "[admin]\nadmin_allow = 127.0.0.1 localhost\n", "tap.cfg")
    assert str(caught.value) == "tap.cfg: [admin] admin_allow: 'localhost' is not an address or CIDR"


def test_check_says_where_the_operators_pages_are():
    public = describe_settings(parse_config(ROUTE))
    assert "; /metrics and /status are served on the public listener to admin_allow" in public
    assert "admin_allow = 127.0.0.1/32 ::1/128" in public
    admin = parse_config(ROUTE + "[admin]\nlisten = tcp:9090:interface=127.0.0.1\n")
    assert where_served(admin) == (
        "/metrics and /status are served on [admin] listen (tcp:9090:interface=127.0.0.1) only"
    )


def _get(resource: GatewayResource, path: bytes, peer, headers: bytes = b"") -> tuple[int, bytes]:
    """One GET through a Site from ``peer``; the status and body."""
    site = Site(resource, reactor=resource.gateway.clock)
    protocol = site.buildProtocol(None)
    transport = StringTransport(peerAddress=peer)
    protocol.makeConnection(transport)
    protocol.dataReceived(b"GET " + path + b" HTTP/1.1\r\nHost: gw\r\n" + headers + b"\r\n")
    protocol.connectionLost(Failure(ConnectionDone()))
    head, _, body = transport.value().partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), body


def _resource(extra: str = "") -> GatewayResource:
    return build_gateway_resource(parse_config(ROUTE + extra), MemoryReactorClock())


def test_metrics_are_404_to_a_public_client_and_served_to_loopback():
    resource = _resource()
    status, body = _get(resource, b"/metrics", IPv4Address("TCP", "203.0.113.7", 5000))
    assert status == 404
    assert json.loads(body)["error"] == "not_found"
    assert b"10.0.0.5" not in body
    status, body = _get(resource, b"/metrics", IPv4Address("TCP", "127.0.0.1", 5000))
    assert status == 200
    assert b'wsgateway_upstream_up{route="chat",upstream="http://10.0.0.5:9001"}' in body
    assert _get(resource, b"/metrics", IPv6Address("TCP", "::1", 5000))[0] == 200


def test_a_forged_forwarded_for_does_not_open_the_metrics():
    resource = _resource()
    forged = b"X-Forwarded-For: 127.0.0.1\r\n"
    assert _get(resource, b"/metrics", IPv4Address("TCP", "203.0.113.7", 1), forged)[0] == 404


def test_behind_a_trusted_proxy_the_forwarded_client_decides():
    resource = _resource("[admin]\nadmin_allow = 192.0.2.0/24\n[gateway]\ntrusted_proxies = 10.0.0.2\n")
    proxy = IPv4Address("TCP", "10.0.0.2", 1)
    assert _get(resource, b"/metrics", proxy, b"X-Forwarded-For: 192.0.2.10\r\n")[0] == 200
    assert _get(resource, b"/metrics", proxy, b"X-Forwarded-For: 203.0.113.7\r\n")[0] == 404


def test_health_pages_stay_public():
    resource = _resource()
    public = IPv4Address("TCP", "203.0.113.7", 5000)
    assert _get(resource, b"/healthz", public)[0] == 200
    assert _get(resource, b"/readyz", public)[0] == 200
