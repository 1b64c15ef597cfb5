"""
TLS on both sides of the gateway: ``ssl:`` listeners and https/wss upstreams.

Listeners: ``ssl:`` endpoint descriptions keep Twisted's syntax and arguments
(``ssl:8443:privateKey=key.pem:certKey=cert.pem:interface=...``) but are built
here rather than by ``serverFromString``, for two reasons. The listener must
answer ALPN with ``http/1.1`` only: Autobahn's hand-over needs an HTTP/1.1
channel, and ``Site`` would advertise ``h2`` as soon as the ``h2`` package is
installed. And every file is read at start-up, so a bad path or an unreadable
key is reported with the argument that names it. A ``certKey`` file may carry
the chain after the leaf (``fullchain.pem``), which is sent (Twisted's ``ssl:``
keeps the leaf only). The listener is TLS on a TCP endpoint (what ``listenSSL``
does), so that the gateway's connection cap can sit below TLS. Any listener without ``backlog=`` gets the system's maximum
(``net.core.somaxconn``), not Twisted's 50. Every other endpoint type is built
by ``serverFromString`` and its plugins (``tcp:``, ``unix:``, ``systemd:``...).
Reading the ``ssl:`` arguments and ``backlog=`` needs Twisted's tokenizer, which
is private (``endpoints._parse``): :func:`split_description` is a copy that
tests/test_tls.py holds to it.

Upstreams: each route's ``ca_file`` (else the system trust store),
``client_cert``/``client_key`` (mTLS) and ``tls_verify`` become an
:class:`UpstreamTLS`; :class:`UpstreamTLSPolicy` (a Twisted
``IPolicyForHTTPS``) picks the one for an upstream's host and port, for the
HTTP forwarder and the WebSocket connector alike. HTTP connections to an
upstream are pooled per host and port, so two routes naming the same https
upstream must agree on these keys (:func:`check_shared_upstreams`).
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Protocol, Sequence
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes, PublicKeyTypes
from OpenSSL import SSL, crypto
from service_identity import VerificationError
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.endpoints import TCP4ServerEndpoint, serverFromString
from twisted.internet.interfaces import (
    IOpenSSLClientConnectionCreator,
    IOpenSSLContextFactory,
    IOpenSSLServerConnectionCreator,
    IListeningPort,
    IProtocolFactory,
    IReactorTCP,
    IStreamServerEndpoint,
)
from twisted.internet.ssl import (
    Certificate,
    CertificateOptions,
    DiffieHellmanParameters,
    optionsForClientTLS,
    trustRootFromCertificates,
)
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.filepath import FilePath
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from twisted_gateway.schema import RouteSettings

if TYPE_CHECKING:
    # (for the type checker only: neither library exports these names)
    from OpenSSL.SSL import _NoOverlappingProtocols
    from twisted.internet._sslverify import IOpenSSLTrustRoot

log = Logger()

#: The only application protocol a gateway listener agrees to through ALPN.
HTTP_1_1 = b"http/1.1"


class TLSFileError(ValueError):
    """A certificate, key or CA file that cannot be used: ``ARGUMENT PATH: reason``."""

    def __init__(self, argument: str, path: str, reason: str) -> None:
        super().__init__(f"{argument} {path}: {reason}")
        self.argument, self.path, self.reason = argument, path, reason


class TLSKeyError(ValueError):
    """Route TLS keys that contradict each other; ``key`` (and ``route``) say what to fix."""

    def __init__(self, key: str, reason: str, route: str | None = None) -> None:
        super().__init__(reason)
        self.key, self.route = key, route


# -- files: path in, loaded value out, TLSFileError with a short reason ------


def _read(argument: str, path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise TLSFileError(argument, path, e.strerror or str(e)) from None


def load_certificates(argument: str, path: str) -> list[x509.Certificate]:
    """Every PEM certificate in the file, in order; at least one."""
    data = _read(argument, path)
    try:
        certificates = x509.load_pem_x509_certificates(data)
    except ValueError:
        certificates = []
    if not certificates:
        raise TLSFileError(argument, path, "holds no PEM certificate")
    return certificates


def load_private_key(argument: str, path: str) -> PrivateKeyTypes:
    """The PEM private key in the file (the file may hold certificates as well)."""
    data = _read(argument, path)
    if b"PRIVATE KEY-----" not in data:
        raise TLSFileError(argument, path, "holds no PEM private key")
    try:
        return serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise TLSFileError(argument, path, "the key is encrypted (passphrases are not supported)") from None
    except Exception as e:
        raise TLSFileError(argument, path, f"not a usable private key ({e})") from None


def _twisted_certificate(certificate: x509.Certificate) -> Certificate:
    return Certificate(crypto.X509.from_cryptography(certificate))


def _public_bytes(public_key: PublicKeyTypes) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@dataclass(frozen=True)
class CertifiedKey:
    """A private key, its certificate and the chain that followed it in the file."""

    key: PrivateKeyTypes
    certificate: x509.Certificate
    chain: tuple[x509.Certificate, ...] = ()

    # (CertificateOptions' keyword arguments, as its extraCertificateOptions types them)
    def options(self) -> dict[str, Any]:
        """Keyword arguments for ``CertificateOptions``."""
        return dict(
            privateKey=self.key, certificate=self.certificate, extraCertChain=list(self.chain) or None
        )


def load_key_pair(cert_argument: str, cert_path: str, key_argument: str, key_path: str) -> CertifiedKey:
    """A certificate file (leaf first, then any chain) and the private key that matches the leaf."""
    leaf, *chain = load_certificates(cert_argument, cert_path)
    key = load_private_key(key_argument, key_path)
    if _public_bytes(key.public_key()) != _public_bytes(leaf.public_key()):
        raise TLSFileError(key_argument, key_path, f"does not match the certificate in {cert_path}")
    return CertifiedKey(key, leaf, tuple(chain))


# -- listeners ------------------------------------------------------------------


def split_description(description: str) -> tuple[list[str], dict[str, str]]:
    """
    An endpoint description as Twisted reads it: ``:``-separated arguments,
    ``name=value`` ones (only the first ``=`` counts) by keyword, ``\\`` escaping
    the next character (``C\\:/key.pem``).
    """
    args: list[str] = []
    kwargs: dict[str, str] = {}
    parts: list[str] = []
    current = ""
    separators = ":="
    chars = iter(description)
    for char in chars:
        if char in separators:
            parts.append(current)
            current = ""
            if char == ":":
                _add_argument(parts, args, kwargs)
                parts, separators = [], ":="
            else:
                separators = ":"
        elif char == "\\":
            current += next(chars, "")
        else:
            current += char
    parts.append(current)
    _add_argument(parts, args, kwargs)
    return args, kwargs


def _add_argument(parts: list[str], args: list[str], kwargs: dict[str, str]) -> None:
    if len(parts) == 1:
        args.append(parts[0])
    else:
        kwargs[parts[0]] = parts[1]


@dataclass(frozen=True)
class TLSListener:
    """The arguments of an ``ssl:`` description (Twisted's names, Twisted's defaults)."""

    port: int
    private_key: str = "server.pem"
    cert_key: str | None = None  # None: the private key's file holds the certificate too
    interface: str = ""
    backlog: int = 50
    extra_cert_chain: str | None = None
    dh_parameters: str | None = None
    ssl_method: str | None = None


_LISTENER_ARGUMENTS = {
    "port": "port",
    "privateKey": "private_key",
    "certKey": "cert_key",
    "interface": "interface",
    "backlog": "backlog",
    "extraCertChain": "extra_cert_chain",
    "dhParameters": "dh_parameters",
    "sslmethod": "ssl_method",
}


def parse_tls_listener(description: str) -> TLSListener | None:
    """The ``ssl:`` listener a description names, or None for any other endpoint type."""
    args, kwargs = split_description(description)
    if args[0] != "ssl":
        return None
    positional = args[1:]
    if len(positional) > 1:
        raise ValueError(f"unexpected argument {positional[1]!r}")
    if positional:
        if "port" in kwargs:
            raise ValueError("the port is given twice")
        kwargs["port"] = positional[0]
    fields: dict[str, Any] = {}  # TLSListener's keyword arguments: strings, then port and backlog ints
    for name, value in kwargs.items():
        if name not in _LISTENER_ARGUMENTS:
            raise ValueError(f"unknown argument {name!r}")
        fields[_LISTENER_ARGUMENTS[name]] = value
    if "port" not in fields:
        raise ValueError("no port")
    for name in ("port", "backlog"):
        if name in fields:
            try:
                fields[name] = int(fields[name])
            except ValueError:
                raise ValueError(f"{name} {fields[name]!r} is not a number") from None
    if fields["port"] < 0 or fields["port"] > 65535:
        raise ValueError(f"port {fields['port']} is out of range")
    return TLSListener(**fields)


def select_http_1_1(connection: SSL.Connection, offered: Sequence[bytes]) -> bytes | _NoOverlappingProtocols:
    """The ALPN answer of a gateway listener: ``http/1.1`` if offered, else no ALPN at all."""
    return HTTP_1_1 if HTTP_1_1 in offered else SSL.NO_OVERLAPPING_PROTOCOLS


@implementer(IOpenSSLContextFactory, IOpenSSLServerConnectionCreator)
class HTTP11ServerTLS:
    """
    A listener's TLS: ``options``' context, whose ALPN answer is always
    :func:`select_http_1_1` whatever the listening factory advertises
    (``Site`` offers ``h2`` first when it can).
    """

    def __init__(self, options: CertificateOptions) -> None:
        self._context = options.getContext()
        self._context.set_alpn_select_callback(select_http_1_1)

    def getContext(self) -> SSL.Context:
        return self._context

    def serverConnectionForTLS(self, tlsProtocol: TLSMemoryBIOProtocol) -> SSL.Connection:
        connection = SSL.Connection(self._context, None)
        connection.set_app_data(tlsProtocol)
        return connection


def listener_tls(listener: TLSListener) -> HTTP11ServerTLS:
    """Read the listener's files (errors name the argument) and build its TLS."""
    cert_argument = "certKey" if listener.cert_key is not None else "privateKey"
    cert_path = listener.cert_key if listener.cert_key is not None else listener.private_key
    certified = load_key_pair(cert_argument, cert_path, "privateKey", listener.private_key)
    if listener.extra_cert_chain is not None:
        chain = load_certificates("extraCertChain", listener.extra_cert_chain)
        certified = CertifiedKey(certified.key, certified.certificate, tuple(chain))
    options = certified.options()
    if listener.dh_parameters is not None:
        _read("dhParameters", listener.dh_parameters)
        options["dhParameters"] = DiffieHellmanParameters.fromFile(FilePath(listener.dh_parameters))
    if listener.ssl_method is not None:
        try:
            options["method"] = getattr(SSL, listener.ssl_method)
        except AttributeError:
            raise ValueError(f"unknown sslmethod {listener.ssl_method!r}") from None
    try:
        return HTTP11ServerTLS(CertificateOptions(**options))
    except SSL.Error as e:
        raise ValueError(f"cannot use these certificate files: {e}") from None


