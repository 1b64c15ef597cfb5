"""
An upstream that answers HTTP ambiguously or malformed, on loopback: a raw
TCP upstream writes exact bytes, a raw client asks through a real gateway.

Whatever the upstream sends, the client gets either a clean answer (the
upstream's, framed by the gateway), a 502 JSON answer counted against the
upstream, or (once the upstream's head has been passed on) a connection cut
before the body ends; none of the bad answer's bytes reaches the client as
framing or as another answer; the connection that carried it is closed, never
pooled; and the next request to the same upstream is answered on a fresh one.
Where RFC 9112 lets a recipient choose, we refuse as nginx does: two
``Content-Length`` headers (equal or not), ``Content-Length`` beside
``Transfer-Encoding``, and any ``Transfer-Encoding`` but ``chunked``.
"""

from __future__ import annotations

import json
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Callable

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory
from twisted.logger import LogLevel, capturedLogs

from tests.integration.test_upstream_client import Scripted, scripted
from tests.support import GUARD, parse_response, raw_connect, start_gateway

FRESH = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfresh"
BAD = b"/v1/chat/bad"


def answer(*lines: bytes, body: bytes = b"") -> bytes:
    """A response of the given status and header lines, then ``body``, as they go on the wire."""
    return b"".join(line + b"\r\n" for line in lines) + b"\r\n" + body


def by_path(
    answers: dict[bytes, bytes], closing: tuple[bytes, ...] = (), bytewise: bool = False
) -> Callable[[Scripted, bytes], None]:
    """
    A :func:`scripted` upstream's answer: ``answers[path]`` (then a close, for
    a path in ``closing``), else FRESH; ``bytewise``: one byte a reactor turn.
    """

    def answer(connection: Scripted, head: bytes) -> None:
        path = head.split(b" ", 2)[1]
        data = answers.get(path, FRESH)
        write(connection, data if bytewise and path in answers else b"", data, path in closing)

    def write(connection: Scripted, pending: bytes, data: bytes, close: bool) -> None:
        if connection.closed.called:
            return
        if pending:
            connection.transport.write(pending[:1])
            reactor.callLater(0, write, connection, pending[1:], b"", close)
            return
        connection.transport.write(data)
        if close:
            connection.transport.loseConnection()

    return answer


def closed_by_gateway(connection: Scripted) -> Deferred[None]:
    """Fires when ``connection`` is closed (the upstream here closes only when told)."""
    return connection.closed.addTimeout(GUARD, reactor)


def config(port: int) -> str:
    return f"""
[gateway]
request_timeout = 10
[route:chat]
prefix = /v1/chat
upstream = http://127.0.0.1:{port}
max_fails = 1000
"""


async def ask(port: int, method: bytes, path: bytes) -> bytes:
    client = await raw_connect(port)
    client.transport.write(method + b" " + path + b" HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n")
    return await client.lost.addTimeout(GUARD, reactor)


