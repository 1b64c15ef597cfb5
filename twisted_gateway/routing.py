"""
Path normalisation and prefix routing: pure functions on bytes.

A path is normalised once, before routing, and that normalised path (with the
original query) is what the upstream receives: the route that was checked is
the route that is served. Percent-encoded bytes other than dot segments stay
encoded, so ``/a%2Fb`` reaches the upstream as ``/a%2Fb``.
"""

from __future__ import annotations

import re
from typing import Generic, Iterable, Iterator, Sequence, TypeVar
from urllib.parse import unquote_to_bytes

from twisted_gateway.errors import GatewayError
from twisted_gateway.schema import ESCAPED_SLASHES as ESCAPED_SLASHES

T = TypeVar("T")


class BadPath(GatewayError):
    status = 400
    error = "bad_request"


def split_uri(uri: bytes) -> tuple[bytes, bytes]:
    """Split a request-target into its path and its query (without ``?``)."""
    path, sep, query = uri.partition(b"?")
    path = path.partition(b"#")[0]
    if not path.startswith(b"/"):
        # absolute-form (RFC 9112 3.2.2): keep only the path of the URL.
        scheme, sep2, rest = path.partition(b"://")
        if sep2 and scheme.lower() in (b"http", b"https", b"ws", b"wss"):
            slash = rest.find(b"/")
            path = rest[slash:] if slash >= 0 else b"/"
        else:
            raise BadPath("the request path must start with '/'")
    return path, query


def query_fields(query: bytes) -> Iterator[tuple[bytes, bytes, bytes]]:
    """
    ``(raw field, name, value)`` for each ``&``-separated field of a raw
    query, name and value form-decoded (``+`` is a space; RFC 6750 2.3 sends
    ``access_token`` so, and ``request.args`` reads it so). The raw field lets
    a caller pass the other fields on byte for byte. Not ``urllib.parse.parse_qsl``:
    it refuses raw non-ASCII bytes and drops the raw fields.
    """
    for raw in query.split(b"&") if query else ():
        name, _, value = raw.partition(b"=")
        yield raw, _form_decode(name), _form_decode(value)


def query_value(query: bytes, name: str) -> bytes | None:
    """The first non-empty value of the field ``name`` in a raw query (form-decoded), or None."""
    wanted = name.encode("utf-8")
    for _, key, value in query_fields(query):
        if key == wanted and value:
            return value
    return None


def _form_decode(raw: bytes) -> bytes:
    return unquote_to_bytes(raw.replace(b"+", b" ")) if b"%" in raw or b"+" in raw else raw


_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")


def _decode_unreserved(segment: bytes) -> bytes:
    """
    Decode percent-encoded unreserved characters (RFC 3986 6.2.2.2), so that
    ``/%61dmin`` routes as ``/admin``; reserved ones such as ``%2F`` stay encoded.
    """
    if b"%" not in segment:
        return segment
    out = bytearray()
    i = 0
    while i < len(segment):
        byte = segment[i]
        if byte == 0x25 and _is_hex(segment[i + 1 : i + 3]):
            value = int(segment[i + 1 : i + 3], 16)
            if value in _UNRESERVED:
                out.append(value)
            else:
                out += segment[i : i + 3]
            i += 3
        else:
            out.append(byte)
            i += 1
    return bytes(out)


def _is_hex(pair: bytes) -> bool:
    return len(pair) == 2 and all(c in b"0123456789abcdefABCDEF" for c in pair)


def _dot_kind(segment: bytes) -> int:
    """0 for a normal segment, 1 for ``.``, 2 for ``..`` (also percent-encoded)."""
    if len(segment) > 6 or b"." not in segment and b"%" not in segment:
        return 0
    decoded = segment.lower().replace(b"%2e", b".")
    if decoded == b".":
        return 1
    if decoded == b"..":
        return 2
    return 0


def normalize_path(path: bytes) -> bytes:
    """
    Decode unreserved percent-escapes, remove dot segments (RFC 3986 5.2.4,
    including ``%2e`` forms) and collapse empty segments. A path that would
    climb above ``/`` raises :class:`BadPath`.
    """
    if not path.startswith(b"/"):
        raise BadPath("the request path must start with '/'")
    if b"\x00" in path:
        raise BadPath("the request path contains a NUL byte")
    if b"%" not in path and b"//" not in path and b"/." not in path:
        return path  # no escape, empty segment or dot segment: normalised already
    segments = path.split(b"/")[1:]
    out: list[bytes] = []
    trailing = False
    for segment in segments:
        segment = _decode_unreserved(segment)
        kind = _dot_kind(segment)
        trailing = kind != 0 or segment == b""
        if kind == 1 or segment == b"":
            continue
        if kind == 2:
            if not out:
                raise BadPath("the request path climbs above '/'")
            out.pop()
            continue
        out.append(segment)
    normalized = b"/" + b"/".join(out)
    if trailing and out:
        normalized += b"/"
    return normalized


