"""
The relay answers an upgrade from the request twisted.web parsed
(``RelayServerProtocol.answer_upgrade``) exactly as Autobahn answers the same
request written out to its own parser: the same answer to the client, the same
request upstream, the same handshake state on the client's leg; whatever
Autobahn would refuse (or treat specially) still goes to Autobahn.
"""

from __future__ import annotations

import pytest
from twisted.internet.address import IPv4Address

from tests.support import route_config
from twisted_gateway.testing import MemoryRelay, RawClient, RecordingUpstream
from twisted_gateway.ws_proxy import RelayServerProtocol

KEY = "dGhlIHNhbXBsZSBub25jZQ=="
#: the client leg's handshake state that processHandshake leaves, compared both ways
STATE = (
    "http_status_line", "http_headers", "http_request_uri", "http_request_path", "http_request_params",
    "http_request_host", "websocket_version", "websocket_protocols", "websocket_origin", "_wskey", "peer",
    "data", "websocket_protocol_in_use",
)

BASE = {"Host": "gateway.test", "Upgrade": "websocket", "Connection": "Upgrade",
        "Sec-WebSocket-Key": KEY, "Sec-WebSocket-Version": "13"}

# (name, target, headers changed from BASE (None: left out), extra header lines,
#  answered from the parsed request (None: refused before the hand-over))
CASES = [
    ("plain", "/v1/chat/ws", {}, [], True),
    ("query", "/v1/chat/ws?room=a&room=b&x=", {}, [], True),
    ("empty query", "/v1/chat/ws?", {}, [], True),
    ("encoded query", "/v1/chat/ws?q=a%20b+c&r=%E2%82%AC&q", {}, [], True),
    ("path parameters", "/v1/chat/ws;v=1?room=a", {}, [], True),
    ("colon in the path", "/v1/chat/a:b/ws", {}, [], True),
    ("origin", "/v1/chat/ws", {}, ["Origin: https://app.example"], True),
    ("null origin", "/v1/chat/ws", {}, ["Origin: null"], True),
    ("subprotocols", "/v1/chat/ws", {}, ["Sec-WebSocket-Protocol: chat, superchat"], True),
    ("deflate offer", "/v1/chat/ws", {}, ["Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits"], True),
    ("host with port", "/v1/chat/ws", {"Host": "gateway.test:8080"}, [], True),
    ("ipv6 host", "/v1/chat/ws", {"Host": "[::1]"}, [], True),
    ("token lists", "/v1/chat/ws", {"Upgrade": "h2c, WebSocket", "Connection": "keep-alive, Upgrade"}, [], True),
    ("repeated header", "/v1/chat/ws", {}, ["X-Thing: a", "X-Thing: b"], True),
    ("short key", "/v1/chat/ws", {"Sec-WebSocket-Key": "abc=="}, [], False),
    ("key without padding", "/v1/chat/ws", {"Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQxx"}, [], False),
    ("key not base64", "/v1/chat/ws", {"Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZ!=="}, [], False),
    ("two keys", "/v1/chat/ws", {}, ["Sec-WebSocket-Key: " + KEY], False),
    ("hybi-08", "/v1/chat/ws", {"Sec-WebSocket-Version": "8"}, ["Sec-WebSocket-Origin: http://a.example"], True),
    ("unknown version", "/v1/chat/ws", {"Sec-WebSocket-Version": "12"}, [], False),
    ("signed version", "/v1/chat/ws", {"Sec-WebSocket-Version": "+13"}, [], False),
    ("no version", "/v1/chat/ws", {"Sec-WebSocket-Version": None}, [], False),
    ("no key", "/v1/chat/ws", {"Sec-WebSocket-Key": None}, [], False),
    ("bad host port", "/v1/chat/ws", {"Host": "gateway.test:http"}, [], None),  # twisted.web's refusal
    ("duplicate subprotocol", "/v1/chat/ws", {}, ["Sec-WebSocket-Protocol: chat, chat"], False),
    ("hostless origin", "/v1/chat/ws", {}, ["Origin: https://"], False),
]


def _exchange(target: str, changed: dict[str, str | None], extra: list[str]) -> tuple[MemoryRelay, RawClient]:
    relay = MemoryRelay(route_config(9), RecordingUpstream(allowNullOrigin=True))
    client = RawClient()
    server = relay.site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
    relay.net.join(server, client)
    headers = {**BASE, **changed}
    lines = [f"GET {target} HTTP/1.1", *(f"{k}: {v}" for k, v in headers.items() if v is not None), *extra]
    client.send(("\r\n".join(lines) + "\r\n\r\n").encode())
    relay.flush()
    return relay, client