#: (id, request method, the upstream's bytes, whether it closes after them,
#: what the client gets: "502", "cut" (the upstream's head, then a cut body) or
#: (status, body, whether the upstream's connection is reused))
CASES = [
    # framing: ambiguous lengths
    ("te-and-cl", b"GET", answer(b"HTTP/1.1 200 OK", b"Content-Length: 5", b"Transfer-Encoding: chunked",
                                 body=b"5\r\nhello\r\n0\r\n\r\n"), False, "502"),
    ("cl-and-te", b"GET", answer(b"HTTP/1.1 200 OK", b"Transfer-Encoding: chunked", b"Content-Length: 5",
                                 body=b"5\r\nhello\r\n0\r\n\r\n"), False, "502"),
    ("two-cl-differ", b"GET", answer(b"HTTP/1.1 200 OK", b"Content-Length: 5", b"Content-Length: 11",
                                     body=b"hellohijack"), False, "502"),
    ("two-cl-same", b"GET", answer(b"HTTP/1.1 200 OK", b"Content-Length: 5", b"Content-Length: 5",
                                   body=b"hello"), False, "502"),
    ("cl-list", b"GET", answer(b"HTTP/1.1 200 OK", b"Content-Length: 5, 5", body=b"hello"), False, "502"),
    ("te-gzip-chunked", b"GET", answer(b"HTTP/1.1 200 OK", b"Transfer-Encoding: gzip, chunked",
                                       body=b"5\r\nhello\r\n0\r\n\r\n"), False, "502"),
    ("te-chunked-gzip", b"GET", answer(b"HTTP/1.1 200 OK", b"Transfer-Encoding: chunked, gzip",
                                       body=b"5\r\nhello\r\n0\r\n\r\n"), True, "502"),
    ("te-identity", b"GET", answer(b"HTTP/1.1 200 OK", b"Transfer-Encoding: identity", body=b"hello"), True, "502"),
    ("te-two-headers", b"GET", answer(b"HTTP/1.1 200 OK", b"Transfer-Encoding: chunked", b"Transfer-Encoding: chunked",
                                      body=b"5\r\nhello\r\n0\r\n\r\n"), False, "502"),
    ("te-chunked-upper", b"GET", answer(b"HTTP/1.1 200 OK", b"Transfer-Encoding: CHUNKED",
                                        body=b"5\r\nhello\r\n0\r\n\r\n"), False, (200, b"hello", True)),
    # header lines
    ("bare-cr-in-header", b"GET", answer(b"HTTP/1.1 200 OK", b"X-A: 1\rContent-Length: 7", b"Content-Length: 5",
                                         body=b"hello"), False, "502"),
    ("bare-lf-in-header", b"GET", answer(b"HTTP/1.1 200 OK", b"X-A: 1\nContent-Length: 7", b"Content-Length: 5",
                                         body=b"hello"), False, "502"),
    ("obs-fold", b"GET", answer(b"HTTP/1.1 200 OK", b"X-A: 1", b" Content-Length: 7", b"Content-Length: 5",
                                body=b"hello"), False, "502"),
    ("nul-in-value", b"GET", answer(b"HTTP/1.1 200 OK", b"X-A: 1\x00X", b"Content-Length: 5", body=b"hello"),
     False, "502"),
    ("space-before-colon", b"GET", answer(b"HTTP/1.1 200 OK", b"Content-Length : 5", body=b"hello"), False, "502"),
    ("no-colon", b"GET", answer(b"HTTP/1.1 200 OK", b"Content-Length 5", body=b"hello"), False, "502"),
    # status lines
    ("http-2", b"GET", answer(b"HTTP/2.0 200 OK", b"Content-Length: 5", body=b"hello"), False, "502"),
    ("http-0.9", b"GET", b"hello\r\n", True, "502"),
    ("icy", b"GET", answer(b"ICY 200 OK", b"Content-Length: 5", body=b"hello"), False, "502"),
    ("http-1.2", b"GET", answer(b"HTTP/1.2 200 OK", b"Content-Length: 5", body=b"hello"), False, "502"),
    ("status-1000", b"GET", answer(b"HTTP/1.1 1000 OK", b"Content-Length: 5", body=b"hello"), False, "502"),
    ("status-letters", b"GET", answer(b"HTTP/1.1 2OO OK", b"Content-Length: 5", body=b"hello"), False, "502"),
    # lengths
    ("cl-negative", b"GET", answer(b"HTTP/1.1 200 OK", b"Content-Length: -5", body=b"hello"), False, "502"),
    ("cl-plus", b"GET", answer(b"HTTP/1.1 200 OK", b"Content-Length: +5", body=b"hello"), False, "502"),
    ("cl-hex", b"GET", answer(b"HTTP/1.1 200 OK", b"Content-Length: 0x5", body=b"hello"), False, "502"),
    ("cl-trailing-garbage", b"GET", answer(b"HTTP/1.1 200 OK", b"Content-Length: 5x", body=b"hello"), False, "502"),
    ("cl-overflow", b"GET", answer(b"HTTP/1.1 200 OK", b"Content-Length: 18446744073709551616",
                                   body=b"hello"), False, "502"),
    ("cl-empty", b"GET", answer(b"HTTP/1.1 200 OK", b"Content-Length: ", body=b"hello"), False, "502"),
    ("chunk-size-garbage", b"GET", answer(b"HTTP/1.1 200 OK", b"Transfer-Encoding: chunked",
                                          body=b"5\r\nhello\r\nzz\r\nhijack\r\n0\r\n\r\n"), False, "cut"),
    ("chunk-size-overflow", b"GET", answer(b"HTTP/1.1 200 OK", b"Transfer-Encoding: chunked",
                                           body=b"5\r\nhello\r\n1" + b"0" * 16 + b"\r\nhijack\r\n"), False, "cut"),
    ("chunk-no-crlf", b"GET", answer(b"HTTP/1.1 200 OK", b"Transfer-Encoding: chunked",
                                     body=b"5\r\nhellohijack\r\n0\r\n\r\n"), False, "cut"),
    ("trailer", b"GET", answer(b"HTTP/1.1 200 OK", b"Transfer-Encoding: chunked",
                               body=b"5\r\nhello\r\n0\r\nX-Hijack: 1\r\n\r\n"), False, (200, b"hello", True)),
    ("trailer-content-length", b"GET", answer(b"HTTP/1.1 200 OK", b"Transfer-Encoding: chunked",
                                              body=b"5\r\nhello\r\n0\r\nContent-Length: 6\r\n\r\nhijack"), False,
     "cut"),
    ("chunk-extension", b"GET", answer(b"HTTP/1.1 200 OK", b"Transfer-Encoding: chunked",
                                       body=b"5;hijack=1\r\nhello\r\n0\r\n\r\n"), False, (200, b"hello", True)),
    ("body-longer-than-cl", b"GET", answer(b"HTTP/1.1 200 OK", b"Content-Length: 5",
                                           body=b"hello" + answer(b"HTTP/1.1 200 OK", b"Content-Length: 6",
                                                                  body=b"hijack")), False, (200, b"hello", False)),
    # messages without a body, and interim answers
    ("head-with-body", b"HEAD", answer(b"HTTP/1.1 200 OK", b"Content-Length: 6", body=b"hijack"), False, (200, b"", False)),
    ("204-with-body", b"GET", answer(b"HTTP/1.1 204 No Content", b"Content-Length: 6", body=b"hijack"), False,
     (204, b"", False)),
    ("304-with-body", b"GET", answer(b"HTTP/1.1 304 Not Modified", b"Content-Length: 6", body=b"hijack"), False,
     (304, b"", False)),
    ("100-then-200", b"GET", answer(b"HTTP/1.1 100 Continue") + answer(b"HTTP/1.1 200 OK", b"Content-Length: 5",
                                                                      body=b"hello"), False, (200, b"hello", True)),
    ("103-then-200", b"GET", answer(b"HTTP/1.1 103 Early Hints", b"Link: </a.css>; rel=preload")
     + answer(b"HTTP/1.1 200 OK", b"Content-Length: 5", body=b"hello"), False, (200, b"hello", True)),
    ("101-unasked", b"GET", answer(b"HTTP/1.1 101 Switching Protocols", b"Upgrade: hijack", b"Connection: upgrade",
                                   body=b"hijack"), False, "502"),
    ("1xx-with-body", b"GET", answer(b"HTTP/1.1 100 Continue", b"Content-Length: 6", body=b"hijack")
     + answer(b"HTTP/1.1 200 OK", b"Content-Length: 5", body=b"hello"), False, "502"),
]


