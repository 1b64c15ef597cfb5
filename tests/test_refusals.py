"""An upstream's refusal of a handshake, read and passed on: tables of bytes."""

from __future__ import annotations

import pytest

from twisted_gateway.refusals import MAX_REFUSAL_BODY, Refusal, parse_head, refusal_body, switching

CL = [(b"Content-Length", b"5")]
CHUNKED = [(b"Transfer-Encoding", b"chunked")]


def test_head_is_parsed_with_repeats_and_phrase():
    head = b"HTTP/1.1 401 Who Are You\r\nWWW-Authenticate: Bearer\r\nX-A: 1\r\nX-A: 2\r\n\r\n"
    assert parse_head(head) == (
        401,
        b"Who Are You",
        [(b"WWW-Authenticate", b"Bearer"), (b"X-A", b"1"), (b"X-A", b"2")],
    )


@pytest.mark.parametrize("head", [b"garbage\r\n\r\n", b"HTTP/1.1 abc\r\n\r\n", b"HTTP/1.1 403 x\r\nno colon\r\n\r\n"])
def test_what_is_not_a_head(head):
    assert parse_head(head) is None


@pytest.mark.parametrize(
    "head, expected",
    [
        (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n", True),
        (b"HTTP/1.1 101\r\n\r\n", True),
        (b"HTTP/1.1 101 x\r\nno colon\r\n\r\n", True),  # Autobahn's to refuse
        (b"HTTP/1.1 0101 x\r\n\r\n", False),  # a 101 parse_head finds: Autobahn's too
        (b"HTTP/1.1 1010 x\r\n\r\n", False),
        (b"HTTP/1.1 401 101\r\n\r\n", False),
        (b"HTTP/1.1  101\r\n\r\n", False),
        (b"XTTP/1.1 101 x\r\n\r\n", False),
    ],
)
def test_a_switching_status_line_is_one_parse_head_reads_as_101_or_not_at_all(head, expected):
    """The upstream leg skips parse_head only for heads it would have passed to Autobahn anyway."""
    assert switching(head) is expected
    if expected:
        parsed = parse_head(head)
        assert parsed is None or parsed[0] == 101


@pytest.mark.parametrize(
    "headers, data, closed, expected",
    [
        (CL, b"hel", False, None),
        (CL, b"hello", False, b"hello"),
        (CL, b"hel", True, b"hel"),  # cut short by the upstream: what came
        ([], b"until close", False, None),
        ([], b"until close", True, b"until close"),
        (CHUNKED, b"5\r\nhello\r\n", False, None),
        (CHUNKED, b"5\r\nhello\r\n6;x=y\r\n world\r\n0\r\n\r\n", False, b"hello world"),
        (CHUNKED, b"5\r\nhel", True, b"hel"),
        ([(b"Content-Length", b"%d" % (MAX_REFUSAL_BODY + 10))], b"x" * MAX_REFUSAL_BODY, False, b"x" * MAX_REFUSAL_BODY),
        ([], b"y" * (MAX_REFUSAL_BODY + 1), False, b"y" * MAX_REFUSAL_BODY),
    ],
)
def test_body_is_complete_when_its_framing_says(headers, data, closed, expected):
    assert refusal_body(headers, data, closed) == expected


def test_answer_keeps_end_to_end_headers_and_reframes_the_body():
    refusal = Refusal(
        429,
        b"Slow\rDown",
        (
            (b"Retry-After", b"7"),
            (b"Connection", b"keep-alive, X-Hop"),
            (b"X-Hop", b"1"),
            (b"Transfer-Encoding", b"chunked"),
            (b"Content-Length", b"99"),
            (b"Set-Cookie", b"a=1"),
            (b"Set-Cookie", b"b=2"),
        ),
        b'{"error": "slow down"}',
    )
    assert refusal.raw_response() == (
        b"HTTP/1.1 429 Slow Down\r\nRetry-After: 7\r\nSet-Cookie: a=1\r\nSet-Cookie: b=2\r\n"
        b"Content-Length: 22\r\nConnection: close\r\n\r\n" b'{"error": "slow down"}'
    )
