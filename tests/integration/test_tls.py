"""
TLS end to end on loopback, real handshakes all the way: clients speak TLS to
the gateway's ``ssl:`` listener (a whole ``GatewayService``, as twistd runs it),
the gateway speaks TLS to https/wss upstreams, checking their certificates
against the system store or the route's ``ca_file`` and showing its own client
certificate when the route has one. Certificates come from :mod:`tests.certs`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from autobahn.twisted.websocket import WebSocketClientFactory
from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.internet.endpoints import SSL4ServerEndpoint, TCP4ClientEndpoint, wrapClientTLS
from twisted.internet.interfaces import ISSLTransport
from twisted.internet.protocol import Factory
from twisted.internet.ssl import optionsForClientTLS
from twisted.logger import capturedLogs
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool
from twisted.web.resource import Resource
from twisted.web.server import Site

from tests.certs import Authority, Issued
from tests.support import ClientProtocol, RawClient, Upstream, http_error, later, settle, start_service  # noqa: F401 (later: a fixture)
from twisted_gateway.config import parse_config
from twisted_gateway.service import GatewayService
from twisted_gateway.tls import server_endpoint

LOCALHOST = "127.0.0.1"


@dataclass
class PKI:
    """A test CA and the certificates of every party, written to ``dir``."""

    dir: Path
    ca: Authority
    gateway: Issued  # the gateway's listener
    upstream: Issued  # an upstream, issued by ca for 127.0.0.1
    wrong_host: Issued  # issued by ca for another name
    stranger: Issued  # for 127.0.0.1, issued by a CA nobody trusts
    client: Issued  # the gateway's client certificate for mTLS

    @property
    def ca_file(self) -> Path:
        return self.dir / f"{self.ca.name}.pem"

    def files(self, issued: Issued) -> tuple[Path, Path]:
        return self.dir / f"{issued.name}.crt", self.dir / f"{issued.name}.key"

    def listen_description(self) -> str:
        cert, key = self.files(self.gateway)
        return f"ssl:0:interface={LOCALHOST}:privateKey={key}:certKey={cert}"


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> PKI:
    directory = tmp_path_factory.mktemp("pki")
    ca = Authority("test-ca")
    made = PKI(
        dir=directory,
        ca=ca,
        gateway=ca.issue("gateway", dns=("localhost",), ips=(LOCALHOST,)),
        upstream=ca.issue("upstream", ips=(LOCALHOST,)),
        wrong_host=ca.issue("wrong-host", dns=("elsewhere.test",)),
        stranger=Authority("stranger-ca").issue("stranger", ips=(LOCALHOST,)),
        client=ca.issue("gateway-client", client=True),
    )
    ca.write(directory)
    for issued in (made.gateway, made.upstream, made.wrong_host, made.stranger, made.client):
        issued.write(directory)
    return made


# -- peers ---------------------------------------------------------------------


class EchoRequest(Resource):
    """An HTTPS upstream answering with what it saw: path, headers, TLS client certificate."""

    isLeaf = True

    def render(self, request) -> bytes:
        transport = request.channel.transport
        peer_cert = transport.getPeerCertificate() if hasattr(transport, "getPeerCertificate") else None
        body = {
            "path": request.uri.decode(),
            "secure": request.isSecure(),
            "x-forwarded-proto": request.getHeader(b"x-forwarded-proto").decode(),
            "client": peer_cert.to_cryptography().subject.rfc4514_string() if peer_cert else None,
        }
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(body).encode()


async def tls_upstream(later, issued: Issued, kind: str, *, client_ca: Authority | None = None) -> Any:
    """An upstream on 127.0.0.1 over TLS: an echoing WebSocket one (``ws``) or an HTTPS ``Site``."""
    factory: Any = Upstream() if kind == "ws" else Site(EchoRequest())
    factory.noisy = False
    endpoint = SSL4ServerEndpoint(reactor, 0, issued.server_options(client_ca=client_ca), interface=LOCALHOST)
    port = await endpoint.listen(factory)
    later(port.stopListening)
    factory.port_number = port.getHost().port
    return factory


async def tls_gateway(later, pki: PKI, upstream_port: int, route: str = "") -> int:
    """A GatewayService listening on ``ssl:0`` for one route to ``https://127.0.0.1:PORT``."""
    return (await tls_service(later, pki, upstream_port, route))[1]


