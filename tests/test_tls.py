"""TLS rules as tables: ``ssl:`` descriptions, ALPN answers, TLS config keys and their errors."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from cryptography.x509.oid import NameOID
from OpenSSL import SSL
from service_identity import VerificationError
from twisted.internet.endpoints import TCP4ServerEndpoint, _parse, serverFromString
from twisted.internet.protocol import Factory
from twisted.internet.testing import MemoryReactor
from twisted.logger import capturedLogs
from twisted.protocols.policies import WrappingFactory
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.web.client import ResponseNeverReceived

from tests.certs import Authority
from twisted_gateway.config import (
    ConfigError,
    RouteSettings,
    check_server_endpoint,
    load_settings,
    parse_config,
)
from twisted_gateway.tls import (
    HTTP_1_1,
    TLSKeyError,
    TLSListener,
    UpstreamTLS,
    UpstreamTLSPolicy,
    check_shared_upstreams,
    describe_tls_failure,
    listen_backlog,
    listener_tls,
    parse_tls_listener,
    select_http_1_1,
    server_endpoint,
    split_description,
    system_listen_backlog,
    warn_unverified,
)


class Files:
    """PEM files of a small PKI, and a few broken ones."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        ca = Authority("test-ca")
        self.ca = ca.write(directory)
        self.server_cert, self.server_key = ca.issue("server", ips=("127.0.0.1",)).write(directory)
        self.client_cert, self.client_key = ca.issue("client", client=True).write(directory)
        _, self.other_key = ca.issue("other", client=True).write(directory)
        self.client_both = directory / "client-both.pem"
        self.client_both.write_bytes(self.client_cert.read_bytes() + self.client_key.read_bytes())
        self.garbage = directory / "garbage.pem"
        self.garbage.write_text("not a certificate\n")
        self.missing = directory / "missing.pem"


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Files:
    return Files(tmp_path_factory.mktemp("tls"))


# -- ssl: descriptions ---------------------------------------------------------

DESCRIPTIONS = [
    "ssl:8443",
    "ssl:8443:privateKey=key.pem:certKey=cert.pem",
    "ssl:port=0:interface=127.0.0.1:backlog=5",
    r"ssl:443:privateKey=C\:/keys/key.pem",
    "ssl:443:certKey=a=b.pem",
    "tcp:0:interface=\\:\\:1",
    "unix:/tmp/x.sock:mode=660",
]


@pytest.mark.parametrize("description", DESCRIPTIONS)
def test_descriptions_split_as_twisted_splits_them(description):
    """Colons, the first ``=`` and backslash escapes mean what they mean to ``serverFromString``."""
    assert split_description(description) == _parse(description)


@pytest.mark.parametrize(
    "description, listener",
    [
        ("ssl:8443", TLSListener(port=8443)),
        (
            "ssl:8443:privateKey=key.pem:certKey=cert.pem",
            TLSListener(port=8443, private_key="key.pem", cert_key="cert.pem"),
        ),
        (
            "ssl:port=0:interface=127.0.0.1:backlog=5:extraCertChain=chain.pem",
            TLSListener(port=0, interface="127.0.0.1", backlog=5, extra_cert_chain="chain.pem"),
        ),
        ("tcp:8080", None),
        ("unix:/tmp/ssl.sock", None),
    ],
)
def test_ssl_descriptions_name_a_tls_listener(description, listener):
    assert parse_tls_listener(description) == listener


@pytest.mark.parametrize(
    "description, reason",
    [
        ("ssl:", "'' is not a number"),
        ("ssl:https", "'https' is not a number"),
        ("ssl:privateKey=k.pem", "no port"),
        ("ssl:443:certfile=c.pem", "unknown argument 'certfile'"),
        ("ssl:443:444", "unexpected argument '444'"),
        ("ssl:443:port=444", "the port is given twice"),
        ("ssl:70000", "out of range"),
        ("ssl:443:backlog=many", "backlog 'many' is not a number"),
    ],
)
def test_malformed_ssl_descriptions_say_what_is_wrong(description, reason):
    with pytest.raises(ValueError, match=reason):
        parse_tls_listener(description)


@pytest.mark.parametrize(
    "offered, chosen",
    [
        ([b"h2", b"http/1.1"], HTTP_1_1),
        ([b"http/1.1", b"h2"], HTTP_1_1),
        ([b"http/1.1"], HTTP_1_1),
        ([b"h2"], SSL.NO_OVERLAPPING_PROTOCOLS),
        ([b"spdy/3", b"h2c"], SSL.NO_OVERLAPPING_PROTOCOLS),
    ],
)
def test_a_listener_agrees_to_http_1_1_only(offered, chosen):
    """``h2`` is never chosen; a client without http/1.1 gets no ALPN answer at all."""
    assert select_http_1_1(None, offered) is chosen