#: Where Linux keeps the largest listen backlog it grants (``net.core.somaxconn``).
SOMAXCONN_PATH = "/proc/sys/net/core/somaxconn"

#: Endpoint types whose listen queue a ``backlog`` argument sizes.
_BACKLOG_TYPES = frozenset({"tcp", "tcp6", "ssl", "unix"})


def system_listen_backlog(path: str = SOMAXCONN_PATH) -> int:
    """
    The system's largest listen backlog, read now: Twisted's default of 50
    makes a reconnect storm wait for SYN retransmits. Where the file cannot
    be read, the C library's ``SOMAXCONN``.
    """
    try:
        with open(path, encoding="ascii") as f:
            value = int(f.read().strip())
    except (OSError, ValueError):
        return socket.SOMAXCONN
    return value if value > 0 else socket.SOMAXCONN


def listen_backlog(description: str, default: int) -> int | None:
    """
    The backlog a listener gets: its own ``backlog=`` when it sets one,
    else ``default``; None for endpoint types without a listen queue of ours
    (``systemd:``, for example, inherits a socket already listening).
    """
    args, kwargs = split_description(description)
    if args[0] not in _BACKLOG_TYPES:
        return None
    if "backlog" in kwargs:
        try:
            return int(kwargs["backlog"])
        except ValueError:
            raise ValueError(f"backlog {kwargs['backlog']!r} is not a number") from None
    return default