async def tls_service(
    later, pki: PKI, upstream_port: int, route: str = "", gateway: str = ""
) -> tuple[GatewayService, int]:
    """:func:`tls_gateway`'s service, with ``gateway`` added to its [gateway] section, and its port."""
    settings = parse_config(
        f"""
[gateway]
listen = {pki.listen_description()}
{gateway}
ws_open_timeout = 5
connect_timeout = 5
request_timeout = 5

[route:chat]
prefix = /v1/chat
upstream = https://{LOCALHOST}:{upstream_port}
{route}
"""
    )
    return await start_service(later, settings)


def _client_tls(ca: Authority, protocols: list[bytes] | None = None):
    return optionsForClientTLS(LOCALHOST, trustRoot=ca.trust_root, acceptableProtocols=protocols)


async def wss_attempt(later, ca: Authority, port: int, path: str = "/v1/chat/ws") -> ClientProtocol:
    """A WSS client's connection to the gateway; await ``opened`` (or ``closed``) on it."""
    factory = WebSocketClientFactory(f"wss://{LOCALHOST}:{port}{path}", useragent=None)
    factory.protocol = ClientProtocol
    factory.noisy = False
    endpoint = wrapClientTLS(_client_tls(ca), TCP4ClientEndpoint(reactor, LOCALHOST, port))
    proto = await endpoint.connect(factory)

    async def close() -> None:
        if not proto.closed.called:
            proto.sendClose(1000)
        await proto.closed

    later(close)
    return proto


def https_client(later, ca: Authority) -> HTTPClient:
    pool = HTTPConnectionPool(reactor, persistent=False)
    later(pool.closeCachedConnections)
    return HTTPClient(Agent(reactor, BrowserLikePolicyForHTTPS(trustRoot=ca.trust_root), pool=pool))


async def relay_or_status(later, pki: PKI, kind: str, gateway_port: int) -> Any:
    """Through the gateway: the echoed message (ws) or JSON body (http), or the refusal's status."""
    if kind == "ws":
        client = await wss_attempt(later, pki.ca, gateway_port)
        try:
            await client.opened
        except ConnectionError:
            return int(client.http_status_line.split()[1])
        client.sendMessage(b"over tls twice")
        return (await client.next_message())[0]
    response = await https_client(later, pki.ca).get(f"https://{LOCALHOST}:{gateway_port}/v1/chat/who")
    if response.code != 200:
        await response.content()
        return response.code
    return await response.json()


# -- the relay and the forwarder over TLS ---------------------------------------


async def test_a_wss_client_reaches_a_wss_upstream_through_the_tls_listener(pki, later):
    """Client -TLS-> gateway -TLS-> upstream: messages relayed both ways, X-Forwarded-Proto https."""
    upstream = await tls_upstream(later, pki.upstream, "ws")
    port = await tls_gateway(later, pki, upstream.port_number, f"ca_file = {pki.ca_file}")
    client = await wss_attempt(later, pki.ca, port, "/v1/chat/ws?room=tls")
    await client.opened
    for payload, binary in [(b"hello", False), (b"\x00\x01" * 40_000, True)]:
        client.sendMessage(payload, isBinary=binary)
        assert await client.next_message() == (payload, binary)
    handshake = upstream.handshakes[0]
    assert handshake.path == "/v1/chat/ws"
    assert handshake.headers["x-forwarded-proto"] == "https"
    assert ISSLTransport.providedBy(upstream.connected[0].transport)
    client.sendClose(1000)
    assert (await client.closed)[0] == 1000


async def test_https_reaches_an_https_upstream_through_the_tls_listener(pki, later):
    """The upstream sees a TLS request with X-Forwarded-Proto https; the client gets its answer."""
    upstream = await tls_upstream(later, pki.upstream, "http")
    port = await tls_gateway(later, pki, upstream.port_number, f"ca_file = {pki.ca_file}")
    client = https_client(later, pki.ca)
    response = await client.get(f"https://{LOCALHOST}:{port}/v1/chat/rooms?x=1")
    assert response.code == 200
    assert await response.json() == {
        "path": "/v1/chat/rooms?x=1", "secure": True, "x-forwarded-proto": "https", "client": None,
    }


