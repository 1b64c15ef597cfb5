"""
Header rules as tables: which requests are WebSocket upgrades, which headers
never cross the gateway, and whose ``X-Forwarded-For`` is believed.
"""

from __future__ import annotations

import ipaddress

import pytest
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress

from twisted_gateway.errors import GatewayError
from twisted_gateway.headers import (
    DEFAULT_STRIPPED,
    check_utf8_values,
    checked_host,
    client_address,
    clean_reason_phrase,
    cookie_value,
    forwarded_for,
    normalized_name,
    peer_host,
    single_origin,
    valid_host,
    is_websocket_upgrade,
    parse_host_header,
    rewrite_redirects,
    strip_hop_by_hop,
    upstream_host,
    upstream_origins,
    upstream_request_headers,
)

WS = [(b"Upgrade", b"websocket"), (b"Connection", b"Upgrade")]

# -- is_websocket_upgrade ----------------------------------------------------------


@pytest.mark.parametrize(
    "method, headers, upgrade",
    [
        (b"GET", WS, True),
        (b"GET", [(b"Upgrade", b"websocket"), (b"Connection", b"keep-alive, Upgrade")], True),
        (b"GET", [(b"Upgrade", b"WebSocket"), (b"Connection", b"upgrade")], True),
        (b"GET", [(b"UPGRADE", b"WEBSOCKET"), (b"CONNECTION", b"UPGRADE")], True),
        (b"GET", [(b"upgrade", b"websocket"), (b"connection", b"Upgrade,keep-alive")], True),
        (b"GET", [(b"Upgrade", b" websocket "), (b"Connection", b"  Upgrade  ")], True),
        (b"GET", [(b"Upgrade", b"h2c, websocket"), (b"Connection", b"Upgrade")], True),
        (
            b"GET",
            [(b"Connection", b"keep-alive"), (b"Upgrade", b"websocket"), (b"Connection", b"Upgrade")],
            True,
        ),
        (b"GET", [(b"Upgrade", b"h2c"), (b"Upgrade", b"websocket"), (b"Connection", b"upgrade")], True),
        (b"POST", WS, False),
        (b"HEAD", WS, False),
        (b"get", WS, False),
        (b"GET", [(b"Upgrade", b"websocket")], False),
        (b"GET", [(b"Connection", b"Upgrade")], False),
        (b"GET", [], False),
        (b"GET", [(b"Upgrade", b"websocket"), (b"Connection", b"keep-alive")], False),
        (b"GET", [(b"Upgrade", b"h2c"), (b"Connection", b"Upgrade")], False),
        (b"GET", [(b"Upgrade", b"websockets"), (b"Connection", b"Upgrade")], False),
        (b"GET", [(b"Upgrade", b"websocket"), (b"Connection", b"upgrade-insecure")], False),
        (b"GET", [(b"Upgrade", b"websocket"), (b"Connection", b"")], False),
        (b"GET", [(b"X-Upgrade", b"websocket"), (b"Connection", b"Upgrade")], False),
    ],
    ids=[
        "canonical",
        "Firefox: keep-alive, Upgrade",
        "mixed-case values",
        "upper-case names and values",
        "lower-case names, no space after comma",
        "padded values",
        "websocket among several protocols",
        "Connection over two lines",
        "Upgrade over two lines",
        "POST is not an upgrade",
        "HEAD is not an upgrade",
        "methods are case-sensitive",
        "no Connection",
        "no Upgrade",
        "no headers",
        "Connection without upgrade token",
        "other protocol",
        "websockets is not websocket",
        "upgrade-insecure is not upgrade",
        "empty Connection",
        "other header name",
    ],
)
def test_is_websocket_upgrade(method, headers, upgrade):
    """GET + Upgrade token websocket + Connection token upgrade, as any-case comma lists."""
    assert is_websocket_upgrade(method, headers) is upgrade


# -- strip_hop_by_hop ----------------------------------------------------------------