#: a malformed answer on a connection the gateway reused: the upstream's fault as on a fresh one
REUSED = [case for case in CASES if case[0] in ("te-chunked-gzip", "http-2", "two-cl-same", "obs-fold")]


@asynccontextmanager
async def upstream_and_gateway(
    upstream_bytes: bytes, close_after: bool, bytewise: bool = False
) -> AsyncIterator[tuple[Factory, Any]]:
    """An upstream answering BAD with ``upstream_bytes`` and a gateway before it, for the ``async with`` block."""
    async with scripted(by_path({BAD: upstream_bytes}, (BAD,) if close_after else (), bytewise)) as (factory, _):
        gw = await start_gateway(config(factory.port))
        try:
            yield factory, gw
        finally:
            await gw.gateway.stopService()
            await gw.close()


def check_answer(raw: bytes, method: bytes, expected, failures: dict, events: list[dict]) -> None:
    """
    The client's answer is ``expected``: "502" (counted against the
    upstream), "cut", or (status, body, _); the access event says which, and
    nothing is logged as an error.
    """
    assert b"hijack" not in raw.lower()
    assert [e for e in events if e.get("log_failure") or e["log_level"] >= LogLevel.error] == []
    (outcome,) = [e["outcome"] for e in events if e.get("log_namespace") == "twisted_gateway.access"]
    assert outcome == {"502": "error", "cut": "upstream_body_failed"}.get(expected, "ok")
    status, _, headers, body, complete = parse_response(raw)
    if expected == "502":
        assert status == 502, raw
        assert json.loads(body)["error"] == "bad_gateway"
        assert [(reason, count) for (_, reason), count in failures.items()] == [("malformed_answer", 1)]
    elif expected == "cut":
        assert (status, complete) == (200, False), raw
    else:
        assert (status, body) == expected[:2], raw
        assert complete or method == b"HEAD" or status in (204, 304), raw
        assert status != 204 or not [name for name, _ in headers if name.lower() == b"content-length"], raw