@pytest.mark.parametrize("kind", ["ws", "http"])
@pytest.mark.parametrize(
    "certificate, use_ca_file, works",
    [
        ("upstream", False, False),  # the test CA is not in the system store
        ("upstream", True, True),
        ("wrong_host", True, False),  # issued for elsewhere.test, reached as 127.0.0.1
        ("stranger", True, False),  # issued by a CA that ca_file does not name
    ],
    ids=["system-store-refuses-test-ca", "ca-file-trusts-it", "wrong-host-name", "untrusted-ca"],
)
async def test_upstream_certificates_are_verified(pki, later, kind, certificate, use_ca_file, works):
    """An upstream certificate that does not check out is a 502; ca_file makes a private CA work."""
    upstream = await tls_upstream(later, getattr(pki, certificate), kind)
    route = f"ca_file = {pki.ca_file}" if use_ca_file else ""
    port = await tls_gateway(later, pki, upstream.port_number, route)
    outcome = await relay_or_status(later, pki, kind, port)
    if works:
        assert outcome == (b"over tls twice" if kind == "ws" else {
            "path": "/v1/chat/who", "secure": True, "x-forwarded-proto": "https", "client": None,
        })
    else:
        assert outcome == 502


@pytest.mark.parametrize("kind", ["ws", "http"])
async def test_an_upstream_demanding_a_client_certificate_gets_the_routes(pki, later, kind):
    """mTLS: without client_cert the upstream refuses the handshake (502); with it, it works."""
    upstream = await tls_upstream(later, pki.upstream, kind, client_ca=pki.ca)
    without = await tls_gateway(later, pki, upstream.port_number, f"ca_file = {pki.ca_file}")
    assert await relay_or_status(later, pki, kind, without) == 502

    cert, key = pki.files(pki.client)
    route = f"ca_file = {pki.ca_file}\nclient_cert = {cert}\nclient_key = {key}"
    with_cert = await tls_gateway(later, pki, upstream.port_number, route)
    outcome = await relay_or_status(later, pki, kind, with_cert)
    if kind == "ws":
        assert outcome == b"over tls twice"
        peer = upstream.connected[-1].transport.getPeerCertificate()
        assert peer.to_cryptography().subject.rfc4514_string() == "CN=gateway-client"
    else:
        assert outcome["client"] == "CN=gateway-client"


@pytest.mark.parametrize("kind", ["ws", "http"])
@pytest.mark.parametrize(
    "certificate, demand_client_cert, reason",
    [
        ("wrong_host", False, "the certificate is not valid for the upstream's host name"),
        ("stranger", False, "certificate verify failed"),
        ("upstream", True, "certificate required"),
    ],
    ids=["wrong-host-name", "untrusted-ca", "client-cert-missing"],
)
async def test_a_502_for_a_tls_failure_says_why(pki, later, kind, certificate, demand_client_cert, reason):
    """The client's JSON detail names the TLS problem, so an operator sees it is not the app."""
    client_ca = pki.ca if demand_client_cert else None
    upstream = await tls_upstream(later, getattr(pki, certificate), kind, client_ca=client_ca)
    port = await tls_gateway(later, pki, upstream.port_number, f"ca_file = {pki.ca_file}")
    endpoint = wrapClientTLS(_client_tls(pki.ca), TCP4ClientEndpoint(reactor, LOCALHOST, port))
    client = await endpoint.connect(Factory.forProtocol(RawClient))
    later(lambda: client.lost)
    upgrade = b"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
    upgrade += b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    client.transport.write(
        b"GET /v1/chat/ws HTTP/1.1\r\nHost: gateway\r\n"
        + (upgrade if kind == "ws" else b"Connection: close\r\n")
        + b"\r\n"
    )
    status, body = http_error(await client.lost)
    assert status == 502
    assert "TLS" in body["detail"] and reason in body["detail"], body