def _served_chain(server: SSL.Context) -> list[str]:
    """The certificates a server with this context sends, by common name (a handshake in memory)."""
    client_context = SSL.Context(SSL.TLS_METHOD)
    client_context.set_verify(SSL.VERIFY_NONE, lambda *_: True)
    client, served = SSL.Connection(client_context, None), SSL.Connection(server, None)
    client.set_connect_state()
    served.set_accept_state()
    for _ in range(10):
        for one, other in ((client, served), (served, client)):
            try:
                one.do_handshake()
            except SSL.WantReadError:
                pass
            while True:
                try:
                    other.bio_write(one.bio_read(65536))
                except SSL.WantReadError:
                    break
    chain = client.get_peer_cert_chain(as_cryptography=True) or []
    return [c.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value for c in chain]


def test_a_cert_key_file_holding_the_chain_serves_it_where_twisteds_ssl_parser_drops_it(files, tmp_path):
    """
    Why ``ssl:`` listeners are built here and not by ``serverFromString``: a
    ``fullchain.pem`` given as ``certKey`` sends its intermediates (Twisted
    keeps only the leaf, and clients that lack the CA then fail to verify).
    """
    fullchain = tmp_path / "fullchain.pem"
    fullchain.write_bytes(files.server_cert.read_bytes() + files.ca.read_bytes())
    description = f"ssl:0:privateKey={files.server_key}:certKey={fullchain}"
    ours = listener_tls(parse_tls_listener(description)).getContext()
    assert _served_chain(ours) == ["server", "test-ca"]
    reactor = MemoryReactor()
    serverFromString(reactor, description).listen(Factory())
    twisteds = reactor.sslServers[0][2].getContext()
    assert _served_chain(twisteds) == ["server"]


def test_ssl_listeners_read_their_files_when_built_and_listen_with_tls_on_tcp(files):
    reactor = MemoryReactor()
    endpoint = server_endpoint(
        reactor, f"ssl:0:interface=127.0.0.1:privateKey={files.server_key}:certKey={files.server_cert}"
    )
    endpoint.listen(Factory())
    ((port, factory, _, interface),) = reactor.tcpServers
    assert (port, interface) == (0, "127.0.0.1")
    assert isinstance(factory, TLSMemoryBIOFactory)
    assert isinstance(server_endpoint(MemoryReactor(), "tcp:0"), TCP4ServerEndpoint)


def test_a_wrapper_of_the_listening_factory_sits_below_tls(files):
    """The gateway's connection cap counts connections under TLS, not inside it."""
    reactor = MemoryReactor()
    wrapped = []
    endpoint = server_endpoint(
        reactor,
        f"ssl:0:privateKey={files.server_key}:certKey={files.server_cert}",
        wrap=lambda factory: wrapped.append(factory) or WrappingFactory(factory),
    )
    site = Factory()
    endpoint.listen(site)
    ((_, factory, _, _),) = reactor.tcpServers
    assert isinstance(factory, WrappingFactory)
    (tls,) = wrapped
    assert isinstance(tls, TLSMemoryBIOFactory) and tls.wrappedFactory is site


@pytest.mark.parametrize(
    "description, backlog",
    [
        ("tcp:8080", 4096),
        ("tcp:8080:interface=127.0.0.1", 4096),
        ("tcp:8080:backlog=128", 128),
        ("tcp6:8080", 4096),
        ("unix:/run/gw.sock", 4096),
        ("unix:/run/gw.sock:backlog=10", 10),
        ("ssl:8443:privateKey=k.pem", 4096),
        ("ssl:8443:backlog=64:privateKey=k.pem", 64),
        ("systemd:domain=INET:index=0", None),
    ],
)
def test_a_listener_without_backlog_gets_the_systems_maximum(description, backlog):
    assert listen_backlog(description, 4096) == backlog


@pytest.mark.parametrize(
    "description, backlog",
    [("tcp:0:interface=127.0.0.1", 4096), ("tcp:0:interface=127.0.0.1:backlog=77", 77)],
)
def test_the_listen_backlog_reaches_the_listening_socket(description, backlog):
    reactor = MemoryReactor()
    server_endpoint(reactor, description, 4096).listen(Factory())
    ((_, _, given, _),) = reactor.tcpServers
    assert given == backlog