def _state(relay: MemoryRelay) -> dict[str, object] | None:
    pairs = list(relay.registry.pairs)
    if not pairs:
        return None
    leg = pairs[0].client
    state = {name: getattr(leg, name, "(unset)") for name in STATE}
    state["extensions"] = [repr(e) for e in leg.websocket_extensions]
    return state


def _upstream_request(relay: MemoryRelay) -> object:
    connections = relay.upstream.connections
    # (the upstream leg's own Sec-WebSocket-Key is random)
    return [(c.http_request_uri, sorted((k, v) for k, v in c.http_headers.items() if k != "sec-websocket-key"))
            for c in connections]


@pytest.mark.parametrize(("target", "changed", "extra", "answered"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_an_upgrade_is_answered_as_autobahn_answers_it_written_out(monkeypatch, target, changed, extra, answered):
    taken: list[bool] = []
    answer = RelayServerProtocol.answer_upgrade

    def recording(self, head, body):
        taken.append(answer(self, head, body))
        return taken[-1]

    # what the upstream's opening is handed (onConnect's request either way), every field read (params on first read)
    requests: list[dict[str, object]] = []
    open_upstream = RelayServerProtocol.open_upstream

    def connecting(self, request, accept, refuse):
        requests.append(request.__json__())
        return open_upstream(self, request, accept, refuse)

    monkeypatch.setattr(RelayServerProtocol, "answer_upgrade", recording)
    monkeypatch.setattr(RelayServerProtocol, "open_upstream", connecting)
    fast, fast_client = _exchange(target, changed, extra)
    assert taken == ([] if answered is None else [answered])
    fast_requests = requests[:]
    requests.clear()
    monkeypatch.setattr(RelayServerProtocol, "answer_upgrade", lambda self, head, body: False)
    slow, slow_client = _exchange(target, changed, extra)
    _assert_served_alike(fast, fast_client, slow, slow_client, opened=bool(answered))
    assert fast_requests == requests
    if answered:
        assert len(requests) == 1


def _assert_served_alike(
    fast: MemoryRelay, fast_client: RawClient, slow: MemoryRelay, slow_client: RawClient, *, opened: bool, legs: bool = True
) -> None:
    """The same answer to both clients, the same pairs (the same request upstream, the same client leg with ``legs``); both relays stopped."""
    for relay in (fast, slow):
        relay.flush()
    assert fast_client.buffer == slow_client.buffer
    assert len(fast.registry.pairs) == len(slow.registry.pairs)
    if legs:
        assert _state(fast) == _state(slow)
        assert _upstream_request(fast) == _upstream_request(slow)
    if opened:
        assert fast_client.head.startswith(b"HTTP/1.1 101 ")
    for relay in (fast, slow):
        relay.stop()


# (name, request line, header lines, [route:chat] keys, whether the relay takes it from its head alone
#  (None: the channel makes a request of it without offering it))
HEADS = [
    ("plain", "GET /v1/chat/ws HTTP/1.1", [], "", True),
    ("dot segments", "GET /v1/chat/x/../ws?room=a HTTP/1.1", [], "", True),
    ("escaped unreserved", "GET /v1/%63hat/ws HTTP/1.1", [], "", True),
    ("absolute form", "GET http://gateway.test/v1/chat/ws HTTP/1.1", [], "", True),
    ("names in any case, repeated", "GET /v1/chat/ws HTTP/1.1", ["x-thing: a", "X-THING: b", "www-authenticate: c"], "", True),
    ("cookie", "GET /v1/chat/ws HTTP/1.1", ["Cookie: a=b"], "", True),
    ("allowed origin", "GET /v1/chat/ws HTTP/1.1", ["Origin: https://app.example"], "allowed_origins = https://app.example", True),
    ("HTTP/1.0", "GET /v1/chat/ws HTTP/1.0", [], "", True),
    ("an expect", "GET /v1/chat/ws HTTP/1.1", ["Expect: 100-continue"], "", None),  # not even offered
    ("no route", "GET /elsewhere HTTP/1.1", [], "", False),
    ("above the root", "GET /v1/../../ws HTTP/1.1", [], "", False),
    ("escaped slash", "GET /v1/chat%2Fws HTTP/1.1", [], "", False),
    ("a page of the gateway's", "GET /healthz HTTP/1.1", [], "", False),
    ("two hosts", "GET /v1/chat/ws HTTP/1.1", ["Host: other.test"], "", False),
    ("route without websockets", "GET /v1/chat/ws HTTP/1.1", [], "websocket = false", False),
    ("origin not allowed", "GET /v1/chat/ws HTTP/1.1", ["Origin: https://evil.example"], "allowed_origins = https://app.example", False),
    ("two origins", "GET /v1/chat/ws HTTP/1.1", ["Origin: https://a.example", "Origin: https://b.example"], "", False),
    ("value not UTF-8", "GET /v1/chat/ws HTTP/1.1", ["X-Name: caf\xe9"], "", False),
    ("not an upgrade to websocket", "GET /v1/chat/ws HTTP/1.1", ["Upgrade: h2c"], "", False),
    ("no route's limit left", "GET /v1/chat/ws HTTP/1.1", [], "max_websockets = 1", False),
]


def _head_exchange(line: str, extra: list[str], route: str, fill: bool) -> tuple[MemoryRelay, RawClient]:
    relay = MemoryRelay(route_config(9, extra_route=route), RecordingUpstream(allowNullOrigin=True))
    if fill:  # one WebSocket open already
        relay.client("/v1/chat/ws")
    client = RawClient()
    server = relay.site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
    relay.net.join(server, client)
    headers = dict(BASE)
    if any(header.startswith("Upgrade:") for header in extra):
        del headers["Upgrade"]  # replaced
    lines = [line, *(f"{k}: {v}" for k, v in headers.items()), *extra]
    client.send(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
    relay.flush()
    return relay, client


@pytest.mark.parametrize(("line", "extra", "route", "taken"), [h[1:] for h in HEADS], ids=[h[0] for h in HEADS])
def test_an_upgrade_taken_from_its_head_is_served_as_its_request_would_be(monkeypatch, line, extra, route, taken):
    """
    The relay takes an upgrade from its head alone only when the request made
    of it would be handed over too, and then answers it the same; any other
    (a refusal, a page of the gateway's, an Expect) is answered as a request.
    """
    from twisted_gateway.resource import GatewayResource

    took: list[bool] = []
    take = GatewayResource.take_upgrade

    def recording(self, *args):
        took.append(take(self, *args))
        return took[-1]

    fill = "max_websockets" in route
    monkeypatch.setattr(GatewayResource, "take_upgrade", recording)
    fast, fast_client = _head_exchange(line, extra, route, fill)
    assert took[fill:] == ([] if taken is None else [taken])
    monkeypatch.setattr(GatewayResource, "take_upgrade", lambda self, *args: False)
    slow, slow_client = _head_exchange(line, extra, route, fill)
    # (with a WebSocket open already, its legs differ: each has a key of its own)
    _assert_served_alike(fast, fast_client, slow, slow_client, opened=bool(taken), legs=not fill)


@pytest.mark.parametrize("byte", range(256))
def test_what_llhttp_takes_autobahns_parser_takes_too(byte):
    """
    A head llhttp parsed is answered without Autobahn's checks of the start
    line, the names and the values (``UpgradeHead.checked``): whatever byte a
    target, a name or a value holds, llhttp either refuses it or reports what
    Autobahn's parser would take.
    """
    from httptools import HttpParserError, HttpRequestParser

    from twisted_gateway._compat import FIELD_NAME, FIELD_VALUE_INVALID, START_LINE_INVALID

    c = bytes([byte])
    for head in (
        b"GET /a" + c + b"b HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /a?q=" + c + b"b HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nX" + c + b"Y: v\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nX: a" + c + b"b\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nX: " + c + b"\r\n\r\n",
    ):
        seen: dict[str, list[bytes]] = {"url": [], "names": [], "values": []}

        class Parsed:
            def on_url(self, url: bytes) -> None:
                seen["url"].append(url)

            def on_header(self, name: bytes, value: bytes) -> None:
                seen["names"].append(name)
                seen["values"].append(value.rstrip(b" \t"))  # as the channel keeps it

        try:
            HttpRequestParser(Parsed()).feed_data(head)
        except HttpParserError:
            continue  # refused
        line = "GET " + b"".join(seen["url"]).decode("latin-1") + " HTTP/1.1"
        assert not START_LINE_INVALID.search(line), head
        for name in seen["names"]:
            assert FIELD_NAME.fullmatch(name.decode("latin-1")), head
        for value in seen["values"]:
            assert not FIELD_VALUE_INVALID.search(value.decode("latin-1")), head
