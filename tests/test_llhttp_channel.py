"""
The client-facing parser (llhttp under twisted.web's ``HTTPChannel``), without
sockets: what ``HTTPChannel`` did with a request's bytes, it still does
(pipelining in order, ``Expect: 100-continue``, chunked bodies, ``HEAD``,
keep-alive and ``Connection: close``, the head's size limit), and llhttp
refuses what twisted.web let through or answered differently.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.test_site import Door, close, error_of, status_of

HOST = b"Host: gw\r\n"


def responses(raw: bytes) -> list[bytes]:
    """The answers' status lines and bodies, in order (``Answer`` sends small bodies)."""
    return [b"HTTP/1.1 " + part for part in raw.split(b"HTTP/1.1 ")[1:]]


def bodies(raw: bytes) -> list[bytes]:
    return [answer.partition(b"\r\n\r\n")[2] for answer in responses(raw)]


# -- pipelining ----------------------------------------------------------------------------


def post(path: bytes, body: bytes) -> bytes:
    return b"POST " + path + b" HTTP/1.1\r\n" + HOST + b"Content-Length: %d\r\n\r\n" % len(body) + body


def test_requests_pipelined_in_one_read_are_answered_in_order():
    door = Door()
    channel, transport = door.connect()
    channel.dataReceived(b"GET /a HTTP/1.1\r\n" + HOST + b"\r\n" + post(b"/b", b"abc") + post(b"/c", b"vwxyz"))
    assert bodies(transport.value()) == [b"0", b"3", b"5"]
    assert not transport.disconnecting
    close(channel)


def test_a_request_parsed_ahead_waits_for_the_one_being_answered():
    door = Door()
    channel, transport = door.connect()
    channel.dataReceived(b"GET /hold HTTP/1.1\r\n" + HOST + b"\r\n" + post(b"/next", b"abcd")[:-2])
    assert transport.value() == b""
    channel.dataReceived(b"cd")  # the rest of the waiting request's body, kept meanwhile
    (held,) = door.resource.held
    held.setHeader(b"content-length", b"5")
    held.write(b"first")
    held.finish()
    assert bodies(transport.value()) == [b"first", b"4"]
    close(channel)


def test_a_thousand_pipelined_requests_answered_at_once_are_all_answered():
    door = Door()
    channel, transport = door.connect()
    channel.dataReceived((b"GET /hold HTTP/1.1\r\n" + HOST + b"\r\n") + (b"GET /x HTTP/1.1\r\n" + HOST + b"\r\n") * 1000)
    door.resource.held.pop().finish()
    assert transport.value().count(b"HTTP/1.1 200 ") == 1001
    close(channel)


def test_a_client_pipelining_more_than_a_little_while_a_request_is_answered_is_paused():
    door = Door()
    channel, transport = door.connect()
    channel.dataReceived(b"GET /hold HTTP/1.1\r\n" + HOST + b"\r\n")
    for _ in range(10):
        channel.dataReceived(post(b"/up", b"b" * 2000))
    assert transport.producerState == "paused"  # as HTTPChannel: past 16 KiB kept unparsed
    door.resource.held.pop().finish()
    assert transport.producerState == "producing"
    assert bodies(transport.value())[1:] == [b"2000"] * 10
    close(channel)


def chunked(path: bytes, body: bytes, sizes: list[int]) -> bytes:
    head = b"POST " + path + b" HTTP/1.1\r\n" + HOST + b"Transfer-Encoding: chunked\r\n\r\n"
    chunks, rest = [], body
    for size in sizes:
        if rest:
            chunks.append(b"%x\r\n%s\r\n" % (min(size, len(rest)), rest[:size]))
            rest = rest[size:]
    if rest:
        chunks.append(b"%x\r\n%s\r\n" % (len(rest), rest))
    return head + b"".join(chunks) + b"0\r\n\r\n"


REQUEST = st.one_of(
    st.just((b"GET /x HTTP/1.1\r\n" + HOST + b"\r\n", b"0")),
    st.just((b"HEAD /x HTTP/1.1\r\n" + HOST + b"\r\n", b"")),
    st.binary(max_size=300).map(lambda body: (post(b"/up", body), b"%d" % len(body))),
    st.tuples(st.binary(max_size=300), st.lists(st.integers(1, 50), max_size=5)).map(
        lambda case: (chunked(b"/up", case[0], case[1]), b"%d" % len(case[0]))
    ),
)


