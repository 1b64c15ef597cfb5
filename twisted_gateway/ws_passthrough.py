"""
The relay's fast path: once both legs are open without extensions, data frames
pass from one leg to the other as bytes, whatever the read boundaries, without
Autobahn's parser (which would unmask, validate, buffer and re-frame each one).

A frame's header is checked when it is complete: opcode text or binary, FIN
set, RSV bits clear, the mask bit of the sender's side, the minimal length
encoding, the size limit, the rate limit. Then:

- a frame whole in one read is written to the other leg unchanged (a client's
  mask kept: the key was drawn by the client, RFC 6455 10.3);
- a binary frame split across reads is forwarded as it arrives, each piece as a
  fragment of the same message (an intermediary may re-fragment a message when
  no extension is in use, RFC 6455 5.4): the payload bytes stay those the sender
  wrote, a client's key rotated by the piece's offset, and between reads the
  other leg's stream is at a frame boundary, where Autobahn's pings, pongs and
  closes may still go;
- a text frame split across reads (up to :data:`TEXT_KEPT`) is kept until
  complete, its UTF-8 checked piece by piece as it arrives; it goes out
  unchanged when complete. At the first bad byte the bytes kept are handed to
  Autobahn as if it had read them, so it fails the leg (1007) exactly as it
  would have without the fast path: nothing of a bad text frame ever leaves;
- a complete control frame (ping, pong, close) is handed to Autobahn, whose
  parser is idle between frames; a partial one is kept until complete.

Everything else (fragmented messages, larger text frames, compressed or
refused frames) goes to Autobahn with every byte of the frame, and stays with
it until its parser is idle again: Autobahn owns control frames, closes and
every error.
"""

from __future__ import annotations

import codecs
import struct
from typing import TYPE_CHECKING, Protocol

from autobahn.websocket.protocol import WebSocketProtocol
from autobahn.websocket.utf8validator import Utf8Validator
from autobahn.websocket.xormasker import create_xor_masker  # type: ignore[attr-defined]

from twisted_gateway._compat import feed, sender_idle, write_now, write_pieces

if TYPE_CHECKING:
    from twisted.internet.interfaces import IReactorTime, ITransport

    from twisted_gateway.metrics import MessageFlow
    from twisted_gateway.rate_limit import TokenBucket

OPEN = WebSocketProtocol.STATE_OPEN

#: Text frames up to this size split across reads are kept until complete;
#: larger ones are Autobahn's (it streams them as fragments).
TEXT_KEPT = 64 * 1024
#: Autobahn refuses a 64-bit length above 2**63 - 1.
_NO_LIMIT = (1 << 63) - 1

_utf8_decoder = codecs.getincrementaldecoder("utf-8")

# The mixin is always combined with an Autobahn protocol; it adds nothing to the MRO at run time.
if TYPE_CHECKING:
    _Leg = WebSocketProtocol
else:
    _Leg = object


class Counts(Protocol):
    """What one way of a pair carried, and its rate bucket: :class:`twisted_gateway.ws_pair.Direction`."""

    messages: int
    payload_bytes: int
    flow: MessageFlow
    bucket: TokenBucket | None


class Clocked(Protocol):
    """A leg's or a pair's factory: the gateway's clock."""

    clock: IReactorTime


class RatedPair(Protocol):
    """What the fast path asks of its leg's pair (:class:`twisted_gateway.ws_pair.Pair`)."""

    @property
    def factory(self) -> Clocked: ...

    def rate_exceeded(self) -> None: ...


def unmask(payload: bytes, key: bytes) -> bytes:
    """
    A masked frame payload in clear (RFC 6455 5.3). Chat-sized payloads take
    one big-integer XOR (a sixth of the cost of setting up Autobahn's masker);
    larger ones Autobahn's vectorised masker.
    """
    n = len(payload)
    if n > 1024:
        return bytes(create_xor_masker(key, n).process(payload))
    if not n:
        return payload
    keys = (key * ((n >> 2) + 1))[:n]
    return (int.from_bytes(payload, "little") ^ int.from_bytes(keys, "little")).to_bytes(n, "little")