@pytest.mark.parametrize(
    "headers, kept",
    [
        (
            [(b"Accept", b"*/*"), (b"Connection", b"close, X-Foo"), (b"X-Foo", b"1"), (b"X-Bar", b"2")],
            [(b"Accept", b"*/*"), (b"X-Bar", b"2")],
        ),
        (
            [(b"Connection", b"x-foo"), (b"X-FOO", b"1"), (b"x-foo", b"2")],
            [],
        ),
        (
            [(b"Connection", b"X-A"), (b"Connection", b"X-B"), (b"X-A", b"1"), (b"X-B", b"2"), (b"X-C", b"3")],
            [(b"X-C", b"3")],
        ),
        (
            [
                (b"Keep-Alive", b"timeout=5"),
                (b"Proxy-Connection", b"keep-alive"),
                (b"Proxy-Authorization", b"Basic eA=="),
                (b"Proxy-Authenticate", b"Basic"),
                (b"TE", b"trailers"),
                (b"Trailer", b"X-Sum"),
                (b"Transfer-Encoding", b"chunked"),
                (b"Upgrade", b"websocket"),
                (b"Connection", b"Upgrade"),
                (b"Authorization", b"Bearer t"),
            ],
            [(b"Authorization", b"Bearer t")],
        ),
        (
            [(b"Cookie", b"a=1"), (b"Accept", b"text/html"), (b"Cookie", b"b=2"), (b"X-Z", b"z")],
            [(b"Cookie", b"a=1"), (b"Accept", b"text/html"), (b"Cookie", b"b=2"), (b"X-Z", b"z")],
        ),
        (
            [(b"Connection", b"keep-alive, Upgrade"), (b"Upgrade", b"websocket"), (b"X-A", b"a"), (b"Keep-Alive", b"5")],
            [(b"X-A", b"a")],
        ),
        ([], []),
    ],
    ids=[
        "Connection: close, X-Foo drops X-Foo",
        "named header dropped in any case, every line",
        "names from several Connection lines",
        "every RFC 9110 hop-by-hop header",
        "order and repeats kept",
        "Connection naming hop-by-hop headers only",
        "empty",
    ],
)
def test_strip_hop_by_hop(headers, kept):
    """Hop-by-hop headers and those Connection names are dropped; the rest keep order."""
    assert strip_hop_by_hop(headers) == kept


# -- forwarded_for -----------------------------------------------------------------

PROXIES = (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("fd00::/8"))


@pytest.mark.parametrize(
    "incoming, peer, trusted, expected",
    [
        ([], "203.0.113.7", (), b"203.0.113.7"),
        ([b"6.6.6.6"], "203.0.113.7", (), b"203.0.113.7"),
        ([b"6.6.6.6"], "203.0.113.7", PROXIES, b"203.0.113.7"),
        ([b"198.51.100.1"], "10.1.2.3", PROXIES, b"198.51.100.1, 10.1.2.3"),
        ([b"198.51.100.1, 10.9.9.9"], "10.1.2.3", PROXIES, b"198.51.100.1, 10.9.9.9, 10.1.2.3"),
        ([b"198.51.100.1", b"10.9.9.9"], "10.1.2.3", PROXIES, b"198.51.100.1, 10.9.9.9, 10.1.2.3"),
        ([], "10.1.2.3", PROXIES, b"10.1.2.3"),
        ([b"  ", b""], "10.1.2.3", PROXIES, b"10.1.2.3"),
        ([b"2001:db8::1"], "fd00::5", PROXIES, b"2001:db8::1, fd00::5"),
        ([b"6.6.6.6"], "11.0.0.1", PROXIES, b"11.0.0.1"),
        ([b"6.6.6.6"], "unix", PROXIES, b"unix"),
        ([b"198.51.100.1"], "127.0.0.1", (ipaddress.ip_network("127.0.0.1/32"),), b"198.51.100.1, 127.0.0.1"),
    ],
    ids=[
        "direct client",
        "client-sent header ignored without trusted proxies",
        "client-sent header ignored from an untrusted peer",
        "trusted proxy in CIDR: chain kept and extended",
        "trusted proxy: comma list kept",
        "trusted proxy: several header lines joined",
        "trusted proxy without a header",
        "blank header values skipped",
        "IPv6 CIDR",
        "peer just outside the CIDR",
        "unix socket peer is never trusted",
        "single-address CIDR",
    ],
)
def test_forwarded_for(incoming, peer, trusted, expected):
    """Only a trusted proxy's X-Forwarded-For is believed; the peer is always appended."""
    assert forwarded_for(incoming, peer, trusted) == expected