async def test_tls_verify_false_reaches_any_upstream_and_warns(pki, later):
    """For development only: no certificate checks, and a warning when the gateway starts."""
    upstream = await tls_upstream(later, pki.stranger, "ws")
    with capturedLogs() as events:
        port = await tls_gateway(later, pki, upstream.port_number, "tls_verify = false")
    assert [e["route"] for e in events if e.get("event") == "tls_verify_off"] == ["chat"]
    assert await relay_or_status(later, pki, "ws", port) == b"over tls twice"


# -- ALPN on the listener ---------------------------------------------------------


class Hello(Resource):
    isLeaf = True

    def render(self, request) -> bytes:
        return b"hello"


class H2Site(Site):
    """A site that would take h2 if the listener let it (as ``Site`` does with h2 installed)."""

    def acceptableProtocols(self) -> list[bytes]:
        return [b"h2", b"http/1.1"]


async def _negotiated(later, pki: PKI, port: int, offered: list[bytes]) -> tuple[Any, bytes]:
    endpoint = wrapClientTLS(_client_tls(pki.ca, offered), TCP4ClientEndpoint(reactor, LOCALHOST, port))
    client = await endpoint.connect(Factory.forProtocol(RawClient))
    later(lambda: client.lost)
    client.transport.write(b"GET /healthz HTTP/1.1\r\nHost: gateway\r\nConnection: close\r\n\r\n")
    answer = await client.lost
    return client.transport.negotiatedProtocol, answer


@pytest.mark.parametrize(
    "offered, negotiated",
    [([b"h2", b"http/1.1"], b"http/1.1"), ([b"http/1.1"], b"http/1.1"), ([b"h2"], None)],
)
async def test_the_tls_listener_negotiates_http_1_1_only(pki, later, offered, negotiated):
    """A client offering h2 first still gets http/1.1 (Autobahn's hand-over needs HTTP/1.1)."""
    port = await tls_gateway(later, pki, 9)
    protocol, answer = await _negotiated(later, pki, port, offered)
    assert protocol == negotiated
    assert answer.startswith(b"HTTP/1.1 200 ")


async def test_alpn_ignores_a_site_that_offers_h2(pki, later):
    """Even a factory advertising h2 (twisted.web with the h2 package) is held to http/1.1."""
    port = await server_endpoint(reactor, pki.listen_description()).listen(H2Site(Hello()))
    later(port.stopListening)
    protocol, answer = await _negotiated(later, pki, port.getHost().port, [b"h2", b"http/1.1"])
    assert protocol == b"http/1.1"
    assert answer.startswith(b"HTTP/1.1 200 ")


async def test_a_wss_client_holds_one_counted_connection_until_it_closes(pki, later):
    """The connection cap counts below TLS: a WebSocket hand-over keeps its slot, and frees it on close."""
    upstream = await tls_upstream(later, pki.upstream, "ws")
    service, port = await tls_service(later, pki, upstream.port_number, f"ca_file = {pki.ca_file}")
    door = service.front_door
    client = await wss_attempt(later, pki.ca, port)
    await client.opened
    client.sendMessage(b"counted")
    assert await client.next_message() == (b"counted", False)
    assert door.open == 1
    client.sendClose(1000)
    await client.closed
    await settle(lambda: door.open == 0, "the slot freed")


async def test_past_the_cap_an_https_client_gets_503_overloaded_over_tls(pki, later):
    """A refusal on a TLS listener is a TLS answer, not plain text on a TLS socket."""
    upstream = await tls_upstream(later, pki.upstream, "ws")
    _, port = await tls_service(
        later, pki, upstream.port_number, f"ca_file = {pki.ca_file}", gateway="max_client_connections = 1"
    )
    client = await wss_attempt(later, pki.ca, port)
    await client.opened
    response = await https_client(later, pki.ca).get(f"https://{LOCALHOST}:{port}/healthz")
    assert response.code == 503
    assert (await response.json())["error"] == "overloaded"
    client.sendMessage(b"still here")
    assert await client.next_message() == (b"still here", False)