def rotate(key: bytes, offset: int) -> bytes:
    """The mask key of a fragment starting ``offset`` bytes into a masked payload."""
    shift = offset & 3
    return key[shift:] + key[:shift] if shift else key


def fragment_header(opcode: int, fin: bool, length: int, key: bytes | None) -> bytes:
    """The header of a frame of ``length`` payload bytes, minimally encoded, with ``key`` if masked."""
    b0 = (0x80 if fin else 0) | opcode
    bit = 0 if key is None else 0x80
    if length < 126:
        head = bytes((b0, bit | length))
    elif length < 65536:
        head = struct.pack("!BBH", b0, bit | 126, length)
    else:
        head = struct.pack("!BBQ", b0, bit | 127, length)
    return head if key is None else head + key


def utf8_so_far(decoder: codecs.IncrementalDecoder, piece: bytes, final: bool) -> bool:
    """
    Whether the text read so far can still be valid UTF-8, as Autobahn's
    validator judges it byte by byte: Python's decoder waits for the rest of
    a sequence that can already be refused (a surrogate's ``ED A0``), so the
    bytes it holds back are checked with Autobahn's validator.
    """
    try:
        decoder.decode(piece, final)
    except UnicodeDecodeError:
        return False
    pending = decoder.getstate()[0]
    return not pending or bool(Utf8Validator().validate(pending)[0])