def validate_prefix(prefix: str) -> str:
    """A route prefix: starts with '/', already normalised, no trailing '/' (but '/')."""
    if not prefix.startswith("/"):
        raise ValueError(f"must start with '/', got {prefix!r}")
    if "?" in prefix or "#" in prefix:
        raise ValueError(f"must be a path without query or fragment, got {prefix!r}")
    stripped = prefix.rstrip("/") or "/"
    try:
        normalized = normalize_path(stripped.encode("utf-8")).decode("utf-8")
    except BadPath as e:
        raise ValueError(f"{e.detail}: {prefix!r}") from None
    if normalized.rstrip("/") != stripped.rstrip("/"):
        raise ValueError(f"must be a normalised path, got {prefix!r}")
    return stripped


def prefix_matches(prefix: bytes, path: bytes) -> bool:
    """Segment-boundary match: ``/v1/chat`` matches ``/v1/chat/x``, not ``/v1/chatx``."""
    if prefix == b"/":
        return True
    return path == prefix or (path.startswith(prefix) and path[len(prefix) : len(prefix) + 1] == b"/")


class RouteTable(Generic[T]):
    """Routes keyed by prefix; :meth:`match` returns the longest matching one."""

    def __init__(self, routes: Iterable[tuple[str, T]]) -> None:
        ordered = sorted(routes, key=lambda pair: len(pair[0]), reverse=True)
        self._routes: Sequence[tuple[bytes, T]] = [
            (prefix.encode("utf-8"), value) for prefix, value in ordered
        ]

    def match(self, path: bytes) -> T | None:
        for prefix, value in self._routes:
            if prefix_matches(prefix, path):
                return value
        return None


_ESCAPED_SLASH = ((b"%2f", b"/"), (b"%5c", b"/"), (b"\\", b"/"))


def has_escaped_slash(path: bytes) -> bool:
    """``%2F``, ``%5C`` or a raw ``\\``: a separator to an upstream that decodes first."""
    lowered = path.lower()
    return b"%2f" in lowered or b"%5c" in lowered or b"\\" in path


def decoded_path(path: bytes) -> bytes:
    """
    ``path`` as an upstream that decodes before normalising sees it (wsgiref,
    Tomcat, many frameworks): ``%2F``, ``%5C`` and ``\\`` are separators, a
    ``;`` starts a path parameter that is dropped from its segment, and dot
    segments are then removed. Raises :class:`BadPath` above ``/``.
    """
    lowered = path
    for escaped, slash in _ESCAPED_SLASH:
        lowered = _replace_ci(lowered, escaped, slash)
    segments = [segment.partition(b";")[0] for segment in lowered.split(b"/")]
    return normalize_path(b"/".join(segments))


def _replace_ci(data: bytes, old: bytes, new: bytes) -> bytes:
    """``data`` with every case-insensitive ``old`` replaced (``old`` is lower case)."""
    out, start, lowered = [], 0, data.lower()
    while (found := lowered.find(old, start)) >= 0:
        out += [data[start:found], new]
        start = found + len(old)
    out.append(data[start:])
    return b"".join(out)


def check_escaped_path(path: bytes, route: T, table: RouteTable[T], mode: str) -> None:
    """
    Refuse (:class:`BadPath`, 400) a normalised ``path`` routed to ``route``
    whose decoded form (:func:`decoded_path`) an upstream would serve from
    outside that route: ``/v1/public/..%2Fapi/secret`` must not reach
    ``/v1/api/secret`` past its auth. ``mode`` is the route's
    ``escaped_slashes``: ``keep`` forwards anything, ``reject`` refuses every
    escaped slash, ``check`` only the paths that change route.
    """
    if mode == "keep":
        return
    escaped = has_escaped_slash(path)
    if escaped and mode == "reject":
        raise BadPath("the request path contains an escaped slash or a backslash")
    if not escaped and b";" not in path:
        return
    try:
        decoded = decoded_path(path)
    except BadPath:
        raise BadPath("the decoded request path climbs above '/'") from None
    if table.match(decoded) is not route:
        raise BadPath("the decoded request path leaves its route")


def upstream_url(base: str, path: bytes, query: bytes, *, websocket: bool = False) -> str:
    """
    ``base`` + normalised ``path`` + original ``query``, as the client sent
    them (``/a%2Fb`` stays ``/a%2Fb``); only bytes that cannot stand on a
    request line (controls, space, DEL, non-ASCII) are percent-encoded. For a
    WebSocket the scheme becomes ``ws``/``wss``. Both forwarders build their
    upstream's URL here (the HTTP one encodes it to ASCII bytes).
    """
    scheme, sep, rest = base.partition("://")
    if websocket:
        scheme = {"http": "ws", "https": "wss"}[scheme]
    url = scheme + sep + rest.rstrip("/") + _printable(path)
    if query:
        url += "?" + _printable(query)
    return url


_UNPRINTABLE = re.compile(rb"[^\x21-\x7e]")


def _printable(raw: bytes) -> str:
    """Percent-encode bytes outside printable ASCII (raw UTF-8 sent by some clients)."""
    if _UNPRINTABLE.search(raw) is None:
        return raw.decode("ascii")
    return _UNPRINTABLE.sub(lambda m: b"%%%02X" % m[0][0], raw).decode("ascii")
