"""A passive HTTP/2 frame reader for one direction of a connection (RFC 9113).

It is fed the chunks the reassembler hands on (see :mod:`reassembly`): an
absolute offset, the real length and whatever prefix was captured. Frames
are delimited by the lengths in their 9-byte headers, so a DATA payload is
counted, never needed. What must be read is read from the captured bytes:
frame headers, header blocks (HEADERS, PUSH_PROMISE, CONTINUATION, whose
HPACK state is kept here, one decoder per direction), SETTINGS, RST_STREAM
and GOAWAY.

When a frame header lies beyond the captured bytes, or in lost bytes,
framing is lost: it is counted and the reader seeks. So does a connection
picked up mid-stream. Seeking resynchronises only on a chunk that starts a
segment and whose captured frames chain exactly to the segment's end
(HTTP/2 writers send whole frames), or end in a DATA frame that runs on
past it; every frame header on the way must be valid for its type. Since
that is a well-founded guess rather than a certainty, a bad frame after it
sends the reader back to seeking. A bad frame where framing was certain
(from the connection preface on) stops this direction for good, as it
would end a real connection. Neither ever raises: the events say what
happened, and the counters count it.

The state machine is an explicit transition table; a transition that is
not in it is a bug, reported as :class:`ProtocolError`.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from .budget import UNLIMITED, Budget
from .errors import ProtocolError
from .hpack_fields import DecodedBlock, FieldDecoder
from .reassembly import Chunk

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
"""The client connection preface (RFC 9113, 3.4)."""

DEFAULT_MAX_FRAME_SIZE = 16384
LARGEST_FRAME_SIZE = (1 << 24) - 1
MAX_SETTINGS_BYTES = 6 * 32  # settings read from one SETTINGS frame; the rest are ignored
NOT_PREFACE = "not the HTTP/2 connection preface"  # Stopped.reason: a client that is no HTTP/2

# One frame header the classifier found beyond the capture: struct clv_h2_frame
# of bpf/clovisor.h (tests/kernel/test_abi.py holds the two to one layout).
H2_FRAME = struct.Struct("<I9sB2x48s")
MAX_HINTS = 256  # frame headers from the classifier held per direction
HINT_COST = 128  # what one held counts against the byte budget


def frame_hints(raw: bytes) -> list[tuple[int, bytes]]:
    """The classifier's ``clv_h2_frame`` records of one segment.

    Each is (offset of the frame header in the segment, the header's 9 bytes
    followed by the first payload bytes the classifier copied).
    """
    out = []
    size = H2_FRAME.size
    for at in range(0, len(raw) - size + 1, size):
        offset, head, peek_len, peek = H2_FRAME.unpack_from(raw, at)
        out.append((offset, head + peek[: min(peek_len, len(peek))]))
    return out


class FrameType(enum.IntEnum):
    DATA = 0
    HEADERS = 1
    PRIORITY = 2
    RST_STREAM = 3
    SETTINGS = 4
    PUSH_PROMISE = 5
    PING = 6
    GOAWAY = 7
    WINDOW_UPDATE = 8
    CONTINUATION = 9


END_STREAM = 0x1
ACK = 0x1
END_HEADERS = 0x4
PADDED = 0x8
PRIORITY_FLAG = 0x20

# Flags each type defines: anything else is ignored by RFC 9113, but is
# evidence against a guessed frame boundary.
_DEFINED_FLAGS = {
    FrameType.DATA: END_STREAM | PADDED,
    FrameType.HEADERS: END_STREAM | END_HEADERS | PADDED | PRIORITY_FLAG,
    FrameType.PRIORITY: 0,
    FrameType.RST_STREAM: 0,
    FrameType.SETTINGS: ACK,
    FrameType.PUSH_PROMISE: END_HEADERS | PADDED,
    FrameType.PING: ACK,
    FrameType.GOAWAY: 0,
    FrameType.WINDOW_UPDATE: 0,
    FrameType.CONTINUATION: END_HEADERS,
}
_FIXED_LENGTH = {
    FrameType.PRIORITY: 5,
    FrameType.RST_STREAM: 4,
    FrameType.PING: 8,
    FrameType.WINDOW_UPDATE: 4,
}
_CONNECTION_FRAMES = (FrameType.SETTINGS, FrameType.PING, FrameType.GOAWAY)
_BLOCK_FRAMES = (FrameType.HEADERS, FrameType.PUSH_PROMISE, FrameType.CONTINUATION)

# -- events ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Headers:
    """A header block: HEADERS (or PUSH_PROMISE) and its CONTINUATION frames."""

    stream_id: int
    block: DecodedBlock
    truncated: bool  # part of the block was not captured (or over the size bound)
    end_stream: bool
    start_ns: int  # the first byte of its first frame
    ts_ns: int  # its last byte
    wire_bytes: int  # the frames' bytes, headers included
    packets: int
    push: bool = False  # a PUSH_PROMISE (decoded for the HPACK table; it opens no client stream)
    promised_stream_id: int = 0  # its promised stream (0 if not captured)


@dataclass(frozen=True, slots=True, kw_only=True)
class Data:
    stream_id: int
    length: int  # the payload length from the frame header (padding included)
    end_stream: bool
    start_ns: int
    ts_ns: int
    wire_bytes: int
    packets: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Reset:
    stream_id: int
    error_code: int | None  # None: not captured
    ts_ns: int
    wire_bytes: int
    packets: int


@dataclass(frozen=True, slots=True, kw_only=True)
class GoAway:
    last_stream_id: int | None  # None: not captured
    error_code: int | None
    ts_ns: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    """Limits the sender announces for what it receives (the other direction)."""

    header_table_size: int | None
    max_frame_size: int | None
    ack: bool
    ts_ns: int


@dataclass(frozen=True, slots=True, kw_only=True)
class FramingLost:
    """Frames may have gone by unseen: streams may have ended, header blocks were missed.

    ``truncated``: a frame boundary lay beyond the captured bytes; else it lay
    in lost bytes, or a guessed boundary proved wrong.
    """

    reason: str
    ts_ns: int
    truncated: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class Stopped:
    """A bad frame: this direction is not parsed any more."""

    reason: str
    ts_ns: int


Event = Headers | Data | Reset | GoAway | Settings | FramingLost | Stopped

# -- the machine -------------------------------------------------------------------


class _FastHash(enum.Enum):
    __hash__ = object.__hash__


class State(_FastHash):
    PREFACE = enum.auto()  # the client preface is next
    SEEK = enum.auto()  # where frames begin is unknown
    HEAD = enum.auto()  # at or inside a frame header
    PAYLOAD = enum.auto()  # inside a frame payload
    STOPPED = enum.auto()  # a bad frame: nothing more is parsed


class Trigger(_FastHash):
    PREFACE_DONE = enum.auto()
    SYNC = enum.auto()
    SKIP = enum.auto()
    HEAD_DONE = enum.auto()
    PAYLOAD_DONE = enum.auto()
    LOST = enum.auto()  # a frame boundary went by unseen
    BAD = enum.auto()  # a bad frame where framing was certain
    BAD_GUESS = enum.auto()  # a bad frame after a guessed boundary


S, T = State, Trigger
_TRANSITIONS: dict[tuple[State, Trigger], State] = {
    (S.PREFACE, T.PREFACE_DONE): S.HEAD,
    (S.PREFACE, T.BAD): S.STOPPED,
    (S.PREFACE, T.LOST): S.SEEK,
    (S.SEEK, T.SYNC): S.HEAD,
    (S.SEEK, T.SKIP): S.SEEK,
    (S.SEEK, T.LOST): S.SEEK,
    (S.HEAD, T.HEAD_DONE): S.PAYLOAD,
    (S.HEAD, T.LOST): S.SEEK,
    (S.HEAD, T.BAD): S.STOPPED,
    (S.HEAD, T.BAD_GUESS): S.SEEK,
    (S.PAYLOAD, T.PAYLOAD_DONE): S.HEAD,
    (S.PAYLOAD, T.LOST): S.SEEK,
    (S.PAYLOAD, T.BAD): S.STOPPED,
    (S.PAYLOAD, T.BAD_GUESS): S.SEEK,
    (S.STOPPED, T.SKIP): S.STOPPED,
    (S.STOPPED, T.LOST): S.STOPPED,
}


class FrameReader:
    """Frames of one direction in, :data:`Event` s out."""

    __slots__ = (
        "_block",
        "_block_bytes",
        "_block_end_stream",
        "_block_packets",
        "_block_promised",
        "_block_push",
        "_block_short",
        "_block_start",
        "_block_stream",
        "_budget",
        "_flags",
        "_frame_packets",
        "_frame_start",
        "_guessed",
        "_hbuf",
        "_held",
        "_hints",
        "_in_block",
        "_length",
        "_need",
        "_pbuf",
        "_peek",
        "_pshort",
        "_remaining",
        "_state",
        "_stream",
        "_type",
        "bad_frames",
        "decoder",
        "framing_lost",
        "max_block_bytes",
        "max_frame_size",
        "preface_seen",
        "wanted",
    )

    def __init__(
        self,
        *,
        client: bool,
        synced: bool,
        wanted: frozenset[bytes],
        max_block_bytes: int = 65536,
        budget: Budget = UNLIMITED,
    ) -> None:
        """``client``: this direction is the client's (it starts with the preface).

        ``synced``: seen from the connection's first byte. ``wanted``: the
        header fields the events report.
        """
        self._budget = budget
        self._held = 0  # bytes of _hbuf, _pbuf and _block taken from the budget
        if synced:
            self._state = State.PREFACE if client else State.HEAD
        else:
            self._state = State.SEEK
        self._guessed = not synced
        self.decoder = FieldDecoder(synced=synced, budget=budget)
        self.wanted = wanted
        self.max_block_bytes = max_block_bytes
        # The receiver's SETTINGS_MAX_FRAME_SIZE; unknown when picked up mid-stream.
        self.max_frame_size = DEFAULT_MAX_FRAME_SIZE if synced else LARGEST_FRAME_SIZE
        self.preface_seen = False
        self.bad_frames = 0
        self.framing_lost = 0
        self._hbuf = b""  # a frame header being gathered
        # Frame headers beyond the capture, from the classifier: absolute
        # offset -> the header and its first payload bytes (see frame_hints).
        self._hints: dict[int, bytes] = {}
        self._peek = b""  # the first payload bytes of the frame being read, from a hint
        # The frame being read.
        self._type = 0
        self._flags = 0
        self._stream = 0
        self._length = 0
        self._remaining = 0
        self._need = 0  # payload bytes to gather into _pbuf
        self._pbuf = bytearray()
        self._pshort = False  # some of the needed payload was not captured
        self._frame_start = 0
        self._frame_packets = 0
        # The header block being gathered (HEADERS/PUSH_PROMISE + CONTINUATION).
        self._in_block = False
        self._block = bytearray()
        self._block_short = False
        self._block_stream = 0
        self._block_end_stream = False
        self._block_promised = 0
        self._block_push = False
        self._block_start = 0
        self._block_bytes = 0
        self._block_packets = 0

    @property
    def state(self) -> State:
        return self._state

    @property
    def held_bytes(self) -> int:
        return self._held + self.decoder.held_bytes + len(self._hints) * HINT_COST

    def hint(self, offset: int, data: bytes) -> None:
        """A frame header (and its first payload bytes) at absolute ``offset``,
        found by the classifier beyond the captured bytes."""
        if len(self._hints) >= MAX_HINTS or offset in self._hints:
            return
        if self._budget.take(HINT_COST):
            self._hints[offset] = data

    def _fire(self, trigger: Trigger) -> None:
        try:
            self._state = _TRANSITIONS[(self._state, trigger)]
        except KeyError:
            raise ProtocolError(
                f"no transition from {self._state.name} on {trigger.name}"
            ) from None

    def announce(self, settings: Settings) -> None:
        """The receiver of this direction announced its limits (SETTINGS of the other one)."""
        if settings.header_table_size is not None:
            self.decoder.announce(settings.header_table_size)
        if settings.max_frame_size is not None:
            # Tolerant of order: a frame may be sent before the SETTINGS is seen here.
            if self.max_frame_size == LARGEST_FRAME_SIZE:
                self.max_frame_size = settings.max_frame_size
            else:
                self.max_frame_size = max(self.max_frame_size, settings.max_frame_size)

    # -- input ---------------------------------------------------------------

    def feed(self, chunk: Chunk, out: list[Event]) -> None:
        """Consume one in-order chunk; append what it completed to ``out``."""
        if chunk.lost:
            self._hole(chunk, out)
            return
        length = chunk.length
        data = chunk.data
        captured = min(len(data), length)
        ts = chunk.ts_ns
        self._frame_packets += chunk.packets
        pos = 0
        while pos < length:
            state = self._state
            if state is State.PAYLOAD:
                pos = self._payload(data, captured, pos, length, ts, out)
            elif state is State.HEAD:
                if pos >= captured:
                    pos = self._beyond(chunk, pos, out)
                    if pos < 0:
                        break
                    continue
                pos = self._head(data, captured, pos, ts, out)
            elif state is State.PREFACE:
                pos = self._preface(data, captured, pos, ts, out)
            elif state is State.SEEK:
                if pos == 0 and chunk.packets and self._chains(data, captured, length):
                    self._fire(Trigger.SYNC)
                    self._guessed = True
                    self._frame_packets = chunk.packets
                    continue
                self._fire(Trigger.SKIP)
                return
            else:
                self._fire(Trigger.SKIP)  # STOPPED
                break
        if self._hints:
            self._prune(chunk.offset + length)

    def _prune(self, end: int) -> None:
        """Drop the hints of frames at or before ``end`` (passed, or never needed)."""
        stale = [at for at in self._hints if at < end]
        for at in stale:
            del self._hints[at]
        self._budget.give(len(stale) * HINT_COST)

    def _beyond(self, chunk: Chunk, pos: int, out: list[Event]) -> int:
        """A frame header at ``pos``, past the captured prefix: from the
        classifier's hint, or from the segment's tail; else framing is lost.
        Returns the new position, or -1 when framing was lost."""
        ts = chunk.ts_ns
        have = len(self._hbuf)
        if not have:
            self._frame_start = ts
        hint = self._hints.pop(chunk.offset + pos - have, None) if self._hints else None
        if hint is not None:
            self._budget.give(HINT_COST)
            if pos + 9 - have <= chunk.length:
                self._drop_hbuf()
                self._peek = hint[9:]
                self._header(hint[:9], ts, out)
                return pos + 9 - have
        tail = chunk.tail
        tail_start = chunk.length - len(tail)
        if hint is None and tail and pos >= tail_start:
            # The last bytes of a segment: a header it ends with, the rest to follow.
            piece = tail[pos - tail_start : pos - tail_start + 9 - have]
            header = self._hbuf + piece
            if len(header) < 9:
                self._keep_hbuf(header)
                return pos + len(piece)
            self._drop_hbuf()
            self._peek = b""
            self._header(header, ts, out)
            return pos + len(piece)
        self._lose("a frame header beyond the captured bytes", ts, out)
        return -1

    def _hole(self, chunk: Chunk, out: list[Event]) -> None:
        """Lost bytes: counted through a payload, framing lost past it."""
        state = self._state
        if state is State.PAYLOAD and chunk.length <= self._remaining:
            self._remaining -= chunk.length
            if self._need or self._type in _BLOCK_FRAMES:
                self._pshort = True
                self._need = 0
            if not self._remaining:
                self._frame_done(chunk.ts_ns, out)
            return
        if state is State.SEEK or state is State.STOPPED:
            self._fire(Trigger.LOST)
            return
        self._lose("lost bytes across a frame boundary", chunk.ts_ns, out, truncated=False)

    # -- the states -----------------------------------------------------------------

    def _preface(self, data: bytes, captured: int, pos: int, ts: int, out: list[Event]) -> int:
        have = len(self._hbuf)
        n = min(len(PREFACE) - have, captured - pos)
        if n <= 0:
            self._lose("the connection preface beyond the captured bytes", ts, out)
            return pos
        piece = data[pos : pos + n]
        if piece != PREFACE[have : have + n]:
            self._drop_hbuf()
            self._stop(NOT_PREFACE, ts, out)
            return pos + n
        if have + n < len(PREFACE):
            self._keep_hbuf(self._hbuf + piece)
            return pos + n
        self._drop_hbuf()
        self.preface_seen = True
        self._fire(Trigger.PREFACE_DONE)
        return pos + n

    def _head(self, data: bytes, captured: int, pos: int, ts: int, out: list[Event]) -> int:
        have = len(self._hbuf)
        if not have:
            self._frame_start = ts
        if not have and captured - pos >= 9:
            header = data[pos : pos + 9]
            pos += 9
        else:
            n = min(9 - have, captured - pos)
            header = self._hbuf + data[pos : pos + n]
            pos += n
            if len(header) < 9:
                self._keep_hbuf(header)
                return pos
            self._drop_hbuf()
        self._peek = b""
        self._header(header, ts, out)
        return pos

    def _header(self, header: bytes, ts: int, out: list[Event]) -> None:
        """A whole 9-byte frame header: check it and start reading its payload."""
        length = int.from_bytes(header[0:3], "big")
        ftype, flags = header[3], header[4]
        stream = int.from_bytes(header[5:9], "big") & 0x7FFFFFFF
        problem = self._check(ftype, flags, stream, length)
        if problem:
            self._bad(problem, ts, out)
            return
        self._type, self._flags, self._stream, self._length = ftype, flags, stream, length
        self._remaining = length
        self._pbuf_reset()
        if ftype in _BLOCK_FRAMES or ftype == FrameType.SETTINGS:
            self._need = length
        elif ftype == FrameType.RST_STREAM:
            self._need = 4
        elif ftype == FrameType.GOAWAY:
            self._need = min(length, 8)
        elif ftype == FrameType.DATA and flags & PADDED:
            self._need = min(length, 1)
        else:
            self._need = 0
        if ftype == FrameType.SETTINGS:
            self._need = min(length, MAX_SETTINGS_BYTES)
        elif ftype in _BLOCK_FRAMES:
            # Past the bound the block is cut short; what fits still decodes.
            self._need = min(length, max(0, self.max_block_bytes - len(self._block)))
        self._fire(Trigger.HEAD_DONE)
        if length == 0:
            self._frame_done(ts, out)

    def _check(self, ftype: int, flags: int, stream: int, length: int) -> str:
        """Why a frame header is bad where framing is certain ('' if it is not)."""
        if length > self.max_frame_size:
            return "frame larger than the maximum frame size"
        if self._in_block:
            if ftype != FrameType.CONTINUATION or stream != self._block_stream:
                return "a header block interrupted"
            return ""
        if ftype > FrameType.CONTINUATION:
            return ""  # unknown types are skipped (RFC 9113, 4.1)
        if ftype == FrameType.CONTINUATION:
            # After a guessed boundary, the HEADERS it continues went by before it.
            return "" if self._guessed else "CONTINUATION without a header block"
        fixed = _FIXED_LENGTH.get(FrameType(ftype))
        if fixed is not None and length != fixed:
            return f"{FrameType(ftype).name} of length {length}"
        if ftype == FrameType.SETTINGS and (length % 6 or (flags & ACK and length)):
            return "SETTINGS of a bad length"
        if ftype != FrameType.WINDOW_UPDATE and (stream == 0) != (ftype in _CONNECTION_FRAMES):
            return f"{FrameType(ftype).name} on the wrong stream"
        if flags & PADDED and not length and ftype in (FrameType.DATA, FrameType.HEADERS,
                                                       FrameType.PUSH_PROMISE):
            return "a padded frame without its pad length"
        return ""

    def _payload(
        self, data: bytes, captured: int, pos: int, length: int, ts: int, out: list[Event]
    ) -> int:
        n = min(self._remaining, length - pos)
        if self._need:
            want = min(self._need, n)
            take = min(want, max(0, captured - pos))
            if take:
                self._gather(data[pos : pos + take])
            elif self._peek:
                # Beyond the capture, the classifier copied the payload's first bytes.
                at = self._length - self._remaining
                piece = self._peek[at : at + want]
                take = len(piece)
                if take:
                    self._gather(piece)
            if take < want:
                self._pshort = True  # needed bytes beyond the capture
                self._need = 0
        self._remaining -= n
        pos += n
        if self._remaining == 0:
            self._frame_done(ts, out)
        return pos

    def _gather(self, piece: bytes) -> None:
        if self._budget.take(len(piece)):
            self._held += len(piece)
            self._pbuf += piece
            self._need -= len(piece)
        else:
            self._pshort = True
            self._need = 0

    # -- frames ------------------------------------------------------------------

    def _frame_done(self, ts: int, out: list[Event]) -> None:
        ftype = self._type
        self._fire(Trigger.PAYLOAD_DONE)
        wire = 9 + self._length
        packets = self._frame_packets
        self._frame_packets = 0
        if ftype == FrameType.DATA:
            pad = self._pbuf[0] if self._flags & PADDED and self._pbuf else 0
            if self._flags & PADDED and pad >= self._length:
                self._pbuf_reset()
                self._bad("DATA padding longer than the payload", ts, out)
                return
            self._pbuf_reset()
            out.append(
                Data(
                    stream_id=self._stream, length=self._length,
                    end_stream=bool(self._flags & END_STREAM), start_ns=self._frame_start,
                    ts_ns=ts, wire_bytes=wire, packets=packets,
                )
            )  # fmt: skip
        elif ftype in _BLOCK_FRAMES:
            self._block_frame(ts, wire, packets, out)
        elif ftype == FrameType.RST_STREAM:
            code = int.from_bytes(self._pbuf[:4], "big") if len(self._pbuf) >= 4 else None
            self._pbuf_reset()
            out.append(Reset(stream_id=self._stream, error_code=code, ts_ns=ts, wire_bytes=wire,
                             packets=packets))  # fmt: skip
        elif ftype == FrameType.GOAWAY:
            buf = self._pbuf
            last = int.from_bytes(buf[0:4], "big") & 0x7FFFFFFF if len(buf) >= 4 else None
            code = int.from_bytes(buf[4:8], "big") if len(buf) >= 8 else None
            self._pbuf_reset()
            out.append(GoAway(last_stream_id=last, error_code=code, ts_ns=ts))
        elif ftype == FrameType.SETTINGS:
            self._settings(ts, out)
        else:
            self._pbuf_reset()  # PRIORITY, PING, WINDOW_UPDATE, unknown types

    def _settings(self, ts: int, out: list[Event]) -> None:
        buf = bytes(self._pbuf)
        self._pbuf_reset()
        table = frame = None
        for i in range(0, len(buf) - 5, 6):
            ident = int.from_bytes(buf[i : i + 2], "big")
            value = int.from_bytes(buf[i + 2 : i + 6], "big")
            if ident == 1:
                table = value
            elif ident == 5:
                if not DEFAULT_MAX_FRAME_SIZE <= value <= LARGEST_FRAME_SIZE:
                    self._bad("SETTINGS_MAX_FRAME_SIZE out of range", ts, out)
                    return
                frame = value
        out.append(
            Settings(header_table_size=table, max_frame_size=frame,
                     ack=bool(self._flags & ACK), ts_ns=ts)
        )  # fmt: skip

    def _block_frame(self, ts: int, wire: int, packets: int, out: list[Event]) -> None:
        ftype, flags, buf = self._type, self._flags, self._pbuf
        if ftype == FrameType.CONTINUATION and not self._in_block:
            self._pbuf_reset()  # its HEADERS went by before a guessed boundary
            self.decoder.lose()
            return
        start = 0
        pad = 0
        if ftype != FrameType.CONTINUATION:
            if flags & PADDED:
                if buf:
                    pad = buf[0]
                    start = 1
                else:
                    pad = -1  # not captured: where the fragment ends is unknown
            if ftype == FrameType.HEADERS and flags & PRIORITY_FLAG:
                start += 5
            promised = 0
            if ftype == FrameType.PUSH_PROMISE:
                if len(buf) >= start + 4:
                    promised = int.from_bytes(buf[start : start + 4], "big") & 0x7FFFFFFF
                start += 4
            if pad >= 0 and start + pad > self._length:
                self._pbuf_reset()
                self._bad("padding longer than the payload", ts, out)
                return
            self._in_block = True
            self._block_short = False
            self._block_stream = self._stream
            self._block_end_stream = bool(flags & END_STREAM)
            self._block_promised = promised
            self._block_push = ftype == FrameType.PUSH_PROMISE
            self._block_start = self._frame_start
            self._block_bytes = 0
            self._block_packets = 0
        end = self._length - pad if pad >= 0 else 0
        # A cut: bytes of the fragment that were not captured, lost or over the bound.
        cut = pad < 0 or self._pshort or end > len(buf)
        fragment = bytes(buf[start : min(end, len(buf))])
        self._pbuf_reset()
        if fragment and not self._block_short:
            # Only bytes contiguous with the block so far: nothing after a cut.
            if len(self._block) + len(fragment) <= self.max_block_bytes and self._budget.take(
                len(fragment)
            ):
                self._held += len(fragment)
                self._block += fragment
            else:
                cut = True
        if cut:
            self._block_short = True
        self._block_bytes += wire
        self._block_packets += packets
        if flags & END_HEADERS:
            self._emit_block(ts, out)

    def _emit_block(self, ts: int, out: list[Event]) -> None:
        block = bytes(self._block)
        self._budget.give(len(self._block))
        self._held -= len(self._block)
        self._block = bytearray()
        complete = not self._block_short
        self._in_block = False
        self._block_short = False
        decoded = self.decoder.decode(block, self.wanted, complete=complete)
        out.append(
            Headers(
                stream_id=self._block_stream, block=decoded, truncated=not complete,
                end_stream=self._block_end_stream,
                start_ns=self._block_start, ts_ns=ts, wire_bytes=self._block_bytes,
                packets=self._block_packets, push=self._block_push,
                promised_stream_id=self._block_promised,
            )
        )  # fmt: skip

    # -- losing and stopping ----------------------------------------------------

    def _lose(self, reason: str, ts: int, out: list[Event], *, truncated: bool = True) -> None:
        """Framing lost: a frame boundary went by unseen. Seek a new one."""
        self.framing_lost += 1
        self._abandon(ts, out)
        self._fire(Trigger.LOST)
        out.append(FramingLost(reason=reason, ts_ns=ts, truncated=truncated))

    def _bad(self, reason: str, ts: int, out: list[Event]) -> None:
        self.bad_frames += 1
        self._abandon(ts, out)
        if self._guessed:
            self._fire(Trigger.BAD_GUESS)
            out.append(FramingLost(reason=reason, ts_ns=ts))
        else:
            self._fire(Trigger.BAD)
            out.append(Stopped(reason=reason, ts_ns=ts))

    def _stop(self, reason: str, ts: int, out: list[Event]) -> None:
        self.bad_frames += 1
        self._abandon(ts, out)
        self._fire(Trigger.BAD)
        out.append(Stopped(reason=reason, ts_ns=ts))

    def _abandon(self, ts: int, out: list[Event]) -> None:
        """Whatever was being read is cut off here; the HPACK table is unknown after it."""
        self._drop_hbuf()
        self._pbuf_reset()
        if self._in_block:
            self._block_short = True
            self._emit_block(ts, out)
        self.decoder.lose()
        self._frame_packets = 0

    def release(self) -> None:
        """Return every held byte to the budget (the connection is gone)."""
        self._drop_hbuf()
        self._pbuf_reset()
        self._budget.give(len(self._hints) * HINT_COST)
        self._hints.clear()
        self._budget.give(len(self._block))
        self._held -= len(self._block)
        self._block = bytearray()
        self.decoder.release()

    # -- held bytes ------------------------------------------------------------------

    def _keep_hbuf(self, header: bytes) -> None:
        grow = len(header) - len(self._hbuf)
        self._budget.take(grow)  # at most 23 bytes: kept even when refused
        self._held += grow
        self._hbuf = header

    def _drop_hbuf(self) -> None:
        if self._hbuf:
            self._budget.give(len(self._hbuf))
            self._held -= len(self._hbuf)
            self._hbuf = b""

    def _pbuf_reset(self) -> None:
        if self._pbuf:
            self._budget.give(len(self._pbuf))
            self._held -= len(self._pbuf)
            self._pbuf = bytearray()
        self._pshort = False
        self._need = 0

    # -- seeking ------------------------------------------------------------------

    def _chains(self, data: bytes, captured: int, length: int) -> bool:
        """Whether a segment's captured frames chain exactly to its end.

        The frames may also end in a DATA frame that runs on past the segment.
        Every header must be one a sender could send: a known type, only
        its defined flags, the right kind of stream, a plausible length.
        """
        pos = 0
        # Unknown (picked up mid-stream): larger frames need a SETTINGS we did not see.
        limit = self.max_frame_size
        if limit == LARGEST_FRAME_SIZE:
            limit = DEFAULT_MAX_FRAME_SIZE
        while pos + 9 <= captured:
            flen = int.from_bytes(data[pos : pos + 3], "big")
            ftype, flags = data[pos + 3], data[pos + 4]
            reserved = data[pos + 5] & 0x80
            stream = int.from_bytes(data[pos + 5 : pos + 9], "big") & 0x7FFFFFFF
            if ftype > FrameType.CONTINUATION or reserved or flen > limit:
                return False
            kind = FrameType(ftype)
            if flags & ~_DEFINED_FLAGS[kind]:
                return False
            fixed = _FIXED_LENGTH.get(kind)
            if fixed is not None and flen != fixed:
                return False
            if kind == FrameType.SETTINGS and flen % 6:
                return False
            if (stream == 0) != (kind in _CONNECTION_FRAMES) and kind != FrameType.WINDOW_UPDATE:
                return False
            end = pos + 9 + flen
            if end == length:
                return True
            if end > length:
                return kind == FrameType.DATA
            pos = end
        return False


__all__ = [
    "H2_FRAME",
    "NOT_PREFACE",
    "PREFACE",
    "Data",
    "Event",
    "FrameReader",
    "FrameType",
    "FramingLost",
    "GoAway",
    "Headers",
    "Reset",
    "Settings",
    "State",
    "Stopped",
    "frame_hints",
]