@implementer(IStreamServerEndpoint)
class WrappedServerEndpoint:
    """An endpoint whose listening factory is first passed through ``wrap``."""

    def __init__(
        self, endpoint: IStreamServerEndpoint, wrap: Callable[[IProtocolFactory], IProtocolFactory]
    ) -> None:
        self._endpoint, self._wrap = endpoint, wrap

    def listen(self, protocolFactory: IProtocolFactory) -> Deferred[IListeningPort]:
        return self._endpoint.listen(self._wrap(protocolFactory))


def server_endpoint(
    reactor: IReactorTCP,
    description: str,
    backlog: int | None = None,
    wrap: Callable[[IProtocolFactory], IProtocolFactory] | None = None,
) -> IStreamServerEndpoint:
    """
    ``serverFromString``, except that ``ssl:`` listeners are built by
    :func:`listener_tls` (files read now, ALPN ``http/1.1`` only), and that
    a listener without ``backlog=`` gets ``backlog`` (default: the system's
    maximum, :func:`system_listen_backlog`).

    ``wrap`` wraps the listening factory closest to the socket, below TLS
    (the gateway counts its client connections there: a WebSocket hand-over
    replaces the protocol TLS wraps, and Autobahn wants the TLS transport).
    """
    if backlog is None:
        backlog = system_listen_backlog()
    effective = listen_backlog(description, backlog)
    outer = wrap if wrap is not None else (lambda factory: factory)
    listener = parse_tls_listener(description)
    if listener is None:
        if effective is not None and "backlog" not in split_description(description)[1]:
            description = f"{description}:backlog={effective}"
        endpoint = serverFromString(reactor, description)
        return endpoint if wrap is None else WrappedServerEndpoint(endpoint, wrap)
    tls = listener_tls(listener)
    tcp = TCP4ServerEndpoint(
        reactor,
        listener.port,
        backlog=effective if effective is not None else listener.backlog,
        interface=listener.interface,
    )
    # What reactor.listenSSL does, with room for ``wrap`` below TLS.
    return WrappedServerEndpoint(tcp, lambda factory: outer(TLSMemoryBIOFactory(tls, False, factory)))