@settings(max_examples=200, deadline=None, derandomize=True, database=None)
@given(
    requests=st.lists(REQUEST, min_size=1, max_size=6),
    cuts=st.lists(st.integers(0, 4000), max_size=8),
    held=st.booleans(),
)
def test_pipelined_requests_cut_anywhere_into_reads_get_the_same_answers_in_order(requests, cuts, held):
    """However the bytes are split into reads, and whether a held request makes them wait."""
    door = Door()
    channel, transport = door.connect()
    data = b"".join(raw for raw, _ in requests)
    if held:
        data = b"GET /hold HTTP/1.1\r\n" + HOST + b"\r\n" + data
    points = sorted({0, len(data), *(cut % (len(data) + 1) for cut in cuts)})
    for start, end in zip(points, points[1:]):
        channel.dataReceived(data[start:end])
    if held:
        request = door.resource.held.pop()
        request.setHeader(b"content-length", b"4")
        request.write(b"held")
        request.finish()
    expected = [answer for _, answer in requests]
    assert bodies(transport.value()) == ([b"held"] if held else []) + expected
    assert not transport.disconnecting and not door.resource.held
    close(channel)


@pytest.mark.parametrize(
    "broken",
    [
        b"GET / HTTP/1.1\r\nBad Name: x\r\n\r\n",
        b"POST /up HTTP/1.1\r\n" + HOST + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n",
    ],
    ids=["head", "chunked-body"],
)
def test_a_malformed_request_behind_a_held_one_is_refused_after_its_answer(broken):
    door = Door()
    channel, transport = door.connect()
    channel.dataReceived(b"GET /hold HTTP/1.1\r\n" + HOST + b"\r\n" + broken)
    assert transport.value() == b""
    door.resource.held.pop().finish()
    first, second = responses(transport.value())
    assert status_of(first) == 200 and status_of(second) == 400
    assert error_of(second)["error"] == "bad_request"
    assert transport.disconnecting
    close(channel)


# -- what llhttp refuses -------------------------------------------------------------------


@pytest.mark.parametrize(
    "head",
    [
        b"POST / HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: gw\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: gw\r\nContent-Length: 3, 3\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: gw\r\nContent-Length: +3\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: gzip\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: gw\r\nX-Folded: a\r\n b\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: gw\rX-Smuggled: 1\r\n\r\n",
        b"GET / HTTP/1.1\nHost: gw\n\n",
        b"GET / HTTP/1.1\r\nHost: gw\r\nX-Nul: a\x00b\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost : gw\r\n\r\n",
        b"GET /a b HTTP/1.1\r\nHost: gw\r\n\r\n",
        b"GET /\r\n\r\n",
        b"GET / HTTP/1.2\r\nHost: gw\r\n\r\n",
    ],
    ids=[
        "te-and-cl",
        "two-cl",
        "cl-list",
        "cl-sign",
        "te-not-chunked",
        "obs-fold",
        "bare-cr",
        "bare-lf",
        "nul",
        "space-before-colon",
        "space-in-target",
        "http-0.9",
        "http-1.2",
    ],
)
def test_an_ambiguous_or_malformed_head_gets_400_json_and_never_reaches_the_resource(head):
    door = Door()
    channel, transport = door.connect()
    channel.dataReceived(head + b"abc0\r\n\r\nGET /hold HTTP/1.1\r\nHost: gw\r\n\r\n")
    assert status_of(transport.value()) == 400
    assert error_of(transport.value())["error"] == "bad_request"
    assert transport.disconnecting
    assert transport.value().count(b"HTTP/1.1 ") == 1
    assert door.resource.held == []
    close(channel)


def test_a_header_value_keeps_its_inner_spaces_and_loses_the_outer_ones():
    door = Door()
    channel, transport = door.connect()
    channel.dataReceived(b"GET /hold HTTP/1.1\r\nHost: gw\r\nX-Note:  a  b \t\r\n\r\n")
    (request,) = door.resource.held
    assert request.requestHeaders.getRawHeaders(b"x-note") == [b"a  b"]
    request.finish()
    close(channel)


# -- the head's size -----------------------------------------------------------------------


@pytest.mark.parametrize("reads", [1, 7], ids=["one-read", "trickled"])
def test_a_head_over_max_header_size_gets_431_however_it_arrives(reads):
    door = Door(max_header_size=1024)
    channel, transport = door.connect()
    head = b"GET / HTTP/1.1\r\nHost: gw\r\n" + b"".join(b"X-Pad-%d: %s\r\n" % (i, b"p" * 90) for i in range(12))
    step = len(head) // reads + 1
    for start in range(0, len(head), step):
        channel.dataReceived(head[start : start + step])
    assert status_of(transport.value()) == 431
    assert error_of(transport.value())["error"] == "header_too_large"
    close(channel)


