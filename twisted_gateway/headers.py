"""
Header rules as pure functions over ``[(name, value), ...]`` byte pairs.

Upgrade detection, hop-by-hop stripping, forwarded headers and identity headers
are the places where proxies get security wrong, so they live here, apart from
any I/O, and are tested as tables.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from typing import Iterable, Sequence

from twisted.internet.interfaces import IAddress

from twisted_gateway.errors import BadRequest, GatewayError
from twisted_gateway.schema import DEFAULT_STRIPPED as DEFAULT_STRIPPED

Headers = Sequence[tuple[bytes, bytes]]
#: The networks of ``trusted_proxies``.
Networks = Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network]

#: RFC 9110 7.6.1 plus the old ``Proxy-Connection``.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authorization",
        b"proxy-authenticate",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)

#: Headers that carry the identity the gateway verified; never taken from a client.
IDENTITY_HEADERS = frozenset({b"x-auth-subject", b"x-auth-claims"})

#: Headers the gateway writes itself for the upstream.
FORWARDED_HEADERS = frozenset({b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host"})

#: Headers of the WebSocket handshake that belong to one leg only.
WEBSOCKET_HANDSHAKE = frozenset(
    {
        b"host",
        b"sec-websocket-key",
        b"sec-websocket-version",
        b"sec-websocket-extensions",
        b"sec-websocket-protocol",
        b"sec-websocket-accept",
        b"content-length",
    }
)


def tokens(values: Iterable[bytes]) -> list[bytes]:
    """The lower-cased tokens of comma-separated header values."""
    out = []
    for value in values:
        for item in value.split(b","):
            item = item.strip().lower()
            if item:
                out.append(item)
    return out


def get_all(headers: Headers, name: bytes) -> list[bytes]:
    name = name.lower()
    return [v for k, v in headers if k.lower() == name]


def cookie_value(headers: Headers, name: str) -> bytes | None:
    """
    The first non-empty value of the cookie ``name`` in the ``Cookie``
    headers (``;``-separated ``name=value`` pairs read as Twisted's
    ``Request.getCookie`` does, quotes around a value dropped), or None. Not
    ``http.cookies.SimpleCookie``: one cookie it cannot parse (a JSON value, a
    space) makes it drop every cookie of the header.
    """
    wanted = name.encode("utf-8")
    for key, header in headers:
        if key.lower() != b"cookie":
            continue
        for pair in header.split(b";"):
            cookie, _, value = pair.partition(b"=")
            if cookie.strip() == wanted:
                value = value.strip().strip(b'"')
                if value:
                    return value
    return None


def is_websocket_upgrade(method: bytes, headers: Headers) -> bool:
    """
    A WebSocket opening handshake: GET, ``Upgrade`` containing the token
    ``websocket`` and ``Connection`` containing the token ``upgrade``, both as
    case-insensitive comma lists (Firefox sends ``keep-alive, Upgrade``).
    """
    if method != b"GET":
        return False
    return b"websocket" in tokens(get_all(headers, b"upgrade")) and b"upgrade" in tokens(
        get_all(headers, b"connection")
    )


def strip_hop_by_hop(headers: Headers) -> list[tuple[bytes, bytes]]:
    """Drop hop-by-hop headers and every header ``Connection`` names; keep order."""
    kept, listed = _end_to_end(headers)
    return _unlisted(kept, listed) if listed else kept


def _end_to_end(headers: Headers) -> tuple[list[tuple[bytes, bytes]], list[bytes]]:
    """The headers that are not hop-by-hop, and the ``Connection`` values (one pass)."""
    kept = []
    listed = []
    for k, v in headers:
        lower = k.lower()
        if lower not in HOP_BY_HOP:
            kept.append((k, v))
        elif lower == b"connection":
            listed.append(v)
    return kept, listed


def _unlisted(headers: Headers, listed: list[bytes]) -> list[tuple[bytes, bytes]]:
    """
    ``headers`` (hop-by-hop ones already out) less those the ``Connection``
    values ``listed`` name: a second pass only for a name that is not
    hop-by-hop (rare: ``Upgrade`` and ``keep-alive`` are).
    """
    named = set(tokens(listed)).difference(HOP_BY_HOP)
    if not named:
        return list(headers)
    return [(k, v) for k, v in headers if k.lower() not in named]


def peer_host(address: IAddress | None) -> str:
    """
    A connection's peer as ``X-Forwarded-For``, ``admin_allow``, ``hash_key =
    ip`` and the logs name it: its IP address, or ``unix`` for a Unix socket
    (which has no host).
    """
    return getattr(address, "host", None) or "unix"


def _peer_is_trusted(peer: str, trusted: Networks) -> bool:
    if not trusted:
        return False
    try:
        address = ipaddress.ip_address(peer)
    except ValueError:
        return False
    return any(address in net for net in trusted)


def forwarded_for(incoming: Sequence[bytes], peer: str, trusted: Networks) -> bytes:
    """
    The ``X-Forwarded-For`` to send: the peer's address appended to the incoming
    chain when the peer is a trusted proxy, the peer's address alone otherwise.
    """
    chain = [v.strip() for v in incoming if v.strip()] if _peer_is_trusted(peer, trusted) else []
    chain.append(peer.encode("ascii", "replace"))
    return b", ".join(chain)


def client_address(incoming: Sequence[bytes], peer: str, trusted: Networks) -> str:
    """
    The client's address: the peer's, or, while the hop at hand is a trusted
    proxy, the address it names last in ``X-Forwarded-For`` (read from the
    right, as nginx's ``real_ip_recursive``); a client cannot choose it.
    """
    chain = [item.strip() for value in incoming for item in value.split(b",") if item.strip()]
    address = peer
    while chain and _peer_is_trusted(address, trusted):
        candidate = chain.pop().decode("ascii", "replace")
        try:
            address = str(ipaddress.ip_address(candidate))
        except ValueError:
            break
    return address


def normalized_name(name: bytes) -> bytes:
    """
    A header name as CGI-style upstreams (WSGI, PHP, Rack) see it: case and
    ``_``/``-`` do not count, so ``X_Auth_Subject`` is ``x-auth-subject``.
    """
    return name.lower().replace(b"_", b"-")


@functools.lru_cache(maxsize=64)
def _normalized_names(names: frozenset[bytes]) -> frozenset[bytes]:
    """:func:`normalized_name` of each of ``names`` (a route's few sets, worked out once each)."""
    return frozenset(normalized_name(name) for name in names)


def upstream_request_headers(
    headers: Headers,
    *,
    peer: str,
    scheme: str,
    host: bytes | None,
    trusted_proxies: Networks = (),
    drop: frozenset[bytes] = frozenset(),
    underscores: bool = False,
) -> list[tuple[bytes, bytes]]:
    """
    The end-to-end headers of a client request as the upstream should see them:
    hop-by-hop, identity, every client-sent ``X-Forwarded-*``/``Forwarded`` and
    ``drop`` headers removed (names compared normalised: :func:`normalized_name`),
    names containing ``_`` removed unless ``underscores``, then
    ``X-Forwarded-For``/``-Proto``/``-Host`` added. ``Host`` is left to the caller.
    """
    incoming_xff = []
    dropped = _normalized_names(drop)
    listed = []
    kept = []
    for k, v in headers:
        lower = k.lower()
        if lower == b"x-forwarded-for":
            incoming_xff.append(v)
            continue
        if lower in HOP_BY_HOP:
            if lower == b"connection":
                listed.append(v)
            continue
        lk = lower.replace(b"_", b"-") if b"_" in lower else lower  # normalized_name's
        if (
            (underscores or lk is lower)
            and not lk.startswith(b"x-forwarded-")
            and lk not in IDENTITY_HEADERS
            and lk != b"forwarded"
            and lk not in dropped
            and lk != b"host"
        ):
            kept.append((k, v))
    if listed:
        kept = _unlisted(kept, listed)
    kept.append((b"X-Forwarded-For", forwarded_for(incoming_xff, peer, trusted_proxies)))
    kept.append((b"X-Forwarded-Proto", scheme.encode("ascii")))
    if host:
        kept.append((b"X-Forwarded-Host", host))
    return kept


def origin_allowed(origin: bytes | None, allowed: Sequence[str], allow_null: bool | None) -> bool:
    """
    The Origin policy of a route: no ``Origin`` (a non-browser client) passes;
    ``null`` passes only when allowed (by default only under ``*``); otherwise
    the origin must equal an allowed one or match a ``scheme://*.domain`` pattern.
    """
    if origin is None:
        return True
    text = origin.decode("latin-1").strip().lower()
    if text == "null":
        return allow_null if allow_null is not None else "*" in allowed
    if "*" in allowed:
        return True
    scheme, sep, host = text.partition("://")
    for pattern in allowed:
        if pattern == text:
            return True
        p_scheme, _, p_host = pattern.partition("://")
        if sep and p_host.startswith("*.") and p_scheme == scheme:
            suffix = p_host[1:]
            if host.endswith(suffix) and len(host) > len(suffix):
                return True
    return False


# -- what RFC 9112 and RFC 6454 say to refuse ----------------------------------

#: ``host [ ":" port ]`` (RFC 3986 3.2.2): a DNS name or IPv4 address, or an
#: IPv6 literal in brackets; the port, when present, digits only. No userinfo,
#: path, list (``,``) or space.
_HOST = re.compile(rb"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._~-]+)(?::([0-9]{1,5}))?")


@functools.lru_cache(maxsize=256)
def valid_host(value: bytes) -> bool:
    """
    Whether ``value`` is one ``host[:port]`` a client may send in ``Host``
    (cached: each request asks several times, and clients use few names).
    """
    match = _HOST.fullmatch(value)
    if match is None:
        return False
    host, port = match.groups()
    if host.startswith(b"["):
        try:
            ipaddress.IPv6Address(host[1:-1].decode("ascii"))
        except ValueError:
            return False
    return port is None or int(port) <= 65535


def checked_host(values: Sequence[bytes], version: bytes) -> bytes | None:
    """
    The request's one valid ``Host`` (RFC 9112 3.2), or :class:`BadRequest`:
    HTTP/1.1 must send exactly one, nobody may send two, and it must be a
    ``host[:port]``. ``None`` for an older or HTTP/2 request without one.
    """
    if len(values) > 1:
        raise BadRequest("the request has more than one Host header")
    if not values:
        if version == b"HTTP/1.1":
            raise BadRequest("an HTTP/1.1 request needs a Host header")
        return None
    host = values[0].strip(b" \t")
    if not valid_host(host):
        raise BadRequest("the Host header is not a valid host[:port]")
    return host


def single_origin(values: Sequence[bytes]) -> bytes | None:
    """
    The request's ``Origin`` (RFC 6454 7.3: at most one), ``None`` without
    one; two are refused with 403 rather than checking one and forwarding both.
    ``Sec-WebSocket-Origin`` (hybi-08) is never an origin here.
    """
    if len(values) > 1:
        raise GatewayError(
            "the request has more than one Origin header", status=403, error="forbidden_origin"
        )
    return values[0] if values else None


def check_utf8_values(headers: Headers) -> None:
    """
    Refuse (400) an upgrade whose header values are not UTF-8: the WebSocket
    client sends its handshake as UTF-8 text, so only those reach the upstream
    byte for byte as on HTTP; anything else would arrive altered.
    """
    for name, value in headers:
        try:
            value.decode("utf-8")
        except UnicodeDecodeError:
            raise BadRequest(
                f"the {name.decode('latin-1')} header is not UTF-8 and cannot be forwarded"
                " on a WebSocket upgrade"
            ) from None


def clean_reason_phrase(phrase: bytes) -> bytes:
    """
    An upstream's reason phrase safe to put on our own status line: control
    characters (a bare CR, LF, NUL...) become spaces (RFC 9112 4: HTAB, SP,
    VCHAR and obs-text only).
    """
    return _CONTROLS.sub(b" ", phrase)


#: what a reason phrase may not hold: controls but HTAB, and DEL
_CONTROLS = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")


# -- the Host the upstream sees, and the addresses it answers with ------------

#: ``host_header`` values besides a fixed name: the client's ``Host``, or the instance's own.
HOST_HEADER_MODES = ("client", "upstream")

#: Response headers that carry a URL the client follows (``Refresh`` after its ``url=``).
_URL_HEADERS = frozenset({b"location", b"content-location", b"refresh"})


def parse_host_header(text: str) -> str:
    """``client``, ``upstream`` or a fixed ``host[:port]`` (lower-cased)."""
    value = text.strip().lower()
    if value in HOST_HEADER_MODES or valid_host(value.encode("ascii", "replace")):
        return value
    raise ValueError(f"expected client, upstream or a host[:port], got {text.strip()!r}")


def upstream_host(mode: str, client_host: bytes | None) -> bytes | None:
    """
    The ``Host`` to send upstream for a route's ``host_header``: the client's
    (already validated), a fixed name, or None for the instance's own address
    (written by the HTTP or WebSocket client from the upstream URL), which is
    also what a request without a ``Host`` (HTTP/1.0) gets under ``client``.
    """
    if mode == "upstream":
        return None
    if mode == "client":
        return client_host
    return mode.encode("ascii")


@functools.lru_cache(maxsize=1024)  # asked per response: one answer per instance and mode
def upstream_origins(base_url: str, mode: str) -> tuple[bytes, ...]:
    """
    The ``scheme://host[:port]`` prefixes by which an upstream names itself in
    a redirect: its own address (with and without a default port), and the
    fixed name it was sent. Empty under ``client``: it names the client's host.
    """
    if mode == "client":
        return ()
    scheme, _, rest = base_url.partition("://")
    netloc = rest.partition("/")[0].lower()
    default = {"http": ":80", "https": ":443"}[scheme]
    hosts = {netloc, netloc.removesuffix(default)}
    if mode != "upstream":
        hosts |= {mode, mode.removesuffix(default)}
    return tuple(sorted(f"{scheme}://{h}".encode("ascii") for h in hosts))


def rewrite_redirects(
    headers: Headers, origins: Sequence[bytes], client_origin: bytes | None
) -> list[tuple[bytes, bytes]]:
    """
    ``Location``, ``Content-Location`` and ``Refresh`` values that point at one
    of the upstream's ``origins`` pointed at ``client_origin`` instead (nginx's
    ``proxy_redirect default``): a browser must never be sent to an internal
    address. Other headers and other URLs are kept as they are.
    """
    if not origins or client_origin is None:
        return list(headers)
    out = []
    for name, value in headers:
        if name.lower() in _URL_HEADERS:
            value = _rewrite_url(value, origins, client_origin, name.lower() == b"refresh")
        out.append((name, value))
    return out


def _rewrite_url(value: bytes, origins: Sequence[bytes], client_origin: bytes, refresh: bool) -> bytes:
    start = 0
    if refresh:
        found = value.lower().find(b"url=")
        if found < 0:
            return value
        start = found + 4
    head, url = value[:start], value[start:]
    quote = url[:1] if url[:1] in (b"'", b'"') else b""
    url = url[len(quote) :]
    lowered = url.lower()
    for origin in origins:
        if lowered.startswith(origin) and url[len(origin) : len(origin) + 1] in (b"", b"/", b"?", b"#", b"'", b'"'):
            return head + quote + client_origin + url[len(origin) :]
    return value