# -- route keys ------------------------------------------------------------------

class TLSKeys(Protocol):
    """The TLS keys of a ``[route:NAME]`` section; ``[cluster]`` has them too."""

    @property
    def ca_file(self) -> str | None: ...
    @property
    def client_cert(self) -> str | None: ...
    @property
    def client_key(self) -> str | None: ...
    @property
    def tls_verify(self) -> bool: ...


_TLS_KEY_NAMES = ("ca_file", "client_cert", "client_key", "tls_verify")


def check_tls_keys(client_cert: str | None, client_key: str | None) -> None:
    """A client key needs its certificate (pure: the files are read by :func:`check_tls_files`)."""
    if client_key is not None and client_cert is None:
        raise TLSKeyError("client_key", "needs client_cert")


def check_tls_files(route: TLSKeys) -> None:
    """Read the ``ca_file``, ``client_cert`` and ``client_key`` of a route (or ``[cluster]``) now."""
    try:
        UpstreamTLS.for_route(route)
    except TLSFileError as e:
        if e.argument == "client_key" and route.client_key is None:
            raise TLSKeyError("client_cert", f"{route.client_cert}: {e.reason}; set client_key") from None
        raise TLSKeyError(e.argument, f"{e.path}: {e.reason}") from None


def _https_netlocs(upstreams: Iterable[str]) -> list[tuple[str, int]]:
    netlocs = []
    for url in upstreams:
        parts = urlsplit(url)
        if parts.scheme == "https" and parts.hostname:
            netlocs.append(_netloc(parts.hostname, parts.port or 443))
    return netlocs


def _netloc(host: str, port: int) -> tuple[str, int]:
    return host.strip("[]").lower(), port


def _tls_keys(route: TLSKeys) -> tuple[str | bool | None, ...]:
    return tuple(getattr(route, name) for name in _TLS_KEY_NAMES)


def check_shared_upstreams(routes: Sequence[RouteSettings]) -> None:
    """
    Routes naming the same https upstream (host and port) use the same TLS
    keys: pooled HTTP connections are shared, so a connection opened with one
    route's client certificate would otherwise carry another route's requests.
    """
    seen: dict[tuple[str, int], RouteSettings] = {}
    for route in routes:
        for netloc in _https_netlocs(route.upstream):
            first = seen.setdefault(netloc, route)
            if _tls_keys(first) == _tls_keys(route):
                continue
            key = next(n for n, a, b in zip(_TLS_KEY_NAMES, _tls_keys(first), _tls_keys(route)) if a != b)
            raise TLSKeyError(
                key,
                f"https://{netloc[0]}:{netloc[1]} is also an upstream of [route:{first.name}],"
                " whose TLS keys differ",
                route=route.name,
            )


# -- upstreams ------------------------------------------------------------------


@implementer(IOpenSSLClientConnectionCreator)
class _UnverifiedTLS:
    """TLS without certificate checks (``tls_verify = false``), still sending SNI."""

    def __init__(self, hostname: str, options: CertificateOptions) -> None:
        self._server_name = None
        if not (isIPAddress(hostname) or isIPv6Address(hostname)):
            self._server_name = hostname.encode("idna")
        self._options = options

    def clientConnectionForTLS(self, tlsProtocol: TLSMemoryBIOProtocol) -> SSL.Connection:
        connection = self._options.clientConnectionForTLS(tlsProtocol)
        if self._server_name is not None:
            connection.set_tlsext_host_name(self._server_name)
        return connection