def test_the_ssl_listen_backlog_reaches_the_listening_socket(files):
    reactor = MemoryReactor()
    server_endpoint(reactor, f"ssl:0:privateKey={files.server_key}:certKey={files.server_cert}", 999).listen(
        Factory()
    )
    ((_, _, given, _),) = reactor.tcpServers
    assert given == 999


@pytest.mark.parametrize(
    "content, backlog", [("4096\n", 4096), ("65535", 65535), ("garbage", socket.SOMAXCONN), (None, socket.SOMAXCONN)]
)
def test_the_systems_maximum_backlog_is_read_from_somaxconn(tmp_path, content, backlog):
    path = tmp_path / "somaxconn"
    if content is not None:
        path.write_text(content)
    assert system_listen_backlog(str(path)) == backlog


@pytest.mark.parametrize(
    "arguments, fragment",
    [
        ("privateKey={missing}:certKey={server_cert}", "privateKey {missing}: No such file or directory"),
        ("privateKey={server_key}:certKey={missing}", "certKey {missing}: No such file or directory"),
        ("privateKey={missing}", "privateKey {missing}: No such file or directory"),
        ("privateKey={server_key}:certKey={garbage}", "certKey {garbage}: holds no PEM certificate"),
        ("privateKey={garbage}:certKey={server_cert}", "privateKey {garbage}: holds no PEM private key"),
        ("privateKey={other_key}:certKey={server_cert}", "privateKey {other_key}: does not match"),
        ("privateKey={dir}:certKey={server_cert}", "privateKey {dir}: Is a directory"),
        (
            "privateKey={server_key}:certKey={server_cert}:extraCertChain={missing}",
            "extraCertChain {missing}: No such file",
        ),
    ],
)
def test_a_bad_listener_file_is_named_in_the_config_error(files, arguments, fragment):
    """The one-line start-up error names the argument, the path and the reason."""
    paths = {name: value for name, value in vars(files).items()}
    description = "ssl:0:" + arguments.format(**paths)
    with pytest.raises(ValueError) as caught:
        check_server_endpoint(description)
    assert fragment.format(**paths) in str(caught.value)
    assert "\n" not in str(caught.value)


# -- route keys ------------------------------------------------------------------


def _route(extra: str) -> str:
    return f"[route:api]\nprefix = /api\nupstream = https://127.0.0.1:9443\n{extra}\n"


def test_route_tls_keys_are_read_into_settings(files):
    settings = parse_config(
        _route(f"ca_file = {files.ca}\nclient_cert = {files.client_cert}\nclient_key = {files.client_key}")
    )
    route = settings.routes[0]
    assert (route.ca_file, route.client_cert, route.client_key, route.tls_verify) == (
        str(files.ca), str(files.client_cert), str(files.client_key), True,
    )
    defaults = parse_config(_route("")).routes[0]
    assert (defaults.ca_file, defaults.client_cert, defaults.client_key, defaults.tls_verify) == (
        None, None, None, True,
    )


def test_a_client_cert_file_may_hold_its_key(files):
    assert parse_config(_route(f"client_cert = {files.client_both}")).routes[0].client_key is None


@pytest.mark.parametrize(
    "extra, key, fragment",
    [
        ("ca_file = {missing}", "ca_file", "{missing}: No such file or directory"),
        ("ca_file = {garbage}", "ca_file", "{garbage}: holds no PEM certificate"),
        ("ca_file = {dir}", "ca_file", "Is a directory"),
        ("client_cert = {missing}", "client_cert", "{missing}: No such file or directory"),
        ("client_cert = {client_cert}\nclient_key = {missing}", "client_key", "No such file"),
        ("client_cert = {client_cert}\nclient_key = {garbage}", "client_key", "holds no PEM private key"),
        ("client_key = {client_key}", "client_key", "needs client_cert"),
        ("client_cert = {client_cert}", "client_cert", "holds no PEM private key; set client_key"),
        ("client_cert = {client_cert}\nclient_key = {other_key}", "client_key", "does not match"),
        ("tls_verify = perhaps", "tls_verify", "expected true or false"),
    ],
)
def test_a_bad_tls_key_is_one_config_error_naming_it(files, extra, key, fragment):
    paths = {name: value for name, value in vars(files).items()}
    with pytest.raises(ConfigError) as caught:
        load_settings(parse_config(_route(extra.format(**paths)), source="gw.cfg"))
    assert (caught.value.section, caught.value.key) == ("route:api", key)
    assert fragment.format(**paths) in caught.value.reason
    assert "\n" not in str(caught.value)