class Passthrough(_Leg):
    """
    The fast path of one relay leg (a mixin of ``ws_relay._RelayLeg``): what it
    does with the bytes it reads, and what it keeps between reads.
    """

    # set by the leg and its pair (the pair and the partner from its join on)
    partner: Passthrough | None
    transport: ITransport | None
    pair: RatedPair | None
    side: str
    #: ws_pair.Direction: the pair's counters and rate bucket of what this leg receives
    direction: Counts
    # Autobahn's options, class attributes of each leg class (_compat.with_options)
    maxMessagePayloadSize: int
    maxFramePayloadSize: int

    #: both legs open without extensions: data frames pass through as bytes
    passthrough = False
    #: the start of a frame whose header (a control frame: the whole) is not in yet
    _head = b""
    #: payload bytes still to come of the data frame under way
    _left = 0
    #: the size of that frame, its mask key, and its payload bytes read so far
    _size = 0
    _key: bytes | None = None
    _offset = 0
    #: a text frame kept until complete: its bytes so far and its UTF-8 decoder
    _kept: list[bytes] | None = None
    _decoder: codecs.IncrementalDecoder | None = None
    #: a rate token was taken for the frame handed to Autobahn (onMessageBegin takes none)
    _prepaid = False

    def _pass_frames(self, data: bytes) -> bytes:
        """
        Forward what the fast path takes of ``data`` (and of the frame under
        way) and return what Autobahn gets: from the first frame it does not
        take, to the end.
        """
        out: list[bytes | memoryview] = []  # what goes to the other leg, in order
        i = 0
        rest = b""
        over_rate = False
        head = self._head
        if not head and not self._left and self.direction.bucket is None:
            i = self._whole_frames(data)
            if i == len(data):
                assert self.partner is not None  # _whole_frames took frames for it
                write_now(self.partner.transport, data)
                return b""
            if i:
                out.append(memoryview(data)[:i])
        elif head:
            # The frame begun in the last read: its header (a control frame: the
            # whole) completed from the first bytes of this one, without
            # copying the rest of this read.
            self._head = b""
            joined = head
            for _ in range(2):
                wanted = _wanted(joined)
                if len(joined) >= wanted or len(joined) - len(head) == len(data):
                    break
                joined = head + data[: wanted - len(head)]
            i = len(joined) - len(head)
            rest, over_rate = self._scan(memoryview(joined), 0, out)
            if rest or over_rate:
                rest = rest + data[i:]
        if not rest and not over_rate and i < len(data):
            rest, over_rate = self._scan(memoryview(data), i, out)
        if out:
            assert self.partner is not None  # _whole_frames or _scan took frames for it
            write_pieces(self.partner.transport, out)
        if over_rate:
            assert self.pair is not None  # the fast path runs once the pair joined both legs
            self.pair.rate_exceeded()
        return rest

    def _whole_frames(self, data: bytes) -> int:
        """
        The common case, on its own for speed: how many bytes at the start of
        ``data`` are whole text and binary frames under 64 KiB that pass
        (counted here; the caller writes them).
        """
        peer = self.partner
        if self.state != OPEN or peer is None or peer.state != OPEN or not sender_idle(peer):
            return 0
        masked = self.side == "client"
        mask_bit = 0x80 if masked else 0
        limit = min(self.maxMessagePayloadSize or _NO_LIMIT, self.maxFramePayloadSize or _NO_LIMIT)
        direction = self.direction
        flow = direction.flow
        end = len(data)
        i = count = total = 0
        while i + 2 <= end:
            b0 = data[i]
            b1 = data[i + 1]
            n = b1 & 0x7F
            if (b0 != 0x81 and b0 != 0x82) or (b1 & 0x80) != mask_bit or n == 127:
                break
            start = i + 2
            if n == 126:
                n = int.from_bytes(data[start : start + 2], "big")
                if n < 126 or start + 2 > end:
                    break
                start += 2
            key = None
            if masked:
                key = data[start : start + 4]
                start += 4
            stop = start + n
            if stop > end or n > limit:
                break
            if b0 == 0x81:
                payload = data[start:stop]
                try:
                    (payload if key is None else unmask(payload, key)).decode("utf-8")
                except UnicodeDecodeError:
                    break
            flow.count(n)
            count += 1
            total += n
            i = stop
        if count:
            direction.messages += count
            direction.payload_bytes += total
        return i

    def _scan(self, data: memoryview, i: int, out: list[bytes | memoryview]) -> tuple[bytes, bool]:
        """
        Take frames from ``data[i:]`` into ``out``; returns what Autobahn gets,
        and whether the rate limit refused a message.
        """
        peer = self.partner
        masked = self.side == "client"  # RFC 6455 5.1: clients mask, servers never do
        mask_bit = 0x80 if masked else 0
        limit = min(self.maxMessagePayloadSize or _NO_LIMIT, self.maxFramePayloadSize or _NO_LIMIT)
        bucket = self.direction.bucket
        pair = self.pair
        assert pair is not None  # the fast path runs once the pair joined both legs
        run = -1  # where the run of whole frames not yet in ``out`` starts
        over_rate = False  # a message over ws_rate_limit: Autobahn gets it, the pair ends
        end = len(data)
        while i < end:
            if self._left:
                i, rest = self._frame_data(data, i, out)
                if rest or self._left:
                    return rest, False
                continue
            # A frame boundary.
            if self.state != OPEN or peer is None or peer.state != OPEN:
                break
            if end - i < 2:
                self._head = bytes(data[i:])
                end = i  # the kept bytes are not part of the run
                break
            b0 = data[i]
            b1 = data[i + 1]
            n = b1 & 0x7F
            if (b1 & 0x80) != mask_bit:
                break
            start = i + 2 + (4 if masked else 0)
            if b0 == 0x81 or b0 == 0x82:
                if n > 125:
                    wide = 2 if n == 126 else 8
                    start += wide
                    if start > end:
                        self._head = bytes(data[i:])
                        end = i  # the kept bytes are not part of the run
                        break
                    n = int.from_bytes(data[i + 2 : i + 2 + wide], "big")
                    if n < (126 if wide == 2 else 65536):
                        break  # not the minimal length encoding: Autobahn fails it
                elif start > end:
                    self._head = bytes(data[i:])
                    end = i  # the kept bytes are not part of the run
                    break
                if n > limit or not sender_idle(peer):
                    break
                key = bytes(data[start - 4 : start]) if masked else None
                stop = start + n
                if stop <= end:  # whole in this read
                    if b0 == 0x81 and not _valid_text(data[start:stop], key):
                        break  # Autobahn fails it with 1007
                    if bucket is not None and not bucket.take(pair.factory.clock.seconds()):
                        over_rate = True
                        break
                    if run < 0:
                        run = i
                    self._size = n
                    self._message_done()
                    i = stop
                    continue
                if b0 == 0x81 and n > TEXT_KEPT:
                    break
                if bucket is not None and not bucket.take(pair.factory.clock.seconds()):
                    over_rate = True
                    break
                if run >= 0:
                    out.append(data[run:i])
                    run = -1
                self._size, self._key, self._offset, self._left = n, key, 0, n
                if b0 == 0x81:
                    self._kept = [bytes(data[i:start])]
                    self._decoder = _utf8_decoder()
                return self._frame_data(data, start, out)[1], False
            if b0 in (0x88, 0x89, 0x8A) and n <= 125 and (b0 != 0x88 or n != 1):
                stop = start + n
                if stop > end:
                    self._head = bytes(data[i:])
                    end = i  # the kept bytes are not part of the run
                    break
                if run >= 0:
                    out.append(data[run:i])
                    run = -1
                if out:
                    write_pieces(peer.transport, out)
                    out.clear()
                feed(self, bytes(data[i:stop]))  # Autobahn answers, relays or fails it
                i = stop
                continue
            break
        if run >= 0:
            out.append(data[run:i])
        return (bytes(data[i:]) if i < end else b""), over_rate

    def _frame_data(self, data: memoryview, i: int, out: list[bytes | memoryview]) -> tuple[int, bytes]:
        """
        Take the payload of the data frame under way from ``data[i:]``: forward
        a binary piece, or keep and check a text piece. Returns where the
        frame's bytes in ``data`` stop, and what Autobahn gets (the bytes of a
        text frame it must judge, and everything after them).
        """
        left = self._left
        stop = min(len(data), i + left)
        piece = data[i:stop]
        left -= stop - i
        self._left = left
        kept = self._kept
        key = self._key
        offset = self._offset
        self._offset = offset + len(piece)
        if kept is None:
            # Binary: the piece goes out as a fragment (its first, if nothing went yet).
            peer = self.partner
            assert peer is not None  # _scan checked it at the frame's start; only finish clears it
            if piece and peer.state == OPEN:
                opcode = 0 if offset else 2
                out.append(fragment_header(opcode, not left, len(piece), key if key is None else rotate(key, offset)))
                out.append(piece)
            if not left:
                self._message_done()
            return stop, b""
        text = bytes(piece)
        kept.append(text)
        decoder = self._decoder
        assert decoder is not None
        if not utf8_so_far(decoder, text if key is None else unmask(text, rotate(key, offset)), not left):
            return stop, self._hand_over() + bytes(data[stop:])
        if left:
            return stop, b""
        peer = self.partner
        assert peer is not None  # (as above)
        if self.state != OPEN or peer.state != OPEN or not sender_idle(peer):
            return stop, self._hand_over() + bytes(data[stop:])
        out.append(b"".join(kept))
        self._kept = self._decoder = None
        self._message_done()
        return stop, b""

    def _hand_over(self) -> bytes:
        """The bytes of the text frame kept so far, for Autobahn (its rate token already taken)."""
        kept = self._kept
        assert kept is not None
        self._kept = self._decoder = None
        self._left = 0
        self._prepaid = self.direction.bucket is not None
        return b"".join(kept)

    def _message_done(self) -> None:
        size = self._size
        direction = self.direction
        direction.messages += 1
        direction.payload_bytes += size
        direction.flow.count(size)


def _valid_text(payload: memoryview, key: bytes | None) -> bool:
    """Whether a whole text frame's payload is UTF-8."""
    try:
        (bytes(payload) if key is None else unmask(bytes(payload), key)).decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _wanted(start: bytes) -> int:
    """
    How many bytes of a frame beginning with ``start`` the fast path reads
    before it decides: the header of a data frame, the whole of a control
    frame, two bytes of anything else.
    """
    if len(start) < 2:
        return 2
    b0, b1 = start[0], start[1]
    n = b1 & 0x7F
    header = 2 + (4 if b1 & 0x80 else 0)
    if b0 == 0x81 or b0 == 0x82:
        return header + (2 if n == 126 else 8 if n == 127 else 0)
    if b0 in (0x88, 0x89, 0x8A) and n <= 125:
        return header + n
    return 2  # Autobahn decides on two bytes