class UpstreamTLS:
    """
    How one route talks TLS to its upstreams: whom it trusts (``trust_root``,
    the system store when None), the client certificate it shows, and whether
    it verifies at all. One connection creator per host name, built once.
    """

    def __init__(
        self,
        *,
        trust_root: IOpenSSLTrustRoot | None = None,
        client_certificate: CertifiedKey | None = None,
        verify: bool = True,
    ) -> None:
        self.trust_root, self.client_certificate, self.verify = trust_root, client_certificate, verify
        self._creators: dict[str, IOpenSSLClientConnectionCreator] = {}

    @classmethod
    def for_ca_file(cls, path: str | None) -> UpstreamTLS:
        """Verified against the CA certificates of ``path`` (PEM), or the system's when None."""
        if path is None:
            return cls()
        certificates = [_twisted_certificate(c) for c in load_certificates("ca_file", path)]
        return cls(trust_root=trustRootFromCertificates(certificates))

    @classmethod
    def for_route(cls, route: TLSKeys) -> UpstreamTLS:
        """From a route's ``ca_file``, ``client_cert``, ``client_key`` and ``tls_verify``."""
        trust_root = cls.for_ca_file(route.ca_file).trust_root
        client_certificate = None
        if route.client_cert is not None:
            key = route.client_key if route.client_key is not None else route.client_cert
            client_certificate = load_key_pair("client_cert", route.client_cert, "client_key", key)
        return cls(trust_root=trust_root, client_certificate=client_certificate, verify=route.tls_verify)

    def creator_for(self, hostname: str) -> IOpenSSLClientConnectionCreator:
        """The connection creator for an upstream of this name (verified unless told not to)."""
        creator = self._creators.get(hostname)
        if creator is None:
            certified = self.client_certificate
            options = certified.options() if certified is not None else {}
            if self.verify:
                creator = optionsForClientTLS(
                    hostname, trustRoot=self.trust_root, extraCertificateOptions=options
                )
            else:
                creator = _UnverifiedTLS(hostname, CertificateOptions(verify=False, **options))
            self._creators[hostname] = creator
        return creator


@implementer(IPolicyForHTTPS)
class UpstreamTLSPolicy:
    """
    The :class:`UpstreamTLS` of whichever route names an https upstream, by
    host and port; upstreams no route names get system trust and verification.
    Serves ``Agent`` (``creatorForNetloc``) and the WebSocket connector alike.
    """

    def __init__(
        self, by_netloc: Mapping[tuple[str, int], UpstreamTLS], default: UpstreamTLS | None = None
    ) -> None:
        self._by_netloc = dict(by_netloc)
        self._default = default if default is not None else UpstreamTLS()

    @classmethod
    def for_routes(cls, routes: Iterable[RouteSettings]) -> UpstreamTLSPolicy:
        """Read every route's TLS files once; routes naming the same upstream agree (config checks)."""
        by_netloc: dict[tuple[str, int], UpstreamTLS] = {}
        for route in routes:
            netlocs = [n for n in _https_netlocs(route.upstream) if n not in by_netloc]
            if netlocs:
                tls = UpstreamTLS.for_route(route)
                by_netloc.update((netloc, tls) for netloc in netlocs)
        return cls(by_netloc)

    def tls_for(self, host: str, port: int) -> UpstreamTLS:
        """The :class:`UpstreamTLS` an upstream at ``host:port`` is reached with."""
        return self._by_netloc.get(_netloc(host, port), self._default)

    def creatorForNetloc(self, hostname: bytes, port: int) -> IOpenSSLClientConnectionCreator:
        host = hostname.decode("idna") if isinstance(hostname, bytes) else hostname
        return self.tls_for(host, port).creator_for(host.strip("[]"))


def describe_tls_failure(error: BaseException) -> str | None:
    """
    A TLS handshake failure with an upstream in a few words ("certificate
    verify failed"), looking inside ``Agent``'s ``ResponseNeverReceived``;
    None for anything that is not one.
    """
    for reason in getattr(error, "reasons", ()):
        found = describe_tls_failure(reason.value)
        if found is not None:
            return found
    if isinstance(error, VerificationError):
        return "the certificate is not valid for the upstream's host name"
    if isinstance(error, SSL.Error):
        details = error.args[0] if error.args and isinstance(error.args[0], list) else []
        reasons = [d[-1] for d in details if isinstance(d, tuple) and d and d[-1]]
        return ", ".join(reasons) or "TLS handshake failed"
    return None


def warn_unverified(routes: Iterable[RouteSettings]) -> None:
    """One start-up warning for each route that turns certificate checks off."""
    for route in routes:
        if not route.tls_verify:
            log.warn(
                "[route:{route}] tls_verify = false: the certificates of its https upstreams"
                " are NOT checked; for development only",
                route=route.name,
                event="tls_verify_off",
            )
