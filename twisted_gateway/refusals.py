"""
An upstream's refusal of a WebSocket handshake, passed to the client whole.

A 401 with ``WWW-Authenticate``, a 429 with ``Retry-After`` or a 403 with its
own JSON body decides what a client does next, so the client gets the
upstream's status line, end-to-end headers and body (up to
:data:`MAX_REFUSAL_BODY` bytes, cut beyond), as an HTTP proxy would pass
them; the gateway's own JSON is kept for the refusals it makes itself.
Pure functions: bytes in, values out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from twisted_gateway.headers import clean_reason_phrase, get_all, strip_hop_by_hop, tokens

#: Bytes of a refusal's body passed on; the rest is cut.
MAX_REFUSAL_BODY = 64 * 1024

#: Headers the gateway writes itself: the body is re-framed, the connection closed.
_REFRAMED = frozenset({b"content-length", b"connection"})


@dataclass(frozen=True)
class Refusal:
    """A complete non-101 answer to an upgrade: what the client is sent."""

    status: int
    phrase: bytes
    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes

    def raw_response(self) -> bytes:
        """The answer for the client: hop-by-hop headers gone, the body re-framed, then close."""
        kept = [
            (name, value)
            for name, value in strip_hop_by_hop(self.headers)
            if name.lower() not in _REFRAMED
        ]
        lines = [b"HTTP/1.1 %d %s" % (self.status, clean_reason_phrase(self.phrase))]
        lines += [name + b": " + value for name, value in kept]
        lines += [b"Content-Length: %d" % len(self.body), b"Connection: close"]
        return b"\r\n".join(lines) + b"\r\n\r\n" + self.body


def parse_head(head: bytes) -> tuple[int, bytes, list[tuple[bytes, bytes]]] | None:
    """Status, reason phrase and headers of a response head (None if it is not one)."""
    lines = head.rstrip(b"\r\n").split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
        return None
    headers = []
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not name or name != name.strip():
            return None
        headers.append((name, value.strip(b" \t")))
    return int(parts[1]), parts[2] if len(parts) > 2 else b"", headers


def switching(data: bytes) -> bool:
    """
    Whether an answer's status line is ``HTTP/x 101 ...``: a head
    :func:`parse_head` reads either as a 101 or not at all, Autobahn's to
    check whole (the upstream leg does not parse it first).
    """
    parts = data[: data.find(b"\r\n")].split(b" ", 2)
    return len(parts) >= 2 and parts[1] == b"101" and parts[0].startswith(b"HTTP/")


def refusal_body(
    headers: Sequence[tuple[bytes, bytes]], data: bytes, closed: bool
) -> bytes | None:
    """
    The body of a refusal from the bytes after its head, once it is complete
    (its ``Content-Length``, its last chunk, or the connection's close) or
    longer than :data:`MAX_REFUSAL_BODY` (then cut there); None while more is
    to come. ``closed``: the upstream closed the connection.
    """
    if b"chunked" in tokens(get_all(headers, b"transfer-encoding")):
        body, done = _dechunk(data)
        if done or closed or len(body) >= MAX_REFUSAL_BODY:
            return body[:MAX_REFUSAL_BODY]
        return None
    lengths = get_all(headers, b"content-length")
    if lengths and lengths[0].strip().isdigit():
        wanted = min(int(lengths[0]), MAX_REFUSAL_BODY)
        if len(data) >= wanted or closed:
            return data[:wanted]
        return None
    if closed or len(data) >= MAX_REFUSAL_BODY:
        return data[:MAX_REFUSAL_BODY]
    return None


def _dechunk(data: bytes) -> tuple[bytes, bool]:
    """The chunks of ``data`` decoded so far, and whether the last one came."""
    body, at = b"", 0
    while True:
        end = data.find(b"\r\n", at)
        if end < 0:
            return body, False
        try:
            size = int(data[at:end].split(b";")[0].strip(), 16)
        except ValueError:
            return body, True
        if size == 0:
            return body, True
        start = end + 2
        body += data[start : start + size]
        if len(data) < start + size + 2:
            return body, False
        at = start + size + 2