# -- upstream_request_headers -------------------------------------------------------


def _names(headers):
    return [name.lower() for name, _ in headers]


@pytest.mark.parametrize(
    "spoofed",
    [
        (b"X-Auth-Subject", b"admin"),
        (b"x-auth-subject", b"admin"),
        (b"X-Auth-Claims", b'{"role": "admin"}'),
        (b"X-AUTH-CLAIMS", b"{}"),
        (b"X-Forwarded-For", b"6.6.6.6"),
        (b"X-Forwarded-Proto", b"https"),
        (b"X-Forwarded-Host", b"admin.internal"),
        (b"x-forwarded-host", b"admin.internal"),
    ],
    ids=lambda pair: pair[0].decode() if isinstance(pair, tuple) else str(pair),
)
def test_client_sent_identity_and_forwarded_headers_never_reach_the_upstream(spoofed):
    """A client cannot claim an identity or a forwarding chain the gateway did not set."""
    headers = [(b"Accept", b"*/*"), spoofed, (b"User-Agent", b"ua")]
    out = upstream_request_headers(headers, peer="203.0.113.7", scheme="http", host=b"gw.example")
    assert spoofed not in out
    assert spoofed[1] not in [value for _, value in out]
    assert (b"Accept", b"*/*") in out and (b"User-Agent", b"ua") in out


@pytest.mark.parametrize(
    "spoofed",
    [
        (b"X-Forwarded-Port", b"443"),
        (b"X-Forwarded-Prefix", b"/admin"),
        (b"X-Forwarded-Server", b"internal"),
    ],
    ids=lambda pair: pair[0].decode() if isinstance(pair, tuple) else str(pair),
)
def test_no_client_sent_x_forwarded_header_reaches_the_upstream(spoofed):
    """
    Every ``X-Forwarded-*`` header is the gateway's to write: frameworks trust
    ``-Port`` and ``-Prefix`` (redirects, URL building) as they trust ``-Host``.
    """
    out = upstream_request_headers(
        [(b"Accept", b"*/*"), spoofed], peer="203.0.113.7", scheme="http", host=b"gw.example"
    )
    assert spoofed[0].lower() not in _names(out)


def test_upstream_request_headers_adds_forwarded_headers():
    """The upstream learns the client address, the scheme and the Host it asked for."""
    headers = [
        (b"Host", b"gw.example:8080"),
        (b"Accept", b"*/*"),
        (b"Cookie", b"a=1"),
        (b"Connection", b"keep-alive, X-Debug"),
        (b"X-Debug", b"1"),
        (b"Cookie", b"b=2"),
        (b"X-Forwarded-For", b"6.6.6.6"),
        (b"X-Auth-Subject", b"mallory"),
    ]
    out = upstream_request_headers(
        headers, peer="203.0.113.7", scheme="https", host=b"gw.example:8080"
    )
    assert out == [
        (b"Accept", b"*/*"),
        (b"Cookie", b"a=1"),
        (b"Cookie", b"b=2"),
        (b"X-Forwarded-For", b"203.0.113.7"),
        (b"X-Forwarded-Proto", b"https"),
        (b"X-Forwarded-Host", b"gw.example:8080"),
    ]


def test_upstream_request_headers_extends_a_trusted_proxys_chain():
    """Behind a trusted load balancer the original client stays first in X-Forwarded-For."""
    out = upstream_request_headers(
        [(b"X-Forwarded-For", b"198.51.100.1"), (b"X-Forwarded-Proto", b"https")],
        peer="10.0.0.2",
        scheme="http",
        host=None,
        trusted_proxies=PROXIES,
    )
    assert out == [
        (b"X-Forwarded-For", b"198.51.100.1, 10.0.0.2"),
        (b"X-Forwarded-Proto", b"http"),
    ]
    assert b"x-forwarded-host" not in _names(out)