def test_routes_sharing_an_https_upstream_must_agree_on_tls(files):
    """Pooled HTTP connections are per host and port: one client certificate per upstream."""
    text = _route("") + "[route:admin]\nprefix = /admin\nupstream = https://127.0.0.1:9443/admin\n"
    text += f"client_cert = {files.client_both}\n"
    with pytest.raises(ConfigError) as caught:
        parse_config(text)
    assert (caught.value.section, caught.value.key) == ("route:admin", "client_cert")
    assert "[route:api]" in caught.value.reason
    # Same keys, or another port, or plain http: fine.
    parse_config(text.replace("9443/admin", "9444/admin"))
    parse_config(_route("") + "[route:admin]\nprefix = /admin\nupstream = https://127.0.0.1:9443\n")
    parse_config(
        "[route:a]\nprefix = /a\nupstream = http://h:80\n[route:b]\nprefix = /b\nupstream = http://h:80\n"
        "tls_verify = false\n"
    )


def test_check_shared_upstreams_compares_host_names_case_insensitively():
    first = RouteSettings("a", "/a", ("https://Upstream.test",))
    second = RouteSettings("b", "/b", ("https://upstream.test:443",), tls_verify=False)
    with pytest.raises(TLSKeyError) as caught:
        check_shared_upstreams([first, second])
    assert (caught.value.route, caught.value.key) == ("b", "tls_verify")


# -- upstream TLS ----------------------------------------------------------------


def test_the_policy_gives_each_upstream_its_routes_tls(files):
    private = RouteSettings("private", "/p", ("https://10.0.0.1:8443",), ca_file=str(files.ca))
    public = RouteSettings("public", "/q", ("https://example.test",))
    insecure = RouteSettings("dev", "/d", ("https://dev.test:9443",), tls_verify=False)
    plain = RouteSettings("plain", "/r", ("http://10.0.0.1:8443",), tls_verify=False)
    policy = UpstreamTLSPolicy.for_routes([private, public, insecure, plain])
    assert policy.tls_for("10.0.0.1", 8443).trust_root is not None
    assert policy.tls_for("example.test", 443).trust_root is None
    assert policy.tls_for("dev.test", 9443).verify is False
    # Only https upstreams are named; any other gets the one default (system trust, verified).
    default = policy.tls_for("unknown.test", 443)
    assert (default.trust_root, default.verify) == (None, True)
    named = {policy.tls_for(*n) for n in [("10.0.0.1", 8443), ("example.test", 443), ("dev.test", 9443)]}
    assert default not in named and len(named) == 3
    # One creator per host name, built once.
    creator = policy.creatorForNetloc(b"10.0.0.1", 8443)
    assert policy.creatorForNetloc(b"10.0.0.1", 8443) is creator
    assert policy.creatorForNetloc(b"unknown.test", 443) is not creator


def test_a_client_certificate_is_loaded_for_mtls(files):
    route = RouteSettings(
        "m", "/m", ("https://h",), client_cert=str(files.client_cert), client_key=str(files.client_key)
    )
    tls = UpstreamTLS.for_route(route)
    assert tls.client_certificate is not None
    subject = tls.client_certificate.certificate.subject
    assert subject.rfc4514_string() == "CN=client"


def test_turning_verification_off_is_a_start_up_warning():
    routes = [
        RouteSettings("dev", "/d", ("https://dev.test",), tls_verify=False),
        RouteSettings("prod", "/p", ("https://prod.test",)),
    ]
    with capturedLogs() as events:
        warn_unverified(routes)
    warnings = [e for e in events if e.get("event") == "tls_verify_off"]
    assert [e["route"] for e in warnings] == ["dev"]
    assert warnings[0]["log_level"].name == "warn"


@pytest.mark.parametrize(
    "error, described",
    [
        (SSL.Error([("SSL routines", "", "certificate verify failed")]), "certificate verify failed"),
        (
            ResponseNeverReceived([Failure(SSL.Error([("SSL routines", "", "tlsv13 alert certificate required")]))]),
            "tlsv13 alert certificate required",
        ),
        (VerificationError(errors=[]), "the certificate is not valid for the upstream's host name"),
        (SSL.Error(), "TLS handshake failed"),
        (ConnectionRefusedError(), None),
        (ResponseNeverReceived([Failure(ConnectionResetError())]), None),
    ],
)
def test_tls_failures_are_described_in_a_few_words(error, described):
    assert describe_tls_failure(error) == described