@pytest.mark.parametrize(
    "method, upstream_bytes, close_after, expected", [case[1:] for case in CASES], ids=[case[0] for case in CASES]
)
@pytest.mark.parametrize("bytewise", [False, True], ids=["one-write", "bytewise"])
@pytest_twisted.ensureDeferred
async def test_a_misbehaving_upstream_answer_never_frames_the_clients_or_the_next(
    method, upstream_bytes, close_after, expected, bytewise
):
    """
    The client gets the expected answer, a 502 counted against the upstream,
    or a cut body; nothing marked ``hijack`` reaches it; a connection that
    carried a bad answer is closed by the gateway, and the next request gets
    a fresh answer on a new one (a good answer's connection is reused). The
    same whether the answer comes in one write or a byte at a time.
    """
    async with upstream_and_gateway(upstream_bytes, close_after, bytewise) as (factory, gw):
        with capturedLogs() as events:
            raw = await ask(gw.number, method, BAD)
        check_answer(raw, method, expected, dict(gw.gateway.pools["chat"].failure_counts), events)
        reused = isinstance(expected, tuple) and expected[2]
        if not reused:
            await closed_by_gateway(factory.connections[0])
        status, _, _, body, _ = parse_response(await ask(gw.number, b"GET", b"/v1/chat/ok"))
        assert (status, body, len(factory.connections)) == (200, b"fresh", 1 if reused else 2)


@pytest.mark.parametrize(
    "method, upstream_bytes, close_after, expected", [case[1:] for case in REUSED], ids=[case[0] for case in REUSED]
)
@pytest_twisted.ensureDeferred
async def test_a_malformed_answer_on_a_reused_connection_is_still_the_upstreams_fault(
    method, upstream_bytes, close_after, expected
):
    """
    A bad answer on a pooled connection is no idle close crossing the request:
    a 502 counted against the upstream, and the request is not sent again.
    """
    async with upstream_and_gateway(upstream_bytes, close_after) as (factory, gw):
        assert parse_response(await ask(gw.number, b"GET", b"/v1/chat/ok"))[3] == b"fresh"
        with capturedLogs() as events:
            raw = await ask(gw.number, method, BAD)
        check_answer(raw, method, expected, dict(gw.gateway.pools["chat"].failure_counts), events)
        assert len(factory.connections) == 1