def test_upstream_request_headers_drops_what_the_caller_names():
    """The WebSocket leg drops its own handshake headers, in any case."""
    out = upstream_request_headers(
        [(b"Sec-WebSocket-Key", b"k"), (b"origin", b"https://o"), (b"X-Keep", b"1")],
        peer="127.0.0.1",
        scheme="http",
        host=b"h",
        drop=frozenset({b"sec-websocket-key"}),
    )
    assert _names(out) == [b"origin", b"x-keep", b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host"]


# -- header-name aliases and client-set address headers (issue: identity spoofing) --


def _forwarded(headers, **kwargs):
    return upstream_request_headers(headers, peer="192.0.2.1", scheme="http", host=None, **kwargs)


@pytest.mark.parametrize(
    "name, normalized",
    [
        (b"X-Auth-Subject", b"x-auth-subject"),
        (b"X_Auth_Subject", b"x-auth-subject"),
        (b"x-auth_SUBJECT", b"x-auth-subject"),
        (b"X_FORWARDED_FOR", b"x-forwarded-for"),
        (b"Accept", b"accept"),
    ],
)
def test_header_names_compare_as_cgi_style_upstreams_see_them(name, normalized):
    assert normalized_name(name) == normalized


@pytest.mark.parametrize(
    "name",
    [
        b"X_Auth_Subject",
        b"X-Auth_Subject",
        b"x_auth_claims",
        b"X-AUTH-SUBJECT",
        b"X_Forwarded_For",
        b"X-Forwarded_Host",
        b"X_Custom",
    ],
)
def test_a_header_name_with_an_underscore_or_aliasing_an_identity_is_never_forwarded(name):
    names = [k for k, _ in _forwarded([(name, b"admin"), (b"Accept", b"*/*")])]
    assert name not in names
    assert b"Accept" in names


@pytest.mark.parametrize(
    "name, kept",
    [
        (b"X_Custom", True),
        (b"X_Auth_Subject", False),
        (b"x_auth_claims", False),
        (b"X_Forwarded_Proto", False),
    ],
)
def test_a_route_allowing_underscores_still_drops_identity_and_forwarded_aliases(name, kept):
    names = [k for k, _ in _forwarded([(name, b"v")], underscores=True)]
    assert (name in names) is kept


@pytest.mark.parametrize(
    "name",
    [b"X-Real-IP", b"True-Client-IP", b"CF-Connecting-IP", b"X-Original-URL", b"x-rewrite-url", b"X_Real_IP"],
)
def test_the_default_strip_list_removes_client_set_address_and_routing_headers(name):
    drop = frozenset(n.encode() for n in DEFAULT_STRIPPED)
    assert [k for k, _ in _forwarded([(name, b"10.0.0.1")], drop=drop, underscores=True)] == [
        b"X-Forwarded-For",
        b"X-Forwarded-Proto",
    ]


# -- Host and Origin --------------------------------------------------------------


@pytest.mark.parametrize(
    "host, valid",
    [
        (b"gw.example", True),
        (b"gw.example:8080", True),
        (b"127.0.0.1:80", True),
        (b"[::1]", True),
        (b"[2001:db8::1]:443", True),
        (b"GW.Example", True),
        (b"gw@evil.example", False),
        (b"gw.example/x?y", False),
        (b"gw@evil.example/x?y", False),
        (b"a.example, b.example", False),
        (b"a.example,b.example", False),
        (b"gw example", False),
        (b"", False),
        (b"gw.example:", False),
        (b"gw.example:99999", False),
        (b"gw.example:80:80", False),
        (b"[not-v6]", False),
        (b"[::1", False),
        (b"gw%2Fevil.example", False),
        (b"[fe80::1%25eth0]", False),
        (b"gw.example\r\nX: y", False),
    ],
)
def test_a_host_is_one_host_and_optional_port(host, valid):
    assert valid_host(host) is valid


@pytest.mark.parametrize(
    "values, version, expected",
    [
        ([b"gw.example"], b"HTTP/1.1", b"gw.example"),
        ([b" gw.example:8080 "], b"HTTP/1.1", b"gw.example:8080"),
        ([], b"HTTP/1.0", None),
        ([], b"HTTP/2", None),
        ([b"gw.example"], b"HTTP/1.0", b"gw.example"),
    ],
)
def test_the_one_valid_host_is_used(values, version, expected):
    assert checked_host(values, version) == expected


@pytest.mark.parametrize(
    "values, version",
    [
        ([], b"HTTP/1.1"),
        ([b"gw.example", b"evil.example"], b"HTTP/1.1"),
        ([b"gw.example", b"gw.example"], b"HTTP/1.0"),
        ([b"gw@evil.example/x?y"], b"HTTP/1.1"),
        ([b"a, b"], b"HTTP/1.0"),
    ],
)
def test_a_missing_repeated_or_malformed_host_is_a_400(values, version):
    with pytest.raises(GatewayError) as raised:
        checked_host(values, version)
    assert raised.value.status == 400


def test_one_origin_or_none_is_the_origin():
    assert single_origin([]) is None
    assert single_origin([b"https://app.example"]) == b"https://app.example"


def test_two_origins_are_a_403():
    with pytest.raises(GatewayError) as raised:
        single_origin([b"https://evil.com", b"https://app.example"])
    assert raised.value.status == 403


# -- bytes that would change on the way -------------------------------------------


@pytest.mark.parametrize(
    "phrase, cleaned",
    [
        (b"OK", b"OK"),
        (b"Not Found", b"Not Found"),
        (b"OK\rX-Injected: 1", b"OK X-Injected: 1"),
        (b"OK\nSet-Cookie: a=b", b"OK Set-Cookie: a=b"),
        (b"A\x00B\x7fC", b"A B C"),
        (b"tab\tkept", b"tab\tkept"),
        ("Trés bien".encode("latin-1"), "Trés bien".encode("latin-1")),
    ],
)
def test_a_reason_phrase_loses_its_control_characters(phrase, cleaned):
    assert clean_reason_phrase(phrase) == cleaned


def test_utf8_header_values_pass_an_upgrade_and_others_are_a_400():
    check_utf8_values([(b"X-Note", "café".encode("utf-8")), (b"Accept", b"*/*")])
    with pytest.raises(GatewayError) as raised:
        check_utf8_values([(b"X-Note", "café".encode("latin-1"))])
    assert raised.value.status == 400
    assert "X-Note" in raised.value.detail


# -- host_header: the Host sent upstream, and redirects back to the client ------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("client", "client"),
        (" Upstream ", "upstream"),
        ("Chat.Example.com", "chat.example.com"),
        ("chat.example.com:8443", "chat.example.com:8443"),
        ("[::1]:80", "[::1]:80"),
    ],
)
def test_host_header_values(text, expected):
    assert parse_host_header(text) == expected


