"""
Header rules as pure functions over ``[(name, value), ...]`` byte pairs.

Upgrade detection, hop-by-hop stripping, forwarded headers and identity headers
are the places where proxies get security wrong, so they live here, apart from
any I/O, and are tested as tables.
"""

from __future__ import annotations

import ipaddress
from typing import Iterable, Sequence

Headers = Sequence[tuple[bytes, bytes]]

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
    named = set(tokens(get_all(headers, b"connection")))
    return [
        (k, v) for k, v in headers if k.lower() not in HOP_BY_HOP and k.lower() not in named
    ]


def _peer_is_trusted(peer: str, trusted: Sequence) -> bool:
    if not trusted:
        return False
    try:
        address = ipaddress.ip_address(peer)
    except ValueError:
        return False
    return any(address in net for net in trusted)


def forwarded_for(incoming: Sequence[bytes], peer: str, trusted: Sequence) -> bytes:
    """
    The ``X-Forwarded-For`` to send: the peer's address appended to the incoming
    chain when the peer is a trusted proxy, the peer's address alone otherwise.
    """
    chain = [v.strip() for v in incoming if v.strip()] if _peer_is_trusted(peer, trusted) else []
    chain.append(peer.encode("ascii", "replace"))
    return b", ".join(chain)


def upstream_request_headers(
    headers: Headers,
    *,
    peer: str,
    scheme: str,
    host: bytes | None,
    trusted_proxies: Sequence = (),
    drop: frozenset[bytes] = frozenset(),
) -> list[tuple[bytes, bytes]]:
    """
    The end-to-end headers of a client request as the upstream should see them:
    hop-by-hop, identity, every client-sent ``X-Forwarded-*``/``Forwarded`` and
    ``drop`` headers removed, then
    ``X-Forwarded-For``/``-Proto``/``-Host`` added. ``Host`` is left to the caller.
    """
    incoming_xff = get_all(headers, b"x-forwarded-for")
    kept = [
        (k, v)
        for k, v in strip_hop_by_hop(headers)
        if (lk := k.lower()) not in IDENTITY_HEADERS
        and not lk.startswith(b"x-forwarded-")
        and lk != b"forwarded"
        and lk not in drop
        and lk != b"host"
    ]
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