def test_a_head_just_within_max_header_size_is_served():
    door = Door(max_header_size=1024)
    channel, transport = door.connect()
    line = b"GET / HTTP/1.1"  # counted as HTTPChannel counts: lines without their ends
    pad = 1024 - len(line) - len(b"Host: gw") - len(b"X-Pad: ")
    channel.dataReceived(line + b"\r\nHost: gw\r\nX-Pad: " + b"p" * pad + b"\r\n\r\n")
    assert status_of(transport.value()) == 200
    close(channel)


# -- bodies, Expect, HEAD, persistence --------------------------------------------------------


def test_a_chunked_body_is_read_whole_and_its_trailer_dropped():
    door = Door()
    channel, transport = door.connect()
    channel.dataReceived(b"POST /up HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n3;x=y\r\nabc\r\n")
    channel.dataReceived(b"5\r\ndefgh\r\n0\r\nX-Trailer: 1\r\n\r\n")
    assert bodies(transport.value()) == [b"8"]
    close(channel)


def test_expect_100_continue_is_answered_before_the_body_arrives():
    door = Door()
    channel, transport = door.connect()
    channel.dataReceived(b"POST /up HTTP/1.1\r\nHost: gw\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n")
    assert transport.value() == b"HTTP/1.1 100 Continue\r\n\r\n"
    channel.dataReceived(b"ok")
    assert bodies(transport.value())[-1] == b"2"
    close(channel)


def test_cookies_are_parsed_as_twisted_web_does_for_the_requests_that_send_some():
    door = Door()
    channel, transport = door.connect()
    get = b"GET /hold HTTP/1.1\r\n" + HOST
    channel.dataReceived(get + b"\r\n" + get + b"Cookie: a=1; b=2\r\n\r\n" + get + b"\r\n")
    received = []
    for _ in range(3):
        (held,) = door.resource.held
        door.resource.held.clear()
        received.append(held.received_cookies)
        held.finish()
    assert received == [{}, {b"a": b"1", b"b": b"2"}, {}]
    close(channel)


def test_head_gets_the_head_only():
    door = Door()
    channel, transport = door.connect()
    channel.dataReceived(b"HEAD / HTTP/1.1\r\nHost: gw\r\n\r\nGET / HTTP/1.1\r\nHost: gw\r\n\r\n")
    head, get = responses(transport.value())
    assert head.endswith(b"\r\n\r\n") and b"Content-Length: 1" in head
    assert get.endswith(b"\r\n\r\n0")
    close(channel)


@pytest.mark.parametrize(
    "first",
    [
        b"GET / HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: gw\r\nConnection: keep-alive, close\r\n\r\n",
        b"GET / HTTP/1.0\r\nHost: gw\r\n\r\n",
    ],
    ids=["close", "close-in-a-list", "http-1.0"],
)
def test_a_request_that_ends_its_connection_is_the_last_one_read(first):
    door = Door()
    channel, transport = door.connect()
    channel.dataReceived(first + b"GET /hold HTTP/1.1\r\nHost: gw\r\n\r\n")
    assert transport.value().count(b" 200 OK") == 1
    assert transport.disconnecting
    assert door.resource.held == []
    close(channel)


def test_an_upgrade_that_is_not_taken_is_answered_and_ends_the_connection():
    door = Door()
    channel, transport = door.connect()
    channel.dataReceived(
        b"POST /up HTTP/1.1\r\nHost: gw\r\nConnection: upgrade\r\nUpgrade: h2c\r\nContent-Length: 3\r\n\r\nab"
    )
    assert transport.value() == b""
    channel.dataReceived(b"cGET /hold HTTP/1.1\r\nHost: gw\r\n\r\n")
    assert bodies(transport.value()) == [b"3"]
    assert b"Connection: close" in transport.value()
    assert transport.disconnecting and door.resource.held == []
    close(channel)


def test_a_head_on_its_way_keeps_the_connection_from_being_idle():
    door = Door()
    channel, _ = door.connect()
    assert channel.is_idle()
    channel.dataReceived(b"GET / HTTP/1.1\r\nHo")
    assert not channel.is_idle()
    channel.dataReceived(b"st: gw\r\n\r\n")
    assert channel.is_idle()
    close(channel)