@pytest.mark.parametrize("text", ["", "a b", "http://chat.example.com", "x:99999", "a,b"])
def test_host_header_refuses_what_is_not_a_host(text):
    with pytest.raises(ValueError, match="client, upstream or a host"):
        parse_host_header(text)


@pytest.mark.parametrize(
    "mode, client, expected",
    [
        ("client", b"chat.example.com", b"chat.example.com"),
        ("client", None, None),  # HTTP/1.0 without Host: the instance's own
        ("upstream", b"chat.example.com", None),
        ("internal.example:8080", b"chat.example.com", b"internal.example:8080"),
    ],
)
def test_upstream_host(mode, client, expected):
    assert upstream_host(mode, client) == expected


CLIENT = b"https://chat.example.com"


@pytest.mark.parametrize(
    "mode, header, expected",
    [
        # the upstream's own address, with or without the default port
        ("upstream", (b"Location", b"http://10.0.0.5:9101/ws1/echo?q=1"), b"https://chat.example.com/ws1/echo?q=1"),
        ("upstream", (b"location", b"HTTP://10.0.0.5:9101"), b"https://chat.example.com"),
        ("upstream", (b"Content-Location", b"http://10.0.0.5:9101/a#f"), b"https://chat.example.com/a#f"),
        ("upstream", (b"Refresh", b"5; url=http://10.0.0.5:9101/x"), b"5; url=https://chat.example.com/x"),
        ("upstream", (b"Refresh", b"0;URL='http://10.0.0.5:9101/x'"), b"0;URL='https://chat.example.com/x'"),
        # the fixed name sent as Host
        ("internal.example", (b"Location", b"http://internal.example/login"), b"https://chat.example.com/login"),
        # not the upstream: left alone
        ("upstream", (b"Location", b"http://10.0.0.5:91011/x"), b"http://10.0.0.5:91011/x"),
        ("upstream", (b"Location", b"https://auth.example.com/?next=http://10.0.0.5:9101/"), b"https://auth.example.com/?next=http://10.0.0.5:9101/"),
        ("upstream", (b"Location", b"/relative"), b"/relative"),
        ("upstream", (b"Link", b"<http://10.0.0.5:9101/x>"), b"<http://10.0.0.5:9101/x>"),
        # under client the upstream already names the client's host
        ("client", (b"Location", b"http://10.0.0.5:9101/x"), b"http://10.0.0.5:9101/x"),
    ],
)
def test_redirects_to_the_upstream_name_the_client_host(mode, header, expected):
    origins = upstream_origins("http://10.0.0.5:9101", mode)
    assert rewrite_redirects([header], origins, CLIENT) == [(header[0], expected)]


def test_default_ports_name_the_same_upstream():
    assert upstream_origins("https://up.internal:443/base", "upstream") == (
        b"https://up.internal",
        b"https://up.internal:443",
    )


TRUSTED = (ipaddress.ip_network("10.0.0.0/8"),)


@pytest.mark.parametrize(
    "xff, peer, expected",
    [
        ([], "198.51.100.7", "198.51.100.7"),
        ([b"1.2.3.4"], "198.51.100.7", "198.51.100.7"),  # an untrusted peer's claim is ignored
        ([b"1.2.3.4"], "10.0.0.2", "1.2.3.4"),
        ([b"6.6.6.6, 1.2.3.4, 10.0.0.3"], "10.0.0.2", "1.2.3.4"),  # the last untrusted hop
        ([b"6.6.6.6", b"1.2.3.4"], "10.0.0.2", "1.2.3.4"),
        ([b"10.0.0.9"], "10.0.0.2", "10.0.0.9"),  # all trusted: the leftmost known
        ([b"not-an-address"], "10.0.0.2", "10.0.0.2"),
    ],
)
def test_client_address_believes_only_trusted_proxies(xff, peer, expected):
    assert client_address(xff, peer, TRUSTED) == expected


@pytest.mark.parametrize(
    "headers, expected",
    [
        ([(b"Cookie", b"a=1; jwt=c")], b"c"),
        ([(b"cookie", b"a=1"), (b"COOKIE", b"jwt=c")], b"c"),
        ([(b"Cookie", b'jwt="c"')], b"c"),
        ([(b"Cookie", b'a={"x": 1}; b=x y; jwt=c')], b"c"),
        ([(b"Cookie", b"jwt=; jwt=c")], b"c"),
        ([(b"Cookie", b"jwt = c ;x=1")], b"c"),
        ([(b"Cookie", b"myjwt=c; jwts=d")], None),
        ([(b"X-Cookie", b"jwt=c")], None),
        ([(b"Cookie", b"jwt=")], None),
        ([], None),
    ],
    ids=[
        "among others",
        "any header of that name",
        "quotes dropped",
        "a cookie SimpleCookie cannot parse does not hide the others",
        "first non-empty",
        "spaces around name and value",
        "other names",
        "other headers",
        "empty value is none",
        "no cookie",
    ],
)
def test_cookie_value_is_the_one_reading_of_cookie_headers(headers, expected):
    """The token cookie and the hash_key cookie are read the same way."""
    assert cookie_value(headers, "jwt") == expected


@pytest.mark.parametrize(
    "address, expected",
    [
        (IPv4Address("TCP", "198.51.100.7", 5000), "198.51.100.7"),
        (IPv6Address("TCP", "::1", 5000), "::1"),
        (UNIXAddress(b"/run/gw.sock"), "unix"),
        (None, "unix"),
    ],
)
def test_peer_host_is_the_address_or_unix(address, expected):
    """HTTP and WebSocket requests, the access log and admin_allow name a peer the same way."""
    assert peer_host(address) == expected
